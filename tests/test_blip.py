"""BLIP captioner: a tiny random BLIP built from a config (real transformers classes, no download)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from lorakit.plugin_sdk import Item, ModelNotFound, ParamError, StepContext
from lorakit.plugins.blip import BlipStep
from tests.tiny_models import build_tiny_blip

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_blip(tmp_path_factory.mktemp("blip") / "tiny-blip")


def reference_captions(model_dir: Path, images, prompt=None, **generate) -> list[str]:
    """What the model says, computed by calling transformers directly (not through the step)."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    processor = BlipProcessor.from_pretrained(model_dir)
    model = BlipForConditionalGeneration.from_pretrained(model_dir).eval()
    text = [prompt] * len(images) if prompt else None
    inputs = processor(images=images, text=text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, **generate)
    return [" ".join(t.split()) for t in processor.batch_decode(out, skip_special_tokens=True)]


def pictures(tmp_path: Path) -> list[Item]:
    items = []
    for n, (size, color) in enumerate([((40, 30), (200, 0, 0)), ((20, 50), (0, 0, 200)), ((64, 64), (0, 150, 0))]):
        path = tmp_path / f"p{n}.png"
        Image.new("RGB", size, color).save(path)
        items.append(Item(name=f"p{n}", path=path))
    return items


def caption(model_dir, items, tmp_path, **options):
    step = BlipStep.configure({"model": str(model_dir), "precision": "fp32", **options})
    ctx = StepContext("blip", tmp_path / "work", tmp_path / "tmp", tmp_path / "out", device="cpu")
    step.setup(ctx)
    return step.process_batch(items, ctx)


def test_captions_are_the_model_sentences(tmp_path, model_dir):
    items = pictures(tmp_path)
    out = caption(model_dir, items, tmp_path, beams=3, min_length=5, max_length=20)
    expected = reference_captions(model_dir, [Image.open(i.path).convert("RGB") for i in items],
                                  num_beams=3, min_length=5, max_length=20)
    assert [o.caption for o in out] == expected
    assert all(o.caption for o in out)
    assert len({o.caption for o in out}) > 1  # the model looks at the pictures


def test_greedy_decoding_with_one_beam(tmp_path, model_dir):
    items = pictures(tmp_path)[:1]
    out, = caption(model_dir, items, tmp_path, beams=1, max_length=12, min_length=1)
    assert out.caption == reference_captions(model_dir, [Image.open(items[0].path).convert("RGB")],
                                             num_beams=1, max_length=12, min_length=1)[0]


def test_prefix_is_written_before_every_caption(tmp_path, model_dir):
    out = caption(model_dir, pictures(tmp_path), tmp_path, prefix="ohwx woman,", max_length=10)
    plain = caption(model_dir, pictures(tmp_path), tmp_path, max_length=10)
    assert [o.caption for o in out] == [f"ohwx woman, {p.caption}" for p in plain]


def test_prompt_is_continued_by_the_model(tmp_path, model_dir):
    items = pictures(tmp_path)
    out = caption(model_dir, items, tmp_path, prompt="a photo of", max_length=15, beams=1)
    assert all(o.caption.startswith("a photo of") for o in out)
    assert [o.caption for o in out] == reference_captions(
        model_dir, [Image.open(i.path).convert("RGB") for i in items], prompt="a photo of",
        max_length=15, min_length=5, num_beams=1)


def test_max_length_bounds_the_caption_in_tokens(tmp_path, model_dir):
    short = caption(model_dir, pictures(tmp_path), tmp_path, min_length=2, max_length=6)
    # max_length counts the start token: at most 5 tokens remain, so at most 5 words
    assert all(1 <= len(o.caption.split()) <= 5 for o in short)
    longer = caption(model_dir, pictures(tmp_path), tmp_path, min_length=2, max_length=30)
    assert max(len(o.caption.split()) for o in longer) > 5


def test_min_length_above_max_length_is_refused():
    with pytest.raises(ParamError, match="min_length"):
        BlipStep.configure({"min_length": 30, "max_length": 20})


def test_batched_captions_equal_one_by_one(tmp_path, model_dir):
    items = pictures(tmp_path)
    batched = caption(model_dir, items, tmp_path, beams=2, max_length=12)
    single = [caption(model_dir, [i], tmp_path, beams=2, max_length=12)[0] for i in items]
    assert [b.caption for b in batched] == [s.caption for s in single]


@pytest.mark.parametrize("mode, expected", [
    ("replace", "{new}"),
    ("keep", "a woman by a window"),
    ("append", "a woman by a window {new}"),
])
def test_existing_captions_are_replaced_kept_or_appended_to(tmp_path, model_dir, mode, expected):
    item = pictures(tmp_path)[0]
    new = caption(model_dir, [item], tmp_path, max_length=10)[0].caption
    out, = caption(model_dir, [item.replace(caption="a woman by a window")], tmp_path, max_length=10, combine=mode)
    assert out.caption == expected.format(new=new)


def test_transparent_pixels_are_seen_as_white(tmp_path, model_dir):
    clear = tmp_path / "clear.png"
    Image.new("RGBA", (32, 32), (0, 0, 0, 0)).save(clear)
    white = tmp_path / "white.png"
    Image.new("RGB", (32, 32), (255, 255, 255)).save(white)
    a, b = caption(model_dir, [Item("clear", clear), Item("white", white)], tmp_path, max_length=12)
    assert a.caption == b.caption


def test_a_broken_picture_is_set_aside_and_the_batch_goes_on(tmp_path, model_dir):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    items = [*pictures(tmp_path)[:1], Item("bad", bad)]
    good, broken = caption(model_dir, items, tmp_path, max_length=8)
    assert good.caption and isinstance(broken, Exception) and "bad.jpg" in str(broken)


def test_pickled_weights_are_refused(tmp_path, model_dir):
    import shutil

    folder = tmp_path / "pickled"
    shutil.copytree(model_dir, folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"pickles can run code")
    with pytest.raises(ModelNotFound, match="model.safetensors"):
        caption(folder, [], tmp_path)


def test_an_uncached_hub_model_offline_says_what_to_download(tmp_path, monkeypatch):
    from huggingface_hub import constants

    # huggingface_hub reads these once at import: set both the environment and its constants.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    step = BlipStep.configure({})
    with pytest.raises(ModelNotFound) as err:
        step.setup(StepContext("blip", tmp_path, tmp_path, tmp_path, device="cpu"))
    assert "https://huggingface.co/Salesforce/blip-image-captioning-large" in str(err.value)


def test_runs_in_a_pipeline_and_the_sentence_reaches_the_manifest(tmp_path, model_dir):
    from lorakit.plugin_sdk.testing import make_image, run_step

    make_image(tmp_path / "in" / "a.png", (48, 40), "red")
    (tmp_path / "in" / "a.txt").write_text("1girl, solo")
    res = run_step("blip", tmp_path / "in", tmp_path / "out",
                   {"model": str(model_dir), "prefix": "ohwx,", "max_length": 10, "precision": "fp32"})
    rec, = res.images
    assert rec.sentence.startswith("ohwx, ") and len(rec.sentence) > len("ohwx, ")
    assert rec.caption == "1girl, solo, " + rec.sentence
    again = run_step("blip", tmp_path / "in", tmp_path / "out",
                     {"model": str(model_dir), "prefix": "ohwx,", "max_length": 10, "precision": "fp32"})
    assert again.images[0].sentence == rec.sentence  # cached and deterministic


def test_the_step_is_registered_through_the_entry_point():
    from lorakit.host import load_host

    assert load_host().steps["blip"] is BlipStep


def test_cpu_generates_one_picture_a_call_with_the_next_one_prepared_meanwhile(tmp_path, model_dir):
    import threading

    (tmp_path / "more").mkdir()
    items = pictures(tmp_path) + pictures(tmp_path / "more")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a picture")
    items.insert(2, Item(name="bad", path=bad))
    step = BlipStep.configure({"model": str(model_dir), "precision": "fp32", "beams": 2, "max_length": 12})
    ctx = StepContext("blip", tmp_path / "work", tmp_path / "tmp", tmp_path / "out", device="cpu")
    step.setup(ctx)
    assert step.run_batch == 1 and torch.get_num_threads() >= 1
    groups, preparers = [], set()
    real_generate, real_inputs = step._generate, step._inputs
    step._generate = lambda inputs: groups.append(len(inputs["pixel_values"])) or real_generate(inputs)
    step._inputs = lambda images: preparers.add(threading.current_thread().name) or real_inputs(images)
    out = step.process_batch(items, ctx)
    assert groups == [1] * 6  # one picture a generate call; the broken one is set aside, not generated
    assert preparers == {"blip-prepare_0"}  # decoding and preprocessing off the generating thread
    assert isinstance(out[2], Exception) and "bad.png" in str(out[2])
    one_by_one = [caption(model_dir, [i], tmp_path, beams=2, max_length=12)[0].caption
                  for i in items if i.name != "bad"]
    assert [o.caption for o in out if not isinstance(o, Exception)] == one_by_one
