"""convert: every input format to an 8-bit RGB/RGBA PNG, animations to one PNG per frame."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lorakit.plugin_sdk import ImageError, Item, StepContext
from conftest import write_png_bomb
from lorakit.plugin_sdk.testing import run_step
from lorakit.plugins.convert import ConvertStep

COLOURS = ["red", "lime", "blue", "yellow", "magenta"]


def animation(path: Path, frames: int = 3, **save) -> Path:
    images = [Image.new("RGB", (40, 30), COLOURS[i % len(COLOURS)]) for i in range(frames)]
    images[0].save(path, save_all=True, append_images=images[1:], duration=100, loop=0, **save)
    return path


def only(res, name):
    rec = res.by_name(name)
    return rec, res.open(rec)


def test_convert_splits_an_animated_gif_into_numbered_frames(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    animation(src / "wave.gif", frames=3)
    res = run_step("convert", src, tmp_path / "out")
    assert sorted(r.path for r in res.images) == ["wave_0001.png", "wave_0002.png", "wave_0003.png"]
    assert res.open(res.by_name("wave_0002")).getpixel((5, 5)) == (0, 255, 0)
    assert res.by_name("wave_0003").meta == {"source_format": "GIF", "frame": 3, "frames": 3}


def test_convert_first_frame_only_keeps_the_name(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    animation(src / "wave.gif", frames=3)
    res = run_step("convert", src, tmp_path / "out", {"first_frame_only": True})
    assert [r.path for r in res.images] == ["wave.png"]
    assert res.open(res.images[0]).getpixel((0, 0)) == (255, 0, 0)


def test_convert_frame_step_keeps_every_nth_frame(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    animation(src / "long.gif", frames=5)
    res = run_step("convert", src, tmp_path / "out", {"frame_step": 2})
    assert sorted(r.path for r in res.images) == ["long_0001.png", "long_0003.png", "long_0005.png"]


def test_convert_sets_aside_animations_over_max_frames(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    animation(src / "movie.gif", frames=5)
    Image.new("RGB", (8, 8), "red").save(src / "still.png")  # a dataset of no images would fail the run
    res = run_step("convert", src, tmp_path / "out", {"max_frames": 4})
    assert [r.path for r in res.images] == ["still.png"]
    assert "over max_frames=4" in res.reasons()["movie"]
    assert not list((tmp_path / "out").rglob("movie*.png"))


def test_convert_splits_an_animated_webp(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    animation(src / "clip.webp", frames=2, lossless=True)
    res = run_step("convert", src, tmp_path / "out")
    assert sorted(r.path for r in res.images) == ["clip_0001.png", "clip_0002.png"]
    assert res.open(res.by_name("clip_0002")).getpixel((3, 3)) == (0, 255, 0)


@pytest.mark.parametrize("ext,options", [(".jpg", {"quality": 95}), (".bmp", {}), (".tif", {}),
                                         (".webp", {"lossless": True}), (".avif", {"quality": 100})])
def test_convert_writes_png_from_each_format(tmp_path, ext, options):
    src = tmp_path / "in"
    src.mkdir()
    Image.new("RGB", (32, 24), (200, 40, 40)).save(src / f"pic{ext}", **options)
    res = run_step("convert", src, tmp_path / "out")
    rec, im = only(res, "pic")
    assert rec.path == "pic.png" and im.format == "PNG" and im.mode == "RGB" and im.size == (32, 24)
    assert np.abs(np.asarray(im, dtype=int)[12, 16] - (200, 40, 40)).max() <= 6


def test_convert_applies_exif_orientation(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    im = Image.new("RGB", (40, 30), "red")
    im.paste((0, 0, 255), (0, 0, 10, 10))  # blue mark top-left as stored
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    im.save(src / "phone.jpg", exif=exif, quality=95)
    res = run_step("convert", src, tmp_path / "out")
    _, out = only(res, "phone")
    assert out.size == (30, 40)
    r, g, b = out.getpixel((25, 4))  # the mark is now top-right
    assert b > 200 and r < 60


def test_convert_normalises_cmyk_to_rgb(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(src / "print.jpg", quality=95)
    res = run_step("convert", src, tmp_path / "out")
    _, out = only(res, "print")
    assert out.mode == "RGB"
    r, g, b = out.getpixel((10, 10))
    assert r > 230 and g < 30 and b < 30


def test_convert_keeps_palette_transparency_as_rgba(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    pal = Image.new("P", (20, 20), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.paste(1, (5, 5, 15, 15))
    pal.save(src / "sprite.gif", transparency=0)
    res = run_step("convert", src, tmp_path / "out")
    _, out = only(res, "sprite")
    assert out.mode == "RGBA"
    assert out.getpixel((0, 0))[3] == 0 and out.getpixel((10, 10)) == (255, 0, 0, 255)


def test_convert_keeps_grey_alpha_transparency(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    Image.new("LA", (10, 10), (90, 100)).save(src / "ink.png")
    res = run_step("convert", src, tmp_path / "out")
    _, out = only(res, "ink")
    assert out.mode == "RGBA" and out.getpixel((3, 3)) == (90, 90, 90, 100)


def test_convert_scales_16_bit_grey_instead_of_clipping(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    ramp = np.linspace(0, 65535, 64 * 8).reshape(8, 64).astype(np.uint16)
    Image.fromarray(ramp).save(src / "scan.png")
    res = run_step("convert", src, tmp_path / "out")
    _, out = only(res, "scan")
    arr = np.asarray(out)
    assert out.mode == "RGB"
    assert arr[0, 0, 0] == 0 and arr[-1, -1, 0] == 255
    assert abs(int(arr[4, 32, 0]) - round(ramp[4, 32] / 257)) <= 1


def test_convert_drops_an_alpha_channel_that_is_fully_opaque(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    Image.new("RGBA", (10, 10), (1, 2, 3, 255)).save(src / "solid.webp", lossless=True)
    res = run_step("convert", src, tmp_path / "out")
    _, out = only(res, "solid")
    assert out.mode == "RGB"


def test_convert_passes_an_rgb_png_through_untouched(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    Image.new("RGB", (10, 10), "red").save(src / "done.png", compress_level=9)
    res = run_step("convert", src, tmp_path / "out")
    assert res.path(res.by_name("done")).read_bytes() == (src / "done.png").read_bytes()


def test_convert_rewrites_a_png_named_jpg(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    Image.new("RGB", (10, 10), "blue").save(src / "liar.jpg", format="PNG")
    res = run_step("convert", src, tmp_path / "out")
    rec, out = only(res, "liar")
    assert rec.path == "liar.png" and out.format == "PNG"


def test_convert_sets_aside_bad_files_and_converts_the_rest(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    Image.new("RGB", (16, 16), "red").save(src / "fine.jpg")
    (src / "zero.png").write_bytes(b"")
    (src / "text.jpg").write_text("<html>not found</html>")
    data = (src / "fine.jpg").read_bytes()
    (src / "half.jpg").write_bytes(data[: len(data) // 3])
    res = run_step("convert", src, tmp_path / "out")
    kept = {Path(r.path).stem for r in res.images}
    assert "fine" in kept and "zero" not in kept and "text" not in kept
    reasons = res.reasons()
    assert "empty file" in reasons["zero"] and "not an image" in reasons["text"]
    if "half" not in kept:  # libjpeg may pad a truncated JPEG with grey instead of failing
        assert "half" in reasons["half"] or "truncated" in reasons["half"]
    assert not list((tmp_path / "out").rglob(".lorakit-tmp-*"))


def test_convert_refuses_a_decompression_bomb_before_decoding_it(tmp_path):
    write_png_bomb(tmp_path / "bomb.png", 20000)
    ctx = StepContext("convert", tmp_path / "work", tmp_path / "tmp", tmp_path / "out")
    with pytest.raises(ImageError, match="decompression bomb"):
        ConvertStep().process(Item(name="bomb", path=tmp_path / "bomb.png"), ctx)


def test_convert_removes_frames_already_written_when_a_later_frame_is_broken(tmp_path):
    src = tmp_path / "anim.gif"
    frames = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (64, 64, 3)).astype(np.uint8)) for i in range(4)]
    frames[0].save(src, save_all=True, append_images=frames[1:], duration=50)
    data = src.read_bytes()
    src.write_bytes(data[: int(len(data) * 0.8)])  # the last frames are cut off
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    ctx = StepContext("convert", tmp_path / "work", tmp, tmp_path / "out")
    with pytest.raises(ImageError, match="frame 4 of 4 is broken"):
        ConvertStep().process(Item(name="anim", path=src), ctx)
    assert not list(tmp.iterdir())
