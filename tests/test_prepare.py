"""DatasetStep.prepare: a dataset step's per-image part, run and cached by the host per image."""
from __future__ import annotations

from PIL import Image, ImageStat

from lorakit.plugin_sdk import DatasetStep, Item, Param, SkipImage, StepContext
from lorakit.plugin_sdk.testing import run_step

CALLS: list[str] = []


class BrightestFirst(DatasetStep):
    """Keeps the images in order of mean brightness, computed per image by ``prepare``."""

    name = "brightest_first"
    summary = "Order images by brightness (test step)."
    params = [Param("skip_below", int, -1, "set aside images darker than this")]
    reads = frozenset({"image"})
    writes = frozenset()

    def prepare(self, item, ctx):
        CALLS.append(item.name)
        mean = ImageStat.Stat(item.open().convert("L")).mean[0]
        if mean < self.options.skip_below:
            raise SkipImage(f"too dark ({mean:.0f})")
        return {"mean": mean}

    def run(self, items, ctx):
        items, results = self.prepared(items, ctx)
        ctx.log("means " + " ".join(f"{i.name}={r['mean']:.0f}" for i, r in zip(items, results)))
        return [i for _, i in sorted(zip([-r["mean"] for r in results], items), key=lambda t: t[0])]


def folder(tmp_path, greys: dict[str, int]):
    src = tmp_path / "in"
    src.mkdir(exist_ok=True)
    for name, grey in greys.items():
        Image.new("RGB", (16, 16), (grey, grey, grey)).save(src / f"{name}.png")
    return src


def step_stats(res):
    (stats,) = [s for s in res.stats if s.name == "brightest_first"]
    return stats


def test_prepare_results_reach_run_one_per_item_in_order(tmp_path):
    CALLS.clear()
    src = folder(tmp_path, {"a": 10, "b": 200, "c": 90})
    res = run_step(BrightestFirst, src, tmp_path / "out")
    assert "means a=10 b=200 c=90" in step_stats(res).messages
    assert sorted(CALLS) == ["a", "b", "c"]


def test_prepare_runs_only_for_images_it_has_not_seen(tmp_path):
    src = folder(tmp_path, {"a": 10, "b": 200})
    run_step(BrightestFirst, src, tmp_path / "out")
    CALLS.clear()
    folder(tmp_path, {"c": 90})
    res = run_step(BrightestFirst, src, tmp_path / "out")
    assert CALLS == ["c"]  # a and b came from the store
    assert "per-image part: 1 computed, 2 from the cache" in step_stats(res).messages
    CALLS.clear()
    run_step(BrightestFirst, src, tmp_path / "out", {"skip_below": 0})  # other parameters: prepared again
    assert sorted(CALLS) == ["a", "b", "c"]


def test_an_image_prepare_refuses_is_set_aside_and_the_others_go_on(tmp_path):
    src = folder(tmp_path, {"a": 10, "b": 200, "c": 90})
    res = run_step(BrightestFirst, src, tmp_path / "out", {"skip_below": 50})
    assert res.reasons() == {"a": "too dark (10)"}
    assert [r.name for r in res.set_aside] == ["a"] and res.set_aside[0].step == "brightest_first"
    assert "means b=200 c=90" in step_stats(res).messages


def test_prepared_without_a_host_runs_prepare_in_process(tmp_path):
    src = folder(tmp_path, {"a": 10, "b": 200})
    ctx = StepContext("brightest_first", tmp_path / "work", tmp_path / "tmp", tmp_path / "out")
    step = BrightestFirst.configure({"skip_below": 50})
    items = [Item(name=p.stem, path=p) for p in sorted(src.iterdir())]
    kept = step.run(items, ctx)
    assert [i.name for i in kept] == ["b"]
    assert [(i.name, reason) for i, reason in ctx.set_aside_items] == [("a", "too dark (10)")]


def test_prepares_tells_whether_a_step_has_a_per_image_part():
    assert BrightestFirst.prepares() and not DatasetStep.prepares()
