"""A worker process killed for real (SIGKILL, like the OOM killer) never empties a dataset: the pool
is restarted and the lost images retried; an image that kills its worker again is set aside, named;
a step that loses most of its images stops the run and leaves the previous dataset as it was."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorakit.plugin_sdk import LorakitError
from lorakit.plugin_sdk.testing import make_image, run_pipeline_dict
from steps_for_tests import KillWorker


def _raw(tmp_path: Path, names: list[str]) -> Path:
    raw = tmp_path / "raw"
    for i, name in enumerate(names):
        make_image(raw / f"{name}.png", (8 + i % 5, 8), (i * 7 % 256, 0, 0))
    return raw


def _run(tmp_path, raw, params, workers=2):
    (tmp_path / "marks").mkdir(exist_ok=True)
    data = {"output": str(tmp_path / "out"), "sources": [{"folder": {"path": str(raw)}}],
            "steps": [{"killworker": {"marks": str(tmp_path / "marks"), **params}}]}
    return run_pipeline_dict(data, tmp_path, [KillWorker], workers=workers)


def test_images_of_a_killed_worker_are_retried_and_none_is_lost(tmp_path):
    names = [f"img{i:02d}" for i in range(22)] + ["once_a", "once_b"]
    res = _run(tmp_path, _raw(tmp_path, names), {})
    assert len(res.images) == len(names) and not res.set_aside
    assert not res.run.crashed
    assert all("survived" in r.caption for r in res.images)
    assert any("restarted" in m for s in res.stats for m in s.messages)


def test_an_image_that_kills_its_worker_twice_is_set_aside_by_name(tmp_path):
    names = [f"img{i:02d}" for i in range(23)] + ["poison"]
    res = _run(tmp_path, _raw(tmp_path, names), {"poison": "poison"})
    assert len(res.images) == 23
    assert [r.name for r in res.set_aside] == ["poison"]
    assert "poison.png" in res.set_aside[0].reason and "killed its worker process twice" in res.set_aside[0].reason
    assert res.run.crashed == [str(tmp_path / "raw" / "poison.png")]


def test_a_step_that_kills_every_worker_keeps_the_previous_dataset(tmp_path):
    raw = _raw(tmp_path, [f"img{i:02d}" for i in range(20)])
    first = _run(tmp_path, raw, {})
    before = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file() and ".lorakit" not in p.parts}
    assert len(first.images) == 20
    with pytest.raises(LorakitError, match="failed on 20 of 20 images.*left as it was"):
        _run(tmp_path, raw, {"always": True})
    after = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file() and ".lorakit" not in p.parts}
    assert after == before


_CLI_WITH_KILLWORKER = """
import sys
sys.path.insert(0, sys.argv.pop(1))
import lorakit.cli, lorakit.host
from lorakit.plugin_sdk.testing import _host_with
from steps_for_tests import KillWorker
host = _host_with([KillWorker])
lorakit.host.get_host = lorakit.cli.get_host = lambda: host
lorakit.cli.main()
"""


def test_the_cli_exit_code_says_the_run_failed_when_an_image_crashed_its_worker(tmp_path):
    import subprocess
    import sys

    names = [f"img{i:02d}" for i in range(23)] + ["poison"]
    _raw(tmp_path, names)
    (tmp_path / "marks").mkdir()
    (tmp_path / "pipeline.yaml").write_text(json.dumps({
        "output": "out", "workers": 2, "sources": [{"folder": {"path": "raw"}}],
        "steps": [{"killworker": {"poison": "poison", "marks": str(tmp_path / "marks")}}]}))
    proc = subprocess.run([sys.executable, "-c", _CLI_WITH_KILLWORKER, str(Path(__file__).parent), "run",
                           str(tmp_path / "pipeline.yaml")], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "COLUMNS": "200"})
    assert proc.returncode == 1, proc.stderr
    assert "poison.png" in proc.stderr and "killed a worker process" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(json.loads((tmp_path / "out" / "manifest.json").read_text())["images"]) == 23
