"""Aspect-ratio bucketing, the same bucket set and assignment as kohya sd-scripts.

Buckets are resolutions of (about) the same area as ``resolution``², with sides that are multiples
of ``step`` between ``min_size`` and ``max_size``. An image goes to the bucket whose aspect ratio is
nearest to its own, is scaled so that it covers the bucket, and is centre-cropped to it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

# kohya sd-scripts' defaults (--min_bucket_reso / --max_bucket_reso), the same for SD1 and SDXL.
KOHYA_MIN_BUCKET = 256
KOHYA_MAX_BUCKET = 1024


def bucket_bounds(resolution: int, min_size: int | None = None, max_size: int | None = None, step: int = 64, *,
                  names: tuple[str, str] = ("min_bucket_reso", "max_bucket_reso")) -> tuple[int, int]:
    """The smallest and largest bucket side: the one rule the trainer, the ``buckets`` step and the
    kohya export share.

    Unset bounds are kohya's defaults (256 and 1024), widened to include ``resolution`` (so a 64 or
    2048 training resolution works without other options). Bounds are rounded to multiples of
    ``step`` as kohya does (the smallest down, the largest up). A bound set by the user that excludes
    the resolution is a ``ValueError`` naming the option (``names``) and the value to set.
    """
    low = min(KOHYA_MIN_BUCKET, resolution) if min_size is None else min_size
    high = max(KOHYA_MAX_BUCKET, resolution) if max_size is None else max_size
    low -= low % step
    if high % step:
        high += step - high % step
    if low > resolution:
        raise ValueError(f"{names[0]} = {min_size} is larger than the resolution {resolution}; "
                         f"set {names[0]} to {resolution} or less (or leave it unset)")
    if high < resolution:
        raise ValueError(f"{names[1]} = {max_size} is smaller than the resolution {resolution}; "
                         f"set {names[1]} to {resolution} or more (or leave it unset)")
    return max(step, low), high


def make_buckets(resolution: int | tuple[int, int] = 512, min_size: int = 256, max_size: int = 1024,
                 step: int = 64) -> list[tuple[int, int]]:
    """All (width, height) buckets, sorted, for a training resolution (kohya ``make_bucket_resolutions``)."""
    width, height = (resolution, resolution) if isinstance(resolution, int) else resolution
    max_area = width * height
    resos = {(int(math.sqrt(max_area) // step) * step,) * 2}
    w = min_size
    while w <= max_size:
        h = min(max_size, int((max_area // w) // step) * step)
        if h >= min_size:
            resos.add((w, h))
            resos.add((h, w))
        w += step
    return sorted(resos)


@dataclass(frozen=True)
class BucketChoice:
    bucket: tuple[int, int]
    resized: tuple[int, int]  # the size the image is scaled to before the centre crop to ``bucket``


def select_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> BucketChoice:
    """The bucket kohya assigns an image of ``width`` x ``height`` to (nearest aspect ratio)."""
    aspect = width / height
    ratios = [w / h for w, h in buckets]
    best = min(range(len(buckets)), key=lambda i: abs(ratios[i] - aspect))
    bw, bh = buckets[best]
    if aspect > bw / bh:
        scale = bh / height
    else:
        scale = bw / width
    resized = (int(width * scale + 0.5), int(height * scale + 0.5))
    return BucketChoice((bw, bh), resized)


def select_bucket_no_upscale(width: int, height: int, max_area: int, step: int = 64) -> BucketChoice:
    """kohya's ``bucket_no_upscale``: the bucket comes from the image's own size and is never larger.

    An image of more than ``max_area`` pixels (the resolution squared) is first scaled down, keeping
    its aspect ratio, to about that area: of the two ways to round (the width to ``step`` and the
    height from it, or the other way round) the one whose aspect ratio is nearer the image's wins,
    and the other side follows from the aspect ratio. A smaller image keeps its size. The bucket is
    then that size with each side rounded down to a multiple of ``step`` (a crop, never padding).
    ``min_bucket_reso`` / ``max_bucket_reso`` play no part (kohya ignores them here too).
    """
    aspect = width / height

    def round_to_steps(x: float) -> int:
        x = int(x + 0.5)
        return x - x % step

    if width * height > max_area:
        resized_width = math.sqrt(max_area * aspect)
        resized_height = max_area / resized_width
        by_width = round_to_steps(resized_width)
        height_for_width = round_to_steps(by_width / aspect)
        by_height = round_to_steps(resized_height)
        width_for_height = round_to_steps(by_height * aspect)
        width_error = abs(by_width / height_for_width - aspect) if height_for_width else math.inf
        height_error = abs(width_for_height / by_height - aspect) if by_height else math.inf
        if width_error < height_error:
            resized = (by_width, int(by_width / aspect + 0.5))
        else:
            resized = (int(by_height * aspect + 0.5), by_height)
    else:
        resized = (width, height)
    bucket = (resized[0] - resized[0] % step, resized[1] - resized[1] % step)
    return BucketChoice(bucket, resized)


def crop_ltrb(bucket: tuple[int, int], size: tuple[int, int]) -> tuple[float, float, float, float]:
    """kohya's ``get_crop_ltrb``: (left, top, right, bottom) of an image of ``size`` fitted *inside*
    ``bucket`` and centred (the offsets of Stability's SDXL preprocessing). Floats, as kohya's are;
    left/top are floored. SDXL's crop conditioning is made from these, not from the crop taken."""
    bucket_aspect = bucket[0] / bucket[1]
    image_aspect = size[0] / size[1]
    if bucket_aspect > image_aspect:
        fitted_width, fitted_height = bucket[1] * image_aspect, bucket[1]
    else:
        fitted_width, fitted_height = bucket[0], bucket[0] / image_aspect
    left = (bucket[0] - fitted_width) // 2
    top = (bucket[1] - fitted_height) // 2
    return left, top, left + fitted_width, top + fitted_height


def sdxl_time_ids(size: tuple[int, int], bucket: tuple[int, int], flipped: bool) -> list[int]:
    """SDXL's added time ids as kohya computes them: original height and width (the image's size before
    any resize), crop top and left from ``crop_ltrb`` (flipped: the left is the bucket width minus
    the right), target height and width (the bucket). A random crop does not change them (kohya's
    note: it has no way to express one)."""
    left, top, right, _ = crop_ltrb(bucket, size)
    if flipped:
        left = bucket[0] - right
    return [int(size[1]), int(size[0]), int(top), int(left), int(bucket[1]), int(bucket[0])]
