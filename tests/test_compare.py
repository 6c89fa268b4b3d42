"""`lorakit compare` on the tiny SD1.5 with two epoch files the trainer writes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from lorakit.cli import cli
from lorakit.plugin_sdk import LorakitError
from lorakit.trainer import compare as compare_module
from lorakit.trainer.api import train, validate_settings
from lorakit.trainer.compare import GAP, HEADER_HEIGHT, LABEL_WIDTH, PROMPT_HEIGHT, Renderer, parse_prompt, read_prompts
from lorakit.trainer.models import load_pipeline
from tests.test_train import make_dataset, quiet, settings

PROMPTS = ["mychar, red hair", "mychar, smile --n lowres --d 3"]


@pytest.fixture(scope="module")
def run(sd15, tmp_path_factory):
    """Two epochs saved (mychar-000001 and the final mychar), and the trainer's own comparison of them."""
    dataset = make_dataset(tmp_path_factory.mktemp("data") / "dataset")
    out = tmp_path_factory.mktemp("run") / "mychar.safetensors"
    config = settings(sd15, out, epochs=2, save_every_n_epochs=1, compare_epochs=True, sample_prompts=PROMPTS,
                      compare_weights="0.5,1.0", sample_steps=2, learning_rate=5e-2)
    final = train(dataset, config, console=quiet())
    return [out.with_name("mychar-000001.safetensors"), final]


@pytest.fixture(scope="module")
def grid(sd15, run):
    renderer = Renderer(str(sd15), steps=2, size=64, device="cpu")
    prompts = [parse_prompt(p, "test") for p in PROMPTS]
    return compare_module.compare(run, prompts, [0.4, 0.7, 1.0], renderer)


def base_image(sd15, prompt: str, seed: int, negative=None):
    pipe = load_pipeline(sd15)
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, negative_prompt=negative, num_inference_steps=2, guidance_scale=7.0, width=64, height=64,
                generator=torch.Generator().manual_seed(seed)).images[0]


def test_grid_has_a_section_per_prompt_a_row_per_epoch_and_a_column_per_weight_plus_base(grid):
    assert grid.columns == ["no LoRA", "weight 0.4", "weight 0.7", "weight 1"]
    assert grid.rows == ["mychar-000001\nepoch 1", "mychar\nepoch 2"]
    cell = 64
    assert grid.image.size == (LABEL_WIDTH + 4 * (cell + GAP), 2 * (PROMPT_HEIGHT + HEADER_HEIGHT + 2 * (cell + GAP)))
    assert len(grid.cells) == 2 * 2 * 4


def test_labels_are_drawn_in_the_header_and_row_label_areas(grid):
    pixels = np.asarray(grid.image.convert("L"))
    header = pixels[PROMPT_HEIGHT:PROMPT_HEIGHT + HEADER_HEIGHT]
    for c in range(4):
        x = LABEL_WIDTH + c * (64 + GAP)
        assert (header[:, x:x + 64] < 128).any(), f"column {c} has no label"
    headers = [header[:, LABEL_WIDTH + c * (64 + GAP):LABEL_WIDTH + c * (64 + GAP) + 64] for c in range(4)]
    assert not np.array_equal(headers[1], headers[2])  # "weight 0.4" and "weight 0.7" differ
    top = PROMPT_HEIGHT + HEADER_HEIGHT
    assert (pixels[top:top + 64, :LABEL_WIDTH] < 128).any()  # the row label (file, epoch)
    assert (pixels[:PROMPT_HEIGHT, :] < 128).any()  # the prompt line


def test_no_lora_column_is_the_base_models_own_image(sd15, grid):
    for p, (prompt, seed, negative) in enumerate([("mychar, red hair", 42, None), ("mychar, smile", 3, "lowres")]):
        expected = np.asarray(base_image(sd15, prompt, seed, negative))
        for r in range(2):
            x0, y0, x1, y1 = grid.boxes[(p, r, 0)]
            np.testing.assert_array_equal(np.asarray(grid.image.crop((x0, y0, x1, y1))), expected)


def test_different_weights_and_epochs_give_different_images(grid):
    cells = {k: np.asarray(v, dtype=np.int16) for k, v in grid.cells.items()}
    for r in range(2):
        assert np.abs(cells[(0, r, 1)] - cells[(0, r, 3)]).max() > 0
        assert np.abs(cells[(0, r, 0)] - cells[(0, r, 3)]).max() > 0
    assert np.abs(cells[(0, 0, 3)] - cells[(0, 1, 3)]).max() > 0


def test_weight_one_is_what_diffusers_load_lora_weights_gives(sd15, run, grid):
    pipe = load_pipeline(sd15)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(run[1]))
    image = pipe("mychar, red hair", num_inference_steps=2, guidance_scale=7.0, width=64, height=64,
                 generator=torch.Generator().manual_seed(42)).images[0]
    diff = np.abs(np.asarray(image, dtype=np.int16) - np.asarray(grid.cells[(0, 1, 3)], dtype=np.int16))
    assert diff.max() <= 2  # the same maths; 8-bit rounding of float differences only


def test_trainer_writes_the_comparison_of_its_epoch_saves(run):
    png = run[1].with_name("mychar-compare.png")
    page = png.with_suffix(".html")
    assert Image.open(png).size == (LABEL_WIDTH + 3 * (64 + GAP), 2 * (PROMPT_HEIGHT + HEADER_HEIGHT + 2 * (64 + GAP)))
    text = page.read_text(encoding="utf-8")
    assert "weight 0.5" in text and "no LoRA" in text and "epoch 1" in text and "mychar, smile" in text
    cells = sorted(p.name for p in png.with_name("mychar-compare-cells").iterdir())
    assert len(cells) == 2 * 2 * 3 and all(f'src="mychar-compare-cells/{c}"' in text for c in cells)


def test_cli_writes_png_and_html(sd15, run, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# the grid's prompts\nmychar, red hair\n\n", encoding="utf-8")
    out = tmp_path / "grid.png"
    result = CliRunner().invoke(cli, ["compare", *map(str, run), "--prompts", str(prompts), "--base-model", str(sd15),
                                      "--weights", "0.7,1", "--steps", "2", "--size", "64", "--device", "cpu",
                                      "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (LABEL_WIDTH + 3 * (64 + GAP), PROMPT_HEIGHT + HEADER_HEIGHT + 2 * (64 + GAP))
    assert out.with_suffix(".html").is_file()


def test_prompt_files_take_kohyas_sample_options_and_bad_lines_are_named(tmp_path):
    prompt = parse_prompt("mychar, smile --n lowres, bad hands --w 512 --h 768 --d 7 --s 30 --l 5.5", "p")
    assert (prompt.text, prompt.negative, prompt.width, prompt.height, prompt.seed, prompt.steps, prompt.cfg) == \
        ("mychar, smile", "lowres, bad hands", 512, 768, 7, 30, 5.5)
    bad = tmp_path / "prompts.txt"
    bad.write_text("fine prompt\nmychar --w 500\n", encoding="utf-8")
    with pytest.raises(LorakitError, match=r"prompts.txt:2: .*multiples of 8"):
        read_prompts(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n", encoding="utf-8")
    with pytest.raises(LorakitError, match="no prompts"):
        read_prompts(empty)


def test_compare_settings_are_checked_before_training():
    with pytest.raises(LorakitError, match="'compare_epochs' needs 'sample_prompts'"):
        validate_settings({"compare_epochs": True})
    with pytest.raises(LorakitError, match="compare_weights"):
        validate_settings({"compare_epochs": True, "sample_prompts": ["x"], "compare_weights": "strong"})


def test_missing_or_pickled_lora_is_refused(sd15, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("x\n", encoding="utf-8")
    pickled = tmp_path / "old.pt"
    pickled.write_bytes(b"x")
    for path, message in ((tmp_path / "none.safetensors", "no such LoRA file"), (pickled, "pickled")):
        result = CliRunner().invoke(cli, ["compare", str(path), "--prompts", str(prompts), "--base-model", str(sd15)])
        assert result.exit_code != 0 and message in result.output


def test_compare_on_an_sdxl_lora_renders_its_ldm_named_file_like_diffusers(tmp_path):
    """SDXL: lorakit's merge places kohya's LDM-named UNet keys and both text encoders; weight 1 is what
    diffusers' own loader gives, the no-LoRA column the base model's image."""
    from tests.tiny_models import build_tiny_sdxl

    sdxl = build_tiny_sdxl(tmp_path / "sdxl")
    dataset = make_dataset(tmp_path / "data", subsets=(("outfit", 2, 1),))
    lora = train(dataset, settings(sdxl, tmp_path / "xl.safetensors", max_train_steps=2, learning_rate=5e-2),
                 console=quiet())
    renderer = Renderer(str(sdxl), steps=2, size=64, device="cpu")
    prompt = parse_prompt("mychar, red hair --d 5", "test")
    grid = compare_module.compare([lora], [prompt], [0.5, 1.0], renderer)
    assert grid.columns == ["no LoRA", "weight 0.5", "weight 1"]
    cells = {k: np.asarray(v, dtype=np.int16) for k, v in grid.cells.items()}
    assert np.abs(cells[(0, 0, 1)] - cells[(0, 0, 0)]).max() > 0 and np.abs(cells[(0, 0, 2)] - cells[(0, 0, 1)]).max() > 0
    pipe = load_pipeline(sdxl)
    pipe.set_progress_bar_config(disable=True)

    def image():
        return np.asarray(pipe("mychar, red hair", num_inference_steps=2, guidance_scale=7.0, width=64, height=64,
                               generator=torch.Generator().manual_seed(5)).images[0], dtype=np.int16)

    np.testing.assert_array_equal(image(), cells[(0, 0, 0)])
    pipe.load_lora_weights(str(lora))
    assert np.abs(image() - cells[(0, 0, 2)]).max() <= 2  # the same maths; 8-bit rounding only
