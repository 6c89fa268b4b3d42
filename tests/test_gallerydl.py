"""gallerydl source: any gallery-dl URL, gallery-dl as a subprocess, its own config and credentials,
against loopback servers (a Danbooru instance declared in gallery-dl's config, Moebooru, direct links)."""
from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from lorakit.plugin_sdk import ParamError
from lorakit.plugin_sdk.testing import run_pipeline_dict
from lorakit.plugins.gallerydl import GalleryDLSource, file_name

from booru_engines_server import MockBooruEngine
from booru_server import MockDanbooru, Post


def posts() -> list[Post]:
    return [Post(1, ["1girl", "solo"], ["hatsune_miku"], ["vocaloid"]), Post(2, ["1girl", "smile"], color=(0, 0, 200)),
            Post(3, ["landscape"], color=(0, 200, 0))]


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """gallery-dl reads ~/.config/gallery-dl/config.json: point HOME at a test folder."""
    home = tmp_path / "home"
    (home / ".config" / "gallery-dl").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    for var in list(os.environ):
        if var.startswith("LORAKIT_GALLERY_DL_"):
            monkeypatch.delenv(var)
    return home


def user_config(home: Path, data: dict) -> Path:
    path = home / ".config" / "gallery-dl" / "config.json"
    path.write_text(json.dumps(data))
    return path


def danbooru_instance(root: str, **credentials) -> dict:
    """How a user declares a self-hosted Danbooru in gallery-dl's config (and logs in to it)."""
    return {"extractor": {"Danbooru": {"mybooru": {"root": root}}, "mybooru": dict(credentials)}}


def grab(tmp_path, urls, out="out", **params):
    params = {"url": urls, "delay": 0, "retries": 0, **params}
    return run_pipeline_dict({"output": str(tmp_path / out), "sources": [{"gallerydl": params}]}, tmp_path)


def test_a_site_from_the_users_gallery_dl_config_with_tags_as_captions(tmp_path, isolated_home):
    with MockDanbooru(posts()) as server:
        user_config(isolated_home, danbooru_instance(server.root))
        res = grab(tmp_path, [f"{server.root}/posts?tags=1girl"])
        assert sorted(r.caption for r in res.images) == ["1girl, smile", "hatsune_miku, vocaloid, 1girl, solo"]
        record = res.images[0]
        assert record.path.startswith("mybooru_") and record.meta["gallery_dl"]["category"] == "mybooru"
        assert record.meta["gallery_dl"]["url"] == f"{server.root}/posts?tags=1girl"


def test_credentials_from_the_users_config_reach_the_site(tmp_path, isolated_home):
    with MockDanbooru(posts()) as server:
        user_config(isolated_home, danbooru_instance(server.root, username="alice", password="s3cret"))
        grab(tmp_path, [f"{server.root}/posts?tags=solo"])
        wanted = "Basic " + base64.b64encode(b"alice:s3cret").decode()
        assert wanted in server.auth


def test_credentials_from_the_environment_reach_the_site_and_no_file_is_left(tmp_path, isolated_home, monkeypatch):
    monkeypatch.setenv("LORAKIT_GALLERY_DL_USERNAME", "bob")
    monkeypatch.setenv("LORAKIT_GALLERY_DL_PASSWORD", "k3y")
    with MockDanbooru(posts()) as server:
        user_config(isolated_home, danbooru_instance(server.root))
        res = grab(tmp_path, [f"{server.root}/posts?tags=solo"])
        assert "Basic " + base64.b64encode(b"bob:k3y").decode() in server.auth
    leftovers = [p for p in (res.output_dir / ".lorakit").rglob("*") if p.is_file() and b"k3y" in p.read_bytes()]
    assert leftovers == []


def test_an_explicit_config_file_replaces_the_usual_ones(tmp_path, isolated_home):
    with MockDanbooru(posts()) as server:
        cfg = tmp_path / "my-gallery-dl.json"
        cfg.write_text(json.dumps(danbooru_instance(server.root, username="carol", password="pw")))
        res = grab(tmp_path, [f"{server.root}/posts?tags=solo"], gallery_dl_config=str(cfg))
        assert len(res.images) == 1 and "Basic " + base64.b64encode(b"carol:pw").decode() in server.auth


def test_moebooru_instance_and_a_direct_link_in_one_run(tmp_path, isolated_home):
    with MockBooruEngine("moebooru", posts()) as moe:
        user_config(isolated_home, {"extractor": {"moebooru": {"mymoe": {"root": moe.root}}, "mymoe": {"tags": True}}})
        direct = f"{moe.root}/data/{posts()[2].md5}.png"
        res = grab(tmp_path, [f"{moe.root}/post?tags=1girl", direct])
        names = sorted(r.path for r in res.images)
        assert len(names) == 3
        assert any(n.startswith("directlink_") for n in names)
        miku = next(r for r in res.images if "hatsune_miku" in r.caption)
        assert miku.caption == "hatsune_miku, vocaloid, 1girl, solo"


def test_a_finished_url_is_not_asked_again(tmp_path, isolated_home):
    with MockDanbooru(posts()) as server:
        user_config(isolated_home, danbooru_instance(server.root))
        grab(tmp_path, [f"{server.root}/posts?tags=1girl"])
        before = len(server.requests)
        res = grab(tmp_path, [f"{server.root}/posts?tags=1girl"])
        assert len(res.images) == 2 and len(server.requests) == before


def test_limit_caps_each_url(tmp_path, isolated_home):
    with MockDanbooru(posts()) as server:
        user_config(isolated_home, danbooru_instance(server.root))
        res = grab(tmp_path, [f"{server.root}/posts?tags=1girl"], limit=1)
        assert len(res.images) == 1


def test_an_unsupported_url_is_explained(tmp_path):
    from lorakit.plugin_sdk import LorakitError

    with pytest.raises(LorakitError, match="does not support"):
        grab(tmp_path, ["http://127.0.0.1:9/nothing/here"])


def test_credentials_and_impolite_delays_are_refused_in_the_pipeline():
    with pytest.raises(ParamError, match="no credentials"):
        GalleryDLSource.configure({"url": "https://example.org/a", "password": "x"})
    with pytest.raises(ParamError, match="delay"):
        GalleryDLSource.configure({"url": "https://www.pixiv.net/en/users/1", "delay": 0.2})
    with pytest.raises(ParamError, match="url"):
        GalleryDLSource.configure({"url": "ftp://example.org/x"})


def test_file_names_from_the_network_are_made_safe():
    assert file_name("pixiv", "../../etc/passwd ü", "png") == "pixiv_.._.._etc_passwd__.png"


def test_gallery_dl_is_run_as_a_program_not_imported():
    import sys

    import lorakit.plugins.gallerydl  # noqa: F401

    assert "gallery_dl" not in sys.modules
