"""The ``video`` source: frames sampled from video files, at an interval or at scene changes.

Guide 002 counts screencaps among the sources (BangumiBase-style datasets are cut from episodes).
Frames are decoded by FFmpeg through imageio-ffmpeg, which runs the ``ffmpeg`` executable as a
subprocess (FFmpeg builds with x264 are GPL; lorakit never links them into its own process).
Run ``dedupe`` after this source: neighbouring frames of one shot are near duplicates.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image

from lorakit.plugin_sdk import MAX_PIXELS, Item, LorakitError, Param, SourceStep, atomic_write_text, hookimpl, save_image

VIDEO_EXTENSIONS = frozenset({".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".wmv", ".flv", ".mpg", ".mpeg",
                              ".ts", ".m2ts", ".ogv", ".gif"})
MODES = ("scenes", "interval")
THUMB = (64, 36)


def _existing(path: Path) -> None:
    if not Path(path).exists():
        raise ValueError(f"an existing video file or folder ({path} does not exist)")


def scene_score(previous: np.ndarray, current: np.ndarray) -> float:
    """How different two frames are, 0 (same) to 1: the mean absolute difference of small
    colour thumbnails (a cut between shots scores high, motion within a shot low)."""
    return float(np.abs(previous.astype(np.float32) - current.astype(np.float32)).mean() / 255.0)


def thumbnail(frame: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(frame).resize(THUMB, Image.BILINEAR))


def read_frames(path: Path, fps: float):
    """``(meta, frames)``: FFmpeg's stream info and an iterator of (index, time in s, RGB array)
    at ``fps`` frames per second."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path), output_params=["-vf", f"fps={fps:.6f}"])
    try:
        meta = reader.__next__()
    except (RuntimeError, OSError, StopIteration) as exc:
        reader.close()
        raise LorakitError(f"{path}: FFmpeg cannot read this video ({str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__})") from None
    width, height = meta["size"]
    if width * height > MAX_PIXELS:
        reader.close()
        raise LorakitError(f"{path}: frames of {width}x{height} exceed the pixel limit ({MAX_PIXELS})")

    def frames():
        try:
            for index, raw in enumerate(reader):
                yield index, index / fps, np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3)
        finally:
            reader.close()

    return meta, frames()


class VideoSource(SourceStep):
    """Sample frames from video files (mp4, mkv, webm, avi, mov...; a folder is searched
    recursively). mode scenes (the default) keeps the first frame of every shot: frames are
    examined analysis_fps times a second and one is kept when it differs from the frame before
    by more than scene_threshold (mean absolute difference of small thumbnails, 0-1), at least
    min_gap seconds after the last one kept; the video's first frame is always kept. mode
    interval keeps one frame every interval seconds. Frames are named <video>_<time in ms>
    and carry meta.video (source, time, scene score). Extracted frames are kept in the step's
    work folder, so a re-run does not decode again. A video FFmpeg cannot read is reported and
    skipped; the others go on. Follow with dedupe: frames of one shot are near duplicates."""

    name = "video"
    summary = "Frames from video files, one per scene change or at an interval (FFmpeg)."
    version = "1"
    params = [
        Param("path", Path, help="a video file, or a folder of videos", validate=_existing),
        Param("mode", str, "scenes", "scenes: first frame of every shot; interval: one frame every interval seconds",
              choices=MODES),
        Param("interval", float, 2.0, "interval mode: seconds between frames", min=0.01),
        Param("scene_threshold", float, 0.12, "scenes mode: difference (0-1) from the previous frame that counts "
              "as a cut", min=0, max=1),
        Param("analysis_fps", float, 4.0, "scenes mode: frames examined per second", min=0.1, max=120),
        Param("min_gap", float, 0.5, "scenes mode: fewest seconds between two frames kept", min=0),
        Param("max_frames", int, 0, "most frames per video (0 = no limit)", min=0),
    ]
    writes = frozenset({"image", "meta", "subset"})
    example = "lorakit video episodes/ frames/ --mode scenes --scene-threshold 0.12"

    def inputs(self) -> list[Path]:
        p = self.options.path
        return [p if p.is_dir() else p.parent]

    def _videos(self) -> list[Path]:
        root: Path = self.options.path
        if root.is_file():
            return [root]
        return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS
                      and not any(part.startswith(".") for part in p.relative_to(root).parts))

    def _key(self, video: Path) -> str:
        st = video.stat()
        data = {"video": str(video.resolve()), "size": st.st_size, "mtime": st.st_mtime_ns,
                "options": {k: v for k, v in self.options.as_json().items() if k != "path"}, "version": self.version}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def produce(self, ctx):
        videos = self._videos()
        if not videos:
            ctx.log(f"no video files found in {self.options.path}")
        root = self.options.path if self.options.path.is_dir() else self.options.path.parent
        total = 0
        with ctx.progress(len(videos), "videos") as advance:
            for video in videos:
                try:
                    frames = self._frames(video, ctx)
                except LorakitError as exc:
                    ctx.log(f"skipped: {exc}")
                    advance()
                    continue
                stem = video.relative_to(root).with_suffix("").as_posix()
                for record in frames:
                    total += 1
                    yield Item(name=f"{stem}_{record['ms']:08d}", path=Path(record["file"]), source=str(video),
                               meta={"video": {"source": str(video), "time": record["time"],
                                               "frame": record["frame"], "scene_score": record["score"]}})
                advance()
        ctx.log(f"{total} frames from {len(videos)} video(s) ({self.options.mode})")

    def _frames(self, video: Path, ctx) -> list[dict]:
        """The frames to keep of one video, extracted once into the work folder (a list file marks it done)."""
        folder = ctx.work_dir / self._key(video)
        done = folder / "frames.json"
        if done.is_file():
            records = json.loads(done.read_text(encoding="utf-8"))
            if all(Path(r["file"]).is_file() for r in records):
                return records
        o = self.options
        fps = 1.0 / o.interval if o.mode == "interval" else o.analysis_fps
        _, frames = read_frames(video, fps)
        records: list[dict] = []
        previous = None
        last_kept = None
        try:
            for index, time, frame in frames:
                if o.mode == "interval":
                    keep, score = True, None
                else:
                    small = thumbnail(frame)
                    score = None if previous is None else scene_score(previous, small)
                    previous = small
                    keep = score is None or (score > o.scene_threshold
                                             and (last_kept is None or time - last_kept >= o.min_gap - 1e-9))
                if not keep:
                    continue
                last_kept = time
                ms = int(round(time * 1000))
                target = folder / f"{ms:08d}.png"
                save_image(Image.fromarray(frame), target)
                records.append({"file": str(target), "time": round(time, 3), "ms": ms, "frame": index,
                                "score": None if score is None else round(score, 4)})
                if o.max_frames and len(records) >= o.max_frames:
                    break
        except (RuntimeError, OSError) as exc:  # FFmpeg died mid-way: keep what was decoded, say so
            ctx.log(f"{video}: decoding stopped after {len(records)} frame(s): {str(exc).strip()[:200]}")
            return records
        finally:
            frames.close()
        atomic_write_text(done, json.dumps(records))
        return records


@hookimpl
def register_steps(register):
    register(VideoSource)
