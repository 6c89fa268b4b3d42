"""WD14 tagger: Danbooru tags with scores from SmilingWolf's WD1.4 / v3 ONNX models.

A model is a folder (or hub repo) with ``model.onnx`` and ``selected_tags.csv``
(``tag_id,name,category,count``; category 0 general, 4 character, 9 rating). The input is read
from the model: NHWC float32, BGR, 0..255, square (448 for the released models).
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from lorakit.plugin_sdk import ImageStep, Item, LorakitError, ModelNotFound, ModelRef, Param, StepContext, hookimpl
from lorakit.plugin_sdk import (
    chosen_device, device_param, model_file_digest, onnx_providers, pick_device, resolve_model_files,
)
from lorakit.plugins._tagging import COMBINE_MODES, combine_tags, format_tag, style_params

DEFAULT_MODEL = "SmilingWolf/wd-swinv2-tagger-v3"
MODEL_FILES = ["model.onnx", "selected_tags.csv"]
CATEGORY_GENERAL, CATEGORY_CHARACTER, CATEGORY_RATING = 0, 4, 9


@dataclass
class TagTable:
    """The model's output labels, split by category (indices into the score vector)."""

    names: list[str]
    general: np.ndarray
    character: np.ndarray
    rating: np.ndarray


def read_selected_tags(path: Path) -> TagTable:
    """Read ``selected_tags.csv``; a missing column or a bad category names the file and line."""
    names: list[str] = []
    categories: list[int] = []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = {"name", "category"} - set(reader.fieldnames or [])
        if missing:
            raise LorakitError(f"{path}: not a WD14 tag list: missing column(s) {', '.join(sorted(missing))} "
                               "(expected tag_id,name,category,count)")
        for row in reader:
            try:
                categories.append(int(row["category"]))
            except (TypeError, ValueError):
                raise LorakitError(f"{path}:{reader.line_num}: category {row['category']!r} is not a number") from None
            names.append(row["name"])
    if not names:
        raise LorakitError(f"{path}: the tag list is empty")
    cats = np.array(categories)
    return TagTable(names, np.flatnonzero(cats == CATEGORY_GENERAL), np.flatnonzero(cats == CATEGORY_CHARACTER),
                    np.flatnonzero(cats == CATEGORY_RATING))


def prepare_image(image: Image.Image, size: int) -> np.ndarray:
    """The WD14 preprocessing: composite on white, pad to a centred white square, bicubic resize
    to ``size``, RGB -> BGR, float32 in 0..255, shape (size, size, 3)."""
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        flat.alpha_composite(rgba)
        rgb = flat.convert("RGB")
    else:  # no alpha: compositing on white would change no pixel
        rgb = image.convert("RGB") if image.mode != "RGB" else image
    side = max(rgb.size)
    if rgb.width == rgb.height:
        square = rgb
    else:
        square = Image.new("RGB", (side, side), (255, 255, 255))
        square.paste(rgb, ((side - rgb.width) // 2, (side - rgb.height) // 2))
    if side != size:
        square = square.resize((size, size), Image.BICUBIC)
    return np.asarray(square, dtype=np.float32)[:, :, ::-1].copy()


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask, which containers and taskset narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def mcut_threshold(scores: np.ndarray) -> float:
    """Maximum Cut Thresholding: the midpoint of the largest gap between consecutive sorted scores."""
    if len(scores) < 2:
        return 0.0
    ordered = np.sort(scores)[::-1]
    gaps = ordered[:-1] - ordered[1:]
    i = int(np.argmax(gaps))
    return float((ordered[i] + ordered[i + 1]) / 2)


class WD14Step(ImageStep):
    """Tag anime pictures with Danbooru tags using a WD1.4 / v3 tagger (SmilingWolf's ONNX models).

    General tags above `general_threshold` and character tags above `character_threshold` are
    kept with their scores (character tags first, then general, each by score). The rating
    (general, sensitive, questionable, explicit) goes to the image's metadata. Runs on CUDA through
    onnxruntime when a GPU is present, on the CPU otherwise. `model` is a folder holding
    model.onnx and selected_tags.csv, or a Hugging Face repo id taken from the local hub cache.
    """

    name = "wd14"
    summary = "Tag images with a WD1.4 / v3 tagger (Danbooru tags with scores, rating)."
    version = "1"
    workers = 1
    batch_size = 16
    reads = frozenset({"image", "tags"})
    writes = frozenset({"tags", "meta"})
    example = "lorakit wd14 raw/ tagged/ --general-threshold 0.35 --combine union"
    params = [
        Param("model", ModelRef, DEFAULT_MODEL,
              "folder with model.onnx and selected_tags.csv, or a Hugging Face repo id such as "
              "SmilingWolf/wd-vit-tagger-v3 or SmilingWolf/wd-v1-4-moat-tagger-v2"),
        Param("general_threshold", float, 0.35, "keep general tags scoring at least this", min=0, max=1),
        Param("character_threshold", float, 0.85, "keep character tags scoring at least this", min=0, max=1),
        Param("general_mcut", bool, False,
              "choose the general threshold per image by MCut (midpoint of the largest score gap) "
              "instead of general_threshold"),
        Param("character_mcut", bool, False,
              "choose the character threshold per image by MCut (never below 0.15)"),
        Param("combine", str, "replace",
              "what to do with tags the image already has: replace them, append the new tags after "
              "them, or union (new tags first, then old tags the tagger did not find)", choices=COMBINE_MODES),
        Param("rating", bool, True, "store the most likely rating in the metadata (meta.rating, meta.rating_scores)"),
        Param("rating_tag", bool, False, "also add the rating (e.g. 'general') as the first tag"),
        Param("exclude", list, [], "tags never written (comma-separated), e.g. 'simple_background, white_background'"),
        *style_params("underscores"),
        device_param(),
        Param("batch_size", int, 0, "images per model run (0 = by device: 1 on the CPU, 32 on CUDA)", min=0),
        Param("cpu_threads", int, 0, "on the CPU: pictures tagged at once, the cores shared out between "
              "them (0 = 1: one model run on every core while helper threads decode the next pictures)", min=0),
    ]

    # ----- model --------------------------------------------------------------------------------
    def _model_files(self) -> dict[str, Path]:
        return resolve_model_files(self.options.model, MODEL_FILES, "wd14 tagger model")

    def cache_token(self) -> str:
        files = self._model_files()
        return "wd14:" + ",".join(model_file_digest(files[name]) for name in MODEL_FILES)

    def setup(self, ctx: StepContext) -> None:
        import onnxruntime as ort

        files = self._model_files()
        self.tags = read_selected_tags(files["selected_tags.csv"])
        device = pick_device(chosen_device(self.options.device, ctx.device))  # cuda asked but absent: clear error
        providers: list = onnx_providers("cpu" if device == "cpu" else "auto")
        if device.startswith("cuda:"):
            providers = [("CUDAExecutionProvider", {"device_id": int(device[5:])}) if p == "CUDAExecutionProvider"
                         else p for p in providers]
        cuda = device != "cpu" and "CUDAExecutionProvider" in providers
        # On the CPU, a convnet or ViT tagger gains nothing from batches (activations grow with the
        # batch, the arithmetic does not get cheaper). By default one model run at a time gets every
        # core (intra_op = the cores, no spinning thread pool) while two helper threads decode and
        # preprocess the next two pictures, so the cores are not idle during decodes and the memory is
        # one run's. `cpu_threads` N > 1 runs N lanes instead, each decoding its own picture and
        # running the model with cores/N onnxruntime threads (concurrent runs of one session: the
        # weights once, the activations N times; measured at 1.6x the loop's memory). On CUDA the
        # session gets big batches, fed by decoding threads.
        self.lanes = 1 if cuda else (self.options.cpu_threads or 1)
        options = ort.SessionOptions()
        # The cores are shared out between the lanes: one lane (the default) runs the model on
        # every core while helper threads decode the next pictures.
        options.intra_op_num_threads = cpu_cores() if cuda else max(1, cpu_cores() // self.lanes)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0" if not cuda else "1")
        try:
            self.session = ort.InferenceSession(str(files["model.onnx"]), sess_options=options, providers=providers)
        except Exception as exc:
            raise ModelNotFound(f"wd14 tagger model: cannot load {files['model.onnx']}: {exc}") from None
        model_input = self.session.get_inputs()[0]
        shape = model_input.shape
        if len(shape) != 4 or shape[3] != 3 or not isinstance(shape[1], int) or shape[1] != shape[2]:
            raise LorakitError(f"wd14 tagger model {files['model.onnx']}: input {model_input.name} has shape {shape}; "
                               "expected [batch, size, size, 3] (NHWC, a WD14 tagger)")
        self.input_name = model_input.name
        self.size = int(shape[1])
        # Some exports have a fixed batch of 1: feed them one picture at a time.
        self.max_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        self.on_gpu = on_gpu = "CUDAExecutionProvider" in self.session.get_providers()
        if cuda and not on_gpu:  # CUDA was expected but onnxruntime fell back: its threads span the cores
            self.lanes = 1
        if self.options.batch_size:
            self.run_batch = self.options.batch_size
        else:
            self.run_batch = 32 if on_gpu else 1
        if self.max_batch:
            self.run_batch = min(self.run_batch, self.max_batch)
        # Images the runner hands over at a time: enough for every lane (or a few GPU batches).
        self.batch_size = max(16, 4 * self.run_batch * self.lanes)
        outputs = self.session.get_outputs()[0].shape
        if isinstance(outputs[-1], int) and outputs[-1] != len(self.tags.names):
            raise LorakitError(f"wd14 tagger model: model.onnx has {outputs[-1]} outputs but selected_tags.csv "
                               f"lists {len(self.tags.names)} tags; they do not belong together")
        self.exclude = {format_tag(t, "underscores").lower() for t in self.options.exclude}

    def scores(self, batch: np.ndarray) -> np.ndarray:
        """Run the model on a (n, size, size, 3) batch; returns (n, tags) scores."""
        step = self.max_batch or len(batch)
        parts = [self.session.run(None, {self.input_name: batch[i:i + step]})[0] for i in range(0, len(batch), step)]
        return np.concatenate(parts, axis=0).astype(np.float32)

    # ----- tags ---------------------------------------------------------------------------------
    def _select(self, indices: np.ndarray, scores: np.ndarray, threshold: float, mcut: bool, floor: float = 0.0):
        if mcut:
            threshold = max(mcut_threshold(scores[indices]), floor)
        chosen = [i for i in indices if scores[i] >= threshold]
        return sorted(chosen, key=lambda i: -scores[i])

    def tags_for(self, scores: np.ndarray) -> tuple[dict[str, float], str | None, dict[str, float]]:
        """Tags with scores, the rating and the rating scores for one image's score vector."""
        o = self.options
        picked = self._select(self.tags.character, scores, o.character_threshold, o.character_mcut, floor=0.15)
        picked += self._select(self.tags.general, scores, o.general_threshold, o.general_mcut)
        tags: dict[str, float] = {}
        for i in picked:
            raw = self.tags.names[i]
            if format_tag(raw, "underscores").lower() in self.exclude:
                continue
            tags[format_tag(raw, o.tag_style, o.escape_parentheses)] = round(float(scores[i]), 4)
        ratings = {self.tags.names[i]: round(float(scores[i]), 4) for i in self.tags.rating}
        rating = max(ratings, key=ratings.get) if ratings else None
        return tags, rating, ratings

    def process_batch(self, items: list[Item], ctx: StepContext) -> list:
        """Tag ``items`` in groups of ``run_batch`` (1 on the CPU by default): with one lane (the
        CPU default, and CUDA) the model runs on this thread while two helper threads decode
        the next two groups; with ``lanes`` > 1 each lane thread decodes and tags its own
        groups. Results (or the error that set a picture aside) are in the order of ``items``."""
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        groups = [list(range(i, min(i + self.run_batch, len(items)))) for i in range(0, len(items), self.run_batch)]
        results: list = [None] * len(items)
        if not self.on_gpu and self.lanes > 1:
            with ThreadPoolExecutor(max_workers=min(self.lanes, len(groups)) or 1, thread_name_prefix="wd14-lane") as pool:
                for group, tagged in zip(groups, pool.map(lambda g: self._tag_group(items, g), groups)):
                    for n, out in zip(group, tagged):
                        results[n] = out
            return results
        # Two helper threads decode the next two groups while the model runs on this one (three
        # groups in memory at most): one decoding thread alone cannot keep up when a picture
        # decodes slower than the model runs (a small model, big photos).
        ahead = 2
        with ThreadPoolExecutor(max_workers=ahead, thread_name_prefix="wd14-decode") as pool:
            def decode(g: list[int]):
                return pool.submit(lambda: [self._prepare(items[n]) for n in g])

            pending = deque(decode(g) for g in groups[:ahead])
            for k, group in enumerate(groups):
                arrays = pending.popleft().result()
                if k + ahead < len(groups):
                    pending.append(decode(groups[k + ahead]))
                for n, out in zip(group, self._run_group(items, group, arrays)):
                    results[n] = out
        return results

    def _prepare(self, item: Item):
        try:
            return prepare_image(item.open(), self.size)
        except Exception as exc:  # a broken picture is set aside, the others are tagged
            return exc

    def _tag_group(self, items: list[Item], group: list[int]) -> list:
        return self._run_group(items, group, [self._prepare(items[n]) for n in group])

    def _run_group(self, items: list[Item], group: list[int], arrays: list) -> list:
        """Tagged items (or errors) for the pictures ``group`` of ``items``, decoded as ``arrays``."""
        out: list = list(arrays)
        good = [k for k, a in enumerate(arrays) if not isinstance(a, Exception)]
        if good:
            try:
                all_scores = self.scores(np.stack([arrays[k] for k in good]))
            except Exception as exc:
                return [exc if k in good else arrays[k] for k in range(len(arrays))]
            for k, scores in zip(good, all_scores):
                out[k] = self._apply(items[group[k]], scores)
        return out

    def process(self, item: Item, ctx: StepContext) -> Item:
        return self._apply(item, self.scores(prepare_image(item.open(), self.size)[None])[0])

    def _apply(self, item: Item, scores: np.ndarray) -> Item:
        o = self.options
        tags, rating, ratings = self.tags_for(scores)
        if o.rating_tag and rating:
            tags = {format_tag(rating, o.tag_style, o.escape_parentheses): ratings[rating], **tags}
        meta = dict(item.meta)
        if o.rating and rating:
            meta["rating"] = rating
            meta["rating_scores"] = ratings
        return item.replace(tags=combine_tags(item.tags, tags, o.combine), meta=meta)


@hookimpl
def register_steps(register):
    register(WD14Step)
