"""Benchmark of the image-cleaning steps against the tools a user would use instead, in one run.

1. trim + alpha against ImageMagick on the same PNGs (bordered, some with transparency):
   - `convert IN -fuzz 20% -trim +repage -background white -alpha remove -alpha off OUT`, one process
     per image (the usual shell loop);
   - `mogrify` over the whole folder (one process, OpenMP threads);
   - lorakit's steps in one process (decode once, trim, flatten, one PNG encode);
   - the real lorakit pipeline (`folder -> trim -> alpha`, worker processes, content store).
   ImageMagick writes PNG at its default zlib level (7); lorakit at level 3. A second mogrify run
   with `-define png:compression-level=3` shows how much of the gap is compression.
2. dedupe grouping against imagehash, after hashing (the hashes are the same for both):
   - all pairs with imagehash's own `h1 - h2` (what its README shows), at 1k and 10k images;
   - all pairs vectorised with numpy (a strong hand-written baseline);
   - lorakit's multi-index grouping (`group_duplicates`).
   Hashing itself (the same imagehash call per image) is timed separately on the dataset-size
   pictures of part 1, serial vs lorakit's pool.
   A last row times the index alone on 100k synthetic 64-bit hashes in near-duplicate clusters.

Run:  python bench/bench_images.py            (about 5 minutes on 2 cores)
      python bench/bench_images.py --quick    (smaller sizes, no 10k imagehash all-pairs)
Every figure is printed as time and as a ratio against the alternative, measured in this run.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from lorakit.plugin_sdk import Item, StepContext, save_image
from lorakit.plugins.alpha import AlphaStep
from lorakit.plugins.dedupe import group_duplicates, hamming, hash_file, hashes_to_words
from lorakit.plugins.trim import TrimStep

CONVERT = "/usr/bin/convert" if Path("/usr/bin/convert").exists() else shutil.which("convert")
MOGRIFY = "/usr/bin/mogrify" if Path("/usr/bin/mogrify").exists() else shutil.which("mogrify")


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


# ----- 1. trim + alpha ----------------------------------------------------------------------
def make_trim_inputs(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """Dataset-like pictures: 640x896 or 1024x768 smooth content inside a uniform border; every third
    one RGBA with a transparent surround."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        w, h = (640, 896) if i % 2 else (1024, 768)
        content = Image.fromarray((rng.random((12, 12, 3)) * 255).astype(np.uint8)).resize(
            (w - 2 * int(rng.integers(10, 80)), h - 2 * int(rng.integers(10, 80))), Image.Resampling.BICUBIC)
        if i % 3 == 0:
            canvas = Image.new("RGBA", (w, h), (0, 0, 0, 0))
            canvas.paste(content.convert("RGBA"), ((w - content.width) // 2, (h - content.height) // 2))
        else:
            canvas = Image.new("RGB", (w, h), "white")
            canvas.paste(content, ((w - content.width) // 2, (h - content.height) // 2))
        path = folder / f"img{i:04d}.png"
        canvas.save(path, compress_level=3)
        paths.append(path)
    return paths


def lorakit_in_process(paths: list[Path], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    trim = TrimStep.configure({"fuzz": "20%"})
    alpha = AlphaStep.configure({"background": "white"})
    ctx = StepContext("bench", out, out, out)
    for path in paths:
        item = alpha.process(trim.process(Item(name=path.stem, path=path), ctx), ctx)
        if item.pending_image is not None:
            save_image(item.pending_image, out / f"{path.stem}.png")
        else:
            shutil.copyfile(path, out / f"{path.stem}.png")


def lorakit_pipeline(src: Path, out: Path) -> None:
    from lorakit.plugin_sdk.testing import run_pipeline_dict

    run_pipeline_dict({"output": str(out), "sources": [{"folder": {"path": str(src)}}],
                       "steps": [{"trim": {"fuzz": "20%"}}, {"alpha": {"background": "white"}}]}, src.parent, workers=None)


def imagemagick_loop(paths: list[Path], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for path in paths:
        subprocess.run([CONVERT, str(path), "-fuzz", "20%", "-trim", "+repage", "-background", "white",
                        "-alpha", "remove", "-alpha", "off", str(out / path.name)], check=True, capture_output=True)


def imagemagick_mogrify(paths: list[Path], out: Path, extra: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([MOGRIFY, "-path", str(out), *extra, "-fuzz", "20%", "-trim", "+repage", "-background", "white",
                    "-alpha", "remove", "-alpha", "off", *map(str, paths)], check=True, capture_output=True)


def bench_trim_alpha(root: Path, count: int) -> None:
    print(f"\n== trim + alpha, {count} images (640x896 / 1024x768 PNG, bordered, 1/3 RGBA) ==")
    src = root / "trim_in"
    paths = make_trim_inputs(src, count)
    rows = []
    t_ours, _ = timed(lorakit_in_process, paths, root / "ours")
    rows.append(("lorakit steps, 1 process", t_ours))
    t_pipe, _ = timed(lorakit_pipeline, src, root / "pipeline")
    rows.append((f"lorakit pipeline, {os.cpu_count()} workers", t_pipe))
    if CONVERT and MOGRIFY:
        t_loop, _ = timed(imagemagick_loop, paths, root / "im_loop")
        rows.append(("ImageMagick convert, 1 process/image", t_loop))
        t_mog, _ = timed(imagemagick_mogrify, paths, root / "im_mogrify", [])
        rows.append(("ImageMagick mogrify, 1 process (OpenMP)", t_mog))
        t_mog3, _ = timed(imagemagick_mogrify, paths, root / "im_mogrify3", ["-define", "png:compression-level=3"])
        rows.append(("ImageMagick mogrify, zlib level 3", t_mog3))
        # Same result check on a few files (the tests check this thoroughly).
        for p in paths[:5]:
            a = np.asarray(Image.open(root / "ours" / p.name).convert("RGB"), dtype=int)
            b = np.asarray(Image.open(root / "im_loop" / p.name).convert("RGB"), dtype=int)
            assert a.shape == b.shape and np.abs(a - b).max() <= 1, p
    else:
        print("ImageMagick not installed: lorakit figures only")
    for name, t in rows:
        print(f"{name:42s} {t:8.2f} s  {count / t:8.1f} images/s  ratio vs lorakit 1 process: {t / t_ours:5.2f}x")


# ----- 2. dedupe -----------------------------------------------------------------------------
def make_dedupe_inputs(folder: Path, count: int, seed: int = 1) -> list[Path]:
    """Small smooth random pictures; one in ten has a resized, re-compressed near copy."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    i = 0
    while len(paths) < count:
        im = Image.fromarray((rng.random((6, 6, 3)) * 255).astype(np.uint8)).resize((96, 72), Image.Resampling.BICUBIC)
        path = folder / f"p{i:05d}.png"
        im.save(path, compress_level=1)
        paths.append(path)
        if i % 10 == 0 and len(paths) < count:
            copy = folder / f"p{i:05d}_copy.jpg"
            im.resize((80, 60)).save(copy, quality=70)
            paths.append(copy)
        i += 1
    return paths


def imagehash_all_pairs(hashes, threshold: int) -> int:
    pairs = 0
    n = len(hashes)
    for a in range(n):
        ha = hashes[a]
        for b in range(a + 1, n):
            if ha - hashes[b] <= threshold:
                pairs += 1
    return pairs


def numpy_all_pairs(words: np.ndarray, threshold: int, block: int = 2048) -> int:
    pairs = 0
    n = len(words)
    for start in range(0, n, block):
        rows = np.arange(start, min(n, start + block))
        for other in range(start, n, block):
            cols = np.arange(other, min(n, other + block))
            i, j = np.meshgrid(rows, cols, indexing="ij")
            i, j = i.ravel(), j.ravel()
            keep = i < j
            pairs += int((hamming(words, i[keep], j[keep]) <= threshold).sum())
    return pairs


def _phash_of(path: str):
    import imagehash

    return imagehash.phash(Image.open(path))


def bench_hashing(paths: list[Path]) -> None:
    """The same imagehash.phash per image: a serial loop against lorakit's process pool (which also
    checks each file and digests its pixels for exact-duplicate detection)."""
    import imagehash

    t_serial, _ = timed(lambda: [imagehash.phash(Image.open(p)) for p in paths])
    workers = os.cpu_count() or 1
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        t_pool, _ = timed(lambda: list(pool.map(hash_file, map(str, paths), ["phash"] * len(paths), [8] * len(paths),
                                                chunksize=8)))
    print(f"hashing {len(paths)} dataset-size images: imagehash serial {t_serial:.2f} s, lorakit pool of {workers} "
          f"(process start-up included) {t_pool:.2f} s: ratio {t_serial / t_pool:.2f}x")


def bench_dedupe(root: Path, sizes: list[int], all_pairs_limit: int, threshold: int = 6) -> None:
    import imagehash

    print(f"\n== dedupe grouping after hashing (phash 64-bit, threshold {threshold}) ==")
    paths = make_dedupe_inputs(root / "dedupe_in", max(sizes))
    ih = [imagehash.phash(Image.open(p)) for p in paths]
    words_all = hashes_to_words([np.packbits(h.hash.ravel()).tobytes() for h in ih])
    group_duplicates(words_all[:100], threshold, 64)  # warm-up: imports and first-call costs
    previous = None
    for n in sizes:
        words = words_all[:n]
        t_index, (labels, _) = timed(group_duplicates, words, threshold, 64)
        t_numpy, np_pairs = timed(numpy_all_pairs, words, threshold)
        line = (f"n={n:6d}: lorakit index {t_index * 1000:8.1f} ms | numpy all-pairs {t_numpy * 1000:9.1f} ms "
                f"({t_numpy / t_index:6.1f}x)")
        if n <= all_pairs_limit:
            t_ih, ih_pairs = timed(imagehash_all_pairs, ih[:n], threshold)
            line += f" | imagehash all-pairs {t_ih:8.2f} s ({t_ih / t_index:8.0f}x)"
            assert ih_pairs == np_pairs
        groups = len(labels) - len(set(labels.tolist()))
        line += f" | {groups} duplicates found"
        if previous:
            pn, pt, pih = previous
            line += f" | n x{n / pn:.0f}: index time x{t_index / pt:.1f}"
        previous = (n, t_index, None)
        print(line)


def bench_index_synthetic(n: int, threshold: int = 6, seed: int = 2) -> None:
    rng = np.random.default_rng(seed)
    centres = rng.integers(0, 2**63, n // 4, dtype=np.uint64)
    words = []
    for c in centres:
        for _ in range(4):
            flips = rng.integers(0, 64, int(rng.integers(0, 5)))
            w = c
            for f in flips:
                w ^= np.uint64(1) << np.uint64(int(f))
            words.append(w)
    words = np.array(words, dtype=np.uint64)[:, None]
    t, (labels, _) = timed(group_duplicates, words, threshold, 64)
    print(f"n={n:6d} synthetic hashes (clusters of 4): lorakit index {t:.2f} s, {len(set(labels.tolist()))} groups")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, skip imagehash all-pairs at 10k")
    parser.add_argument("--trim-images", type=int, default=None)
    args = parser.parse_args(argv)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPU cores, "
          f"{subprocess.run([CONVERT, '-version'], capture_output=True, text=True).stdout.splitlines()[0] if CONVERT else 'no ImageMagick'}")
    with tempfile.TemporaryDirectory(prefix="lorakit-bench-") as tmp:
        root = Path(tmp)
        bench_trim_alpha(root, args.trim_images or (30 if args.quick else 120))
        bench_hashing(sorted((root / "trim_in").glob("*.png")))
        sizes = [1000, 3000] if args.quick else [1000, 10000]
        bench_dedupe(root, sizes, all_pairs_limit=1000 if args.quick else 10000)
        bench_index_synthetic(20000 if args.quick else 100000)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
