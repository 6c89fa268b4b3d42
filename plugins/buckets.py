"""The ``buckets`` step: kohya aspect-ratio buckets for each image, and optional resize/sort/pad."""
from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from lorakit.buckets import bucket_bounds, make_buckets, select_bucket
from lorakit.plugin_sdk import Color, DatasetStep, ImageError, Param, ParamError, hookimpl, image_size, save_image

MANY_BUCKETS = 8  # guides advise few buckets (4-8); more spreads a small dataset thin


def pad_to_square(im: Image.Image, color: tuple[int, int, int]) -> Image.Image:
    """Centre ``im`` on a square canvas of its longest side, filled with ``color`` (opaque)."""
    w, h = im.size
    if w == h:
        return im
    side = max(w, h)
    fill = color if im.mode == "RGB" else (*color, 255) if im.mode == "RGBA" else color[0] if im.mode == "L" else color
    canvas = Image.new(im.mode if im.mode in ("RGB", "RGBA", "L") else "RGB", (side, side), fill)
    canvas.paste(im if im.mode == canvas.mode else im.convert(canvas.mode), ((side - w) // 2, (side - h) // 2))
    return canvas


def fit_to_bucket(im: Image.Image, bucket: tuple[int, int], resized: tuple[int, int]) -> Image.Image:
    """Scale to cover the bucket, then centre-crop to it (kohya's trim_and_resize_if_required).

    Downscaling uses the box (area) filter, like kohya's cv2.INTER_AREA; upscaling uses Lanczos.
    """
    if im.size != resized:
        shrinking = resized[0] * resized[1] < im.size[0] * im.size[1]
        im = im.resize(resized, Image.Resampling.BOX if shrinking else Image.Resampling.LANCZOS)
    w, h = im.size
    bw, bh = bucket
    left = (w - bw) // 2 if w > bw else 0
    top = (h - bh) // 2 if h > bh else 0
    if (w, h) != (bw, bh):
        im = im.crop((left, top, left + bw, top + bh))
    return im


def _image_size(item) -> tuple[int, int]:
    if item.pending_image is not None:
        return item.pending_image.size
    return image_size(item.path)  # header only, whatever the size: raises ImageError naming the file


class BucketsStep(DatasetStep):
    """Show where each image lands in kohya's aspect-ratio bucketing for a training resolution
    (the same bucket set as sd-scripts' make_bucket_resolutions with min/max/step, and the same
    nearest-aspect-ratio assignment), how many buckets are in use, and which images have fewer
    pixels than resolution x resolution and should be upscaled first. The resolution is the
    pipeline's (`resolution:` in pipeline.yaml, `--resolution` on the command line: 512 for SD1.5,
    1024 for SDXL). The full table goes to `reports/buckets-buckets.json`.

    Optionally rewrite the images: `--resize` scales each image to cover its bucket and centre-crops
    it (what kohya does at training time, done once here); `--sort` puts each image in a `WxH/`
    sub-folder of its subset; `--pad-square` first pads every image to a square on white (so every
    image lands in the square bucket and nothing is cropped away). Masks are transformed with
    their images."""

    name = "buckets"
    summary = "Kohya bucket of each image, bucket counts, too-small list; optional resize/sort/pad."
    version = "1"
    params = [
        Param("min_size", int, None, "smallest bucket side (kohya --min_bucket_reso; default 256, or the "
              "resolution when smaller)", min=8),
        Param("max_size", int, None, "largest bucket side (kohya --max_bucket_reso; default 1024, or the "
              "resolution when larger)", min=8),
        Param("step", int, 64, "bucket sides are multiples of this (kohya --bucket_reso_steps)", min=8),
        Param("resize", bool, False, "scale each image to cover its bucket and centre-crop it"),
        Param("sort", bool, False, "put each image in a WxH/ sub-folder named after its bucket"),
        Param("pad_square", bool, False, "pad each image to a square (on --pad-color) before bucketing"),
        Param("pad_color", Color, Color((255, 255, 255)), "colour of the padding added by --pad-square"),
    ]
    reads = frozenset({"image", "mask"})
    writes = frozenset({"image", "mask", "meta"})
    example = "lorakit buckets dataset/ bucketed/ --resolution 1024 --resize --sort"

    def __init__(self, params=None):
        super().__init__(params)
        o = self.options
        if o.min_size is not None and o.max_size is not None and o.min_size > o.max_size:
            raise ParamError(self.name, "min_size", o.min_size, f"at most max_size ({o.max_size})")

    def run(self, items, ctx):
        o = self.options
        resolution = ctx.resolution
        try:  # the trainer's and the kohya export's rule (lorakit.buckets.bucket_bounds)
            low, high = bucket_bounds(resolution, o.min_size, o.max_size, o.step, names=("min_size", "max_size"))
        except ValueError as exc:
            which = "min_size" if str(exc).startswith("min_size") else "max_size"
            raise ParamError(self.name, which, getattr(o, which), str(exc).split("; ", 1)[1]) from None
        self._bounds = (low, high)
        buckets = make_buckets(resolution, low, high, o.step)
        target_pixels = resolution * resolution
        rows, kept, jobs = [], [], []
        for item in items:
            try:
                width, height = _image_size(item)
            except (ImageError, OSError, ValueError) as exc:
                ctx.set_aside(item, str(exc))
                continue
            w, h = (max(width, height),) * 2 if o.pad_square else (width, height)
            choice = select_bucket(w, h, buckets)
            bw, bh = choice.bucket
            row = {"name": item.name, "subset": item.subset, "size": [width, height],
                   "bucket": f"{bw}x{bh}", "resized": list(choice.resized),
                   "too_small": width * height < target_pixels}
            rows.append(row)
            new_name = f"{bw}x{bh}/{item.name}" if o.sort else item.name
            meta = dict(item.meta, bucket=[bw, bh])
            changes_pixels = (o.pad_square and width != height) or (o.resize and (w, h) != choice.bucket)
            if changes_pixels:
                jobs.append((len(kept), item, choice))
            kept.append(item.replace(name=new_name, meta=meta))

        if jobs:
            def work(job):
                index, item, choice = job
                return index, self._rewrite(item, choice, ctx)

            with ThreadPoolExecutor() as pool:  # Pillow releases the GIL while resizing and encoding
                for index, (image_path, mask_path, error) in pool.map(work, jobs):
                    if error:
                        ctx.set_aside(kept[index], error)
                        kept[index] = None
                        continue
                    changes = {"path": image_path}
                    if mask_path is not None:
                        changes["mask"] = mask_path
                    kept[index] = kept[index].replace(**changes)
            kept = [k for k in kept if k is not None]
        self._report(ctx, resolution, buckets, rows, target_pixels)
        return kept

    def _rewrite(self, item, choice, ctx) -> tuple[Path | None, Path | None, str | None]:
        o = self.options
        try:
            im = item.open()
            mask = item.open_mask()
        except ImageError as exc:
            return None, None, str(exc)
        color = tuple(o.pad_color)
        if o.pad_square:
            im = pad_to_square(im, color)
            if mask is not None:  # padding is not part of the subject: black = ignored by masked loss
                mask = pad_to_square(mask.convert("L"), (0, 0, 0))
        if o.resize:
            im = fit_to_bucket(im, choice.bucket, choice.resized)
            if mask is not None:
                mask = fit_to_bucket(mask.convert("L"), choice.bucket, choice.resized)
        image_path = ctx.tmp_dir / f"{uuid.uuid4().hex}.png"
        save_image(im, image_path)
        mask_path = None
        if mask is not None:
            mask_path = ctx.tmp_dir / f"{uuid.uuid4().hex}.png"
            save_image(mask, mask_path)
        return image_path, mask_path, None

    def _report(self, ctx, resolution, buckets, rows, target_pixels) -> None:
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["bucket"]] = counts.get(r["bucket"], 0) + 1
        used = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
        too_small = [r for r in rows if r["too_small"]]
        ctx.report("buckets", {
            "resolution": resolution, "min_size": self._bounds[0], "max_size": self._bounds[1],
            "step": self.options.step, "bucket_count": len(buckets), "buckets": [f"{w}x{h}" for w, h in buckets],
            "used": used, "too_small": [{"name": r["name"], "subset": r["subset"], "size": r["size"]} for r in too_small],
            "images": rows,
        })
        ctx.log(f"{len(rows)} images in {len(used)} of {len(buckets)} buckets at {resolution}: "
                + ", ".join(f"{b} x{n}" for b, n in used.items()))
        if len(used) > MANY_BUCKETS:
            ctx.log(f"{len(used)} buckets in use: guides advise 4-8; consider --pad-square or cropping outliers")
        if too_small:
            names = ", ".join(r["name"] for r in too_small[:10]) + (" ..." if len(too_small) > 10 else "")
            ctx.log(f"{len(too_small)} images have fewer than {resolution}x{resolution} = {target_pixels} pixels "
                    f"and should be upscaled first (upscale step): {names}")


@hookimpl
def register_steps(register):
    register(BucketsStep)
