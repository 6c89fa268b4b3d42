"""The regularisation-image generator, run through the real runner on tiny random SD1.5/SDXL
pipelines that the tests build and save (their pictures are noise; the tests check the plumbing:
loading, prompts, seeds, batching, resume, the reg subset in the manifest)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lorakit.plugin_sdk import Item, LorakitError, ParamError
from lorakit.plugin_sdk.testing import run_pipeline_dict
from lorakit.plugins.reg import RegStep, aspect_size, remove_words, without_triggers
from tests.tiny_models import build_tiny_sdxl

FAST = {"steps": 2, "size": 64, "device": "cpu"}


def training_set(folder, captions, size=(64, 64)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, caption in captions.items():
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(caption, encoding="utf-8")
    return folder


def run_reg(tmp_path, raw, params, subsets=None, output="out"):
    data = {"output": str(tmp_path / output), "resolution": 64,
            "sources": [{"folder": {"path": str(raw), "subset": "mychar"}}],
            "steps": [{"reg": {**FAST, **params}}]}
    if subsets:
        data["subsets"] = subsets
    return run_pipeline_dict(data, tmp_path)


def reg_records(res, subset="reg"):
    return [r for r in res.images if r.subset == subset]


def reg_messages(res):
    return [m for s in res.stats if s.name == "reg" for m in s.messages]


# ----- dreambooth ----------------------------------------------------------------------------
def test_dreambooth_mode_makes_one_class_image_per_training_image(tmp_path, sd15):
    raw = training_set(tmp_path / "raw", {"a": "mychar, red hair", "b": "mychar, smile", "c": "mychar"})
    res = run_reg(tmp_path, raw, {"base_model": str(sd15), "class_prompt": "1girl"})
    regs = reg_records(res)
    assert len(regs) == 3
    assert all(r.is_reg and r.caption == "1girl" and (r.width, r.height) == (64, 64) for r in regs)
    assert [r.meta["reg"]["seed"] for r in regs] == [0, 1, 2]
    assert res.manifest.subsets["reg"].is_reg and res.manifest.subsets["reg"].class_tokens == "1girl"
    assert len([r for r in res.images if r.subset == "mychar"]) == 3  # training images untouched


def test_dreambooth_class_prompt_defaults_to_the_subsets_class_tokens(tmp_path, sd15):
    raw = training_set(tmp_path / "raw", {"a": "mychar"})
    res = run_reg(tmp_path, raw, {"base_model": str(sd15), "count": 2},
                  subsets={"mychar": {"class_tokens": "1boy"}})
    assert [r.caption for r in reg_records(res)] == ["1boy", "1boy"]


def test_dreambooth_without_any_class_prompt_is_a_clear_error(tmp_path, sd15):
    raw = training_set(tmp_path / "raw", {"a": "mychar"})
    with pytest.raises(LorakitError, match="class_prompt"):
        run_reg(tmp_path, raw, {"base_model": str(sd15)})


# ----- captions ------------------------------------------------------------------------------
def test_captions_mode_keeps_order_and_captions_minus_triggers(tmp_path, sd15):
    raw = training_set(tmp_path / "raw", {"001": "mychar, 1girl, red hair", "002": "mychar, 1girl, smile, outdoors",
                                          "003": "1girl, mychar, sitting"})
    res = run_reg(tmp_path, raw, {"base_model": str(sd15), "mode": "captions", "remove_tags": ["outdoors"]},
                  subsets={"mychar": {"triggers": ["mychar"]}})
    regs = reg_records(res)
    assert [r.path.rsplit("/", 1)[-1] for r in regs] == ["001.png", "002.png", "003.png"]
    assert [r.caption for r in regs] == ["1girl, red hair", "1girl, smile", "1girl, sitting"]
    assert [r.meta["reg"]["prompt"] for r in regs] == [r.caption for r in regs]
    assert regs[0].meta["reg"]["from"] == "mychar/001"


def test_captions_mode_can_match_each_training_images_aspect_ratio(tmp_path, sd15):
    raw = training_set(tmp_path / "raw", {"wide": "mychar, landscape"}, size=(128, 64))
    res = run_reg(tmp_path, raw, {"base_model": str(sd15), "mode": "captions", "aspect": "match"})
    reg = reg_records(res)[0]
    assert reg.width > reg.height
    assert (reg.width, reg.height) == aspect_size(128, 64, 64)


def test_trigger_words_are_removed_from_sentences_as_whole_words():
    assert remove_words("mychar, a girl with mychar_hat and My Char", ["mychar", "my_char"]) == \
        "a girl with mychar_hat and"
    assert remove_words("a photo of sks dog", ["sks"]) == "a photo of dog"


def test_keep_tokens_separator_and_triggers_leave_the_reg_caption():
    item = Item("a", path=None, tags={"mychar": None, "|||": None, "1girl": 0.9, "Red_Hair": None},
                caption="mychar smiling")
    tags, caption = without_triggers(item, ["mychar", "red hair"], "|||")
    assert list(tags) == ["1girl"] and caption == "smiling"


# ----- seeds, batches, resume -----------------------------------------------------------------
def test_same_seed_gives_the_same_images(tmp_path, sd15):
    raw = training_set(tmp_path / "raw", {"a": "x", "b": "y"})
    params = {"base_model": str(sd15), "class_prompt": "1girl"}
    first = run_reg(tmp_path, raw, params, output="out1")
    second = run_reg(tmp_path, raw, params, output="out2")
    for r1, r2 in zip(reg_records(first), reg_records(second)):
        assert np.array_equal(np.asarray(first.open(r1)), np.asarray(second.open(r2)))
    a, b = reg_records(first)
    assert not np.array_equal(np.asarray(first.open(a)), np.asarray(first.open(b)))  # seed + index differ


def test_batching_does_not_change_the_images(tmp_path, sd15):
    raw = training_set(tmp_path / "raw", {"a": "x", "b": "y", "c": "z"})
    one = run_reg(tmp_path, raw, {"base_model": str(sd15), "class_prompt": "1girl", "batch_size": 1}, output="o1")
    three = run_reg(tmp_path, raw, {"base_model": str(sd15), "class_prompt": "1girl", "batch_size": 3}, output="o3")
    for r1, r3 in zip(reg_records(one), reg_records(three)):
        diff = np.abs(np.asarray(one.open(r1), np.int16) - np.asarray(three.open(r3), np.int16))
        assert diff.max() <= 2


def test_interrupted_or_extended_run_generates_only_missing_images(tmp_path, sd15):
    raw = training_set(tmp_path / "raw", {"a": "x", "b": "y", "c": "z"})
    params = {"base_model": str(sd15), "class_prompt": "1girl"}
    run_reg(tmp_path, raw, {**params, "count": 2})
    res = run_reg(tmp_path, raw, {**params, "count": 3})
    assert any("3 reg images" in m and "1 generated" in m and "2 reused" in m for m in reg_messages(res))
    assert len(reg_records(res)) == 3


def test_reg_subset_name_and_repeats_are_options(tmp_path, sd15):
    raw = training_set(tmp_path / "raw", {"a": "x"})
    res = run_reg(tmp_path, raw, {"base_model": str(sd15), "class_prompt": "1girl", "reg_subset": "girls",
                                  "repeats": 2})
    regs = reg_records(res, "girls")
    assert len(regs) == 1 and regs[0].repeats == 2 and res.manifest.subsets["girls"].is_reg


def test_sdxl_base_model_generates_too(tmp_path):
    sdxl = build_tiny_sdxl(tmp_path / "tiny-sdxl")
    raw = training_set(tmp_path / "raw", {"a": "x"})
    res = run_reg(tmp_path, raw, {"base_model": str(sdxl), "class_prompt": "1girl"})
    assert len(reg_records(res)) == 1
    assert any("StableDiffusionXLPipeline" in m for m in reg_messages(res))


# ----- model loading and errors ---------------------------------------------------------------
def test_base_model_goes_through_the_trainers_loader_which_refuses_pickles(tmp_path):
    raw = training_set(tmp_path / "raw", {"a": "x"})
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"pickle")
    with pytest.raises(LorakitError, match="pickled checkpoint"):
        run_reg(tmp_path, raw, {"base_model": str(ckpt), "class_prompt": "1girl"})


def test_unknown_class_subset_is_a_clear_error(tmp_path, sd15):
    raw = training_set(tmp_path / "raw", {"a": "x"})
    with pytest.raises(LorakitError, match="class_subset 'outfit9'"):
        run_reg(tmp_path, raw, {"base_model": str(sd15), "class_prompt": "1girl", "class_subset": ["outfit9"]})


def test_size_must_be_a_multiple_of_eight():
    with pytest.raises(ParamError, match="multiple of 8"):
        RegStep.configure({"base_model": "x.safetensors", "size": 100})


def test_loading_the_base_model_prints_no_library_progress_bars(sd15, capfd):
    # diffusers' "Loading pipeline components" and transformers' "Loading weights" tqdm bars would
    # break through lorakit's own display (and leave a stray "[A" escape behind).
    from diffusers.utils import logging as diffusers_logging

    from lorakit.trainer.models import load_pipeline

    load_pipeline(sd15)
    err = capfd.readouterr().err
    assert "Loading" not in err and "\x1b[A" not in err
    assert diffusers_logging.is_progress_bar_enabled()  # put back for code outside lorakit
