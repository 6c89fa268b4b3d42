"""The ``background`` step: replace what the mask calls background with a colour (or a blur).

Guide 002 cleans busy backgrounds with ``transparent-background --type white``: the salient-object
map ``p`` (0..1) blends the picture over white, ``image * p + white * (1 - p)``. This step does the
same blend with the mask the ``mask`` step (or a kohya conditioning folder) gave the image, so the
network runs once and its result is checked by the mask step's quality test first.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from lorakit.plugin_sdk import Color, ImageStep, Param, SkipImage, hookimpl

MISSING = ("keep", "set_aside")


class BackgroundStep(ImageStep):
    """Replace the background with a solid colour (white by default) using the image's mask
    (white = subject, black = background): every pixel becomes
    image x mask + colour x (1 - mask), exactly the blend of
    `transparent-background --type white` (or `--type [r,g,b]`). `threshold` makes the mask hard
    first (transparent-background's --threshold); `blur` blurs the background instead of painting
    it (its --type blur). Without a mask, the image's own transparency is used; an image with
    neither is passed on (or set aside with `missing_mask: set_aside`). The mask is kept for
    masked-loss training unless `drop_mask` is set. The share of the picture replaced is in
    meta.background."""

    name = "background"
    summary = "Paint the background white (or a colour, or blur it) through the mask."
    version = "1"
    params = [
        Param("color", Color, Color((255, 255, 255)), "background colour (name, #rrggbb or rgb(r,g,b))"),
        Param("blur", float, 0.0, "blur the background with this Gaussian radius instead of painting it "
              "(transparent-background's --type blur uses 15; 0 = paint with color)", min=0, max=200),
        Param("threshold", float, None, "make the mask hard first: above this (0-1) is subject, the rest "
              "background (none = soft blend)", min=0, max=1),
        Param("missing_mask", str, "keep", "an image with neither mask nor transparency: keep it unchanged "
              "or set it aside", choices=MISSING),
        Param("drop_mask", bool, False, "remove the mask afterwards (it is kept for masked loss by default)"),
    ]
    reads = frozenset({"image", "mask"})
    writes = frozenset({"image", "mask", "meta"})
    example = "lorakit background masked/ white/ --color white"

    def process(self, item, ctx):
        o = self.options
        im = item.open()
        mask_image = item.open_mask()
        source = "mask"
        if mask_image is None:
            if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
                mask_image = im.convert("RGBA").getchannel("A")
                source = "alpha"
            elif o.missing_mask == "set_aside":
                raise SkipImage("no mask and no transparency: nothing says what the background is "
                                "(run the mask step first)")
            else:
                return item
        if mask_image.size != im.size:
            raise SkipImage(f"mask is {mask_image.size[0]}x{mask_image.size[1]} but the image is "
                            f"{im.size[0]}x{im.size[1]}")
        pred = np.asarray(mask_image.convert("L"), dtype=np.float64) / 255.0
        if o.threshold is not None:
            pred = (pred > o.threshold).astype(np.float64)
        rgb_image = _flat_rgb(im)
        rgb = np.asarray(rgb_image, dtype=np.float64)
        if o.blur > 0:
            background = np.asarray(rgb_image.filter(ImageFilter.GaussianBlur(o.blur)), dtype=np.float64)
        else:
            background = np.broadcast_to(np.array(o.color, dtype=np.float64), rgb.shape)
        p = pred[..., None]
        # transparent-background's arithmetic, truncation to uint8 included
        out = (rgb * p + background * (1 - p)).astype(np.uint8)
        meta = dict(item.meta)
        meta["background"] = {
            "mask": source, "threshold": o.threshold,
            "fill": f"blur {o.blur:g}" if o.blur > 0 else "#%02x%02x%02x" % tuple(o.color),
            "replaced": round(float((1 - pred).mean()), 4),
        }
        changes = {"meta": meta}
        if o.drop_mask:
            changes.update(mask=None, pending_mask=None)
        return item.with_image(Image.fromarray(out, "RGB"), **changes)


def _flat_rgb(im: Image.Image) -> Image.Image:
    """RGB pixels of ``im``; transparent pixels keep the colour stored under them (the blend
    decides what shows)."""
    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "LA", "PA", "P"):
        return im.convert("RGBA").convert("RGB")
    return im.convert("RGB")


@hookimpl
def register_steps(register):
    register(BackgroundStep)
