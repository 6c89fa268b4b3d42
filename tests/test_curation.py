"""Curation: hand edits in one file, replayed on every run, surviving re-runs and upstream changes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from lorakit.curation import (
    Curation, Edit, apply_to_dataset, apply_to_states, child_id, curate_tags, curation_path_for, decisions,
    source_id,
)
from lorakit.manifest import Manifest, load_dataset
from lorakit.plugin_sdk import LorakitError
from lorakit.plugin_sdk.testing import run_pipeline_dict


def _edit(op, ids=("a",), **fields) -> Edit:
    return Edit(batch=1, op=op, ids=list(ids), **fields)


def _tags(names):
    return [[n, None] for n in names]


def _names(tags):
    return [t for t, _ in tags]


# ----- the file -----------------------------------------------------------------------------------
def test_each_operation_appends_one_line_in_its_own_batch(tmp_path):
    cur = Curation(tmp_path / "c.curation.jsonl")
    cur.add_tags(["a"], ["mychar"], position="front")
    cur.remove_tags(["a", "b"], "watermark")
    cur.replace_tag(["a"], "bow", "black_bow")
    cur.move_to_front(["a"], ["solo"])
    cur.set_caption(["b"], "a girl, smiling")
    cur.exclude(["c"], note="off-model")
    cur.restore(["c"])
    cur.move_to_subset(["a"], "outfit2")
    cur.set_keeper("d", ["e"])
    cur.reject_mask(["a"], note="grey")
    cur.accept_mask(["a"])
    lines = (tmp_path / "c.curation.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["lorakit_curation"] == 1
    edits = [json.loads(line) for line in lines[1:]]
    assert [e["op"] for e in edits] == ["add_tags", "remove_tags", "replace_tag", "move_to_front", "set_caption",
                                        "exclude", "restore", "move_to_subset", "set_keeper", "reject_mask",
                                        "accept_mask"]
    assert [e["batch"] for e in edits] == list(range(1, 12))
    assert edits[1]["ids"] == ["a", "b"] and edits[1]["tags"] == ["watermark"]
    assert edits[8]["drop"] == ["e"]
    assert [e.op for e in Curation(tmp_path / "c.curation.jsonl").edits()] == [e["op"] for e in edits]


def test_undo_removes_only_the_last_batch(tmp_path):
    cur = Curation(tmp_path / "c.curation.jsonl")
    cur.remove_tags(["a"], ["x"])
    with cur.batch():
        cur.add_tags(["a"], ["y"])
        cur.exclude(["b"])
    assert [e.op for e in cur.undo()] == ["add_tags", "exclude"]
    assert [e.op for e in cur.edits()] == ["remove_tags"]
    assert [e.op for e in cur.undo()] == ["remove_tags"]
    assert cur.undo() == [] and cur.edits() == []


def test_a_malformed_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "c.curation.jsonl"
    path.write_text('{"lorakit_curation": 1}\n{"batch": 1, "op": "remove_tags", "ids": ["a"], "tags": ["x"]}\n{oops\n')
    with pytest.raises(LorakitError, match=r"c\.curation\.jsonl:3: not valid JSON"):
        Curation(path).edits()
    path.write_text('{"batch": 1, "op": "paint", "ids": ["a"]}\n')
    with pytest.raises(LorakitError, match=r":1: unknown op 'paint'"):
        Curation(path).edits()
    path.write_text('{"batch": 1, "op": "add_tags", "ids": ["a"], "tags": ["a, b"]}\n')
    with pytest.raises(LorakitError, match=r":1: tag 'a, b' contains a comma"):
        Curation(path).edits()
    path.write_text('{"lorakit_curation": 9}\n')
    with pytest.raises(LorakitError, match="version 9 is newer"):
        Curation(path).edits()


def test_hand_written_lines_and_comments_are_read(tmp_path):
    path = tmp_path / "c.curation.jsonl"
    path.write_text('# my edits\n\n{"op": "exclude", "ids": ["a"], "note": "blurry"}\n')
    (edit,) = Curation(path).edits()
    assert edit.op == "exclude" and edit.note == "blurry" and edit.line == 3


def test_bad_arguments_are_refused_before_anything_is_written(tmp_path):
    cur = Curation(tmp_path / "c.curation.jsonl")
    with pytest.raises(LorakitError, match="position must be front or end"):
        cur.add_tags(["a"], ["x"], position="middle")
    with pytest.raises(LorakitError, match="not a valid subset name"):
        cur.move_to_subset(["a"], "../evil")
    with pytest.raises(LorakitError, match="no image ids"):
        cur.exclude([])
    assert not cur.path.exists()


def test_curation_file_sits_beside_the_pipeline_or_in_the_dataset(tmp_path):
    assert curation_path_for(tmp_path / "pipeline.yaml") == tmp_path / "pipeline.curation.jsonl"
    (tmp_path / "ds").mkdir()
    assert curation_path_for(tmp_path / "ds") == tmp_path / "ds" / "curation.jsonl"


# ----- replaying edits ----------------------------------------------------------------------------
def test_add_tags_front_and_end_and_a_present_tag_stays_where_it_is():
    tags, _, _ = curate_tags(_tags(["1girl", "solo"]), None, [
        _edit("add_tags", tags=["mychar", "solo"], position="front"), _edit("add_tags", tags=["smile"])])
    assert _names(tags) == ["mychar", "1girl", "solo", "smile"]


def test_remove_matches_spaces_underscores_case_and_escapes():
    tags, _, _ = curate_tags(_tags(["Long Hair", "hatsune_miku_\\(append\\)", "solo"]), None,
                             [_edit("remove_tags", tags=["long_hair", "hatsune miku (append)"])])
    assert _names(tags) == ["solo"]


def test_replace_tag_in_place_only_where_the_image_has_it():
    e = _edit("replace_tag", old="bow", new="black_bow")
    assert _names(curate_tags(_tags(["1girl", "bow", "solo"]), None, [e])[0]) == ["1girl", "black_bow", "solo"]
    assert _names(curate_tags(_tags(["1girl"]), None, [e])[0]) == ["1girl"]
    assert _names(curate_tags(_tags(["black_bow", "bow"]), None, [e])[0]) == ["black_bow"]


def test_move_to_front_keeps_the_given_order_and_ignores_absent_tags():
    tags, _, _ = curate_tags(_tags(["a", "b", "c", "d"]), None, [_edit("move_to_front", tags=["c", "x", "b"])])
    assert _names(tags) == ["c", "b", "a", "d"]


def test_set_caption_is_written_verbatim_until_a_later_tag_edit():
    tags, sentence, text = curate_tags(_tags(["1girl"]), "a photo", [_edit("set_caption", caption="mychar,smile")])
    assert text == "mychar,smile" and sentence is None and _names(tags) == ["mychar", "smile"]
    tags, _, text = curate_tags(_tags(["1girl"]), None, [_edit("set_caption", caption="mychar,smile"),
                                                         _edit("remove_tags", tags=["smile"])])
    assert text is None and _names(tags) == ["mychar"]


def test_tag_scores_survive_edits():
    tags, _, _ = curate_tags([["long_hair", 0.9], ["solo", 0.7]], None, [_edit("move_to_front", tags=["solo"])])
    assert tags == [["solo", 0.7], ["long_hair", 0.9]]


def test_later_decisions_win_and_keeper_excludes_the_old_keeper():
    plan = decisions([_edit("exclude", note="x"), _edit("restore"), _edit("exclude", ids=["b"]),
                      Edit(batch=2, op="set_keeper", ids=["k"], drop=["old"], names=["keep_me"])])
    assert not plan["a"].excluded and plan["a"].restored
    assert plan["b"].excluded
    assert plan["k"].restored and plan["old"].excluded and "duplicate of keep_me" in plan["old"].note


def _state(sid, name, tags=(), subset="default", **extra):
    return {"id": sid, "name": name, "image": f"{sid}.png", "subset": subset, "tags": _tags(tags),
            "caption": None, "mask": None, "meta": {}, **extra}


def test_apply_to_states_excludes_restores_moves_and_reports_orphans(tmp_path):
    states = [_state("a", "red", ["1girl", "watermark"]), _state("b", "blue")]
    aside = [(_state("c", "dup"), "dedupe", "near duplicate of red"), ({"name": "bad", "image": None, "id": None,
                                                                        "subset": "default"}, "source", "empty file")]
    edits = [_edit("remove_tags", ["a"], tags=["watermark"]), _edit("exclude", ["b"], note="blurry"),
             _edit("restore", ["c"]), _edit("move_to_subset", ["a"], subset="outfit2"),
             _edit("exclude", ["gone"], names=["old_image"])]
    kept, new_aside, result = apply_to_states(states, aside, edits, tmp_path / "c.jsonl")
    assert [s["name"] for s in kept] == ["red", "dup"]
    assert _names(kept[0]["tags"]) == ["1girl"] and kept[0]["subset"] == "outfit2" and kept[0]["edited"]
    assert [(s["name"], step, reason) for s, step, reason in new_aside] == [
        ("blue", "curation", "excluded by hand: blurry"), ("bad", "source", "empty file")]
    assert [(e.op, missing) for e, missing in result.orphans] == [("exclude", ["gone"])]
    assert any("old_image" in m and "no longer in the dataset" in m for m in result.messages())


def test_a_rejected_mask_is_taken_off_and_accepting_it_puts_it_back(tmp_path):
    state = _state("a", "red", mask="m.png")
    kept, _, _ = apply_to_states([state], [], [_edit("reject_mask", note="grey")], tmp_path / "c")
    assert kept[0]["mask"] is None and kept[0]["rejected_mask"] == "m.png"
    assert kept[0]["meta"]["mask_rejected"] == "rejected by hand: grey"
    kept, _, _ = apply_to_states([state], [], [_edit("reject_mask"), _edit("accept_mask")], tmp_path / "c")
    assert kept[0]["mask"] == "m.png" and "mask_rejected" not in kept[0]["meta"]


def test_ids_come_from_the_source_bytes_and_frames_get_their_suffix():
    assert source_id("ab" * 32) == "ab" * 8
    assert child_id("abc", "anim", "anim_0003", 2) == "abc:0003"
    assert child_id("abc", "pic", "pic", 0) == "abc"
    assert child_id("abc", "pic", "other", 1) == "abc:2"


# ----- through the runner ---------------------------------------------------------------------------
def _raw(tmp_path, names=("red", "blue", "green")) -> Path:
    raw = tmp_path / "raw"
    raw.mkdir()
    for n in names:
        Image.new("RGB", (64, 64), n).save(raw / f"{n}.png")
        (raw / f"{n}.txt").write_text(f"1girl, solo, {n}_background, watermark")
    return raw


def _run(tmp_path, raw, steps=("convert",)):
    data = {"output": str(tmp_path / "out"), "sources": [{"folder": {"path": str(raw)}}], "steps": list(steps)}
    return run_pipeline_dict(data, tmp_path)


def test_every_image_gets_a_stable_id_and_the_manifest_says_which_were_edited(tmp_path):
    raw = _raw(tmp_path)
    first = _run(tmp_path, raw)
    ids = {r.path: r.id for r in first.images}
    assert len(set(ids.values())) == 3 and all(len(i) == 16 for i in ids.values())
    cur = Curation.for_target(tmp_path / "out")
    cur.remove_tags([ids["red.png"]], ["watermark"])
    again = _run(tmp_path, raw, steps=("convert", "alpha"))  # another pipeline, same sources: same ids
    assert {r.path: r.id for r in again.images} == ids
    assert again.by_name("red").edited and not again.by_name("blue").edited
    assert again.by_name("red").caption == "1girl, solo, red_background"


def test_apply_to_dataset_writes_captions_now_and_undo_reverts_them(tmp_path):
    raw = _raw(tmp_path)
    res = _run(tmp_path, raw)
    out = tmp_path / "out"
    ids = {r.path: r.id for r in res.images}
    cur = Curation.for_target(out)
    cur.remove_tags([ids["red.png"], ids["blue.png"]], ["watermark"])
    cur.exclude([ids["green.png"]], note="off-model")
    result = apply_to_dataset(out, cur)
    assert result.excluded == ["green"] and sorted(result.captions) == ["blue", "red"]
    assert (out / "red.txt").read_text() == "1girl, solo, red_background"
    assert not (out / "green.png").exists() and (out / "set_aside" / "curation" / "green.png").is_file()
    manifest = Manifest.load(out)
    assert sorted(r.path for r in manifest.images) == ["blue.png", "red.png"]
    assert manifest.set_aside[0].reason == "excluded by hand: off-model" and manifest.set_aside[0].id == ids["green.png"]
    cur.undo()
    cur.undo()
    apply_to_dataset(out, cur)
    assert (out / "red.txt").read_text() == "1girl, solo, red_background, watermark"
    assert (out / "green.png").is_file() and len(Manifest.load(out).images) == 3


def test_an_id_the_dataset_does_not_have_is_refused(tmp_path):
    _run(tmp_path, _raw(tmp_path))
    with pytest.raises(LorakitError, match="no image with id nosuchid"):
        Curation.for_target(tmp_path / "out").exclude(["nosuchid"])


def test_a_restored_set_aside_image_goes_through_the_later_steps(tmp_path):
    raw = _raw(tmp_path, names=("red",))
    Image.new("RGB", (64, 64), "red").save(raw / "copy.png")
    steps = ("convert", "dedupe", {"tags": {"blacklist": ["solo"]}})
    res = _run(tmp_path, raw, steps)
    (aside,) = res.set_aside
    assert aside.step == "dedupe" and aside.id
    Curation.for_target(tmp_path / "out").restore([aside.id])
    again = _run(tmp_path, raw, steps)
    assert sorted(r.path for r in again.images) == ["copy.png", "red.png"]
    assert "solo" not in again.by_name("copy").caption  # the tags step ran on it
    assert not again.set_aside


def test_moving_to_a_subset_happens_before_the_steps(tmp_path):
    raw = _raw(tmp_path, names=("red", "blue"))
    data = {"output": str(tmp_path / "out"), "sources": [{"folder": {"path": str(raw)}}], "steps": ["triggers"],
            "subsets": {"outfit2": {"triggers": ["o2char"]}}}
    res = run_pipeline_dict(data, tmp_path)
    Curation.for_target(tmp_path / "out").move_to_subset([res.by_name("red").id], "outfit2")
    again = run_pipeline_dict(data, tmp_path)
    red = again.by_name("red")
    assert red.subset == "outfit2" and red.path == "outfit2/red.png" and red.caption.startswith("o2char")


def test_export_refuses_a_dataset_with_a_missing_image_before_writing(tmp_path):
    _run(tmp_path, _raw(tmp_path))
    (tmp_path / "out" / "blue.png").unlink()
    with pytest.raises(LorakitError, match=r"blue\.png: listed in .* but missing from disk.*lorakit curate apply"):
        load_dataset(tmp_path / "out")


def test_train_and_export_read_a_caption_edited_by_hand(tmp_path):
    _run(tmp_path, _raw(tmp_path))
    (tmp_path / "out" / "red.txt").write_text("mychar, 1girl\n")
    red = next(r for r in load_dataset(tmp_path / "out").images if r.path == "red.png")
    assert red.caption == "mychar, 1girl" and [t["name"] for t in red.tags] == ["mychar", "1girl"]


def test_a_mask_the_quality_check_rejected_is_kept_and_can_be_accepted(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    ghost = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    ghost.paste((255, 0, 0, 128), (16, 16, 48, 48))  # see-through: the check calls it grey
    ghost.save(raw / "ghost.png")
    data = {"output": str(tmp_path / "out"), "sources": [{"folder": {"path": str(raw)}}],
            "steps": [{"mask": {"backend": "alpha"}}]}
    res = run_pipeline_dict(data, tmp_path)
    rec = res.by_name("ghost")
    assert rec.mask is None and "grey" in rec.meta["mask_rejected"]
    kept = tmp_path / "out" / rec.meta["rejected_mask"]
    assert kept.is_file() and Image.open(kept).getpixel((32, 32)) == 128
    cur = Curation.for_target(tmp_path / "out")
    cur.accept_mask([rec.id])
    apply_to_dataset(tmp_path / "out", cur)
    accepted = Manifest.load(tmp_path / "out").images[0]
    assert accepted.mask == "masks/ghost.png" and "mask_rejected" not in accepted.meta
    assert run_pipeline_dict(data, tmp_path).by_name("ghost").mask == "masks/ghost.png"


# ----- the edit-survival rules, through the real `lorakit` process ----------------------------------
def _tags_of(path: Path) -> list[str]:
    return [t.strip() for t in path.read_text(encoding="utf-8").split(",")]


def test_hand_edits_survive_reruns_an_upstream_change_export_and_train(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    import yaml

    from conftest import run_cli
    from test_wd14 import build_tagger
    from tiny_models import build_tiny_sd15

    tagger = build_tagger(tmp_path / "tagger")
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("red", "blue", "green"):
        Image.new("RGB", (64, 64), name).save(raw / f"{name}.png")

    def pipeline(threshold):
        (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump({
            "output": "out", "resolution": 64, "sources": [{"folder": {"path": "raw"}}],
            "steps": ["convert", {"wd14": {"model": str(tagger), "general_threshold": threshold, "device": "cpu"}}]}))

    def run():
        proc = run_cli("run", str(tmp_path / "pipeline.yaml"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    out = tmp_path / "out"
    pipeline(0.35)
    run()
    assert "long_hair" in _tags_of(out / "red.txt") and "looking_at_viewer" not in _tags_of(out / "red.txt")

    # by hand: drop a tag and put a trigger first in one caption; delete another image
    edited = ["mychar"] + [t for t in _tags_of(out / "red.txt") if t != "long_hair"]
    (out / "red.txt").write_text(", ".join(edited) + "\n", encoding="utf-8")
    (out / "blue.png").unlink()
    proc = run()
    assert "1 caption(s) edited by hand" in proc.stderr and "1 image(s) deleted by hand" in proc.stderr
    assert _tags_of(out / "red.txt") == edited
    assert not (out / "blue.png").exists() and not (out / "blue.txt").exists()
    ops = [(e.op, e.names) for e in Curation.for_target(tmp_path / "pipeline.yaml").edits()]
    assert ("exclude", ["blue"]) in ops and ("remove_tags", ["red"]) in ops and ("add_tags", ["red"]) in ops

    assert "Nothing changed since the last run" in run().stderr  # and nothing is taken in twice
    assert len(Curation.for_target(tmp_path / "pipeline.yaml").edits()) == len(ops)

    # the tagger runs again with another threshold: its new tags arrive, the hand edits stay
    pipeline(0.2)
    run()
    red = _tags_of(out / "red.txt")
    assert red[0] == "mychar" and "looking_at_viewer" in red and "long_hair" not in red
    assert "long_hair" in _tags_of(out / "green.txt") and "looking_at_viewer" in _tags_of(out / "green.txt")
    assert not (out / "blue.png").exists()
    manifest = Manifest.load(out)
    assert {r.path: r.edited for r in manifest.images} == {"red.png": True, "green.png": False}

    proc = run_cli("export", "kohya", str(out), str(tmp_path / "kohya"))
    assert proc.returncode == 0, proc.stderr
    exported = sorted(p.name for p in (tmp_path / "kohya" / "img" / "1_default").iterdir())
    assert exported == ["green.png", "green.txt", "red.png", "red.txt"]
    assert _tags_of(tmp_path / "kohya" / "img" / "1_default" / "red.txt") == red
    proc = run_cli("export", "diffusers", str(out), str(tmp_path / "diffusers"))
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in (tmp_path / "diffusers" / "metadata.jsonl").read_text().splitlines()]
    assert {ln["file_name"]: ln["text"] for ln in lines}["default/red.png"] == ", ".join(red)

    base = build_tiny_sd15(tmp_path / "sd15")
    train = ["train", str(out), "--base-model", str(base), "--dry-run", "--resolution", "64",
             "--min-bucket-reso", "32", "--max-bucket-reso", "128", "--bucket-reso-steps", "32", "--device", "cpu"]
    proc = run_cli(*train)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Batches per epoch: 2" in proc.stderr  # red and green; blue stays excluded

    # deleted by hand and not run again: export and train name the file, write nothing, no traceback
    (out / "green.png").unlink()
    for args in (("export", "kohya", str(out), str(tmp_path / "kohya2")), tuple(train)):
        proc = run_cli(*args)
        assert proc.returncode == 1 and "green.png" in proc.stderr and "Traceback" not in proc.stderr
        assert "lorakit curate apply" in proc.stderr
    assert not (tmp_path / "kohya2").exists()


def test_a_changed_curation_file_reapplies_when_nothing_else_changed(tmp_path):
    raw = _raw(tmp_path, names=("red",))
    first = _run(tmp_path, raw)
    Curation.for_target(tmp_path / "out").add_tags([first.by_name("red").id], ["mychar"], position="front")
    second = _run(tmp_path, raw)
    assert not second.run.nothing_changed
    assert second.by_name("red").caption.startswith("mychar, ")
    assert _run(tmp_path, raw).run.nothing_changed


def test_curate_commands_edit_list_undo_and_apply_from_the_terminal(tmp_path):
    from conftest import run_cli

    _run(tmp_path, _raw(tmp_path))
    out = tmp_path / "out"
    proc = run_cli("curate", "remove-tags", str(out), "-t", "watermark", "--all")
    assert proc.returncode == 0, proc.stderr
    assert "watermark" not in (out / "red.txt").read_text() and "watermark" not in (out / "blue.txt").read_text()
    proc = run_cli("curate", "exclude", str(out), "blue", "--note", "off-model")
    assert proc.returncode == 0 and not (out / "blue.png").exists()
    listing = run_cli("curate", "list", str(out))
    assert "remove watermark" in listing.stdout and "exclude (off-model): blue" in listing.stdout
    proc = run_cli("curate", "undo", str(out))
    assert proc.returncode == 0 and (out / "blue.png").is_file()
    proc = run_cli("curate", "exclude", str(out), "nosuch")
    assert proc.returncode == 1 and "no image 'nosuch'" in proc.stderr and "Traceback" not in proc.stderr
    (out / "red.txt").write_text("1girl, red_background")  # a hand edit, taken in by apply
    proc = run_cli("curate", "apply", str(out))
    assert proc.returncode == 0 and "edited by hand" in proc.stderr
    assert [e.op for e in Curation.for_target(out).edits()] == ["remove_tags", "remove_tags"]


def test_a_copied_dataset_applies_its_curation_to_itself(tmp_path):
    import shutil

    res = _run(tmp_path, _raw(tmp_path))
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "out", copy)
    cur = Curation(copy / "curation.jsonl", copy)
    cur.add_tags([res.by_name("red").id], ["mychar"], position="front")
    apply_to_dataset(copy, cur)
    assert (copy / "red.txt").read_text().startswith("mychar, ")
    assert not (tmp_path / "out" / "red.txt").read_text().startswith("mychar")
    cur.undo()
    apply_to_dataset(copy, cur)
    assert (copy / "red.txt").read_text() == (tmp_path / "out" / "red.txt").read_text()


def test_animation_frames_keep_their_own_ids_across_reruns(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    frames = [Image.new("RGB", (32, 32), c) for c in ("red", "green", "blue")]
    frames[0].save(raw / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    res = _run(tmp_path, raw)
    ids = {r.path: r.id for r in res.images}
    assert sorted(ids) == ["anim_0001.png", "anim_0002.png", "anim_0003.png"]
    assert len({i.split(":")[0] for i in ids.values()}) == 1 and ids["anim_0002.png"].endswith(":0002")
    Curation.for_target(tmp_path / "out").exclude([ids["anim_0002.png"]])
    again = _run(tmp_path, raw, steps=({"convert": {"frame_step": 1}}, "alpha"))
    assert {r.path: r.id for r in again.images} == {k: v for k, v in ids.items() if k != "anim_0002.png"}


def test_an_edit_whose_image_is_gone_is_reported_in_the_run_summary(tmp_path):
    raw = _raw(tmp_path)
    res = _run(tmp_path, raw)
    Curation.for_target(tmp_path / "out").remove_tags([res.by_name("red").id], ["solo"])
    (raw / "red.png").unlink()
    again = _run(tmp_path, raw)
    messages = next(s for s in again.stats if s.name == "curation").messages
    assert any("names 1 image(s) no longer in the dataset: red" in m for m in messages)
    assert [e.op for e in Curation.for_target(tmp_path / "out").edits()] == ["remove_tags"]  # kept, not dropped


def test_names_that_do_not_match_the_ids_are_ignored_not_fatal(tmp_path):
    path = tmp_path / "c.curation.jsonl"
    path.write_text('{"op": "exclude", "ids": ["a", "b"], "names": ["only_one"]}\n')
    (edit,) = Curation(path).edits()
    assert edit.names is None and edit.describe() == "exclude: a, b"


def test_a_picture_retouched_in_the_dataset_folder_is_kept_across_reruns(tmp_path):
    raw = _raw(tmp_path)
    first = _run(tmp_path, raw, steps=("convert", {"tags": {"blacklist": ["watermark"]}}))
    out = tmp_path / "out"
    red_id = first.by_name("red").id
    retouched = Image.new("RGB", (48, 64), "orange")  # inpainted and cropped by hand
    retouched.save(out / "red.png")
    again = _run(tmp_path, raw, steps=("convert", {"tags": {"blacklist": ["watermark"]}}))
    with Image.open(out / "red.png") as im:  # the run did not write the steps' picture over it
        assert im.size == (48, 64) and im.getpixel((0, 0)) == (255, 165, 0)
    red = again.by_name("red")
    assert red.id == red_id and red.edited and (red.width, red.height) == (48, 64)
    assert red.caption == "1girl, solo, red_background"  # caption edits and steps still apply
    cur = Curation.for_target(out)
    (edit,) = [e for e in cur.edits() if e.op == "replace_image"]
    assert edit.by == "hand" and edit.ids == [red_id] and (cur.path.parent / edit.image).is_file()
    assert any("picture(s) changed by hand" in m for s in again.stats for m in s.messages)
    # The work store can go (lorakit clean): the picture beside the curation file is what counts.
    import shutil

    shutil.rmtree(out / ".lorakit")
    third = _run(tmp_path, raw, steps=("convert", {"tags": {"blacklist": ["watermark"]}}))
    with Image.open(out / "red.png") as im:
        assert im.size == (48, 64)
    assert third.by_name("red").sha256 == red.sha256
    cur.undo()  # undoing the edit brings the steps' picture back
    _run(tmp_path, raw, steps=("convert", {"tags": {"blacklist": ["watermark"]}}))
    with Image.open(out / "red.png") as im:
        assert im.size == (64, 64)


def test_a_broken_or_merely_touched_picture_is_not_an_edit(tmp_path):
    import os

    raw = _raw(tmp_path, names=("red", "blue"))
    _run(tmp_path, raw)
    out = tmp_path / "out"
    os.utime(out / "blue.png", ns=(1, 1))  # same bytes, another time
    (out / "red.png").write_bytes(b"\x89PNG\r\n\x1a\nhalf-saved")
    res = _run(tmp_path, raw)
    assert not [e for e in Curation.for_target(out).edits() if e.op == "replace_image"]
    with Image.open(out / "red.png") as im:  # rewritten from the store
        assert im.size == (64, 64)
    assert not res.by_name("red").edited


def test_curate_picture_replaces_an_images_picture_from_the_terminal(tmp_path):
    from conftest import run_cli

    raw = _raw(tmp_path, names=("red", "blue"))
    _run(tmp_path, raw)
    fixed = tmp_path / "fixed.png"
    Image.new("RGB", (32, 32), "white").save(fixed)
    proc = run_cli("curate", "picture", str(tmp_path / "out"), "red", str(fixed))
    assert proc.returncode == 0, proc.stderr
    with Image.open(tmp_path / "out" / "red.png") as im:
        assert im.size == (32, 32)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    proc = run_cli("curate", "picture", str(tmp_path / "out"), "blue", str(tmp_path / "broken.png"))
    assert proc.returncode != 0 and "broken.png" in proc.stderr and "Traceback" not in proc.stderr
