"""The manifest: the dataset folder's index, and the only thing the trainer reads.

A dataset folder holds the images, same-stem ``.txt`` captions, masks under ``masks/`` and
``manifest.json``. The schema is versioned (``MANIFEST_VERSION``) and documented in
``docs/manifest.md``; all paths in it are relative to the manifest's folder.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.plugin_sdk import LorakitError, PathEscape, Subset, atomic_write_text, check_relative, confined_path

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
SCHEMA_ID = "lorakit.manifest"


@dataclass
class ImageRecord:
    """One image of the dataset as the trainer sees it."""

    path: str
    caption: str
    subset: str
    width: int
    height: int
    sha256: str
    caption_path: str | None = None
    tags: list[dict[str, Any]] = field(default_factory=list)  # [{"name": str, "score": float | None}]
    sentence: str | None = None
    repeats: int = 1
    is_reg: bool = False
    mask: str | None = None
    source: str | None = None
    steps: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    id: str | None = None  # survives re-runs: source file's SHA-256 + frame/crop suffix (docs/curation.md)
    edited: bool = False  # some edit of the curation file touches this image

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ImageRecord":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class SetAsideRecord:
    """An image removed from the dataset, with the step and reason (kept under ``set_aside/``)."""

    name: str
    step: str
    reason: str
    source: str | None = None
    path: str | None = None
    id: str | None = None
    subset: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SetAsideRecord":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class Manifest:
    """The dataset: subsets, images and provenance. ``root`` is the folder the paths are relative to."""

    root: Path
    subsets: dict[str, Subset] = field(default_factory=dict)
    images: list[ImageRecord] = field(default_factory=list)
    set_aside: list[SetAsideRecord] = field(default_factory=list)
    pipeline: dict[str, Any] | None = None
    lorakit_version: str = ""
    created: str = ""
    resolution: int | None = None
    # True only for manifests lorakit builds in memory over files where they are (a kohya import):
    # their paths are absolute. A manifest read from a file has relative paths confined to ``root``.
    external_paths: bool = False
    curation: str | None = None  # the curation file (relative to root when it can be)

    # ----- reading and writing -------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> "Manifest":
        """Load ``manifest.json`` (or the folder that holds it)."""
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST_NAME
        if not path.is_file():
            raise LorakitError(f"{path}: no manifest here (run a pipeline, or import a kohya dataset first)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise LorakitError(f"{path}: manifest is not valid JSON (line {exc.lineno}: {exc.msg})") from None
        if data.get("schema") != SCHEMA_ID:
            raise LorakitError(f"{path}: not a lorakit manifest (schema is {data.get('schema')!r})")
        version = data.get("version")
        if not isinstance(version, int) or version > MANIFEST_VERSION:
            raise LorakitError(
                f"{path}: manifest version {version} is newer than this lorakit understands "
                f"({MANIFEST_VERSION}); upgrade lorakit"
            )
        manifest = cls(
            root=path.parent,
            subsets={name: Subset.from_dict({"name": name, **s}) for name, s in data.get("subsets", {}).items()},
            images=[ImageRecord.from_dict(r) for r in data.get("images", [])],
            set_aside=[SetAsideRecord.from_dict(r) for r in data.get("set_aside", [])],
            pipeline=data.get("pipeline"),
            lorakit_version=data.get("lorakit_version", ""),
            created=data.get("created", ""),
            resolution=data.get("resolution"),
            curation=data.get("curation"),
        )
        manifest._check_paths(path)
        return manifest

    def _check_paths(self, path: Path) -> None:
        """Every path in a manifest read from a file stays inside its folder (a shared dataset can be hostile)."""
        try:
            for name, sub in self.subsets.items():
                check_relative(name, "subset name")
                check_relative(sub.folder or ".", f"subset '{name}': folder")
            for i, r in enumerate(self.images):
                for key in ("path", "caption_path", "mask"):
                    value = getattr(r, key)
                    if value is not None:
                        check_relative(value, f"images[{i}].{key}")
        except PathEscape as exc:
            raise PathEscape(f"{path}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        from lorakit import __version__

        return {
            "schema": SCHEMA_ID,
            "version": MANIFEST_VERSION,
            "lorakit_version": self.lorakit_version or __version__,
            "created": self.created or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "resolution": self.resolution,
            "pipeline": self.pipeline,
            "curation": self.curation,
            "subsets": {name: {k: v for k, v in s.to_dict().items() if k != "name"} for name, s in self.subsets.items()},
            "images": [_record_dict(r) for r in self.images],
            "set_aside": [_record_dict(r) for r in self.set_aside],
        }

    def save(self, path: str | Path | None = None) -> Path:
        target = Path(path) if path else self.root / MANIFEST_NAME
        atomic_write_text(target, json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")
        return target

    # ----- what the trainer asks -----------------------------------------------------------
    def abspath(self, relative: str) -> Path:
        """The file a manifest path names; it must stay inside ``root`` (symlinks included)."""
        if self.external_paths and Path(relative).is_absolute():
            return Path(relative).resolve()
        return confined_path(self.root, relative, f"{self.root / 'manifest.json'}: path").resolve()

    def images_in(self, subset: str) -> list[ImageRecord]:
        return [r for r in self.images if r.subset == subset]

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """``{subset folder: {tag: count}}``, the shape of kohya's ``ss_tag_frequency``."""
        freq: dict[str, dict[str, int]] = {}
        for r in self.images:
            folder = f"{r.repeats}_{r.subset}"
            counts = freq.setdefault(folder, {})
            for tag in split_caption(r.caption):
                counts[tag] = counts.get(tag, 0) + 1
        return freq


def _record_dict(record) -> dict[str, Any]:
    """A record's fields as a dict (shallow: the values are JSON data already; asdict's deep copy
    costs more than the rest of writing a manifest)."""
    return {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}


def split_caption(caption: str) -> list[str]:
    """Tags of a comma-separated caption, stripped, empty parts dropped (``|||`` is a separator too)."""
    return [t.strip() for t in caption.replace("|||", ",").split(",") if t.strip()]


def load_dataset(path: str | Path) -> Manifest:
    """What the trainer reads: a dataset folder with manifest.json, a manifest file, or a kohya dataset
    (``N_name`` folders or ``dataset_config.toml``), imported in memory without copying."""
    path = Path(path)
    if path.is_file() and path.suffix == ".json":
        return _as_on_disk(Manifest.load(path))
    if path.is_dir() and (path / MANIFEST_NAME).is_file():
        return _as_on_disk(Manifest.load(path))
    if path.exists():
        from .kohya import manifest_from_kohya

        return manifest_from_kohya(path)
    raise LorakitError(f"{path}: no dataset here (expected a lorakit dataset folder, a manifest.json, "
                       "a kohya folder of N_name folders, or a dataset_config.toml)")


def _as_on_disk(manifest: Manifest) -> Manifest:
    """The dataset as its folder holds it now: a caption .txt edited by hand wins over the manifest
    (as the next run would keep it), and a listed image or mask missing from disk is an error that
    names it, before anything (an export, a training) starts."""
    missing = []
    for r in manifest.images:
        for rel in (r.path, r.mask):
            if rel and not manifest.abspath(rel).is_file():
                missing.append(rel)
        if r.caption_path and manifest.abspath(r.caption_path).is_file():
            try:
                text = manifest.abspath(r.caption_path).read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError):
                continue
            if text != r.caption.strip():
                scores = {t["name"]: t.get("score") for t in r.tags}
                r.caption, r.sentence = text, None
                r.tags = [{"name": t, "score": scores.get(t)} for t in split_caption(text)]
                r.edited = True
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise LorakitError(
            f"{manifest.abspath(missing[0])}: listed in {manifest.root / MANIFEST_NAME} but missing from disk{more}. "
            f"If it was deleted on purpose, run `lorakit curate apply {manifest.root}` (it is then excluded) or "
            "run the pipeline again; else put the file back")
    return manifest


_NULLABLE_STR = {"type": ["string", "null"]}
MANIFEST_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "lorakit manifest (version 1)",
    "type": "object",
    "required": ["schema", "version", "subsets", "images"],
    "properties": {
        "schema": {"const": SCHEMA_ID},
        "version": {"type": "integer", "minimum": 1},
        "lorakit_version": {"type": "string"},
        "created": {"type": "string"},
        "resolution": {"type": ["integer", "null"]},
        "pipeline": {"type": ["object", "null"]},
        "curation": _NULLABLE_STR,
        "subsets": {"type": "object", "additionalProperties": {
            "type": "object",
            "properties": {
                "folder": _NULLABLE_STR, "repeats": {"type": "integer", "minimum": 1},
                "triggers": {"type": "array", "items": {"type": "string"}},
                "class_tokens": _NULLABLE_STR, "keep_tokens": {"type": "integer", "minimum": 0},
                "keep_tokens_separator": _NULLABLE_STR, "is_reg": {"type": "boolean"},
                "shuffle_caption": {"type": ["boolean", "null"]}, "flip_aug": {"type": ["boolean", "null"]},
                "caption_dropout_rate": {"type": ["number", "null"]},
                "caption_tag_dropout_rate": {"type": ["number", "null"]},
            },
        }},
        "images": {"type": "array", "items": {
            "type": "object",
            "required": ["path", "caption", "subset", "width", "height", "sha256"],
            "properties": {
                "path": {"type": "string"}, "caption": {"type": "string"}, "caption_path": _NULLABLE_STR,
                "subset": {"type": "string"}, "width": {"type": "integer", "minimum": 1},
                "height": {"type": "integer", "minimum": 1}, "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                "tags": {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {
                    "name": {"type": "string"}, "score": {"type": ["number", "null"]}}}},
                "sentence": _NULLABLE_STR, "repeats": {"type": "integer", "minimum": 1},
                "is_reg": {"type": "boolean"}, "mask": _NULLABLE_STR, "source": _NULLABLE_STR,
                "steps": {"type": "array", "items": {"type": "string"}}, "meta": {"type": "object"},
                "id": _NULLABLE_STR, "edited": {"type": "boolean"},
            },
        }},
        "set_aside": {"type": "array", "items": {
            "type": "object", "required": ["name", "step", "reason"],
            "properties": {"name": {"type": "string"}, "step": {"type": "string"}, "reason": {"type": "string"},
                           "source": _NULLABLE_STR, "path": _NULLABLE_STR, "id": _NULLABLE_STR,
                           "subset": _NULLABLE_STR},
        }},
    },
}
