"""The ``ss_*`` metadata key by key as kohya's train_network.py writes it (names, formats, meanings)."""
from __future__ import annotations

import hashlib
import io
import json
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console

from lorakit.manifest import Manifest
from lorakit.trainer import kohya_format
from lorakit.trainer.api import train, validate_settings
from lorakit.trainer.data import build_training_data
from tests.test_train import make_dataset, settings
from tests.tiny_models import build_tiny_sd15


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    # 4 training images x 2 repeats, 3 reg images x 1 repeat
    return make_dataset(tmp_path_factory.mktemp("data") / "ds", subsets=(("outfit", 4, 2),), reg=(("reg_1girl", 3, 1),))


def meta_for(dataset, base_source, tmp_path, **extra):
    """metadata() on the real training data of ``dataset``, without a model (the base is described)."""
    manifest = Manifest.load(dataset)
    for sub in manifest.subsets.values():
        if sub.is_reg:
            sub.class_tokens = "1girl"
    config = validate_settings({"base_model": str(base_source), "resolution": 64, "min_bucket_reso": 32,
                                "max_bucket_reso": 128, "bucket_reso_steps": 32, **extra}, "test")
    data = build_training_data(manifest, config, 64)
    tensors = {"lora_unet_x.lora_down.weight": torch.ones(2, 3), "lora_unet_x.lora_up.weight": torch.ones(3, 2),
               "lora_unet_x.alpha": torch.tensor(1.0)}
    base = SimpleNamespace(source=str(base_source), is_sdxl=False, v_prediction=False)
    return kohya_format.metadata(config=config, data=data, manifest=manifest, base=base, network=None, epoch=1,
                                 step=8, max_steps=8, started_at=0.0, session_id="1", output_name="x",
                                 tensors=tensors, num_epochs=1, mixed_precision="no"), tensors


def test_image_counts_include_repeats_and_reg_dirs_are_separate(dataset, tmp_path):
    meta, _ = meta_for(dataset, "some/hub-id", tmp_path)
    assert meta["ss_num_train_images"] == "8"  # 4 images x 2 repeats (kohya: num_train_images)
    assert meta["ss_num_reg_images"] == "3"
    assert json.loads(meta["ss_dataset_dirs"]) == {"2_outfit": {"n_repeats": 2, "img_count": 4}}
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {"1_1girl": {"n_repeats": 1, "img_count": 3}}
    assert set(json.loads(meta["ss_tag_frequency"])) == {"2_outfit", "1_1girl"}


def test_folder_names_are_the_ones_export_kohya_writes(dataset, tmp_path):
    from lorakit.kohya import export_kohya

    meta, _ = meta_for(dataset, "hub", tmp_path)
    manifest = Manifest.load(dataset)
    for sub in manifest.subsets.values():
        if sub.is_reg:
            sub.class_tokens = "1girl"
    export_kohya(manifest, tmp_path / "out")
    written = {p.name for p in (tmp_path / "out").glob("*/*_*") if p.is_dir() and p.parent.name in ("img", "reg")}
    keys = set(json.loads(meta["ss_dataset_dirs"])) | set(json.loads(meta["ss_reg_dataset_dirs"]))
    assert keys == written


def test_ss_datasets_describes_each_subset_like_kohya(dataset, tmp_path):
    meta, _ = meta_for(dataset, "hub", tmp_path, batch_size=2, gradient_accumulation_steps=3)
    (ds,) = json.loads(meta["ss_datasets"])
    assert ds["is_dreambooth"] is True and ds["num_train_images"] == 8 and ds["num_reg_images"] == 3
    assert ds["resolution"] == [64, 64] and ds["batch_size_per_device"] == 2
    by_dir = {s["image_dir"]: s for s in ds["subsets"]}
    assert by_dir["2_outfit"]["num_repeats"] == 2 and by_dir["2_outfit"]["img_count"] == 4
    assert by_dir["1_1girl"]["is_reg"] is True and by_dir["1_1girl"]["class_tokens"] == "1girl"
    assert meta["ss_total_batch_size"] == "6"


def test_kohya_keys_that_lorakit_fixes_are_written_with_kohyas_values(dataset, tmp_path):
    meta, _ = meta_for(dataset, "hub", tmp_path)
    assert meta["ss_max_token_length"] == "None"
    assert meta["ss_zero_terminal_snr"] == "False"
    assert meta["ss_random_crop"] == "False" and meta["ss_color_aug"] == "False"
    assert meta["ss_mixed_precision"] == "no"


def test_model_hashes_are_kohyas_for_a_file_and_absent_for_a_hub_id(dataset, tmp_path):
    model = tmp_path / "base.safetensors"
    blob = bytes(range(256)) * (0x120000 // 256)
    model.write_bytes(blob)
    meta, _ = meta_for(dataset, model, tmp_path, vae=str(model))
    assert meta["ss_sd_model_name"] == "base.safetensors"
    assert meta["ss_sd_model_hash"] == hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]
    assert meta["ss_new_sd_model_hash"] == hashlib.sha256(blob).hexdigest()
    assert meta["ss_vae_name"] == "base.safetensors"
    assert meta["ss_vae_hash"] == meta["ss_sd_model_hash"] and meta["ss_new_vae_hash"] == meta["ss_new_sd_model_hash"]
    hub, _ = meta_for(dataset, "org/model", tmp_path)
    assert hub["ss_sd_model_name"] == "org/model"
    assert "ss_sd_model_hash" not in hub and "ss_vae_name" not in hub


def test_sshs_hashes_are_kohyas_precalculated_hashes(dataset, tmp_path):
    from safetensors.torch import save

    big = {"lora_unet_x.lora_down.weight": torch.arange(300_000, dtype=torch.float32).reshape(1000, 300)}
    meta, _ = meta_for(dataset, "hub", tmp_path)
    legacy = kohya_format.legacy_hash(big, meta)
    blob = save(big, {k: v for k, v in meta.items() if k.startswith("ss_")})
    assert len(blob) > 0x110000
    assert legacy == hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]
    header = int.from_bytes(blob[:8], "little")
    assert kohya_format.tensors_hash(big) == hashlib.sha256(blob[8 + header:]).hexdigest()


def test_a_run_ended_by_max_train_steps_records_its_real_epoch_count(tmp_path):
    sd15 = build_tiny_sd15(tmp_path / "sd15")
    data = make_dataset(tmp_path / "ds")  # 4 images x 2 repeats = 8 steps per epoch
    out = train(data, settings(sd15, tmp_path / "x.safetensors", epochs=5, max_train_steps=9),
                console=Console(file=io.StringIO()))
    tensors, meta = kohya_format.read(out)
    assert meta["ss_num_epochs"] == "2" and meta["ss_max_train_steps"] == "9" and meta["ss_steps"] == "9"
    assert meta["ss_mixed_precision"] == "no"  # the CPU trains in fp32: the resolved value, not "auto"
    assert meta["sshs_legacy_hash"] == kohya_format.legacy_hash(tensors, meta)
    assert meta["sshs_model_hash"] == kohya_format.tensors_hash(tensors)
