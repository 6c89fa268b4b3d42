"""The repeats planner (``repeats`` step)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorakit.plugin_sdk import Item, LorakitError, ParamError, StepContext, Subset
from lorakit.plugin_sdk.testing import make_image, run_pipeline_dict
from lorakit.plugins.repeats import RepeatsStep


def images(counts: dict[str, int]) -> list[Item]:
    return [Item(f"{subset}_{i}", Path(f"/nonexistent/{subset}_{i}.png"), subset)
            for subset, n in counts.items() for i in range(n)]


def plan(counts: dict[str, int], params: dict | None = None, subsets: dict | None = None, tmp=Path("/tmp")):
    ctx = StepContext("repeats", tmp / "w", tmp / "t", tmp / "out", subsets=subsets or {})
    out = RepeatsStep.configure(params or {}).run(images(counts), ctx)
    return {n: s.repeats for n, s in ctx.subsets.items()}, ctx, out


def test_guides_example_100_50_10_images_get_3_6_30_repeats(tmp_path):
    repeats, ctx, out = plan({"outfit1": 100, "outfit2": 50, "outfit3": 10}, tmp=tmp_path)
    assert repeats == {"outfit1": 3, "outfit2": 6, "outfit3": 30}
    assert len(out) == 160


def test_repeats_round_down_by_default_as_the_guide_says(tmp_path):
    down, _, _ = plan({"a": 45}, tmp=tmp_path)
    nearest, _, _ = plan({"a": 45}, {"rounding": "nearest"}, tmp=tmp_path)
    up, _, _ = plan({"a": 70}, {"rounding": "up"}, tmp=tmp_path)
    assert down["a"] == 6 and nearest["a"] == 7 and up["a"] == 5


def test_plan_is_printed_with_the_guides_formula(tmp_path):
    _, ctx, _ = plan({"outfit1": 100, "outfit2": 50, "outfit3": 10}, {"batch_size": 2, "epochs": 8}, tmp=tmp_path)
    assert ("plan: (100 x 3 + 50 x 6 + 10 x 30) = 900 images per epoch / batch size 2 x 8 epochs = 3600 total steps"
            in ctx.messages)
    assert any(line.split() == ["outfit3", "10", "30", "300", "30_outfit3"] for line in ctx.messages)
    report = ctx.reports["plan"]
    assert report["total_steps"] == 3600 and report["steps_per_epoch"] == 450
    assert report["subsets"]["outfit2"] == {"images": 50, "repeats": 6, "steps_per_epoch": 300, "target": 300,
                                            "how": "planned"}


def test_total_steps_round_a_partial_batch_up(tmp_path):
    _, ctx, _ = plan({"a": 7}, {"steps_per_epoch": 7, "batch_size": 2, "epochs": 3}, tmp=tmp_path)
    assert ctx.reports["plan"]["steps_per_epoch"] == 4 and ctx.reports["plan"]["total_steps"] == 12


def test_subset_steps_give_a_sub_concept_its_own_target(tmp_path):
    repeats, _, _ = plan({"character": 60, "outfit_detail": 20}, {"subset_steps": "outfit_detail=100"}, tmp=tmp_path)
    assert repeats == {"character": 5, "outfit_detail": 5}


def test_max_repeats_caps_a_tiny_subset_and_says_so(tmp_path):
    repeats, ctx, _ = plan({"tiny": 2}, {"max_repeats": 40}, tmp=tmp_path)
    assert repeats["tiny"] == 40
    assert any("would need 150 repeats" in m and "capped at max_repeats 40" in m for m in ctx.messages)
    assert any("only 2 image(s)" in m for m in ctx.messages)


def test_a_huge_subset_gets_one_repeat_and_a_warning(tmp_path):
    repeats, ctx, _ = plan({"big": 900}, tmp=tmp_path)
    assert repeats["big"] == 1
    assert any("900 images x 1 = 900 steps per epoch, well above the 300 target" in m for m in ctx.messages)


def test_fixed_subsets_keep_their_configured_repeats(tmp_path):
    repeats, ctx, _ = plan({"a": 100, "b": 10}, {"fixed": "b"},
                           subsets={"b": Subset("b", repeats=4)}, tmp=tmp_path)
    assert repeats == {"a": 3, "b": 4}
    assert ctx.reports["plan"]["subsets"]["b"]["how"] == "fixed"


def test_regularisation_subsets_are_left_alone(tmp_path):
    repeats, ctx, _ = plan({"train": 30, "reg": 200}, subsets={"reg": Subset("reg", is_reg=True)}, tmp=tmp_path)
    assert repeats == {"train": 10, "reg": 1}
    assert ctx.reports["plan"]["subsets"]["reg"]["how"] == "regularisation"


def test_min_repeats_above_max_repeats_is_refused(tmp_path):
    with pytest.raises(LorakitError, match="min_repeats"):
        plan({"a": 1}, {"min_repeats": 5, "max_repeats": 2}, tmp=tmp_path)


def test_bad_subset_steps_value_is_refused_before_any_work():
    with pytest.raises(ParamError, match="subset_steps"):
        RepeatsStep.configure({"subset_steps": {"misc": "lots"}})


def test_repeats_reach_the_manifest_and_every_image_record(tmp_path):
    src = tmp_path / "in"
    for subset, n in {"outfit1": 20, "outfit2": 10, "outfit3": 2}.items():
        for i in range(n):
            make_image(src / subset / f"{i}.png", (8, 8), (i * 9, len(subset) * 20, 7))
    res = run_pipeline_dict({
        "output": str(tmp_path / "out"),
        "sources": [{"folder": {"path": str(src), "subfolders_as_subsets": True}}],
        "steps": [{"repeats": {"steps_per_epoch": 60}}],
    }, tmp_path)
    assert {n: s.repeats for n, s in res.manifest.subsets.items()} == {"outfit1": 3, "outfit2": 6, "outfit3": 30}
    assert {r.subset: r.repeats for r in res.images} == {"outfit1": 3, "outfit2": 6, "outfit3": 30}
    report = json.loads((res.output_dir / "reports" / "repeats-plan.json").read_text(encoding="utf-8"))
    assert report["images_per_epoch"] == 180 and report["total_steps"] == 180 * 8


# ----- the train: section and the guide's targets -----------------------------------------------
def plan_with_train(counts, train, params=None, resolution=512, tmp=Path("/tmp")):
    ctx = StepContext("repeats", tmp / "w", tmp / "t", tmp / "out", resolution=resolution, train=train)
    RepeatsStep.configure(params or {}).run(images(counts), ctx)
    return {n: s.repeats for n, s in ctx.subsets.items()}, ctx


def test_batch_size_and_epochs_come_from_the_train_section(tmp_path):
    _, ctx = plan_with_train({"a": 100}, {"batch_size": 4, "epochs": 10, "optimizer": "prodigy"}, tmp=tmp_path)
    report = ctx.reports["plan"]
    assert report["batch_size"] == 4 and report["epochs"] == 10 and report["settings_from"] == "train section"
    assert "/ batch size 4 x 10 epochs = 750 total steps" in report["formula"]


def test_a_value_given_twice_that_differs_is_warned_about(tmp_path):
    _, ctx = plan_with_train({"a": 100}, {"batch_size": 4, "optimizer": "prodigy"}, {"batch_size": 2}, tmp=tmp_path)
    assert ctx.reports["plan"]["batch_size"] == 2
    assert any("batch_size 2 here but 4 in train:" in m for m in ctx.messages)


def test_gradient_accumulation_and_max_train_steps_count(tmp_path):
    _, ctx = plan_with_train({"a": 100}, {"batch_size": 2, "gradient_accumulation_steps": 3, "epochs": 8,
                                          "optimizer": "prodigy", "max_train_steps": 300}, tmp=tmp_path)
    report = ctx.reports["plan"]
    assert report["steps_per_epoch"] == 50  # 300 images / batch 2 = 150 batches / 3 = 50 optimiser steps
    assert report["total_steps"] == 300 and "max_train_steps stops at 300" in report["formula"]


def test_adamw_doubles_the_guides_target(tmp_path):
    repeats, ctx = plan_with_train({"a": 100}, {"optimizer": "adamw"}, tmp=tmp_path)
    assert repeats["a"] == 6 and ctx.reports["plan"]["guide"]["steps_per_epoch_per_concept"] == 600
    repeats, _ = plan_with_train({"a": 100}, {}, {"optimizer": "prodigy"}, tmp=tmp_path)
    assert repeats["a"] == 3


def test_the_guides_multipliers_old_anime_noise_options_and_sdxl(tmp_path):
    _, ctx = plan_with_train({"a": 10}, {"optimizer": "prodigy"}, {"old_anime": True}, tmp=tmp_path)
    assert ctx.reports["plan"]["guide"]["steps_per_epoch_per_concept"] == 100  # 300 x 1/3
    repeats, ctx = plan_with_train({"a": 10}, {"optimizer": "prodigy", "min_snr_gamma": 5}, resolution=1024,
                                   tmp=tmp_path)
    assert ctx.reports["plan"]["guide"]["steps_per_epoch_per_concept"] == 90  # 300 x 3/5 x 1/2
    assert repeats["a"] == 9
    assert "target: 300 steps per epoch per concept (prodigy, guide 002) x 3/5 (min_snr_gamma) x 1/2 (SDXL) = 90" \
        in ctx.messages
    assert ctx.reports["plan"]["guide"]["total_steps"] == [1500, 2500]


def test_an_explicit_target_is_taken_as_is(tmp_path):
    repeats, _ = plan_with_train({"a": 10}, {"optimizer": "prodigy", "ip_noise_gamma": 0.1}, {"steps_per_epoch": 200},
                                 resolution=1024, tmp=tmp_path)
    assert repeats["a"] == 20


def test_target_total_lands_in_the_middle_of_the_guides_range(tmp_path):
    repeats, ctx = plan_with_train({"a": 100, "b": 50}, {"optimizer": "prodigy", "batch_size": 2, "epochs": 8},
                                   {"target": "total"}, tmp=tmp_path)
    # 2500 total x batch 2 / 8 epochs = 625 images per epoch, split evenly: 312 each
    assert repeats == {"a": 3, "b": 6}
    report = ctx.reports["plan"]
    assert report["total_steps"] == 2400 and report["guide"]["verdict"] == "within"


def test_a_plan_far_outside_the_guide_is_warned_about(tmp_path):
    _, ctx = plan_with_train({"big": 900}, {"optimizer": "prodigy", "batch_size": 1, "epochs": 8}, tmp=tmp_path)
    assert ctx.reports["plan"]["guide"]["verdict"] == "far above"
    assert any(m.startswith("warning: 7200 total steps is far above the guide's 2000-3000 for prodigy on SD1.5")
               for m in ctx.messages)
    _, ctx = plan_with_train({"a": 10}, {"optimizer": "prodigy", "batch_size": 8, "epochs": 2},
                             {"max_repeats": 5}, tmp=tmp_path)
    assert ctx.reports["plan"]["guide"]["verdict"] == "far below"


def test_the_pipelines_train_section_reaches_the_step_and_its_cache(tmp_path):
    src = tmp_path / "in"
    for i in range(20):
        make_image(src / f"{i}.png", (8, 8), (i * 9, 40, 7))

    def run(epochs):
        return run_pipeline_dict({
            "output": str(tmp_path / "out"), "sources": [{"folder": {"path": str(src)}}],
            "steps": ["repeats"], "train": {"optimizer": "prodigy", "batch_size": 2, "epochs": epochs},
        }, tmp_path)

    first = run(8)
    report = json.loads((first.output_dir / "reports" / "repeats-plan.json").read_text(encoding="utf-8"))
    assert first.manifest.subsets["default"].repeats == 15 and report["total_steps"] == 150 * 8
    second = run(12)  # a changed train: section is not served from the cache
    report = json.loads((second.output_dir / "reports" / "repeats-plan.json").read_text(encoding="utf-8"))
    assert report["epochs"] == 12 and report["total_steps"] == 150 * 12
