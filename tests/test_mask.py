"""The mask maker: three backends on real images, the quality check, and the InSPyReNet path with a
randomly initialised network saved as a checkpoint by the test (no download)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from lorakit.plugin_sdk import LorakitError, ModelNotFound
from lorakit.plugin_sdk.testing import run_step
from lorakit.plugins.mask import border_colour, colour_mask, mask_problem, tb_checkpoint


def subject_on_background(path, size=(120, 100), background="white", subject="red", hole=True):
    """A filled ellipse on a flat background; optionally a background-coloured hole inside it."""
    im = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(im)
    w, h = size
    draw.ellipse((w * 0.2, h * 0.15, w * 0.8, h * 0.85), fill=subject)
    if hole:
        draw.rectangle((w * 0.45, h * 0.45, w * 0.55, h * 0.55), fill=background)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


def cutout(path, size=(100, 80), alpha_inside=255, alpha_outside=0):
    """An RGBA picture: opaque (or ``alpha_inside``) rectangle, transparent around it."""
    alpha = Image.new("L", size, alpha_outside)
    ImageDraw.Draw(alpha).rectangle((20, 15, 79, 64), fill=alpha_inside)
    im = Image.new("RGBA", size, (0, 120, 255, 255))
    im.putalpha(alpha)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


def mask_of(res, name):
    rec = res.by_name(name)
    assert rec.mask is not None, f"{name} has no mask: {rec.meta.get('mask_rejected')}"
    return np.asarray(Image.open(res.path(rec.mask)))


# ----- colour flood fill ------------------------------------------------------------------
def test_colour_backend_masks_out_the_flat_background(tmp_path):
    subject_on_background(tmp_path / "in" / "a.png")
    res = run_step("mask", tmp_path / "in", tmp_path / "out", {"backend": "color"})
    mask = mask_of(res, "a")
    assert mask.shape == (100, 120)
    assert mask[0, 0] == 0 and mask[99, 119] == 0  # background corners ignored
    assert mask[30, 60] == 255  # the subject is trained
    assert res.by_name("a").mask.startswith("masks/")


def test_colour_backend_keeps_background_coloured_holes_inside_the_subject(tmp_path):
    subject_on_background(tmp_path / "in" / "a.png", hole=True)
    res = run_step("mask", tmp_path / "in", tmp_path / "out", {"backend": "color"})
    assert mask_of(res, "a")[50, 60] == 255  # white hole in the middle is enclosed, so trained


def test_background_colour_is_guessed_from_the_border():
    arr = np.zeros((20, 30, 3), np.uint8)
    arr[:, :] = (10, 200, 30)
    arr[5:15, 5:25] = (255, 0, 0)
    assert border_colour(arr) == (10, 200, 30)


def test_fuzz_decides_how_far_from_the_background_colour_counts_as_background():
    arr = np.full((10, 40, 3), 255, np.uint8)
    arr[:, 20:] = 235  # a slightly grey right half, touching the border
    tight = colour_mask(arr, (255, 255, 255), 0.01)
    loose = colour_mask(arr, (255, 255, 255), 0.10)
    assert tight[:, 20:].min() == 255 and loose.max() == 0


def test_explicit_background_colour_overrides_the_guess(tmp_path):
    subject_on_background(tmp_path / "in" / "a.png", background="white", subject="black", hole=False)
    res = run_step("mask", tmp_path / "in", tmp_path / "out",
                   {"backend": "color", "background": "black", "max_foreground": "100%"})
    mask = mask_of(res, "a")
    assert mask[0, 0] == 255 and mask[50, 60] == 255  # black is not connected to the border: all trained


# ----- alpha ------------------------------------------------------------------------------
def test_alpha_backend_uses_the_transparency_as_the_mask(tmp_path):
    cutout(tmp_path / "in" / "a.png")
    res = run_step("mask", tmp_path / "in", tmp_path / "out", {"backend": "alpha"})
    mask = mask_of(res, "a")
    assert mask[0, 0] == 0 and mask[40, 50] == 255
    assert res.open(res.by_name("a")).mode == "RGBA"  # the image itself is not changed by this step


def test_alpha_backend_leaves_images_without_transparency_unmasked_with_a_reason(tmp_path):
    subject_on_background(tmp_path / "in" / "opaque.png")
    res = run_step("mask", tmp_path / "in", tmp_path / "out", {"backend": "alpha"})
    rec = res.by_name("opaque")
    assert rec.mask is None and not res.set_aside
    assert "no alpha channel" in rec.meta["mask_rejected"]


# ----- quality check ----------------------------------------------------------------------
def test_quality_check_names_each_kind_of_bad_mask():
    black = np.zeros((50, 50), np.uint8)
    white = np.full((50, 50), 255, np.uint8)
    grey = np.full((50, 50), 128, np.uint8)
    good = black.copy()
    good[10:40, 10:40] = 255
    assert "nearly all black" in mask_problem(black, 0.05, 0.98, 0.15)
    assert "nearly all white" in mask_problem(white, 0.05, 0.98, 0.15)
    assert "grey" in mask_problem(grey, 0.05, 1.0, 0.15)
    assert mask_problem(good, 0.05, 0.98, 0.15) is None


def test_nearly_black_mask_is_rejected_and_the_image_kept_without_it(tmp_path):
    cutout(tmp_path / "in" / "empty.png", alpha_inside=0)  # fully transparent: nothing to train
    cutout(tmp_path / "in" / "good.png")
    res = run_step("mask", tmp_path / "in", tmp_path / "out", {"backend": "alpha"})
    empty = res.by_name("empty")
    assert empty.mask is None and "nearly all black" in empty.meta["mask_rejected"]
    assert res.by_name("good").mask is not None and "mask_rejected" not in res.by_name("good").meta
    assert any("empty" in m for s in res.stats if s.name == "mask" for m in s.messages)


def test_grey_see_through_mask_is_rejected(tmp_path):
    cutout(tmp_path / "in" / "ghost.png", alpha_inside=128)
    res = run_step("mask", tmp_path / "in", tmp_path / "out", {"backend": "alpha"})
    assert "grey" in res.by_name("ghost").meta["mask_rejected"]


def test_flat_image_without_background_is_rejected_as_nearly_all_white(tmp_path):
    (tmp_path / "in").mkdir()
    noise = np.random.default_rng(0).integers(0, 256, (60, 60, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "in" / "noise.png")
    res = run_step("mask", tmp_path / "in", tmp_path / "out", {"backend": "color", "fuzz": "1%"})
    assert "nearly all white" in res.by_name("noise").meta["mask_rejected"]


def test_rejected_images_move_to_the_rejected_subset(tmp_path):
    cutout(tmp_path / "in" / "outfit1" / "empty.png", alpha_inside=0)
    cutout(tmp_path / "in" / "outfit1" / "good.png")
    res = run_step("mask", tmp_path / "in", tmp_path / "out",
                   {"backend": "alpha", "rejected_subset": "{subset}_nomask"})
    subsets = {r.path.split("/")[-1].split(".")[0]: r.subset for r in res.images}
    assert subsets["good"] != subsets["empty"]
    assert subsets["empty"] == subsets["good"] + "_nomask"
    assert all(r.mask for r in res.images if r.subset == subsets["good"])


def test_threshold_makes_hard_masks(tmp_path):
    alpha = np.tile(np.linspace(0, 255, 100, dtype=np.uint8), (80, 1))
    alpha[:, :20] = 0
    alpha[:, 80:] = 255
    im = Image.new("RGBA", (100, 80), "blue")
    im.putalpha(Image.fromarray(alpha, "L"))
    (tmp_path / "in").mkdir()
    im.save(tmp_path / "in" / "ramp.png")
    res = run_step("mask", tmp_path / "in", tmp_path / "out",
                   {"backend": "alpha", "threshold": 0.5, "max_grey": "100%"})
    assert set(np.unique(mask_of(res, "ramp"))) == {0, 255}


# ----- transparent-background -------------------------------------------------------------
@pytest.fixture(scope="module")
def random_inspyrenet(tmp_path_factory):
    """A randomly initialised InSPyReNet (Swin-B) saved the way transparent-background's checkpoints are."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transparent_background.InSPyReNet import InSPyReNet_SwinB

        torch.manual_seed(1)
        net = InSPyReNet_SwinB(depth=64, pretrained=False, base_size=[384, 384], threshold=None)
    path = tmp_path_factory.mktemp("tb") / "ckpt_fast.pth"
    torch.save(net.state_dict(), path)
    return path


def test_transparent_background_network_makes_a_mask_of_the_image_size(tmp_path, random_inspyrenet):
    subject_on_background(tmp_path / "in" / "a.png", size=(90, 70))
    res = run_step("mask", tmp_path / "in", tmp_path / "out",
                   {"model": str(random_inspyrenet), "mode": "fast", "device": "cpu",
                    "min_foreground": "0%", "max_foreground": "100%", "max_grey": "100%"})
    rec = res.by_name("a")
    mask = Image.open(res.path(rec.mask))
    assert mask.mode == "L" and mask.size == (90, 70)
    assert rec.meta["mask"]["backend"] == "transparent-background"
    assert any("transparent-background fast" in m for s in res.stats for m in s.messages)


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch.meshgrid inside the package's Swin backbone
def test_saliency_map_equals_what_transparent_backgrounds_remover_makes(tmp_path, monkeypatch, random_inspyrenet):
    import sys

    from lorakit.plugins.mask import SalientObjectMasker

    monkeypatch.setenv("TRANSPARENT_BACKGROUND_FILE_PATH", str(tmp_path))  # the Remover writes its config there
    monkeypatch.setitem(sys.modules, "pymatting", None)  # only used for rgba output; slow to import
    from transparent_background import Remover

    image = Image.open(subject_on_background(tmp_path / "a.png", size=(150, 100)))
    theirs = np.asarray(Remover(mode="fast", ckpt=str(random_inspyrenet), device="cpu").process(image, type="map"))
    ours = SalientObjectMasker(random_inspyrenet, "fast", "cpu")(image)
    assert ours.shape == theirs.shape[:2] and ours.std() > 1
    assert np.abs(ours.astype(int) - theirs[:, :, 0].astype(int)).max() <= 1  # they truncate, we round


def test_transparent_background_checkpoint_is_found_in_its_usual_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSPARENT_BACKGROUND_FILE_PATH", str(tmp_path))
    (tmp_path / ".transparent-background").mkdir()
    (tmp_path / ".transparent-background" / "ckpt_base.pth").write_bytes(b"x")
    assert tb_checkpoint("base") == tmp_path / ".transparent-background" / "ckpt_base.pth"


def test_missing_transparent_background_checkpoint_says_what_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSPARENT_BACKGROUND_FILE_PATH", str(tmp_path))
    subject_on_background(tmp_path / "in" / "a.png")
    with pytest.raises(ModelNotFound, match=r"ckpt_fast\.pth.*https://"):
        run_step("mask", tmp_path / "in", tmp_path / "out", {"mode": "fast"})


def test_checkpoint_that_is_not_inspyrenet_is_a_clear_error(tmp_path):
    bad = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(2, 2)}, bad)
    subject_on_background(tmp_path / "in" / "a.png")
    with pytest.raises(LorakitError, match="InSPyReNet"):
        run_step("mask", tmp_path / "in", tmp_path / "out", {"model": str(bad), "mode": "fast", "device": "cpu"})
