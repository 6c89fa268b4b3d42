"""The ``convert`` step: every picture to an 8-bit RGB/RGBA PNG, animations to one PNG per frame."""
from __future__ import annotations

import uuid

from PIL import Image, ImageOps

from lorakit.plugin_sdk import ImageError, ImageStep, Param, SkipImage, hookimpl, save_image

from ._imageops import to_rgb_or_rgba

ORIENTATION_TAG = 0x0112


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(ORIENTATION_TAG, 1) or 1)
    except Exception:  # a corrupt EXIF block must not cost the picture
        return 1


def _upright(im: Image.Image) -> Image.Image:
    """Apply the EXIF orientation (phones store pictures sideways and set a flag)."""
    if _orientation(im) in (1, 0):
        return im
    try:
        return ImageOps.exif_transpose(im)
    except Exception:
        return im


class ConvertStep(ImageStep):
    """Turn every input into a PNG the rest of the pipeline can rely on: 8-bit RGB, or RGBA when
    the picture has transparent pixels (a later `alpha` step flattens it; an alpha channel that is
    255 everywhere is dropped). JPEG, WEBP, AVIF, BMP,
    TIFF and GIF are decoded; EXIF orientation is applied; CMYK (through its ICC profile when it has
    one), palette, grey, grey+alpha and 16-bit pictures are normalised without losing transparency.
    An animated GIF, WEBP or PNG becomes one PNG per frame, `name_0001.png`, `name_0002.png`...
    (or only its first frame with --first-frame-only). A PNG that is already RGB/RGBA and upright is
    passed on untouched (no re-encode, and the next step does not decode it again)."""

    name = "convert"
    summary = "Convert GIF/WEBP/AVIF/JPEG/BMP/TIFF to PNG; animations to one PNG per frame."
    version = "1"
    params = [
        Param("first_frame_only", bool, False, "keep only the first frame of an animation (no _0001 suffix)"),
        Param("frame_step", int, 1, "keep every Nth frame of an animation (1 = all frames)", min=1),
        Param("max_frames", int, 1000, "set aside animations with more frames than this (after frame_step)", min=1),
    ]
    reads = frozenset({"image"})
    writes = frozenset({"image", "meta"})
    example = "lorakit convert raw/ png/ --first-frame-only"

    def process(self, item, ctx):
        im = item.open()  # size-capped, fully checked decode of the first frame
        fmt = im.format or ("PNG" if item.pending_image is not None else None)
        frames = getattr(im, "n_frames", 1) if item.pending_image is None else 1
        meta = dict(item.meta)
        meta.setdefault("source_format", fmt)
        if frames > 1 and not self.options.first_frame_only:
            return self._frames(item, im, frames, meta, ctx)
        if frames > 1:
            meta["frames"] = frames
        upright = _upright(im)
        untouched = (fmt == "PNG" and item.pending_image is None and item.path.suffix.lower() == ".png"
                     and upright is im and im.mode in ("RGB", "RGBA") and "transparency" not in im.info
                     and not (im.mode == "RGBA" and im.getchannel("A").getextrema()[0] == 255))  # opaque: RGB
        if untouched:
            return item.replace(meta=meta).keeping_decoded(im)  # the next step needs no second decode
        return item.with_image(to_rgb_or_rgba(upright), meta=meta)

    def _frames(self, item, im, frames, meta, ctx):
        kept = list(range(0, frames, self.options.frame_step))
        if len(kept) > self.options.max_frames:
            raise SkipImage(f"animation of {frames} frames ({len(kept)} kept with frame_step "
                            f"{self.options.frame_step}) is over max_frames={self.options.max_frames}; "
                            "raise --max-frames, use a larger --frame-step, or --first-frame-only")
        digits = max(4, len(str(frames)))
        written = []
        outputs = []
        try:
            for index in kept:
                try:
                    im.seek(index)
                    frame = im.copy()  # decodes this frame (composited with earlier ones by Pillow)
                except (OSError, ValueError, EOFError, SyntaxError) as exc:
                    raise ImageError(f"{item.path}: frame {index + 1} of {frames} is broken or truncated ({exc})") from None
                frame = to_rgb_or_rgba(_upright(frame))
                # Frames go to scratch files, not memory: a long animation never sits in RAM at once.
                target = ctx.tmp_dir / f"{uuid.uuid4().hex}.png"
                save_image(frame, target)
                written.append(target)
                frame_meta = dict(meta, frame=index + 1, frames=frames)
                outputs.append(item.replace(name=f"{item.name}_{index + 1:0{digits}d}", path=target,
                                            meta=frame_meta, pending_image=None))
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)
            raise
        finally:
            im.close()
        return outputs


@hookimpl
def register_steps(register):
    register(ConvertStep)
