"""Benchmark: the same pipeline through the ray executor and through the local process pool, on this
machine (issue 13's goal: within 1.3x of the local pool).

Inputs are bench_store.py's photo-like pictures (padding to trim, transparent surrounds, JPEGs,
a caption each) and its pipeline (convert, trim, alpha, buckets, tags, triggers, repeats). Each
run is a fresh ``lorakit run pipeline.yaml -o EMPTY_FOLDER --workers W`` process (a cold run:
empty store), so both sides pay interpreter start-up, imports and the per-image work.

* ``local``: the local process pool (W spawned processes).
* ``ray``: ``--executor ray --ray-address ADDR`` against a Ray instance the bench started once on
  this machine with W CPUs (ray.cluster_utils.Cluster, one node): what a cluster user pays per run,
  as the cluster is already up. Each run still starts its own W actors.
* ``ray, own instance`` (``--own-instance``): ``--executor ray`` with no address, so the run starts
  (and stops) a Ray instance of its own: the start-up of Ray included.

Runs are paired and interleaved (local, ray; then ray, local; ...); the figure is the median of
the per-pair ratios ray/local with min and max, with the load average before and after.

Run:  python bench/bench_ray.py                       (300 images, 3 pairs, W = CPU cores)
      python bench/bench_ray.py --images 1000 --rounds 5 --workers 2 --own-instance
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_store import STEPS, make_inputs  # noqa: E402  (the same inputs and pipeline)


def _load() -> str:
    return "%.2f %.2f %.2f" % os.getloadavg()


def _timed(cmd: list[str], cwd: Path, env: dict) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds


def _manifest_images(out: Path) -> list:
    import json

    data = json.loads((out / "manifest.json").read_text())
    return sorted((r["path"], r["sha256"], r.get("caption")) for r in data["images"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3, help="pairs of runs (local + ray)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--own-instance", action="store_true",
                        help="also time ray runs that start their own Ray instance (no --ray-address)")
    args = parser.parse_args(argv)

    import ray
    from ray.cluster_utils import Cluster

    root = Path(tempfile.mkdtemp(prefix="lkbray-"))
    env = dict(os.environ, RAY_TMPDIR=str(root), RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               COLUMNS="100")
    os.environ.update({k: env[k] for k in ("RAY_TMPDIR", "RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED")})
    cluster = None
    try:
        src = root / "src"
        make_inputs(src, args.images, args.workers)
        import yaml

        (root / "pipeline.yaml").write_text(yaml.safe_dump({
            "output": "out", "resolution": 512, "sources": [{"folder": {"path": str(src)}}], "steps": STEPS}))
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": args.workers, "object_store_memory": 100 * 1024 * 1024, "include_dashboard": False,
            "temp_dir": str(root / "ray")})
        lorakit = [sys.executable, "-m", "lorakit", "run", "pipeline.yaml", "--workers", str(args.workers)]
        sides = {"local": lorakit, "ray": lorakit + ["--executor", "ray", "--ray-address", cluster.address]}
        if args.own_instance:
            sides["ray, own instance"] = lorakit + ["--executor", "ray"]
        times: dict[str, list[float]] = {k: [] for k in sides}
        load_before = _load()
        outputs = {}
        for r in range(args.rounds):
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            for name in order:
                out = root / f"out-{name.replace(' ', '').replace(',', '-')}-{r}"
                times[name].append(_timed(sides[name] + ["-o", str(out)], root, env))
                outputs[name] = _manifest_images(out)
                shutil.rmtree(out)
        load_after = _load()
        same = all(v == outputs["local"] for v in outputs.values())
        print(f"bench_ray: {args.images} images, pipeline {', '.join(s if isinstance(s, str) else next(iter(s)) for s in STEPS)}; "
              f"--workers {args.workers} on {os.cpu_count()} cores; {args.rounds} interleaved pairs; "
              f"ray {ray.__version__}, Python {sys.version.split()[0]}")
        print(f"load average before {load_before}, after {load_after}")
        for name, values in times.items():
            print(f"  {name:18s} median {statistics.median(values):6.2f} s  (min {min(values):.2f}, max {max(values):.2f})")
        for name in sides:
            if name == "local":
                continue
            ratios = [a / b for a, b in zip(times[name], times["local"])]
            print(f"  {name} / local: median {statistics.median(ratios):.2f}x (min {min(ratios):.2f}, "
                  f"max {max(ratios):.2f}); goal <= 1.3x")
        print(f"  same images, hashes and captions in every manifest: {same}")
        return 0 if same else 1
    finally:
        if cluster is not None:
            cluster.shutdown()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
