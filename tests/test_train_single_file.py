"""Single-file (original LDM layout) base models: loaded offline with a local config folder, trained on.

The checkpoint is the tiny SD1.5 pipeline written back into the key layout model sites distribute,
so these tests run diffusers' real single-file conversion on it, with no download.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from conftest import run_cli
from safetensors import safe_open

from lorakit.plugin_sdk import ModelNotFound
from lorakit.trainer import kohya_format
from lorakit.trainer.models import load_pipeline, single_file_kind
from tests.test_train import make_dataset
from tests.tiny_models import build_tiny_sd15, save_tiny_sd15_single_file

PARTS = ("unet", "vae", "text_encoder")


@pytest.fixture(scope="module")
def single_file(sd15, tmp_path_factory):
    return save_tiny_sd15_single_file(sd15, tmp_path_factory.mktemp("single") / "tiny-sd15.safetensors")


@pytest.fixture(scope="module")
def config_only(sd15, tmp_path_factory):
    """The tiny model's configs without any weights (like `huggingface-cli download --include '*.json'`),
    so every weight of a loaded pipeline must come from the single file."""
    target = tmp_path_factory.mktemp("configs") / "sd15-configs"
    shutil.copytree(sd15, target, ignore=shutil.ignore_patterns("*.safetensors"))
    return target


@pytest.fixture
def offline(monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def assert_same_weights(loaded, reference) -> None:
    for part in PARTS:
        got, want = getattr(loaded, part).state_dict(), getattr(reference, part).state_dict()
        assert got.keys() == want.keys(), part
        differing = [k for k in want if not torch.equal(got[k], want[k])]
        assert not differing, f"{part}: {differing[:5]}"


def test_exported_file_has_the_original_ldm_key_layout(sd15, single_file):
    with safe_open(str(single_file), framework="pt") as f:
        keys = set(f.keys())
        q_shape = f.get_slice("first_stage_model.encoder.mid.attn_1.q.weight").get_shape()
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
    assert all(k.startswith(prefixes) for k in keys)
    # One entry per diffusers weight: no two weights were given the same LDM name.
    diffusers_count = 0
    for part in PARTS:
        for file in (sd15 / part).glob("*.safetensors"):
            with safe_open(str(file), framework="pt") as f:
                diffusers_count += len(list(f.keys()))
    assert len(keys) == diffusers_count
    # Block indices of the tiny UNet with SD1.5's layout (layers_per_block 2): the level-0
    # downsampler is input_blocks.3, the level-0 upsampler (no attention there) output_blocks.2 slot 1.
    assert "model.diffusion_model.input_blocks.3.0.op.weight" in keys
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in keys
    assert "model.diffusion_model.output_blocks.3.1.transformer_blocks.0.attn2.to_k.weight" in keys
    assert "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight" in keys
    assert len(q_shape) == 4  # LDM's VAE attention projections are 1x1 convolutions
    assert single_file_kind(single_file) == {"is_sdxl": False, "v_prediction": False}


def test_exporter_follows_the_real_sd15_block_pattern(tmp_path, offline):
    """Four levels of two layers with attention in the first three, as in SD1.5 (at tiny widths): the
    upsamplers land after the attention (slot 2), and diffusers converts every weight back."""
    from diffusers import UNet2DConditionModel

    folder = build_tiny_sd15(tmp_path / "model")
    unet = UNet2DConditionModel(
        sample_size=8, layers_per_block=2, block_out_channels=(8, 16, 24, 24), norm_num_groups=8,
        cross_attention_dim=32, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    shutil.rmtree(folder / "unet")
    unet.save_pretrained(folder / "unet")
    single = save_tiny_sd15_single_file(folder, tmp_path / "model.safetensors")
    with safe_open(str(single), framework="pt") as f:
        upsamplers = sorted(k for k in f.keys()
                            if k.startswith("model.diffusion_model.output_blocks") and ".conv." in k)
    assert upsamplers == [f"model.diffusion_model.output_blocks.{i}.conv.{w}"
                          for i in ("2.1", "5.2", "8.2") for w in ("bias", "weight")]
    configs = tmp_path / "configs"
    shutil.copytree(folder, configs, ignore=shutil.ignore_patterns("*.safetensors"))
    assert_same_weights(load_pipeline(single, config=configs), load_pipeline(folder))


def test_single_file_loads_offline_with_every_weight_equal_to_the_diffusers_pipeline(
        sd15, single_file, config_only, offline):
    loaded = load_pipeline(single_file, config=config_only)
    assert type(loaded).__name__ == "StableDiffusionPipeline"
    assert_same_weights(loaded, load_pipeline(sd15))
    assert loaded.vae.config.scaling_factor == pytest.approx(0.18215)


def test_single_file_pipeline_runs_one_inference_step_like_the_diffusers_pipeline(
        sd15, single_file, config_only, offline):
    def render(pipe):
        return pipe("a photo", num_inference_steps=1, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    image = render(load_pipeline(single_file, config=config_only))
    assert image.shape == (1, 64, 64, 3)
    # the same weights (test above); only the float summation order may differ (tensor strides)
    assert np.allclose(image, render(load_pipeline(sd15)), atol=1e-5)


def test_config_folder_with_other_weights_gives_only_the_architecture(sd15, single_file, tmp_path, offline):
    other = build_tiny_sd15(tmp_path / "other", seed=1)
    loaded = load_pipeline(single_file, config=other)
    assert_same_weights(loaded, load_pipeline(sd15))
    other_unet = load_pipeline(other).unet.state_dict()
    assert not torch.equal(loaded.unet.state_dict()["conv_in.weight"], other_unet["conv_in.weight"])


def test_config_folder_under_home_is_found_through_a_tilde(single_file, config_only, monkeypatch, offline):
    monkeypatch.setenv("HOME", str(config_only.parent))
    loaded = load_pipeline(single_file, config=f"~/{config_only.name}")
    assert type(loaded).__name__ == "StableDiffusionPipeline"


def test_uncached_hub_config_offline_names_that_config_to_download(single_file, offline):
    with pytest.raises(ModelNotFound, match="huggingface-cli download nobody-here/no-config"):
        load_pipeline(single_file, config="nobody-here/no-config")


def test_cli_trains_a_lora_from_a_single_file_offline(single_file, config_only, tmp_path):
    dataset = make_dataset(tmp_path / "dataset")
    out = tmp_path / "mychar.safetensors"
    result = run_cli(
        "train", str(dataset), "--base-model", str(single_file), "--base-config", str(config_only),
        "--output", str(out), "--device", "cpu", "--resolution", "64", "--min-bucket-reso", "32",
        "--max-bucket-reso", "128", "--bucket-reso-steps", "32", "--network-dim", "2", "--network-alpha", "1",
        "--learning-rate", "1e-2", "--lr-scheduler", "constant", "--max-train-steps", "2",
        "--save-precision", "fp32", env_extra={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    tensors, meta = kohya_format.read(out)
    assert meta["ss_steps"] == "2"
    assert meta["ss_sd_model_name"] == single_file.name
    ups = {k: v for k, v in tensors.items() if k.endswith(".lora_up.weight")}
    assert any(k.startswith("lora_unet_") for k in ups) and any(k.startswith("lora_te_") for k in ups)
    # lora_up starts at zero: non-zero values mean the two optimiser steps really ran.
    assert any(v.abs().max() > 0 for v in ups.values())
