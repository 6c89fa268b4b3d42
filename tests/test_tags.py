"""The tag consolidator (``tags`` step) and the tag text conventions it relies on."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorakit.plugin_sdk import Item, LorakitError, ParamError, StepContext, Subset
from lorakit.plugin_sdk.testing import make_image, run_pipeline_dict, run_step
from lorakit.plugins._tagging import TagPatterns, format_tag, tag_key
from lorakit.plugins.tags import TagsStep


def dataset(root: Path, captions: dict[str, str]) -> Path:
    """Images with same-stem captions; ``captions`` maps ``[subset/]name`` to the caption text."""
    for i, (name, text) in enumerate(captions.items()):
        make_image(root / f"{name}.png", (8, 8), (i * 7 % 256, i * 13 % 256, 90))
        (root / f"{name}.txt").write_text(text, encoding="utf-8")
    return root


def run_tags(items: list[Item], params: dict | None = None, subsets: dict | None = None, tmp: Path = Path("/tmp")):
    ctx = StepContext("tags", tmp / "work", tmp / "tmp", tmp / "out", subsets=subsets or {})
    return TagsStep.configure(params or {}).run(items, ctx), ctx


def item(tags, subset="default", name="a"):
    if isinstance(tags, str):
        tags = {t.strip(): None for t in tags.split(",")}
    return Item(name, Path(f"/nonexistent/{name}.png"), subset, tags=dict(tags))


# ----- tag text -----------------------------------------------------------------------------------
def test_canonical_spelling_unifies_case_spaces_and_escaped_parentheses():
    assert tag_key(r"Hatsune Miku \(Cosplay\)") == "hatsune_miku_(cosplay)"
    assert tag_key("  Long   Hair ") == "long_hair"
    assert tag_key("long_hair") == tag_key("long hair") == tag_key("LONG_HAIR")


def test_emoticons_keep_their_underscores_in_space_style():
    assert format_tag(tag_key("^_^"), "spaces") == "^_^"
    assert format_tag(tag_key(">_<"), "spaces") == ">_<"
    assert format_tag("long_hair", "spaces") == "long hair"
    assert format_tag("hatsune_miku_(cosplay)", "spaces", escape_parentheses=True) == r"hatsune miku \(cosplay\)"


def test_tag_patterns_match_wildcards_after_normalising():
    patterns = TagPatterns(["*_(meme)", "Watermark"])
    assert "sailor_moon_redraw_challenge_(meme)" in patterns
    assert "watermark" in patterns
    assert "meme" not in patterns


# ----- cleaning -----------------------------------------------------------------------------------
def test_duplicates_in_different_spellings_merge_keeping_the_highest_score(tmp_path):
    out, ctx = run_tags([item({"Long Hair": 0.6, "long_hair": 0.9, r"long\_hair": None})], tmp=tmp_path)
    assert out[0].tags == {"long_hair": 0.9}
    assert ctx.reports["changes"]["duplicates"] == 2


def test_default_blacklist_removes_the_guides_useless_tags(tmp_path):
    out, _ = run_tags([item("1girl, meme, parody, uncensored, shiny_skin, sailor_moon_redraw_challenge_(meme), "
                            "commentary_request, highres, solo")], tmp=tmp_path)
    assert list(out[0].tags) == ["1girl", "solo"]


def test_namespaced_booru_tags_are_removed_but_emoticons_stay(tmp_path):
    out, _ = run_tags([item("artist:someone, rating:safe, :d, re:zero_kara_hajimeru_isekai_seikatsu, smile")],
                      tmp=tmp_path)
    assert list(out[0].tags) == [":d", "re:zero_kara_hajimeru_isekai_seikatsu", "smile"]


def test_user_blacklist_with_wildcards_extends_the_default(tmp_path):
    out, _ = run_tags([item("1girl, watermark, hatsune_miku_(cosplay), meme, solo")],
                      {"blacklist": "watermark,*_(cosplay)"}, tmp=tmp_path)
    assert list(out[0].tags) == ["1girl", "solo"]


def test_default_blacklist_can_be_switched_off(tmp_path):
    out, _ = run_tags([item("meme, solo")], {"default_blacklist": False}, tmp=tmp_path)
    assert list(out[0].tags) == ["meme", "solo"]


def test_inline_alias_picks_one_of_two_synonyms(tmp_path):
    out, ctx = run_tags([item({"tiara": 0.8, "circlet": 0.5, "1girl": 0.99})], {"alias": ["tiara=circlet"]}, tmp=tmp_path)
    assert out[0].tags == {"1girl": 0.99, "circlet": 0.8}
    assert ctx.reports["changes"]["renamed"] == [{"from": "tiara", "to": "circlet", "images": 1}]


def test_two_column_alias_csv_renames_and_follows_chains(tmp_path):
    csv = tmp_path / "aliases.csv"
    csv.write_text("# my synonyms\nantecedent,consequent\ntiara,circlet\nhead_circlet,tiara\n", encoding="utf-8")
    out, _ = run_tags([item("head_circlet, solo")], {"aliases": str(csv)}, tmp=tmp_path)
    assert list(out[0].tags) == ["circlet", "solo"]


def test_danbooru_alias_export_uses_only_active_rows(tmp_path):
    csv = tmp_path / "tag_aliases.csv"
    csv.write_text(
        "id,antecedent_name,consequent_name,created_at,status\n"
        "1,bishoujo,looking_at_viewer,2013-01-01,deleted\n"
        "2,hair_bow_(red),red_bow,2014-02-02,active\n"
        "3,kitty_ears,cat_ears,2015-03-03,active\n", encoding="utf-8")
    out, _ = run_tags([item("bishoujo, kitty_ears, hair_bow_(red)")], {"aliases": str(csv)}, tmp=tmp_path)
    assert list(out[0].tags) == ["bishoujo", "cat_ears", "red_bow"]


def test_generic_tag_is_dropped_when_a_specific_tag_says_the_same(tmp_path):
    out, ctx = run_tags([item("bow, black_bow, shirt, white_shirt, skirt, plaid_skirt, frilled_skirt, solo")],
                        tmp=tmp_path)
    assert list(out[0].tags) == ["black_bow", "white_shirt", "plaid_skirt", "frilled_skirt", "solo"]
    assert ctx.reports["changes"]["generic"]["skirt"]["images"] == 1


def test_generic_tag_stays_when_the_specific_tag_denies_it(tmp_path):
    out, _ = run_tags([item("shoes, no_shoes")], tmp=tmp_path)
    assert list(out[0].tags) == ["shoes", "no_shoes"]


def test_generic_tag_rule_can_be_switched_off(tmp_path):
    out, _ = run_tags([item("bow, black_bow")], {"drop_generic": False}, tmp=tmp_path)
    assert list(out[0].tags) == ["bow", "black_bow"]


def test_danbooru_implications_drop_the_implied_tags_transitively(tmp_path):
    csv = tmp_path / "tag_implications.csv"
    csv.write_text("id,antecedent_name,consequent_name,created_at,status\n"
                   "1,serafuku,school_uniform,2012-01-01,active\n"
                   "2,school_uniform,uniform,2012-01-01,active\n"
                   "3,ahoge,hair,2012-01-01,pending\n", encoding="utf-8")
    out, _ = run_tags([item("uniform, school_uniform, serafuku, ahoge, hair")],
                      {"implications": str(csv), "drop_generic": False}, tmp=tmp_path)
    assert list(out[0].tags) == ["serafuku", "ahoge", "hair"]


def test_sort_by_score_puts_confident_tags_first_and_unscored_last(tmp_path):
    out, _ = run_tags([item({"smile": 0.4, "booru_tag": None, "1girl": 0.99, "solo": 0.9})], tmp=tmp_path)
    assert list(out[0].tags) == ["1girl", "solo", "smile", "booru_tag"]


def test_sort_by_frequency_uses_the_subset_counts(tmp_path):
    items = [item("smile, 1girl", name="a"), item("1girl, sky", name="b"), item("sky, 1girl, smile", name="c"),
             item("sky, smile", "other", name="d"), item("sky", "other", name="e")]
    out, _ = run_tags(items, {"sort": "frequency"}, tmp=tmp_path)
    assert list(out[0].tags) == ["1girl", "smile"]
    assert list(out[2].tags) == ["1girl", "sky", "smile"]
    assert list(out[3].tags) == ["sky", "smile"]


def test_trigger_tags_of_subsets_are_left_exactly_as_written(tmp_path):
    out, _ = run_tags([item("MyChar_V2, Long Hair, meme", subset="outfit1")],
                      subsets={"outfit1": Subset("outfit1", triggers=["MyChar_V2"])}, tmp=tmp_path)
    assert list(out[0].tags) == ["MyChar_V2", "long_hair"]


def test_space_style_writes_spaces_in_the_caption_file(tmp_path):
    src = dataset(tmp_path / "in", {"a": r"Hatsune_Miku_\(cosplay\), long_hair, ^_^"})
    res = run_step("tags", src, tmp_path / "out", {"tag_style": "spaces"})
    assert (tmp_path / "out" / "a.txt").read_text(encoding="utf-8") == "hatsune miku (cosplay), long hair, ^_^"
    assert res.caption("a") == "hatsune miku (cosplay), long hair, ^_^"


def test_frequency_report_counts_tags_per_subset(tmp_path):
    src = dataset(tmp_path / "in", {"outfit1/a": "1girl, red_dress, smile", "outfit1/b": "1girl, red_dress",
                                    "outfit2/c": "1girl, kimono"})
    res = run_pipeline_dict({
        "output": str(tmp_path / "out"),
        "sources": [{"folder": {"path": str(src), "subfolders_as_subsets": True}}],
        "steps": ["tags"],
    }, tmp_path)
    report = json.loads((res.output_dir / "reports" / "tags-frequency.json").read_text(encoding="utf-8"))
    assert report == {"outfit1": {"1girl": 2, "red_dress": 2, "smile": 1}, "outfit2": {"1girl": 1, "kimono": 1}}
    messages = [m for s in res.stats if s.name == "tags" for m in s.messages]
    assert any(m.startswith("subset outfit1: 2 images, 3 distinct tags") for m in messages)


# ----- bad input ----------------------------------------------------------------------------------
def test_alias_csv_with_a_one_column_row_is_refused_naming_file_and_line(tmp_path):
    csv = tmp_path / "aliases.csv"
    csv.write_text("tiara,circlet\nlonely_tag\n", encoding="utf-8")
    with pytest.raises(ParamError) as err:
        TagsStep.configure({"aliases": str(csv)})
    assert "aliases.csv line 2" in str(err.value) and "'aliases'" in str(err.value)


def test_missing_alias_file_is_refused_before_any_work(tmp_path):
    with pytest.raises(ParamError, match="an existing CSV file"):
        TagsStep.configure({"implications": str(tmp_path / "nope.csv")})


def test_inline_alias_without_equals_is_refused():
    with pytest.raises(ParamError, match="old=new"):
        TagsStep.configure({"alias": ["tiara"]})


def test_bad_alias_file_in_a_pipeline_is_refused_naming_the_file_and_line(tmp_path):
    csv = tmp_path / "aliases.csv"
    csv.write_text("only_one\n", encoding="utf-8")
    src = dataset(tmp_path / "in", {"a": "1girl"})
    with pytest.raises(LorakitError, match="aliases.csv line 1"):
        run_pipeline_dict({"output": str(tmp_path / "out"), "sources": [{"folder": {"path": str(src)}}],
                           "steps": [{"tags": {"aliases": "aliases.csv"}}]}, tmp_path)


# ----- tag tools: keep_generic, split, rare tags ----------------------------------------------------
def test_keep_generic_keeps_a_generic_tag_next_to_its_specific_one(tmp_path):
    (out,), ctx = run_tags([item("red_tie, tie, black_bow, bow")], {"keep_generic": ["tie"]}, tmp=tmp_path)
    assert list(out.tags) == ["red_tie", "tie", "black_bow"]  # guide 001 keeps tie; bow is still folded


def test_split_replaces_a_generic_tag_by_its_parts(tmp_path):
    items = [item({"armor": 0.8, "gorget": 0.9, "1girl": 0.99}, name="a"), item("solo", name="b")]
    (a, b), ctx = run_tags(items, {"split": "armor=pauldrons+gorget+breastplate", "sort": "none"}, tmp=tmp_path)
    assert a.tags == {"pauldrons": 0.8, "gorget": 0.9, "breastplate": 0.8, "1girl": 0.99}
    assert list(b.tags) == ["solo"]
    changes = ctx.reports["changes"]["split"]
    assert changes == {"armor": {"into": ["pauldrons", "gorget", "breastplate"], "images": 1}}


def test_split_follows_aliases_and_the_blacklist(tmp_path):
    (out,), _ = run_tags([item("plate_armour")], {"alias": ["plate_armour=armor"], "blacklist": ["gorget"],
                                                  "split": {"armor": ["pauldrons", "gorget"]}}, tmp=tmp_path)
    assert list(out.tags) == ["pauldrons"]


def test_a_split_without_parts_is_refused():
    with pytest.raises(ParamError, match="split"):
        TagsStep.configure({"split": {"armor": []}})


def write_selected_tags(path: Path, counts: dict[str, int]) -> Path:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["tag_id", "name", "category", "count"])
        for i, (name, count) in enumerate(counts.items()):
            writer.writerow([i, name, 0, count])
    return path


COUNTS = {"1girl": 4_000_000, "road": 13_000, "dirt_road": 395, "solo": 3_000_000, "mycharacter_(outfit)": 12}


def test_rare_tags_are_flagged_by_the_danbooru_counts_of_selected_tags(tmp_path):
    csv_path = write_selected_tags(tmp_path / "tagger" / "selected_tags.csv", COUNTS)
    items = [item("1girl, dirt_road, road", name="a"), item("solo, dirt road, handmade_tag", name="b")]
    (a, b), ctx = run_tags(items, {"tag_counts": str(csv_path), "sort": "none"}, tmp=tmp_path)
    assert "dirt_road" in a.tags  # flagged, not dropped
    assert a.meta["rare_tags"] == {"dirt_road": 395}
    assert b.meta["rare_tags"] == {"dirt_road": 395, "handmade_tag": None}
    report = ctx.reports["rare"]
    assert report["tags"]["dirt_road"] == {"posts": 395, "images": 2, "examples": ["a", "b"]}
    assert report["tags"]["handmade_tag"]["posts"] is None
    assert any("2 rare tag(s) flagged, under 500 Danbooru posts" in m and "dirt_road (395 posts)" in m
               for m in ctx.messages)


def test_rare_tags_can_be_dropped_and_the_limit_changed(tmp_path):
    folder = tmp_path / "tagger"
    write_selected_tags(folder / "selected_tags.csv", COUNTS)
    (out,), _ = run_tags([item("1girl, dirt_road, road")], {"tag_counts": str(folder), "rare": "drop",
                                                             "rare_below": 20_000}, tmp=tmp_path)
    assert list(out.tags) == ["1girl"]  # road (13,000) is under 20,000 too


def test_trigger_tags_are_never_rare(tmp_path):
    csv_path = write_selected_tags(tmp_path / "t.csv", COUNTS)
    subsets = {"default": Subset("default", triggers=["zxq_char"])}
    (out,), _ = run_tags([item("zxq_char, 1girl")], {"tag_counts": str(csv_path)}, subsets, tmp=tmp_path)
    assert out.meta["rare_tags"] == {}


def test_a_tag_list_without_counts_is_refused_naming_the_file(tmp_path):
    bad = tmp_path / "selected_tags.csv"
    bad.write_text("tag_id,name,category\n1,solo,0\n")
    with pytest.raises(LorakitError, match="selected_tags.csv: not a WD14 selected_tags.csv"):
        run_tags([item("solo")], {"tag_counts": str(bad)}, tmp=tmp_path)


def test_an_edited_tag_count_file_is_not_served_from_the_cache(tmp_path):
    src = dataset(tmp_path / "in", {"a": "1girl, dirt_road"})
    csv_path = write_selected_tags(tmp_path / "counts" / "selected_tags.csv", COUNTS)
    params = {"tag_counts": str(csv_path)}
    first = run_step("tags", src, tmp_path / "out", params)
    assert first.by_name("a").meta["rare_tags"] == {"dirt_road": 395}
    write_selected_tags(csv_path, {**COUNTS, "dirt_road": 5000})
    second = run_step("tags", src, tmp_path / "out", params)
    assert second.by_name("a").meta["rare_tags"] == {}
