"""Benchmark of the review page on a large dataset: time to the first gallery page, and to apply
a batch edit, on 5,000 images.

1. A dataset of N pictures (768 px JPEGs, tags from the test generator) made by a real
   `lorakit run` (folder source, no steps).
2. The real `lorakit review --port 0 --no-browser` in its own process, and an HTTP client that
   loads what the browser loads for the first page, 6 requests at a time like a browser: the token
   URL and the page, its script and style, the summary (tag list), the first 200 gallery entries
   and their 200 thumbnails.
   - cold: a new server, thumbnails not made yet;
   - warm: a new server again, thumbnails cached in DATASET/.lorakit/review/thumbs/;
   - comparator: the same page showing the 200 full images instead of thumbnails (what a gallery
     without a thumbnail cache sends).
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
from contextlib import closing
import json
import random
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from review_dataset import COLOURS, EXTRA, HAIR  # noqa: E402



def make_project(folder: Path, count: int) -> Path:
    rng = random.Random(0)
    raw = folder / "raw"
    for i in range(count):
        d = raw / ("outfit_a" if i % 3 else "outfit_b")
        d.mkdir(parents=True, exist_ok=True)
        w, h = 768, 768 + (i % 5) * 64  # dataset-sized pictures, JPEG as boorus serve them
        im = Image.linear_gradient("L").resize((w, h)).convert("RGB")
        draw = ImageDraw.Draw(im)
        for _ in range(6):
            x, y = rng.randrange(w - 200), rng.randrange(h - 200)
            draw.ellipse([x, y, x + rng.randrange(60, 400), y + rng.randrange(60, 400)],
                         fill=(rng.randrange(256), rng.randrange(256), rng.randrange(256)))
        im.save(d / f"img{i:05d}.jpg", quality=90)
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
    """The real `lorakit review` command in its own process, like a user starts it."""

    def __init__(self, pipeline: Path):
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "lorakit", "review", str(pipeline), "--port", "0",
                                      "--no-browser"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        url = None
        for line in self.proc.stdout:
            found = re.search(r"(http://127\.0\.0\.1:\d+)/\?token=(\S+)", line)
            if found:
                self.base, self.token = found.group(1), found.group(2)
                url = found.group(0)
                break
        if url is None:
            raise SystemExit("lorakit review did not start: " + self.proc.stderr.read())
        self.start_seconds = time.perf_counter() - t0
        self.url = url

    def client(self) -> httpx.Client:
        """A client that went through the token URL, as the browser does (cookie), with the page's CSRF token."""
        c = httpx.Client(base_url=self.base, timeout=120, follow_redirects=True)
        page = c.get(self.url)
        page.raise_for_status()
        self.csrf = re.search(r'name="csrf" content="([^"]+)"', page.text).group(1)
        return c

    def post(self, c: httpx.Client, path: str, body: dict) -> httpx.Response:
        return c.post(path, json=body, headers={"X-CSRF-Token": self.csrf, "Origin": self.base,
                                                "Sec-Fetch-Site": "same-origin"})

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def first_page(served: Served, kind: str = "thumb") -> tuple[float, int]:
    """Seconds until everything the first gallery page shows has arrived; bytes of the pictures."""
    t0 = time.perf_counter()
    with closing(served.client()) as c:  # the page itself
        for path in ("/assets/app.js", "/assets/style.css", "/api/summary"):
            c.get(path).raise_for_status()
        items = c.get("/api/images", params={"limit": 200}).json()["items"]

        def thumb(item):
            r = c.get(f"/media/{kind}/{item['id']}")
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
        print(f"dataset: {len(records)} images of 768 px (made in {t_make:.1f} s, lorakit run {t_run:.1f} s)")

        served = Served(pipeline)
        cold, size = first_page(served)
        start_cold = served.start_seconds
        served.stop()
        served = Served(pipeline)
        warm, _ = first_page(served)
        full, full_size = first_page(served, "image")
        print("\nfirst gallery page (page + summary + 200 entries + 200 pictures, 6 connections), "
              "from a fresh `lorakit review`:")
        print(f"  command start to URL printed ({len(records)} images indexed)   {start_cold:6.2f} s")
        print(f"  cold: thumbnails made now            {cold:6.2f} s   ({size / 200 / 1024:.1f} KiB a thumbnail)")
        print(f"  warm: thumbnails cached              {warm:6.2f} s   cold/warm = {cold / warm:.1f}x")
        print(f"  comparator: the 200 full images instead {full:6.2f} s   ({full_size / 200 / 1024:.1f} KiB each; "
              f"full/warm = {full / warm:.1f}x, bytes {full_size / size:.1f}x)")

        with closing(served.client()) as c:
            t0 = time.perf_counter()
            n = c.get("/api/ids", params={"tags": ["1girl", "long_hair"], "not": "hat"}).json()["ids"]
            t_query = time.perf_counter() - t0
            print(f"\nfilter query (AND 2 tags, NOT 1) over {len(records)}: {t_query * 1000:.0f} ms ({len(n)} match)")

            t0 = time.perf_counter()
            r = served.post(c, "/api/edit", {"op": "remove_tag", "tag": "solo", "target": {"filter": {}}})
            t_edit = time.perf_counter() - t0
            r.raise_for_status()
            probe = dataset / records[-1]["caption_path"]
            assert "solo" not in probe.read_text(encoding="utf-8").split(", "), "the edit did not reach the captions"
            t0 = time.perf_counter()
            served.post(c, "/api/undo", {}).raise_for_status()
            t_undo = time.perf_counter() - t0
            assert "solo" in probe.read_text(encoding="utf-8").split(", "), "undo did not reach the captions"
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
