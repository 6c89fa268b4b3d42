"""The ESRGAN upscaler: real model loading (spandrel), tiled inference and the resize policy.

Models are tiny ESRGAN networks with random weights, saved by the tests in the two layouts real
files use: the old ESRGAN keys (``model.0.weight``...) as .safetensors, and Real-ESRGAN's keys
(``conv_first``/``body.N.rdbK``/``conv_up1``..., wrapped in ``params_ema``) as a .pth.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from lorakit.plugin_sdk import LorakitError, ModelNotFound, ParamError
from lorakit.plugin_sdk.testing import run_step
from lorakit.plugins.upscale import UpscaleStep, load_upscaler, needed_size, run_tiled, tile_windows


def realesrgan_state(scale: int = 4, nf: int = 8, blocks: int = 1, gc: int = 32, seed: int = 0) -> dict:
    """Random tensors with the names and shapes of a Real-ESRGAN RRDBNet (as in RealESRGAN_x4plus.pth)."""
    g = torch.Generator().manual_seed(seed)

    def conv(out_c, in_c):
        std = 1.0 / math.sqrt(in_c * 9)
        return torch.randn(out_c, in_c, 3, 3, generator=g) * std, torch.randn(out_c, generator=g) * 0.05

    state = {}

    def put(name, out_c, in_c):
        state[f"{name}.weight"], state[f"{name}.bias"] = conv(out_c, in_c)

    put("conv_first", nf, 3)
    for b in range(blocks):
        for k in (1, 2, 3):
            for j in range(1, 6):
                put(f"body.{b}.rdb{k}.conv{j}", gc if j < 5 else nf, nf + (j - 1) * gc)
    put("conv_body", nf, nf)
    for u in range(int(math.log2(scale))):
        put(f"conv_up{u + 1}", nf, nf)
    put("conv_hr", nf, nf)
    put("conv_last", 3, nf)
    state["conv_last.bias"] = torch.full((3,), 0.5)  # centre the output so it is not clamped flat
    return state


def old_esrgan_state(scale: int = 2, seed: int = 1) -> dict:
    """The same network under the original ESRGAN key names, via spandrel's own key conversion."""
    from spandrel import ModelLoader

    return ModelLoader().load_from_state_dict(realesrgan_state(scale=scale, seed=seed)).model.state_dict()


@pytest.fixture
def x2_safetensors(tmp_path):
    path = tmp_path / "models" / "2x_tiny.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in old_esrgan_state(scale=2).items()}, str(path))
    return path


@pytest.fixture
def x4_pth(tmp_path):
    path = tmp_path / "models" / "RealESRGAN_x4_tiny.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"params_ema": realesrgan_state(scale=4)}, path)
    return path


@pytest.fixture
def x1_pth(tmp_path):
    path = tmp_path / "models" / "1x_filter_tiny.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"params_ema": realesrgan_state(scale=1, seed=3)}, path)
    return path


def noise_image(path, size, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr[:, :, 0] if channels == 1 else arr, mode).save(path)
    return path


# ----- tiling -----------------------------------------------------------------------------
def test_tile_windows_cover_each_axis_without_gaps_and_share_one_size():
    for length in range(1, 300, 7):
        for tile, overlap in ((64, 16), (48, 8), (40, 0)):
            windows = tile_windows(length, tile, overlap)
            covered = np.zeros(length, dtype=int)
            for start, end, keep_start, keep_end in windows:
                assert end - start == min(tile, length)
                assert start <= keep_start < keep_end <= end
                covered[keep_start:keep_end] = 1
            assert covered.all()
            assert windows[0][2] == 0 and windows[-1][3] == length


def test_tiled_inference_equals_one_pass_within_tolerance(x2_safetensors):
    model = load_upscaler(x2_safetensors)
    x = torch.rand(1, 3, 90, 130, generator=torch.Generator().manual_seed(0))
    whole = run_tiled(model, x, tile=0)
    tiled = run_tiled(model, x, tile=64, overlap=24, batch=3)
    assert whole.shape == (1, 3, 180, 260)
    assert whole.std() > 0.01  # the tiny model's output is not flat: the comparison means something
    assert torch.allclose(tiled, whole, atol=1e-4)


def test_tiles_without_overlap_show_seams(x2_safetensors):
    model = load_upscaler(x2_safetensors)
    x = torch.rand(1, 3, 90, 130, generator=torch.Generator().manual_seed(0))
    whole = run_tiled(model, x, tile=0)
    seamed = run_tiled(model, x, tile=32, overlap=0)
    assert (seamed - whole).abs().max() > 1e-3


def test_needed_size_keeps_aspect_ratio_and_reaches_the_pixel_count():
    for w, h in ((100, 80), (33, 257), (511, 511), (7, 3)):
        tw, th = needed_size(w, h, 512 * 512)
        assert tw * th >= 512 * 512
        assert abs(tw / th - w / h) < 0.02 * (w / h) + 1 / th
    assert needed_size(800, 600, 512 * 512) == (800, 600)


# ----- the step on real files --------------------------------------------------------------
def test_small_image_is_upscaled_then_resized_to_resolution_squared(tmp_path, x2_safetensors):
    noise_image(tmp_path / "in" / "small.png", (100, 80))
    res = run_step("upscale", tmp_path / "in", tmp_path / "out", {"model": str(x2_safetensors)}, resolution=128)
    rec = res.by_name("small")
    assert (rec.width, rec.height) == needed_size(100, 80, 128 * 128)
    assert rec.width * rec.height >= 128 * 128
    assert rec.meta["upscale"]["scale"] == 2 and rec.meta["upscale"]["passes"] == 1
    assert res.open(rec).size == (rec.width, rec.height)


def test_image_with_enough_pixels_is_left_untouched(tmp_path, x2_safetensors):
    src = noise_image(tmp_path / "in" / "big.png", (140, 120))
    res = run_step("upscale", tmp_path / "in", tmp_path / "out", {"model": str(x2_safetensors)}, resolution=128)
    rec = res.by_name("big")
    assert (rec.width, rec.height) == (140, 120)
    assert "upscale" not in rec.meta
    assert np.array_equal(np.asarray(res.open(rec)), np.asarray(Image.open(src)))


def test_apply_to_all_upscales_big_images_and_keeps_their_size(tmp_path, x2_safetensors):
    src = noise_image(tmp_path / "in" / "big.png", (140, 120))
    res = run_step("upscale", tmp_path / "in", tmp_path / "out",
                   {"model": str(x2_safetensors), "apply_to": "all"}, resolution=64)
    rec = res.by_name("big")
    assert (rec.width, rec.height) == (140, 120)
    assert rec.meta["upscale"]["passes"] == 1
    assert not np.array_equal(np.asarray(res.open(rec)), np.asarray(Image.open(src)))


def test_without_downscale_the_full_model_scale_is_kept(tmp_path, x2_safetensors):
    noise_image(tmp_path / "in" / "small.png", (60, 40))
    res = run_step("upscale", tmp_path / "in", tmp_path / "out",
                   {"model": str(x2_safetensors), "downscale": False}, resolution=64)
    assert (res.by_name("small").width, res.by_name("small").height) == (120, 80)


def test_too_small_for_one_pass_gets_a_second_pass(tmp_path, x2_safetensors):
    noise_image(tmp_path / "in" / "tiny.png", (20, 20))
    res = run_step("upscale", tmp_path / "in", tmp_path / "out", {"model": str(x2_safetensors)}, resolution=64)
    rec = res.by_name("tiny")
    assert rec.meta["upscale"]["passes"] == 2
    assert (rec.width, rec.height) == (64, 64)


def test_max_passes_limits_the_number_of_model_runs(tmp_path, x2_safetensors):
    noise_image(tmp_path / "in" / "tiny.png", (20, 20))
    res = run_step("upscale", tmp_path / "in", tmp_path / "out",
                   {"model": str(x2_safetensors), "max_passes": 1}, resolution=64)
    rec = res.by_name("tiny")
    assert rec.meta["upscale"]["passes"] == 1 and (rec.width, rec.height) == (40, 40)


def test_realesrgan_pth_loads_through_weights_only_and_upscales_4x(tmp_path, x4_pth):
    noise_image(tmp_path / "in" / "a.png", (30, 20))
    res = run_step("upscale", tmp_path / "in", tmp_path / "out",
                   {"model": str(x4_pth), "downscale": False}, resolution=64)
    rec = res.by_name("a")
    assert (rec.width, rec.height) == (120, 80)
    assert rec.meta["upscale"]["scale"] == 4 and rec.meta["upscale"]["passes"] == 1


def test_one_x_filter_model_is_applied_to_every_image_at_the_same_size(tmp_path, x1_pth):
    src = noise_image(tmp_path / "in" / "big.png", (300, 200))
    res = run_step("upscale", tmp_path / "in", tmp_path / "out", {"model": str(x1_pth)}, resolution=64)
    rec = res.by_name("big")
    assert (rec.width, rec.height) == (300, 200)
    assert rec.meta["upscale"]["scale"] == 1
    assert not np.array_equal(np.asarray(res.open(rec)), np.asarray(Image.open(src)))


def test_transparency_and_grey_mode_are_kept(tmp_path, x2_safetensors):
    noise_image(tmp_path / "in" / "rgba.png", (40, 30), mode="RGBA")
    noise_image(tmp_path / "in" / "grey.png", (40, 30), mode="L")
    res = run_step("upscale", tmp_path / "in", tmp_path / "out",
                   {"model": str(x2_safetensors), "downscale": False}, resolution=64)
    rgba, grey = res.open(res.by_name("rgba")), res.open(res.by_name("grey"))
    assert rgba.mode == "RGBA" and rgba.size == (80, 60)
    assert np.asarray(rgba.getchannel("A")).std() > 10  # the source's random alpha, resized, not flattened
    assert grey.mode == "L" and grey.size == (80, 60)


# ----- errors -----------------------------------------------------------------------------
def test_missing_model_file_stops_the_run_naming_the_file(tmp_path):
    noise_image(tmp_path / "in" / "a.png", (20, 20))
    with pytest.raises(ModelNotFound, match="nothere.pth"):
        run_step("upscale", tmp_path / "in", tmp_path / "out", {"model": str(tmp_path / "nothere.pth")})


def test_pth_with_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"params_ema": realesrgan_state(scale=2), "extra": Image.new("RGB", (2, 2))}, path)
    with pytest.raises(LorakitError, match="weights-only"):
        load_upscaler(path)


def test_unrecognised_architecture_is_a_clear_error(tmp_path):
    path = tmp_path / "notesrgan.safetensors"
    save_file({"encoder.layer.weight": torch.zeros(4, 4)}, str(path))
    with pytest.raises(LorakitError, match="not recognised"):
        load_upscaler(path)


def test_other_model_file_types_are_refused(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"not a model")
    with pytest.raises(LorakitError, match=r"\.safetensors or \.pth"):
        load_upscaler(path)


def test_tile_too_small_for_its_overlap_is_a_parameter_error():
    with pytest.raises(ParamError, match="tile"):
        UpscaleStep.configure({"model": "x.pth", "tile": 40, "tile_overlap": 32})


def test_a_mask_made_earlier_is_resized_with_the_image(tmp_path, x2_safetensors):
    from lorakit.plugin_sdk.testing import run_pipeline_dict

    im = Image.new("RGBA", (40, 30), (255, 0, 0, 0))
    im.paste((255, 0, 0, 255), (10, 5, 30, 25))
    (tmp_path / "in").mkdir()
    im.save(tmp_path / "in" / "cut.png")
    res = run_pipeline_dict({
        "output": str(tmp_path / "out"), "resolution": 64,
        "sources": [{"folder": {"path": str(tmp_path / "in")}}],
        "steps": [{"mask": {"backend": "alpha"}}, {"upscale": {"model": str(x2_safetensors), "downscale": False}}],
    }, tmp_path)
    rec = res.by_name("cut")
    mask = Image.open(res.path(rec.mask))
    assert (rec.width, rec.height) == (80, 60) and mask.size == (80, 60)
    assert mask.getpixel((0, 0)) == 0 and mask.getpixel((40, 30)) == 255


def test_an_upscale_that_stays_below_the_target_size_is_flagged(tmp_path, x2_safetensors):
    noise_image(tmp_path / "in" / "tiny.png", (20, 20))
    noise_image(tmp_path / "in" / "fine.png", (40, 40))
    res = run_step("upscale", tmp_path / "in", tmp_path / "out",
                   {"model": str(x2_safetensors), "max_passes": 1}, resolution=64)
    warnings = res.by_name("tiny").meta["warnings"]
    assert [w["step"] for w in warnings] == ["upscale"]
    assert "still below the target size after 1 pass(es): 40x40 < 4096 pixels" in warnings[0]["message"]
    assert "warnings" not in res.by_name("fine").meta  # 80x80 reaches 64x64


def test_a_model_that_turns_pictures_black_is_flagged(tmp_path):
    state = {k: torch.zeros_like(v) for k, v in old_esrgan_state(scale=2).items()}
    model = tmp_path / "models" / "2x_broken.safetensors"
    model.parent.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(model))
    noise_image(tmp_path / "in" / "photo.png", (24, 24))
    res = run_step("upscale", tmp_path / "in", tmp_path / "out", {"model": str(model)}, resolution=64)
    rec = res.by_name("photo")
    assert [w["message"] for w in rec.meta["warnings"]] == ["the result is all black"]
    assert any("photo: the result is all black" in m for s in res.stats for m in s.messages)
