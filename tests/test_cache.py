"""The store and the step cache: index database, chains of per-image steps (one encode per image),
cache keys from what a step reads, enforced writes, opaque images as RGB, and `lorakit clean`."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from PIL import Image

from lorakit.plugin_sdk import DatasetStep, ImageStep, Param
from lorakit.plugin_sdk.steps import FIELDS
from lorakit.plugin_sdk.testing import assert_valid_manifest, run_pipeline_dict
from lorakit.store import Store
from conftest import run_cli


def _bordered(path: Path, size=(120, 90), transparent=False) -> Path:
    """A picture with a uniform 10-pixel border (white, or transparent) around noisy content."""
    import numpy as np

    rng = np.random.default_rng(len(path.name))
    w, h = size
    content = Image.fromarray(rng.integers(0, 200, (h - 20, w - 20, 3), dtype=np.uint8))
    canvas = Image.new("RGBA" if transparent else "RGB", size, (0, 0, 0, 0) if transparent else "white")
    canvas.paste(content, (10, 10))
    canvas.save(path)
    return path


@pytest.fixture
def photos(tmp_path) -> Path:
    raw = tmp_path / "raw"
    raw.mkdir()
    _bordered(raw / "a.png")
    _bordered(raw / "b.png", (100, 100), transparent=True)
    _bordered(raw / "c.png", (90, 120))
    (raw / "a.txt").write_text("1girl, solo")
    return raw


def _data(tmp_path, raw, steps):
    return {"output": str(tmp_path / "out"), "sources": [{"folder": {"path": str(raw)}}], "steps": steps}


def _stat(result, name):
    return next(s for s in result.stats if s.name == name)


def _count_encodes(monkeypatch) -> list:
    calls = []
    real = Store.add_image

    def counting(self, image):
        calls.append(image.size)
        return real(self, image)

    monkeypatch.setattr(Store, "add_image", counting)
    return calls


def test_consecutive_image_steps_encode_each_image_once(tmp_path, photos, monkeypatch):
    encodes = _count_encodes(monkeypatch)
    res = run_pipeline_dict(_data(tmp_path, photos, ["convert", "trim", "alpha"]), tmp_path, workers=1)
    assert len(res.images) == 3
    assert len(encodes) == 3  # trim crops all three, alpha flattens b: still one PNG per image
    assert {(r.width, r.height) for r in res.images} == {(100, 70), (80, 80), (70, 100)}
    assert_valid_manifest(tmp_path / "out")


def test_unchanged_rerun_computes_nothing_and_writes_nothing(tmp_path, photos):
    data = _data(tmp_path, photos, ["convert", "trim", "alpha", "buckets"])
    run_pipeline_dict(data, tmp_path, workers=1)
    out = tmp_path / "out"
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and not p.name.endswith(("-wal", "-shm"))}
    again = run_pipeline_dict(data, tmp_path, workers=1)
    assert again.run.nothing_changed
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and not p.name.endswith(("-wal", "-shm"))}
    assert after == before  # not one file (image, caption, manifest, ledger, index) was rewritten


def test_caption_edit_does_not_redo_pixel_steps(tmp_path, photos):
    data = _data(tmp_path, photos, ["convert", "trim", "alpha"])
    run_pipeline_dict(data, tmp_path, workers=1)
    (photos / "a.txt").write_text("1girl, solo, smile")
    (photos / "b.txt").write_text("new caption")
    res = run_pipeline_dict(data, tmp_path, workers=1)
    for step in ("convert", "trim", "alpha"):
        assert _stat(res, step).computed == 0 and _stat(res, step).replayed == 0, step
    assert res.caption("a") == "1girl, solo, smile" and res.caption("b") == "new caption"


def test_changing_a_later_step_of_a_chain_redoes_only_it(tmp_path, photos):
    run_pipeline_dict(_data(tmp_path, photos, ["trim", "alpha"]), tmp_path, workers=1)
    res = run_pipeline_dict(_data(tmp_path, photos, ["trim", {"alpha": {"background": "black"}}]), tmp_path, workers=1)
    trim, alpha = _stat(res, "trim"), _stat(res, "alpha")
    assert trim.computed == 0 and trim.cached == 3
    assert alpha.computed == 3
    assert trim.replayed == 3  # its crops were never encoded: rebuilt in memory for alpha
    b = res.open(res.by_name("b"))
    assert b.mode == "RGB" and b.size == (80, 80)


def test_image_that_ends_fully_opaque_is_written_as_rgb(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    _bordered(raw / "t.png", transparent=True)  # transparent only in the border: opaque once trimmed
    res = run_pipeline_dict(_data(tmp_path, raw, ["trim", "alpha"]), tmp_path, workers=1)
    assert res.open(res.by_name("t")).mode == "RGB"


class Sneaky(ImageStep):
    """Declares that it writes tags only, but also changes the caption."""

    name = "sneaky"
    summary = "test step"
    params = [Param("n", int, 1, "unused")]
    reads = frozenset({"tags"})
    writes = frozenset({"tags"})

    def process(self, item, ctx):
        return item.replace(tags={**item.tags, "x": None}, caption="surprise")


def test_a_step_changing_a_field_it_does_not_declare_is_refused_with_its_name(tmp_path, photos):
    from lorakit.plugin_sdk import LorakitError

    with pytest.raises(LorakitError, match=r"step 'sneaky' changed caption, which it does not declare in writes"):
        run_pipeline_dict(_data(tmp_path, photos, ["sneaky"]), tmp_path, [Sneaky], workers=1)


def test_every_builtin_step_declares_what_it_reads_and_writes():
    from lorakit.host import get_host

    for name, cls in get_host().steps.items():
        if cls.__module__.startswith("lorakit.plugins"):
            assert cls.writes is not None, f"{name} declares no writes"
            assert set(cls.writes) <= FIELDS, name
            if cls.kind != "source":
                assert cls.reads is not None, f"{name} declares no reads"
                assert set(cls.reads) <= FIELDS | {"name"}, name


def test_results_live_in_one_index_database_not_one_file_per_entry(tmp_path, photos):
    run_pipeline_dict(_data(tmp_path, photos, ["trim", "alpha", "buckets"]), tmp_path, workers=1)
    store = tmp_path / "out" / ".lorakit"
    assert not (store / "cache").exists() and not (store / "source-index.json").exists()
    with sqlite3.connect(store / "index.sqlite") as db:
        keys = [k for (k,) in db.execute("SELECT key FROM cache")]
        # trim and alpha per image, the trim+alpha chain over all three, buckets, and buckets' report
        assert len(keys) == 3 + 3 + 1 + 1 + 1
        assert sum(k.endswith(":reports") for k in keys) == 1
        assert db.execute("SELECT count(*) FROM sources").fetchone()[0] == 3


def test_parallel_chain_gives_the_same_dataset_as_one_process(tmp_path, photos):
    for i in range(20):
        _bordered(photos / f"n{i:02}.png", (60 + i, 50), transparent=i % 2 == 0)
    steps = ["convert", "trim", "alpha"]
    one = run_pipeline_dict({**_data(tmp_path, photos, steps), "output": str(tmp_path / "a")}, tmp_path, workers=1)
    two = run_pipeline_dict({**_data(tmp_path, photos, steps), "output": str(tmp_path / "b")}, tmp_path, workers=2)
    assert [(r.path, r.sha256, r.width) for r in one.images] == [(r.path, r.sha256, r.width) for r in two.images]


def test_clean_removes_what_no_run_uses_and_dry_run_only_reports(tmp_path, photos):
    run_pipeline_dict(_data(tmp_path, photos, ["trim", {"buckets": {"resize": True}}]), tmp_path, workers=1)
    (tmp_path / "pipeline.yaml").write_text(
        f"output: out\nsources:\n  - folder: {{path: {photos}}}\nsteps:\n  - trim\n")
    first = run_cli("run", str(tmp_path / "pipeline.yaml"), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    blobs = tmp_path / "out" / ".lorakit" / "blobs"
    count = sum(1 for _ in blobs.rglob("*.png"))
    dry = run_cli("clean", "--dry-run", str(tmp_path / "pipeline.yaml"), cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    # buckets' entry and its report entry go, and the three resized pictures
    assert "Would remove 2 cache entries, 3 stored image(s)" in dry.stdout and "KiB" in dry.stdout
    assert sum(1 for _ in blobs.rglob("*.png")) == count
    done = run_cli("clean", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 0 and "Removed 2 cache entries, 3 stored image(s)" in done.stdout
    assert sum(1 for _ in blobs.rglob("*.png")) == count - 3
    again = run_cli("run", str(tmp_path / "pipeline.yaml"), cwd=tmp_path)
    assert again.returncode == 0 and "Nothing changed since the last run" in again.stderr


def test_source_images_are_read_in_place_not_copied_into_the_store(tmp_path, photos):
    res = run_pipeline_dict(_data(tmp_path, photos, ["trim"]), tmp_path, workers=1)
    blobs = list((tmp_path / "out" / ".lorakit" / "blobs").rglob("*.png"))
    assert len(blobs) == 3  # the three trimmed pictures; the sources stay where they are
    import numpy as np

    noise = np.random.default_rng(1).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(noise).save(photos / "plain.png")  # no border: passed on untouched
    again = run_pipeline_dict(_data(tmp_path, photos, ["trim"]), tmp_path, workers=1)
    assert len(list((tmp_path / "out" / ".lorakit" / "blobs").rglob("*.png"))) == 3
    assert (tmp_path / "out" / "plain.png").read_bytes() == (photos / "plain.png").read_bytes()
    assert _stat(again, "trim").cached == 3 and _stat(again, "trim").computed == 1 and len(res.images) == 3
    assert_valid_manifest(tmp_path / "out")


def test_a_dataset_step_that_reads_pixels_is_not_redone_for_a_caption_edit(tmp_path, photos):
    data = _data(tmp_path, photos, ["trim", {"buckets": {"resize": True}}])
    run_pipeline_dict(data, tmp_path, workers=1)
    (photos / "a.txt").write_text("1girl, solo, smile")
    res = run_pipeline_dict(data, tmp_path, workers=1)
    assert _stat(res, "buckets").computed == 0 and _stat(res, "trim").computed == 0
    assert res.caption("a") == "1girl, solo, smile"
    assert res.by_name("a").meta["bucket"] == [512, 512] or res.by_name("a").meta["bucket"]
    assert_valid_manifest(tmp_path / "out")


class SneakyDataset(DatasetStep):
    """Declares that it writes tags only, but also changes captions."""

    name = "sneakyset"
    summary = "test step"
    reads = frozenset({"tags"})
    writes = frozenset({"tags"})

    def run(self, items, ctx):
        return [item.replace(caption="surprise") for item in items]


def test_a_dataset_step_changing_an_undeclared_field_is_named_in_a_warning(tmp_path, photos):
    res = run_pipeline_dict(_data(tmp_path, photos, ["sneakyset"]), tmp_path, [SneakyDataset], workers=1)
    messages = _stat(res, "sneakyset").messages
    assert any("sneakyset" in m and "caption" in m and "writes" in m for m in messages)


def test_folder_source_lists_images_in_path_order_skipping_hidden_and_linked_folders(tmp_path):
    raw = tmp_path / "raw"
    for rel in ("b.png", "a-b.png", "a/b.png", "a/c/d.png", ".hidden/x.png", "a/.y.png"):
        (raw / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 30), "red").save(raw / rel)
    (raw / "notes.md").write_text("not an image")
    (raw / "a" / "b.txt").write_text("smile, solo")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    Image.new("RGB", (40, 30), "blue").save(elsewhere / "linked.png")
    (elsewhere / "secret.txt").write_text("not for the dataset")
    (raw / "linked").symlink_to(elsewhere, target_is_directory=True)  # a linked folder is not walked
    (raw / "b.txt").symlink_to(elsewhere / "secret.txt")  # a caption linked out of the source is not read
    res = run_pipeline_dict(_data(tmp_path, raw, []), tmp_path, workers=1)
    assert [r.path for r in res.images] == ["a/b.png", "a/c/d.png", "a-b.png", "b.png"]  # as paths sort
    captions = {r.path: r.caption for r in res.images}
    assert captions["a/b.png"] == "smile, solo" and captions["b.png"] == ""
    flat = _data(tmp_path, raw, [])
    flat["sources"] = [{"folder": {"path": str(raw), "recursive": False}}]
    flat["output"] = str(tmp_path / "flat")
    assert [r.path for r in run_pipeline_dict(flat, tmp_path, workers=1).images] == ["a-b.png", "b.png"]


def test_a_manifest_or_report_changed_by_hand_is_written_again_on_an_unchanged_rerun(tmp_path, photos):
    data = _data(tmp_path, photos, ["convert", "buckets"])
    run_pipeline_dict(data, tmp_path, workers=1)
    out = tmp_path / "out"
    manifest, report = out / "manifest.json", out / "reports" / "buckets-buckets.json"
    good_manifest, good_report = manifest.read_text(), report.read_text()
    manifest.write_text(good_manifest.replace('"caption": "1girl, solo"', '"caption": "edited"'))
    report.unlink()
    again = run_pipeline_dict(data, tmp_path, workers=1)
    assert again.run.nothing_changed
    assert report.read_text() == good_report
    without_time = lambda text: {k: v for k, v in json.loads(text).items() if k != "created"}  # noqa: E731
    assert without_time(manifest.read_text()) == without_time(good_manifest)


class FlakyStep(ImageStep):
    """Fails on images named b* while the marker file exists (a transient error, not a decision)."""

    name = "flaky"
    summary = "Fails while a marker file exists (test)."
    params = [Param("marker", str, "", "fail while this file exists")]
    reads = frozenset({"image", "name"})
    writes = frozenset({"meta"})

    def process(self, item, ctx):
        if item.name.startswith("b") and Path(self.options.marker).exists():
            raise RuntimeError("transient failure")
        return item.replace(meta={**item.meta, "flaky": "ok"})


def test_a_chain_over_unchanged_inputs_is_remembered_but_an_error_is_retried_next_run(tmp_path, photos):
    marker = tmp_path / "fail-now"
    marker.write_text("")
    data = _data(tmp_path, photos, ["trim", {"flaky": {"marker": str(marker)}}])
    first = run_pipeline_dict(data, tmp_path, extra_steps=[FlakyStep], workers=1)
    assert [r.name for r in first.run.set_aside] == ["b"]
    marker.unlink()
    second = run_pipeline_dict(data, tmp_path, extra_steps=[FlakyStep], workers=1)  # the error is not remembered
    assert sorted(r.path for r in second.images) == ["a.png", "b.png", "c.png"]
    assert _stat(second, "flaky").computed == 1 and _stat(second, "trim").computed == 0
    third = run_pipeline_dict(data, tmp_path, extra_steps=[FlakyStep], workers=1)
    assert third.run.nothing_changed and sorted(r.path for r in third.images) == ["a.png", "b.png", "c.png"]
    assert [(s.inputs, s.outputs, s.cached) for s in third.stats if s.name in ("trim", "flaky")] == [(3, 3, 3)] * 2
