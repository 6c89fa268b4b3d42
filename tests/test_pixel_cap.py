"""One pixel cap (LORAKIT_MAX_PIXELS) for every decode; sizes are measured from headers, so an
image under the cap never aborts a run however large it is."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from conftest import run_cli, write_png_bomb
from lorakit.plugin_sdk import ImageError, image_header, image_size
from lorakit.plugin_sdk.testing import make_image, run_step


def test_pillow_uses_lorakits_cap_in_every_process():
    code = "import lorakit.plugin_sdk as s; from PIL import Image; print(Image.MAX_IMAGE_PIXELS == s.MAX_PIXELS)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"


def test_image_size_measures_any_size_without_decoding(tmp_path):
    write_png_bomb(tmp_path / "huge.png", 24000)  # 576 megapixels, over the cap: still measured
    assert image_size(tmp_path / "huge.png") == (24000, 24000)
    with pytest.raises(ImageError, match="over the decode limit"):
        with image_header(tmp_path / "huge.png"):
            pass
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ImageError, match="bad.png"):
        image_size(tmp_path / "bad.png")


def test_a_14000_square_image_goes_through_buckets_and_the_dataset_writer(tmp_path):
    (tmp_path / "raw").mkdir()
    write_png_bomb(tmp_path / "raw" / "big.png", 14000)
    make_image(tmp_path / "raw" / "small.png", (64, 64))
    res = run_step("buckets", tmp_path / "raw", tmp_path / "out")
    big = res.by_name("big")
    assert (big.width, big.height) == (14000, 14000)
    assert not res.set_aside


def test_the_cap_comes_from_the_environment_and_sets_oversized_images_aside(tmp_path):
    make_image(tmp_path / "raw" / "large.png", (200, 200))
    make_image(tmp_path / "raw" / "small.png", (50, 50))
    proc = run_cli("buckets", str(tmp_path / "raw"), str(tmp_path / "out"), env_extra={"LORAKIT_MAX_PIXELS": "10000"})
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [r["path"] for r in data["images"]] == ["small.png"]
    assert "over the decode limit of 10000" in data["set_aside"][0]["reason"]


def test_kohya_training_import_lists_an_unusable_image_as_set_aside(tmp_path):
    from lorakit.manifest import load_dataset

    make_image(tmp_path / "k" / "2_char" / "good.png")
    (tmp_path / "k" / "2_char" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    manifest = load_dataset(tmp_path / "k")
    assert [r.source.split("/")[-1] for r in manifest.set_aside] == ["broken.png"]
    assert len(manifest.images) == 1
    with Image.open(manifest.images[0].path) as im:
        assert im.size == (64, 64)


def test_raising_the_cap_lets_a_genuine_large_image_through(tmp_path):
    (tmp_path / "raw").mkdir()
    write_png_bomb(tmp_path / "raw" / "wide.png", 18000)  # 324 megapixels: over the default cap of 268
    make_image(tmp_path / "raw" / "small.png", (64, 64))
    refused = run_cli("buckets", str(tmp_path / "raw"), str(tmp_path / "a"))
    assert refused.returncode == 0, refused.stderr
    assert len(json.loads((tmp_path / "a" / "manifest.json").read_text())["images"]) == 1
    raised = run_cli("buckets", str(tmp_path / "raw"), str(tmp_path / "b"),
                     env_extra={"LORAKIT_MAX_PIXELS": str(400_000_000)})
    assert raised.returncode == 0, raised.stderr
    data = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert sorted((r["width"], r["height"]) for r in data["images"]) == [(64, 64), (18000, 18000)]
