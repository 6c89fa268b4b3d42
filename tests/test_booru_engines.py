"""The booru source against loopback mocks of Gelbooru 0.2 and Moebooru (gallery-dl as a subprocess)."""
from __future__ import annotations

from pathlib import Path

import pytest

from lorakit.plugin_sdk.testing import run_pipeline_dict

from booru_engines_server import MockBooruEngine
from booru_server import Post


def posts() -> list[Post]:
    return [
        Post(1, ["1girl", "solo", "long_hair"], ["hatsune_miku"], ["vocaloid"], ["artist_x"], ["highres"]),
        Post(2, ["1girl", "smile"], color=(0, 0, 200)),
        Post(3, ["1girl", "red_theme"], rating="e", ext="jpg", color=(0, 200, 0)),
        Post(4, ["2girls"], color=(50, 50, 50)),
    ]


@pytest.fixture(autouse=True)
def no_user_config(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "home" / ".config"))
    for var in ("LORAKIT_BOORU_USER_ID", "LORAKIT_BOORU_API_KEY", "LORAKIT_BOORU_LOGIN"):
        monkeypatch.delenv(var, raising=False)


def grab(tmp_path: Path, server, **params):
    params = {"site": server.root, "engine": server.engine, "tags": "1girl", "delay": 0, "retries": 0, **params}
    return run_pipeline_dict({"output": str(tmp_path / "out"), "sources": [{"booru": params}]}, tmp_path)


@pytest.mark.parametrize("engine", ["gelbooru_v02", "moebooru"])
def test_a_search_downloads_with_tag_categories_and_ratings(tmp_path, engine):
    with MockBooruEngine(engine, posts()) as server:
        res = grab(tmp_path, server)
        by_md5 = {p.md5: p for p in posts()}
        assert sorted(Path(r.path).stem for r in res.images) == sorted(p.md5 for p in posts() if "1girl" in p.all_tags)
        first = next(r for r in res.images if Path(r.path).stem == posts()[0].md5)
        # character, copyright, general; artist and meta tags stay out of the caption
        assert first.caption == "hatsune_miku, vocaloid, 1girl, solo, long_hair"
        assert first.meta["booru"]["tags"]["artist"] == ["artist_x"]
        explicit = next(r for r in res.images if by_md5[Path(r.path).stem].id == 3)
        assert explicit.meta["rating"] == "explicit" and explicit.path.endswith(".jpg")
        general = next(r for r in res.images if by_md5[Path(r.path).stem].id == 2)
        assert general.meta["rating"] == "general"  # these engines' "s" is safe
        post_page = "/post/show/" if engine == "moebooru" else "/index.php?page=post&s=view&id="
        assert general.meta["booru"]["post_url"] == f"{server.root}{post_page}2"
        assert len(server.paths("/data/")) == 3


@pytest.mark.parametrize("engine", ["gelbooru_v02", "moebooru"])
def test_a_second_run_asks_nothing(tmp_path, engine):
    with MockBooruEngine(engine, posts()) as server:
        grab(tmp_path, server)
        before = len(server.requests)
        res = grab(tmp_path, server)
        assert len(res.images) == 3 and len(server.requests) == before


@pytest.mark.parametrize("engine", ["gelbooru_v02", "moebooru"])
def test_limit_and_local_tags(tmp_path, engine):
    with MockBooruEngine(engine, posts()) as server:
        res = grab(tmp_path, server, limit=1)
        assert len(res.images) == 1
    with MockBooruEngine(engine, posts()) as server:
        res = grab(tmp_path / "b", server, local_tags="-rating:explicit")
        assert len(res.images) == 2
