"""Benchmark of the review page on a large dataset: time to the first gallery page, and to apply
a batch edit, on 5,000 images.

1. A dataset of N pictures (256 px, tags from the test generator) made by a real `lorakit run`
   (folder source, no steps).
2. The real server (uvicorn on 127.0.0.1) and an HTTP client that loads what the browser loads for
   the first page, 6 requests at a time like a browser: the page, its script and style, the summary
   (tag list), the first 200 gallery entries and their 200 thumbnails.
   - cold: a new server, thumbnails not made yet;
   - warm: a new server again, thumbnails cached in DATASET/.lorakit/review/thumbs/.
   Beside it: the comparator a user has without the page, opening the same 200 full images
   (reading the files only: the least any image viewer does).
3. A filter query (two tags AND, one NOT, over all N), and a batch edit through the page: remove a
   tag from everything the filter shows (every image), recorded in the curation file and applied to
   the captions and manifest at once; then undo. Beside it: the same removal done by a plain
   Python loop over the N caption files (what a `sed` one-liner does; it neither records nor
   updates the manifest).

Run:  python bench/bench_review.py              (5,000 images; a few minutes on 2 cores)
      python bench/bench_review.py --images 1000
"""
from __future__ import annotations

import argparse
import json
import random
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import uvicorn
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from review_dataset import COLOURS, EXTRA, HAIR  # noqa: E402

from lorakit.review.app import create_app  # noqa: E402
from lorakit.review.security import allowed_hosts  # noqa: E402


def make_project(folder: Path, count: int) -> Path:
    rng = random.Random(0)
    raw = folder / "raw"
    for i in range(count):
        d = raw / ("outfit_a" if i % 3 else "outfit_b")
        d.mkdir(parents=True, exist_ok=True)
        im = Image.new("RGB", (256, 256 + (i % 5) * 32), "white")
        draw = ImageDraw.Draw(im)
        for _ in range(5):
            x, y = rng.randrange(200), rng.randrange(200)
            draw.ellipse([x, y, x + rng.randrange(20, 120), y + rng.randrange(20, 120)],
                         fill=(rng.randrange(256), rng.randrange(256), rng.randrange(256)))
        im.save(d / f"img{i:05d}.png", compress_level=1)
        tags = ["1girl", "solo", HAIR[i % len(HAIR)], f"{COLOURS[i % len(COLOURS)]}_dress"] + rng.sample(EXTRA, 2)
        (d / f"img{i:05d}.txt").write_text(", ".join(tags), encoding="utf-8")
    pipeline = folder / "pipeline.yaml"
    pipeline.write_text("output: dataset\nsources:\n  - folder: {path: raw, subfolders_as_subsets: true}\n",
                        encoding="utf-8")
    return pipeline


def run_pipeline(pipeline: Path) -> None:
    from rich.console import Console

    from lorakit.host import get_host
    from lorakit.pipeline import load_pipeline
    from lorakit.runner import Runner

    Runner(load_pipeline(pipeline, get_host()), console=Console(stderr=True, quiet=True)).run()


class Served:
    """A fresh review server on a free port (what `lorakit review` starts)."""

    def __init__(self, pipeline: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        t0 = time.perf_counter()
        self.app = create_app(pipeline.parent / "dataset", pipeline, hosts=allowed_hosts("127.0.0.1", self.port))
        self.index_seconds = time.perf_counter() - t0
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        self.base = f"http://127.0.0.1:{self.port}"

    def client(self) -> httpx.Client:
        c = httpx.Client(base_url=self.base, timeout=120)
        c.cookies.set("lorakit_review", self.app.token)
        return c

    def post(self, c: httpx.Client, path: str, body: dict) -> httpx.Response:
        return c.post(path, json=body, headers={"X-CSRF-Token": self.app.csrf_token, "Origin": self.base,
                                                "Sec-Fetch-Site": "same-origin"})

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def first_page(served: Served) -> tuple[float, int]:
    """Seconds until everything the first gallery page shows has arrived; bytes of thumbnails."""
    t0 = time.perf_counter()
    with served.client() as c:
        for path in ("/", "/assets/app.js", "/assets/style.css", "/api/summary"):
            c.get(path).raise_for_status()
        items = c.get("/api/images", params={"limit": 200}).json()["items"]

        def thumb(item):
            r = c.get(f"/media/thumb/{item['id']}")
            r.raise_for_status()
            return len(r.content)

        with ThreadPoolExecutor(6) as pool:
            size = sum(pool.map(thumb, items))
    return time.perf_counter() - t0, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-review-") as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        pipeline = make_project(folder, args.images)
        t_make = time.perf_counter() - t0
        t0 = time.perf_counter()
        run_pipeline(pipeline)
        t_run = time.perf_counter() - t0
        dataset = folder / "dataset"
        records = json.loads((dataset / "manifest.json").read_text())["images"]
        print(f"dataset: {len(records)} images of 256 px (made in {t_make:.1f} s, lorakit run {t_run:.1f} s)")

        served = Served(pipeline)
        cold, size = first_page(served)
        index_cold = served.index_seconds
        served.stop()
        served = Served(pipeline)
        warm, _ = first_page(served)
        first = records[:200]
        t0 = time.perf_counter()
        for r in first:
            (dataset / r["path"]).read_bytes()
        t_files = time.perf_counter() - t0
        print("\nfirst gallery page (page + summary + 200 entries + 200 thumbnails, 6 connections):")
        print(f"  server start (index {len(records)} images)   {index_cold * 1000:8.0f} ms")
        print(f"  cold (thumbnails made now)        {cold * 1000:8.0f} ms   ({size / 200 / 1024:.1f} KiB a thumbnail)")
        print(f"  warm (thumbnails cached)          {warm * 1000:8.0f} ms   cold/warm = {cold / warm:.1f}x")
        print(f"  comparator: read the 200 full image files  {t_files * 1000:8.0f} ms "
              f"(warm page / files = {warm / t_files:.1f}x)")

        with served.client() as c:
            t0 = time.perf_counter()
            n = c.get("/api/ids", params={"tags": ["1girl", "long_hair"], "not": "hat"}).json()["ids"]
            t_query = time.perf_counter() - t0
            print(f"\nfilter query (AND 2 tags, NOT 1) over {len(records)}: {t_query * 1000:.0f} ms ({len(n)} match)")

            t0 = time.perf_counter()
            r = served.post(c, "/api/edit", {"op": "remove_tag", "tag": "solo", "target": {"filter": {}}})
            t_edit = time.perf_counter() - t0
            r.raise_for_status()
            t0 = time.perf_counter()
            served.post(c, "/api/undo", {}).raise_for_status()
            t_undo = time.perf_counter() - t0
        served.stop()

        captions = [dataset / r["caption_path"] for r in records if r.get("caption_path")]
        t0 = time.perf_counter()
        for path in captions:
            tags = [t for t in path.read_text(encoding="utf-8").split(", ") if t != "solo"]
            path.write_text(", ".join(tags), encoding="utf-8")
        t_loop = time.perf_counter() - t0
        print(f"\nbatch edit: remove 'solo' from all {len(records)} (curation file + captions + manifest): "
              f"{t_edit:.2f} s;  undo {t_undo:.2f} s")
        print(f"  comparator: plain loop rewriting {len(captions)} caption files (no record, no manifest): "
              f"{t_loop:.2f} s  (page / loop = {t_edit / t_loop:.1f}x)")


if __name__ == "__main__":
    main()
