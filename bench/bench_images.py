"""convert + trim + alpha, as `lorakit run` runs it, against ImageMagick's `mogrify` doing the same work
at the same PNG settings, on realistic pictures built here (paired, interleaved runs).

Inputs (bench/photo_inputs.py): ~1 MP pictures made from the photos bundled in the scikit-image
wheel (nothing downloaded): uneven white or solid-colour padding, one third RGBA with a transparent
surround (hard or feathered), some RGBA with an alpha that is 255 everywhere, JPEG (some re-encoded
twice, so borders carry JPEG noise), PNG, lossy/lossless WEBP and BMP, colour and grey.

The two sides do the same work and write the same files:
  A. `python -m lorakit run pipeline.yaml` (steps convert, trim fuzz 20%, alpha white), a fresh
     output folder and store each run: the fused per-image chain in the worker pool (one decode,
     one encode per image) plus what a run always does (sources, cache, manifest, dataset copy).
  B. `mogrify -path OUT -format png -fuzz 20% -trim +repage -background white -alpha remove
     -alpha off` with the PNG settings of A: zlib level 3 (lorakit's PNG_COMPRESS_LEVEL), adaptive
     row filters (Pillow always filters adaptively: ImageMagick's png:compression-filter=5), the
     default zlib strategy (png:compression-strategy=0), RGB colour type (png:color-type=2; lorakit
     writes RGB: ImageMagick would otherwise write grey pictures as grey PNGs).
Both use every core: lorakit's worker processes, ImageMagick's OpenMP threads. Runs alternate
A B, B A, ... (the first pair is a warm-up, not counted); each side's wall time and CPU time
(user + system of the process and all its children) give per-pair ratios A/B, reported as median
with min and max, with the load average before each run.

Checked once per bench run (a counted run of A with an encode counter, untimed):
  * every picture that ends fully opaque is written as RGB (no RGBA output with alpha 255 everywhere);
  * no picture is PNG-encoded twice: PNG encodes in the whole run (all processes) <= outputs, and
    equal to the outputs that are not byte copies of a source file;
  * A's outputs match B's: same names, same sizes, pixels within 1 level except where the two
    decoders of a lossy format round differently (counted and printed).

Run:  python bench/bench_images.py                  (200 pictures, 4 timed pairs; ~15 min on 2 busy cores)
      python bench/bench_images.py --images 60 --pairs 2     (a quick look)
      python bench/bench_images.py --dedupe         (also the older dedupe hashing/grouping timings)
Needs: ImageMagick 6 (`convert`, `mogrify`), scikit-image (for its bundled photos).

Measured (`python bench/bench_images.py --images 200 --pairs 3`, 2 cores shared with five other
helpers' jobs, load average 12.6-23.7 during the runs; 200 pictures, 1.03 MP average, 98 PNG,
55 JPEG, 35 WEBP, 12 BMP, 67 with transparency, 14 RGBA with opaque alpha):
  CPU time: lorakit / mogrify median 1.11x (min 1.05x, max 1.17x): 37.2 s vs 33.8 s.
  wall time: median 0.76x (0.73x-1.01x): not meaningful at that load (mogrify's OpenMP threads wait
    for each other on a saturated machine); CPU time is the figure to quote.
  200 outputs, 0 RGBA (0 opaque RGBA), 200 PNG encodes for 200 re-encoded outputs (all RGB, zlib
  level 3), outputs equal to ImageMagick's (same sizes, pixels within 1 level).
  Before this version (issue 16): 1.50x wall / 1.63x CPU, 234 encodes, 33 opaque RGBA outputs.
Where lorakit's remaining ~3.5 s of CPU go (profile of `lorakit run --workers 1`): the pixel work
(decode, trim, flatten, encode) costs what ImageMagick's does (the zlib encode is half of it on both
sides); the rest is fixed cost: interpreter start and imports (~0.8 s), two spawned workers
(~0.5 s each), the plugin entry-point scan, hashing the 200 MB of sources for the store and copying
the 215 MB of results from the store into the dataset folder.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from photo_inputs import make_photo_set  # noqa: E402

from lorakit.plugin_sdk.images import PNG_COMPRESS_LEVEL  # noqa: E402

CONVERT = shutil.which("convert")
MOGRIFY = shutil.which("mogrify")
FUZZ = "20%"
PNG_FILTER = 5  # ImageMagick's "adaptive" (per-row choice of the five PNG filters), what Pillow always does
PNG_STRATEGY = 0  # zlib's default strategy (Pillow's compress_type -1)

PIPELINE = """\
output: {out}
sources:
  - folder: {{path: {src}}}
steps:
  - convert
  - trim: {{fuzz: "{fuzz}"}}
  - alpha: {{background: white}}
"""

# Installed through PYTHONPATH in the counted run only: counts every PNG encode of every process
# (the main one and the spawned workers) by appending one line per encode to a file.
COUNTER = """\
import os
from PIL import Image, PngImagePlugin

_path = os.environ["LORAKIT_BENCH_ENCODES"]
_save = PngImagePlugin._save

def _counting(im, fp, filename, *args, **kwargs):
    with open(_path, "a") as fh:
        fh.write(f"{im.mode} {im.size[0]}x{im.size[1]} {im.encoderinfo.get('compress_level')}\\n")
    return _save(im, fp, filename, *args, **kwargs)

Image.register_save("PNG", _counting)
"""


def mogrify_args(out: Path, paths: list[Path]) -> list[str]:
    return [MOGRIFY, "-path", str(out), "-format", "png", "-fuzz", FUZZ, "-trim", "+repage",
            "-background", "white", "-alpha", "remove", "-alpha", "off",
            "-define", f"png:compression-level={PNG_COMPRESS_LEVEL}", "-define", f"png:compression-filter={PNG_FILTER}",
            "-define", f"png:compression-strategy={PNG_STRATEGY}", "-define", "png:color-type=2",
            *map(str, paths)]


def lorakit_args(pipeline: Path, workers: int) -> list[str]:
    return [sys.executable, "-m", "lorakit", "run", "--workers", str(workers), str(pipeline)]


def measured(args: list[str], env: dict | None = None) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the process and every child it waited for)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"{args[0]} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


class Sides:
    def __init__(self, root: Path, paths: list[Path], workers: int):
        self.root, self.paths, self.workers = root, paths, workers
        self.n = 0

    def _fresh(self, name: str) -> Path:
        self.n += 1
        out = self.root / f"{name}{self.n}"
        return out

    def lorakit(self, env: dict | None = None) -> tuple[float, float, Path]:
        out = self._fresh("lorakit")
        pipeline = self.root / f"pipeline{self.n}.yaml"
        pipeline.write_text(PIPELINE.format(out=out, src=self.paths[0].parent, fuzz=FUZZ))
        wall, cpu = measured(lorakit_args(pipeline, self.workers), env)
        return wall, cpu, out

    def magick(self) -> tuple[float, float, Path]:
        out = self._fresh("magick")
        out.mkdir()
        wall, cpu = measured(mogrify_args(out, self.paths))
        return wall, cpu, out

    def clean(self, out: Path) -> None:
        shutil.rmtree(out, ignore_errors=True)


def check_outputs(inputs, ours: Path, theirs: Path, encodes: list[str]) -> None:
    outputs = sorted(ours.glob("*.png"))
    rgba = opaque_rgba = 0
    for p in outputs:
        with Image.open(p) as im:
            if im.mode in ("RGBA", "LA", "PA"):
                rgba += 1
                if im.getchannel("A").getextrema()[0] == 255:
                    opaque_rgba += 1
    copies = 0
    by_stem = {i.path.stem: i.path for i in inputs}
    for p in outputs:
        src = by_stem.get(p.stem)
        if src is not None and src.suffix == ".png" and src.stat().st_size == p.stat().st_size \
                and src.read_bytes() == p.read_bytes():
            copies += 1
    print(f"outputs: {len(outputs)} for {len(inputs)} inputs; RGBA outputs {rgba} (fully opaque RGBA: {opaque_rgba}); "
          f"byte copies of a source {copies}")
    modes: dict[str, int] = {}
    for line in encodes:
        modes[line.split()[0]] = modes.get(line.split()[0], 0) + 1
    levels = sorted({line.split()[2] for line in encodes})
    print(f"PNG encodes in the whole run (all processes): {len(encodes)} {modes}, zlib levels {levels}; "
          f"expected {len(outputs) - copies} (outputs that are not byte copies)")
    problems = []
    if opaque_rgba:
        problems.append(f"{opaque_rgba} outputs are RGBA with a fully opaque alpha (should be RGB)")
    if len(encodes) != len(outputs) - copies:
        problems.append(f"{len(encodes)} PNG encodes for {len(outputs) - copies} re-encoded outputs")
    # Same result as ImageMagick.
    size_diff = pixel_diff = 0
    worst = 0
    for p in outputs:
        q = theirs / p.name
        if not q.exists():
            problems.append(f"ImageMagick wrote no {q.name}")
            continue
        a = np.asarray(Image.open(p).convert("RGB"), dtype=np.int16)
        b = np.asarray(Image.open(q).convert("RGB"), dtype=np.int16)
        if a.shape != b.shape:
            size_diff += 1
            continue
        d = int(np.abs(a - b).max())
        worst = max(worst, d)
        pixel_diff += d > 1
    lossy = sum(i.path.suffix in (".jpg", ".webp") for i in inputs)
    print(f"against ImageMagick: {size_diff} outputs of another size (a lossy decode rounding a border pixel across "
          f"the fuzz), {pixel_diff} with pixels more than 1 level apart (largest difference {worst}); "
          f"{lossy} inputs are lossy (JPEG/WEBP: Pillow's and ImageMagick's decoders may round differently)")
    for p in problems:
        print(f"PROBLEM: {p}")
    if problems:
        raise SystemExit(1)


def summarise(label: str, ours: list[float], theirs: list[float]) -> str:
    ratios = [a / b for a, b in zip(ours, theirs)]
    return (f"{label}: lorakit {statistics.median(ours):7.2f} s, mogrify {statistics.median(theirs):7.2f} s (medians); "
            f"ratio lorakit/mogrify median {statistics.median(ratios):.2f}x, min {min(ratios):.2f}x, max {max(ratios):.2f}x "
            f"over {len(ratios)} pairs")


def bench_chain(root: Path, count: int, pairs: int, workers: int) -> None:
    t0 = time.perf_counter()
    inputs = make_photo_set(root / "photos", count)
    paths = [i.path for i in inputs]
    kinds: dict[str, int] = {}
    for p in paths:
        kinds[p.suffix] = kinds.get(p.suffix, 0) + 1
    pixels = sum(Image.open(p).size[0] * Image.open(p).size[1] for p in paths) / len(paths)
    print(f"\n== convert + trim + alpha: {count} pictures, {pixels / 1e6:.2f} MP on average, {kinds}, "
          f"{sum(i.transparent for i in inputs)} with transparency, {sum(i.opaque_rgba for i in inputs)} RGBA "
          f"with opaque alpha (built in {time.perf_counter() - t0:.0f} s) ==")
    print(f"A: {' '.join(lorakit_args(Path('pipeline.yaml'), workers))}")
    print("   pipeline.yaml: " + PIPELINE.format(out="OUT", src="photos", fuzz=FUZZ).replace("\n", " | "))
    print(f"   PNG: zlib level {PNG_COMPRESS_LEVEL}, adaptive filters (Pillow's only mode), default strategy, RGB/RGBA")
    print(f"B: {' '.join(mogrify_args(Path('OUT'), [Path('photos/*')]))}")
    print(f"   OpenMP threads: {os.environ.get('OMP_NUM_THREADS', 'ImageMagick default (all cores)')}; "
          f"lorakit workers: {workers}")
    sides = Sides(root, paths, workers)
    # Warm-up pair, with the encode counter: the checks, not timed.
    counter_dir = root / "counter"
    counter_dir.mkdir()
    (counter_dir / "sitecustomize.py").write_text(COUNTER)
    log = root / "encodes.txt"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(counter_dir), os.environ.get("PYTHONPATH", "")]),
               LORAKIT_BENCH_ENCODES=str(log))
    _, _, ours = sides.lorakit(env)
    _, _, theirs = sides.magick()
    check_outputs(inputs, ours, theirs, log.read_text().splitlines() if log.exists() else [])
    sides.clean(ours)
    sides.clean(theirs)
    walls: dict[str, list[float]] = {"A": [], "B": []}
    cpus: dict[str, list[float]] = {"A": [], "B": []}
    for r in range(pairs):
        order = "AB" if r % 2 == 0 else "BA"
        for side in order:
            load = os.getloadavg()
            wall, cpu, out = sides.lorakit() if side == "A" else sides.magick()
            sides.clean(out)
            walls[side].append(wall)
            cpus[side].append(cpu)
            print(f"pair {r + 1} {'lorakit' if side == 'A' else 'mogrify'}: wall {wall:6.2f} s, CPU {cpu:6.2f} s "
                  f"(load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f})")
    print(summarise("wall", walls["A"], walls["B"]))
    print(summarise("CPU ", cpus["A"], cpus["B"]))
def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


# ----- dedupe (--dedupe; bench/bench_dedupe.py measures grouping quality) -----------------------------------------------------------------------------
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
import multiprocessing  # noqa: E402

from lorakit.plugins.dedupe import group_duplicates, hamming, hash_file, hashes_to_words  # noqa: E402


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
    parser.add_argument("--images", type=int, default=200, help="pictures in the set (default 200)")
    parser.add_argument("--pairs", type=int, default=4, help="timed A/B pairs after the warm-up (default 4)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="lorakit workers (default: all cores)")
    parser.add_argument("--dedupe", action="store_true", help="also the dedupe hashing and grouping timings")
    args = parser.parse_args(argv)
    if not (CONVERT and MOGRIFY):
        raise SystemExit("ImageMagick (convert, mogrify) is needed: apt-get install imagemagick")
    version = subprocess.run([CONVERT, "-version"], capture_output=True, text=True).stdout.splitlines()[0]
    import PIL
    from PIL import features

    print(f"python {sys.version.split()[0]}, Pillow {PIL.__version__} (zlib {features.version_codec('zlib')}), "
          f"{version}, {os.cpu_count()} CPU cores, load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    with tempfile.TemporaryDirectory(prefix="lorakit-bench-") as tmp:
        root = Path(tmp)
        bench_chain(root, args.images, args.pairs, args.workers)
        if args.dedupe:
            bench_hashing(sorted((root / "photos").glob("*")))
            bench_dedupe(root, [1000, 10000], all_pairs_limit=10000)
            bench_index_synthetic(100000)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
