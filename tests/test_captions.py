"""Caption files as users have them: BOMs, UTF-16, Latin-1/Windows-1252, NUL bytes, huge or
unreadable files. The encoding is detected; a file that cannot be used sets its image aside."""
from __future__ import annotations

import codecs
import json

import pytest

from conftest import run_cli_unprivileged
from lorakit.plugin_sdk import CaptionError, decode_caption, read_caption
from lorakit.plugin_sdk.testing import make_image, run_step


@pytest.mark.parametrize("data", [
    codecs.BOM_UTF8 + "café, smile".encode("utf-8"),
    codecs.BOM_UTF16_LE + "café, smile".encode("utf-16-le"),
    codecs.BOM_UTF16_BE + "café, smile".encode("utf-16-be"),
    codecs.BOM_UTF32_LE + "café, smile".encode("utf-32-le"),
    "café, smile".encode("utf-8"),
    "café, smile".encode("latin-1"),
    "café, smile".encode("cp1252"),
    b"caf\xc3\xa9\x00, smile\x00",
])
def test_caption_encodings_are_detected_and_nuls_and_boms_removed(data):
    assert decode_caption(data) == "café, smile"


def test_windows_1252_punctuation_is_read_as_such():
    assert decode_caption(b"\x93quoted\x94, 50\x80") == "\u201cquoted\u201d, 50\u20ac"


def test_a_utf16_caption_file_gives_clean_tags_in_the_dataset(tmp_path):
    make_image(tmp_path / "raw" / "a.png")
    (tmp_path / "raw" / "a.txt").write_bytes(codecs.BOM_UTF16_LE + "1girl, solo".encode("utf-16-le"))
    make_image(tmp_path / "raw" / "b.png")
    (tmp_path / "raw" / "b.txt").write_bytes(codecs.BOM_UTF8 + b"smile\x00, hat")
    res = run_step("alpha", tmp_path / "raw", tmp_path / "out")
    assert res.caption("a") == "1girl, solo"
    assert res.caption("b") == "smile, hat"


def test_an_oversized_caption_sets_its_image_aside_and_stays_out_of_the_manifest(tmp_path):
    make_image(tmp_path / "raw" / "big.png")
    (tmp_path / "raw" / "big.txt").write_text("tag, " * 40000)  # 200 KB
    make_image(tmp_path / "raw" / "ok.png")
    res = run_step("alpha", tmp_path / "raw", tmp_path / "out")
    assert [r.path for r in res.images] == ["ok.png"]
    reason = res.set_aside[0].reason
    assert "big.txt" in reason and "over the cap" in reason
    assert (tmp_path / "out" / "manifest.json").stat().st_size < 20000


def test_read_caption_honours_the_cap_argument(tmp_path):
    (tmp_path / "c.txt").write_text("x" * 100)
    assert read_caption(tmp_path / "c.txt", max_bytes=100) == "x" * 100
    with pytest.raises(CaptionError, match="101|100 bytes"):
        read_caption(tmp_path / "c.txt", max_bytes=99)


@pytest.mark.parametrize("source", ["folder", "kohya"])
def test_an_unreadable_caption_sets_its_image_aside_without_a_traceback(tmp_path, source):
    raw = tmp_path / "raw"
    folder = raw / "2_char" if source == "kohya" else raw
    make_image(folder / "a.png")
    make_image(folder / "b.png")
    (folder / "a.txt").write_text("secret")
    (folder / "a.txt").chmod(0o000)
    out = tmp_path / "out"
    proc = run_cli_unprivileged(source, str(raw), str(out))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    data = json.loads((out / "manifest.json").read_text())
    assert len(data["images"]) == 1
    assert "a.txt" in data["set_aside"][0]["reason"] and "cannot read caption file" in data["set_aside"][0]["reason"]
