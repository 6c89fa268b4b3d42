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
    rgba = image.convert("RGBA")
    flat = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    flat.alpha_composite(rgba)
    rgb = flat.convert("RGB")
    side = max(rgb.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(rgb, ((side - rgb.width) // 2, (side - rgb.height) // 2))
    if side != size:
        square = square.resize((size, size), Image.BICUBIC)
    return np.asarray(square, dtype=np.float32)[:, :, ::-1].copy()


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
        options = ort.SessionOptions()
        # One image at a time on the CPU (a convnet gains nothing from batching there and its
        # activations grow with the batch); all cores for the operators, while a helper thread
        # decodes and resizes the next pictures (PIL and numpy release the GIL).
        options.intra_op_num_threads = os.cpu_count() or 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
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
        on_gpu = "CUDAExecutionProvider" in self.session.get_providers()
        if self.options.batch_size:
            self.run_batch = self.options.batch_size
        else:
            self.run_batch = 32 if on_gpu else 1
        if self.max_batch:
            self.run_batch = min(self.run_batch, self.max_batch)
        self.batch_size = max(16, self.run_batch)  # images the runner hands over at a time
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
        """Decode and preprocess in a helper thread while the model runs on what is ready, in
        batches of ``run_batch`` (1 on the CPU, 32 on CUDA unless ``batch_size`` says otherwise)."""
        from concurrent.futures import ThreadPoolExecutor

        def prepare(item):
            try:
                return prepare_image(item.open(), self.size)
            except Exception as exc:  # a broken picture is set aside, the others are tagged
                return exc

        results: list = [None] * len(items)
        pending: list[tuple[int, np.ndarray]] = []

        def flush():
            if pending:
                all_scores = self.scores(np.stack([a for _, a in pending]))
                for (n, _), scores in zip(pending, all_scores):
                    results[n] = self._apply(items[n], scores)
                pending.clear()

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="wd14-prepare") as pool:
            for n, prepared in enumerate(pool.map(prepare, items)):
                if isinstance(prepared, Exception):
                    results[n] = prepared
                    continue
                pending.append((n, prepared))
                if len(pending) >= self.run_batch:
                    flush()
            flush()
        return results

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
