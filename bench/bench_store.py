"""Benchmark of the store and the runner against what they must not cost more than, in one run.

On photo-like pictures the bench builds (smooth colour fields, texture, sensor noise and shapes;
half with uniform padding, a quarter RGBA with a transparent surround, two fifths saved as JPEG at
quality 70-90 so trim meets real compression artefacts) and a caption per image, for N images:

1. Unchanged re-run: `lorakit run pipeline.yaml` over a dataset already built, against
   `lorakit validate pipeline.yaml` of the same file (same interpreter start-up, same imports,
   same pipeline parsing). The difference is what the cache costs: it is reported per image (wall
   time and CPU time of the process), and the sizes measured give a constant and a per-image
   slope. 100k images (`--sizes 100000 --tiny --no-cold`) is an option: it takes a while.
2. Cold run: `lorakit run` into an empty folder (empty store) against a plain loop over the same
   step functions (convert -> trim -> alpha per image in a pool of as many processes, one PNG
   encode at the same zlib level, then buckets, tags, triggers and repeats over the list), each a
   fresh process. The outputs are compared file for file.
3. Store size after the cold run: files and bytes under OUTPUT/.lorakit against the dataset
   (images and captions lorakit wrote) and against the source folder.

Both sides run with Python's bytecode cache on (in a folder of the bench), as an installed
lorakit does; every figure line carries the 1-minute load average it ran under.

Pipeline: convert, trim (fuzz 20%), alpha (white), buckets, tags, triggers (trigger mychar),
repeats; resolution 512; workers = CPU cores for both sides. Runs are interleaved (A B, then B A)
and each figure is the median ratio over the rounds with min and max.

Run:  python bench/bench_store.py                 (1k and 5k images)
      python bench/bench_store.py --sizes 1000     (one size)
      python bench/bench_store.py --rounds 5 --cold-rounds 3
      python bench/bench_store.py --sizes 100000 --tiny --no-cold --rounds 3   (100k small pictures)
      python bench/bench_store.py --keep DIR ...   (build in DIR and keep it; inputs found there are reused)
      python bench/bench_store.py --keep DIR --rerun-only ...   (only the re-runs, over what DIR holds)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

STEPS = ["convert", {"trim": {"fuzz": "20%"}}, {"alpha": {"background": "white"}}, "buckets", "tags",
         {"triggers": {"trigger": ["mychar"]}}, "repeats"]
WORDS = ("1girl solo long_hair smile looking_at_viewer blue_eyes brown_hair dress outdoors sky cloud tree "
         "holding flower school_uniform short_hair red_eyes simple_background white_background upper_body").split()


# ----- inputs --------------------------------------------------------------------------------
def _photo(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Photo-like content: a smooth colour field, texture, a few shapes, then sensor noise."""
    low = Image.fromarray((rng.random((6, 8, 3)) * 255).astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    im = low.copy()
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(2, 7))):
        x0, y0 = int(rng.integers(0, w - 10)), int(rng.integers(0, h - 10))
        x1, y1 = x0 + int(rng.integers(10, w // 2 + 10)), y0 + int(rng.integers(10, h // 2 + 10))
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    texture = Image.fromarray((rng.random((max(2, h // 6), max(2, w // 6), 3)) * 255).astype(np.uint8))
    texture = np.asarray(texture.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32) - 128
    pixels = np.asarray(im, dtype=np.float32) * 0.85 + texture * 0.2 + rng.normal(0, 5, (h, w, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _one_input(args: tuple[Path, int]) -> int:
    folder, i = args
    rng = np.random.default_rng(1000 + i)
    w, h = int(rng.integers(200, 420)), int(rng.integers(200, 420))
    content = _photo(rng, w, h)
    kind = i % 8  # 0-3 padded (white/black), 4-5 transparent surround, 6-7 no padding
    pads = [int(rng.integers(8, 60)) for _ in range(4)]
    if kind < 4:
        colour = (255, 255, 255) if kind % 2 == 0 else (0, 0, 0)
        canvas = Image.new("RGB", (w + pads[0] + pads[2], h + pads[1] + pads[3]), colour)
        canvas.paste(Image.fromarray(content), (pads[0], pads[1]))
    elif kind < 6:
        canvas = Image.new("RGBA", (w + pads[0] + pads[2], h + pads[1] + pads[3]), (0, 0, 0, 0))
        canvas.paste(Image.fromarray(content).convert("RGBA"), (pads[0], pads[1]))
    else:
        canvas = Image.fromarray(content)
    name = f"img{i:05d}"
    if canvas.mode == "RGB" and rng.random() < 0.4 * 8 / 6:  # about two fifths of all images are JPEG
        canvas.save(folder / f"{name}.jpg", quality=int(rng.integers(70, 91)))
    else:
        canvas.save(folder / f"{name}.png", compress_level=6)
    tags = list(rng.choice(WORDS, size=int(rng.integers(4, 10)), replace=False))
    (folder / f"{name}.txt").write_text(", ".join(tags))
    return 1


def _tiny_input(args: tuple[Path, int]) -> int:
    """A small picture (24-64 px, noise on a padded canvas, a quarter RGBA) and its caption."""
    folder, i = args
    rng = np.random.default_rng(1000 + i)
    w, h = int(rng.integers(24, 64)), int(rng.integers(24, 64))
    content = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    pad = int(rng.integers(0, 8))
    if i % 4 == 0:
        canvas = Image.new("RGBA", (w + 2 * pad, h + 2 * pad), (0, 0, 0, 0))
        canvas.paste(content.convert("RGBA"), (pad, pad))
    else:
        canvas = Image.new("RGB", (w + 2 * pad, h + 2 * pad), "white")
        canvas.paste(content, (pad, pad))
    canvas.save(folder / f"img{i:06d}.png", compress_level=1)
    tags = list(rng.choice(WORDS, size=int(rng.integers(4, 10)), replace=False))
    (folder / f"img{i:06d}.txt").write_text(", ".join(tags))
    return 1


def make_inputs(folder: Path, count: int, workers: int, tiny: bool = False) -> bool:
    """Build the inputs, or reuse them when ``folder`` already holds ``count`` images and captions."""
    if folder.is_dir():
        names = os.listdir(folder)
        if sum(n.endswith(".txt") for n in names) == count and len(names) == 2 * count:
            return False
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_tiny_input if tiny else _one_input, [(folder, i) for i in range(count)], chunksize=64))
    return True


# ----- the plain loop (the comparator of the cold run) ---------------------------------------------
def _plain_one(args: tuple[str, str]) -> list[tuple[str, int, int]]:
    from lorakit.plugin_sdk import Item, StepContext
    from lorakit.plugins.alpha import AlphaStep
    from lorakit.plugins.convert import ConvertStep
    from lorakit.plugins.trim import TrimStep
    from lorakit.store import opaque_as_rgb

    path, out = Path(args[0]), Path(args[1])
    ctx = StepContext("plain", out, out, out)
    convert, trim, alpha = ConvertStep.configure(), TrimStep.configure({"fuzz": "20%"}), AlphaStep.configure()
    made = []
    try:
        converted = convert.process(Item(name=path.stem, path=path), ctx)
        for item in converted if isinstance(converted, list) else [converted]:
            item = alpha.process(trim.process(item, ctx), ctx)
            target = out / f"{item.name}.png"
            if item.pending_image is not None:
                image = opaque_as_rgb(item.pending_image)
                image.save(target, format="PNG", compress_level=3)
                made.append((item.name, *image.size))
            else:
                shutil.copyfile(item.path, target)
                with Image.open(target) as im:
                    made.append((item.name, *im.size))
    except Exception:  # set aside, as the runner would
        pass
    return made


def plain_loop(src: Path, out: Path, workers: int) -> None:
    from lorakit.plugin_sdk import Item, StepContext, Subset
    from lorakit.plugins.buckets import BucketsStep
    from lorakit.plugins.repeats import RepeatsStep
    from lorakit.plugins.tags import TagsStep
    from lorakit.plugins.triggers import TriggersStep

    out.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in src.iterdir() if p.suffix in (".png", ".jpg"))
    with ProcessPoolExecutor(workers) as pool:
        results = list(pool.map(_plain_one, [(str(p), str(out)) for p in files], chunksize=16))
    items = []
    for path, made in zip(files, results):
        text = path.with_suffix(".txt").read_text()
        for name, _, _ in made:
            items.append(Item(name=name, path=out / f"{name}.png", tags={t.strip(): None for t in text.split(",")}))
    ctx = StepContext("plain", out / ".work", out / ".work", out, resolution=512, subsets={"default": Subset("default")})
    (out / ".work").mkdir(exist_ok=True)
    for step in (BucketsStep.configure(), TagsStep.configure(), TriggersStep.configure({"trigger": ["mychar"]}),
                 RepeatsStep.configure()):
        ctx.step_name = step.name
        step.setup(ctx)
        items = step.run(items, ctx)
    records = []
    for item in items:
        (out / f"{item.name}.txt").write_text(item.text)
        with Image.open(item.path) as im:
            records.append({"path": f"{item.name}.png", "caption": item.text, "width": im.width, "height": im.height})
    (out / "manifest.json").write_text(json.dumps({"images": records}, indent=2))


# ----- measuring -----------------------------------------------------------------------------
_ENV: dict[str, str] = {}


def _timed(cmd: list[str], cwd: Path) -> tuple[float, float]:
    """Wall time and CPU time (user + system, the process and its children) of one command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=_ENV)
    elapsed = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return elapsed, cpu


def _load() -> str:
    return "load %.1f" % os.getloadavg()[0]


def _tree_size(folder: Path, skip: str | None = None) -> tuple[int, int]:
    files = size = 0
    for root, dirs, names in os.walk(folder):
        if skip and skip in dirs:
            dirs.remove(skip)
        for n in names:
            files += 1
            size += os.path.getsize(os.path.join(root, n))
    return files, size


def _ratio_line(label: str, a: list[float], b: list[float], a_name: str, b_name: str, loads: list[float]) -> str:
    ratios = [x / y for x, y in zip(a, b)]
    return (f"{label}: {a_name} median {statistics.median(a):.2f} s, {b_name} median {statistics.median(b):.2f} s; "
            f"ratio median {statistics.median(ratios):.2f}x (min {min(ratios):.2f}, max {max(ratios):.2f}, "
            f"{len(ratios)} rounds; load {min(loads):.1f}-{max(loads):.1f})")


def _spread(values: list[float], scale: float = 1.0, unit: str = "") -> str:
    return (f"median {statistics.median(values) * scale:.3f}{unit} (min {min(values) * scale:.3f}, "
            f"max {max(values) * scale:.3f})")


def bench_size(root: Path, count: int, rounds: int, cold_rounds: int, workers: int, tiny: bool = False,
               cold: bool = True, rerun_only: bool = False) -> dict:
    print(f"\n== {count} images{' (tiny)' if tiny else ''} ==", flush=True)
    src = root / f"src{count}{'t' if tiny else ''}"
    t0 = time.perf_counter()
    built = make_inputs(src, count, workers, tiny)
    n_files, src_bytes = _tree_size(src)
    print(f"inputs: {n_files} files, {src_bytes / 2**20:.1f} MiB ("
          f"{f'built in {time.perf_counter() - t0:.0f} s' if built else 'reused'})", flush=True)
    pipeline = root / f"pipeline{count}{'t' if tiny else ''}.yaml"
    out = root / f"out{count}{'t' if tiny else ''}"
    pipeline.write_text(json.dumps({"output": str(out), "resolution": 512, "workers": workers,
                                    "sources": [{"folder": {"path": str(src)}}], "steps": STEPS}))
    lorakit = [sys.executable, "-m", "lorakit"]
    plain_out = root / f"plain{count}"
    plain = [sys.executable, str(Path(__file__).resolve()), "--plain", str(src), str(plain_out), "--workers", str(workers)]

    # 2 and 3: cold runs against the plain loop, interleaved; the store is measured after a cold run
    if rerun_only:
        if not (out / "manifest.json").is_file():
            raise SystemExit(f"--rerun-only: no dataset in {out} (run once without it)")
        print("cold run: skipped (--rerun-only: the dataset and store of an earlier run are re-run)", flush=True)
    elif cold:
        cold_times, loop, loads = [], [], []
        for r in range(cold_rounds):
            order = ("lorakit", "plain") if r % 2 == 0 else ("plain", "lorakit")
            for side in order:
                loads.append(os.getloadavg()[0])
                if side == "lorakit":
                    shutil.rmtree(out, ignore_errors=True)
                    cold_times.append(_timed(lorakit + ["run", str(pipeline)], root)[0])
                else:
                    shutil.rmtree(plain_out, ignore_errors=True)
                    loop.append(_timed(plain, root)[0])
        print(_ratio_line("cold run", cold_times, loop, "lorakit run", "plain loop", loads), flush=True)
        manifest = json.loads((out / "manifest.json").read_text())
        same = sum((out / r["path"]).read_bytes() == (plain_out / Path(r["path"]).name).read_bytes()
                   for r in manifest["images"] if (plain_out / Path(r["path"]).name).exists())
        print(f"  outputs: lorakit {len(manifest['images'])} images, plain loop "
              f"{len(json.loads((plain_out / 'manifest.json').read_text())['images'])}; {same} image files "
              "byte-identical", flush=True)
        shutil.rmtree(plain_out, ignore_errors=True)
    else:
        shutil.rmtree(out, ignore_errors=True)
        wall, cpu = _timed(lorakit + ["run", str(pipeline)], root)
        print(f"cold run (alone, no comparator): {wall:.1f} s wall, {cpu:.1f} s CPU; {_load()}", flush=True)
    store_files, store_bytes = _tree_size(out / ".lorakit")
    data_files, data_bytes = _tree_size(out, skip=".lorakit")
    print(f"store: {store_files} files, {store_bytes / 2**20:.1f} MiB; dataset {data_files} files, "
          f"{data_bytes / 2**20:.1f} MiB; store/dataset {store_bytes / data_bytes:.2f}x, store/sources "
          f"{store_bytes / src_bytes:.2f}x", flush=True)

    # 1: unchanged re-runs against validate, interleaved (run validate, then validate run, ...)
    rerun, validate, loads = [], [], []
    _timed(lorakit + ["run", str(pipeline)], root)  # the first re-run after a cold one warms the page cache
    for r in range(rounds):
        order = ("run", "validate") if r % 2 == 0 else ("validate", "run")
        for side in order:
            loads.append(os.getloadavg()[0])
            (rerun if side == "run" else validate).append(_timed(lorakit + [side, str(pipeline)], root))
    wall_run, wall_val = [w for w, _ in rerun], [w for w, _ in validate]
    print(_ratio_line("unchanged re-run", wall_run, wall_val, "lorakit run", "lorakit validate", loads), flush=True)
    excess = [a - b for a, b in zip(wall_run, wall_val)]
    cpu_excess = [a[1] - b[1] for a, b in zip(rerun, validate)]
    print(f"  cost of the cache over validate, per image: wall {_spread(excess, 1000 / count, ' ms')}; "
          f"CPU {_spread(cpu_excess, 1000 / count, ' ms')}", flush=True)
    print(f"  in all: wall {_spread(excess, 1, ' s')} over validate; CPU {_spread(cpu_excess, 1, ' s')}", flush=True)
    return {"count": count, "excess": statistics.median(excess), "cpu": statistics.median(cpu_excess)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved re-run / validate rounds")
    parser.add_argument("--cold-rounds", type=int, default=2, help="interleaved cold run / plain loop rounds")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--keep", help="build in this folder and keep it (default: a temporary folder)")
    parser.add_argument("--tiny", action="store_true", help="small pictures (24-64 px): for --sizes 100000")
    parser.add_argument("--no-cold", action="store_true", help="no cold-run comparison (one cold run builds the store)")
    parser.add_argument("--rerun-only", action="store_true", help="only the re-runs, over the dataset an earlier "
                        "bench left in --keep")
    parser.add_argument("--plain", nargs=2, metavar=("SRC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.plain:
        plain_loop(Path(args.plain[0]), Path(args.plain[1]), args.workers)
        return 0
    import PIL

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="lorakit-bench-store-"))
    root.mkdir(parents=True, exist_ok=True)
    _ENV.update({k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}, COLUMNS="100",
                PYTHONPYCACHEPREFIX=str(root / "pycache"))
    print(f"python {sys.version.split()[0]}, Pillow {PIL.__version__}, {os.cpu_count()} CPU cores, workers "
          f"{args.workers} (both sides), PNG zlib level 3 (both sides), bytecode cache on (both sides), rounds "
          f"{args.rounds} re-run / {0 if args.no_cold or args.rerun_only else args.cold_rounds} cold; {_load()} at start; "
          f"steps: {json.dumps(STEPS)}", flush=True)
    try:
        found = [bench_size(root, n, args.rounds, args.cold_rounds, args.workers, args.tiny, not args.no_cold,
                            args.rerun_only) for n in args.sizes]
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    if len(found) >= 2:
        a, b = found[0], found[-1]
        slope = (b["excess"] - a["excess"]) / (b["count"] - a["count"])
        constant = a["excess"] - slope * a["count"]
        cpu_slope = (b["cpu"] - a["cpu"]) / (b["count"] - a["count"])
        print(f"\ncache cost model from {a['count']} and {b['count']}: wall {constant:.3f} s + {1000 * slope:.4f} ms "
              f"per image (CPU {a['cpu'] - cpu_slope * a['count']:.3f} s + {1000 * cpu_slope:.4f} ms per image); "
              f"extrapolated to 100k images: {constant + slope * 100_000:.1f} s over validate")
    return 0


if __name__ == "__main__":
    sys.exit(main())
