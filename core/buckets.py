"""Aspect-ratio bucketing, the same bucket set and assignment as kohya sd-scripts.

Buckets are resolutions of (about) the same area as ``resolution``², with sides that are multiples
of ``step`` between ``min_size`` and ``max_size``. An image goes to the bucket whose aspect ratio is
nearest to its own, is scaled so that it covers the bucket, and is centre-cropped to it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


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
