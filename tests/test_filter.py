"""filter: size, aspect-ratio and monochrome limits, each image set aside with its reason."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lorakit.plugin_sdk import ParamError
from lorakit.plugin_sdk.testing import run_step
from lorakit.plugins.filter import FilterStep, monochrome_stats


def folder(tmp_path, sizes: dict[str, tuple[int, int]]):
    src = tmp_path / "in"
    src.mkdir()
    for name, size in sizes.items():
        Image.new("RGB", size, "orange").save(src / f"{name}.png")
    return src


def kept(res):
    return sorted(r.path.rsplit(".", 1)[0] for r in res.images)


def test_filter_min_side_sets_aside_small_images(tmp_path):
    src = folder(tmp_path, {"big": (600, 520), "thin": (900, 300)})
    res = run_step("filter", src, tmp_path / "out", {"min_side": 512})
    assert kept(res) == ["big"]
    assert res.reasons()["thin"] == "too small: 900x300, shortest side 300 < min_side 512"


def test_filter_min_pixels_counts_width_times_height(tmp_path):
    src = folder(tmp_path, {"enough": (512, 512), "short": (511, 512)})
    res = run_step("filter", src, tmp_path / "out", {"min_pixels": 262144})
    assert kept(res) == ["enough"]
    assert "261632 pixels < min_pixels 262144" in res.reasons()["short"]


def test_filter_aspect_limits_drop_too_wide_and_too_tall(tmp_path):
    src = folder(tmp_path, {"square": (100, 100), "banner": (400, 100), "strip": (100, 400), "ok_wide": (200, 100)})
    res = run_step("filter", src, tmp_path / "out", {"min_aspect": 0.5, "max_aspect": 2.0})
    assert kept(res) == ["ok_wide", "square"]
    assert res.reasons()["banner"].startswith("too wide: 400x100")
    assert res.reasons()["strip"].startswith("too tall: 100x400")


def test_filter_with_no_limits_passes_every_file_untouched(tmp_path):
    src = folder(tmp_path, {"a": (10, 10), "b": (30, 5)})
    res = run_step("filter", src, tmp_path / "out")
    assert kept(res) == ["a", "b"]
    assert res.path(res.by_name("b")).read_bytes() == (src / "b.png").read_bytes()


def manga_page(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    grey = (rng.random((120, 90)) * 255).astype(np.uint8)
    return Image.fromarray(grey, "L").convert("RGB")


def test_monochrome_detects_grey_tinted_and_colour_images(tmp_path):
    grey = manga_page(0)
    grey.save(tmp_path / "page.jpg", quality=70)  # JPEG adds a little colour noise
    assert monochrome_stats(Image.open(tmp_path / "page.jpg"), 12)[0]
    sepia = np.asarray(manga_page(1), dtype=float) * np.array([1.0, 0.85, 0.62])
    assert monochrome_stats(Image.fromarray(sepia.astype(np.uint8)), 12)[0]
    colour = Image.fromarray(np.random.default_rng(2).integers(0, 256, (80, 80, 3)).astype(np.uint8))
    assert not monochrome_stats(colour, 12)[0]
    red_apple_on_grey = np.asarray(manga_page(3)).copy()
    red_apple_on_grey[30:70, 20:60] = (220, 30, 30)
    assert not monochrome_stats(Image.fromarray(red_apple_on_grey), 12)[0]


def test_filter_monochrome_drop_and_only(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    manga_page(0).save(src / "manga.png")
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (60, 60, 3)).astype(np.uint8)).save(src / "colour.png")
    dropped = run_step("filter", src, tmp_path / "out1", {"monochrome": "drop"})
    assert kept(dropped) == ["colour"] and dropped.reasons()["manga"].startswith("monochrome: greyscale")
    only = run_step("filter", src, tmp_path / "out2", {"monochrome": "only"})
    assert kept(only) == ["manga"] and only.reasons()["colour"].startswith("not monochrome")


def test_filter_refuses_min_aspect_above_max_aspect():
    with pytest.raises(ParamError, match="min_aspect"):
        FilterStep.configure({"min_aspect": 3, "max_aspect": 2})
    with pytest.raises(ParamError, match="monochrome"):
        FilterStep.configure({"monochrome": "sometimes"})


def smooth_field(rng, size=(160, 120)) -> np.ndarray:
    """A smooth random field in 0..1, like the slow variations of a photograph."""
    coarse = Image.fromarray((rng.random((size[1] // 8 + 1, size[0] // 8 + 1)) * 255).astype(np.uint8))
    return np.asarray(coarse.resize(size, Image.BICUBIC), dtype=float) / 255


def warm_photo(seed: int) -> Image.Image:
    """A warm-toned photo (a ginger cat, a cup of coffee): every pixel orange-brown, hue within 20
    degrees, but saturation varying independently of lightness, as real surfaces do."""
    rng = np.random.default_rng(seed)
    hue = (20 + 20 * smooth_field(rng)) / 360 * 255
    saturation = (0.25 + 0.65 * smooth_field(rng)) * 255
    value = (0.3 + 0.7 * smooth_field(rng)) * 255
    return Image.fromarray(np.dstack([hue, saturation, value]).astype(np.uint8), "HSV").convert("RGB")


def toned(im: Image.Image, tint) -> Image.Image:
    """The picture printed in one tint: its grey levels times an RGB tint (sepia, cyanotype)."""
    grey = np.asarray(im.convert("L"), dtype=float)[..., None]
    return Image.fromarray((grey * np.array(tint)).astype(np.uint8))


def test_warm_toned_photos_are_colour_not_single_tint(tmp_path):
    for seed in range(3):
        photo = warm_photo(seed)
        photo.save(tmp_path / f"warm{seed}.jpg", quality=85)
        for im in (photo, Image.open(tmp_path / f"warm{seed}.jpg")):
            mono, why = monochrome_stats(im, 12)
            assert not mono, why
            assert "share one hue" in why and "colour spread" in why


def test_the_same_photo_printed_sepia_or_cyanotype_is_monochrome(tmp_path):
    for seed, tint in ((0, (1.0, 0.85, 0.62)), (1, (0.45, 0.7, 1.0)), (2, (1.0, 0.92, 0.78))):
        print_ = toned(warm_photo(seed), tint)
        print_.save(tmp_path / "print.jpg", quality=70)
        for im in (print_, Image.open(tmp_path / "print.jpg")):
            mono, why = monochrome_stats(im, 12)
            assert mono and why.startswith("single tint"), why


def test_filter_keeps_a_warm_photo_when_dropping_monochrome(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    warm_photo(7).save(src / "cat.png")
    toned(warm_photo(7), (1.0, 0.85, 0.62)).save(src / "sepia.png")
    res = run_step("filter", src, tmp_path / "out", {"monochrome": "drop"})
    assert kept(res) == ["cat"] and res.reasons()["sepia"].startswith("monochrome: single tint")
