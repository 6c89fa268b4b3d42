"""The output folder is the user's too: lorakit deletes only what its ledger says it wrote, never
overwrites a file it did not write (unless --force), and refuses home and system folders."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from conftest import run_cli
from lorakit.host import get_host
from lorakit.pipeline import parse_pipeline
from lorakit.plugin_sdk import LorakitError, atomic_write_text, is_partial_file
from lorakit.plugin_sdk.testing import make_image, run_pipeline_dict
from lorakit.runner import Runner


def _raw(tmp_path: Path) -> Path:
    make_image(tmp_path / "raw" / "a.png", (20, 20), "red")
    make_image(tmp_path / "raw" / "b.png", (20, 30), "blue")
    (tmp_path / "raw" / "a.txt").write_text("one, two")
    return tmp_path / "raw"


def _data(tmp_path, **extra):
    return {"output": str(tmp_path / "out"), "sources": [{"folder": {"path": str(tmp_path / "raw")}}],
            "steps": ["alpha"], **extra}


def _run(tmp_path, force=False, **extra):
    pipeline = parse_pipeline(_data(tmp_path, **extra), get_host(), tmp_path)
    return Runner(pipeline, console=Console(quiet=True), workers=1, force=force).run()


def test_atomic_writes_use_lorakits_own_temporary_names(tmp_path):
    seen = []
    from lorakit.plugin_sdk import atomic_path

    with atomic_path(tmp_path / "x.txt") as tmp:
        seen.append(tmp.name)
        tmp.write_text("x")
    assert is_partial_file(seen[0]) and seen[0].startswith(".lorakit-tmp-")
    assert not is_partial_file(".tmp-draft.txt") and not is_partial_file(".lorakit-tmp-mine-forever.txt")


def test_users_tmp_files_survive_and_lorakits_partial_files_go(tmp_path):
    _raw(tmp_path)
    out = tmp_path / "out"
    (out / "keep").mkdir(parents=True)
    (out / ".tmp-draft.txt").write_text("my draft")
    (out / "keep" / ".tmp-2024-taxes.pdf").write_bytes(b"%PDF")
    (out / "keep" / ".lorakit-tmp-abcd1234.png").write_bytes(b"partial")  # what a killed run leaves
    _run(tmp_path)
    assert (out / ".tmp-draft.txt").read_text() == "my draft"
    assert (out / "keep" / ".tmp-2024-taxes.pdf").read_bytes() == b"%PDF"
    assert not (out / "keep" / ".lorakit-tmp-abcd1234.png").exists()


def test_a_users_file_with_a_name_the_run_wants_is_not_overwritten(tmp_path):
    _raw(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.png").write_bytes(b"my own picture")
    with pytest.raises(LorakitError, match=r"a\.png.*--force"):
        _run(tmp_path)
    assert (tmp_path / "out" / "a.png").read_bytes() == b"my own picture"
    assert not (tmp_path / "out" / "b.png").exists()  # nothing at all was written
    _run(tmp_path, force=True)
    assert (tmp_path / "out" / "a.png").read_bytes() != b"my own picture"


def test_a_foreign_manifest_is_not_overwritten(tmp_path):
    _raw(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "manifest.json").write_text('{"another": "tool"}')
    with pytest.raises(LorakitError, match="manifest.json"):
        _run(tmp_path)


def test_the_cli_refuses_to_overwrite_and_force_allows_it(tmp_path):
    _raw(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "b.png").write_bytes(b"mine")
    proc = run_cli("alpha", str(tmp_path / "raw"), str(tmp_path / "out"))
    assert proc.returncode == 1 and "--force" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "out" / "b.png").read_bytes() == b"mine"
    proc = run_cli("alpha", str(tmp_path / "raw"), str(tmp_path / "out"), "--force")
    assert proc.returncode == 0, proc.stderr


def test_a_file_already_holding_the_same_bytes_is_not_a_conflict(tmp_path):
    import shutil

    _raw(tmp_path)
    _run(tmp_path)
    shutil.rmtree(tmp_path / "out" / ".lorakit")  # the ledger is gone; the files are what lorakit would write
    _run(tmp_path)


def test_only_files_in_the_ledger_are_deleted_and_changed_ones_are_kept(tmp_path):
    raw = _raw(tmp_path)
    out = tmp_path / "out"
    _run(tmp_path)
    (out / "notes.txt").write_text("user notes")
    (raw / "b.png").unlink()
    (raw / "a.png").unlink()
    make_image(raw / "c.png")
    make_image(out / "b.png", (5, 5), "green")  # the user put their own picture over lorakit's
    _run(tmp_path)
    assert not (out / "a.png").exists()  # lorakit's, no longer wanted
    assert (out / "b.png").stat().st_size > 0 and (out / "notes.txt").read_text() == "user notes"


def test_a_tampered_ledger_cannot_delete_outside_the_output(tmp_path):
    _raw(tmp_path)
    _run(tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    ledger = tmp_path / "out" / ".lorakit" / "written.json"
    data = json.loads(ledger.read_text())
    data["../victim.txt"] = ["text", 0, 0]
    atomic_write_text(ledger, json.dumps(data))
    _run(tmp_path)
    assert victim.read_text() == "precious"


@pytest.mark.parametrize("output", ["~", "~/", "/", "/etc", "/usr", "/home", "/tmp"])
@pytest.mark.parametrize("source", ["folder", "kohya", "booru"])
def test_home_system_and_root_folders_are_refused_as_output(tmp_path, output, source):
    if source == "booru":
        entry = {"booru": {"tags": "solo"}}
    else:
        make_image(tmp_path / "src" / "1_x" / "a.png")
        entry = {source: {"path": str(tmp_path / "src")}}
    with pytest.raises(LorakitError, match="home folder|system folder|root of a drive"):
        parse_pipeline({"output": output, "sources": [entry]}, get_host(), tmp_path)


def test_validate_and_run_refuse_the_home_folder(tmp_path):
    home = tmp_path / "home" / "someone"
    home.mkdir(parents=True)
    _raw(tmp_path)
    (tmp_path / "pipeline.yaml").write_text(f"output: ~/\nsources:\n  - folder: {{path: {tmp_path / 'raw'}}}\n")
    for command in ("validate", "run"):
        proc = run_cli(command, str(tmp_path / "pipeline.yaml"), env_extra={"HOME": str(home)})
        assert proc.returncode != 0 and "home folder" in proc.stderr and "Traceback" not in proc.stderr
        assert "pipeline.yaml:1" in proc.stderr
    assert list(home.iterdir()) == []


def test_a_cache_dir_inside_a_source_is_refused(tmp_path):
    _raw(tmp_path)
    with pytest.raises(LorakitError, match="cache_dir .* inside the source"):
        run_pipeline_dict(_data(tmp_path, cache_dir=str(tmp_path / "raw" / "cache")), tmp_path)
    assert not (tmp_path / "raw" / "cache").exists()
