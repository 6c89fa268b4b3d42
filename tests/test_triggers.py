"""The trigger pruner (``triggers`` step) and the tag category rules it uses."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorakit.plugin_sdk import Item, ParamError, StepContext
from lorakit.plugin_sdk.testing import make_image, run_pipeline_dict
from lorakit.plugins import tag_rules
from lorakit.plugins.triggers import TriggersStep

# Guide 002's pruning example (semi-static, a character trigger plus an outfit trigger), in English.
GUIDE_UNPRUNED = ("1girl, ascot, closed_mouth, frilled_ascot, frilled_skirt, frills, green_hair, long_sleeves, "
                  "looking_at_viewer, open_mouth, plaid, plaid_skirt, plaid_vest, red_skirt, red_vest, shirt, "
                  "short_hair, simple_background, skirt, solo, umbrella, vest, white_shirt, yellow_background")
GUIDE_PRUNED = ("CharaA, Outfit1, closed_mouth, looking_at_viewer, open_mouth, simple_background, solo, umbrella, "
                "yellow_background")

# A realistic WD14 output for an anime character picture.
WD14_TAGS = ("1girl, solo, long_hair, breasts, looking_at_viewer, blush, smile, bangs, blue_eyes, large_breasts, "
             "blonde_hair, hair_ornament, dress, bow, very_long_hair, twintails, ahoge, hair_bow, thighhighs, "
             "black_thighhighs, boots, black_footwear, white_dress, mole_under_eye, thick_thighs, red_lips, "
             "pointy_ears, holding, outdoors, sky, red-framed_eyewear")


def dataset(root: Path, captions: dict[str, str]) -> Path:
    for i, (name, text) in enumerate(captions.items()):
        make_image(root / f"{name}.png", (8, 8), (i * 7 % 256, i * 13 % 256, 40))
        (root / f"{name}.txt").write_text(text, encoding="utf-8")
    return root


def run_pipeline(tmp_path: Path, captions: dict[str, str], params: dict, subsets: dict | None = None):
    src = dataset(tmp_path / "in", captions)
    data = {"output": str(tmp_path / "out"),
            "sources": [{"folder": {"path": str(src), "subfolders_as_subsets": True}}],
            "steps": [{"triggers": params}]}
    if subsets:
        data["subsets"] = subsets
    return run_pipeline_dict(data, tmp_path)


def run_direct(items, params, subsets=None, tmp=Path("/tmp")):
    ctx = StepContext("triggers", tmp / "w", tmp / "t", tmp / "out", subsets=subsets or {})
    return TriggersStep.configure(params).run(items, ctx), ctx


def item(text, subset="default", name="a", caption=None):
    return Item(name, Path(f"/nonexistent/{name}.png"), subset, caption=caption,
                tags={t.strip(): None for t in text.split(",") if t.strip()})


def tags_of(it: Item) -> str:
    return ", ".join(it.tags)


# ----- the guide's example and the modes ----------------------------------------------------------
def test_semi_static_prunes_exactly_what_the_guides_example_prunes(tmp_path):
    res = run_pipeline(tmp_path, {"outfit1/a": GUIDE_UNPRUNED + ", one-hour_drawing_challenge"},
                       {"trigger": "CharaA", "outfit_triggers": {"outfit1": "Outfit1"}, "prune": "*_challenge"})
    assert res.caption("a") == GUIDE_PRUNED
    assert (res.output_dir / "outfit1" / "a.txt").read_text(encoding="utf-8") == GUIDE_PRUNED


def test_fluid_mode_only_prepends_the_trigger(tmp_path):
    out, _ = run_direct([item("1girl, green_hair, red_skirt, solo")], {"trigger": "CharaA", "mode": "fluid"}, tmp=tmp_path)
    assert tags_of(out[0]) == "CharaA, 1girl, green_hair, red_skirt, solo"


def test_static_mode_also_prunes_body_shape_and_hair_ornaments(tmp_path):
    text = "1girl, thick_thighs, hair_ornament, green_hair, smile"
    semi, _ = run_direct([item(text)], {"trigger": "CharaA"}, tmp=tmp_path)
    static, _ = run_direct([item(text)], {"trigger": "CharaA", "mode": "static"}, tmp=tmp_path)
    assert tags_of(semi[0]) == "CharaA, thick_thighs, hair_ornament, smile"
    assert tags_of(static[0]) == "CharaA, smile"


def test_style_mode_keeps_only_the_trigger_and_drops_sentences(tmp_path):
    out, _ = run_direct([item("monochrome, 1girl, night, solo", caption="a girl at night")],
                        {"trigger": "mystyle", "mode": "style", "keep": "solo"}, tmp=tmp_path)
    assert tags_of(out[0]) == "mystyle, solo" and out[0].caption is None
    assert out[0].text == "mystyle, solo"


def test_breast_size_is_never_pruned_by_default(tmp_path):
    out, ctx = run_direct([item("large_breasts, blonde_hair, 1girl")], {"trigger": "CharaA", "mode": "static"}, tmp=tmp_path)
    assert tags_of(out[0]) == "CharaA, large_breasts"
    assert ctx.reports["pruned"]["subsets"]["default"]["pruned"].keys() == {"blonde_hair", "1girl"}


def test_keep_categories_can_be_emptied_to_prune_breast_size_by_frequency(tmp_path):
    items = [item("large_breasts, smile", name="a"), item("large_breasts", name="b")]
    kept, _ = run_direct(items, {"trigger": "CharaA", "frequency": "100%"}, tmp=tmp_path)
    pruned, _ = run_direct(items, {"trigger": "CharaA", "frequency": "100%", "keep_categories": []}, tmp=tmp_path)
    assert tags_of(kept[1]) == "CharaA, large_breasts"
    assert tags_of(pruned[1]) == "CharaA"


def test_footwear_is_never_folded_into_an_outfit_trigger(tmp_path):
    out, ctx = run_direct([item("red_dress, high_heels, black_boots, necklace, standing", "dress1")],
                          {"outfit_triggers": "dress1=RedDressOutfit"}, tmp=tmp_path)
    assert tags_of(out[0]) == "RedDressOutfit, high_heels, black_boots, standing"
    report = ctx.reports["pruned"]["subsets"]["dress1"]
    assert report["kept_by_keep_rules"] == {}  # footwear is not an outfit part in the first place
    assert report["pruned"]["red_dress"]["absorbed_by"] == ["RedDressOutfit"]


def test_keep_list_protects_a_tag_from_every_rule(tmp_path):
    out, ctx = run_direct([item("green_hair, ahoge, smile")],
                          {"trigger": "CharaA", "keep": "ahoge", "prune": "smile,ahoge"}, tmp=tmp_path)
    assert tags_of(out[0]) == "CharaA, ahoge"
    assert ctx.reports["pruned"]["subsets"]["default"]["kept_by_keep_rules"] == {"ahoge": 1}


def test_explicit_categories_replace_the_modes_categories(tmp_path):
    out, _ = run_direct([item("green_hair, blue_eyes, ahoge")], {"trigger": "CharaA", "categories": "eye_color"},
                        tmp=tmp_path)
    assert tags_of(out[0]) == "CharaA, green_hair, ahoge"


def test_unknown_category_is_refused_before_any_work():
    with pytest.raises(ParamError, match="hair_colour"):
        TriggersStep.configure({"trigger": "x", "categories": "hair_colour"})


# ----- multi-trigger, per subset ------------------------------------------------------------------
def test_outfit_parts_are_pruned_only_where_the_subset_has_an_outfit_trigger(tmp_path):
    res = run_pipeline(tmp_path, {
        "dress/a": "1girl, pink_hair, red_dress, katana, smile",
        "dress/b": "1girl, pink_hair, red_dress, katana",
        "misc/c": "1girl, pink_hair, blue_dress, smile",
    }, {"trigger": "Sakura", "outfit_triggers": {"dress": "SakuraDress"}, "subset_prune": {"dress": ["katana"]}})
    assert res.caption("a") == "Sakura, SakuraDress, smile"
    assert res.caption("c") == "Sakura, blue_dress, smile"
    report = json.loads((res.output_dir / "reports" / "triggers-pruned.json").read_text(encoding="utf-8"))
    assert report["pruned_everywhere"] == ["1girl", "pink_hair"]
    assert report["pruned_only_in"] == {"dress": ["katana", "red_dress"], "misc": []}
    assert report["subsets"]["dress"]["pruned"]["katana"] == {"images": 2, "reason": "listed",
                                                             "absorbed_by": ["Sakura", "SakuraDress"]}


def test_subset_triggers_from_pipeline_yaml_are_prepended(tmp_path):
    res = run_pipeline(tmp_path, {"outfit1/a": "1girl, silver_hair, smile", "outfit2/b": "1girl, smile"},
                       {"mode": "semi-static"}, subsets={"outfit1": {"triggers": ["Mira"]}})
    assert res.caption("a") == "Mira, smile"
    assert res.caption("b") == "1girl, smile"  # no trigger: left as it is
    assert res.manifest.subsets["outfit1"].triggers == ["Mira"]


def test_subset_modes_override_the_mode_for_one_subset(tmp_path):
    items = [item("1girl, green_hair, smile", "main", "a"), item("1girl, green_hair, smile", "misc", "b")]
    out, _ = run_direct(items, {"trigger": "CharaA", "subset_modes": "misc=fluid"}, tmp=tmp_path)
    assert tags_of(out[0]) == "CharaA, smile"
    assert tags_of(out[1]) == "CharaA, 1girl, green_hair, smile"


def test_frequency_rule_prunes_tags_found_in_most_images_of_a_subset(tmp_path):
    items = [item("umbrella, smile", name="a"), item("umbrella, rain", name="b"), item("umbrella, sky", name="c"),
             item("smile", name="d")]
    out, ctx = run_direct(items, {"trigger": "CharaA", "mode": "fluid", "frequency": "75%"}, tmp=tmp_path)
    assert [tags_of(i) for i in out] == ["CharaA, smile", "CharaA, rain", "CharaA, sky", "CharaA, smile"]
    assert ctx.reports["pruned"]["subsets"]["default"]["pruned"]["umbrella"]["reason"] == "frequency 75%"


def test_options_naming_a_subset_without_images_warn(tmp_path):
    _, ctx = run_direct([item("smile", "main")], {"trigger": "x", "outfit_triggers": "mian=dress"}, tmp=tmp_path)
    assert any("subset 'mian', which has no images (subsets: main)" in m for m in ctx.messages)


# ----- keep tokens and the manifest ---------------------------------------------------------------
def test_keep_tokens_count_reaches_the_manifest(tmp_path):
    res = run_pipeline(tmp_path, {"outfit1/a": "1girl, smile"},
                       {"trigger": "CharaA", "outfit_triggers": {"outfit1": "Outfit1"}})
    sub = res.manifest.subsets["outfit1"]
    assert sub.keep_tokens == 2 and sub.keep_tokens_separator is None
    assert sub.triggers == ["CharaA", "Outfit1"]


def test_keep_tokens_separator_is_written_after_the_triggers(tmp_path):
    res = run_pipeline(tmp_path, {"outfit1/a": "1girl, smile, red_eyes"},
                       {"trigger": "CharaA", "mode": "fluid", "keep_tokens": "separator"})
    sub = res.manifest.subsets["outfit1"]
    assert sub.keep_tokens_separator == "|||"
    caption = res.caption("a")
    fixed, flexible = caption.split("|||")
    assert [t.strip() for t in fixed.split(",") if t.strip()] == ["CharaA"]
    assert [t.strip() for t in flexible.split(",") if t.strip()] == ["1girl", "smile", "red_eyes"]


def test_running_twice_gives_the_same_caption(tmp_path):
    first, _ = run_direct([item("CharaA, 1girl, green_hair, smile")], {"trigger": "CharaA", "keep_tokens": "separator"},
                          tmp=tmp_path)
    second, ctx = run_direct(first, {"trigger": "CharaA", "keep_tokens": "separator"}, tmp=tmp_path)
    assert tags_of(second[0]) == tags_of(first[0]) == "CharaA, |||, smile"
    assert not any("already a tag" in m for m in ctx.messages)


def test_a_trigger_the_tagger_already_knows_is_warned_about(tmp_path):
    _, ctx = run_direct([item("1girl, hatsune_miku, smile")], {"trigger": "Hatsune Miku", "mode": "fluid"}, tmp=tmp_path)
    assert any("trigger 'Hatsune Miku' is already a tag in 1 image(s)" in m for m in ctx.messages)


# ----- category rules on realistic tags -----------------------------------------------------------
def test_category_rules_sort_a_realistic_wd14_tag_list():
    by_tag = {t: tag_rules.categories_of(t) for t in WD14_TAGS.split(", ")}
    expect = {
        "long_hair": "hair_length", "very_long_hair": "hair_length", "blonde_hair": "hair_color",
        "bangs": "hair_style", "twintails": "hair_style", "blue_eyes": "eye_color", "ahoge": "signature",
        "mole_under_eye": "signature", "pointy_ears": "signature", "red_lips": "makeup", "hair_bow": "hair_accessory",
        "hair_ornament": "hair_accessory", "dress": "outfit", "white_dress": "outfit", "thighhighs": "outfit",
        "black_thighhighs": "outfit", "boots": "footwear", "black_footwear": "footwear", "large_breasts": "breasts",
        "thick_thighs": "body", "1girl": "people", "red-framed_eyewear": "accessory",
    }
    for tag, category in expect.items():
        assert category in by_tag[tag], (tag, by_tag[tag])
    for neutral in ("solo", "looking_at_viewer", "blush", "smile", "holding", "outdoors", "sky"):
        assert by_tag[neutral] == set(), (neutral, by_tag[neutral])
    assert "footwear" not in by_tag["black_thighhighs"] and "outfit" not in by_tag["black_footwear"]


def test_semi_static_character_and_outfit_triggers_on_a_realistic_wd14_list(tmp_path):
    out, _ = run_direct([item(WD14_TAGS, "outfit1")], {"trigger": "Elfie", "outfit_triggers": "outfit1=ElfieDress"},
                        tmp=tmp_path)
    assert tags_of(out[0]) == ("Elfie, ElfieDress, solo, breasts, looking_at_viewer, blush, smile, large_breasts, "
                               "hair_ornament, hair_bow, boots, black_footwear, thick_thighs, holding, outdoors, sky")


# ----- the command line ---------------------------------------------------------------------------
def test_command_line_prepends_the_trigger_and_refuses_an_unknown_mode(tmp_path):
    from conftest import run_cli

    src = dataset(tmp_path / "in", {"a": "1girl, green_hair, smile"})
    ok = run_cli("triggers", str(src), str(tmp_path / "out"), "--trigger", "CharaA", "--keep-tokens", "separator")
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "out" / "a.txt").read_text(encoding="utf-8") == "CharaA ||| smile"
    bad = run_cli("triggers", str(src), str(tmp_path / "out2"), "--trigger", "CharaA", "--mode", "loose")
    assert bad.returncode != 0
    assert "parameter 'mode' = 'loose' is invalid: expected one of fluid, semi-static, static, style" in \
        " ".join(bad.stderr.split())
    assert "Traceback" not in bad.stderr


def test_an_explicitly_listed_tag_overrides_the_keep_categories(tmp_path):
    out, _ = run_direct([item("large_breasts, medium_breasts, smile")], {"trigger": "CharaA", "prune": "medium_breasts"},
                        tmp=tmp_path)
    assert tags_of(out[0]) == "CharaA, large_breasts, smile"


def test_category_rules_leave_composition_actions_and_garment_states_alone():
    neutral = ("upper_body cowboy_shot from_behind white_background gradient_background open_mouth closed_eyes "
               "hand_on_hip holding_sword umbrella night_sky light_particles looking_back crossed_arms barefoot "
               "navel cleavage collarbone full_body speech_bubble signature watermark monochrome light_smile "
               "open_jacket holding_hat wet_clothes skirt_lift covering_ears torn_clothes").split()
    assert {t: tag_rules.categories_of(t) for t in neutral if tag_rules.categories_of(t)} == {}


def test_the_global_trigger_is_not_added_to_regularisation_subsets(tmp_path):
    from lorakit.plugin_sdk import Subset

    out, ctx = run_direct([item("1girl, green_hair, smile", "mychar", "a"), item("1girl, smile", "reg_1girl", "r")],
                          {"trigger": "CharaA"}, subsets={"reg_1girl": Subset("reg_1girl", is_reg=True)}, tmp=tmp_path)
    assert tags_of(out[0]).startswith("CharaA")
    assert tags_of(out[1]) == "1girl, smile"
    assert ctx.subsets["reg_1girl"].triggers == []
