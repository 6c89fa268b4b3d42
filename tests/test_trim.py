"""trim: the same crop as ImageMagick's -fuzz N% -trim, checked against ImageMagick itself."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lorakit.plugin_sdk import ParamError
from conftest import write_png_bomb
from lorakit.plugin_sdk.testing import run_step
from lorakit.plugins._imageops import fuzz_from_percent, trim_array, trim_box
from lorakit.plugins.trim import TrimStep


def _imagemagick() -> str | None:
    for candidate in ("/usr/bin/convert", shutil.which("convert")):
        if candidate and Path(candidate).exists():
            out = subprocess.run([candidate, "-version"], capture_output=True, text=True)
            if "ImageMagick" in out.stdout:
                return candidate
    return None


CONVERT = _imagemagick()
needs_imagemagick = pytest.mark.skipif(CONVERT is None, reason="ImageMagick's convert is not installed (apt install imagemagick)")


def imagemagick_trim(files: list[Path], fuzz: float) -> list[tuple[int, int, int, int]]:
    """(width, height, x, y) of `convert FILE -fuzz F% -trim` for each file, in one ImageMagick call."""
    out = subprocess.run([CONVERT, *map(str, files), "-fuzz", f"{fuzz}%", "-trim", "-format", "%w %h %X %Y\n", "info:"],
                         capture_output=True, text=True, check=True).stdout.split()
    values = list(map(int, out))
    return [tuple(values[i:i + 4]) for i in range(0, len(values), 4)]


def our_trim(path: Path, fuzz: float) -> tuple[int, int, int, int]:
    """The same figures from lorakit; nothing left is reported like ImageMagick's 1x1 at -1,-1."""
    im = Image.open(path)
    result = trim_box(trim_array(im), fuzz_from_percent(fuzz))
    if result.box is None:
        return (1, 1, -1, -1)
    left, top, right, bottom = result.box
    return (right - left, bottom - top, left, top)


def generated_images(folder: Path, count: int, seed: int) -> list[Path]:
    """Bordered, noisy, gradient, transparent, two-colour and near-threshold images of odd sizes."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        kind = i % 8
        w, h = (int(v) for v in rng.integers(1, 48, 2))
        if kind == 0:  # solid border around a block
            arr = np.tile(rng.integers(0, 256, 3), (h, w, 1)).astype(np.uint8)
            x0, y0 = rng.integers(0, w), rng.integers(0, h)
            arr[y0:rng.integers(y0, h + 1), x0:rng.integers(x0, w + 1)] = rng.integers(0, 256, 3)
        elif kind == 1:  # noise around a base colour
            arr = np.clip(rng.integers(0, 256, 3) + rng.integers(-60, 61, (h, w, 3)), 0, 255).astype(np.uint8)
        elif kind == 2:  # horizontal gradient
            arr = (np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3)) * rng.random(3)).astype(np.uint8)
        elif kind == 3:  # transparent border with random colours hidden under it
            arr = rng.integers(0, 256, (h, w, 4)).astype(np.uint8)
            arr[..., 3] = 0
            x0, y0 = rng.integers(0, w), rng.integers(0, h)
            arr[y0:rng.integers(y0, h + 1), x0:rng.integers(x0, w + 1), 3] = rng.integers(0, 256)
        elif kind == 4:  # partial alphas, including nearly transparent ones
            arr = rng.integers(0, 256, (h, w, 4)).astype(np.uint8)
            arr[..., 3] = rng.choice([0, 1, 2, 30, 128, 200, 254, 255], (h, w))
        elif kind == 5:  # three-colour palette
            arr = rng.integers(0, 256, (3, 3))[rng.integers(0, 3, (h, w))].astype(np.uint8)
        elif kind == 6:  # two halves: the corners disagree, edges cross
            arr = np.zeros((h, w, 3), np.uint8)
            arr[:, : w // 2] = rng.integers(0, 256, 3)
            arr[:, w // 2:] = rng.integers(0, 256, 3)
            if rng.random() < 0.5:
                arr = arr.transpose(1, 0, 2).copy()
        else:  # differences straddling a 20% fuzz
            base = np.tile(rng.integers(60, 200, 3), (h, w, 1))
            arr = base + rng.integers(-54, 55, (h, w, 1)) * (rng.random((h, w, 3)) < 0.7)
            arr = np.clip(arr, 0, 255).astype(np.uint8)
        path = folder / f"gen{i:03d}.png"
        Image.fromarray(arr, "RGBA" if arr.shape[2] == 4 else "RGB").save(path)
        paths.append(path)
    return paths


@needs_imagemagick
@pytest.mark.parametrize("fuzz", [0, 5, 20, 30, 50])
def test_trim_box_matches_imagemagick_on_generated_images(tmp_path, fuzz):
    files = generated_images(tmp_path, 160, seed=fuzz)
    expected = imagemagick_trim(files, fuzz)
    mismatches = [(f.name, want, our_trim(f, fuzz)) for f, want in zip(files, expected) if our_trim(f, fuzz) != want]
    assert not mismatches


@needs_imagemagick
def test_trim_fuzz_percent_is_of_quantum_range_plus_one_like_imagemagick(tmp_path):
    # Sum of squared channel differences 17557 is within 30% of 65536 but not of 65535.
    arr = np.full((5, 5, 3), 100, np.uint8)
    arr[2, 2] = (100, 141, 226)  # 0² + 41² + 126² = 17557
    path = tmp_path / "edge.png"
    Image.fromarray(arr).save(path)
    assert imagemagick_trim([path], 30) == [(1, 1, -1, -1)]
    assert our_trim(path, 30) == (1, 1, -1, -1)
    assert our_trim(path, 29.9) == (1, 1, 2, 2)


@needs_imagemagick
def test_trim_step_output_has_the_same_pixels_as_imagemagick(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    arr = np.full((90, 120, 3), 250, np.uint8)
    arr[20:70, 30:100] = np.random.default_rng(0).integers(0, 256, (50, 70, 3))
    Image.fromarray(arr).save(src / "photo.png")
    res = run_step("trim", src, tmp_path / "out", {"fuzz": "20%"})
    ours = np.asarray(res.open(res.by_name("photo")))
    magick_out = tmp_path / "magick.png"
    subprocess.run([CONVERT, str(src / "photo.png"), "-fuzz", "20%", "-trim", "+repage", str(magick_out)], check=True)
    assert np.array_equal(ours, np.asarray(Image.open(magick_out).convert("RGB")))


def test_trim_cuts_a_white_border_through_the_pipeline(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    im = Image.new("RGB", (100, 80), "white")
    im.paste((200, 30, 30), (10, 5, 60, 70))
    im.save(src / "card.png")
    res = run_step("trim", src, tmp_path / "out", {"fuzz": "10%"})
    rec = res.by_name("card")
    assert (rec.width, rec.height) == (50, 65)
    assert res.open(rec).getpixel((0, 0)) == (200, 30, 30)
    assert rec.meta["trim"] == {"box": [10, 5, 60, 70], "from": [100, 80]}


def test_trim_leaves_an_image_without_border_untouched(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    arr = np.random.default_rng(1).integers(0, 256, (40, 50, 3)).astype(np.uint8)
    Image.fromarray(arr).save(src / "full.png", compress_level=9)
    res = run_step("trim", src, tmp_path / "out")
    assert res.path(res.by_name("full")).read_bytes() == (src / "full.png").read_bytes()


def test_trim_sets_aside_an_image_that_is_all_border(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    Image.new("RGB", (30, 30), "white").save(src / "blank.png")
    Image.new("RGB", (30, 30), (250, 250, 250)).save(src / "almost.png")
    kept = Image.new("RGB", (30, 30), "white")
    kept.paste((200, 0, 0), (10, 10, 20, 20))
    kept.save(src / "kept.png")  # a dataset of no images would fail the run
    res = run_step("trim", src, tmp_path / "out", {"fuzz": "20%"})
    assert [r.path for r in res.images] == ["kept.png"]
    assert "nothing left after trimming" in res.reasons()["blank"]
    assert "nothing left after trimming" in res.reasons()["almost"]


def test_trim_cuts_transparent_border_whatever_colour_is_hidden_under_it(tmp_path):
    arr = np.random.default_rng(2).integers(0, 256, (40, 40, 4)).astype(np.uint8)
    arr[..., 3] = 0
    arr[10:30, 12:25, 3] = 255
    result = trim_box(arr, fuzz_from_percent(0))
    assert result.box == (12, 10, 25, 30)


def test_trim_accepts_imagemagick_fuzz_syntax_and_refuses_nonsense():
    assert float(TrimStep.configure({"fuzz": "20%"}).options.fuzz) == 20.0
    assert float(TrimStep.configure({"fuzz": 35}).options.fuzz) == pytest.approx(35 / 65536 * 100)  # absolute
    with pytest.raises(ParamError, match="fuzz"):
        TrimStep.configure({"fuzz": "lots"})
    with pytest.raises(ParamError, match="fuzz"):
        TrimStep.configure({"fuzz": "150%"})


def test_trim_sets_aside_broken_files_and_processes_the_rest(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    good = Image.new("RGB", (60, 40), "white")
    good.paste((0, 0, 255), (10, 10, 30, 30))
    good.save(src / "good.png")
    (src / "empty.png").write_bytes(b"")
    (src / "notes.jpg").write_text("this is not a picture")
    data = (src / "good.png").read_bytes()
    (src / "cut.png").write_bytes(data[: len(data) // 2])
    write_png_bomb(src / "bomb.png", 20000)
    res = run_step("trim", src, tmp_path / "out", {"fuzz": "5%"})
    assert [Path(r.path).stem for r in res.images] == ["good"]
    reasons = res.reasons()
    assert "empty file" in reasons["empty"]
    assert "not an image" in reasons["notes"]
    assert "truncated" in reasons["cut"]
    assert "decompression bomb" in reasons["bomb"]
    leftovers = [p for p in (tmp_path / "out").rglob(".lorakit-tmp-*")]
    assert not leftovers


@needs_imagemagick
@pytest.mark.parametrize("spelling", ["20", "3000", "20%"])
def test_trim_fuzz_spellings_mean_what_imagemagick_means(tmp_path, spelling):
    # `-fuzz 20` is 20 of 65535 in ImageMagick, `-fuzz 20%` a percentage: a user copying a command
    # line gets ImageMagick's crop with either spelling, through the standalone command.
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(1)
    arr = np.full((60, 80, 3), 200, np.uint8)
    arr[:, :6] += rng.integers(0, 12, (60, 6, 1)).astype(np.uint8)  # a faint, noisy left margin
    arr[15:45, 20:60] = rng.integers(0, 256, (30, 40, 3))
    Image.fromarray(arr).save(src / "photo.png")
    out = subprocess.run([CONVERT, str(src / "photo.png"), "-fuzz", spelling, "-trim", "-format", "%w %h", "info:"],
                         capture_output=True, text=True, check=True).stdout.split()
    res = run_step("trim", src, tmp_path / "out", {"fuzz": spelling})
    assert list(res.open(res.by_name("photo")).size) == [int(v) for v in out]


def test_trim_fuzz_bare_number_is_absolute_and_keeps_its_spelling():
    from lorakit.plugin_sdk import Fuzz, Param

    param = Param("fuzz", Fuzz, Fuzz(20))
    absolute, percent = param.convert("20", "trim"), param.convert("20%", "trim")
    assert fuzz_from_percent(float(absolute)) == pytest.approx(20.0)
    assert float(percent) == 20.0
    assert (absolute.text, percent.text, param.convert(20, "trim").text) == ("20", "20%", "20")


def test_trim_that_removes_most_of_the_picture_is_flagged(tmp_path):
    # A blue dress on a blue background: only the small face differs, so -trim keeps almost nothing.
    src = tmp_path / "in"
    src.mkdir()
    im = Image.new("RGB", (100, 100), (30, 60, 200))
    im.paste((225, 190, 170), (45, 10, 55, 20))
    im.save(src / "dress.png")
    framed = Image.new("RGB", (100, 100), "white")
    framed.paste((200, 30, 30), (5, 5, 95, 95))
    framed.save(src / "ok.png")
    res = run_step("trim", src, tmp_path / "out", {"fuzz": "20%"})
    warnings = res.by_name("dress").meta["warnings"]
    assert warnings[0]["step"] == "trim" and "kept 1% of the picture (10x10 of 100x100)" in warnings[0]["message"]
    assert "warnings" not in res.by_name("ok").meta
