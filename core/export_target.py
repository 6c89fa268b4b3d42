"""The folder an export writes into: never the user's files overwritten unasked, nothing stale left.

An export records what it wrote in ``.lorakit-export.json`` (its ledger: path, size, time) in the
export folder. A later export into the same folder may overwrite those files and deletes the ones it
no longer writes (an image removed from the dataset), unless they changed since (then they are the
user's and are kept, with a note). A folder that is not empty and has no ledger is someone else's:
the export refuses it before writing anything, unless ``force``.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

from lorakit.plugin_sdk import LorakitError, PathEscape, atomic_path, atomic_write_text, confined_path

LEDGER = ".lorakit-export.json"


class ExportTarget:
    def __init__(self, out: Path, *, force: bool = False, where: str = "export"):
        from .pipeline import refuse_unsafe_output

        self.out, self.force, self.where = Path(out), force, where
        refuse_unsafe_output(self.out, where)
        self.previous = self._read_ledger()
        self.written: dict[str, list[int]] = {}
        self.kept: list[str] = []
        if self.previous is None and not force and self.out.is_dir() and any(self.out.iterdir()):
            raise LorakitError(
                f"{where}: {self.out} is not empty and is not a lorakit export (no {LEDGER}); nothing was written. "
                "Choose an empty or new folder, or pass --force to write into it (files with the same names "
                "are overwritten)")

    def _read_ledger(self) -> dict[str, list[int]] | None:
        path = self.out / LEDGER
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            files = data["files"]
            return {str(k): [int(v[0]), int(v[1])] for k, v in files.items()}
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise LorakitError(f"{self.where}: {path} is damaged ({type(exc).__name__}); delete it to export "
                               "there again (then the folder counts as someone else's), or choose another folder") \
                from None

    def _target(self, path: Path) -> tuple[str, Path]:
        rel = Path(path).resolve().relative_to(self.out.resolve()).as_posix() if Path(path).is_absolute() \
            else Path(path).as_posix()
        target = confined_path(self.out, rel, self.where)
        if (not self.force and target.exists() and self.previous is not None and rel not in self.previous
                and rel not in self.written):
            raise LorakitError(f"{self.where}: {target} exists and was not written by an earlier export; move it "
                               "away, choose another folder, or pass --force to overwrite it")
        return rel, target

    def _record(self, rel: str, target: Path) -> Path:
        st = target.stat()
        self.written[rel] = [st.st_size, st.st_mtime_ns]
        return target

    def copy(self, src: Path, path: Path) -> Path:
        rel, target = self._target(path)
        with atomic_path(target) as tmp:
            shutil.copyfile(src, tmp)
        return self._record(rel, target)

    def write_text(self, path: Path, text: str) -> Path:
        rel, target = self._target(path)
        atomic_write_text(target, text)
        return self._record(rel, target)

    def write_with(self, path: Path, write: Callable[[Path], None]) -> Path:
        """``write(tmp)`` writes the file to a temporary path; it is renamed into place."""
        rel, target = self._target(path)
        with atomic_path(target) as tmp:
            write(tmp)
        return self._record(rel, target)

    def finish(self) -> list[str]:
        """Delete what the last export wrote and this one did not (unless changed since); write the ledger.
        Returns the files kept because they changed since the last export wrote them."""
        for rel, (size, mtime) in sorted((self.previous or {}).items()):
            if rel in self.written:
                continue
            try:
                target = confined_path(self.out, rel, "export ledger entry")
                st = target.lstat()
            except (PathEscape, FileNotFoundError):
                continue
            if (st.st_size, st.st_mtime_ns) != (size, mtime):
                self.kept.append(rel)
                continue
            target.unlink()
            parent = target.parent
            while parent != self.out and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent
        atomic_write_text(self.out / LEDGER, json.dumps({"version": 1, "files": self.written}, indent=0,
                                                        sort_keys=True) + os.linesep)
        return self.kept
