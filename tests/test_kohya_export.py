"""``lorakit export kohya``: the dataset_config.toml passes kohya's own config rules (ConfigSanitizer,
encoded in tests/kohya_config_schema.py), masked subsets train with --masked_loss, paths work from
any working directory."""
from __future__ import annotations

import hashlib
import os
import tomllib

import numpy as np
import pytest
import voluptuous
from PIL import Image

from conftest import run_cli
from lorakit.kohya import export_kohya, export_kohya_report
from lorakit.manifest import ImageRecord, Manifest, load_dataset
from lorakit.plugin_sdk import Subset
from tests.kohya_config_schema import kohya_config_schema


def make_manifest(root, *, masked=("outfit",), partly_masked=(), reg_masked=False):
    """Subsets ``outfit`` (4 images, masked by default), ``face`` (2, no masks), ``reg_1girl`` (2, reg)."""
    root.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(root=root, resolution=512)
    rng = np.random.default_rng(0)
    layout = [("outfit", 4, 3, False), ("face", 2, 5, False), ("reg_1girl", 2, 1, True)]
    for name, count, repeats, is_reg in layout:
        manifest.subsets[name] = Subset(name=name, repeats=repeats, is_reg=is_reg, keep_tokens=1,
                                        class_tokens="1girl" if is_reg else "mychar")
        (root / name).mkdir(exist_ok=True)
        for i in range(count):
            path = root / name / f"{i}.png"
            Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path)
            mask = None
            wants = name in masked or (name in partly_masked and i == 0) or (is_reg and reg_masked)
            if wants:
                (root / "masks").mkdir(exist_ok=True)
                Image.new("L", (64, 48), 128).save(root / "masks" / f"{name}_{i}.png")
                mask = f"masks/{name}_{i}.png"
            manifest.images.append(ImageRecord(
                path=f"{name}/{i}.png", caption=f"mychar, {name}", subset=name, width=64, height=48,
                sha256=hashlib.sha256(path.read_bytes()).hexdigest(), repeats=repeats, is_reg=is_reg, mask=mask))
    manifest.save()
    return manifest


def load(path):
    return tomllib.loads(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("case", [dict(), dict(masked=()), dict(masked=("outfit", "face")),
                                  dict(partly_masked=("face",)), dict(reg_masked=True)])
def test_written_config_passes_kohyas_config_rules_with_masked_loss_on_and_off(tmp_path, case):
    report = export_kohya_report(make_manifest(tmp_path / "ds", **case), tmp_path / "out")
    config = load(report.config)
    kohya_config_schema(masked_loss=True)(config)
    if not report.masked_loss:  # without masks, the config is also valid for a run without --masked_loss
        kohya_config_schema(masked_loss=False)(config)


def test_the_old_layout_is_what_kohya_refused(tmp_path):
    """conditioning_data_dir in a DreamBooth subset, and is_reg / class_tokens in a masked dataset."""
    schema = kohya_config_schema(masked_loss=True)
    mixed = {"datasets": [{"subsets": [{"image_dir": "a", "conditioning_data_dir": "m"}, {"image_dir": "b"}]}]}
    with pytest.raises(voluptuous.MultipleInvalid, match="extra keys not allowed"):
        schema(mixed)
    all_masked = {"datasets": [{"subsets": [{"image_dir": "a", "conditioning_data_dir": "m", "is_reg": False,
                                             "class_tokens": "x"}]}]}
    with pytest.raises(voluptuous.MultipleInvalid, match="extra keys not allowed"):
        schema(all_masked)


def test_masked_subsets_are_a_dataset_of_their_own_with_every_mask(tmp_path):
    report = export_kohya_report(make_manifest(tmp_path / "ds", partly_masked=("face",)), tmp_path / "out")
    plain, masked = load(report.config)["datasets"]
    assert all("conditioning_data_dir" not in s for s in plain["subsets"])
    assert {os.path.basename(s["image_dir"]) for s in plain["subsets"]} == {"1_1girl"}
    assert {os.path.basename(s["image_dir"]) for s in masked["subsets"]} == {"3_outfit", "5_face"}
    for subset in masked["subsets"]:
        images = {p.stem for p in (tmp_path / "out" / "img" / os.path.basename(subset["image_dir"])).glob("*.png")}
        assert {p.stem for p in (tmp_path / "out" / "mask" / os.path.basename(subset["image_dir"])).glob("*.png")} == images
    # the face image without a mask got a white one; the real mask kept its grey
    assert np.asarray(Image.open(tmp_path / "out" / "mask" / "5_face" / "1.png")).min() == 255
    assert np.asarray(Image.open(tmp_path / "out" / "mask" / "5_face" / "0.png")).max() == 128
    assert report.masked_loss and "--masked_loss" in report.command()


def test_what_kohya_cannot_keep_is_reported_and_written_in_the_config(tmp_path):
    report = export_kohya_report(make_manifest(tmp_path / "ds", reg_masked=True), tmp_path / "out")
    text = report.config.read_text(encoding="utf-8")
    assert any("reg_1girl" in item and "masks" in item for item in report.lost)
    assert any("outfit" in item and "class_tokens" in item for item in report.lost)
    assert all(item in text for item in report.lost)
    assert not (tmp_path / "out" / "mask" / "1_1girl").exists()


def test_image_dirs_are_absolute_and_found_from_any_working_directory(tmp_path, monkeypatch):
    report = export_kohya_report(make_manifest(tmp_path / "ds"), tmp_path / "out")
    monkeypatch.chdir(tmp_path / "ds")  # somewhere else than the export
    for dataset in load(report.config)["datasets"]:
        for subset in dataset["subsets"]:
            for key in ("image_dir", "conditioning_data_dir"):
                if key in subset:
                    assert os.path.isabs(subset[key]) and os.listdir(subset[key])


def test_relative_paths_option_is_relative_to_the_config(tmp_path):
    target = export_kohya(make_manifest(tmp_path / "ds"), tmp_path / "out", relative_paths=True)
    dirs = [s["image_dir"] for d in load(target)["datasets"] for s in d["subsets"]]
    assert sorted(dirs) == ["img/3_outfit", "img/5_face", "reg/1_1girl"]
    assert "relative to this file's folder" in target.read_text(encoding="utf-8")


def test_export_reads_back_as_the_same_dataset(tmp_path):
    target = export_kohya(make_manifest(tmp_path / "ds", partly_masked=("face",)), tmp_path / "out")
    again = load_dataset(target)
    assert sorted((r.subset, r.repeats, r.is_reg, r.mask is not None) for r in again.images) == sorted(
        [("outfit", 3, False, True)] * 4 + [("face", 5, False, True)] * 2 + [("reg_1girl", 1, True, False)] * 2)


def test_cli_prints_the_command_with_masked_loss_and_the_losses(tmp_path):
    make_manifest(tmp_path / "ds", reg_masked=True)
    proc = run_cli("export", "kohya", str(tmp_path / "ds"), str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert "train_network.py --dataset_config" in proc.stdout + proc.stderr and "--masked_loss" in proc.stdout + proc.stderr
    assert "Not kept by kohya" in proc.stdout + proc.stderr
    proc = run_cli("export", "kohya", str(tmp_path / "ds"), str(tmp_path / "rel"), "--relative-paths")
    assert proc.returncode == 0, proc.stderr
    assert load(tmp_path / "rel" / "dataset_config.toml")["datasets"][0]["subsets"][0]["image_dir"].startswith(("img/", "reg/"))


# ----- the export folder: the user's files are never overwritten, stale exports are cleaned ------------
def test_export_refuses_a_folder_with_someone_elses_files_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(Exception, match="not empty and is not a lorakit export"):
        export_kohya(make_manifest(tmp_path / "ds"), out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    export_kohya(make_manifest(tmp_path / "ds"), out, force=True)  # asked for: written beside the user's file
    assert (out / "notes.txt").read_text() == "mine" and (out / "dataset_config.toml").is_file()


def test_re_export_deletes_what_it_no_longer_writes_and_keeps_what_the_user_changed(tmp_path):
    manifest = make_manifest(tmp_path / "ds", masked=())
    out = tmp_path / "out"
    export_kohya(manifest, out)
    assert (out / "img" / "5_face" / "1.png").is_file()
    (out / "img" / "5_face" / "1.txt").write_text("edited by hand in the export")
    manifest.images = [r for r in manifest.images if r.subset != "face"]
    del manifest.subsets["face"]
    export_kohya(manifest, out)  # the earlier export's folder: allowed without --force
    assert not (out / "img" / "5_face" / "1.png").exists() and not (out / "img" / "5_face" / "0.png").exists()
    assert (out / "img" / "5_face" / "1.txt").read_text() == "edited by hand in the export"
    assert (out / "img" / "3_outfit" / "0.png").is_file()


def test_a_file_the_user_added_to_an_export_is_not_overwritten(tmp_path):
    manifest = make_manifest(tmp_path / "ds", masked=())
    out = tmp_path / "out"
    export_kohya(manifest, out)
    (out / "img" / "3_outfit" / "0.txt").unlink()
    (out / "img" / "3_outfit" / "0.txt").write_text("the user's own caption")
    export_kohya(manifest, out)  # the ledger lists it: the export's own file, rewritten
    assert (out / "img" / "3_outfit" / "0.txt").read_text() == "mychar, outfit"
    (out / "img" / "1_extra").mkdir()
    # A file the user put where a new image will go is refused.
    (out / "img" / "1_extra" / "9.png").write_bytes(b"user's")
    manifest.subsets["extra"] = type(manifest.subsets["outfit"])(name="extra", repeats=1)
    src = tmp_path / "ds" / "extra"
    src.mkdir()
    (src / "9.png").write_bytes((tmp_path / "ds" / "outfit" / "0.png").read_bytes())
    first = manifest.images[0]
    manifest.images.append(type(first)(path="extra/9.png", caption="x", subset="extra", width=64, height=48,
                                       sha256=first.sha256, repeats=1))
    with pytest.raises(Exception, match="was not written by an earlier export"):
        export_kohya(manifest, out)
    assert (out / "img" / "1_extra" / "9.png").read_bytes() == b"user's"


def test_export_cli_says_how_to_write_into_a_used_folder(tmp_path):
    make_manifest(tmp_path / "ds")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x.txt").write_text("x")
    proc = run_cli("export", "diffusers", str(tmp_path / "ds"), str(tmp_path / "out"))
    assert proc.returncode != 0 and "--force" in proc.stderr + proc.stdout and "Traceback" not in proc.stderr
    proc = run_cli("export", "diffusers", str(tmp_path / "ds"), str(tmp_path / "out"), "--force")
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("export", "diffusers", str(tmp_path / "ds"), str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr  # its own earlier export
