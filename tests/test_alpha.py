"""alpha: flatten transparency like `-background C -alpha remove -alpha off`, within one level."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lorakit.plugin_sdk import ParamError
from lorakit.plugin_sdk.testing import run_step
from lorakit.plugins.alpha import AlphaStep

CONVERT = "/usr/bin/convert" if Path("/usr/bin/convert").exists() else shutil.which("convert")
if CONVERT and "ImageMagick" not in subprocess.run([CONVERT, "-version"], capture_output=True, text=True).stdout:
    CONVERT = None
needs_imagemagick = pytest.mark.skipif(CONVERT is None, reason="ImageMagick's convert is not installed (apt install imagemagick)")


def random_rgba(path: Path, seed: int, size=(37, 23)) -> Path:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 4)).astype(np.uint8)
    arr[..., 3] = rng.choice([0, 1, 64, 127, 128, 200, 254, 255], size[::-1])
    Image.fromarray(arr, "RGBA").save(path)
    return path


@needs_imagemagick
@pytest.mark.parametrize("background", ["white", "black", "#336699"])
def test_alpha_matches_imagemagick_alpha_remove_within_one_level(tmp_path, background):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(4):
        random_rgba(src / f"img{i}.png", seed=i)
    res = run_step("alpha", src, tmp_path / "out", {"background": background})
    for i in range(4):
        magick = tmp_path / f"magick{i}.png"
        subprocess.run([CONVERT, str(src / f"img{i}.png"), "-background", background, "-alpha", "remove",
                        "-alpha", "off", str(magick)], check=True)
        ours = res.open(res.by_name(f"img{i}"))
        assert ours.mode == "RGB"
        diff = np.abs(np.asarray(ours, dtype=int) - np.asarray(Image.open(magick).convert("RGB"), dtype=int))
        assert diff.max() <= 1


def test_alpha_passes_an_opaque_image_through_without_reencoding(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    Image.new("RGB", (30, 20), "red").save(src / "rgb.png", compress_level=9)
    Image.new("RGBA", (30, 20), (0, 0, 255, 255)).save(src / "opaque_rgba.png", compress_level=1)
    Image.new("RGB", (30, 20), "green").save(src / "photo.jpg", quality=80)
    res = run_step("alpha", src, tmp_path / "out")
    assert res.path(res.by_name("rgb")).read_bytes() == (src / "rgb.png").read_bytes()
    assert res.path(res.by_name("opaque_rgba")).read_bytes() == (src / "opaque_rgba.png").read_bytes()
    assert res.path(res.by_name("photo")).read_bytes() == (src / "photo.jpg").read_bytes()


def test_alpha_flattens_palette_transparency(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    pal = Image.new("P", (20, 20), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.paste(1, (5, 5, 15, 15))
    pal.save(src / "sprite.png", transparency=0)  # index 0 (black) is transparent
    res = run_step("alpha", src, tmp_path / "out")
    out = res.open(res.by_name("sprite"))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((10, 10)) == (255, 0, 0)


def test_alpha_flattens_grey_with_alpha_to_grey(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    Image.new("LA", (10, 10), (0, 128)).save(src / "ink.png")
    res = run_step("alpha", src, tmp_path / "out", {"background": "white"})
    out = res.open(res.by_name("ink"))
    assert out.mode == "L"
    assert out.getpixel((0, 0)) == 127  # half-transparent black over white


def test_alpha_refuses_an_unknown_colour():
    with pytest.raises(ParamError, match="background"):
        AlphaStep.configure({"background": "not-a-colour"})
