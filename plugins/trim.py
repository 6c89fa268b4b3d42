"""The ``trim`` step: ImageMagick's ``-fuzz N% -trim``, the same crop, without ImageMagick."""
from __future__ import annotations

from lorakit.plugin_sdk import Fuzz, ImageStep, Param, Percent, SkipImage, hookimpl

from ._imageops import fuzz_from_percent, trim_array, trim_box


class TrimStep(ImageStep):
    """Cut away uniform borders (letterboxing, scan margins, padding) exactly as
    `convert in.png -fuzz 20% -trim out.png` does: the left and top edges are compared with the
    top-left pixel, the right edge with the top-right pixel and the bottom edge with the bottom-left
    pixel; a pixel belongs to the border while its colour distance (RGB plus alpha) to that corner is
    within the fuzz. Fully transparent pixels match a fully transparent corner whatever their colour.
    An image with no border is passed on untouched (not re-encoded); an image that is nothing but
    border is set aside (ImageMagick would leave a 1x1 transparent pixel)."""

    name = "trim"
    summary = "Cut uniform borders like ImageMagick's -fuzz N% -trim (same bounding box)."
    version = "1"
    params = [
        Param("fuzz", Fuzz, Fuzz(20), "colour distance still counted as border, ImageMagick's -fuzz: 20% is "
              "a percentage, a bare 20 is 20 of 65535 as in ImageMagick", min=0, max=100),
        Param("warn_below", Percent, Percent(50), "warn when the trimmed picture keeps less than this share of "
              "the pixels (a subject on a background of its own colour gets cut away)", min=0, max=100),
    ]
    reads = frozenset({"image"})
    writes = frozenset({"image", "meta"})
    example = "lorakit trim raw/ trimmed/ --fuzz 20%"

    def process(self, item, ctx):
        im = item.open()
        result = trim_box(trim_array(im), fuzz_from_percent(float(self.options.fuzz)))
        if result.box is None:
            raise SkipImage(f"the whole image is within fuzz {self.options.fuzz.text} of its corner colour "
                            "(nothing left after trimming)")
        if result.unchanged:
            return item if item.pending_image is not None else item.keeping_decoded(im)
        left, top, right, bottom = result.box
        meta = dict(item.meta)
        meta["trim"] = {"box": [left, top, right, bottom], "from": list(result.size)}
        trimmed = item.with_image(im.crop(result.box), meta=meta)
        kept = (right - left) * (bottom - top) / (result.size[0] * result.size[1])
        if kept * 100 < float(self.options.warn_below):
            message = (f"kept {kept:.0%} of the picture ({right - left}x{bottom - top} of "
                       f"{result.size[0]}x{result.size[1]}): check the subject was not cut away as border")
            ctx.log(f"{item.name}: {message}")
            trimmed = trimmed.warned(self.name, message)
        return trimmed


@hookimpl
def register_steps(register):
    register(TrimStep)
