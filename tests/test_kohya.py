"""kohya datasets: import (N_name folders, reg folders, dataset_config.toml) and export, and diffusers export."""
from __future__ import annotations

import json
import tomllib

import pytest
from PIL import Image

from conftest import run_cli
from lorakit.manifest import Manifest, load_dataset
from lorakit.plugin_sdk import LorakitError
from lorakit.plugin_sdk.testing import run_pipeline_dict


@pytest.fixture
def kohya_dir(tmp_path):
    root = tmp_path / "kohya"
    (root / "img" / "10_mychar").mkdir(parents=True)
    (root / "img" / "3_mychar outfit").mkdir(parents=True)
    (root / "reg" / "1_1girl").mkdir(parents=True)
    Image.new("RGB", (64, 64), "red").save(root / "img" / "10_mychar" / "a.png")
    (root / "img" / "10_mychar" / "a.txt").write_text("mychar, 1girl, smile")
    Image.new("RGB", (64, 48), "blue").save(root / "img" / "3_mychar outfit" / "b.jpg")
    (root / "img" / "3_mychar outfit" / "b.txt").write_text("mychar, dress")
    Image.new("RGB", (64, 64), "gray").save(root / "reg" / "1_1girl" / "r.png")
    (root / "mask" / "10_mychar").mkdir(parents=True)
    Image.new("L", (64, 64), 255).save(root / "mask" / "10_mychar" / "a.png")
    return root


def test_kohya_folders_import_with_repeats_reg_captions_and_masks(tmp_path, kohya_dir):
    res = run_pipeline_dict({"output": str(tmp_path / "ds"), "sources": [{"kohya": {"path": str(kohya_dir)}}]}, tmp_path)
    subsets = res.manifest.subsets
    assert subsets["mychar"].repeats == 10 and subsets["mychar_outfit"].repeats == 3
    assert subsets["reg_1girl"].is_reg and subsets["reg_1girl"].class_tokens == "1girl"
    a = res.by_name("a")
    assert a.caption == "mychar, 1girl, smile" and a.repeats == 10 and a.mask == "masks/mychar/a.png"
    assert res.by_name("r").is_reg


def test_hidden_files_in_a_concept_folder_are_not_pictures_of_it(tmp_path, kohya_dir):
    """kohya's own glob leaves out `.name` files (an editor's or a sync tool's leftovers)."""
    Image.new("RGB", (64, 64), "green").save(kohya_dir / "img" / "10_mychar" / ".a-backup.png")
    res = run_pipeline_dict({"output": str(tmp_path / "ds"), "sources": [{"kohya": {"path": str(kohya_dir)}}]}, tmp_path)
    assert sorted(r.path.rsplit("/", 1)[-1] for r in res.images) == ["a.png", "b.jpg", "r.png"]


def test_dataset_config_toml_import(tmp_path, kohya_dir):
    toml = tmp_path / "dataset_config.toml"
    toml.write_text(f'''[general]
shuffle_caption = true
[[datasets]]
resolution = 512
  [[datasets.subsets]]
  image_dir = "{kohya_dir / 'img' / '10_mychar'}"
  num_repeats = 4
  keep_tokens = 1
  conditioning_data_dir = "{kohya_dir / 'mask' / '10_mychar'}"
  [[datasets.subsets]]
  image_dir = "{kohya_dir / 'reg' / '1_1girl'}"
  is_reg = true
  class_tokens = "1girl"
''')
    manifest = load_dataset(toml)
    sub = manifest.subsets["mychar"]
    assert (sub.repeats, sub.keep_tokens, sub.shuffle_caption) == (4, 1, True)
    assert manifest.subsets["reg_1girl"].is_reg
    assert manifest.images_in("mychar")[0].mask.endswith("a.png")


def test_export_kohya_round_trips(tmp_path, kohya_dir):
    run_pipeline_dict({"output": str(tmp_path / "ds"), "sources": [{"kohya": {"path": str(kohya_dir)}}]}, tmp_path)
    proc = run_cli("export", "kohya", str(tmp_path / "ds"), str(tmp_path / "k"))
    assert proc.returncode == 0, proc.stderr
    assert "--masked_loss" in proc.stdout + proc.stderr
    config = tomllib.loads((tmp_path / "k" / "dataset_config.toml").read_text())
    k = (tmp_path / "k").resolve()
    subsets = {s["image_dir"]: s for d in config["datasets"] for s in d["subsets"]}
    assert subsets[str(k / "img/10_mychar")]["num_repeats"] == 10 and subsets[str(k / "reg/1_1girl")]["is_reg"]
    assert subsets[str(k / "img/10_mychar")]["conditioning_data_dir"] == str(k / "mask/10_mychar")
    assert (tmp_path / "k" / "img" / "10_mychar" / "a.txt").read_text() == "mychar, 1girl, smile"
    again = load_dataset(tmp_path / "k")
    assert {r.caption for r in again.images} == {r.caption for r in Manifest.load(tmp_path / "ds").images}


def test_export_diffusers_metadata_jsonl(tmp_path, kohya_dir):
    run_pipeline_dict({"output": str(tmp_path / "ds"), "sources": [{"kohya": {"path": str(kohya_dir)}}]}, tmp_path)
    proc = run_cli("export", "diffusers", str(tmp_path / "ds"), str(tmp_path / "d"))
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in (tmp_path / "d" / "metadata.jsonl").read_text().splitlines()]
    assert {entry["text"] for entry in lines} == {"mychar, 1girl, smile", "mychar, dress"}  # no reg images
    assert all((tmp_path / "d" / entry["file_name"]).is_file() for entry in lines)


def test_standalone_kohya_command_imports_to_a_dataset_folder(tmp_path, kohya_dir):
    proc = run_cli("kohya", str(kohya_dir), str(tmp_path / "ds"))
    assert proc.returncode == 0, proc.stderr
    assert len(Manifest.load(tmp_path / "ds").images) == 3


def test_newer_manifest_version_is_refused(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"schema": "lorakit.manifest", "version": 99}))
    with pytest.raises(LorakitError, match="newer than this lorakit"):
        Manifest.load(tmp_path)


def test_chained_standalone_commands_keep_tags_and_hand_edited_captions(tmp_path, images_dir):
    first = run_cli("folder", str(images_dir), str(tmp_path / "a"))
    assert first.returncode == 0, first.stderr
    (tmp_path / "a" / "red.txt").write_text("edited, by hand")
    res = run_pipeline_dict({"output": str(tmp_path / "b"), "sources": [{"dataset": {"path": str(tmp_path / "a")}}]}, tmp_path)
    assert res.by_name("red").caption == "edited, by hand"
    assert not (tmp_path / "b" / "set_aside").exists()


def test_keep_tokens_separator_survives_a_round_trip_through_caption_files(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    Image.new("RGB", (16, 16)).save(raw / "a.png")
    (raw / "a.txt").write_text("mychar ||| smile, solo")
    first = run_pipeline_dict({"output": str(tmp_path / "a"), "sources": [{"folder": {"path": str(raw)}}]}, tmp_path)
    assert first.caption("a") == "mychar ||| smile, solo"
    second = run_pipeline_dict({"output": str(tmp_path / "b"), "sources": [{"dataset": {"path": str(tmp_path / "a")}}]}, tmp_path)
    assert second.caption("a") == "mychar ||| smile, solo"
