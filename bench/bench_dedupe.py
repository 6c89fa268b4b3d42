"""dedupe against imagededup: whole-process time, and grouping quality against a known truth.

    python bench/bench_dedupe.py                       # 1k and 5k images, 3 pairs each
    python bench/bench_dedupe.py --sizes 1000 --pairs 5
    python bench/bench_dedupe.py --work /tmp/dd-bench  # keep the generated sets between runs

The comparator is imagededup (Apache-2.0, installed for the bench only: `pip install imagededup`;
lorakit never imports it). Both sides run as fresh processes over the same folder of files:

* lorakit:    `python -m lorakit dedupe SET OUT --hash phash --hash-size 8 --threshold T
               --linkage keeper` into an empty OUT (empty store: a cold run). It reads the folder,
               checks every file, hashes in the run's worker pool, groups, and writes the dataset
               folder (kept images, set-aside copies, manifest and report).
* imagededup: `PHash().encode_images(SET)` then `find_duplicates(encoding_map,
               max_distance_threshold=T)` (64-bit pHash, its multiprocessing on every core, its
               default Cython brute-force search), then `find_duplicates_to_remove` on the same
               encodings for the files it would remove. It writes nothing.

Each pair runs A B, the next B A (interleaved, so a change of machine load hits both); the figure
is the median of the per-pair ratios with min and max, in wall time and in CPU time (the process
and its children). The load average is printed before and after. Both sides get every core.

The set is built here, so the truth is known: photo-like originals (smooth random fields with
shapes, grain and JPEG noise) drawn from a few hundred shared "scenes" (the same layout with other
details, as in screencaps of one episode), and for some originals the copies a user collects
(resized, re-saved as JPEG at another quality, cropped a few percent, brightened, a corner
watermark). Files are 320x240 (copies smaller), 30% PNG and 70% JPEG. Quality, for both sides:
* precision = correct removals / all removals (an unrelated picture thrown away lowers it),
* recall = correct removals / true duplicates (a copy left in lowers it). A removal is correct
  when the image it was judged a duplicate of (lorakit: its group's keeper; imagededup: a kept
  file in its duplicate list) is in its own truth group.
That rule is the bench's first table; it is not quite the same rule for both (imagededup's removal
counts when *any* kept file of its list is from its own original, lorakit's must be its one keeper).
So two more tables follow: the same rule for both, from the removed sets alone (a removal is correct
when its original still keeps a picture; plus how many originals lost every picture), and the
hashes alone (every pair within the threshold, no grouping: the share of same-original pairs, and
the share of true pairs found). The hashes differ slightly (imagededup resizes the colour picture
then greys it; imagehash, which lorakit uses, greys then resizes), so the groups are not identical;
the bench prints how many of the removed files both sides agree on.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SET_VERSION = 2
IMAGEDEDUP = r"""
import json, sys, warnings
warnings.simplefilter("ignore")
from imagededup.methods import PHash
folder, threshold, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
phasher = PHash(verbose=False)
encodings = phasher.encode_images(image_dir=folder)
duplicates = phasher.find_duplicates(encoding_map=encodings, max_distance_threshold=threshold)
remove = phasher.find_duplicates_to_remove(encoding_map=encodings, max_distance_threshold=threshold)
if out != "-":
    json.dump({"duplicates": duplicates, "remove": sorted(remove), "encodings": encodings}, open(out, "w"))
"""


# ----- the generated set --------------------------------------------------------------------
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


def copy_of(im: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, int | None]:
    """A copy and, for a re-saved JPEG, the quality to save it at."""
    kind = rng.integers(0, 5)
    w, h = im.size
    if kind == 0:
        f = float(rng.uniform(0.5, 0.9))
        return im.resize((int(w * f), int(h * f)), Image.Resampling.LANCZOS), None
    if kind == 1:
        return im, int(rng.integers(30, 70))
    if kind == 2:
        d = int(min(w, h) * rng.uniform(0.02, 0.06))
        return im.crop((d, d, w - d, h - d)), None
    if kind == 3:
        arr = np.asarray(im, dtype=np.float32) * float(rng.uniform(0.9, 1.1)) + float(rng.uniform(-10, 10))
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), None
    out = im.copy()
    ImageDraw.Draw(out).rectangle((w - 60, h - 20, w - 4, h - 4), fill=(255, 255, 255))
    return out, None


def _write_chunk(args) -> list[tuple[str, int]]:
    """Originals [start, stop) and their copies as files (deterministic per original)."""
    folder, seed, scenes, start, stop = args
    fields = [scene(np.random.default_rng([seed, 0, s])) for s in range(scenes)]
    rows = []
    for g in range(start, stop):
        rng = np.random.default_rng([seed, 1, g])
        base = original(fields[int(rng.integers(0, scenes))], rng)
        members = [(base, None)] + [copy_of(base, rng) for _ in range(int(rng.choice([0, 0, 1, 2, 3])))]
        for c, (im, quality) in enumerate(members):
            stem = f"g{g:05d}_{c}"
            if quality is not None:
                name = stem + ".jpg"
                im.save(Path(folder) / name, quality=quality)
            elif rng.random() < 0.3:
                name = stem + ".png"
                im.save(Path(folder) / name, compress_level=3)
            else:
                name = stem + ".jpg"
                im.save(Path(folder) / name, quality=92)
            rows.append((name, g))
    return rows


def build_set(work: Path, images: int, seed: int) -> tuple[Path, dict[str, int]]:
    """A folder of about ``images`` files (originals and copies) and the truth: file -> original."""
    folder = work / f"set-{images}-{seed}"
    stamp = folder / ".truth.json"
    if stamp.is_file():
        data = json.loads(stamp.read_text())
        if data.get("version") == SET_VERSION:
            return folder, data["truth"]
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    originals = max(1, round(images / 2.2))
    scenes = max(10, originals * 300 // 2000)
    step = 50
    jobs = [(str(folder), seed, scenes, a, min(originals, a + step)) for a in range(0, originals, step)]
    with ProcessPoolExecutor() as pool:
        rows = [r for chunk in pool.map(_write_chunk, jobs) for r in chunk]
    truth = dict(rows)
    stamp.write_text(json.dumps({"version": SET_VERSION, "truth": truth}))
    return folder, truth


# ----- quality ------------------------------------------------------------------------------
def quality_lorakit(out: Path, truth: dict[str, int]) -> dict:
    report = json.loads((out / "reports" / "dedupe-groups.json").read_text())
    stems = {Path(n).stem: n for n in truth}
    removed, correct = set(), 0
    for group in report["duplicate_groups"]:
        kept = stems[group["kept"]]
        for m in group["members"]:
            removed.add(stems[m["name"]])
            correct += truth[stems[m["name"]]] == truth[kept]
    return _scores(removed, correct, truth) | {"largest_group": max(
        (1 + len(g["members"]) for g in report["duplicate_groups"]), default=1)}


def quality_imagededup(result: dict, truth: dict[str, int]) -> dict:
    removed = set(result["remove"])
    correct = 0
    for name in removed:
        kept = [d for d in result["duplicates"].get(name, []) if d not in removed]
        correct += any(truth[d] == truth[name] for d in kept)
    return _scores(removed, correct, truth)


def quality_same_rule(removed: set[str], truth: dict[str, int]) -> dict:
    """One rule for both sides, from the removed files alone: a removal is correct when its
    original still has a picture in the kept set (nothing of it was lost); also how many originals
    lost every picture."""
    kept_originals = {truth[n] for n in truth if n not in removed}
    correct = sum(truth[n] in kept_originals for n in removed)
    return _scores(removed, correct, truth) | {"originals_lost": len(set(truth.values()) - kept_originals)}


def pairwise_hash_quality(folder: Path, truth: dict[str, int], theirs: dict[str, str], threshold: int) -> dict:
    """The hashes alone, without any grouping rule: of all pairs within ``threshold``, how many are
    copies of one original (precision), and how many of the true pairs are within it (recall).
    lorakit's hash is computed here by the step's own function on the fully decoded picture (the
    step itself may decode a JPEG at reduced scale, a few bits' difference)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from plugins.dedupe import describe

    names = sorted(truth)
    ours = []
    for n in names:
        with Image.open(folder / n) as im:
            ours.append(np.unpackbits(np.frombuffer(bytes.fromhex(describe(im, "phash", 8)["hash"]), np.uint8)))
    other = [np.array([c == "1" for c in bin(int(theirs[n], 16))[2:].zfill(64)], np.uint8) for n in names]
    labels = np.array([truth[n] for n in names])
    upper = np.triu_indices(len(names), 1)
    same = (labels[:, None] == labels[None, :])[upper]
    out = {}
    for side, bits in (("lorakit (imagehash phash)", ours), ("imagededup PHash", other)):
        a = np.array(bits, dtype=np.uint8)
        near = np.zeros((len(names), len(names)), dtype=bool)
        for start in range(0, len(names), 256):  # row blocks: an N x N x 64 array would not fit
            near[start:start + 256] = (a[start:start + 256, None, :] != a[None, :, :]).sum(-1) <= threshold
        near = near[upper]
        hits = int((near & same).sum())
        out[side] = {"pairs": int(near.sum()), "precision": hits / max(1, int(near.sum())),
                     "recall": hits / max(1, int(same.sum()))}
    return out


def _scores(removed: set[str], correct: int, truth: dict[str, int]) -> dict:
    true_dups = len(truth) - len(set(truth.values()))
    return {"removed": removed, "set_aside": len(removed), "correct": correct,
            "precision": correct / len(removed) if removed else 1.0,
            "recall": correct / true_dups if true_dups else 1.0}


# ----- timing -------------------------------------------------------------------------------
def timed(cmd: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds (the process and its children) of one fresh process."""
    before = os.times()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    after = os.times()
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return wall, (after.children_user - before.children_user) + (after.children_system - before.children_system)


def lorakit_cmd(folder: Path, out: Path, args, linkage: str | None = None) -> list[str]:
    return [sys.executable, "-m", "lorakit", "dedupe", str(folder), str(out), "--hash", "phash", "--hash-size", "8",
            "--threshold", str(args.threshold), "--linkage", linkage or args.linkage]


def imagededup_cmd(folder: Path, result: str, args) -> list[str]:
    return [sys.executable, "-c", IMAGEDEDUP, str(folder), str(args.threshold), result]


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}x (min {min(values):.2f}, max {max(values):.2f})"


def load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def bench_size(images: int, args, work: Path) -> None:
    folder, truth = build_set(work, images, args.seed)
    n = len(truth)
    print(f"\n== {n} images ({n - len(set(truth.values()))} true duplicates of {len(set(truth.values()))} "
          f"originals) in {folder} ==")
    result_file = work / f"imagededup-{n}.json"
    rows = []
    print(f"load average before: {load()}")
    for p in range(args.pairs):
        out = work / f"out-{n}"
        shutil.rmtree(out, ignore_errors=True)
        sides = [("lorakit", lorakit_cmd(folder, out, args)), ("imagededup", imagededup_cmd(folder, str(result_file), args))]
        if p % 2:
            sides.reverse()
        got = {name: timed(cmd) for name, cmd in sides}
        rows.append(got)
        (lw, lc), (iw, ic) = got["lorakit"], got["imagededup"]
        print(f"  pair {p + 1} ({' then '.join(s for s, _ in sides)}): lorakit {lw:.1f} s wall {lc:.1f} s CPU, "
              f"imagededup {iw:.1f} s wall {ic:.1f} s CPU   [load {load()}]")
    wall = [r["imagededup"][0] / r["lorakit"][0] for r in rows]
    cpu = [r["imagededup"][1] / r["lorakit"][1] for r in rows]
    print(f"load average after: {load()}")
    print(f"lorakit dedupe (whole process, cold) is faster than imagededup by: wall {spread(wall)}, CPU {spread(cpu)}")

    out = work / f"out-{n}"
    rerun_wall, rerun_cpu = timed(lorakit_cmd(folder, out, args))
    print(f"unchanged re-run of lorakit dedupe (every hash and the grouping from the store): {rerun_wall:.1f} s wall, "
          f"{rerun_cpu:.1f} s CPU")

    ours = quality_lorakit(out, truth)
    theirs = quality_imagededup(json.loads(result_file.read_text()), truth)
    table = {f"lorakit {args.linkage}": ours}
    for linkage in ("single", "complete"):
        if linkage != args.linkage and not args.no_linkages:
            lout = work / f"out-{n}-{linkage}"
            shutil.rmtree(lout, ignore_errors=True)
            shutil.copytree(out / ".lorakit", lout / ".lorakit")  # the hashes are cached: this run only groups
            timed(lorakit_cmd(folder, lout, args, linkage))
            table[f"lorakit {linkage}"] = quality_lorakit(lout, truth)
    table["imagededup"] = theirs
    print(f"\n{'grouping (threshold ' + str(args.threshold) + ')':30} {'removed':>8} {'correct':>8} {'precision':>9} "
          f"{'recall':>7}")
    for name, r in table.items():
        print(f"{name:30} {r['set_aside']:8d} {r['correct']:8d} {r['precision']:9.3f} {r['recall']:7.3f}")
    print("\nthe same rule for both sides (a removal is correct when its original keeps a picture):")
    print(f"{'':30} {'removed':>8} {'correct':>8} {'precision':>9} {'recall':>7} {'originals lost':>15}")
    for name, r in table.items():
        q = quality_same_rule(r["removed"], truth)
        print(f"{name:30} {q['set_aside']:8d} {q['correct']:8d} {q['precision']:9.3f} {q['recall']:7.3f} "
              f"{q['originals_lost']:15d}")
    result = json.loads(result_file.read_text())
    if "encodings" in result:
        print(f"\nthe hashes alone (every pair within threshold {args.threshold}, no grouping):")
        for name, q in pairwise_hash_quality(folder, truth, result["encodings"], args.threshold).items():
            print(f"{name:30} pairs {q['pairs']:7d}  precision {q['precision']:.3f}  recall {q['recall']:.3f}")
    both = ours["removed"] & theirs["removed"]
    print(f"removed by both: {len(both)}; by lorakit only: {len(ours['removed'] - both)}; "
          f"by imagededup only: {len(theirs['removed'] - both)}")


def bench_startup(work: Path, args) -> None:
    """Fixed costs: interpreter and imports, and a run over one image (no pool)."""
    one = work / "one"
    one.mkdir(exist_ok=True)
    Image.new("RGB", (64, 64), "white").save(one / "a.png")
    rows = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "import imagededup.methods": [sys.executable, "-c", "import imagededup.methods"],
        "python -m lorakit --version": [sys.executable, "-m", "lorakit", "--version"],
        "lorakit dedupe, 1 image": lorakit_cmd(one, work / "one-out", args),
    }
    print(f"\n== fixed costs (median of 3; load {load()}) ==")
    for name, cmd in rows.items():
        runs = []
        for _ in range(3):
            shutil.rmtree(work / "one-out", ignore_errors=True)
            runs.append(timed(cmd))
        print(f"  {name:32} {statistics.median(r[0] for r in runs):6.2f} s wall "
              f"{statistics.median(r[1] for r in runs):6.2f} s CPU")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000], help="about this many images per set")
    ap.add_argument("--pairs", type=int, default=3, help="paired runs per size (A B, then B A, ...)")
    ap.add_argument("--threshold", type=int, default=10, help="Hamming distance, the same for both sides")
    ap.add_argument("--linkage", default="keeper", choices=("keeper", "complete", "single"))
    ap.add_argument("--no-linkages", action="store_true", help="skip the quality of the other linkages")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path("/tmp/lorakit-bench-dedupe"), help="sets and outputs")
    args = ap.parse_args()
    try:
        import imagededup
    except ImportError:
        sys.exit("the comparator is missing: pip install imagededup")
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"lorakit dedupe: imagehash phash, hash_size 8 (64 bits), threshold {args.threshold}, linkage {args.linkage}, "
          f"workers = {os.cpu_count()} cores; imagededup {imagededup.__version__}: PHash (64 bits), "
          f"max_distance_threshold {args.threshold}, num_enc_workers = num_dist_workers = {os.cpu_count()}")
    for size in args.sizes:
        bench_size(size, args, args.work)
    bench_startup(args.work, args)


if __name__ == "__main__":
    main()
