"""The ``dedupe`` step: exact and near-duplicate images, grouped through a multi-index hash table.

Each image gets a perceptual hash (imagehash: phash by default). Two images are near duplicates
when the Hamming distance between their hashes is at most ``threshold``. Groups are built around
their best member (no chaining), or transitively with ``linkage: single``.

Finding the close pairs among n hashes without comparing all n²/2 pairs is multi-index hashing
(Norouzi et al., "Fast Search in Hamming Space with Multi-Index Hashing", CVPR 2012): the hash is
cut into m chunks; by the pigeonhole principle two hashes within distance t agree within
floor(t/m) bits on at least one chunk, so it is enough to look up, per chunk, the table entries
within that small radius and then check the few candidates on the full hash. ``near_pairs`` does
this with sorted arrays and numpy only.
"""
from __future__ import annotations

import hashlib
import math
from itertools import combinations
from pathlib import Path

import numpy as np
from PIL import Image

from lorakit.plugin_sdk import DatasetStep, Param, hookimpl, open_image

HASH_METHODS = ("phash", "dhash", "whash", "ahash")
LOSSLESS_FORMATS = {"PNG", "BMP", "TIFF", "GIF", "PPM", "TGA", "QOI", "ICO"}


# ----- hashing ---------------------------------------------------------------------------------
def _hash_function(method: str):
    import imagehash

    return {"phash": imagehash.phash, "dhash": imagehash.dhash, "whash": imagehash.whash,
            "ahash": imagehash.average_hash}[method]


def _is_lossless(path: Path, fmt: str | None) -> bool:
    if fmt in LOSSLESS_FORMATS:
        return True
    if fmt == "WEBP":  # lossless WebP stores a VP8L chunk
        try:
            with open(path, "rb") as fh:
                return b"VP8L" in fh.read(64)
        except OSError:
            return False
    return False


def _flatten(im: Image.Image) -> Image.Image:
    """Transparent areas as white: what a viewer (and training, after the alpha step) sees."""
    if im.mode in ("RGBA", "LA", "PA", "P") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return im


def _bits(image_hash) -> bytes:
    return np.packbits(np.asarray(image_hash.hash, dtype=bool).ravel()).tobytes()


def hash_image(im: Image.Image, method: str, hash_size: int) -> bytes:
    """The perceptual hash of ``im`` as packed bits (transparent areas are seen as white)."""
    return _bits(_hash_function(method)(_flatten(im), hash_size=hash_size))


def is_flat(im: Image.Image, spread: float = 2.0) -> bool:
    """True for a (nearly) single-colour picture: its perceptual hash is all zeros whatever the
    colour, so it can only be an exact duplicate, never a near one."""
    small = im.convert("RGB").resize((32, 32), Image.Resampling.BOX)
    return float(np.asarray(small, dtype=np.float64).std(axis=(0, 1)).max()) < spread


# A grey thumbnail this varied is never flat: its grey is a weighted mean of the colour channels,
# so its spread is at most the largest channel's (with a wide margin for the other resampling).
_NOT_FLAT_GREY_SPREAD = 8.0


def describe(im: Image.Image, method: str, hash_size: int) -> dict:
    """The perceptual hash of ``im`` (hex) and whether it is a single-colour picture.

    For phash the grey 32x32 thumbnail imagehash computes is made once here and serves both the
    hash (imagehash resizing it to its own size changes nothing, so the bits are imagehash's) and a
    cheap first test of flatness; only a nearly uniform thumbnail gets the full test."""
    im = _flatten(im)
    if method == "phash":
        side = hash_size * 4  # imagehash's highfreq_factor
        small = im.convert("L").resize((side, side), Image.Resampling.LANCZOS)
        bits = _bits(_hash_function(method)(small, hash_size=hash_size))
        flat = float(np.asarray(small, dtype=np.float32).std()) < _NOT_FLAT_GREY_SPREAD and is_flat(im)
    else:
        bits = _bits(_hash_function(method)(im, hash_size=hash_size))
        flat = is_flat(im)
    return {"hash": bits.hex(), "flat": flat}


def pixel_digest(im: Image.Image) -> str:
    """Identity of the decoded pixels: the same picture saved as PNG and BMP has the same digest
    (pictures are compared as RGB, or as RGBA when some pixel is not fully opaque)."""
    if im.mode not in ("RGB", "RGBA"):
        im = im.convert("RGBA" if im.mode in ("LA", "PA", "P") or "transparency" in im.info else "RGB")
    if im.mode == "RGBA" and im.getchannel("A").getextrema()[0] == 255:
        im = im.convert("RGB")
    h = hashlib.blake2b(f"{im.size[0]}x{im.size[1]}".encode(), digest_size=20)
    h.update(im.tobytes())
    return h.hexdigest()


# Hashes whose own first step shrinks the picture to a few dozen pixels: a JPEG may be decoded at
# reduced scale for them (whash scales by the picture's size, so it gets the whole picture).
_REDUCIBLE = {"phash": 4, "ahash": 1, "dhash": 2}
_JPEG_METADATA = set(range(0xE0, 0xF0)) - {0xEE} | {0xFE}  # APPn (not Adobe's APP14, which sets colours) and COM


def jpeg_data_digest(path: str) -> str | None:
    """Identity of a JPEG's image data (quantisation and Huffman tables, frame, scans) without its
    metadata (EXIF, ICC profile, comments): the same data decodes to the same pixels. None when
    the markers cannot be followed."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None
    if data[:2] != b"\xff\xd8":
        return None
    h = hashlib.blake2b(b"jpeg", digest_size=20)
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker == 0xDA:  # start of scan: the rest is image data (and further scans)
            h.update(data[pos:])
            return h.hexdigest()
        if marker not in _JPEG_METADATA:
            h.update(data[pos:pos + 2 + length])
        pos += 2 + length
    return None


def hash_file(path: str, method: str, hash_size: int) -> dict:
    """Everything dedupe needs to know about one image file (what ``DedupeStep.prepare`` returns).

    A JPEG is decoded at reduced scale (never below the hash's own thumbnail) when the hash shrinks
    the picture anyway, and its exact-duplicate identity is its image data without metadata."""
    factor = _REDUCIBLE.get(method)
    side = hash_size * factor if factor else None
    im = open_image(path, reduce_to=(side, side) if side else None)
    size = im.info.get("full_size", im.size)
    info = describe(im, method, hash_size)
    pixels = jpeg_data_digest(path) if "full_size" in im.info else None
    if pixels is None and "full_size" in im.info:  # markers we cannot follow: decode it whole
        im = open_image(path)
    info.update(pixels=pixels or pixel_digest(im), width=size[0], height=size[1], format=im.format,
                lossless=_is_lossless(Path(path), im.format))
    return info


# ----- the index ---------------------------------------------------------------------------
def hashes_to_words(hashes: list[bytes]) -> np.ndarray:
    """Packed hashes (all the same length) to an (n, words) uint64 array, zero-padded."""
    if not hashes:
        return np.zeros((0, 1), dtype=np.uint64)
    nbytes = len(hashes[0])
    width = -(-nbytes // 8) * 8
    buf = np.zeros((len(hashes), width), dtype=np.uint8)
    for i, h in enumerate(hashes):
        buf[i, :nbytes] = np.frombuffer(h, dtype=np.uint8)
    return buf.view(">u8").astype(np.uint64)


if hasattr(np, "bitwise_count"):
    def _popcount(x: np.ndarray) -> np.ndarray:
        return np.bitwise_count(x)
else:  # numpy < 2.0
    _BYTE_COUNTS = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)

    def _popcount(x: np.ndarray) -> np.ndarray:
        return _BYTE_COUNTS[x[..., None].view(np.uint8)].sum(axis=-1)


def hamming(words: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Hamming distances between rows i and j of an (n, words) uint64 array."""
    return _popcount(words[i] ^ words[j]).sum(axis=1, dtype=np.int64)


def _chunk_values(words: np.ndarray, nbits: int, chunks: int) -> tuple[np.ndarray, list[int]]:
    """Cut each hash into ``chunks`` pieces of about nbits/chunks bits; returns (n, chunks) int64."""
    bits = np.unpackbits(words.astype(">u8").view(np.uint8), axis=1)[:, :nbits]
    bounds = np.linspace(0, nbits, chunks + 1).round().astype(int)
    widths = [int(b - a) for a, b in zip(bounds[:-1], bounds[1:])]
    values = np.zeros((len(words), chunks), dtype=np.int64)
    for c, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        weights = (1 << np.arange(b - a - 1, -1, -1, dtype=np.int64))
        values[:, c] = bits[:, a:b].astype(np.int64) @ weights
    return values, widths


def _flip_masks(width: int, radius: int) -> np.ndarray:
    """All integers of ``width`` bits with at most ``radius`` bits set (the probes around a key)."""
    masks = [0]
    for r in range(1, radius + 1):
        for positions in combinations(range(width), r):
            masks.append(sum(1 << p for p in positions))
    return np.array(masks, dtype=np.int64)


def _plan(n: int, nbits: int, threshold: int) -> int:
    """Number of chunks that minimises probes + expected candidates (chunks of at most 24 bits)."""
    best, best_cost = 1, math.inf
    for chunks in range(max(1, math.ceil(nbits / 24)), nbits + 1):
        width = math.ceil(nbits / chunks)
        radius = threshold // chunks
        probes = sum(math.comb(width, k) for k in range(radius + 1))
        cost = n * chunks * probes * (1.0 + n / float(2 ** width))
        if cost < best_cost:
            best, best_cost = chunks, cost
    return best


def near_pairs(words: np.ndarray, threshold: int, nbits: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i < j) of rows of ``words`` within Hamming distance ``threshold``, with distances.

    ``words`` is (n, k) uint64 (one packed hash per row). Identical hashes are collapsed first, so
    a thousand copies of one picture cost one lookup, not a million pair checks: each copy is paired
    with the first row holding its hash, and near pairs are reported between those first rows. The
    pairs therefore connect exactly the rows that all-pairs comparison would connect (the same
    groups), without listing every pair among copies.
    """
    n = len(words)
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))
    if n < 2:
        return empty
    nbits = nbits or words.shape[1] * 64
    uniq, inverse = np.unique(words, axis=0, return_inverse=True)
    inverse = inverse.ravel()
    pair_i, pair_j, dist = [], [], []

    # Identical hashes: chain each copy to the first row holding that hash (distance 0).
    order = np.argsort(inverse, kind="stable")
    sorted_u = inverse[order]
    same = sorted_u[1:] == sorted_u[:-1]
    if same.any():
        starts = np.flatnonzero(np.r_[True, ~same])
        first_of = order[starts][np.searchsorted(sorted_u[starts], sorted_u)]
        dup = first_of != order
        pair_i.append(np.minimum(first_of[dup], order[dup]))
        pair_j.append(np.maximum(first_of[dup], order[dup]))
        dist.append(np.zeros(int(dup.sum()), np.int64))

    # Distinct hashes: multi-index lookup, then exact check on the full hash.
    u = len(uniq)
    if u >= 2 and threshold > 0:
        chunks = _plan(u, nbits, threshold)
        values, widths = _chunk_values(uniq, nbits, chunks)
        radius = threshold // chunks
        found_i, found_j = [], []
        for c in range(chunks):
            keys = values[:, c]
            key_order = np.argsort(keys, kind="stable")
            sorted_keys = keys[key_order]
            for mask in _flip_masks(widths[c], radius):
                probe = keys ^ mask
                lo = np.searchsorted(sorted_keys, probe, "left")
                hi = np.searchsorted(sorted_keys, probe, "right")
                counts = hi - lo
                total = int(counts.sum())
                if not total:
                    continue
                qi = np.repeat(np.arange(u), counts)
                offsets = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
                ti = key_order[np.repeat(lo, counts) + offsets]
                keep = qi < ti
                qi, ti = qi[keep], ti[keep]
                if not len(qi):
                    continue
                d = hamming(uniq, qi, ti)
                close = d <= threshold
                found_i.append(qi[close])
                found_j.append(ti[close])
        if found_i:
            fi, fj = np.concatenate(found_i), np.concatenate(found_j)
            key = np.unique(fi * u + fj)
            ui, uj = key // u, key % u
            ud = hamming(uniq, ui, uj)
            # Map unique hashes back to a representative row (the first row holding it).
            rep = np.full(u, n, dtype=np.int64)
            np.minimum.at(rep, inverse, np.arange(n))
            ri, rj = rep[ui], rep[uj]
            pair_i.append(np.minimum(ri, rj))
            pair_j.append(np.maximum(ri, rj))
            dist.append(ud.astype(np.int64))
    if not pair_i:
        return empty
    return np.concatenate(pair_i), np.concatenate(pair_j), np.concatenate(dist)


def group_duplicates(words: np.ndarray, threshold: int, nbits: int | None = None) -> tuple[np.ndarray, tuple]:
    """Group rows whose hashes are within ``threshold`` (transitively). Returns (labels, pairs):
    ``labels[k]`` is the group number of row k; rows alone in their group are duplicates of nothing."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(words)
    pairs = near_pairs(words, threshold, nbits)
    if n == 0:
        return np.zeros(0, np.int64), pairs
    i, j, _ = pairs
    graph = coo_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return labels, pairs


LINKAGES = ("keeper", "complete", "single")


def group_around_keepers(words: np.ndarray, threshold: int, order: list[int] | np.ndarray,
                         nbits: int | None = None, complete: bool = False) -> np.ndarray:
    """Groups that cannot chain: rows are taken best first (``order``); a row not yet grouped
    becomes a keeper and takes every ungrouped row within ``threshold`` of it. So every member is a
    near duplicate of its group's keeper (A~B and B~C with A far from C no longer makes one group).
    ``complete`` also requires each member to be within ``threshold`` of every other member.
    Returns ``labels`` as ``group_duplicates`` does."""
    n = len(words)
    labels = np.full(n, -1, dtype=np.int64)
    if n == 0:
        return labels
    uniq, inverse = np.unique(words, axis=0, return_inverse=True)
    inverse = inverse.ravel()
    ui, uj, _ = near_pairs(uniq, threshold, nbits)  # pairs of distinct hashes only: rows of ``uniq``
    neighbours: dict[int, set[int]] = {}
    for a, b in zip(ui.tolist(), uj.tolist()):
        neighbours.setdefault(a, set()).add(b)
        neighbours.setdefault(b, set()).add(a)
    rows_of: dict[int, list[int]] = {}
    for row, u in enumerate(inverse.tolist()):
        rows_of.setdefault(u, []).append(row)
    rank = np.empty(n, dtype=np.int64)
    rank[np.asarray(order, dtype=np.int64)] = np.arange(n)
    group = 0
    for keeper in order:
        keeper = int(keeper)
        if labels[keeper] >= 0:
            continue
        labels[keeper] = group
        ku = int(inverse[keeper])
        candidates = [r for u in [ku, *sorted(neighbours.get(ku, ()))] for r in rows_of[u] if labels[r] < 0]
        members_u = [ku]
        for r in sorted(candidates, key=lambda r: rank[r]):
            ru = int(inverse[r])
            if complete and any(m != ru and m not in neighbours.get(ru, ()) for m in members_u):
                continue
            labels[r] = group
            members_u.append(ru)
        group += 1
    return labels


# ----- the step ------------------------------------------------------------------------------
class DedupeStep(DatasetStep):
    """Find exact and near-duplicate images and keep one of each group. Exact duplicates have the
    same decoded pixels (whatever the lossless format) or, for JPEGs, the same image data whatever
    the metadata; near duplicates have perceptual hashes within `threshold` bits of each other
    (resized, re-compressed, slightly cropped or recoloured copies).
    Groups do not chain: each is built around its keeper, and every member is within `threshold`
    of the keeper (linkage keeper, the default). linkage complete also needs every pair of members
    within it; linkage single is transitive (A near B and B near C make one group even when A and C
    are far apart), which on large sets joins unrelated pictures.

    Each group keeps its best member: most pixels, then lossless (PNG, BMP, lossless WebP...) over
    lossy (JPEG...), then the name in sort order. The others are set aside (never deleted), and
    `reports/dedupe-groups.json` lists every group with each member's distance to the one kept.
    Hashing is the step's per-image part: it runs in the run's worker pool (`--workers`) and each
    hash is cached in the store by image content, so a re-run over a grown dataset hashes only the
    new images; an unreadable image is set aside with the reason."""

    name = "dedupe"
    summary = "Set aside exact and near-duplicate images (perceptual hash), keeping the best of each group."
    version = "5"
    params = [
        Param("hash", str, "phash", "perceptual hash: phash (robust default), dhash, whash or ahash", choices=HASH_METHODS),
        Param("hash_size", int, 8, "hash side: 8 gives 64-bit hashes, 16 gives 256-bit ones", choices=(8, 16)),
        Param("threshold", int, 6, "largest Hamming distance still counted as a duplicate (0 = identical hashes)",
              min=0, max=64),
        Param("linkage", str, "keeper", "keeper: every member near the one kept (no chains); complete: every "
              "pair near; single: transitive (A~B, B~C groups A with C)", choices=LINKAGES),
        Param("scope", str, "all", "all: compare every image with every other; subset: only within each subset",
              choices=("all", "subset")),
    ]
    reads = frozenset({"image"})
    writes = frozenset()
    example = "lorakit dedupe raw/ unique/ --threshold 8 --scope subset"

    def prepare(self, item, ctx):
        """The per-image part (in the host's worker pool, cached in the store by image content)."""
        o = self.options
        if item.pending_image is not None:
            im = item.pending_image
            info = describe(im, o.hash, o.hash_size)
            info.update(pixels=pixel_digest(im), width=im.size[0], height=im.size[1], format="PNG", lossless=True)
            return info
        return hash_file(str(item.path), o.hash, o.hash_size)

    def run(self, items, ctx):
        o = self.options
        items, info = self.prepared(items, ctx)
        kept, groups_report = [], []
        unknown = [k for k, i in enumerate(info) if i is None]  # restored by hand after an unreadable file
        good = [k for k in range(len(items)) if info[k] is not None]
        if o.scope == "subset":
            scopes: dict[str, list[int]] = {}
            for k in good:
                scopes.setdefault(items[k].subset, []).append(k)
            partitions = list(scopes.values())
        else:
            partitions = [good]
        aside: set[int] = set()
        nbits = o.hash_size * o.hash_size
        for part in partitions:
            textured = [k for k in part if not info[k]["flat"]]
            words = hashes_to_words([bytes.fromhex(info[k]["hash"]) for k in textured])
            if o.linkage == "single":
                labels, _ = group_duplicates(words, o.threshold, nbits)
            else:
                best_first = sorted(range(len(textured)), key=lambda r: self._rank(items[textured[r]], info[textured[r]]))
                labels = group_around_keepers(words, o.threshold, best_first, nbits, complete=o.linkage == "complete")
            members: dict[object, list[int]] = {}
            for row, label in enumerate(labels):
                members.setdefault(int(label), []).append(textured[row])
            for k in part:  # single-colour pictures: only identical pixels make duplicates
                if info[k]["flat"]:
                    members.setdefault(info[k]["pixels"], []).append(k)
            for group in members.values():
                if len(group) < 2:
                    continue
                best = min(group, key=lambda k: self._rank(items[k], info[k]))
                best_words = hashes_to_words([bytes.fromhex(info[best]["hash"])])[0]
                entry = {"kept": items[best].name, "subset": items[best].subset,
                         "size": [info[best]["width"], info[best]["height"]], "members": []}
                for k in sorted(group, key=lambda k: self._rank(items[k], info[k])):
                    if k == best:
                        continue
                    w = hashes_to_words([bytes.fromhex(info[k]["hash"])])[0]
                    distance = int(_popcount(w ^ best_words).sum())
                    same = info[k]["pixels"] == info[best]["pixels"]
                    entry["members"].append({"name": items[k].name, "subset": items[k].subset,
                                             "size": [info[k]["width"], info[k]["height"]],
                                             "distance": distance, "exact": same, "source": items[k].source})
                    aside.add(k)
                    what = "exact duplicate" if same else f"near duplicate ({o.hash} distance {distance})"
                    ctx.set_aside(items[k], f"{what} of {items[best].name}")
                groups_report.append(entry)
        kept = [items[k] for k in range(len(items)) if k not in aside]
        groups_report.sort(key=lambda g: (g["subset"], g["kept"]))
        ctx.report("groups", {"hash": o.hash, "hash_size": o.hash_size, "threshold": o.threshold,
                              "linkage": o.linkage, "scope": o.scope,
                              "images": len(items), "groups": len(groups_report), "set_aside": len(aside),
                              "not_compared": len(unknown), "duplicate_groups": groups_report})
        n_exact = sum(1 for g in groups_report for m in g["members"] if m["exact"])
        ctx.log(f"{len(groups_report)} duplicate groups: {len(aside)} images set aside "
                f"({n_exact} exact, {len(aside) - n_exact} near), {len(kept)} kept")
        return kept

    @staticmethod
    def _rank(item, info):
        """Sort key of the best member first: most pixels, lossless, then name."""
        source_format = item.meta.get("source_format")
        lossless = (source_format in LOSSLESS_FORMATS) if source_format else info["lossless"]
        return (-(info["width"] * info["height"]), 0 if lossless else 1, item.name)


@hookimpl
def register_steps(register):
    register(DedupeStep)
