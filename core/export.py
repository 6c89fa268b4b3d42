"""Exporting a dataset folder to the layouts other trainers read (kohya, diffusers ``metadata.jsonl``)."""
from __future__ import annotations

import json
from pathlib import Path

from lorakit.plugin_sdk import confined_path

from .export_target import ExportTarget
from .kohya import export_kohya
from .manifest import Manifest


def export_diffusers(manifest: Manifest, out: Path, repeat_lines: bool = False, force: bool = False) -> Path:
    """Images plus ``metadata.jsonl`` (``file_name``, ``text``) as diffusers' training scripts read.

    Regularisation images are left out (diffusers' DreamBooth scripts take them as a class folder).
    ``repeat_lines`` writes each image's line ``repeats`` times, since those scripts have no repeats.
    A non-empty folder that is not a lorakit export is refused unless ``force`` (see ``ExportTarget``).
    """
    out = Path(out)
    dest = ExportTarget(out, force=force, where="export diffusers")
    lines = []
    for r in manifest.images:
        if r.is_reg:
            continue
        src = manifest.abspath(r.path)
        rel = f"{r.subset}/{src.name}"
        dest.copy(src, confined_path(out, rel, f"export of {r.path}"))
        line = json.dumps({"file_name": rel, "text": r.caption}, ensure_ascii=False)
        lines += [line] * (r.repeats if repeat_lines else 1)
    target = dest.write_text(out / "metadata.jsonl", "\n".join(lines) + "\n")
    dest.finish()
    return target


EXPORTERS = {"kohya": export_kohya, "diffusers": export_diffusers}
