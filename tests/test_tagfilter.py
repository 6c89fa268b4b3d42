"""tagfilter: keep / drop / move by tags and scores after a tagger, and the monochrome share."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lorakit.plugin_sdk import Item, ParamError, StepContext, Subset
from lorakit.plugin_sdk.testing import run_pipeline_dict
from lorakit.plugins.tagfilter import TagFilterStep
from test_filter import toned, warm_photo


def make(tmp_path: Path, name: str, tags: dict, size=(64, 64), colour="orange", subset="default") -> Item:
    path = tmp_path / "img" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return Item(name=name, path=path, subset=subset, tags=dict(tags))


def run(tmp_path, items, params, subsets=None):
    ctx = StepContext("tagfilter", tmp_path / "w", tmp_path / "t", tmp_path / "out", subsets=subsets or {})
    out = TagFilterStep.configure(params).run(items, ctx)
    return out, ctx


def names(items):
    return sorted(i.name for i in items)


def aside(ctx):
    return {i.name: reason for i, reason in ctx.set_aside_items}


def test_guides_preset_sets_aside_chibi_groups_watermarks_anatomy_and_blur(tmp_path):
    items = [make(tmp_path, n, t) for n, t in {
        "clean": {"1girl": 0.99, "solo": 0.95, "blurry_background": 0.9},
        "chibi": {"1girl": 0.9, "chibi": 0.81},
        "group": {"multiple_girls": 0.7},
        "signed": {"watermark": 0.6},
        "bubble": {"speech_bubble": 0.5},
        "hands": {"bad_hands": 0.4},
        "blur": {"blurry": 0.9},
    }.items()]
    out, ctx = run(tmp_path, items, {"preset": "guides"})
    assert names(out) == ["clean"]  # blurry_background is not blurry
    reasons = aside(ctx)
    assert reasons["chibi"] == "chibi or super-deformed: chibi 0.81"
    assert reasons["group"] == "group shot: multiple_girls 0.70"
    assert reasons["signed"].startswith("watermark or text: watermark")
    assert reasons["hands"].startswith("bad anatomy")
    assert out[0].meta["tagfilter"] == {"verdict": "keep"}


def test_scores_below_the_threshold_do_not_count_but_unscored_tags_always_do(tmp_path):
    items = [make(tmp_path, "weak", {"chibi": 0.3}), make(tmp_path, "booru", {"chibi": None})]
    out, ctx = run(tmp_path, items, {"preset": "guides", "threshold": 0.35})
    assert names(out) == ["weak"] and "booru" in aside(ctx)


def test_a_rule_carries_its_own_score(tmp_path):
    items = [make(tmp_path, "a", {"blurry": 0.7}), make(tmp_path, "b", {"blurry": 0.5}),
             make(tmp_path, "c", {"lens_censor": 0.9})]
    out, ctx = run(tmp_path, items, {"drop": "blurry>=0.6, *_censor"})
    assert names(out) == ["b"]
    assert aside(ctx)["a"] == "drop rule blurry>=0.6: blurry 0.70"
    assert aside(ctx)["c"] == "drop rule *_censor: lens_censor 0.90"


def test_tags_match_in_any_spelling(tmp_path):
    out, ctx = run(tmp_path, [make(tmp_path, "a", {"Speech Bubble": 0.9})], {"preset": "guides"})
    assert not out and "speech_bubble" in aside(ctx)["a"]


def test_allow_takes_a_tag_out_of_the_preset(tmp_path):
    items = [make(tmp_path, "duo", {"multiple_girls": 0.9}), make(tmp_path, "chibi", {"chibi": 0.9})]
    out, ctx = run(tmp_path, items, {"preset": "guides", "allow": ["multiple_girls"]})
    assert names(out) == ["duo"] and names(i for i, _ in ctx.set_aside_items) == ["chibi"]


def test_keep_sets_aside_images_with_none_of_the_tags(tmp_path):
    items = [make(tmp_path, "solo", {"solo": 0.9}), make(tmp_path, "nobody", {"scenery": 0.9}),
             make(tmp_path, "unsure", {"solo": 0.2})]
    out, ctx = run(tmp_path, items, {"keep": ["solo"]})
    assert names(out) == ["solo"]
    assert aside(ctx)["nobody"] == "none of the keep tags (solo)"


def test_move_sends_images_to_a_subset_that_inherits_the_settings(tmp_path):
    subsets = {"char": Subset("char", repeats=4, triggers=["mychar"], keep_tokens=1)}
    items = [make(tmp_path, "page", {"monochrome": 0.9, "chibi": 0.2}, subset="char"),
             make(tmp_path, "colour", {"smile": 0.9}, subset="char"),
             make(tmp_path, "sd", {"chibi": 0.95}, subset="char")]
    out, ctx = run(tmp_path, items, {"move": "monochrome=manga,chibi>=0.9=chibi"}, subsets)
    by_name = {i.name: i for i in out}
    assert by_name["page"].subset == "manga" and by_name["colour"].subset == "char"
    assert by_name["sd"].subset == "chibi"
    manga = ctx.subsets["manga"]
    assert manga.triggers == ["mychar"] and manga.repeats == 4 and manga.folder == "manga"
    assert by_name["page"].meta["tagfilter"] == {"verdict": "move", "rule": "monochrome=manga", "to": "manga",
                                                 "tag": "monochrome", "score": 0.9, "from": "char"}


def test_a_tag_you_move_is_not_dropped_by_the_preset(tmp_path):
    out, _ = run(tmp_path, [make(tmp_path, "sd", {"chibi": 0.9})], {"preset": "guides", "move": {"chibi": "chibi"}})
    assert [i.subset for i in out] == ["chibi"]


def test_regularisation_subsets_are_left_alone(tmp_path):
    subsets = {"reg": Subset("reg", is_reg=True)}
    out, ctx = run(tmp_path, [make(tmp_path, "r", {"chibi": 0.9}, subset="reg")], {"preset": "guides"}, subsets)
    assert names(out) == ["r"] and not ctx.set_aside_items


def test_verdicts_report_lists_every_image_with_rule_and_score(tmp_path):
    items = [make(tmp_path, "ok", {"solo": 0.9}), make(tmp_path, "wm", {"watermark": 0.8})]
    _, ctx = run(tmp_path, items, {"preset": "guides"})
    report = json.loads((tmp_path / "out" / "reports" / "tagfilter-verdicts.json").read_text())
    assert report["counts"] == {"keep": 1, "move": 0, "drop": 1, "monochrome": 0}
    rows = {r["name"]: r for r in report["items"]}
    assert rows["wm"]["verdict"] == "drop" and rows["wm"]["tag"] == "watermark" and rows["wm"]["score"] == 0.8
    assert rows["ok"]["verdict"] == "keep"
    assert "watermark" in report["rules"]["drop"]


@pytest.mark.parametrize("bad", ["chibi>=2", ">=0.5", "chibi>0.5"])
def test_malformed_rules_are_refused_before_any_work(bad):
    with pytest.raises(ParamError, match="drop"):
        TagFilterStep.configure({"drop": [bad]})


def test_malformed_moves_are_refused():
    with pytest.raises(ParamError, match="move"):
        TagFilterStep.configure({"move": "monochrome"})
    with pytest.raises(ParamError, match="move"):
        TagFilterStep.configure({"move": {"monochrome": "../escape"}})


# ----- monochrome share -------------------------------------------------------------------------
def grey_page(seed: int, size=(90, 120)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size[1], size[0])) * 255).astype(np.uint8), "L").convert("RGB")


def picture_items(tmp_path, pictures: dict[str, Image.Image], tags=None) -> list[Item]:
    folder = tmp_path / "pics"
    folder.mkdir(exist_ok=True)
    items = []
    for name, im in pictures.items():
        im.save(folder / f"{name}.png")
        items.append(Item(name=name, path=folder / f"{name}.png", tags=dict((tags or {}).get(name, {}))))
    return items


def test_monochrome_share_keeps_the_largest_monochrome_images(tmp_path):
    pictures = {f"page{i}": grey_page(i, size=(60 + 10 * i, 80)) for i in range(5)}
    pictures["sepia"] = toned(warm_photo(1), (1.0, 0.85, 0.62))  # 160x120: the largest
    pictures |= {"cat": warm_photo(2), "colour": Image.fromarray(np.random.default_rng(9).integers(0, 256, (50, 50, 3), dtype=np.uint8))}
    out, ctx = run(tmp_path, picture_items(tmp_path, pictures), {"monochrome_share": "50%", "monochrome_test": "pixels"})
    # 6 monochrome + 2 colour (the warm photo is colour): 50% allows 2 monochrome, the largest
    assert names(out) == ["cat", "colour", "page4", "sepia"]
    reasons = aside(ctx)
    assert sorted(reasons) == ["page0", "page1", "page2", "page3"]
    assert reasons["page0"].startswith("monochrome share: 6 of 8 images monochrome (75%), limit 50%: kept the 2 largest")
    assert {i.name: i.meta["tagfilter"]["monochrome"] for i in out} == {"cat": False, "colour": False,
                                                                        "page4": True, "sepia": True}


def test_monochrome_share_under_the_limit_sets_nothing_aside(tmp_path):
    pictures = {"page": grey_page(0), "a": warm_photo(0), "b": warm_photo(1)}
    out, ctx = run(tmp_path, picture_items(tmp_path, pictures), {"monochrome_share": 50})
    assert names(out) == ["a", "b", "page"] and not ctx.set_aside_items


def test_monochrome_by_tags_needs_no_decoding(tmp_path):
    pictures = {"a": Image.new("RGB", (40, 40), "red"), "b": Image.new("RGB", (50, 50), "red"),
                "c": Image.new("RGB", (60, 60), "blue")}
    tags = {"a": {"monochrome": 0.9}, "b": {"greyscale": None}}
    out, ctx = run(tmp_path, picture_items(tmp_path, pictures, tags),
                   {"monochrome_share": "50%", "monochrome_test": "tags"})
    assert names(out) == ["b", "c"] and "tag monochrome" in aside(ctx)["a"]


def test_zero_share_sets_aside_every_monochrome_image(tmp_path):
    pictures = {"page": grey_page(0), "cat": warm_photo(3)}
    out, ctx = run(tmp_path, picture_items(tmp_path, pictures), {"monochrome_share": 0})
    assert names(out) == ["cat"]


def test_a_broken_image_is_set_aside_and_the_balance_goes_on(tmp_path):
    items = picture_items(tmp_path, {"cat": warm_photo(0), "page": grey_page(1)})
    bad = tmp_path / "pics" / "bad.png"
    bad.write_bytes(b"not a png")
    items.append(Item(name="bad", path=bad))
    out, ctx = run(tmp_path, items, {"monochrome_share": "50%"})
    assert names(out) == ["cat", "page"] and "bad.png" in aside(ctx)["bad"]


# ----- through the runner, after a real (tiny) tagger -------------------------------------------
def test_after_a_tiny_wd14_tagger_in_a_pipeline(tmp_path):
    pytest.importorskip("onnx")
    from test_wd14 import build_tagger

    tags = [("general", 9, (0, 0, 0), 2.0), ("sensitive", 9, (0, 0, 0), 0.0),
            ("chibi", 0, (0, 0, 8), -4.0),      # red pictures: sigmoid(4) = 0.98
            ("monochrome", 0, (-8, 4, -8), 0.0),  # pure green: sigmoid(4); others below 0.35
            ("solo", 0, (0, 0, 0), 2.0)]
    model = build_tagger(tmp_path / "tagger", size=32, tags=tags)
    src = tmp_path / "in"
    src.mkdir()
    Image.new("RGB", (40, 40), (255, 0, 0)).save(src / "red.png")
    Image.new("RGB", (40, 40), (0, 255, 0)).save(src / "green.png")
    Image.new("RGB", (40, 40), (0, 0, 255)).save(src / "blue.png")
    res = run_pipeline_dict({
        "output": str(tmp_path / "out"),
        "sources": [{"folder": {"path": str(src)}}],
        "steps": [{"wd14": {"model": str(model), "device": "cpu"}},
                  {"tagfilter": {"preset": "guides", "move": "monochrome=manga"}}],
    }, tmp_path, workers=1)
    assert res.reasons() == {"red": "chibi or super-deformed: chibi 0.98"}
    assert res.by_name("green").subset == "manga" and res.by_name("green").path.startswith("manga/")
    assert res.by_name("blue").meta["tagfilter"]["verdict"] == "keep"
    assert (res.output_dir / "reports" / "tagfilter-verdicts.json").is_file()


def test_standalone_command(tmp_path):
    from conftest import run_cli

    src = tmp_path / "in"
    src.mkdir()
    for name, caption in {"a": "1girl, solo", "b": "1girl, chibi"}.items():
        Image.new("RGB", (32, 32), "white").save(src / f"{name}.png")
        (src / f"{name}.txt").write_text(caption)
    proc = run_cli("tagfilter", str(src), str(tmp_path / "out"), "--preset", "guides")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [r["path"] for r in manifest["images"]] == ["a.png"]
    assert manifest["set_aside"][0]["reason"] == "chibi or super-deformed: chibi"
