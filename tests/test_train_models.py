"""Loading base models: diffusers folders, single files, hub ids, external VAEs; pickles refused."""
from __future__ import annotations

import pytest
import torch

from lorakit.plugin_sdk import LorakitError, ModelNotFound
from lorakit.trainer.models import load_base_model, load_pipeline, single_file_kind


@pytest.fixture
def offline(monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_sd15_folder_loads_as_sd1_with_one_text_encoder(sd15):
    base = load_base_model(sd15)
    assert not base.is_sdxl
    assert len(base.text_encoders) == 1 and base.text_encoder_2 is None
    assert base.vae_scale_factor == 8
    assert type(base.noise_scheduler).__name__ == "DDPMScheduler"
    assert base.v_prediction is False


def test_sdxl_folder_loads_as_sdxl_with_two_text_encoders(sdxl):
    base = load_base_model(sdxl)
    assert base.is_sdxl
    assert base.text_encoder_2 is not None and base.tokenizer_2 is not None


def test_v_prediction_override_changes_the_training_target(sd15):
    base = load_base_model(sd15, v_prediction=True)
    assert base.v_prediction is True
    assert base.noise_scheduler.config.prediction_type == "v_prediction"


def test_load_pipeline_returns_a_working_inference_pipeline(sd15):
    pipe = load_pipeline(sd15, dtype=torch.float32)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    image = pipe("a photo", num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3)


def test_load_pipeline_detects_sdxl_folder(sdxl):
    assert type(load_pipeline(sdxl)).__name__ == "StableDiffusionXLPipeline"


def test_external_vae_folder_replaces_the_checkpoint_vae(sd15, tmp_path):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(sd15 / "vae")
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(1.0)
    vae.save_pretrained(tmp_path / "other_vae")
    pipe = load_pipeline(sd15, vae=tmp_path / "other_vae")
    first = next(pipe.vae.parameters())
    assert torch.allclose(first, next(vae.parameters()))


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_pickled_checkpoints_are_refused_before_reading(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"not even read")
    with pytest.raises(LorakitError, match="pickled checkpoint"):
        load_pipeline(path)


def test_unknown_hub_id_offline_says_what_to_download(offline):
    with pytest.raises(ModelNotFound, match="huggingface-cli download nobody-here/no-model"):
        load_pipeline("nobody-here/no-model")


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFound, match="neither an existing"):
        load_pipeline(tmp_path / "missing" / "model.safetensors")


def test_folder_without_model_index_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFound, match="model_index.json"):
        load_base_model(tmp_path / "empty")


def test_safetensors_that_is_not_a_base_model_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(LorakitError, match="not a Stable Diffusion checkpoint"):
        single_file_kind(path)


def _fake_single_file(path, sdxl: bool):
    from safetensors.torch import save_file

    tensors = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}
    if sdxl:
        tensors["conditioner.embedders.1.model.ln_final.weight"] = torch.zeros(4)
    else:
        tensors["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = torch.zeros(4)
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("sdxl", [False, True])
def test_single_file_kind_is_detected_from_tensor_names(tmp_path, sdxl):
    path = _fake_single_file(tmp_path / "model.safetensors", sdxl)
    assert single_file_kind(path)["is_sdxl"] is sdxl


def test_single_file_offline_without_configs_says_what_to_download(tmp_path, offline):
    path = _fake_single_file(tmp_path / "model.safetensors", sdxl=False)
    with pytest.raises(ModelNotFound, match="stable-diffusion-v1-5/stable-diffusion-v1-5.*huggingface-cli download"):
        load_pipeline(path)
