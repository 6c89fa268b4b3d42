"""The ``crops`` step: extra crops of large images (full body, upper body, head, face) from detectors.

Guide 002 (step 8, and its FAQ on blurred faces): a 4k full-body picture is scaled down to about
512x512 pixels in training and the face is lost; cut it into four pictures instead: full body,
cowboy shot, bust and face. This step finds people, upper bodies, heads and faces with the
YOLO-style ONNX detectors that deepghs' imgutils runs (``deepghs/anime_person_detection``,
``anime_halfbody_detection``, ``anime_head_detection``, ``anime_face_detection``) and adds each crop
as a new image that inherits the caption, minus tags the crop no longer shows.

The detector signature (as imgutils calls it): input ``images``, float32 RGB in 0..1, NCHW, the
picture resized so its longer side is at most ``max_infer_size`` and both sides are multiples of
32 (or to the model's fixed size); output ``output0`` of shape (1, 4 + classes, candidates): box
centre x, centre y, width, height in input pixels, then one score per class. Candidates above the
confidence threshold go through non-maximum suppression and are scaled back to the picture.
"""
from __future__ import annotations

import ast
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from lorakit.plugin_sdk import (
    ImageStep, Item, LorakitError, ModelNotFound, ModelRef, Param, ParamError, StepContext, hookimpl,
    chosen_device, device_param, model_file_digest, onnx_providers, pick_device, resolve_model_files,
)

from . import tag_rules
from ._tagging import tag_key

KINDS = ("person", "halfbody", "head", "face")
SUFFIXES = {"person": "full", "halfbody": "upper", "head": "head", "face": "face"}
# The framing tag a crop of each kind gets (Danbooru's names), replacing the picture's own.
FRAMING = {"person": None, "halfbody": "upper_body", "head": "portrait", "face": "close-up", "manual": None}
FRAMING_TAGS = frozenset({"full_body", "cowboy_shot", "upper_body", "lower_body", "portrait", "close-up",
                          "feet_out_of_frame", "head_out_of_frame", "out_of_frame"})
# Tags a crop no longer shows. Upper-body crops lose the feet; head and face crops lose everything
# below the neck that the tag names say (legs, legwear, lower garments, hands at the hips...).
_BELOW_KNEE = {"feet", "toes", "barefoot", "soles", "socks", "kneehighs", "leg_warmers", "anklet", "ankles",
               "full_body", "standing_on_one_leg"}
_LOWER_BODY = re.compile(r"(?:.+_)?(?:skirt|miniskirt|pants|shorts|trousers|jeans|thighhighs|pantyhose|leggings|"
                         r"legwear|thighs|thigh_strap|garter_straps|garter_belt|panties|knees|legs|hips|ass|"
                         r"navel|midriff|crotch|groin|bikini_bottom)(?:_.+)?")
_LOWER_EXACT = {"zettai_ryouiki", "thick_thighs", "wide_hips", "bare_legs", "sitting", "kneeling", "squatting",
                "crossed_legs", "hand_on_hip", "hands_on_hips", "cameltoe", "navel", "midriff", "stomach", "belt"}


def removed_by_crop(tag: str, kind: str) -> bool:
    """Whether a crop of ``kind`` no longer shows what canonical ``tag`` names."""
    if kind in ("person", "manual"):
        return False
    if tag in FRAMING_TAGS:
        return True
    if "footwear" in tag_rules.categories_of(tag) or tag in _BELOW_KNEE:
        return True
    if kind in ("head", "face"):
        return tag in _LOWER_EXACT or bool(_LOWER_BODY.fullmatch(tag))
    return False


# ----- the detector ---------------------------------------------------------------------------------
@dataclass
class Detection:
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in picture pixels
    label: str
    score: float


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    out = boxes.copy()
    out[:, 0] = boxes[:, 0] - boxes[:, 2] / 2
    out[:, 1] = boxes[:, 1] - boxes[:, 3] / 2
    out[:, 2] = boxes[:, 0] + boxes[:, 2] / 2
    out[:, 3] = boxes[:, 1] + boxes[:, 3] / 2
    return out


def non_max_suppression(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> list[int]:
    """Indices of the boxes kept, best first: each drops the later boxes it overlaps by more than
    ``iou_threshold`` (intersection over union, pixel-inclusive areas as YOLO's reference code)."""
    x0, y0, x1, y1 = boxes.T
    areas = (x1 - x0 + 1) * (y1 - y0 + 1)
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(int(best))
        w = np.maximum(0.0, np.minimum(x1[best], x1[rest]) - np.maximum(x0[best], x0[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y1[best], y1[rest]) - np.maximum(y0[best], y0[rest]) + 1)
        inter = w * h
        iou = inter / (areas[best] + areas[rest] - inter)
        order = rest[iou <= iou_threshold]
    return keep


class YoloDetector:
    """One ONNX detector with the YOLOv8 export signature (see the module docstring)."""

    def __init__(self, path: Path, providers: list, max_infer_size: int | None):
        import onnxruntime as ort

        try:
            self.session = ort.InferenceSession(str(path), providers=providers)
        except Exception as exc:
            raise ModelNotFound(f"crops: cannot load detector {path}: {exc}") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        shape = inputs[0].shape
        if len(shape) != 4 or shape[1] != 3:
            raise LorakitError(f"crops: detector {path} takes {inputs[0].name} of shape {shape}; expected "
                               "[1, 3, height, width] (a YOLO detector as deepghs' imgutils runs)")
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        self.fixed = (shape[3], shape[2]) if all(isinstance(s, int) and s > 0 for s in shape[2:]) else None
        meta = self.session.get_modelmeta().custom_metadata_map or {}
        self.labels = _labels(meta.get("names"))
        imgsz = _literal(meta.get("imgsz"))
        default = max(imgsz) if isinstance(imgsz, (list, tuple)) and imgsz else 1216
        self.max_infer_size = max_infer_size or default
        self.path = path

    def input_size(self, width: int, height: int) -> tuple[int, int]:
        """imgutils' preprocessing: shrink so the longer side fits, then round both up to 32."""
        if self.fixed:
            return self.fixed
        r = self.max_infer_size / max(width, height)
        w, h = (width * r, height * r) if r < 1 else (width, height)
        return int(math.ceil(w / 32) * 32), int(math.ceil(h / 32) * 32)

    def detect(self, image: Image.Image, conf_threshold: float, iou_threshold: float) -> list[Detection]:
        rgb = image.convert("RGB")
        old = rgb.size
        new = self.input_size(*old)
        data = (np.asarray(rgb.resize(new, Image.BICUBIC), dtype=np.float32) / 255.0).transpose(2, 0, 1)[None]
        output = self.session.run([self.output_name], {self.input_name: data})[0][0]  # (4 + classes, n)
        if output.ndim != 2 or output.shape[0] < 5:
            raise LorakitError(f"crops: detector {self.path} returned shape {output.shape}; expected "
                               "(1, 4 + classes, candidates)")
        scores = output[4:, :]
        best = scores.max(axis=0)
        chosen = best > conf_threshold
        if not chosen.any():
            return []
        boxes = xywh_to_xyxy(output[:4, chosen].T.astype(np.float64))
        class_scores = scores[:, chosen].T
        keep = non_max_suppression(boxes, class_scores.max(axis=1), iou_threshold)
        found = []
        for i in keep:
            x0, y0, x1, y1 = boxes[i]
            sx, sy = old[0] / new[0], old[1] / new[1]
            box = (int(round(float(np.clip(x0 * sx, 0, old[0])))), int(round(float(np.clip(y0 * sy, 0, old[1])))),
                   int(round(float(np.clip(x1 * sx, 0, old[0])))), int(round(float(np.clip(y1 * sy, 0, old[1])))))
            cls = int(class_scores[i].argmax())
            label = self.labels[cls] if cls < len(self.labels) else str(cls)
            found.append(Detection(box, label, float(class_scores[i, cls])))
        return found


def _literal(text):
    if not text:
        return None
    try:
        return ast.literal_eval(text)  # metadata written by the exporter: a dict or list literal, never code
    except (ValueError, SyntaxError):
        return None


def _labels(names) -> list[str]:
    value = _literal(names)
    if isinstance(value, dict):
        return [str(value[k]) for k in sorted(value)]
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return []


# ----- boxes ----------------------------------------------------------------------------------------
def _ratio(value) -> float | str | None:
    """``none``, ``bucket`` or ``W:H`` (``3:4``) / a number (width / height)."""
    if value is None:
        return None
    text = str(value).strip().lower()
    if text in ("none", ""):
        return None
    if text == "bucket":
        return "bucket"
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*[:/x]\s*([0-9]*\.?[0-9]+)", text)
    r = float(m.group(1)) / float(m.group(2)) if m and float(m.group(2)) else None
    if r is None:
        try:
            r = float(text)
        except ValueError:
            raise ValueError(f"none, bucket, or a ratio such as 3:4 ({value!r} is not)") from None
    if not 0.1 <= r <= 10:
        raise ValueError(f"a ratio between 1:10 and 10:1 ({value!r})")
    return r


def pad_box(box, padding: float, size: tuple[int, int]) -> tuple[float, float, float, float]:
    """The box grown by ``padding`` (a fraction of its width and height) on every side, kept in the picture."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    return (max(0.0, x0 - padding * w), max(0.0, y0 - padding * h),
            min(float(size[0]), x1 + padding * w), min(float(size[1]), y1 + padding * h))


def fit_ratio(box, ratio: float, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The smallest box of aspect ``ratio`` (width / height) around ``box`` that fits in the picture:
    grown on the short side around the box centre and shifted inside; if the picture is too narrow
    (or too low), the other side shrinks instead."""
    x0, y0, x1, y1 = box
    W, H = size
    w, h = x1 - x0, y1 - y0
    if w / h < ratio:
        w = h * ratio
    else:
        h = w / ratio
    if w > W:
        w, h = W, W / ratio
    if h > H:
        h, w = H, H * ratio
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left = min(max(cx - w / 2, 0), W - w)
    top = min(max(cy - h / 2, 0), H - h)
    return int(round(left)), int(round(top)), int(round(left + w)), int(round(top + h))


# ----- the step ---------------------------------------------------------------------------------------
def read_boxes(path: Path) -> dict[str, list[dict]]:
    """Manual crop boxes: ``{image name: [[x0, y0, x1, y1], {"box": [...], "kind": "face", "name": "closeup"}]}``
    (JSON). A bad entry names the file, the image and the problem."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"a readable JSON file of crop boxes ({path}: {exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"a JSON object {{image name: [boxes]}} ({path} holds a {type(data).__name__})")
    out: dict[str, list[dict]] = {}
    for name, entries in data.items():
        if not isinstance(entries, list):
            entries = [entries]
        boxes = []
        for n, entry in enumerate(entries, start=1):
            spec = entry if isinstance(entry, dict) else {"box": entry}
            box = spec.get("box")
            kind = spec.get("kind", "manual")
            label = str(spec.get("name") or (SUFFIXES.get(kind, "crop") + (str(n) if len(entries) > 1 else "")))
            if (not isinstance(box, (list, tuple)) or len(box) != 4
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)
                    or box[2] <= box[0] or box[3] <= box[1]):
                raise ValueError(f"boxes [x0, y0, x1, y1] with x1 > x0 and y1 > y0 ({path}: {name!r} entry {n} is {box!r})")
            if kind not in KINDS + ("manual",):
                raise ValueError(f"kinds among {', '.join(KINDS)}, manual ({path}: {name!r} entry {n} has {kind!r})")
            if not re.fullmatch(r"[A-Za-z0-9_.-]{1,40}", label):
                raise ValueError(f"crop names of letters, digits, _ . - ({path}: {name!r} entry {n} has {label!r})")
            boxes.append({"box": [int(round(v)) for v in box], "kind": kind, "name": label})
        out[str(name)] = boxes
    return out


def _check_boxes(path: Path) -> None:
    read_boxes(path)


def _model_spec(spec: str) -> tuple[str, str]:
    """``path`` / ``folder`` / ``owner/repo`` / ``owner/repo:file/in/repo.onnx`` -> (spec, file name)."""
    path = Path(str(spec)).expanduser()
    if path.exists():
        return str(spec), path.name if path.is_file() else "model.onnx"
    repo, sep, file = str(spec).partition(":")
    return repo, (file if sep and file else "model.onnx")


class CropsStep(ImageStep):
    """Add extra crops of each large image: full body (person), upper body (halfbody), head and
    face, from ONNX detectors of the kind deepghs' imgutils runs. Give a detector per kind you
    want (person_model, halfbody_model, head_model, face_model): a .onnx file, a folder with
    model.onnx, or a hub repo with the file after a colon, e.g.
    deepghs/anime_face_detection:face_detect_v1.4_s/model.onnx (from the local hub cache).

    Each crop is a new image named <name>_full, _upper, _head, _face (a number after it when
    max_crops > 1), with the original's caption minus the tags it no longer shows (footwear on
    an upper-body crop; legs, legwear and lower garments on a head or face crop), its framing
    tag (upper_body, portrait, close-up), and its mask cropped alike. A crop is made only when it
    has at least min_crop_pixels (default the training resolution squared) and is at most
    max_area of the picture (else it is nearly the picture itself). With ratio, crops grow to a
    fixed aspect (3:4, 1:1, or bucket: the nearest kohya bucket of the crop). The original stays,
    with its detections and crop boxes in meta.crops; each crop has meta.crop (kind, box, score,
    parent, removed tags). boxes adds crops chosen by hand (a JSON file).
    """

    name = "crops"
    summary = "Extra crops of large images (full body, upper body, head, face) by detectors."
    version = "1"
    workers = 1
    reads = frozenset({"image", "tags", "mask"})
    writes = frozenset({"image", "tags", "mask", "meta"})
    example = "lorakit crops big/ cropped/ --face-model face_detect.onnx --ratio bucket"
    params = [
        *[Param(f"{kind}_model", ModelRef, None, f"{kind} detector: .onnx file, folder with model.onnx, or "
                f"hub repo[:file]" + (" (e.g. deepghs/anime_person_detection:person_detect_v1.3_s/model.onnx)"
                                      if kind == "person" else ""))
          for kind in KINDS],
        Param("conf_threshold", float, 0.3, "detections scoring at least this count (imgutils' default)", min=0, max=1),
        Param("iou_threshold", float, 0.5, "overlapping detections above this intersection-over-union are merged",
              min=0, max=1),
        Param("max_infer_size", int, 0, "longest side fed to the detector (0 = the model's imgsz, else 1216)", min=0),
        Param("max_crops", int, 1, "crops per kind per image, best scores first", min=1, max=20),
        Param("padding", float, 0.1, "grow each detected box by this fraction of its size on every side",
              min=0, max=2),
        Param("ratio", _ratio, None, "fixed aspect of the crops: none, bucket (nearest kohya bucket) or W:H",
              type_name="none, bucket, or a ratio such as 3:4", json_schema={"type": ["string", "number", "null"]}),
        Param("min_crop_pixels", int, 0, "smallest crop kept, in pixels (0 = the training resolution squared)",
              min=0),
        Param("max_area", float, 0.8, "largest crop kept, as a share of the picture (a bigger one adds nothing)",
              min=0.05, max=1),
        Param("framing_tags", bool, True, "give crops their framing tag (upper_body, portrait, close-up)"),
        Param("boxes", Path, None, "JSON file of crop boxes chosen by hand: {image name: [[x0, y0, x1, y1], "
              "{box: [...], kind: face, name: closeup}]}; cut as given, with or without detectors",
              validate=_check_boxes),
        device_param(),
    ]

    def __init__(self, params=None):
        super().__init__(params)
        if not any(self.options[f"{k}_model"] for k in KINDS) and self.options.boxes is None:
            raise ParamError(self.name, "person_model", None,
                             "at least one detector (person_model, halfbody_model, head_model or face_model) "
                             "or a boxes file")

    def _model_files(self) -> dict[str, Path]:
        files = {}
        for kind in KINDS:
            spec = self.options[f"{kind}_model"]
            if spec:
                repo, filename = _model_spec(spec)
                files[kind] = resolve_model_files(repo, [filename], f"crops {kind} detector")[filename]
        return files

    def cache_token(self) -> str:
        token = "crops:" + ",".join(f"{k}={model_file_digest(p)}" for k, p in self._model_files().items())
        if self.options.boxes is not None:
            token += ",boxes=" + model_file_digest(self.options.boxes)
        return token

    def setup(self, ctx: StepContext) -> None:
        device = pick_device(chosen_device(self.options.device, ctx.device))
        providers: list = onnx_providers("cpu" if device == "cpu" else "auto")
        self.detectors = {kind: YoloDetector(path, providers, self.options.max_infer_size or None)
                          for kind, path in self._model_files().items()}
        self.resolution = ctx.resolution
        self.manual = read_boxes(self.options.boxes) if self.options.boxes is not None else {}

    def _bucket_ratio(self, w: float, h: float) -> float:
        from lorakit.buckets import make_buckets, select_bucket

        bw, bh = select_bucket(max(1, int(w)), max(1, int(h)), make_buckets(self.resolution)).bucket
        return bw / bh

    def process(self, item: Item, ctx: StepContext):
        o = self.options
        if not hasattr(self, "detectors"):
            self.setup(ctx)
        manual = self.manual.get(item.name, [])
        image = item.open()
        size = image.size
        min_pixels = o.min_crop_pixels or ctx.resolution * ctx.resolution
        if size[0] * size[1] < min_pixels and not manual:
            return item  # too small for any crop to reach training resolution
        mask = item.open_mask()
        found: list[dict] = []
        crops: list[Item] = []
        for entry in manual:
            x0, y0, x1, y1 = entry["box"]
            box = (max(0, x0), max(0, y0), min(size[0], x1), min(size[1], y1))
            record = {"kind": entry["kind"], "label": "manual", "score": None, "box": entry["box"]}
            found.append(record)
            if box[2] <= box[0] or box[3] <= box[1]:
                record["skipped"] = f"outside the {size[0]}x{size[1]} picture"
                continue
            record["crop"] = list(box)
            record["name"] = f"{item.name}_{entry['name']}"
            crops.append(self._crop_item(item, image, mask, entry["kind"], Detection(box, "manual", 1.0), box,
                                         record["name"]))
        for kind, detector in (self.detectors.items() if size[0] * size[1] >= min_pixels else ()):
            detections = detector.detect(image, o.conf_threshold, o.iou_threshold)
            made = 0
            for d in detections:
                record = {"kind": kind, "label": d.label, "score": round(d.score, 4), "box": list(d.box)}
                found.append(record)
                if made >= o.max_crops:
                    record["skipped"] = f"max_crops {o.max_crops}"
                    continue
                box = pad_box(d.box, o.padding, size)
                if box[2] - box[0] < 1 or box[3] - box[1] < 1:
                    record["skipped"] = "empty box"
                    continue
                if o.ratio is not None:
                    ratio = self._bucket_ratio(box[2] - box[0], box[3] - box[1]) if o.ratio == "bucket" else o.ratio
                    crop_box = fit_ratio(box, ratio, size)
                else:
                    crop_box = tuple(int(round(v)) for v in box)
                cw, ch = crop_box[2] - crop_box[0], crop_box[3] - crop_box[1]
                if cw * ch < min_pixels:
                    record["skipped"] = f"crop {cw}x{ch} has fewer than {min_pixels} pixels"
                    continue
                if cw * ch > o.max_area * size[0] * size[1]:
                    record["skipped"] = f"crop {cw}x{ch} is more than {o.max_area:.0%} of the picture"
                    continue
                made += 1
                suffix = SUFFIXES[kind] + (str(made) if o.max_crops > 1 else "")
                record["crop"] = list(crop_box)
                record["name"] = f"{item.name}_{suffix}"
                crops.append(self._crop_item(item, image, mask, kind, d, crop_box, record["name"]))
        meta = dict(item.meta)
        meta["crops"] = found
        original = item.replace(meta=meta)
        return [original, *crops] if crops else original

    def _crop_item(self, item: Item, image, mask, kind: str, d: Detection, box, name: str) -> Item:
        tags: dict[str, float | None] = {}
        removed = []
        for raw, score in item.tags.items():
            if removed_by_crop(tag_key(raw), kind):
                removed.append(raw)
            else:
                tags[raw] = score
        framing = FRAMING[kind] if self.options.framing_tags else None
        if framing and tag_key(framing) not in {tag_key(t) for t in tags}:
            tags[framing] = None
        meta = {k: v for k, v in item.meta.items() if k not in ("crops", "trim")}
        meta["crop"] = {"kind": kind, "label": d.label, "score": None if d.label == "manual" else round(d.score, 4),
                        "detected": None if d.label == "manual" else list(d.box),
                        "box": list(box), "from": list(image.size), "parent": item.name, "removed_tags": removed}
        crop = item.with_image(image.crop(box), name=name, tags=tags, meta=meta)
        if mask is not None:
            crop = crop.with_mask(mask.crop(box))
        return crop


@hookimpl
def register_steps(register):
    register(CropsStep)
