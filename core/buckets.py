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
