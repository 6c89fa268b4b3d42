"""The ``alpha`` step: remove transparency by flattening onto a background colour."""
from __future__ import annotations


from lorakit.plugin_sdk import Color, ImageStep, Param, hookimpl, image_header

from ._imageops import flatten, has_alpha_channel


class AlphaStep(ImageStep):
    """Stable Diffusion training does not understand transparency: a transparent background turns
    into whatever colour the decoder happens to store under it. This step composites every image
    with transparent pixels onto a solid background, the same pixels (within one level) as
    `convert in.png -background white -alpha remove -alpha off out.png`. Images without an alpha
    channel pass through untouched (decided from the file header: not decoded, not re-encoded); an
    alpha channel that is 255 everywhere is dropped, so every output is RGB (or grey)."""

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
        if not has_alpha_channel(im):
            return item
        # Transparent: flattened. An alpha channel that is 255 everywhere carries nothing: dropped, so
        # the picture is written as RGB (flattening an opaque picture changes no pixel).
        return item.with_image(flatten(im, tuple(self.options.background)))


@hookimpl
def register_steps(register):
    register(AlphaStep)
