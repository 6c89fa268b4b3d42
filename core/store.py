"""The work store under ``OUTPUT/.lorakit``: content-addressed files and the step-result cache.

* ``blobs/ab/<sha256><ext>``: every image and mask the pipeline has seen or made, named by content,
  written atomically. Sources are copied in (never moved), so originals are never touched.
* ``cache/ab/<key>.json``: what a step produced for an input, keyed by the input's content, the step
  name, version and parameters. A re-run finds its results here; an interrupted run resumes from
  the entries already written; changing one step's parameters changes only its keys (and those of
  the steps after it, whose inputs then differ).
* ``steps/<name>/``: each step's persistent work folder; ``tmp/``: scratch space.

An item travels between processes as a *state*: a JSON-able dict holding blob names instead of paths.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

from lorakit.plugin_sdk import PNG_COMPRESS_LEVEL, Item, atomic_path, atomic_write_text, file_digest

State = dict[str, Any]


def sha256_file(path: Path) -> str:
    return file_digest(path)


def digest(data: Any) -> str:
    """Stable hash of JSON-able data."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


class Store:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.cache = self.root / "cache"
        self.tmp = self.root / "tmp"
        for d in (self.blobs, self.cache, self.tmp, self.root / "steps"):
            d.mkdir(parents=True, exist_ok=True)

    # ----- blobs -----------------------------------------------------------------------------
    def blob_path(self, blob: str) -> Path:
        return self.blobs / blob[:2] / blob

    def add_file(self, path: Path, move: bool = False) -> str:
        """Put a file in the store; returns its blob name. ``move`` only for files the store owns."""
        sha = sha256_file(path)
        blob = sha + path.suffix.lower()
        target = self.blob_path(blob)
        if target.exists():
            if move:
                path.unlink(missing_ok=True)
            return blob
        target.parent.mkdir(parents=True, exist_ok=True)
        if move:
            os.replace(path, target)
        else:
            with atomic_path(target) as tmp:
                shutil.copyfile(path, tmp)
        return blob

    def add_bytes(self, data: bytes, ext: str) -> str:
        blob = hashlib.sha256(data).hexdigest() + ext
        target = self.blob_path(blob)
        if not target.exists():
            with atomic_path(target) as tmp:
                tmp.write_bytes(data)
        return blob

    def add_image(self, image) -> str:
        buf = io.BytesIO()
        image.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        return self.add_bytes(buf.getvalue(), ".png")

    def owns(self, path: Path) -> bool:
        try:
            Path(path).resolve().relative_to(self.root.resolve())
            return True
        except ValueError:
            return False

    # ----- items <-> states ------------------------------------------------------------------
    def item_from_state(self, state: State) -> Item:
        return Item(
            name=state["name"],
            path=self.blob_path(state["image"]),
            subset=state["subset"],
            caption=state.get("caption"),
            tags={t: s for t, s in state.get("tags", [])},
            mask=self.blob_path(state["mask"]) if state.get("mask") else None,
            meta=dict(state.get("meta", {})),
            source=state.get("source"),
            steps=list(state.get("steps", [])),
        )

    def state_from_item(self, item: Item) -> State:
        """Write pending pictures and adopt new files; return the JSON-able state."""
        if item.pending_image is not None:
            image_blob = self.add_image(item.pending_image)
        else:
            image_blob = self._adopt(Path(item.path))
        if item.pending_mask is not None:
            mask_blob = self.add_image(item.pending_mask)
        elif item.mask is not None:
            mask_blob = self._adopt(Path(item.mask))
        else:
            mask_blob = None
        return {
            "name": item.name,
            "image": image_blob,
            "mask": mask_blob,
            "subset": item.subset,
            "caption": item.caption,
            "tags": [[t, s] for t, s in item.tags.items()],
            "meta": item.meta,
            "source": item.source,
            "steps": list(item.steps),
        }

    def _adopt(self, path: Path) -> str:
        if self.owns(path) and path.parent.parent == self.blobs:
            return path.name
        tmp = self.tmp.resolve()
        inside_tmp = tmp in path.resolve().parents
        return self.add_file(path, move=inside_tmp)

    # ----- cache -----------------------------------------------------------------------------
    def cache_get(self, key: str) -> dict | None:
        path = self.cache / key[:2] / f"{key}.json"
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def cache_put(self, key: str, value: dict) -> None:
        atomic_write_text(self.cache / key[:2] / f"{key}.json", json.dumps(value, ensure_ascii=False, default=str))


def content_of(state: State) -> State:
    """The part of a state that decides a step's result (provenance and identity excluded)."""
    return {k: v for k, v in state.items() if k not in ("steps", "source", "id")}
