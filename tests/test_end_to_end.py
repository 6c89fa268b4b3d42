"""The main job, end to end: the quick-start pipeline (sample pictures -> dataset) followed by its
`train:` section on a tiny random SD1.5 model, through the real `lorakit run` command."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml
from safetensors import safe_open

from conftest import run_cli
from lorakit.plugin_sdk.testing import assert_valid_manifest
from tiny_models import build_tiny_sd15

QUICKSTART = Path(__file__).parent.parent / "examples" / "quickstart"


def test_quickstart_pipeline_then_training_writes_a_kohya_lora(tmp_path):
    shutil.copytree(QUICKSTART / "raw", tmp_path / "raw")
    pipeline = yaml.safe_load((QUICKSTART / "pipeline.yaml").read_text())
    base = build_tiny_sd15(tmp_path / "tiny-sd15")
    pipeline["resolution"] = 64
    pipeline["train"] = {"base_model": str(base), "output": "mychar.safetensors", "max_train_steps": 2,
                         "network_dim": 4, "network_alpha": 2, "resolution": 64, "min_bucket_reso": 32,
                         "max_bucket_reso": 128, "bucket_reso_steps": 32, "device": "cpu"}
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(pipeline))

    proc = run_cli("run", str(tmp_path / "pipeline.yaml"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = assert_valid_manifest(tmp_path / "dataset")
    assert {r.subset for r in manifest.images} == {"mychar"}
    assert all(r.caption.startswith("mychar") for r in manifest.images)
    assert "1 x dedupe: near duplicate" in proc.stderr  # the re-saved WEBP

    lora = tmp_path / "mychar.safetensors"
    with safe_open(str(lora), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in keys)
    assert any(k.startswith("lora_te_") for k in keys)
    assert meta["ss_network_dim"] == "4"
    assert "mychar" in json.loads(meta["ss_tag_frequency"])[f"{manifest.subsets['mychar'].repeats}_mychar"]
    assert "mychar" in meta["modelspec.trigger_phrase"]


def test_unchanged_rerun_of_the_quickstart_says_nothing_changed(tmp_path):
    shutil.copytree(QUICKSTART / "raw", tmp_path / "raw")
    shutil.copy(QUICKSTART / "pipeline.yaml", tmp_path / "pipeline.yaml")
    first = run_cli("run", str(tmp_path / "pipeline.yaml"))
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_cli("run", str(tmp_path / "pipeline.yaml"))
    assert second.returncode == 0
    assert "Nothing changed since the last run" in second.stderr


def test_run_output_option_writes_elsewhere_and_leaves_the_example_folder_alone(tmp_path):
    before = sorted(p.name for p in QUICKSTART.iterdir())
    proc = run_cli("run", str(QUICKSTART / "pipeline.yaml"), "--output", str(tmp_path / "qs"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "qs" / "manifest.json").is_file()
    assert sorted(p.name for p in QUICKSTART.iterdir()) == before
