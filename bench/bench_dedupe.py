"""dedupe grouping quality: precision and recall of each linkage on a generated set with known duplicates.

    python bench/bench_dedupe.py                 # 2,000 originals, about 5,000 images
    python bench/bench_dedupe.py --originals 500 --threshold 10

The set is built here, so the truth is known: photo-like originals (smooth random fields with
shapes, grain and JPEG noise), and for some of them copies a user really collects (resized,
re-saved as JPEG at another quality, cropped by a few percent, brightened, a corner watermark).
Originals are drawn from a few hundred shared "scenes" (the same layout with other details, as in
screencaps of one episode), so unrelated pictures can be a few bits apart: that is where
transitive grouping chains pictures that are not duplicates of each other.

For each linkage the real grouping code of the step runs on the real imagehash hashes. An image
set aside is correct when its keeper is in its own truth group. Reported:
* precision = correct set-asides / all set-asides (an unrelated picture thrown away lowers it),
* recall = correct set-asides / true duplicates (a copy left in the dataset lowers it),
* the largest group (chaining shows as groups far larger than any truth group).
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from lorakit.plugins.dedupe import group_around_keepers, group_duplicates, hash_image, hashes_to_words  # noqa: E402


def scene(rng: np.random.Generator) -> np.ndarray:
    """A layout: a smooth colour field (the low frequencies a perceptual hash sees)."""
    return rng.random((5, 7, 3))


def original(scene_field: np.ndarray, rng: np.random.Generator, size=(320, 240)) -> Image.Image:
    field = np.clip(scene_field + rng.normal(0, 0.08, scene_field.shape), 0, 1)
    im = Image.fromarray((field * 255).astype(np.uint8)).resize(size, Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(2, 6))):  # details that differ between shots of one scene
        x, y = int(rng.integers(0, size[0] - 40)), int(rng.integers(0, size[1] - 40))
        w, h = int(rng.integers(15, 70)), int(rng.integers(15, 70))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x, y, x + w, y + h), fill=colour)
    arr = np.asarray(im, dtype=np.float32) + rng.normal(0, 6, (size[1], size[0], 3))  # grain
    return jpeg(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), int(rng.integers(75, 95)))


def jpeg(im: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def copy_of(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    kind = rng.integers(0, 5)
    w, h = im.size
    if kind == 0:
        f = float(rng.uniform(0.5, 0.9))
        return im.resize((int(w * f), int(h * f)), Image.Resampling.LANCZOS)
    if kind == 1:
        return jpeg(im, int(rng.integers(30, 70)))
    if kind == 2:
        d = int(min(w, h) * rng.uniform(0.02, 0.06))
        return im.crop((d, d, w - d, h - d))
    if kind == 3:
        arr = np.asarray(im, dtype=np.float32) * float(rng.uniform(0.9, 1.1)) + float(rng.uniform(-10, 10))
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    out = im.copy()
    ImageDraw.Draw(out).rectangle((w - 60, h - 20, w - 4, h - 4), fill=(255, 255, 255))
    return out


def build(originals: int, scenes: int, seed: int):
    rng = np.random.default_rng(seed)
    fields = [scene(rng) for _ in range(scenes)]
    images, truth, sizes = [], [], []
    for g in range(originals):
        base = original(fields[int(rng.integers(0, scenes))], rng)
        members = [base] + [copy_of(base, rng) for _ in range(int(rng.choice([0, 0, 1, 2, 3])))]
        for im in members:
            images.append(im)
            truth.append(g)
            sizes.append(im.size[0] * im.size[1])
    return images, np.array(truth), np.array(sizes)


def _hash(im):
    return hash_image(im, "phash", 8)


def evaluate(labels: np.ndarray, truth: np.ndarray, sizes: np.ndarray) -> dict:
    kept_of: dict[int, int] = {}
    for k in sorted(range(len(labels)), key=lambda k: (-sizes[k], k)):  # the step keeps the largest
        kept_of.setdefault(int(labels[k]), k)
    aside = [k for k in range(len(labels)) if kept_of[int(labels[k])] != k]
    correct = sum(1 for k in aside if truth[kept_of[int(labels[k])]] == truth[k])
    true_dups = len(truth) - len(set(truth.tolist()))
    groups = np.bincount(labels)
    return {"set_aside": len(aside), "correct": correct,
            "precision": correct / len(aside) if aside else 1.0, "recall": correct / true_dups if true_dups else 1.0,
            "largest_group": int(groups.max()), "largest_truth_group": int(np.bincount(truth).max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--originals", type=int, default=2000)
    ap.add_argument("--scenes", type=int, default=300, help="shared layouts the originals are drawn from")
    ap.add_argument("--threshold", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    t0 = time.perf_counter()
    images, truth, sizes = build(args.originals, args.scenes, args.seed)
    with ProcessPoolExecutor() as pool:
        hashes = list(pool.map(_hash, images, chunksize=32))
    words = hashes_to_words(hashes)
    print(f"{len(images)} images from {args.originals} originals ({len(images) - args.originals} true duplicates), "
          f"{args.scenes} scenes; phash 64 bits, threshold {args.threshold}; built and hashed in "
          f"{time.perf_counter() - t0:.1f} s")
    best_first = sorted(range(len(images)), key=lambda k: (-sizes[k], k))
    rows = {}
    t = time.perf_counter()
    rows["single (transitive)"] = (group_duplicates(words, args.threshold, 64)[0], time.perf_counter() - t)
    t = time.perf_counter()
    rows["keeper (default)"] = (group_around_keepers(words, args.threshold, best_first, 64), time.perf_counter() - t)
    t = time.perf_counter()
    rows["complete"] = (group_around_keepers(words, args.threshold, best_first, 64, complete=True),
                        time.perf_counter() - t)
    print(f"\n{'linkage':22} {'set aside':>9} {'correct':>8} {'precision':>9} {'recall':>7} {'largest group':>13} "
          f"{'seconds':>8}")
    for name, (labels, seconds) in rows.items():
        r = evaluate(np.asarray(labels), truth, sizes)
        print(f"{name:22} {r['set_aside']:9d} {r['correct']:8d} {r['precision']:9.3f} {r['recall']:7.3f} "
              f"{r['largest_group']:13d} {seconds:8.3f}")
    print(f"\nlargest true group: {int(np.bincount(truth).max())} images")


if __name__ == "__main__":
    main()
