"""`lorakit inspect` on files the tests write: lorakit's trainer, a kohya-style file, LyCORIS' own save."""
from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from lorakit.cli import cli
from lorakit.plugin_sdk import LorakitError
from lorakit.trainer.api import train
from lorakit.trainer.inspect import describe
from lorakit.trainer.models import load_base_model
from tests.test_train import make_dataset, quiet, settings

Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
MID = "lora_unet_mid_block_attentions_0_proj_in"
TE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


@pytest.fixture(scope="module")
def lorakit_file(sd15, tmp_path_factory):
    dataset = make_dataset(tmp_path_factory.mktemp("data") / "dataset")
    return train(dataset, settings(sd15, tmp_path_factory.mktemp("lora") / "mychar.safetensors"), console=quiet())


def kohya_file(path, up_scale: dict[str, float]):
    """A file as kohya's sd-scripts writes one (its keys, its ss_* metadata, no lorakit marker)."""
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name, (out_f, in_f) in {Q: (16, 16), MID: (32, 32), TE: (32, 32)}.items():
        tensors[f"{name}.lora_down.weight"] = torch.randn(8, in_f, generator=gen)
        tensors[f"{name}.lora_up.weight"] = torch.randn(out_f, 8, generator=gen) * up_scale.get(name, 1.0)
        tensors[f"{name}.alpha"] = torch.tensor(4.0)
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": "8", "ss_network_alpha": "4.0",
            "ss_base_model_version": "sd_v1", "ss_sd_model_name": "anything-v5.safetensors",
            "ss_resolution": "(512, 512)", "ss_steps": "1600", "ss_epoch": "8", "ss_num_epochs": "8",
            "ss_training_comment": "triggers: bulma_dbz",
            "ss_tag_frequency": json.dumps({"10_bulma": {"bulma_dbz": 40, "1girl": 38, "smile": 12},
                                            "5_outfit": {"1girl": 20, "jacket": 19}})}
    save_file(tensors, str(path), metadata=meta)
    return path, tensors


def test_lorakit_file_shows_base_type_dims_triggers_tags_and_training(lorakit_file):
    info = describe(lorakit_file)
    assert info["written_by"].startswith("lorakit")
    assert info["base_model"]["version"] == "Stable Diffusion 1.x"
    assert info["network"]["type"] == "LoRA"
    assert (info["network"]["dim"], info["network"]["alpha"]) == (4, 2)
    assert info["triggers"] == ["mychar"]
    assert {"tag": "mychar", "count": 4} in info["top_tags"]
    assert info["training"]["resolution"] == "64x64" and info["training"]["steps"] == 8
    blocks = {row["block"]: row for row in info["blocks"]}
    assert {"unet down_blocks.0", "unet mid_block", "unet up_blocks.1", "te layers.0"} <= set(blocks)
    assert all(row["dim"] == [4] and row["alpha"] == [2] for row in info["blocks"])
    assert all(row["change"] > 0 for row in info["blocks"]) and not info["does_nothing"]


def test_block_change_is_the_norm_of_alpha_over_dim_up_times_down(tmp_path):
    path, tensors = kohya_file(tmp_path / "k.safetensors", {})
    info = describe(path)
    expected = float((tensors[f"{Q}.lora_up.weight"] @ tensors[f"{Q}.lora_down.weight"]).norm()) * 4.0 / 8
    block = next(r for r in info["blocks"] if r["block"] == "unet down_blocks.0")
    assert math.isclose(block["change"], expected, rel_tol=1e-5)
    assert info["written_by"] == "kohya sd-scripts"
    assert info["triggers"] == ["bulma_dbz"]
    assert info["top_tags"][0] == {"tag": "1girl", "count": 58}
    assert info["base_model"]["model"] == "anything-v5.safetensors"


def test_a_lora_that_does_nothing_shows_zero_change(tmp_path):
    path, _ = kohya_file(tmp_path / "dead.safetensors", {Q: 0.0, MID: 0.0, TE: 0.0})
    info = describe(path)
    assert info["does_nothing"] and all(row["change"] == 0 for row in info["blocks"])
    result = CliRunner().invoke(cli, ["inspect", str(path)], terminal_width=120)
    assert result.exit_code == 0, result.output
    assert "does nothing" in result.output and "changes nothing" in result.output


def test_one_dead_block_is_shown_among_live_ones(tmp_path):
    path, _ = kohya_file(tmp_path / "half.safetensors", {MID: 0.0})
    blocks = {r["block"]: r["change"] for r in describe(path)["blocks"]}
    assert blocks["unet mid_block"] == 0 and blocks["unet down_blocks.0"] > 0 and blocks["te layers.0"] > 0


def test_lycoris_file_saved_by_lycoris_itself(sd15, tmp_path):
    import lycoris.kohya

    from lorakit.trainer.lycoris import _fresh_lycoris, classic_text_encoder

    base = load_base_model(sd15)
    te = classic_text_encoder(base.text_encoder)
    with _fresh_lycoris():
        network = lycoris.kohya.create_network(1.0, 4, 2, base.vae, te, base.unet, algo="loha",
                                               preset="unet-transformer-only", warn_on_unmatched=False)
    network.apply_to(te, base.unet, True, True)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(0.1)
    path = tmp_path / "loha.safetensors"
    network.save_weights(str(path), torch.float16, {
        "ss_network_module": "lycoris.kohya", "ss_network_dim": "4", "ss_network_alpha": "2",
        "ss_network_args": json.dumps({"algo": "loha", "preset": "unet-transformer-only"})})
    info = describe(path)
    assert info["network"]["type"] == "LoHa"
    assert info["written_by"] == "kohya sd-scripts + LyCORIS"
    assert info["network"]["parts"] == ["unet"]
    assert all(row["types"] == ["loha"] and row["dim"] == [4] for row in info["blocks"])
    assert info["total_change"] > 0


def test_json_output_is_the_whole_description(lorakit_file):
    result = CliRunner().invoke(cli, ["inspect", str(lorakit_file), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["network"]["type"] == "LoRA" and data["blocks"]


def test_not_a_lora_or_missing_file_is_a_clear_error(tmp_path):
    other = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}, str(other))
    with pytest.raises(LorakitError, match="is not a LoRA key"):
        describe(other)
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path / "missing.safetensors")])
    assert result.exit_code != 0 and "no such LoRA file" in result.output
    pickled = tmp_path / "old.ckpt"
    pickled.write_bytes(b"x")
    result = CliRunner().invoke(cli, ["inspect", str(pickled)])
    assert result.exit_code != 0 and "pickled" in result.output
