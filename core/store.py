"""The work store under ``OUTPUT/.lorakit``: content-addressed files and an index database.

* ``blobs/ab/<sha256><ext>``: every image and mask the pipeline has made, named by content, written
  atomically. A source image is not copied: it is read where it is (never written to) under the
  same kind of name, its SHA-256, and a state that still shows it carries its ``image_path``. A
  source file that changes gets a new name (the index notices the new size or modification time).
* ``index.sqlite``: one SQLite database (WAL journal) holding
  - ``cache``: what a step produced for an input, keyed by the step (name, version, parameters) and
    the fields of the input the step reads. A re-run finds its results here in batched look-ups; an
    interrupted run resumes from the entries already committed; changing one step's parameters
    changes only its keys (and those of later steps whose inputs then differ).
  - ``sources``: source files already checked and copied in, by path, size and modification time.
  - ``runs``: for each output folder, the cache keys and blobs its last complete run used (what
    ``lorakit clean`` keeps).
  Only the main process opens the database; worker processes write blobs and send results back.
* ``steps/<name>/``: each step's persistent work folder; ``tmp/``: scratch space.

An item travels between processes as a *state*: a JSON-able dict holding blob names instead of
paths, and the image's ``size`` so that nothing has to be decoded to write the manifest.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from PIL import Image

from lorakit.plugin_sdk import PNG_COMPRESS_LEVEL, Item, atomic_path, file_digest, image_size, is_partial_file

State = dict[str, Any]

DB_NAME = "index.sqlite"
_BATCH = 500  # keys per SELECT ... IN (...): below every SQLite build's variable limit

_SCHEMA = """
CREATE TABLE IF NOT EXISTS cache (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sources (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS runs (output TEXT PRIMARY KEY, digest TEXT NOT NULL, refs TEXT NOT NULL) WITHOUT ROWID;
"""


def sha256_file(path: Path) -> str:
    return file_digest(path)


def digest(data: Any) -> str:
    """Stable hash of JSON-able data."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str, separators=(",", ":"))


def opaque_as_rgb(image: Image.Image) -> Image.Image:
    """Drop an alpha channel that is fully opaque (every pixel 255): such images are written as RGB."""
    if image.mode in ("RGBA", "LA") and image.getchannel("A").getextrema() == (255, 255):
        return image.convert("RGB" if image.mode == "RGBA" else "L")
    return image


class Store:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self._blob_dir = os.fspath(self.blobs)
        self.tmp = self.root / "tmp"
        for d in (self.blobs, self.tmp, self.root / "steps"):
            d.mkdir(parents=True, exist_ok=True)
        self._db: sqlite3.Connection | None = None
        self._pending: dict[str, dict[str, str]] = {"cache": {}, "sources": {}}
        self._sizes: dict[str, tuple[int, int]] = {}  # blob -> (width, height), as far as this process knows
        self._in_place: dict[str, str] = {}  # blob -> the source file it is read from (not copied)
        self._in_place_blob: dict[str, str] = {}  # and back, by path

    # ----- the index database (main process only) --------------------------------------------
    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            db = sqlite3.connect(self.root / DB_NAME, timeout=30, isolation_level=None, check_same_thread=False)
            # WAL: a commit is durable once written, readers never block the writer, and a killed
            # process leaves the database as of its last commit.
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            self._db = db
        return self._db

    def close(self) -> None:
        self.flush()
        if self._db is not None:
            self._db.close()
            self._db = None

    def _get_many(self, table: str, keys: Iterable[str]) -> dict[str, Any]:
        wanted = list(dict.fromkeys(keys))
        found: dict[str, Any] = {}
        pending = self._pending[table]
        ask = [k for k in wanted if k not in pending]
        for k in wanted:
            if k in pending:
                found[k] = json.loads(pending[k])
        for i in range(0, len(ask), _BATCH):
            part = ask[i:i + _BATCH]
            rows = self.db.execute(f"SELECT key, value FROM {table} WHERE key IN ({','.join('?' * len(part))})", part)
            for key, value in rows:
                found[key] = json.loads(value)
        return found

    def _put(self, table: str, key: str, value: Any) -> None:
        self._pending[table][key] = _dumps(value)
        if len(self._pending[table]) >= 2000:
            self.flush()

    def flush(self) -> None:
        """Commit the entries written so far in one transaction (results survive a kill from here on)."""
        if not any(self._pending.values()):
            return
        db = self.db
        db.execute("BEGIN")
        try:
            for table, entries in self._pending.items():
                if entries:
                    db.executemany(f"INSERT OR REPLACE INTO {table} (key, value) VALUES (?, ?)", entries.items())
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # SQLite may have rolled back already (a full disk does)
                db.execute("ROLLBACK")
            raise
        for entries in self._pending.values():
            entries.clear()

    # step-result cache
    def cache_get(self, key: str) -> dict | None:
        return self._get_many("cache", [key]).get(key)

    def cache_get_many(self, keys: Iterable[str]) -> dict[str, dict]:
        return self._get_many("cache", keys)

    def cache_put(self, key: str, value: dict) -> None:
        self._put("cache", key, value)

    # source index
    def sources_get_many(self, keys: Iterable[str]) -> dict[str, dict]:
        return self._get_many("sources", keys)

    def source_put(self, key: str, value: dict) -> None:
        self._put("sources", key, value)

    # what each output folder's last run used
    def record_run(self, output: Path, refs: dict[str, list[str]]) -> None:
        """Remember the keys and blobs a finished run used (written only when they changed)."""
        text = _dumps({k: sorted(set(v)) for k, v in refs.items()})
        ref_digest = hashlib.sha256(text.encode()).hexdigest()
        row = self.db.execute("SELECT digest FROM runs WHERE output = ?", (str(output),)).fetchone()
        if row and row[0] == ref_digest:
            return
        self.db.execute("INSERT OR REPLACE INTO runs (output, digest, refs) VALUES (?, ?, ?)",
                        (str(output), ref_digest, text))

    def runs(self) -> dict[str, dict[str, list[str]]]:
        return {out: json.loads(refs) for out, refs in self.db.execute("SELECT output, refs FROM runs")}

    # ----- blobs -----------------------------------------------------------------------------
    def blob_path(self, blob: str) -> Path:
        where = self._in_place.get(blob)
        return Path(where) if where is not None else self.blobs / blob[:2] / blob

    def file_of(self, blob: str, in_place: str | None = None) -> str:
        """The file holding ``blob`` as a string: ``in_place`` (a source file read where it is) or
        the blob in the store (for the many files of a dataset: no Path objects)."""
        if in_place:
            return in_place
        where = self._in_place.get(blob)
        return where if where is not None else f"{self._blob_dir}/{blob[:2]}/{blob}"

    def read_in_place(self, path: str | Path, blob: str) -> None:
        """Let ``blob`` stand for the source file ``path`` (read where it is, never copied or written)."""
        path = os.fspath(path)
        self._in_place[blob] = path
        self._in_place_blob[path] = blob

    def image_file(self, state: State) -> Path:
        """The file holding a state's image (a source file read in place, or a blob)."""
        if state.get("image_path"):
            self.read_in_place(state["image_path"], state["image"])
        return self.blob_path(state["image"])

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

    def add_image(self, image: Image.Image) -> str:
        """Encode ``image`` once as PNG (RGB when its alpha is fully opaque) and store it."""
        image = opaque_as_rgb(image)
        buf = io.BytesIO()
        image.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        blob = self.add_bytes(buf.getvalue(), ".png")
        self._sizes[blob] = image.size
        return blob

    def size_of(self, blob: str) -> tuple[int, int]:
        """(width, height) of a blob: known when this process wrote or was told it, else from the header."""
        size = self._sizes.get(blob)
        if size is None:
            size = self._sizes[blob] = image_size(self.blob_path(blob))
        return size

    def owns(self, path: Path) -> bool:
        try:
            Path(path).resolve().relative_to(self.root.resolve())
            return True
        except ValueError:
            return False

    # ----- items <-> states ------------------------------------------------------------------
    def mask_file(self, state: State) -> Path | None:
        if not state.get("mask"):
            return None
        if state.get("mask_path"):
            self.read_in_place(state["mask_path"], state["mask"])
        return self.blob_path(state["mask"])

    def in_place_path(self, blob: str | None) -> str | None:
        return self._in_place.get(blob) if blob else None

    def item_from_state(self, state: State) -> Item:
        if state.get("size") and state.get("image"):
            self._sizes[state["image"]] = tuple(state["size"])
        return Item(
            name=state["name"],
            path=self.image_file(state),
            subset=state["subset"],
            caption=state.get("caption"),
            tags={t: s for t, s in state.get("tags", [])},
            mask=self.mask_file(state),
            meta=dict(state.get("meta", {})),
            source=state.get("source"),
            steps=list(state.get("steps", [])),
        )

    def state_from_item(self, item: Item) -> State:
        """Write pending pictures and adopt new files; return the JSON-able state."""
        image_blob = self.image_blob(item)
        mask_blob = self.mask_blob(item)
        return {
            "name": item.name,
            "image": image_blob,
            "image_path": self.in_place_path(image_blob),
            "size": list(self.size_of(image_blob)),
            "mask": mask_blob,
            "mask_path": self.in_place_path(mask_blob),
            "subset": item.subset,
            "caption": item.caption,
            "tags": [[t, s] for t, s in item.tags.items()],
            "meta": item.meta,
            "source": item.source,
            "steps": list(item.steps),
        }

    def image_blob(self, item: Item) -> str:
        if item.pending_image is not None:
            return self.add_image(item.pending_image)
        return self._adopt(Path(item.path))

    def mask_blob(self, item: Item) -> str | None:
        if item.pending_mask is not None:
            return self.add_image(item.pending_mask)
        if item.mask is not None:
            return self._adopt(Path(item.mask))
        return None

    def _adopt(self, path: Path) -> str:
        if path.parent.parent == self.blobs:
            return path.name
        blob = self._in_place_blob.get(str(path))
        if blob is not None:
            return blob
        tmp = self.tmp.resolve()
        inside_tmp = tmp in path.resolve().parents
        return self.add_file(path, move=inside_tmp)


_BLOB_NAME = re.compile(r"[0-9a-f]{64}\.[0-9a-z]{1,5}")


@dataclass
class CleanReport:
    """What ``lorakit clean`` removed (or, with --dry-run, would remove)."""

    entries: int = 0
    blobs: int = 0
    files: int = 0  # scratch files, partial writes and the old one-file-per-entry cache
    bytes: int = 0
    kept_entries: int = 0
    kept_blobs: int = 0
    kept_bytes: int = 0
    runs: list[str] = field(default_factory=list)


def clean_store(store: Store, dry_run: bool = False) -> CleanReport:
    """Remove the cache entries and blobs that no output folder's last finished run uses.

    A run is current while its output folder still holds a manifest.json. Blobs are kept when a
    kept entry names them (a step's result, a source file's copy)."""
    report = CleanReport()
    db = store.db
    store.flush()
    keep: dict[str, set[str]] = {"cache": set(), "sources": set()}
    for output, refs in store.runs().items():
        if (Path(output) / "manifest.json").is_file():
            report.runs.append(output)
            for table in keep:
                keep[table].update(refs.get(table, ()))
        elif not dry_run:
            db.execute("DELETE FROM runs WHERE output = ?", (output,))
    blobs_kept: set[str] = set()
    drop: dict[str, list[str]] = {"cache": [], "sources": []}
    for table in drop:
        for key, value in db.execute(f"SELECT key, value FROM {table}"):
            if key in keep[table]:
                report.kept_entries += 1
                blobs_kept.update(_BLOB_NAME.findall(value))
            else:
                drop[table].append(key)
                report.entries += 1
    doomed: list[Path] = []
    for sub in sorted(store.blobs.iterdir()) if store.blobs.is_dir() else []:
        for path in sub.iterdir():
            size = path.stat().st_size
            if path.name in blobs_kept:
                report.kept_blobs += 1
                report.kept_bytes += size
                continue
            doomed.append(path)
            report.bytes += size
            if is_partial_file(path):
                report.files += 1
            else:
                report.blobs += 1
    for old in (store.root / "cache", store.tmp, store.root / "source-index.json"):
        for path in ([old] if old.is_file() else old.rglob("*") if old.is_dir() else []):
            if path.is_file():
                doomed.append(path)
                report.files += 1
                report.bytes += path.stat().st_size
    if dry_run:
        return report
    db.execute("BEGIN")
    for table, keys in drop.items():
        db.executemany(f"DELETE FROM {table} WHERE key = ?", ((k,) for k in keys))
    db.execute("COMMIT")
    for path in doomed:  # entries first: a crash in between leaves files nobody names, never the reverse
        path.unlink(missing_ok=True)
    if (store.root / "cache").is_dir():
        shutil.rmtree(store.root / "cache", ignore_errors=True)
    db.execute("VACUUM")
    return report


def content_of(state: State) -> State:
    """The part of a state that decides a step's result (provenance, identity and size excluded)."""
    return {k: v for k, v in state.items() if k not in ("steps", "source", "id", "size", "image_path", "mask_path")}
