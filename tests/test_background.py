"""background: the transparent-background --type white blend, with the image's mask."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lorakit.plugin_sdk import Item, ParamError, SkipImage, StepContext
from lorakit.plugin_sdk.testing import run_pipeline_dict
from lorakit.plugins.background import BackgroundStep


def ctx(tmp_path):
    return StepContext("background", tmp_path / "w", tmp_path / "t", tmp_path / "out")


def busy_picture(seed=0, size=(48, 40)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def soft_mask(size=(48, 40)) -> np.ndarray:
    """A subject in the middle with a soft (grey) edge: 255 inside, 0 outside, a ramp between."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    d = np.hypot(xx - w / 2, yy - h / 2)
    return np.clip((14 - d) / 4 * 255, 0, 255).astype(np.uint8)


def item_with_mask(tmp_path, rgb, mask, mode="RGB") -> Item:
    Image.fromarray(rgb, mode).save(tmp_path / "a.png")
    Image.fromarray(mask, "L").save(tmp_path / "a_mask.png")
    return Item(name="a", path=tmp_path / "a.png", mask=tmp_path / "a_mask.png")


def transparent_background_blend(rgb: np.ndarray, mask: np.ndarray, colour) -> np.ndarray:
    """transparent-background's --type white / [r,g,b] arithmetic, written out independently."""
    pred = mask.astype(np.float64) / 255.0
    bg = np.stack([np.ones_like(pred)] * 3, axis=-1) * list(colour)
    return (rgb * pred[..., np.newaxis] + bg * (1 - pred[..., np.newaxis])).astype(np.uint8)


@pytest.mark.parametrize("colour, given", [((255, 255, 255), "white"), ((255, 0, 0), "#ff0000"),
                                           ((10, 200, 30), "rgb(10,200,30)")])
def test_blend_equals_transparent_background_type_white_or_rgb(tmp_path, colour, given):
    rgb, mask = busy_picture(), soft_mask()
    step = BackgroundStep.configure({"color": given})
    out = step.process(item_with_mask(tmp_path, rgb, mask), ctx(tmp_path))
    got = np.asarray(out.pending_image)
    np.testing.assert_array_equal(got, transparent_background_blend(rgb, mask, colour))
    assert (got[0, 0] == colour).all() and (got[20, 24] == rgb[20, 24]).all()
    assert out.mask == tmp_path / "a_mask.png"  # kept for masked loss
    assert out.meta["background"]["mask"] == "mask"
    assert out.meta["background"]["replaced"] == pytest.approx(1 - mask.mean() / 255, abs=1e-3)


def test_threshold_makes_the_mask_hard(tmp_path):
    rgb, mask = busy_picture(), soft_mask()
    out = BackgroundStep.configure({"threshold": 0.5}).process(item_with_mask(tmp_path, rgb, mask), ctx(tmp_path))
    got = np.asarray(out.pending_image)
    inside = mask > 127
    np.testing.assert_array_equal(got[inside], rgb[inside])
    assert (got[~inside] == 255).all()


def test_blur_keeps_the_subject_and_blurs_the_rest(tmp_path):
    rgb, mask = busy_picture(), soft_mask()
    out = BackgroundStep.configure({"blur": 6}).process(item_with_mask(tmp_path, rgb, mask), ctx(tmp_path))
    got = np.asarray(out.pending_image).astype(float)
    assert (got[20, 24] == rgb[20, 24]).all()
    corner = got[:8, :8]
    assert corner.std() < rgb[:8, :8].astype(float).std() / 3  # noise smoothed away


def test_without_a_mask_the_transparency_is_the_mask(tmp_path):
    rgba = np.dstack([busy_picture(), soft_mask()])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    out = BackgroundStep.configure({}).process(Item("t", tmp_path / "t.png"), ctx(tmp_path))
    assert out.pending_image.mode == "RGB" and out.meta["background"]["mask"] == "alpha"
    np.testing.assert_array_equal(np.asarray(out.pending_image),
                                  transparent_background_blend(rgba[..., :3], rgba[..., 3], (255, 255, 255)))


def test_an_image_without_mask_or_transparency_passes_or_is_set_aside(tmp_path):
    Image.fromarray(busy_picture()).save(tmp_path / "p.png")
    item = Item("p", tmp_path / "p.png")
    assert BackgroundStep.configure({}).process(item, ctx(tmp_path)) is item
    with pytest.raises(SkipImage, match="no mask"):
        BackgroundStep.configure({"missing_mask": "set_aside"}).process(item, ctx(tmp_path))


def test_a_mask_of_another_size_is_set_aside_with_both_sizes(tmp_path):
    item = item_with_mask(tmp_path, busy_picture(), soft_mask((30, 30)))
    with pytest.raises(SkipImage, match="mask is 30x30 but the image is 48x40"):
        BackgroundStep.configure({}).process(item, ctx(tmp_path))


def test_drop_mask_removes_the_mask(tmp_path):
    out = BackgroundStep.configure({"drop_mask": True}).process(
        item_with_mask(tmp_path, busy_picture(), soft_mask()), ctx(tmp_path))
    assert out.mask is None


def test_bad_colour_is_refused_before_any_work():
    with pytest.raises(ParamError, match="color"):
        BackgroundStep.configure({"color": "not-a-colour"})


def test_after_the_mask_step_in_a_pipeline(tmp_path):
    """mask (flood fill of a flat backdrop) then background: the backdrop becomes white, the subject stays."""
    src = tmp_path / "in"
    src.mkdir()
    picture = np.full((64, 64, 3), (40, 120, 200), dtype=np.uint8)  # a blue studio backdrop
    picture[16:48, 20:44] = busy_picture(3, size=(24, 32))          # the subject
    Image.fromarray(picture).save(src / "subject.png")
    res = run_pipeline_dict({
        "output": str(tmp_path / "out"),
        "sources": [{"folder": {"path": str(src)}}],
        "steps": [{"mask": {"backend": "color", "fuzz": "5%", "min_foreground": "1%"}},
                  {"background": {"color": "white"}}],
    }, tmp_path, workers=1)
    record = res.by_name("subject")
    got = np.asarray(res.open(record).convert("RGB"))
    assert (got[:8, :8] == 255).all() and (got[60:, 60:] == 255).all()
    np.testing.assert_array_equal(got[16:48, 20:44], picture[16:48, 20:44])
    assert record.mask and record.meta["background"]["fill"] == "#ffffff"
