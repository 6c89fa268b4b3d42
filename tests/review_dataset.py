"""A generated dataset for the review page's tests and bench: tiny pictures with tags in two
subsets, a few exact duplicates, a broken file, flat-background shapes the mask step can cut out."""
from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

HAIR = ["long_hair", "short_hair", "ponytail", "twintails"]
COLOURS = ["red", "blue", "green", "yellow", "purple"]
EXTRA = ["smile", "looking_at_viewer", "open_mouth", "hat", "outdoors", "simple_background", "blush"]


def write_raw(folder: Path, count: int, seed: int = 0, duplicates: int = 3, broken: int = 1,
              size: tuple[int, int] = (40, 40)) -> list[Path]:
    """``count`` images split into raw/outfit_a and raw/outfit_b, each with a same-stem caption."""
    rng = random.Random(seed)
    paths = []
    for i in range(count):
        subset = "outfit_a" if i % 3 else "outfit_b"
        d = folder / subset
        d.mkdir(parents=True, exist_ok=True)
        w, h = size[0] + rng.randrange(0, 24), size[1] + rng.randrange(0, 24)
        colour = COLOURS[i % len(COLOURS)]
        im = Image.new("RGB", (w, h), "white")
        draw = ImageDraw.Draw(im)
        if i % 17 != 5:  # every 17th picture is blank: its mask trains nothing and is rejected
            x0, y0 = rng.randrange(2, w // 3), rng.randrange(2, h // 3)
            draw.ellipse([x0, y0, x0 + w // 2, y0 + h // 2], fill=colour)
            draw.rectangle([w // 2, h // 2, w - 4, h - 4], fill=(rng.randrange(256), rng.randrange(256), 40))
            for _ in range(6):  # texture, so perceptual hashes of different pictures differ
                x, y = rng.randrange(w), rng.randrange(h)
                draw.line([x, y, rng.randrange(w), rng.randrange(h)], fill=(rng.randrange(256),) * 3, width=2)
        path = d / f"img{i:05d}.png"
        im.save(path)
        tags = ["1girl", "solo", HAIR[i % len(HAIR)], f"{colour}_dress"] + rng.sample(EXTRA, 2)
        path.with_suffix(".txt").write_text(", ".join(tags), encoding="utf-8")
        paths.append(path)
    for k in range(duplicates):  # exact copies: dedupe keeps one of each pair
        src = paths[k * 7 + 1]
        dup = src.with_name(f"copy{k}.png")
        dup.write_bytes(src.read_bytes())
        dup.with_suffix(".txt").write_text(src.with_suffix(".txt").read_text(), encoding="utf-8")
    for k in range(broken):
        (folder / "outfit_a" / f"broken{k}.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    return paths


PIPELINE = """\
output: dataset
resolution: 512
sources:
  - folder: {path: raw, subfolders_as_subsets: true}
subsets:
  outfit_a: {repeats: 2}
  outfit_b: {repeats: 3}
steps:
  - convert
  - dedupe: {threshold: 0}
  - mask: {backend: color, min_foreground: 3%}
  - buckets
"""


def write_project(folder: Path, count: int, tagger: Path | None = None, **kwargs) -> Path:
    """raw/ + pipeline.yaml in ``folder``; returns the pipeline file (run it with ``lorakit run``).
    With ``tagger`` (a WD14 model folder) a wd14 step appends its tags, with their scores."""
    write_raw(folder / "raw", count, **kwargs)
    pipeline = folder / "pipeline.yaml"
    text = PIPELINE
    if tagger is not None:
        text += f"  - wd14: {{model: {tagger}, combine: append, general_threshold: 0.3}}\n"
    pipeline.write_text(text, encoding="utf-8")
    return pipeline


def run_project(pipeline: Path):
    """``lorakit run`` in this process (one worker: the pictures are tiny); returns the RunResult."""
    from rich.console import Console

    from lorakit.host import get_host
    from lorakit.pipeline import load_pipeline
    from lorakit.runner import Runner

    return Runner(load_pipeline(pipeline, get_host()), console=Console(stderr=True, quiet=True), workers=1).run()
