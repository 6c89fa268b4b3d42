"""The trainer's maths and options, each checked against an independent formula (kohya's meaning)."""
from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from rich.console import Console
from rich.progress import Progress

from lorakit.trainer.loop import Trainer
from tests.test_train import make_dataset, settings


def quiet():
    return Console(file=io.StringIO(), width=120)


@pytest.fixture(scope="module")
def square_dataset(tmp_path_factory):
    # make_dataset cycles 64x64, 96x64, 64x128: images 0 and 3 share the 64x64 bucket.
    return make_dataset(tmp_path_factory.mktemp("data") / "square", subsets=(("outfit", 4, 1),))


def prepared(dataset: Path, config) -> Trainer:
    """A trainer with its models, network, optimiser and latent cache ready, before the first step."""
    trainer = Trainer(dataset, config, quiet())
    trainer.setup()
    with Progress(console=quiet()) as progress:
        trainer.fill_latent_cache(progress)
    return trainer


def fixed_noise(latents: torch.Tensor, generator: torch.Generator):
    """Noise and timestep that depend on the image only, not on how images are batched."""
    noise = [torch.randn(latent.shape, generator=torch.Generator().manual_seed(int(latent.abs().sum() * 1000) % 2**31))
             for latent in latents]
    return torch.stack(noise).to(latents.device), torch.full((latents.shape[0],), 500, device=latents.device)


def gradients(trainer: Trainer) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in trainer.network.parameters()]


# ----- gradient accumulation ---------------------------------------------------------------------
def test_k_micro_batches_give_the_gradient_of_one_batch_k_times_the_size(sd15, square_dataset, tmp_path):
    # One trainer at a time: accelerate keeps its gradient state in a process-wide singleton.
    one = prepared(square_dataset, settings(sd15, tmp_path / "a.safetensors", batch_size=2))
    pair = [i for i, image in enumerate(one.data_.images) if image.bucket == (64, 64)][:2]
    assert len(pair) == 2
    one.sample_noise = fixed_noise
    one.accumulate([tuple(pair)], epoch=0, first_index=0)
    big = gradients(one)
    del one
    two = prepared(square_dataset, settings(sd15, tmp_path / "b.safetensors", batch_size=1,
                                            gradient_accumulation_steps=2))
    two.sample_noise = fixed_noise
    two.accumulate([(pair[0],), (pair[1],)], epoch=0, first_index=0)
    accumulated = gradients(two)
    assert any(g.abs().max() > 0 for g in big)
    for expected, got in zip(big, accumulated):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-8)


# ----- several processes -------------------------------------------------------------------------
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_follow_the_whole_lr_schedule(sd15, tmp_path):
    """A real two-process CPU run (gloo): the linear schedule is half way at half the steps, 0 at the end.

    accelerate steps the scheduler once per process per optimiser step; built for the per-process
    step count, the schedule would reach 0 half way through.
    """
    import json
    import os
    import subprocess
    import sys

    dataset = make_dataset(tmp_path / "data")  # 4 images x 2 repeats = 8 batches, 4 per process
    out = tmp_path / "lora.safetensors"
    # torchrun, as accelerate's multi-process launcher does (``accelerate launch --cpu`` starts one
    # process unless mpirun is set up); accelerate then joins the processes over gloo.
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "lorakit", "train", str(dataset),
               "--base-model", str(sd15), "--output", str(out), "--resolution", "64", "--min-bucket-reso", "32",
               "--max-bucket-reso", "128", "--bucket-reso-steps", "32", "--network-dim", "2", "--network-alpha", "1",
               "--epochs", "2", "--learning-rate", "0.01", "--lr-scheduler", "linear", "--save-every-n-epochs", "1",
               "--save-state", "--device", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    half = json.loads((tmp_path / "lora-000001-state" / "state.json").read_text())
    end = json.loads((tmp_path / "lora-state" / "state.json").read_text())
    total, base = 8 // 2 * 2, 0.01  # 4 optimiser steps per epoch (8 batches over 2 processes), 2 epochs
    assert (half["global_step"], end["global_step"]) == (total // 2, total)
    linear = lambda step: base * (total - step) / total  # diffusers' linear schedule without warm-up
    assert half["learning_rates"] == pytest.approx([linear(4)] * 2)
    assert end["learning_rates"] == pytest.approx([linear(8)] * 2, abs=1e-12)


# ----- captions (kohya's process_caption) ----------------------------------------------------------
def _image(caption, **kw):
    from lorakit.trainer.data import TrainImage

    return TrainImage(path=Path("x.png"), caption=caption, subset="s", repeats=1, is_reg=False, size=(64, 64),
                      bucket=(64, 64), resized=(64, 64), **kw)


def test_token_warmup_grows_only_the_shuffled_tags_and_never_cuts_the_kept_ones():
    import random

    from lorakit.trainer.data import make_caption

    image = _image("mychar, blue dress, a, b, c, d", keep_tokens=2)
    captions = [make_caption(image, random.Random(0), step=s, token_warmup_min=1, token_warmup_step=3) for s in range(5)]
    # kohya: floor(step * (len(flex) - min) / warmup) + min of the 4 flexible tags, after the 2 kept ones
    flexible = [min(4, (s * (4 - 1)) // 3 + 1) for s in range(5)]
    assert [len(c.split(", ")) - 2 for c in captions] == flexible == [1, 2, 3, 4, 4]
    assert all(c.startswith("mychar, blue dress, a") for c in captions)
    separated = _image("mychar, blue dress ||| a, b, c, d")
    assert make_caption(separated, random.Random(0), step=0, token_warmup_step=10) == "mychar, blue dress, a"


def test_second_keep_tokens_separator_keeps_a_fixed_suffix():
    import random

    from lorakit.trainer.data import make_caption

    image = _image("mychar ||| a, b, c ||| masterpiece, best quality", shuffle_caption=True, caption_tag_dropout_rate=0.5)
    for seed in range(10):
        caption = make_caption(image, random.Random(seed))
        assert caption.startswith("mychar") and caption.endswith("masterpiece, best quality")


def test_caption_prefix_suffix_and_dropout_every_n_epochs():
    import random

    from lorakit.trainer.data import make_caption

    image = _image("red hair, smile", caption_prefix="mychar,", caption_suffix=", masterpiece",
                   caption_dropout_every_n_epochs=3)
    by_epoch = [make_caption(image, random.Random(0), epoch=e) for e in range(1, 7)]
    assert by_epoch[0] == "mychar, red hair, smile, masterpiece"  # joined with a space, as kohya does, then split at commas
    assert [c == "" for c in by_epoch] == [False, False, True, False, False, True]


# ----- settings ----------------------------------------------------------------------------------
def test_adaptive_optimizer_defaults_to_learning_rate_1_and_warns_on_a_low_one():
    from lorakit.trainer.config import config_warnings, validate_settings

    assert validate_settings({"optimizer": "prodigy"}).learning_rate == 1.0
    assert validate_settings({}).learning_rate == 1e-4
    # The command line applies options over a config file: the default is worked out again.
    assert validate_settings({}).replace(optimizer="prodigy").learning_rate == 1.0
    assert validate_settings({"learning_rate": 3e-4}).replace(optimizer="prodigy").learning_rate == 3e-4
    assert config_warnings(validate_settings({"optimizer": "prodigy"})) == []
    (warning,) = config_warnings(validate_settings({"optimizer": "prodigy", "learning_rate": 1e-4}))
    assert "prodigy" in warning and "learning_rate = 0.0001" in warning
    assert config_warnings(validate_settings({"learning_rate": 1e-4})) == []


def test_bucket_no_upscale_warns_that_min_and_max_bucket_reso_are_unused():
    from lorakit.trainer.config import config_warnings, validate_settings

    assert config_warnings(validate_settings({"bucket_no_upscale": True})) == []
    assert config_warnings(validate_settings({"min_bucket_reso": 320, "max_bucket_reso": 1536})) == []
    (warning,) = config_warnings(validate_settings({"bucket_no_upscale": True, "max_bucket_reso": 1536}))
    assert "max_bucket_reso = 1536 is not used" in warning and "min_bucket_reso" not in warning
    (warning,) = config_warnings(validate_settings({"bucket_no_upscale": True, "enable_bucket": False}))
    assert "no effect with enable_bucket = false" in warning


def test_network_alpha_0_means_alpha_equals_dim(sd15):
    from lorakit.trainer.config import validate_settings
    from lorakit.trainer.models import load_base_model
    from lorakit.trainer.network import ADAPTER, LoraNetwork

    network = LoraNetwork.create(load_base_model(sd15), validate_settings({"network_dim": 4, "network_alpha": 0,
                                                                           "conv_dim": 2, "conv_alpha": 0}))
    layers = list(network.layers.values())
    assert layers and all(layer.scaling[ADAPTER] == 1.0 for layer in layers)  # kohya: alpha = dim, scale 1
    assert {float(layer.lora_alpha[ADAPTER]) for layer in layers} == {4.0, 2.0}


# ----- buckets: one rule for the trainer, the buckets step and the kohya export ------------------------
def test_resolution_64_alone_trains_with_buckets_that_follow_it(tmp_path):
    from lorakit.buckets import make_buckets
    from lorakit.manifest import Manifest
    from lorakit.trainer.config import validate_settings
    from lorakit.trainer.data import build_training_data

    dataset = make_dataset(tmp_path / "d")
    data = build_training_data(Manifest.load(dataset), validate_settings({"resolution": 64}), 64)
    assert data.buckets == make_buckets(64, 64, 1024, 64) and (64, 64) in data.buckets


def test_bucket_bounds_are_kohyas_defaults_widened_to_the_resolution():
    from lorakit.buckets import bucket_bounds

    assert bucket_bounds(512) == (256, 1024) and bucket_bounds(1024) == (256, 1024)
    assert bucket_bounds(64) == (64, 1024) and bucket_bounds(2048) == (256, 2048)
    assert bucket_bounds(512, 200, 1000, 64) == (192, 1024)  # kohya rounds min down, max up to the step
    with pytest.raises(ValueError, match="min_bucket_reso = 256 is larger than the resolution 64; set min_bucket_reso"):
        bucket_bounds(64, 256)
    with pytest.raises(ValueError, match="max_bucket_reso = 1024 is smaller than the resolution 1536"):
        bucket_bounds(1536, None, 1024)


def test_a_min_bucket_above_the_resolution_names_the_option(tmp_path):
    from lorakit.manifest import Manifest
    from lorakit.plugin_sdk import LorakitError
    from lorakit.trainer.config import validate_settings
    from lorakit.trainer.data import build_training_data

    dataset = make_dataset(tmp_path / "d")
    with pytest.raises(LorakitError, match="min_bucket_reso = 256 is larger than the resolution 64"):
        build_training_data(Manifest.load(dataset), validate_settings({"min_bucket_reso": 256}), 64)


def test_buckets_step_and_kohya_export_use_the_trainers_bounds(tmp_path):
    import json
    import tomllib

    from lorakit.buckets import bucket_bounds
    from lorakit.kohya import export_kohya
    from lorakit.manifest import Manifest
    from lorakit.plugin_sdk.testing import run_step

    dataset = make_dataset(tmp_path / "d")  # a manifest at resolution 64
    config = tomllib.loads(export_kohya(Manifest.load(dataset), tmp_path / "k").read_text())["general"]
    assert (config["min_bucket_reso"], config["max_bucket_reso"]) == bucket_bounds(64) == (64, 1024)
    run_step("buckets", dataset / "outfit", tmp_path / "out", resolution=64)
    report = json.loads((tmp_path / "out" / "reports" / "buckets-buckets.json").read_text())
    assert (report["min_size"], report["max_size"]) == bucket_bounds(64)


# ----- noise, timesteps and loss weights (kohya's definitions, restated here with numpy) -------------
def fake_trainer(v_prediction=False, **settings):
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    from lorakit.trainer.config import validate_settings

    return SimpleNamespace(config=validate_settings(settings),
                           base=SimpleNamespace(noise_scheduler=DDPMScheduler(), v_prediction=v_prediction))


@pytest.mark.parametrize("v_prediction", [False, True])
def test_snr_weights_are_kohyas_min_snr_v_scaling_v_like_and_debiased(v_prediction):
    import numpy as np

    timesteps = torch.tensor([0, 10, 250, 500, 999])
    fake = fake_trainer(v_prediction, min_snr_gamma=5, scale_v_pred_loss_like_noise_pred=True, v_pred_like_loss=0.1,
                        debiased_estimation_loss=True)
    got = Trainer.snr_weights(fake, timesteps).numpy()
    abar = fake.base.noise_scheduler.alphas_cumprod.numpy().astype(np.float64)[timesteps.numpy()]
    snr = abar / (1 - abar)
    expected = np.minimum(snr, 5) / (snr + 1 if v_prediction else snr)  # min-SNR
    capped = np.minimum(snr, 1000)
    expected = expected * capped / (capped + 1)  # scale_v_pred_loss_like_noise_pred
    expected = expected + expected / (capped / (capped + 1)) * 0.1  # v_pred_like_loss: loss + loss / scale * v
    expected = expected * (1 / (capped + 1) if v_prediction else 1 / np.sqrt(capped))  # debiased estimation
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    assert torch.equal(Trainer.snr_weights(fake_trainer(), timesteps), torch.ones(5))


def test_timesteps_stay_within_min_and_max_timestep():
    latents = torch.zeros(512, 4, 8, 8)
    fake = fake_trainer(min_timestep=100, max_timestep=200)
    _, timesteps = Trainer.sample_noise(fake, latents, torch.Generator().manual_seed(0))
    assert timesteps.min() >= 100 and timesteps.max() < 200 and len(timesteps.unique()) > 50
    _, fixed = Trainer.sample_noise(fake_trainer(min_timestep=300, max_timestep=300), latents, torch.Generator())
    assert torch.equal(fixed, torch.full((512,), 300))  # kohya: min == max trains that one timestep


def test_multires_noise_has_unit_variance_and_more_low_frequency_power():
    latents = torch.zeros(64, 4, 32, 32)
    plain, _ = Trainer.sample_noise(fake_trainer(), latents, torch.Generator().manual_seed(0))
    pyramid, _ = Trainer.sample_noise(fake_trainer(multires_noise_iterations=6, multires_noise_discount=0.8), latents,
                                      torch.Generator().manual_seed(0))
    assert pyramid.std().item() == pytest.approx(1.0, abs=1e-5)
    # the per-channel mean (the lowest frequency) varies more than in white noise (1/32 for 32x32)
    assert pyramid.mean(dim=(2, 3)).std() > 2 * plain.mean(dim=(2, 3)).std()


def test_adaptive_noise_offset_grows_with_the_latent_mean():
    bright = torch.full((256, 4, 8, 8), 3.0)
    generator = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    base, _ = Trainer.sample_noise(fake_trainer(), bright, generator())
    offset, _ = Trainer.sample_noise(fake_trainer(noise_offset=0.1), bright, generator())
    adaptive, _ = Trainer.sample_noise(fake_trainer(noise_offset=0.1, adaptive_noise_scale=0.5), bright, generator())
    # the same draws: the per-channel shift is offset x N(0,1), with offset 0.1 or 0.1 + 0.5 x |3|
    shift, shift_adaptive = (offset - base).mean(dim=(2, 3)), (adaptive - base).mean(dim=(2, 3))
    torch.testing.assert_close(shift_adaptive, shift * (0.1 + 0.5 * 3) / 0.1, rtol=1e-4, atol=1e-5)


def test_zero_terminal_snr_ends_in_pure_noise_and_keeps_the_first_step():
    import numpy as np
    from diffusers import DDPMScheduler

    from lorakit.trainer.loop import training_noise_scheduler

    original = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    fixed = training_noise_scheduler(original.config, zero_terminal_snr=True)
    # Lin et al. 2023, algorithm 1: shift sqrt(alpha_bar) so the last is 0, scale so the first is unchanged
    root = np.sqrt(original.alphas_cumprod.numpy().astype(np.float64))
    root = (root - root[-1]) * root[0] / (root[0] - root[-1])
    np.testing.assert_allclose(fixed.alphas_cumprod.numpy(), root ** 2, rtol=1e-4, atol=1e-7)
    assert float(fixed.alphas_cumprod[-1]) == pytest.approx(0.0, abs=1e-7)


# ----- long captions: max_token_length ----------------------------------------------------------------
def test_max_token_length_150_keeps_a_long_captions_tail_in_two_chunks_of_75(tmp_path):
    from transformers import CLIPTokenizer

    from lorakit.trainer.prompts import chunk_ids, join_chunks
    from tests.tiny_models import write_tiny_clip_tokenizer

    tokenizer = CLIPTokenizer.from_pretrained(write_tiny_clip_tokenizer(tmp_path / "tok"))
    caption = ", ".join(f"t{i}" for i in range(40))  # 40 tags: about 120 tokens
    full = tokenizer(caption).input_ids[1:-1]
    assert 75 < len(full) <= 150
    ids = chunk_ids(tokenizer, [caption], 150)
    assert ids.shape == (1, 2, 77)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert ids[0, :, 0].tolist() == [bos, bos] and ids[0, 0, -1] == eos
    assert ids[0, 0, 1:76].tolist() + ids[0, 1, 1:76].tolist()[:len(full) - 75] == full
    assert chunk_ids(tokenizer, [caption], 75).shape == (1, 1, 77)
    hidden = torch.arange(2 * 77, dtype=torch.float32).reshape(2, 77, 1)  # position numbers stand for states
    joined = join_chunks(hidden, 1, 2)[0, :, 0].tolist()
    assert joined == [0] + list(range(1, 76)) + list(range(78, 153)) + [153]


def test_sdxl_long_captions_encode_to_152_states_and_cut_captions_are_reported(tmp_path):
    from lorakit.manifest import Manifest
    from tests.tiny_models import build_tiny_sdxl

    sdxl = build_tiny_sdxl(tmp_path / "sdxl")
    dataset = make_dataset(tmp_path / "d", subsets=(("outfit", 2, 1),))
    manifest = Manifest.load(dataset)
    manifest.images[0].caption = ", ".join(f"t{i}" for i in range(40))
    manifest.save()
    trainer = prepared(dataset, settings(sdxl, tmp_path / "x.safetensors", max_token_length=150))
    context, pooled = trainer.encode_prompts([manifest.images[0].caption, "mychar"])
    assert context.shape[:2] == (2, 152) and pooled.shape[0] == 2
    loss = trainer.accumulate([(0,)], epoch=0, first_index=0)
    assert all(map(lambda x: x == x, loss))
    short = Trainer(dataset, settings(sdxl, tmp_path / "y.safetensors"), quiet())
    short.setup()
    assert "1 of 2 captions are longer than max_token_length 75" in short.console.file.getvalue()
    assert "set max_token_length 150" in short.console.file.getvalue()


# ----- optimisers, LoRA+, learning rates, max-norm --------------------------------------------------
def tiny_network(model, **settings):
    from lorakit.trainer.config import validate_settings
    from lorakit.trainer.models import load_base_model
    from lorakit.trainer.network import LoraNetwork

    config = validate_settings({"network_dim": 4, "network_alpha": 2, **settings})
    return LoraNetwork.create(load_base_model(model), config), config


@pytest.mark.parametrize("name,cls", [("adamw", "torch.optim.adamw.AdamW"), ("prodigy", "prodigyopt.prodigy.Prodigy"),
                                      ("dadaptation", "dadaptation.dadapt_adam.DAdaptAdam"),
                                      ("lion", "lion_pytorch.lion_pytorch.Lion"), ("came", "came_pytorch.CAME.CAME"),
                                      ("torch.optim.SGD", "torch.optim.sgd.SGD")])
def test_optimizer_presets_and_dotted_paths_build_and_step(name, cls):
    from lorakit.trainer.config import validate_settings
    from lorakit.trainer.optim import make_optimizer

    config = validate_settings({"optimizer": name})
    weight = torch.nn.Parameter(torch.ones(3, 3))
    optimizer = make_optimizer(config.optimizer, [{"params": [weight], "lr": config.learning_rate, "name": "unet"}],
                               weight_decay=config.weight_decay, extra=config.optimizer_args, device="cpu")
    assert f"{type(optimizer).__module__}.{type(optimizer).__name__}" == cls
    (weight ** 2).sum().backward()
    optimizer.step()
    assert not torch.equal(weight.detach(), torch.ones(3, 3))
    assert config.learning_rate == (1.0 if name in ("prodigy", "dadaptation") else 1e-4)


def test_bad_optimizer_names_say_what_is_accepted():
    from lorakit.plugin_sdk import LorakitError
    from lorakit.trainer.config import validate_settings
    from lorakit.trainer.optim import make_optimizer

    with pytest.raises(LorakitError, match="'optimizer' = 'sgd'.*one of adamw, adamw8bit, prodigy.*dotted path"):
        validate_settings({"optimizer": "sgd"})
    with pytest.raises(LorakitError, match="cannot import nosuchpackage"):
        make_optimizer("nosuchpackage.Opt", [], weight_decay=0, extra={}, device="cpu")
    assert validate_settings({"optimizer": "dadaptation.DAdaptLion"}).learning_rate == 1.0  # kohya: dadapt* adapts


def test_loraplus_puts_the_up_matrices_in_groups_at_ratio_times_the_rate(sd15):
    network, _ = tiny_network(sd15, learning_rate=1e-4, text_encoder_lr=5e-5, loraplus_lr_ratio=16)
    groups = {g["name"]: g for g in network.parameter_groups()}
    assert {name: g["lr"] for name, g in groups.items()} == pytest.approx(
        {"unet": 1e-4, "unet_up": 16e-4, "text_encoder": 5e-5, "text_encoder_up": 80e-5})
    ups = {id(p) for layer in network.layers.values() for p in layer.lora_B["default"].parameters()}
    assert all(id(p) in ups for p in groups["unet_up"]["params"] + groups["text_encoder_up"]["params"])
    assert not any(id(p) in ups for p in groups["unet"]["params"] + groups["text_encoder"]["params"])
    total = sum(len(g["params"]) for g in groups.values())
    assert total == len(network.parameters())


def test_sdxl_text_encoders_get_their_own_rates(tmp_path):
    from tests.tiny_models import build_tiny_sdxl

    network, _ = tiny_network(build_tiny_sdxl(tmp_path / "sdxl"), text_encoder_lr=1e-5, text_encoder_2_lr=3e-5)
    rates = {g["name"]: g["lr"] for g in network.parameter_groups()}
    assert rates == {"unet": 1e-4, "text_encoder": 1e-5, "text_encoder_2": 3e-5}


def test_scale_weight_norms_caps_each_layers_change_at_the_max_norm(sd15):
    network, _ = tiny_network(sd15, network_dim=4, network_alpha=2)
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in network.layers.values():
            layer.lora_B["default"].weight.normal_(0, 1.0)
    def change(layer):  # up @ down x alpha / dim, written out (Linear and 1x1 conv layers)
        up, down = layer.lora_B["default"].weight, layer.lora_A["default"].weight
        return (up.flatten(1) @ down.flatten(1)) * 2 / 4
    before = {name: change(layer).norm().item() for name, layer in network.layers.items()}
    limit = sorted(before.values())[len(before) // 2]  # half the layers are above it
    scaled, _, largest = network.apply_max_norm(limit)
    after = {name: change(layer).norm().item() for name, layer in network.layers.items()}
    assert scaled == sum(1 for n in before.values() if n > limit) > 0
    assert largest == pytest.approx(limit, rel=1e-4)
    for name, norm in before.items():
        assert after[name] == pytest.approx(min(norm, limit), rel=1e-4)


# ----- planning: --dry-run without the weights, validate before work -------------------------------------
def test_dry_run_without_the_weights_takes_the_model_type_and_prints_the_run(tmp_path):
    from lorakit.plugin_sdk import LorakitError
    from lorakit.trainer.api import dry_run
    from lorakit.trainer.config import validate_settings

    dataset = make_dataset(tmp_path / "d")
    missing = str(tmp_path / "models" / "sdxl.safetensors")
    config = validate_settings({"base_model": missing, "model_type": "sdxl", "optimizer": "prodigy", "network_dim": 8,
                                "network_alpha": 4, "resolution": 64, "output": str(tmp_path / "me.safetensors")})
    console = quiet()
    plan = dry_run(dataset, config, console=console)
    text = console.file.getvalue()
    assert plan.model["is_sdxl"] and not plan.model["counted"]
    for expected in ("prodigyopt.Prodigy", "learning rate UNet 1", "dim 8, alpha 4 (scale 0.5)",
                     "cosine_with_restarts", str(tmp_path / "me.safetensors"), "s per step"):
        assert expected in text.replace("\n", " "), expected
    assert plan.seconds_per_step > 0
    with pytest.raises(LorakitError, match="pass --model-type sd15 or sdxl"):
        dry_run(dataset, config.replace(model_type=None), console=quiet())


def test_dry_run_lists_each_blocks_dim_alpha_and_lr_weight(tmp_path):
    from lorakit.trainer.api import dry_run
    from lorakit.trainer.config import validate_settings

    dataset = make_dataset(tmp_path / "d")
    dims = ",".join(str(d) for d in [2] * 12 + [4] + [8] * 12)
    config = validate_settings({"base_model": str(tmp_path / "none.safetensors"), "model_type": "sd15",
                                "network_dim": 8, "network_alpha": 4, "resolution": 64,
                                "network_args": [f"block_dims={dims}", "up_lr_weight=zeros"]})
    console = quiet()
    plan = dry_run(dataset, config, console=console)
    rows = {row["block"]: row for row in plan.blocks}
    assert len(rows) == 25
    assert rows["IN00"] == {"block": "IN00", "lr_weight": 1.0, "dim": 2, "alpha": 4, "conv_dim": 0, "conv_alpha": None}
    assert rows["MID"]["dim"] == 4 and rows["MID"]["lr_weight"] == 1.0
    assert rows["OUT05"]["dim"] == 0 and rows["OUT05"]["lr_weight"] == 0.0  # weight 0: no LoRA in that block
    text = console.file.getvalue()
    assert "UNet blocks" in text and "OUT11" in text
    assert plan.as_dict()["blocks"][0]["block"] == "IN00"
    plain = dry_run(dataset, validate_settings({"base_model": str(tmp_path / "none.safetensors"),
                                                "model_type": "sd15", "resolution": 64}), console=quiet())
    assert plain.blocks is None


def test_validate_names_a_missing_local_base_model_before_any_work(tmp_path):
    import yaml

    from conftest import run_cli

    (tmp_path / "raw").mkdir()
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"sources": [{"folder": {"path": "raw"}}], "output": "out",
                                    "train": {"base_model": "models/sd15.safetensors", "vae": "owner/vae"}}))
    proc = run_cli("validate", str(path))
    assert proc.returncode != 0
    assert "train setting 'base_model'" in proc.stderr + proc.stdout and "no such file or folder" in proc.stderr + proc.stdout
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "sd15.safetensors").write_bytes(b"")
    proc = run_cli("validate", str(path))
    assert proc.returncode == 0, proc.stderr  # a hub id (owner/vae) is the loader's business


# ----- re-runs -------------------------------------------------------------------------------------------
def test_an_unchanged_run_is_not_trained_again_and_another_runs_output_is_never_overwritten(sd15, tmp_path):
    from lorakit.manifest import Manifest
    from lorakit.plugin_sdk import LorakitError
    from lorakit.trainer import kohya_format
    from lorakit.trainer.api import train

    dataset = make_dataset(tmp_path / "d")
    out = tmp_path / "o" / "lora.safetensors"
    train(dataset, settings(sd15, out, max_train_steps=1), console=quiet())
    first = out.read_bytes()
    console = quiet()
    assert train(dataset, settings(sd15, out, max_train_steps=1), console=console) == out
    assert "already trained" in console.file.getvalue() and out.read_bytes() == first
    with pytest.raises(LorakitError, match="lora.safetensors exists, from another dataset or other settings; pass --force"):
        train(dataset, settings(sd15, out, max_train_steps=1, network_dim=2), console=quiet())
    manifest = Manifest.load(dataset)
    manifest.images[0].caption = "mychar, green hair"
    manifest.save()
    with pytest.raises(LorakitError, match="pass --force"):  # an edited caption is another dataset
        train(dataset, settings(sd15, out, max_train_steps=1), console=quiet())
    assert out.read_bytes() == first
    train(dataset, settings(sd15, out, max_train_steps=1, network_dim=2), console=quiet(), force=True)
    assert kohya_format.read(out)[1]["ss_network_dim"] == "2"


def test_a_run_with_the_kohya_options_writes_kohyas_metadata_for_them(sd15, square_dataset, tmp_path):
    from lorakit.trainer import kohya_format
    from lorakit.trainer.api import train

    out = train(square_dataset, settings(sd15, tmp_path / "k.safetensors", max_train_steps=2, max_token_length=150,
                                         zero_terminal_snr=True, v_prediction=True, multires_noise_iterations=4,
                                         scale_weight_norms=1.0, debiased_estimation_loss=True,
                                         noise_offset=0.05, noise_offset_random_strength=True,
                                         caption_dropout_every_n_epochs=2, loraplus_lr_ratio=4),
                console=quiet())
    tensors, meta = kohya_format.read(out)
    assert all(torch.isfinite(t).all() for t in tensors.values())
    assert (meta["ss_max_token_length"], meta["ss_zero_terminal_snr"], meta["ss_multires_noise_iterations"]) == \
        ("150", "True", "4")
    assert (meta["ss_scale_weight_norms"], meta["ss_debiased_estimation"], meta["ss_noise_offset_random_strength"],
            meta["ss_caption_dropout_every_n_epochs"]) == ("1.0", "True", "True", "2")
    assert (meta["ss_min_bucket_reso"], meta["ss_max_bucket_reso"]) == ("32", "128")


def test_rank_and_module_dropout_are_kohyas_on_the_down_output(sd15):
    network, _ = tiny_network(sd15, network_dim=4, network_alpha=2, rank_dropout=0.5)
    name, layer = next((n, l) for n, l in network.layers.items() if isinstance(l.base_layer, torch.nn.Linear))
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    down, up = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(6, down.shape[1])
    layer.train()
    torch.manual_seed(3)
    got = layer(x)
    torch.manual_seed(3)
    mask = (torch.rand(6, 4) > 0.5).float()  # kohya: a rank survives when rand > p, then x 1 / (1 - p)
    expected = layer.base_layer(x) + ((x @ down.T) * mask / 0.5) @ up.T * (2 / 4)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    layer.eval()  # no dropout when not training
    torch.testing.assert_close(layer(x), layer.base_layer(x) + (x @ down.T) @ up.T * 0.5, rtol=1e-5, atol=1e-6)
    skipped, _ = tiny_network(sd15, module_dropout=1.0)
    layer = next(l for l in skipped.layers.values() if isinstance(l.base_layer, torch.nn.Linear))
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    layer.train()
    x = torch.randn(2, layer.lora_A["default"].weight.shape[1])
    torch.testing.assert_close(layer(x), layer.base_layer(x))
