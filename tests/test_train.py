"""The LoRA trainer on tiny random-weight SD1.5 / SDXL models: files, formats, schedule, resume, NaN."""
from __future__ import annotations

import hashlib
import io
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

from lorakit.manifest import ImageRecord, Manifest
from lorakit.plugin_sdk import LorakitError, Subset
from lorakit.trainer import kohya_format
from lorakit.trainer.api import dry_run, train, validate_settings
from lorakit.trainer.data import TrainImage, build_training_data, make_caption
from lorakit.trainer.loop import TrainingStopped
from lorakit.trainer.models import load_pipeline


# ----- fixtures ----------------------------------------------------------------------------------
def make_dataset(root: Path, subsets=(("outfit", 4, 2),), reg=(), masks: str | None = None, seed: int = 0) -> Path:
    """A dataset folder with manifest.json: random PNGs of three shapes, tag captions, a trigger."""
    root.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(root=root, resolution=64)
    rng = np.random.default_rng(seed)
    sizes = [(64, 64), (96, 64), (64, 128)]
    for name, count, repeats, is_reg in [(*s, False) for s in subsets] + [(*r, True) for r in reg]:
        manifest.subsets[name] = Subset(name=name, repeats=repeats, triggers=[] if is_reg else ["mychar"],
                                        keep_tokens=1, is_reg=is_reg)
        (root / name).mkdir(exist_ok=True)
        for i in range(count):
            w, h = sizes[i % len(sizes)]
            path = root / name / f"{i:03d}.png"
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
            mask = None
            if masks is not None:
                (root / "masks").mkdir(exist_ok=True)
                value = 255 if masks == "white" else 0
                Image.new("L", (w, h), value).save(root / "masks" / f"{name}_{i:03d}.png")
                mask = f"masks/{name}_{i:03d}.png"
            caption = "1girl, solo" if is_reg else "mychar, red hair, blue eyes, smile"
            manifest.images.append(ImageRecord(
                path=f"{name}/{path.name}", caption=caption, subset=name, width=w, height=h,
                sha256=hashlib.sha256(path.read_bytes()).hexdigest(), repeats=repeats, is_reg=is_reg, mask=mask))
    manifest.save()
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "dataset")


def settings(base, output: Path, **extra):
    values = {"base_model": str(base), "output": str(output), "resolution": 64, "min_bucket_reso": 32,
              "max_bucket_reso": 128, "bucket_reso_steps": 32, "network_dim": 4, "network_alpha": 2, "epochs": 1,
              "learning_rate": 1e-2, "save_precision": "fp32", "lr_scheduler": "constant"}
    values.update(extra)
    return validate_settings(values, "test")


def quiet():
    return Console(file=io.StringIO(), width=120)


def lora_layers(pipe) -> list:
    from peft.tuners.lora import LoraLayer

    parts = [pipe.unet, pipe.text_encoder] + ([pipe.text_encoder_2] if hasattr(pipe, "text_encoder_2") else [])
    return [m for part in parts for m in part.modules() if isinstance(m, LoraLayer)]


def render(pipe, prompt="mychar, red hair"):
    return pipe(prompt, num_inference_steps=2, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


@pytest.fixture(scope="module")
def sd15_lora(sd15, dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "mychar.safetensors"
    return train(dataset, settings(sd15, out), console=quiet())


# ----- the file: diffusers loads it, kohya names, metadata -------------------------------------------
def assert_loads_completely(pipe, path: Path, scales: bool = True) -> None:
    """Every lora_down in the file became an adapter in the pipeline with the file's scale
    (alpha / rank, as kohya, A1111 and ComfyUI apply it), and the output changed."""
    tensors, _ = kohya_format.read(path)
    before = render(pipe)
    pipe.load_lora_weights(str(path))
    after = render(pipe)
    downs = sorted(k for k in tensors if k.endswith(".lora_down.weight"))
    layers = lora_layers(pipe)
    assert len(layers) == len(downs)
    file_norms = sorted(round(float(tensors[k].float().norm()), 4) for k in downs)
    loaded_norms = sorted(round(float(next(iter(m.lora_A.values())).weight.detach().float().norm()), 4) for m in layers)
    assert file_norms == loaded_norms
    if scales:  # by value: the names differ between the file and diffusers (SDXL's LDM names)
        file_scales = sorted((tensors[k].shape[0], round(float(tensors[k[:-len(".lora_down.weight")] + ".alpha"])
                                                           / tensors[k].shape[0], 6)) for k in downs)
        loaded_scales = sorted((next(iter(m.r.values())), round(float(next(iter(m.scaling.values()))), 6))
                               for m in layers)
        assert loaded_scales == file_scales
    assert np.abs(after - before).max() > 1e-3


def test_sd15_lora_loads_in_diffusers_with_every_key_used_and_changes_the_output(sd15, sd15_lora):
    assert_loads_completely(load_pipeline(sd15), sd15_lora)


def test_sd15_keys_are_kohya_names_with_alpha(sd15_lora):
    tensors, _ = kohya_format.read(sd15_lora)
    names = {k.split(".")[0] for k in tensors}
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_mid_block_attentions_0_proj_in" in names
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert "lora_te_text_model_encoder_layers_0_mlp_fc1" in names
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in tensors)
    for name in names:
        assert tensors[f"{name}.lora_down.weight"].shape[0] == 4
        assert float(tensors[f"{name}.alpha"]) == 2.0


def test_metadata_has_kohya_and_modelspec_fields(sd15_lora):
    _, meta = kohya_format.read(sd15_lora)
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert json.loads(meta["ss_tag_frequency"]) == {"2_outfit": {"mychar": 4, "red hair": 4, "blue eyes": 4, "smile": 4}}
    assert json.loads(meta["ss_dataset_dirs"]) == {"2_outfit": {"n_repeats": 2, "img_count": 4}}
    assert "mychar" in meta["ss_training_comment"]
    assert meta["modelspec.trigger_phrase"] == "mychar"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_num_train_images"] == "8" and meta["ss_steps"] == "8"  # 4 images x 2 repeats (kohya)
    tensors, _ = kohya_format.read(sd15_lora)
    assert meta["sshs_model_hash"] == kohya_format.tensors_hash(tensors)


def test_sdxl_lora_uses_te1_te2_prefixes_and_loads_in_diffusers(sdxl, dataset, tmp_path):
    path = train(dataset, settings(sdxl, tmp_path / "xl.safetensors"), console=quiet())
    tensors, meta = kohya_format.read(path)
    prefixes = {k.split("_text_model")[0] for k in tensors if k.startswith("lora_te")}
    assert prefixes == {"lora_te1", "lora_te2"}
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert_loads_completely(load_pipeline(sdxl), path)


def test_locon_puts_conv_rank_on_resnet_convs_and_loads_in_diffusers(sd15, dataset, tmp_path):
    path = train(dataset, settings(sd15, tmp_path / "locon.safetensors", conv_dim=3, conv_alpha=1), console=quiet())
    tensors, meta = kohya_format.read(path)
    down = tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"]
    assert tuple(down.shape[:1]) == (3,) and tuple(down.shape[2:]) == (3, 3)
    assert float(tensors["lora_unet_down_blocks_0_resnets_0_conv1.alpha"]) == 1.0
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "3", "conv_alpha": "1.0"}
    assert_loads_completely(load_pipeline(sd15), path)


def test_dora_writes_one_magnitude_per_input_channel_by_default(sd15, dataset, tmp_path):
    path = train(dataset, settings(sd15, tmp_path / "dora.safetensors", dora=True), console=quiet())
    tensors, _ = kohya_format.read(path)
    down = tensors["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"]
    scale = tensors["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.dora_scale"]
    assert tuple(scale.shape) == (1, down.shape[1])
    assert torch.all(scale > 0)


@pytest.mark.parametrize("precision,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_save_precision_sets_the_tensor_dtype(sd15, dataset, tmp_path, precision, dtype):
    path = train(dataset, settings(sd15, tmp_path / "p.safetensors", save_precision=precision, max_train_steps=1),
                 console=quiet())
    tensors, meta = kohya_format.read(path)
    assert {t.dtype for t in tensors.values()} == {dtype}
    assert meta["ss_save_precision"] == precision


# ----- running: epochs, keep-last-N, resume, NaN -----------------------------------------------------------
def test_every_n_epochs_saves_numbered_files_and_keeps_the_last_n(sd15, dataset, tmp_path):
    out = tmp_path / "run" / "mychar.safetensors"
    train(dataset, settings(sd15, out, epochs=4, save_every_n_epochs=1, save_last_n_epochs=2, save_state=True),
          console=quiet())
    names = sorted(p.name for p in out.parent.iterdir())
    assert "mychar-000001.safetensors" not in names and "mychar-000001-state" not in names
    assert {"mychar-000002.safetensors", "mychar-000003.safetensors", "mychar.safetensors"} <= set(names)
    _, meta = kohya_format.read(out.parent / "mychar-000002.safetensors")
    assert meta["ss_epoch"] == "2" and meta["ss_steps"] == "16"


def test_keep_last_n_deletes_only_this_sessions_epoch_files(sd15, dataset, tmp_path):
    from safetensors.torch import save_file

    out = tmp_path / "run" / "mychar.safetensors"
    out.parent.mkdir(parents=True)
    # A later epoch of another run (kept by --force) and another output whose name starts the same.
    foreign = out.parent / "mychar-000009.safetensors"
    save_file({"x": torch.zeros(1)}, str(foreign), metadata={"ss_session_id": "12345"})
    lookalike = out.parent / "mychar-2-000001.safetensors"
    save_file({"x": torch.zeros(1)}, str(lookalike), metadata={"ss_session_id": "12345"})
    train(dataset, settings(sd15, out, epochs=4, save_every_n_epochs=1, save_last_n_epochs=2), console=quiet(),
          force=True)
    names = {p.name for p in out.parent.iterdir()}
    assert {"mychar-000002.safetensors", "mychar-000003.safetensors", foreign.name, lookalike.name} <= names, sorted(names)
    assert "mychar-000001.safetensors" not in names


def test_resume_continues_at_the_exact_step_and_epoch_with_identical_weights(sd15, dataset, tmp_path):
    extra = dict(epochs=2, save_every_n_epochs=1, save_state=True, optimizer="adamw", lr_scheduler="cosine",
                 shuffle_caption=True, caption_tag_dropout_rate=0.3, flip_aug=True, noise_offset=0.1)
    straight = train(dataset, settings(sd15, tmp_path / "a" / "lora.safetensors", **extra), console=quiet())
    state = tmp_path / "a" / "lora-000001-state"
    assert json.loads((state / "state.json").read_text())["global_step"] == 8
    console = quiet()
    resumed = train(dataset, settings(sd15, tmp_path / "b" / "lora.safetensors", resume=str(state), **extra),
                    console=console)
    assert "epoch 1, step 8" in console.file.getvalue()
    a, meta_a = kohya_format.read(straight)
    b, meta_b = kohya_format.read(resumed)
    assert meta_b["ss_steps"] == meta_a["ss_steps"] == "16"
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_weights(sd15, dataset, tmp_path, monkeypatch):
    from lorakit.trainer.loop import Trainer

    calls = {"n": 0}
    original = Trainer.encode_prompts

    def poisoned(self, captions):
        # A hook on the text side: from the 11th batch on, the UNet's conditioning holds a NaN.
        context, pooled = original(self, captions)
        calls["n"] += 1
        if calls["n"] > 10:
            context = context.clone()
            context[..., 0] = float("nan")
        return context, pooled

    monkeypatch.setattr(Trainer, "encode_prompts", poisoned)
    out = tmp_path / "nan" / "lora.safetensors"
    with pytest.raises(TrainingStopped, match=r"loss became nan at step 11 \(epoch 2\).*last good checkpoint"):
        train(dataset, settings(sd15, out, epochs=3, save_every_n_epochs=1), console=quiet())
    assert not out.exists()
    assert (out.parent / "lora-000001.safetensors").is_file()
    kept, meta = kohya_format.read(out.parent / "lora-last-good.safetensors")
    assert meta["ss_steps"] == "10"
    assert all(torch.isfinite(t).all() for t in kept.values())


def test_infinite_learning_rate_is_stopped_with_a_clear_message(sd15, dataset, tmp_path):
    with pytest.raises(TrainingStopped, match="Lower the learning rate"):
        train(dataset, settings(sd15, tmp_path / "inf.safetensors", learning_rate=float("inf"), max_grad_norm=0),
              console=quiet())


# ----- options that change the training --------------------------------------------------------------
def test_all_black_masks_mean_no_learning_white_masks_learn(sd15, tmp_path):
    black = make_dataset(tmp_path / "black", masks="black")
    white = make_dataset(tmp_path / "white", masks="white")
    ups = {}
    for name, ds in (("black", black), ("white", white)):
        path = train(ds, settings(sd15, tmp_path / f"{name}.safetensors", masked_loss=True, train_text_encoder=False,
                                  weight_decay=0.0), console=quiet())
        tensors, _ = kohya_format.read(path)
        ups[name] = max(float(t.abs().max()) for k, t in tensors.items() if k.endswith("lora_up.weight"))
    assert ups["black"] == 0.0
    assert ups["white"] > 0.0


def test_v_prediction_huber_min_snr_noise_options_train_to_a_finite_file(sd15, dataset, tmp_path):
    path = train(dataset, settings(sd15, tmp_path / "v.safetensors", v_prediction=True, loss_type="huber",
                                   huber_schedule="snr", min_snr_gamma=5, noise_offset=0.1, ip_noise_gamma=0.1,
                                   clip_skip=2, caption_dropout_rate=0.5, token_warmup_step=4),
                 console=quiet())
    tensors, meta = kohya_format.read(path)
    assert meta["ss_v_parameterization"] == "True" and meta["modelspec.prediction_type"] == "v"
    assert all(torch.isfinite(t).all() for t in tensors.values())


def test_prodigy_with_accumulation_and_checkpointing_counts_optimizer_steps(sd15, dataset, tmp_path):
    path = train(dataset, settings(sd15, tmp_path / "p.safetensors", optimizer="prodigy", learning_rate=1.0,
                                   gradient_accumulation_steps=3, gradient_checkpointing=True, batch_size=2),
                 console=quiet())
    _, meta = kohya_format.read(path)
    # 8 images x repeats in buckets 64x64 (6) and 32x96 / 64x128 (2): batches of 2 -> 4 + ... ; 3 per step
    assert meta["ss_steps"] == str(math.ceil(int(meta["ss_num_batches_per_epoch"]) / 3))
    assert meta["ss_optimizer"].startswith("prodigyopt.Prodigy")


def test_samples_and_tensorboard_logs_are_written(sd15, dataset, tmp_path):
    out = tmp_path / "s" / "lora.safetensors"
    train(dataset, settings(sd15, out, sample_every_n_epochs=1, sample_prompts=["mychar", "mychar, smile"],
                            sample_steps=2, logging_dir=str(tmp_path / "logs")), console=quiet())
    samples = sorted((out.parent / "samples").glob("*.png"))
    assert [p.name for p in samples] == ["lora-e000001-00.png", "lora-e000001-01.png"]
    assert Image.open(samples[0]).size == (64, 64)
    assert list((tmp_path / "logs").rglob("events.out.tfevents.*"))


def test_regularisation_images_fill_as_many_places_as_training_images(tmp_path):
    ds = make_dataset(tmp_path / "reg", subsets=(("outfit", 3, 2),), reg=(("1girl", 2, 1),))
    config = settings("unused", tmp_path / "x.safetensors", batch_size=1)
    data = build_training_data(Manifest.load(ds), config, 64)
    places = [i for batch in data.epoch_samples(0, 1) for i in batch]
    reg = [i for i in places if data.images[i].is_reg]
    assert len(places) - len(reg) == 6 and len(reg) == 6


# ----- data: buckets, batches, captions, latent cache ---------------------------------------------------
def test_batches_hold_one_bucket_and_repeats_count(dataset):
    config = settings("unused", Path("x.safetensors"), batch_size=3)
    data = build_training_data(Manifest.load(dataset), config, 64)
    batches = data.epoch_samples(0, 42)
    assert all(len({data.images[i].bucket for i in batch}) == 1 for batch in batches)
    assert sorted(i for b in batches for i in b) == sorted([0, 0, 1, 1, 2, 2, 3, 3])
    assert data.epoch_samples(0, 42) == batches and data.epoch_samples(1, 42) != batches


def test_buckets_are_kohyas_for_each_image(dataset):
    from lorakit.buckets import make_buckets, select_bucket

    config = settings("unused", Path("x.safetensors"))
    data = build_training_data(Manifest.load(dataset), config, 64)
    buckets = make_buckets(64, 32, 128, 32)
    for image in data.images:
        assert image.bucket == select_bucket(*image.size, buckets).bucket


def _image(caption, **kw):
    return TrainImage(path=Path("x.png"), caption=caption, subset="s", repeats=1, is_reg=False, size=(64, 64),
                      bucket=(64, 64), resized=(64, 64), **kw)


def test_shuffle_keeps_the_keep_tokens_first():
    image = _image("mychar, a, b, c, d, e", keep_tokens=1, shuffle_caption=True)
    captions = {make_caption(image, random.Random(i)) for i in range(20)}
    assert len(captions) > 1
    assert all(c.startswith("mychar, ") and sorted(c.split(", ")[1:]) == list("abcde") for c in captions)


def test_keep_tokens_separator_keeps_everything_before_it():
    image = _image("mychar, blue dress ||| a, b, c", shuffle_caption=True, keep_tokens_separator="|||")
    for i in range(10):
        assert make_caption(image, random.Random(i)).startswith("mychar, blue dress, ")


def test_caption_dropout_empties_and_tag_dropout_drops_only_unkept_tags():
    assert make_caption(_image("a, b", caption_dropout_rate=1.0), random.Random(0)) == ""
    assert make_caption(_image("mychar, a, b, c", keep_tokens=1, caption_tag_dropout_rate=1.0), random.Random(0)) == "mychar"


def test_token_warmup_grows_the_caption_over_the_warmup_steps():
    image = _image("a, b, c, d, e")
    lengths = [len(make_caption(image, random.Random(0), step=s, token_warmup_min=1, token_warmup_step=4).split(", "))
               for s in range(6)]
    assert lengths == [1, 2, 3, 4, 5, 5]


def test_disk_latent_cache_reencodes_only_an_edited_image(sd15, tmp_path):
    from lorakit.trainer.data import LatentCache
    from lorakit.trainer.models import load_base_model

    ds = make_dataset(tmp_path / "cache")
    config = settings(sd15, tmp_path / "x.safetensors")
    vae = load_base_model(sd15).vae
    folder = tmp_path / "latents"
    first = LatentCache(vae, "disk", folder, "cpu")
    first.fill(build_training_data(Manifest.load(ds), config, 64))
    assert first.encoded == 4
    again = LatentCache(vae, "disk", folder, "cpu")
    again.fill(build_training_data(Manifest.load(ds), config, 64))
    assert again.encoded == 0 and again.read_from_disk == 4
    edited = ds / "outfit" / "001.png"
    im = Image.open(edited).convert("RGB")
    Image.fromarray(255 - np.asarray(im)).save(edited)
    third = LatentCache(vae, "disk", folder, "cpu")
    third.fill(build_training_data(Manifest.load(ds), config, 64))
    assert third.encoded == 1 and third.read_from_disk == 3


# ----- settings, plan, command line --------------------------------------------------------------------
def test_bad_setting_names_key_value_and_expected_type():
    with pytest.raises(LorakitError, match=r"pipeline.yaml:7: train setting 'network_dim' = 'big' is invalid: expected an integer"):
        validate_settings({"network_dim": "big"}, "pipeline.yaml:7")
    with pytest.raises(LorakitError, match="unknown train setting 'netwrok_dim'.*did you mean 'network_dim'"):
        validate_settings({"netwrok_dim": 8}, "train.toml")
    with pytest.raises(LorakitError, match="'optimizer' = 'sgd'.*one of adamw, adamw8bit, prodigy"):
        validate_settings({"optimizer": "sgd"}, "cli")


def test_dry_run_plan_lists_subsets_buckets_and_steps(sd15, tmp_path):
    ds = make_dataset(tmp_path / "two", subsets=(("outfit", 3, 2), ("casual", 2, 5)))
    console = quiet()
    plan = dry_run(ds, settings(sd15, tmp_path / "x.safetensors", batch_size=2, epochs=3,
                                gradient_accumulation_steps=2), console=console)
    assert plan.subsets["outfit"]["per_epoch"] == 6 and plan.subsets["casual"]["per_epoch"] == 10
    assert sum(plan.buckets.values()) == 16
    assert plan.steps_per_epoch == math.ceil(plan.batches_per_epoch / 2)
    assert plan.total_steps == plan.steps_per_epoch * 3
    assert plan.memory["total"] > 0
    text = console.file.getvalue()
    assert "Total steps" in text and "64x64" in text and "casual" in text


def test_cli_train_with_config_file_writes_the_lora(sd15, dataset, tmp_path):
    from click.testing import CliRunner

    from lorakit.cli import cli

    config = tmp_path / "train.toml"
    config.write_text(
        f'base_model = "{sd15}"\nresolution = 64\nmin_bucket_reso = 32\nbucket_reso_steps = 32\n'
        'network_dim = 2\nnetwork_alpha = 1\nmax_train_steps = 2\n', encoding="utf-8")
    out = tmp_path / "cli.safetensors"
    result = CliRunner().invoke(cli, ["train", str(dataset), "--config", str(config), "--output", str(out),
                                      "--network-dim", "3"])
    assert result.exit_code == 0, result.output
    tensors, meta = kohya_format.read(out)
    assert meta["ss_network_dim"] == "3" and meta["ss_steps"] == "2"


def test_cli_bad_option_is_one_line_error_without_traceback(dataset):
    from click.testing import CliRunner

    from lorakit.cli import cli

    result = CliRunner().invoke(cli, ["train", str(dataset), "--network-dim", "x", "--base-model", "m"])
    assert result.exit_code != 0
    assert "network_dim" in result.output and "Traceback" not in result.output


def test_show_config_prints_every_default_as_toml():
    from click.testing import CliRunner

    from lorakit.cli import cli

    result = CliRunner().invoke(cli, ["train", "--show-config"])
    assert result.exit_code == 0
    import tomllib

    parsed = tomllib.loads(result.output)
    assert parsed["network_dim"] == 32 and parsed["optimizer"] == "adamw"
