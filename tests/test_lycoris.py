"""LyCORIS network types (lycoris-lora) on the tiny SD1.5: training, the file format, loading it back."""
from __future__ import annotations

import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lorakit.plugin_sdk import LorakitError
from lorakit.trainer import kohya_format
from lorakit.trainer.api import train, validate_settings
from lorakit.trainer.lora_file import applied, group_modules
from lorakit.trainer.lycoris import LycorisNetwork, classic_text_encoder
from lorakit.trainer.models import load_pipeline
from tests.test_train import make_dataset, quiet, render, settings

# The tensors each type writes per module (LyCORIS' own save format, what A1111/ComfyUI read).
FORMAT = {
    "locon": {"lora_down.weight", "lora_up.weight", "alpha"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
    "lokr": {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"},  # a module has lokr_w2 or lokr_w2_a/_b
    "ia3": {"weight", "on_input"},
    "dylora": {"lora_down.weight", "lora_up.weight", "alpha"},
    "diag_oft": {"oft_blocks", "alpha"},
}
ALGO = {"locon": "locon", "loha": "loha", "lokr": "lokr", "ia3": "ia3", "dylora": "dylora", "diag_oft": "diag-oft"}
# Small dims for a tiny model; learning rates high enough that a few steps visibly change the output.
EXTRA = {
    "locon": dict(network_dim=4, network_alpha=2, conv_dim=4, conv_alpha=2),
    "loha": dict(network_dim=4, network_alpha=2, conv_dim=4, conv_alpha=2),
    "lokr": dict(network_dim=4, network_alpha=2, conv_dim=4, conv_alpha=2, learning_rate=1e-2),
    "ia3": dict(learning_rate=5e-2),
    "dylora": dict(network_dim=4, network_alpha=2, conv_dim=4, conv_alpha=2, network_args=["block_size=2"]),
    "diag_oft": dict(network_dim=2, network_alpha=2, conv_dim=2, conv_alpha=2, learning_rate=5e-2),
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "dataset")


@pytest.fixture(scope="module")
def trained(sd15, dataset, tmp_path_factory):
    """One trained file per type (trained on first use)."""
    files = {}

    def get(network_type):
        if network_type not in files:
            out = tmp_path_factory.mktemp(network_type) / f"{network_type}.safetensors"
            config = settings(sd15, out, network_type=network_type, max_train_steps=3, **{
                "learning_rate": 1e-2, **EXTRA[network_type]})
            files[network_type] = train(dataset, config, console=quiet())
        return files[network_type]

    return get


@pytest.fixture(scope="module")
def base_pipe(sd15):
    """One pipeline for the base image and for lorakit's merges (each merge is undone afterwards)."""
    return load_pipeline(sd15)


@pytest.fixture(scope="module")
def with_lycoris(sd15):
    """The image after LyCORIS' own loader applied a file, and the keys of the network it rebuilt
    (cached per file). ``create_network_from_weights`` rebuilds each module from the file's keys;
    it cannot rebuild IA3 modules (4.1.3: ``make_module_from_state_dict`` takes one tensor too
    few), so an IA3 file is loaded the way kohya's ``--network_weights`` does: LyCORIS'
    ``create_network`` with the file's preset, then its ``load_weights``."""
    import lycoris.kohya

    results = {}

    def get(path, network_type):
        if path not in results:
            pipe = load_pipeline(sd15)
            encoder = classic_text_encoder(pipe.text_encoder)
            tensors, meta = kohya_format.read(path)
            if network_type == "ia3":
                base = SimpleNamespace(unet=pipe.unet, vae=pipe.vae, text_encoders=[pipe.text_encoder], is_sdxl=False)
                network = LycorisNetwork.create(base, validate_settings({"network_type": "ia3"})).network
                assert network.load_weights(str(path)) == {}  # no missing and no unexpected key
            else:
                network, _ = lycoris.kohya.create_network_from_weights(1.0, str(path), pipe.vae, encoder, pipe.unet)
                network.apply_to(encoder, pipe.unet, True, True)
                network.load_state_dict(tensors, strict=False)
            results[path] = render(pipe), set(network.state_dict())
        return results[path]

    return get


TYPES = list(FORMAT)


@pytest.mark.parametrize("network_type", TYPES)
def test_each_type_writes_lycoris_keys_and_kohya_metadata(trained, network_type):
    tensors, meta = kohya_format.read(trained(network_type))
    modules = group_modules(tensors)
    assert modules, "no modules saved"
    for name, module in modules.items():
        assert name.startswith(("lora_unet_", "lora_te_text_model_encoder_layers_")), name
        assert set(module.tensors) <= FORMAT[network_type], (name, sorted(module.tensors))
    assert any(n.startswith("lora_te_text_model_encoder_layers_0_") for n in modules)
    assert any(n.startswith("lora_unet_down_blocks_0_attentions_0_") for n in modules)
    assert meta["ss_network_module"] == "lycoris.kohya"
    args = json.loads(meta["ss_network_args"])
    assert args["algo"] == ALGO[network_type]
    assert all(isinstance(v, str) for v in args.values())  # kohya writes its key=value strings
    assert meta["sshs_model_hash"] == kohya_format.tensors_hash(tensors)


@pytest.mark.parametrize("network_type", TYPES)
def test_each_type_loads_in_lycoris_and_our_client_maths_give_the_same_image(base_pipe, with_lycoris, trained,
                                                                              network_type):
    path = trained(network_type)
    image, used = with_lycoris(path, network_type)
    tensors, _ = kohya_format.read(path)
    assert used == set(tensors)  # LyCORIS' loader rebuilt a module for every key of the file
    base = render(base_pipe)
    assert np.abs(image - base).max() > 1e-4  # training changed the output
    with applied(base_pipe, group_modules(tensors), 1.0):
        merged = render(base_pipe)
    np.testing.assert_allclose(merged, image, atol=2e-4)
    np.testing.assert_array_equal(render(base_pipe), base)  # the merge was undone


def test_ia3_scales_keys_values_and_feed_forward_input_only(trained):
    tensors, _ = kohya_format.read(trained("ia3"))
    modules = group_modules(tensors)
    leaves = {n.rsplit("_", 2)[-2] + "_" + n.rsplit("_", 1)[-1] for n in modules}
    assert leaves <= {"to_k", "to_v", "net_2", "k_proj", "v_proj", "mlp_fc2"}, leaves
    ff = next(m for n, m in modules.items() if n.endswith("ff_net_2"))
    assert float(ff.tensors["on_input"]) == 1.0
    key = next(m for n, m in modules.items() if n.endswith("attn1_to_k"))
    assert float(key.tensors["on_input"]) == 0.0


@pytest.mark.parametrize("network_type", ["locon", "dylora"])
def test_locon_and_dylora_files_load_in_diffusers_like_in_lycoris(sd15, with_lycoris, trained, network_type):
    path = trained(network_type)
    pipe = load_pipeline(sd15)
    pipe.load_lora_weights(str(path))
    np.testing.assert_allclose(render(pipe), with_lycoris(path, network_type)[0], atol=2e-4)


def test_resume_state_puts_back_every_weight(sd15, tmp_path):
    """DyLoRA keeps its rank blocks apart: the resumed run must split the saved matrices back."""
    from safetensors.torch import load_file

    dataset = make_dataset(tmp_path / "data", subsets=(("outfit", 2, 1),))
    extra = dict(epochs=2, save_every_n_epochs=1, save_state=True, lr_scheduler="constant")
    out = tmp_path / "a" / "x.safetensors"
    config = settings(sd15, out, network_type="dylora", **{**EXTRA["dylora"], **extra})
    straight = train(dataset, config, console=quiet())
    resumed = train(dataset, config.replace(output=str(tmp_path / "b" / "x.safetensors"),
                                            resume=str(out.with_name("x-000001-state"))), console=quiet())
    a, b = load_file(str(straight)), load_file(str(resumed))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


# ----- settings: network_type, kohya's network_module + network_args, recipes -------------------------------
def test_kohya_spelling_and_network_type_are_the_same_network():
    kohya = validate_settings({"network_module": "lycoris.kohya", "network_args": ["algo=loha", "conv_dim=8",
                                                                                   "conv_alpha=4"]})
    ours = validate_settings({"network_type": "loha", "conv_dim": 8, "conv_alpha": 4})
    assert kohya.network_type == ours.network_type == "loha"
    assert (kohya.conv_dim, kohya.conv_alpha) == (ours.conv_dim, ours.conv_alpha) == (8, 4.0)
    assert kohya.network_module == "lycoris.kohya"


def test_recipes_fill_only_settings_left_at_their_defaults():
    assert validate_settings({"network_type": "ia3"}).learning_rate == 5e-3
    assert validate_settings({"network_type": "ia3", "learning_rate": 1e-2}).learning_rate == 1e-2
    assert validate_settings({"network_type": "ia3", "optimizer": "prodigy", "learning_rate": 1}).learning_rate == 1
    lokr = validate_settings({"network_type": "lokr"})
    assert lokr.learning_rate == 5e-5 and (lokr.network_dim, lokr.network_alpha) == (32, 16.0)
    locon = validate_settings({"network_type": "locon"})
    assert (locon.conv_dim, locon.conv_alpha) == (32, 16.0)
    dylora = validate_settings({"network_type": "dylora"})
    assert (dylora.network_dim, dylora.network_alpha) == (64, 32.0) and "block_size=4" in dylora.network_args
    oft = validate_settings({"network_type": "diag-oft"})
    assert oft.network_type == "diag_oft" and oft.network_dim == 2
    # A second validation (the command line over a config file) keeps what the first one chose.
    again = validate_settings(dylora.values)
    assert again.values == dylora.values


def test_diag_oft_without_a_constraint_warns_that_a1111_applies_nothing():
    from lorakit.trainer.lycoris import guide_warnings

    (note,) = [n for n in guide_warnings(validate_settings({"network_type": "diag_oft"})) if "A1111" in n]
    assert "constraint" in note and "Forge" in note
    constrained = validate_settings({"network_type": "diag_oft", "network_args": ["constraint=0.01"]})
    assert not [n for n in guide_warnings(constrained) if "A1111" in n]


@pytest.mark.parametrize("settings_,message", [
    ({"network_module": "networks.lora", "network_args": ["algo=loha"]}, "needs network_module"),
    ({"network_module": "lycoris.kohya", "network_args": ["algo=magic"]}, "algo='magic' is not supported"),
    ({"network_type": "loha", "network_args": ["convdim=4"]}, "did you mean 'conv_dim'"),
    ({"network_type": "loha", "network_args": ["conv_dim"]}, "expected key=value"),
    ({"network_type": "lokr", "network_module": "lycoris.kohya", "network_args": ["algo=loha"]}, "give one of them"),
    ({"network_type": "loha", "network_args": ["preset=nonsense"]}, "neither a LyCORIS preset"),
    ({"network_module": "networks.lycoris"}, "expected networks.lora or lycoris.kohya"),
    ({"network_type": "loha", "dora": True}, "dora_wd=True"),
])
def test_bad_network_settings_name_the_problem(settings_, message):
    with pytest.raises(LorakitError, match=message):
        validate_settings(settings_, "train.toml")


# ----- SDXL ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("network_type", ["locon", "loha"])
def test_sdxl_lycoris_file_has_kohyas_ldm_unet_names_and_both_text_encoders_and_applies(sdxl, dataset, tmp_path,
                                                                                          network_type):
    out = tmp_path / f"{network_type}.safetensors"
    config = settings(sdxl, out, network_type=network_type, max_train_steps=2, learning_rate=2e-2,
                      **EXTRA[network_type])
    path = train(dataset, config, console=quiet())
    tensors, meta = kohya_format.read(path)
    modules = group_modules(tensors)
    unet = [n for n in modules if n.startswith("lora_unet_")]
    assert unet and not any(re.match(r"lora_unet_(down_blocks|up_blocks|mid_block)_", n) for n in unet)
    assert any(n.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q") for n in unet)
    assert any(n.startswith("lora_unet_middle_block_1_") for n in unet)
    assert any(n.startswith("lora_unet_output_blocks_0_1_") for n in unet)
    if network_type == "locon":
        assert "lora_unet_output_blocks_2_2_conv" in modules  # the first upsampler, kohya's SDXL name
    for prefix in ("lora_te1_text_model_encoder_layers_0_", "lora_te2_text_model_encoder_layers_0_"):
        assert any(n.startswith(prefix) for n in modules)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_network_module"] == "lycoris.kohya"
    pipe = load_pipeline(sdxl)
    base = render(pipe)
    with applied(pipe, modules, 1.0):  # every module names a layer of the SDXL pipeline
        merged = render(pipe)
    assert np.abs(merged - base).max() > 1e-4
    if network_type == "locon":  # diffusers reads kohya's SDXL LoCon names too, with the same result
        pipe.load_lora_weights(str(path))
        np.testing.assert_allclose(render(pipe), merged, atol=2e-4)


# ----- several processes ------------------------------------------------------------------------------
def test_lycoris_on_two_processes_is_refused_with_a_clear_message(sd15, tmp_path):
    """A real two-process CPU run (gloo): LyCORIS' weights live outside the models accelerate wraps in
    DistributedDataParallel, so their gradients would never be averaged; lorakit refuses."""
    import os
    import subprocess
    import sys

    from tests.test_train_maths import free_port

    dataset = make_dataset(tmp_path / "data", subsets=(("outfit", 2, 1),))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "lorakit", "train", str(dataset),
               "--base-model", str(sd15), "--output", str(tmp_path / "x.safetensors"), "--resolution", "64",
               "--min-bucket-reso", "32", "--max-bucket-reso", "128", "--bucket-reso-steps", "32",
               "--network-type", "loha", "--network-dim", "2", "--max-train-steps", "1", "--device", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "LyCORIS network types train on one process" in output and "network_type lora" in output
    assert not (tmp_path / "x.safetensors").exists()
