"""The run-level short circuit (core/unchanged.py): an unchanged re-run writes nothing and does no
work; any change to a source, a caption, a step, the curation file or an output runs again."""
from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from lorakit.plugin_sdk import Item, Param, SourceStep
from lorakit.plugin_sdk.testing import run_pipeline_dict
from steps_for_tests import TEST_STEPS


class CountingSource(SourceStep):
    """A folder source that counts how often it produced (to see whether a run ran)."""

    name = "countingsrc"
    summary = "Images of a folder, counting the runs that read it."
    params = [Param("path", Path, help="folder")]
    produced = 0

    def produce(self, ctx):
        type(self).produced += 1
        for p in sorted(Path(self.options.path).glob("*.png")):
            yield Item(name=p.stem, path=p, source=str(p))


class FingerprintedCountingSource(CountingSource):
    name = "fpsrc"

    def fingerprint(self):
        from lorakit.unchanged import folder_fingerprint
        return folder_fingerprint(self.options.path)


class VolatileFingerprintedSource(FingerprintedCountingSource):
    name = "volatilesrc"
    volatile = True


STEPS = TEST_STEPS + [CountingSource, FingerprintedCountingSource, VolatileFingerprintedSource]


def _data(tmp_path, raw, steps=("invert", "addtag"), source="folder"):
    return {"output": str(tmp_path / "out"), "sources": [{source: {"path": str(raw)}}], "steps": list(steps)}


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            st = os.lstat(os.path.join(dirpath, f))
            out[os.path.join(dirpath, f)] = (st.st_size, st.st_mtime_ns)
    return out


def _settle(tmp_path, raw, steps=("invert", "addtag"), source="folder"):
    """A first run, which is remembered: the next unchanged run is reported from it."""
    first = run_pipeline_dict(_data(tmp_path, raw, steps, source), tmp_path, STEPS, workers=1)
    assert not first.run.nothing_changed and not first.run.unchanged_run
    return first


def _rerun(tmp_path, raw, steps=("invert", "addtag"), source="folder"):
    return run_pipeline_dict(_data(tmp_path, raw, steps, source), tmp_path, STEPS, workers=1)


def test_unchanged_rerun_writes_nothing_and_reports_the_last_run(tmp_path, images_dir, monkeypatch):
    second = _settle(tmp_path, images_dir)
    before = _snapshot(tmp_path / "out")
    from lorakit import runner

    def no_sources(self):  # an unchanged re-run must not even read its sources
        raise AssertionError("sources were read")
    monkeypatch.setattr(runner.Runner, "_run_sources", no_sources)
    third = _rerun(tmp_path, images_dir)
    assert third.run.unchanged_run and third.run.nothing_changed
    assert _snapshot(tmp_path / "out") == before  # no file written, touched or removed
    assert [(s.name, s.inputs, s.outputs, s.set_aside) for s in third.stats] == \
        [(s.name, s.inputs, s.outputs, s.set_aside) for s in second.stats]
    assert all(s.cached == s.inputs and s.computed == 0 for s in third.stats)
    assert third.run.summary()["images"] == 3
    assert sorted(r.path for r in third.images) == sorted(r.path for r in second.images)


def test_set_aside_survives_the_short_circuit(tmp_path, images_dir):
    (images_dir / "broken.png").write_bytes(b"not a png")
    second = _settle(tmp_path, images_dir)
    third = _rerun(tmp_path, images_dir)
    assert third.run.unchanged_run
    assert [(r.name, r.step, r.reason) for r in third.run.set_aside] == \
        [(r.name, r.step, r.reason) for r in second.run.set_aside]
    assert len(third.run.set_aside) == 1


def test_touching_a_source_runs_again(tmp_path, images_dir):
    _settle(tmp_path, images_dir)
    p = images_dir / "green.png"
    Image.new("RGB", (70, 70), "yellow").save(p)
    third = _rerun(tmp_path, images_dir)
    assert not third.run.unchanged_run
    assert third.open(third.by_name("green")).getpixel((0, 0)) == (0, 0, 255)  # inverted yellow


def test_a_new_source_file_runs_again(tmp_path, images_dir):
    _settle(tmp_path, images_dir)
    Image.new("RGB", (30, 30), "white").save(images_dir / "white.png")
    third = _rerun(tmp_path, images_dir)
    assert not third.run.unchanged_run and len(third.images) == 4


def test_editing_a_caption_runs_again_and_is_seen(tmp_path, images_dir):
    _settle(tmp_path, images_dir)
    (images_dir / "red.txt").write_text("1girl, edited_by_hand")
    third = _rerun(tmp_path, images_dir)
    assert not third.run.unchanged_run
    assert "edited_by_hand" in third.by_name("red").caption


def test_changing_one_steps_param_runs_again_and_redoes_only_later_steps(tmp_path, images_dir):
    _settle(tmp_path, images_dir, ("addtag", "invert"))
    third = _rerun(tmp_path, images_dir, ("addtag", {"invert": {"label": "neg"}}))
    assert not third.run.unchanged_run
    stats = {s.name: s for s in third.stats}
    assert stats["addtag"].computed == 0 and stats["invert"].computed == 3
    assert "neg" in third.by_name("red").caption


def test_editing_the_curation_file_runs_again(tmp_path, images_dir):
    second = _settle(tmp_path, images_dir)
    red = second.by_name("red")
    (tmp_path / "out" / "curation.jsonl").write_text(f'{{"op": "exclude", "ids": ["{red.id}"]}}\n')
    third = _rerun(tmp_path, images_dir)
    assert not third.run.unchanged_run
    assert "red" not in {Path(r.path).stem for r in third.images}


def test_deleting_or_editing_an_output_file_runs_again(tmp_path, images_dir):
    _settle(tmp_path, images_dir)
    (tmp_path / "out" / "blue.png").unlink()  # a hand edit: the image is taken out of the dataset
    third = _rerun(tmp_path, images_dir)
    assert not third.run.unchanged_run and "blue" not in {Path(r.path).stem for r in third.images}
    assert _rerun(tmp_path, images_dir).run.unchanged_run
    (tmp_path / "out" / "red.txt").write_text("hand edit in the output")
    again = _rerun(tmp_path, images_dir)
    assert not again.run.unchanged_run
    assert "hand edit in the output" in again.by_name("red").caption  # the hand edit is taken up


def test_a_source_without_fingerprint_never_short_circuits(tmp_path, images_dir):
    _settle(tmp_path, images_dir, source="countingsrc")
    n = CountingSource.produced
    third = _rerun(tmp_path, images_dir, source="countingsrc")
    assert not third.run.unchanged_run and CountingSource.produced == n + 1


def test_a_fingerprinted_third_party_source_short_circuits(tmp_path, images_dir):
    _settle(tmp_path, images_dir, source="fpsrc")
    n = FingerprintedCountingSource.produced
    assert _rerun(tmp_path, images_dir, source="fpsrc").run.unchanged_run
    assert FingerprintedCountingSource.produced == n


def test_a_volatile_step_never_short_circuits(tmp_path, images_dir):
    _settle(tmp_path, images_dir, source="volatilesrc")
    n = VolatileFingerprintedSource.produced
    third = _rerun(tmp_path, images_dir, source="volatilesrc")
    assert not third.run.unchanged_run and VolatileFingerprintedSource.produced == n + 1


def test_the_booru_grabber_is_not_fingerprinted():
    from lorakit.plugins import booru
    sources = [c for c in vars(booru).values() if isinstance(c, type) and issubclass(c, SourceStep) and c is not SourceStep]
    assert sources
    for cls in sources:
        assert cls.fingerprint is SourceStep.fingerprint


def test_a_run_with_an_error_to_retry_is_not_remembered(tmp_path, images_dir, monkeypatch):
    from steps_for_tests import InvertStep
    real = InvertStep.process

    def flaky(self, item, ctx):
        if item.name == "red":
            raise RuntimeError("out of memory, for now")
        return real(self, item, ctx)
    monkeypatch.setattr(InvertStep, "process", flaky)
    first = _rerun(tmp_path, images_dir)
    assert len(first.run.set_aside) == 1
    monkeypatch.setattr(InvertStep, "process", real)
    second = _rerun(tmp_path, images_dir)
    assert not second.run.unchanged_run and "red" in {Path(r.path).stem for r in second.images}


def _kohya_folder(root: Path) -> Path:
    """A kohya dataset as people have them: img/10_mychar with pictures and captions, reg/1_person."""
    concept = root / "img" / "10_mychar"
    concept.mkdir(parents=True)
    Image.new("RGB", (40, 30), "red").save(concept / "a.png")
    Image.new("RGB", (30, 40), "blue").save(concept / "b.png")
    (concept / "a.txt").write_text("mychar, smile")
    (root / "reg" / "1_person").mkdir(parents=True)
    Image.new("RGB", (32, 32), "gray").save(root / "reg" / "1_person" / "r.png")
    return root


def _kohya_run(tmp_path, source: dict):
    data = {"output": str(tmp_path / "out"), "sources": [{"kohya": source}], "steps": ["addtag"]}
    return run_pipeline_dict(data, tmp_path, STEPS, workers=1)


def test_a_kohya_folder_source_short_circuits_and_sees_a_caption_or_mask_edit(tmp_path):
    root = _kohya_folder(tmp_path / "kds")
    source = {"path": str(root / "img"), "reg": str(root / "reg")}  # masks are read beside img/, outside it
    assert not _kohya_run(tmp_path, source).run.unchanged_run
    assert _kohya_run(tmp_path, source).run.unchanged_run
    (root / "img" / "10_mychar" / "a.txt").write_text("mychar, edited_by_hand")
    edited = _kohya_run(tmp_path, source)
    assert not edited.run.unchanged_run and "edited_by_hand" in edited.by_name("a").caption
    assert _kohya_run(tmp_path, source).run.unchanged_run
    (root / "mask" / "10_mychar").mkdir(parents=True)  # kohya's sibling mask folder, new
    Image.new("L", (40, 30), 255).save(root / "mask" / "10_mychar" / "a.png")
    masked = _kohya_run(tmp_path, source)
    assert not masked.run.unchanged_run and masked.by_name("a").mask
    (root / "reg" / "2_person").mkdir()  # a reg folder renamed: other repeats
    (root / "reg" / "1_person" / "r.png").rename(root / "reg" / "2_person" / "r.png")
    assert not _kohya_run(tmp_path, source).run.unchanged_run


def test_a_kohya_toml_source_short_circuits_and_sees_a_config_edit(tmp_path):
    root = _kohya_folder(tmp_path / "kds")
    (tmp_path / "cfg").mkdir()
    config = tmp_path / "cfg" / "dataset_config.toml"
    config.write_text('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "../kds/img/10_mychar"\nnum_repeats = 10\n')
    source = {"path": str(config)}
    assert not _kohya_run(tmp_path, source).run.unchanged_run
    assert _kohya_run(tmp_path, source).run.unchanged_run
    config.write_text('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "../kds/img/10_mychar"\nnum_repeats = 3\n')
    again = _kohya_run(tmp_path, source)
    assert not again.run.unchanged_run and again.manifest.subsets["mychar"].repeats == 3
    Image.new("RGB", (20, 20), "white").save(root / "img" / "10_mychar" / "c.png")
    assert len(_kohya_run(tmp_path, source).images) == 3


def test_a_dataset_source_short_circuits_and_sees_a_caption_edited_in_it(tmp_path, images_dir):
    first = run_pipeline_dict({"output": str(tmp_path / "a"), "sources": [{"folder": {"path": str(images_dir)}}],
                               "steps": ["addtag"]}, tmp_path, STEPS, workers=1)
    data = {"output": str(tmp_path / "b"), "sources": [{"dataset": {"path": str(tmp_path / "a")}}], "steps": ["invert"]}
    assert not run_pipeline_dict(data, tmp_path, STEPS, workers=1).run.unchanged_run
    assert run_pipeline_dict(data, tmp_path, STEPS, workers=1).run.unchanged_run
    caption = first.output_dir / first.by_name("red").caption_path
    caption.write_text("1girl, edited_by_hand")
    edited = run_pipeline_dict(data, tmp_path, STEPS, workers=1)
    assert not edited.run.unchanged_run and "edited_by_hand" in edited.by_name("red").caption


def test_a_dataset_source_whose_manifest_is_edited_runs_again_and_checks_it(tmp_path, images_dir):
    import pytest

    from lorakit.plugin_sdk import LorakitError

    first = run_pipeline_dict({"output": str(tmp_path / "a"), "sources": [{"folder": {"path": str(images_dir)}}],
                               "steps": ["addtag"]}, tmp_path, STEPS, workers=1)
    data = {"output": str(tmp_path / "b"), "sources": [{"dataset": {"path": str(tmp_path / "a")}}], "steps": ["invert"]}
    run_pipeline_dict(data, tmp_path, STEPS, workers=1)
    manifest = first.output_dir / "manifest.json"
    manifest.write_text(manifest.read_text().replace(first.images[0].path, "../outside.png", 1))
    with pytest.raises(LorakitError, match="outside.png"):  # not skipped: the run reads it and refuses the path
        run_pipeline_dict(data, tmp_path, STEPS, workers=1)


def test_pipelines_sharing_a_store_keep_their_own_ledgers_and_short_circuits(tmp_path, images_dir):
    """cache_dir shared by two outputs: each output's ledger (what lorakit wrote there) is its own,
    so running one never makes the other's next unchanged run run again."""
    def data(out, steps):
        return {"output": str(tmp_path / out), "cache_dir": str(tmp_path / "shared-store"),
                "sources": [{"folder": {"path": str(images_dir)}}], "steps": steps}
    a, b = data("a", ["invert"]), data("b", ["addtag"])
    for d in (a, b):
        assert not run_pipeline_dict(d, tmp_path, STEPS, workers=1).run.unchanged_run
    assert run_pipeline_dict(a, tmp_path, STEPS, workers=1).run.unchanged_run
    assert run_pipeline_dict(b, tmp_path, STEPS, workers=1).run.unchanged_run
    import json
    for out in ("a", "b"):
        ledger = json.loads((tmp_path / out / ".lorakit" / "written.json").read_text())
        assert all((tmp_path / out / rel).is_file() for rel in ledger) and "manifest.json" not in ledger
    assert not (tmp_path / "shared-store" / "written.json").exists()
