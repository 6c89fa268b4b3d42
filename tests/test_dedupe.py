"""dedupe: exact and near duplicates, the best member kept, the index agreeing with all-pairs."""
from __future__ import annotations

import json

import imagehash
import numpy as np
import pytest
from PIL import Image, ImageFilter
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from lorakit.plugin_sdk import Item, StepContext
from lorakit.plugin_sdk.testing import run_step
from lorakit.plugins import dedupe
from lorakit.plugins.dedupe import DedupeStep, group_duplicates, hamming, hash_image, hashes_to_words


def picture(seed: int, size=(256, 192)) -> Image.Image:
    """A smooth random picture: perceptual hashes of different seeds are far apart."""
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((6, 8, 3)) * 255).astype(np.uint8)).resize(size, Image.Resampling.BICUBIC)


def canonical(labels) -> list[int]:
    seen: dict[int, int] = {}
    return [seen.setdefault(int(label), len(seen)) for label in labels]


def brute_force_groups(words, threshold):
    n = len(words)
    i, j = np.triu_indices(n, 1)
    close = hamming(words, i, j) <= threshold
    graph = coo_matrix((np.ones(int(close.sum())), (i[close], j[close])), shape=(n, n))
    return connected_components(graph, directed=False)[1]


@pytest.mark.parametrize("threshold,words_per_hash", [(0, 1), (3, 1), (6, 1), (10, 1), (16, 1), (24, 4)])
def test_index_groups_exactly_like_all_pairs_comparison(threshold, words_per_hash):
    rng = np.random.default_rng(threshold)
    centres = rng.integers(0, 2**63, (60, words_per_hash), dtype=np.uint64)
    rows = []
    for _ in range(400):  # clusters of noisy copies, some exact copies, some loners
        w = centres[rng.integers(0, len(centres))].copy()
        for _ in range(int(rng.integers(0, threshold + 4))):
            k = int(rng.integers(0, words_per_hash))
            w[k] ^= np.uint64(1) << np.uint64(int(rng.integers(0, 64)))
        rows.append(w)
    words = np.array(rows + rows[:20], dtype=np.uint64)
    labels, _ = group_duplicates(words, threshold, words_per_hash * 64)
    assert canonical(labels) == canonical(brute_force_groups(words, threshold))


def test_index_handles_thousands_of_identical_hashes():
    words = np.zeros((5000, 1), dtype=np.uint64)
    labels, (i, j, d) = group_duplicates(words, 8)
    assert len(set(labels.tolist())) == 1
    assert len(i) == 4999 and not d.any()  # a chain, not 12.5 million pairs


def test_hash_bits_are_imagehash_bits():
    im = picture(3)
    ours = hashes_to_words([hash_image(im, "phash", 8)])
    theirs = hashes_to_words([np.packbits(imagehash.phash(im).hash.ravel()).tobytes()])
    assert np.array_equal(ours, theirs)


def make_folder(tmp_path, files: dict[str, tuple[Image.Image, dict]]):
    src = tmp_path / "in"
    for name, (im, options) in files.items():
        path = src / name
        path.parent.mkdir(parents=True, exist_ok=True)
        im.save(path, **options)
    return src


def report(tmp_path, out="out"):
    return json.loads((tmp_path / out / "reports" / "dedupe-groups.json").read_text())


def test_dedupe_keeps_the_largest_copy_and_sets_aside_the_others(tmp_path):
    big = picture(1, (512, 384))
    src = make_folder(tmp_path, {
        "original.png": (big, {}),
        "thumb.png": (big.resize((128, 96)), {}),
        "recompressed.jpg": (big.resize((256, 192)), {"quality": 60}),
        "other.png": (picture(2), {}),
    })
    res = run_step("dedupe", src, tmp_path / "out")
    assert sorted(r.path for r in res.images) == ["original.png", "other.png"]
    reasons = res.reasons()
    assert reasons["thumb"].startswith("near duplicate (phash distance") and reasons["thumb"].endswith("of original")
    assert reasons["recompressed"].endswith("of original")
    (group,) = report(tmp_path)["duplicate_groups"]
    assert group["kept"] == "original" and {m["name"] for m in group["members"]} == {"thumb", "recompressed"}
    assert all(m["distance"] <= 6 and not m["exact"] for m in group["members"])


def test_dedupe_prefers_lossless_over_lossy_at_the_same_size(tmp_path):
    im = picture(4)
    src = make_folder(tmp_path, {"a_photo.jpg": (im, {"quality": 95}), "b_photo.png": (im, {})})
    res = run_step("dedupe", src, tmp_path / "out")
    assert [r.path for r in res.images] == ["b_photo.png"]
    assert res.reasons()["a_photo"].endswith("of b_photo")


def test_dedupe_breaks_ties_by_name_and_marks_exact_duplicates(tmp_path):
    im = picture(5)
    src = make_folder(tmp_path, {"zeta.png": (im, {}), "alpha.bmp": (im, {}), "mid.png": (im, {"compress_level": 0})})
    res = run_step("dedupe", src, tmp_path / "out")
    assert [r.path for r in res.images] == ["alpha.bmp"]
    assert res.reasons() == {"mid": "exact duplicate of alpha", "zeta": "exact duplicate of alpha"}
    assert all(m["exact"] and m["distance"] == 0 for m in report(tmp_path)["duplicate_groups"][0]["members"])


def test_dedupe_threshold_decides_what_is_near(tmp_path):
    base = picture(6)
    variant = base.filter(ImageFilter.GaussianBlur(3)).rotate(4)
    d = int(imagehash.phash(base) - imagehash.phash(variant))
    assert d > 0
    src = make_folder(tmp_path, {"base.png": (base, {}), "variant.png": (variant, {})})
    strict = run_step("dedupe", src, tmp_path / "strict", {"threshold": d - 1})
    loose = run_step("dedupe", src, tmp_path / "loose", {"threshold": d})
    assert len(strict.images) == 2 and len(loose.images) == 1


def test_dedupe_scope_subset_only_compares_within_a_subset(tmp_path):
    im = picture(7)
    src = make_folder(tmp_path, {"outfit1/a.png": (im, {}), "outfit2/a.png": (im, {}), "outfit1/b.png": (im, {})})
    base = {"output": None, "sources": [{"folder": {"path": str(src), "subfolders_as_subsets": True}}]}
    from lorakit.plugin_sdk.testing import run_pipeline_dict

    per_subset = run_pipeline_dict({**base, "output": str(tmp_path / "s"), "steps": [{"dedupe": {"scope": "subset"}}]}, tmp_path)
    everywhere = run_pipeline_dict({**base, "output": str(tmp_path / "a"), "steps": [{"dedupe": {"scope": "all"}}]}, tmp_path)
    assert sorted((r.subset, r.path) for r in per_subset.images) == [("outfit1", "outfit1/a.png"), ("outfit2", "outfit2/a.png")]
    assert len(everywhere.images) == 1


@pytest.mark.parametrize("method", ["dhash", "whash", "ahash"])
def test_dedupe_hash_method_is_selectable(tmp_path, method):
    im = picture(8)
    src = make_folder(tmp_path, {"a.png": (im, {}), "b.jpg": (im.resize((200, 150)), {"quality": 85}), "c.png": (picture(9), {})})
    res = run_step("dedupe", src, tmp_path / "out", {"hash": method})
    assert sorted(r.path for r in res.images) == ["a.png", "c.png"]
    assert report(tmp_path)["hash"] == method


def test_dedupe_sets_aside_unreadable_files(tmp_path):
    good = tmp_path / "good.png"
    picture(10).save(good)
    broken = tmp_path / "broken.png"
    broken.write_bytes(good.read_bytes()[:200])
    ctx = StepContext("dedupe", tmp_path / "work", tmp_path / "tmp", tmp_path / "out")
    kept = DedupeStep.configure({}).run([Item(name="good", path=good), Item(name="broken", path=broken)], ctx)
    assert [k.name for k in kept] == ["good"]
    ((item, reason),) = ctx.set_aside_items
    assert item.name == "broken" and "truncated" in reason


def dedupe_stats(res):
    (stats,) = [s for s in res.stats if s.name == "dedupe"]
    return stats


def test_dedupe_hashes_only_new_images_on_a_second_run(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for k in range(2):
        picture(20 + k).save(src / f"p{k}.png")
    first = run_step("dedupe", src, tmp_path / "out")
    assert "per-image part: 2 computed, 0 from the cache" in dedupe_stats(first).messages
    picture(22).save(src / "p2.png")
    picture(20).resize((128, 96)).save(src / "p0_small.png")
    second = run_step("dedupe", src, tmp_path / "out")
    assert "per-image part: 2 computed, 2 from the cache" in dedupe_stats(second).messages
    assert second.reasons() == {"p0_small": "near duplicate (phash distance 0) of p0"}


def test_dedupe_hash_cache_follows_content_not_file_names(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    picture(30).save(src / "a.png")
    run_step("dedupe", src, tmp_path / "out")
    (src / "a.png").rename(src / "renamed.png")
    again = run_step("dedupe", src, tmp_path / "out")
    assert "per-image part: 0 computed, 1 from the cache" in dedupe_stats(again).messages


def test_dedupe_hashes_in_the_runs_worker_pool(tmp_path, monkeypatch):
    from lorakit.executors import LocalExecutor

    pools = []
    real_submit = LocalExecutor.submit
    monkeypatch.setattr(LocalExecutor, "submit",
                        lambda self, n, plans, jobs: pools.append(n) or real_submit(self, n, plans, jobs))
    src = tmp_path / "in"
    src.mkdir()
    for k in range(24):
        picture(100 + k, (64, 48)).save(src / f"img{k:02d}.png")
    picture(100, (64, 48)).save(src / "zcopy.bmp")
    (src / "zbroken.png").write_bytes((src / "img01.png").read_bytes()[:150])
    res = run_step("dedupe", src, tmp_path / "out", workers=2)
    assert pools and set(pools) == {2}  # the host's pool, not one of the step's own
    assert len(res.images) == 24
    reasons = res.reasons()
    assert reasons.pop("zcopy") == "exact duplicate of img00"
    assert "zbroken.png" in reasons.pop("zbroken") and not reasons
    assert "per-image part: 25 computed, 0 from the cache" in dedupe_stats(res).messages  # zbroken: the source


def test_dedupe_near_copy_with_the_same_hash_is_not_called_exact(tmp_path):
    # a re-saved JPEG usually keeps the perceptual hash of its original, but not its pixels
    src = make_folder(tmp_path, {"a.png": (picture(40), {}), "a_resaved.jpg": (picture(40), {"quality": 60})})
    res = run_step("dedupe", src, tmp_path / "out")
    ((member,),) = [g["members"] for g in report(tmp_path)["duplicate_groups"]]
    assert member["name"] == "a_resaved" and member["distance"] == 0 and member["exact"] is False
    assert res.reasons() == {"a_resaved": "near duplicate (phash distance 0) of a"}


def test_dedupe_never_calls_single_colour_pictures_near_duplicates(tmp_path):
    # Every flat picture has an all-zero perceptual hash; only identical pixels make them duplicates.
    src = make_folder(tmp_path, {"red.png": (Image.new("RGB", (64, 64), "red"), {}),
                                 "blue.png": (Image.new("RGB", (64, 64), "blue"), {}),
                                 "blue_again.bmp": (Image.new("RGB", (64, 64), "blue"), {})})
    res = run_step("dedupe", src, tmp_path / "out", {"threshold": 10})
    assert sorted(r.path for r in res.images) == ["blue.png", "red.png"]
    assert res.reasons() == {"blue_again": "exact duplicate of blue"}


def brute_force_keeper_groups(words, threshold, order, complete=False):
    """The keeper rule written out over all pairs: best first, a keeper takes every ungrouped row
    within threshold of it (and, for complete, of every member taken so far)."""
    n = len(words)
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    dist = hamming(words, i.ravel(), j.ravel()).reshape(n, n)
    labels = [-1] * n
    rank = {r: k for k, r in enumerate(order)}
    group = 0
    for keeper in order:
        if labels[keeper] >= 0:
            continue
        labels[keeper] = group
        members = [keeper]
        for r in sorted((r for r in range(n) if labels[r] < 0 and dist[keeper, r] <= threshold), key=rank.get):
            if complete and any(dist[m, r] > threshold for m in members):
                continue
            labels[r] = group
            members.append(r)
        group += 1
    return labels


@pytest.mark.parametrize("complete", [False, True])
@pytest.mark.parametrize("threshold", [0, 4, 10])
def test_keeper_grouping_equals_the_rule_over_all_pairs(threshold, complete):
    rng = np.random.default_rng(threshold + 100 * complete)
    centres = rng.integers(0, 2**63, (30, 1), dtype=np.uint64)
    rows = []
    for _ in range(250):
        w = centres[rng.integers(0, len(centres))].copy()
        for _ in range(int(rng.integers(0, threshold + 6))):
            w[0] ^= np.uint64(1) << np.uint64(int(rng.integers(0, 64)))
        rows.append(w)
    words = np.array(rows + rows[:15], dtype=np.uint64)
    order = [int(k) for k in rng.permutation(len(words))]
    labels = dedupe.group_around_keepers(words, threshold, order, 64, complete=complete)
    assert canonical(labels) == canonical(brute_force_keeper_groups(words, threshold, order, complete))
    # the point of it: no member is farther than the threshold from its keeper
    for g in set(labels.tolist()):
        rows_g = [r for r in order if labels[r] == g]
        keeper = rows_g[0]
        assert all(int(hamming(words, np.array([keeper]), np.array([r]))[0]) <= threshold for r in rows_g)


def test_a_chain_of_near_pictures_is_not_one_group_by_default(tmp_path):
    # hashes A ~ B ~ C with A and C far apart: transitive grouping keeps one, the keeper rule two
    a = np.uint64(0)
    b = a ^ np.uint64(0b111111)                   # 6 bits from A
    c = b ^ np.uint64(0b111111 << 20)             # 6 bits from B, 12 from A
    words = np.array([[a], [b], [c]], dtype=np.uint64)
    single, _ = group_duplicates(words, 6)
    assert len(set(single.tolist())) == 1
    keeper = dedupe.group_around_keepers(words, 6, [0, 1, 2])
    assert canonical(keeper) == [0, 0, 1]


def test_dedupe_linkage_option_reaches_the_report(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    picture(1).save(src / "a.png")
    picture(1).resize((200, 150)).save(src / "a_small.png")
    res = run_step("dedupe", src, tmp_path / "out", {"linkage": "single"})
    report = json.loads((tmp_path / "out" / "reports" / "dedupe-groups.json").read_text())
    assert report["linkage"] == "single" and report["set_aside"] == 1
    assert [r.path for r in res.images] == ["a.png"]


def test_flatness_is_judged_on_colour_not_only_on_the_grey_thumbnail():
    # red and green halves of the same grey value: the hash's grey thumbnail is uniform, the picture is not
    im = Image.new("RGB", (64, 64), (200, 0, 0))
    im.paste(Image.new("RGB", (32, 64), (0, 102, 0)), (32, 0))
    assert dedupe.describe(im, "phash", 8)["flat"] is False
    assert dedupe.describe(Image.new("RGB", (64, 64), (10, 200, 30)), "phash", 8)["flat"] is True
    assert dedupe.describe(picture(5), "phash", 8) == {"hash": hash_image(picture(5), "phash", 8).hex(), "flat": False}


def with_metadata(jpeg_bytes: bytes) -> bytes:
    """The same JPEG with an EXIF segment and a comment spliced in after the start marker."""
    exif = b"Exif\x00\x00" + b"camera: none"
    app1 = b"\xff\xe1" + (len(exif) + 2).to_bytes(2, "big") + exif
    com = b"\xff\xfe" + (2 + 5).to_bytes(2, "big") + b"hello"
    return jpeg_bytes[:2] + app1 + com + jpeg_bytes[2:]


def test_a_jpeg_that_differs_only_in_metadata_is_an_exact_duplicate(tmp_path):
    src = make_folder(tmp_path, {"a.jpg": (picture(50), {"quality": 90})})
    (src / "a_tagged.jpg").write_bytes(with_metadata((src / "a.jpg").read_bytes()))
    picture(50).save(src / "a_other_quality.jpg", quality=70)
    res = run_step("dedupe", src, tmp_path / "out")
    reasons = res.reasons()
    assert reasons.pop("a_tagged") == "exact duplicate of a"
    assert reasons.pop("a_other_quality").startswith("near duplicate (phash distance")
    assert not reasons


def test_open_image_decodes_a_jpeg_at_reduced_scale_when_asked(tmp_path):
    from lorakit.plugin_sdk import open_image

    picture(60, (400, 320)).save(tmp_path / "a.jpg", quality=90)
    picture(60, (400, 320)).save(tmp_path / "a.png")
    small = open_image(tmp_path / "a.jpg", reduce_to=(32, 32))
    assert small.info["full_size"] == (400, 320) and small.size == (50, 40)  # 1/8 scale keeps both sides >= 32
    assert open_image(tmp_path / "a.jpg").size == (400, 320)
    assert open_image(tmp_path / "a.png", reduce_to=(32, 32)).size == (400, 320)


def test_reduced_jpeg_decoding_keeps_the_hash_close_and_the_size_whole(tmp_path):
    picture(61, (640, 480)).save(tmp_path / "a.jpg", quality=90)
    info = dedupe.hash_file(str(tmp_path / "a.jpg"), "phash", 8)
    whole = hash_image(Image.open(tmp_path / "a.jpg"), "phash", 8)
    distance = int(hamming(hashes_to_words([bytes.fromhex(info["hash"]), whole]), np.array([0]), np.array([1]))[0])
    assert distance <= 4 and (info["width"], info["height"]) == (640, 480)
