"""A run whose dataset would be empty fails with a clear message; set-aside reasons name the
user's source file, not lorakit's internal copy."""
from __future__ import annotations

import pytest

from conftest import run_cli
from lorakit.plugin_sdk import ImageStep, LorakitError, open_image
from lorakit.plugin_sdk.testing import make_image, run_step


def test_a_folder_where_every_image_is_bad_is_a_failed_run(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "empty.png").write_bytes(b"")
    (raw / "text.jpg").write_text("not a picture")
    proc = run_cli("alpha", str(raw), str(tmp_path / "out"))
    assert proc.returncode == 1
    assert "every image was set aside" in proc.stderr and "empty file" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_an_empty_dataset_keeps_the_previous_one(tmp_path):
    raw = tmp_path / "raw"
    make_image(raw / "a.png")
    run_step("alpha", raw, tmp_path / "out")
    (raw / "a.png").write_bytes(b"broken now")
    with pytest.raises(LorakitError, match="dataset would be empty"):
        run_step("alpha", raw, tmp_path / "out")
    assert (tmp_path / "out" / "a.png").is_file() and (tmp_path / "out" / "manifest.json").is_file()


def test_a_source_with_no_images_is_a_failed_run(tmp_path):
    (tmp_path / "raw").mkdir()
    proc = run_cli("alpha", str(tmp_path / "raw"), str(tmp_path / "out"))
    assert proc.returncode == 1 and "no images" in proc.stderr and "Traceback" not in proc.stderr


class TinyCap(ImageStep):
    name = "tinycap"
    summary = "Decode with a tiny pixel cap (test step)."

    def process(self, item, ctx):
        if item.name == "big":
            open_image(item.path, max_pixels=100)
        return item


def test_set_aside_reasons_name_the_source_file_not_the_store_copy(tmp_path):
    make_image(tmp_path / "raw" / "big.png", (50, 50))
    make_image(tmp_path / "raw" / "ok.png", (5, 5))
    res = run_step(TinyCap, tmp_path / "raw", tmp_path / "out")
    reason = res.reasons()["big"]
    assert str(tmp_path / "raw" / "big.png") in reason
    assert ".lorakit" not in reason and "blobs" not in reason
