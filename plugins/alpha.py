"""The ``alpha`` step: remove transparency by flattening onto a background colour."""
from __future__ import annotations


from lorakit.plugin_sdk import Color, ImageStep, Param, hookimpl, image_header

from ._imageops import flatten, has_alpha_channel, is_transparent


class AlphaStep(ImageStep):
    """Stable Diffusion training does not understand transparency: a transparent background turns
    into whatever colour the decoder happens to store under it. This step composites every image
    with transparent pixels onto a solid background, the same pixels (within one level) as
    `convert in.png -background white -alpha remove -alpha off out.png`. Images without transparent
    pixels (including RGBA images whose alpha is fully opaque) pass through untouched, without being
    decoded twice or re-encoded."""

    name = "alpha"
    summary = "Flatten transparency onto a background colour (like -background white -alpha remove)."
    version = "1"
    params = [
        Param("background", Color, Color((255, 255, 255)), "colour put behind transparent pixels (name or #rrggbb)"),
    ]
    reads = frozenset({"image"})
    writes = frozenset({"image"})
    example = "lorakit alpha trimmed/ flat/ --background white"

    def process(self, item, ctx):
        if item.pending_image is None:
            with image_header(item.path) as header:  # mode and tRNS are in the header: no decode
                if not has_alpha_channel(header):
                    return item
        im = item.open()
        if not is_transparent(im):
            return item
        return item.with_image(flatten(im, tuple(self.options.background)))


@hookimpl
def register_steps(register):
    register(AlphaStep)
