"""The run-level short circuit: an unchanged re-run reports the last run without redoing it.

A run's *fingerprint* covers everything its result depends on: the resolved pipeline, every step's
name, version, class and parameters, lorakit's and the plugins' versions, the curation file (and any
picture it puts in place of one), and each source's own fingerprint (the folder source: path, size,
modification time and inode of every entry under the folder, from one listing per folder; captions
by stat, not read). When it equals the one kept by the last run of this output folder that took
every result from the cache, and every file that run left in the output still has the size and time
it was written with (one ``lstat`` each), nothing can have changed: the run is reported from the
record (counts, set-asides, the manifest) and nothing is written.

A source that cannot fingerprint what it reads (``SourceStep.fingerprint`` returns None, the
default: a network grabber, a third-party source) and any step that declares ``volatile = True``
(results that depend on time, the network or unseeded randomness) turn the short circuit off.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

RECORD = "last-run.json"


def _stat_key(path: str) -> list | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_mode]


def folder_fingerprint(root: Path | str, recursive: bool = True) -> str:
    """A digest of every non-hidden entry under ``root`` (path, size, mtime_ns, inode, mode; a link's
    target too): one ``os.scandir`` per folder, no file opened."""
    h = hashlib.blake2b(digest_size=20)
    folders = [("", os.fspath(root))]
    while folders:
        rel_dir, folder = folders.pop()
        try:
            with os.scandir(folder) as listing:
                entries = sorted((e for e in listing if not e.name.startswith(".")), key=lambda e: e.name)
        except OSError as exc:
            h.update(f"!{rel_dir}:{type(exc).__name__}\n".encode())
            continue
        for e in entries:
            st = e.stat(follow_symlinks=False)
            line = f"{rel_dir}/{e.name}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0{st.st_mode}"
            if e.is_symlink():
                try:
                    t = os.stat(e.path)
                    line += f"\0->{os.path.realpath(e.path)}\0{t.st_size}\0{t.st_mtime_ns}\0{t.st_ino}"
                except OSError:
                    line += "\0->broken"
            h.update(line.encode("utf-8", "surrogateescape") + b"\n")
            if recursive and e.is_dir(follow_symlinks=False):
                folders.append((f"{rel_dir}/{e.name}", e.path))
    return h.hexdigest()


def run_fingerprint(runner) -> str | None:
    """The digest of everything ``runner``'s result depends on, or None when it cannot be known."""
    from . import __version__
    from .host import get_host

    pipeline = runner.pipeline
    parts: dict[str, Any] = {"lorakit": __version__, "output": os.path.abspath(runner.output),
                             "store": os.path.abspath(runner.store.root), "resolution": pipeline.resolution,
                             "subsets": pipeline.subsets, "raw": pipeline.raw}
    try:
        parts["plugins"] = sorted((p.name, p.distribution, p.version, p.module) for p in get_host().plugins)
    except Exception:  # noqa: BLE001 - no host: no short circuit
        return None
    steps = []
    for kind, cfgs in (("source", pipeline.sources), ("step", pipeline.steps)):
        for cfg in cfgs:
            step = cfg.step
            if getattr(step, "volatile", False):
                return None
            entry = [kind, step.name, step.version, f"{type(step).__module__}.{type(step).__qualname__}",
                     step.options.as_json(), getattr(cfg, "subset", None),
                     step.cache_token()]  # files a step reads beside its inputs (a model, a tag list)
            if kind == "source":
                fp = step.fingerprint()
                if fp is None:
                    return None
                entry.append(fp)
            steps.append(entry)
    parts["steps"] = steps
    text = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=20).hexdigest()


def with_curation(base: str, curation, digest: str | None = None) -> str:
    """``base`` (run_fingerprint) and the curation file: its digest (``digest``: the one a run
    applied; the curation file takes the hand edits a run finds) and any picture it puts in place."""
    pictures = []
    for edit in curation.edits():
        if getattr(edit, "image", None):
            pictures.append([edit.image, _stat_key(os.fspath(Path(curation.path).parent / edit.image))])
    text = json.dumps([base, digest if digest is not None else curation.digest(), pictures], default=str)
    return hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=20).hexdigest()


def _record_path(runner) -> Path:
    from .runner import STORE_DIR

    return runner.output / STORE_DIR / RECORD


def _own_files(runner) -> list[Path]:
    from .runner import STORE_DIR

    return [runner._ledger_path, runner._marks.path,
            runner.output / STORE_DIR / "curation-input.json"]


def outputs_untouched(runner, own: dict) -> bool:
    """Every file of the ledger, the manifest and reports, and lorakit's own records in the output
    have the size and time they were left with."""
    if not runner._output_untouched():
        return False
    for target, mark in runner._marks.marks.items():
        st = _stat_key(target)
        if not isinstance(mark, dict) or st is None or st[:2] != mark.get("stat"):
            return False
    return all(_stat_key(os.fspath(p)) == own.get(os.fspath(p)) for p in _own_files(runner))


def load(runner, fingerprint: str) -> dict | None:
    """The last run's record when its fingerprint is ``fingerprint`` and its outputs are untouched."""
    try:
        record = json.loads(_record_path(runner).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("fingerprint") != fingerprint or not record.get("summary"):
        return None
    if not outputs_untouched(runner, record.get("own") or {}):
        return None
    return record


def forget(runner) -> None:
    """A run that is not short-circuited may change the output: the record no longer holds."""
    try:
        os.unlink(_record_path(runner))
    except FileNotFoundError:
        pass


def save(runner, fingerprint: str, stats: list, summary: dict, set_aside: list) -> None:
    from dataclasses import asdict

    from .plugin_sdk import atomic_write_text

    own = {os.fspath(p): _stat_key(os.fspath(p)) for p in _own_files(runner)}
    atomic_write_text(_record_path(runner), json.dumps({
        "version": 1, "fingerprint": fingerprint, "own": own, "stats": [asdict(s) for s in stats],
        "summary": summary, "set_aside": [asdict(r) for r in set_aside]}, ensure_ascii=False))
