"""Paths that come from data stay inside their folder: manifests, pipeline.yaml, kohya imports,
step-chosen names and exports; captions that link out of the source are not read."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import run_cli
from lorakit.plugin_sdk import ImageStep, LorakitError, PathEscape, check_relative, confined_path
from lorakit.plugin_sdk.testing import make_image, run_pipeline_dict, run_step


def _dataset(tmp_path: Path) -> Path:
    """A real lorakit dataset folder (two images, captions) to tamper with."""
    raw = tmp_path / "raw"
    make_image(raw / "a.png", (40, 30), "red")
    make_image(raw / "b.png", (30, 40), "blue")
    (raw / "a.txt").write_text("one, two")
    run_step("alpha", raw, tmp_path / "ds")
    return tmp_path / "ds"


def _edit_manifest(dataset: Path, change) -> None:
    path = dataset / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("value", ["../x", "a/../../x", "/etc/hostname", "~/x", "a\\..\\x", "C:/x", "a\x00b"])
def test_check_relative_refuses_paths_that_leave_their_folder(value):
    with pytest.raises(PathEscape):
        check_relative(value, "test path")


def test_confined_path_refuses_a_symlink_out_of_the_root(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", root / "link")
    assert confined_path(root, "sub/file.txt") == root / "sub" / "file.txt"
    with pytest.raises(PathEscape, match="outside"):
        confined_path(root, "link/file.txt")


def test_manifest_subset_folder_outside_is_refused_and_nothing_written_outside(tmp_path):
    ds = _dataset(tmp_path)
    _edit_manifest(ds, lambda d: d["subsets"]["default"].update(folder="../victim"))
    proc = run_cli("alpha", str(ds), str(tmp_path / "out"))
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "../victim" in proc.stderr and "manifest.json" in proc.stderr
    assert not (tmp_path / "victim").exists()


@pytest.mark.parametrize("key,value", [("path", "../../../../etc/hostname"), ("mask", "/etc/hostname"),
                                        ("caption_path", "../raw/a.txt")])
def test_manifest_image_mask_or_caption_path_outside_is_refused(tmp_path, key, value):
    ds = _dataset(tmp_path)
    _edit_manifest(ds, lambda d: d["images"][0].update({key: value}))
    with pytest.raises(PathEscape, match=f"images\\[0\\].{key}"):
        run_step("alpha", ds, tmp_path / "out", source="dataset")
    assert not (tmp_path / "out").exists() or not any("hostname" in f for f in _files(tmp_path / "out"))


def test_manifest_path_through_a_symlink_out_is_refused(tmp_path):
    ds = _dataset(tmp_path)
    secret = tmp_path / "secret"
    secret.mkdir()
    make_image(secret / "private.png", (20, 20), "green")
    os.symlink(secret, ds / "linked")
    _edit_manifest(ds, lambda d: d["images"][0].update(path="linked/private.png"))
    with pytest.raises(PathEscape, match="outside"):
        run_step("alpha", ds, tmp_path / "out", source="dataset")


@pytest.mark.parametrize("subsets,source_subset", [({"../../x": {}}, None), ({"s": {"folder": "../../x"}}, None),
                                                   ({}, "../../x")])
def test_pipeline_subset_names_and_folders_outside_the_output_are_refused(tmp_path, subsets, source_subset):
    make_image(tmp_path / "raw" / "a.png")
    source = {"path": str(tmp_path / "raw")}
    if source_subset:
        source["subset"] = source_subset
    data = {"output": str(tmp_path / "deep" / "out"), "sources": [{"folder": source}], "subsets": subsets}
    with pytest.raises(PathEscape, match="leaves its folder"):
        run_pipeline_dict(data, tmp_path)
    assert not (tmp_path / "x").exists() and not (tmp_path / "deep").exists()


def test_validate_reports_an_escaping_subset_with_its_line(tmp_path):
    make_image(tmp_path / "raw" / "a.png")
    (tmp_path / "pipeline.yaml").write_text(
        "output: out\nsources:\n  - folder: {path: raw}\nsubsets:\n  s:\n    folder: ../../x\n")
    proc = run_cli("validate", str(tmp_path / "pipeline.yaml"))
    assert proc.returncode != 0 and "pipeline.yaml:5" in proc.stderr and "Traceback" not in proc.stderr


class EvilName(ImageStep):
    name = "evilname"
    summary = "Renames images out of the output (test step)."

    def process(self, item, ctx):
        return item.replace(name="../../escaped" if item.name == "a" else item.name)


def test_an_image_name_outside_the_output_is_set_aside(tmp_path):
    make_image(tmp_path / "raw" / "a.png")
    make_image(tmp_path / "raw" / "b.png")
    res = run_step(EvilName, tmp_path / "raw", tmp_path / "deep" / "out")
    assert [r.path for r in res.images] == ["b.png"]
    assert "leaves its folder" in res.set_aside[0].reason
    assert not list(tmp_path.rglob("escaped*"))


def test_kohya_concept_folder_named_dotdot_stays_inside(tmp_path):
    concept = tmp_path / "kohya" / "3_.."
    make_image(concept / "a.png")
    res = run_step("alpha", tmp_path / "kohya", tmp_path / "deep" / "out", source="kohya")
    assert len(res.images) == 1
    out = (tmp_path / "deep" / "out").resolve()
    assert all(out in res.path(r).resolve().parents for r in res.images)
    assert not (tmp_path / "deep" / "a.png").exists()


@pytest.mark.parametrize("source", ["folder", "kohya"])
def test_caption_symlinked_outside_the_source_is_not_read(tmp_path, source):
    (tmp_path / "private.txt").write_text("my secret text")
    folder = tmp_path / "src" / "2_char" if source == "kohya" else tmp_path / "src"
    make_image(folder / "a.png")
    os.symlink(tmp_path / "private.txt", folder / "a.txt")
    res = run_step("alpha", tmp_path / "src", tmp_path / "out", source=source)
    assert "secret" not in res.images[0].caption
    assert "secret" not in (tmp_path / "out" / "manifest.json").read_text()


def test_export_diffusers_refuses_a_subset_outside_its_target(tmp_path):
    from lorakit.export import export_diffusers
    from lorakit.manifest import Manifest

    ds = _dataset(tmp_path)
    manifest = Manifest.load(ds)
    for r in manifest.images:
        r.subset = "../../../escaped"
    with pytest.raises(PathEscape):
        export_diffusers(manifest, tmp_path / "a" / "b" / "export")
    assert not list(tmp_path.rglob("escaped"))


def test_export_cli_refuses_a_tampered_manifest_without_a_traceback(tmp_path):
    ds = _dataset(tmp_path)
    _edit_manifest(ds, lambda d: d["images"][0].update(path="../../etc/passwd"))
    proc = run_cli("export", "diffusers", str(ds), str(tmp_path / "exp"))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "images[0].path" in proc.stderr
    assert not (tmp_path / "exp").exists()


def test_report_names_stay_in_the_reports_folder(tmp_path):
    from lorakit.plugin_sdk import StepContext

    ctx = StepContext("s", tmp_path, tmp_path, tmp_path / "out")
    with pytest.raises(LorakitError):
        ctx.report("../../../escaped", {})
    assert ctx.report("ok", {"a": 1}).is_file()
