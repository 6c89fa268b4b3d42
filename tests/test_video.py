"""video source: frames from a tiny video the test encodes with FFmpeg (imageio-ffmpeg, a subprocess)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")

from lorakit.plugin_sdk import ParamError, StepContext  # noqa: E402
from lorakit.plugin_sdk.testing import run_pipeline_dict  # noqa: E402
from lorakit.plugins import video as video_module  # noqa: E402
from lorakit.plugins.video import VideoSource  # noqa: E402

SHOTS = [((200, 30, 30), 2.0), ((30, 200, 30), 1.5), ((30, 30, 200), 2.0)]  # red 0-2 s, green 2-3.5 s, blue


def encode(path: Path, shots=SHOTS, fps=8, size=(64, 48), motion=True) -> Path:
    """An H.264 video of flat-coloured shots, each with a small square moving inside it (motion, not cuts)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = imageio_ffmpeg.write_frames(str(path), size, fps=fps, macro_block_size=16, ffmpeg_log_level="error")
    writer.send(None)
    for shot, (colour, seconds) in enumerate(shots):
        for i in range(int(seconds * fps)):
            frame = np.empty((size[1], size[0], 3), np.uint8)
            frame[:] = colour
            x = (i * 2) % (size[0] - 8) if motion else 4 + 20 * shot
            frame[10:20, x:x + 8] = 255 - np.array(colour)
            if not motion:  # still shots differ in layout too, as real shots do
                frame[30 - 8 * shot:40 - 8 * shot, :] = 255 - np.array(colour)
            writer.send(frame.tobytes())
    writer.close()
    return path


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return encode(tmp_path_factory.mktemp("video") / "episode01.mp4")


def produce(tmp_path, params):
    ctx = StepContext("video", tmp_path / "work", tmp_path / "tmp", tmp_path / "out")
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    items = list(VideoSource.configure(params).produce(ctx))
    return items, ctx


def dominant(item) -> str:
    r, g, b = np.asarray(item.open())[0, 0]
    return "rgb"[int(np.argmax([r, g, b]))]


def test_scene_mode_keeps_the_first_frame_of_every_shot(tmp_path, clip):
    items, ctx = produce(tmp_path, {"path": str(clip)})
    assert [i.name for i in items] == ["episode01_00000000", "episode01_00002000", "episode01_00003500"]
    assert [dominant(i) for i in items] == ["r", "g", "b"]
    assert [i.meta["video"]["time"] for i in items] == [0.0, 2.0, 3.5]
    assert items[0].meta["video"]["scene_score"] is None and items[1].meta["video"]["scene_score"] > 0.3
    assert items[1].source == str(clip)
    assert "3 frames from 1 video(s) (scenes)" in ctx.messages


def test_interval_mode_keeps_one_frame_every_interval(tmp_path, clip):
    items, _ = produce(tmp_path, {"path": str(clip), "mode": "interval", "interval": 1.0})
    assert [i.meta["video"]["time"] for i in items] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert [dominant(i) for i in items] == ["r", "r", "g", "g", "b", "b"]
    assert items[0].open().size == (64, 48)


def test_max_frames_and_min_gap(tmp_path, clip):
    items, _ = produce(tmp_path, {"path": str(clip), "max_frames": 2})
    assert len(items) == 2
    items, _ = produce(tmp_path / "gap", {"path": str(clip), "min_gap": 1.8})
    assert [i.meta["video"]["time"] for i in items] == [0.0, 2.0]  # the cut at 3.5 s is 1.5 s after the last


def test_a_high_threshold_sees_no_cut(tmp_path, clip):
    items, _ = produce(tmp_path, {"path": str(clip), "scene_threshold": 0.9})
    assert [i.meta["video"]["time"] for i in items] == [0.0]


def test_a_rerun_reuses_the_extracted_frames(tmp_path, clip, monkeypatch):
    first, _ = produce(tmp_path, {"path": str(clip)})

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(video_module, "read_frames", no_decoding)
    again, _ = produce(tmp_path, {"path": str(clip)})
    assert [i.path for i in again] == [i.path for i in first]


def test_a_broken_video_is_reported_and_the_others_go_on(tmp_path, clip):
    folder = tmp_path / "videos"
    (folder / "season1").mkdir(parents=True)
    (folder / "season1" / "broken.mp4").write_bytes(b"this is not a video")
    (folder / "season1" / "ep.mp4").write_bytes(clip.read_bytes())
    items, ctx = produce(tmp_path, {"path": str(folder)})
    assert [i.name for i in items] == ["season1/ep_00000000", "season1/ep_00002000", "season1/ep_00003500"]
    assert any(m.startswith("skipped: ") and "broken.mp4" in m for m in ctx.messages)


def test_in_a_pipeline_ahead_of_dedupe(tmp_path):
    still = encode(tmp_path / "src" / "still.mp4", motion=False)
    res = run_pipeline_dict({
        "output": str(tmp_path / "out"),
        "sources": [{"video": {"path": str(still), "mode": "interval", "interval": 0.5}}],
        "steps": [{"dedupe": {}}],
    }, tmp_path, workers=1)
    # 11 frames of three still shots: dedupe keeps one per shot
    assert len(res.images) + len(res.set_aside) == 11
    kept = sorted(r.meta["video"]["time"] for r in res.images)
    assert len(kept) == 3 and kept[0] < 2.0 <= kept[1] < 3.5 <= kept[2]
    assert all(r.path.startswith("still_") and r.path.endswith(".png") for r in res.images)


def test_standalone_command(tmp_path, clip):
    from conftest import run_cli

    proc = run_cli("video", str(clip), str(tmp_path / "frames"))
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "frames" / "manifest.json").read_text())
    assert [r["path"] for r in manifest["images"]] == ["episode01_00000000.png", "episode01_00002000.png",
                                                        "episode01_00003500.png"]


def test_bad_options_are_refused(tmp_path):
    with pytest.raises(ParamError, match="path"):
        VideoSource.configure({"path": str(tmp_path / "missing.mp4")})
    with pytest.raises(ParamError, match="mode"):
        VideoSource.configure({"path": str(tmp_path), "mode": "every"})
