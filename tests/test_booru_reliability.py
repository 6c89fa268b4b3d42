"""booru under hostile or unlucky conditions, against the loopback mock: huge and endless files,
a silent API, files on other hosts, credentials in URLs and parameters, a killed run's config."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from booru_server import MockDanbooru, Post
from lorakit.plugin_sdk import LorakitError, ParamError
from lorakit.plugin_sdk.testing import run_pipeline_dict
from lorakit.plugins.booru import BooruStep, scrub


@pytest.fixture(autouse=True)
def no_user_config(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "home" / ".config"))
    for var in ("LORAKIT_BOORU_LOGIN", "LORAKIT_BOORU_API_KEY"):
        monkeypatch.delenv(var, raising=False)


def _posts():
    return [Post(1, ["1girl", "solo"]), Post(2, ["1girl", "smile"], color=(0, 0, 200)),
            Post(3, ["1girl", "hat"], color=(0, 200, 0))]


def grab(tmp_path: Path, root: str, **params):
    params = {"site": root, "tags": "1girl", "delay": 0, "retries": 0, **params}
    return run_pipeline_dict({"output": str(tmp_path / "out"), "sources": [{"booru": params}]}, tmp_path)


def _work_files(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "out" / ".lorakit" / "steps" / "booru").rglob("*") if p.is_file())


def test_a_file_claiming_2_gb_is_set_aside_and_the_rest_downloaded(tmp_path):
    with MockDanbooru(_posts()) as server:
        server.huge.add(server.posts[0].md5)
        res = grab(tmp_path, server.root)
    assert len(res.images) == 2
    assert "over max_file_mb=50" in res.set_aside[0].reason and "post 1" in res.set_aside[0].reason
    assert not [n for n in _work_files(tmp_path) if n.endswith(".part") or n.startswith(".lorakit-tmp-")]


def test_a_file_that_never_finishes_is_set_aside_after_the_timeout(tmp_path):
    with MockDanbooru(_posts()) as server:
        server.drip.add(server.posts[1].md5)
        res = grab(tmp_path, server.root, timeout=1)
    assert len(res.images) == 2
    assert "longer than timeout=1 s" in res.set_aside[0].reason
    assert not [n for n in _work_files(tmp_path) if n.startswith(".lorakit-tmp-")]


def test_an_api_that_never_finishes_its_answer_does_not_hang_the_run(tmp_path):
    with MockDanbooru(_posts()) as server:
        server.api_drip = True
        with pytest.raises(LorakitError, match="did not answer within 1 s"):
            grab(tmp_path, server.root, timeout=1)


def test_files_on_another_host_are_not_downloaded_unless_allowed(tmp_path):
    with MockDanbooru(_posts()) as server:
        server.file_root = server.root.replace("127.0.0.1", "localhost")
        with pytest.raises(LorakitError, match="not one of the site's hosts"):
            grab(tmp_path, server.root)
        assert not server.paths("/data/")
        res = grab(tmp_path, server.root, allowed_hosts=["localhost"])
    assert len(res.images) == 3


def test_credentials_in_the_site_url_are_refused_without_echoing_them():
    with pytest.raises(ParamError) as err:
        BooruStep.configure({"site": "https://me:hunter22@booru.example.org", "tags": "x"})
    assert "hunter22" not in str(err.value) and "user:password@" in str(err.value)


@pytest.mark.parametrize("key", ["credentials", "session", "key", "api_key", "password"])
def test_credential_parameters_are_refused_without_echoing_their_value(key):
    with pytest.raises(ParamError) as err:
        BooruStep.configure({"site": "danbooru", "tags": "x", key: "hunter22-secret"})
    assert "hunter22" not in str(err.value)


def test_errors_never_show_secrets():
    text = ("HTTP 500 for 'https://u:pw@gelbooru.com/index.php?page=dapi&api_key=abcdef123&user_id=42&tags=x'"
            " with login hunter22")
    clean = scrub(text, ["hunter22"])
    assert "abcdef123" not in clean and "pw@" not in clean and "hunter22" not in clean and "user_id=42" not in clean


def test_the_api_key_never_reaches_the_manifest(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_BOORU_LOGIN", "someone")
    monkeypatch.setenv("LORAKIT_BOORU_API_KEY", "hunter22-secret")
    with MockDanbooru(_posts()) as server:
        grab(tmp_path, server.root)
    assert "hunter22" not in (tmp_path / "out" / "manifest.json").read_text()
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file() and b"hunter22" in p.read_bytes()]


def test_a_killed_runs_config_with_the_api_key_is_removed_at_the_next_start(tmp_path):
    env = {**os.environ, "HOME": str(tmp_path / "home"), "LORAKIT_BOORU_LOGIN": "someone",
           "LORAKIT_BOORU_API_KEY": "hunter22-secret", "COLUMNS": "200"}
    tmp_root = tmp_path / "out" / ".lorakit" / "tmp" / "booru"
    with MockDanbooru(_posts()) as server:
        server.api_drip = True
        command = [sys.executable, "-m", "lorakit", "booru", str(tmp_path / "out"), "--site", server.root,
                   "--tags", "1girl", "--delay", "0", "--timeout", "60"]
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not list(tmp_root.glob("booru-*/gallery-dl.json")):
            time.sleep(0.2)
        assert list(tmp_root.glob("booru-*/gallery-dl.json")), "gallery-dl never started"
        os.killpg(proc.pid, signal.SIGKILL)  # lorakit and gallery-dl die at once: nobody cleans up
        proc.wait()
        leftover = list(tmp_root.glob("booru-*/gallery-dl.json"))
        assert leftover and b"hunter22" in leftover[0].read_bytes()
        server.api_drip = False
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert not leftover[0].exists()
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file() and b"hunter22" in p.read_bytes()]
    assert len(json.loads((tmp_path / "out" / "manifest.json").read_text())["images"]) == 3


@pytest.mark.parametrize("site,host,ok", [
    ("https://danbooru.donmai.us", "cdn.donmai.us", True),
    ("https://danbooru.donmai.us", "evil.us", False),
    ("https://booru.example.co.uk", "img.example.co.uk", True),
    ("https://booru.example.co.uk", "other.co.uk", False),
    ("https://booru.example.co.uk", "co.uk", False),
    ("https://www.example.com.au", "cdn.example.com.au", True),
    ("https://www.example.com.au", "attacker.com.au", False),
    ("https://127.0.0.1:8080", "127.0.0.2", False),
])
def test_files_may_come_from_the_sites_own_domain_only(site, host, ok):
    from types import SimpleNamespace

    from lorakit.plugins.booru import _Downloader, parse_site

    downloader = _Downloader(parse_site(site), SimpleNamespace(allowed_hosts=[]))
    assert downloader.allowed(f"https://{host}/data/1.png") is ok
