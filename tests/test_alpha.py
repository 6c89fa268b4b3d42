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


def test_alpha_passes_an_image_without_alpha_through_without_reencoding(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    Image.new("RGB", (30, 20), "red").save(src / "rgb.png", compress_level=9)
    Image.new("RGB", (30, 20), "green").save(src / "photo.jpg", quality=80)
    res = run_step("alpha", src, tmp_path / "out")
    assert res.path(res.by_name("rgb")).read_bytes() == (src / "rgb.png").read_bytes()
    assert res.path(res.by_name("photo")).read_bytes() == (src / "photo.jpg").read_bytes()


def test_alpha_writes_a_fully_opaque_rgba_image_as_rgb_with_the_same_pixels(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(3)
    arr = rng.integers(0, 256, (20, 30, 4)).astype(np.uint8)
    arr[..., 3] = 255
    Image.fromarray(arr, "RGBA").save(src / "opaque_rgba.png")
    res = run_step("alpha", src, tmp_path / "out")
    out = res.open(res.by_name("opaque_rgba"))
    assert out.mode == "RGB"
    assert np.array_equal(np.asarray(out), arr[..., :3])


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


def _chain_inputs(src: Path) -> None:
    """One picture for each path through convert -> trim -> alpha."""
    rng = np.random.default_rng(7)
    photo = rng.integers(0, 256, (40, 50, 3)).astype(np.uint8)
    bordered = Image.new("RGB", (80, 70), "white")
    bordered.paste(Image.fromarray(photo), (10, 12))
    bordered.save(src / "bordered.jpg", quality=90)                      # decoded, trimmed: one encode
    Image.fromarray(photo).save(src / "clean.png")                        # nothing to do: no encode
    cut = Image.new("RGBA", (80, 70), (0, 0, 0, 0))
    cut.paste(Image.fromarray(photo).convert("RGBA"), (5, 9))
    cut.save(src / "cutout.png")                    # trimmed to opaque content: RGBA -> RGB, one encode
    Image.fromarray(photo).convert("RGBA").save(src / "opaque_rgba.png")  # alpha 255 everywhere: RGB
    soft = Image.fromarray(photo).convert("RGBA")
    soft.putalpha(Image.fromarray(rng.integers(0, 256, (40, 50)).astype(np.uint8)))
    soft.save(src / "soft.webp", lossless=True)                          # flattened: one encode


def test_convert_trim_alpha_run_encodes_each_changed_picture_once_and_writes_rgb(tmp_path, monkeypatch):
    from lorakit.plugin_sdk import item as item_module
    from lorakit.plugin_sdk.testing import run_pipeline_dict

    src = tmp_path / "in"
    src.mkdir()
    _chain_inputs(src)
    encodes, decodes = [], []
    Image.init()
    png_save = Image.SAVE["PNG"]

    def counting_save(im, fp, filename, *args, **kwargs):
        encodes.append(im.mode)
        return png_save(im, fp, filename, *args, **kwargs)

    real_open = item_module.open_image

    def counting_open(path, *args, **kwargs):
        decodes.append(Path(path).name)
        return real_open(path, *args, **kwargs)

    monkeypatch.setitem(Image.SAVE, "PNG", counting_save)
    monkeypatch.setattr(item_module, "open_image", counting_open)
    res = run_pipeline_dict({"output": str(tmp_path / "out"), "sources": [{"folder": {"path": str(src)}}],
                             "steps": ["convert", {"trim": {"fuzz": "20%"}}, {"alpha": {"background": "white"}}]},
                            tmp_path, workers=1)
    names = ["bordered", "clean", "cutout", "opaque_rgba", "soft"]
    assert sorted(Path(r.path).stem for r in res.manifest.images) == names
    for name in names:
        assert res.open(res.by_name(name)).mode == "RGB", name
    assert res.path(res.by_name("clean")).read_bytes() == (src / "clean.png").read_bytes()
    assert encodes == ["RGB"] * 4  # every changed picture once, as RGB; the clean one not at all
    assert len(decodes) == len(set(decodes)) == 5  # each file decoded once in the whole chain
