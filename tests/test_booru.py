"""Booru grabber against a mock Danbooru on loopback, through gallery-dl run as a subprocess."""
from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from lorakit.plugin_sdk import LorakitError, ParamError, StepContext
from lorakit.plugin_sdk.testing import run_pipeline_dict
from lorakit.plugins.booru import BooruStep, caption_tags, normalise_rating, parse_site

from booru_server import MockDanbooru, Post


def sample_posts() -> list[Post]:
    return [
        Post(1, ["1girl", "solo", "long_hair", "artist:someone"], ["hatsune_miku"], ["vocaloid"], ["artist_x"],
             ["highres", "commentary_request"]),
        Post(2, ["1girl", "smile", "o_o"], color=(0, 0, 200)),
        Post(3, ["1girl", "red_theme"], rating="e", ext="jpg", color=(0, 200, 0)),
        Post(4, ["2girls"], color=(50, 50, 50)),
    ]


@pytest.fixture
def server():
    with MockDanbooru(sample_posts()) as srv:
        yield srv


@pytest.fixture(autouse=True)
def no_user_config(tmp_path, monkeypatch):
    """Keep the developer's own gallery-dl config and credentials out of the tests."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "home" / ".config"))
    for var in ("LORAKIT_BOORU_LOGIN", "LORAKIT_BOORU_API_KEY"):
        monkeypatch.delenv(var, raising=False)


def grab(tmp_path: Path, root: str, out: str = "out", **params):
    params = {"site": root, "tags": "1girl", "delay": 0, "retries": 0, **params}
    return run_pipeline_dict({"output": str(tmp_path / out), "sources": [{"booru": params}]}, tmp_path)


def file_requests(server) -> list[str]:
    return server.paths("/data/")


def test_downloads_the_search_named_by_md5_with_tags_as_captions(tmp_path, server):
    res = grab(tmp_path, server.root)
    by_md5 = {p.md5: p for p in server.posts}
    names = sorted(Path(r.path).stem for r in res.images)
    assert names == sorted(p.md5 for p in server.posts if "1girl" in p.general)
    miku = res.by_name(by_md5[server.posts[0].md5].md5)
    # character, copyright, general; artist, meta and namespaced tags left out
    assert miku.caption == "hatsune_miku, vocaloid, 1girl, solo, long_hair"
    assert [t["name"] for t in miku.tags] == ["hatsune_miku", "vocaloid", "1girl", "solo", "long_hair"]


def test_post_metadata_is_kept_in_the_manifest(tmp_path, server):
    res = grab(tmp_path, server.root)
    post = server.posts[2]
    rec = res.by_name(post.md5)
    booru = rec.meta["booru"]
    assert booru["id"] == 3 and booru["md5"] == post.md5 and booru["rating"] == "explicit"
    assert booru["score"] == 13 and booru["source"] == "https://example.org/art/3"
    assert booru["post_url"] == f"{server.root}/posts/3" and rec.source == f"{server.root}/posts/3"
    assert booru["tags"]["general"] == ["1girl", "red_theme"]
    assert rec.meta["rating"] == "explicit"
    assert rec.path == f"{post.md5}.jpg" and (rec.width, rec.height) == (67, 48)


def test_limit_caps_the_number_of_pictures(tmp_path, server):
    res = grab(tmp_path, server.root, limit=2)
    assert len(res.images) == 2
    assert len(file_requests(server)) == 2


def test_a_second_run_makes_no_request_at_all(tmp_path, server):
    first = grab(tmp_path, server.root)
    hits = len(server.requests)
    second = grab(tmp_path, server.root)
    assert len(server.requests) == hits
    assert [r.sha256 for r in second.images] == [r.sha256 for r in first.images]


def test_already_downloaded_files_are_not_fetched_again(tmp_path, server):
    grab(tmp_path, server.root, limit=2)
    assert len(file_requests(server)) == 2
    res = grab(tmp_path, server.root, limit=3)  # a new search: asks the API, fetches only the third file
    assert len(res.images) == 3
    assert len(file_requests(server)) == 3
    assert len(server.paths("/posts.json")) == 2


def test_refresh_asks_the_site_again_but_downloads_nothing_already_here(tmp_path, server):
    grab(tmp_path, server.root)
    files = len(file_requests(server))
    server.posts.append(Post(9, ["1girl", "new_post"], color=(9, 9, 9)))
    res = grab(tmp_path, server.root, refresh=True)
    assert len(server.paths("/posts.json")) == 2
    assert len(file_requests(server)) == files + 1  # only the new post
    assert server.posts[-1].md5 in {Path(r.path).stem for r in res.images}


def test_categories_choose_and_order_the_caption_tags(tmp_path, server):
    res = grab(tmp_path, server.root, categories="general, artist")
    assert res.caption(server.posts[0].md5) == "1girl, solo, long_hair, artist_x"


def test_spaces_style_and_escaped_parentheses(tmp_path):
    post = {"tag_string_general": "long_hair o_o", "tag_string_character": "ganyu_(genshin_impact)"}
    tags = caption_tags(post, ["character", "general"], "spaces", True)
    assert list(tags) == ["ganyu \\(genshin impact\\)", "long hair", "o_o"]


def test_sites_without_categories_give_all_tags_as_general():
    post = {"tags": "1girl artist:someone rating:safe re:zero solo"}
    assert list(caption_tags(post, ["general"], "underscores", False)) == ["1girl", "re:zero", "solo"]


def test_videos_are_skipped(tmp_path):
    posts = [Post(1, ["1girl"]), Post(2, ["1girl"], ext="mp4", body=b"\x00\x00\x00\x18ftypmp42 not really")]
    with MockDanbooru(posts) as srv:
        res = grab(tmp_path, srv.root)
        assert [Path(r.path).stem for r in res.images] == [posts[0].md5]
        assert file_requests(srv) == [f"/data/{posts[0].md5}.png"]


def test_a_damaged_download_is_deleted_and_left_out(tmp_path, server):
    bad = server.posts[1]
    server.corrupt.add(bad.md5)
    res = grab(tmp_path, server.root)
    assert bad.md5 not in {Path(r.path).stem for r in res.images}
    assert any("does not match its md5" in m for s in res.stats for m in s.messages)
    server.corrupt.clear()
    again = grab(tmp_path, server.root)  # the search did not finish cleanly: asks again, fetches it
    assert bad.md5 in {Path(r.path).stem for r in again.images}


@pytest.mark.parametrize("status, words", [
    (500, ["HTTP 500", "/posts.json", "Try again later"]),
    (429, ["rate limited", "HTTP 429", "delay"]),
    (403, ["access refused", "LORAKIT_BOORU_LOGIN"]),
    (422, ["refused the search", "two tags"]),
])
def test_http_errors_are_reported_clearly(tmp_path, server, status, words):
    server.fail_with = status
    with pytest.raises(LorakitError) as err:
        grab(tmp_path, server.root)
    for word in words:
        assert word in str(err.value)
    assert server.root in str(err.value) and "1girl" in str(err.value)


def test_no_results_is_reported_clearly(tmp_path, server):
    with pytest.raises(LorakitError, match="no posts on .* match 'no_such_tag'"):
        grab(tmp_path, server.root, tags="no_such_tag")


def test_an_unreachable_site_is_reported_clearly(tmp_path):
    with MockDanbooru([]) as srv:
        root = srv.root
    with pytest.raises(LorakitError, match="cannot reach the site"):
        grab(tmp_path, root)


def test_credentials_in_the_pipeline_are_refused(tmp_path, server):
    for key in ("api_key", "password", "login", "username"):
        with pytest.raises(ParamError) as err:
            grab(tmp_path, server.root, **{key: "hunter2"})
        assert "LORAKIT_DANBOORU_API_KEY" in str(err.value) and "hunter2" not in str(err.value)


def test_credentials_from_the_environment_reach_the_site_and_no_file(tmp_path, server, monkeypatch):
    monkeypatch.setenv("LORAKIT_BOORU_LOGIN", "alice")
    monkeypatch.setenv("LORAKIT_BOORU_API_KEY", "s3cret-key")
    grab(tmp_path, server.root)
    expected = "Basic " + base64.b64encode(b"alice:s3cret-key").decode()
    assert server.auth[0] == expected
    leaked = [p for p in (tmp_path / "out").rglob("*") if p.is_file() and b"s3cret-key" in p.read_bytes()]
    assert leaked == []


def test_credentials_from_gallery_dl_own_config(tmp_path, server):
    config = tmp_path / "home" / ".config" / "gallery-dl" / "config.json"
    config.parent.mkdir(parents=True)
    config.write_text(json.dumps({"extractor": {
        "Danbooru": {"mybooru": {"root": server.root + "/"}},
        "mybooru": {"username": "bob", "password": "from-config", "postprocessors": [{"name": "zip"}]},
    }}))
    res = grab(tmp_path, server.root)
    assert server.auth[0] == "Basic " + base64.b64encode(b"bob:from-config").decode()
    assert len(res.images) == 3  # the user's other settings (a zip postprocessor) did not leak in


def test_less_than_a_second_between_requests_is_refused_for_public_sites():
    with pytest.raises(ParamError, match="delay"):
        BooruStep.configure({"site": "danbooru", "tags": "1girl", "delay": 0.2})
    assert BooruStep.configure({"site": "danbooru", "tags": "1girl"}).options.delay == 1.0


def test_requests_are_at_least_the_delay_apart(tmp_path, server):
    grab(tmp_path, server.root, delay=1.0, limit=2)
    times = [t for t, _ in server.requests]
    assert len(times) == 3
    assert min(b - a for a, b in zip(times, times[1:])) >= 0.9


def test_site_names_and_urls():
    assert parse_site("danbooru").root == "https://danbooru.donmai.us"
    assert parse_site("safebooru").engine == "gelbooru_v02"
    assert parse_site("https://yande.re/").category == "yandere"
    custom = parse_site("https://booru.example.org/", "moebooru")
    assert custom.custom and custom.engine == "moebooru" and custom.root == "https://booru.example.org"
    assert custom.search_url("a b") == "https://booru.example.org/post?tags=a%20b"
    with pytest.raises(ParamError, match="site"):
        BooruStep.configure({"site": "not a site", "tags": "x"})
    with pytest.raises(ParamError, match="categories"):
        BooruStep.configure({"site": "danbooru", "tags": "x", "categories": ["general", "colour"]})


def test_the_command_line_downloads_into_a_dataset(tmp_path, server):
    from click.testing import CliRunner

    from lorakit.cli import cli

    out = tmp_path / "cli-out"
    result = CliRunner().invoke(cli, ["booru", str(out), "--site", server.root, "--tags", "1girl", "--limit", "2",
                                      "--delay", "0"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["images"]) == 2
    server.fail_with = 500
    failed = CliRunner().invoke(cli, ["booru", str(tmp_path / "cli-2"), "--site", server.root, "--tags", "solo",
                                      "--delay", "0", "--retries", "0"])
    assert failed.exit_code != 0 and "HTTP 500" in failed.output and "Traceback" not in failed.output


def test_gallery_dl_is_run_as_a_program_not_imported(tmp_path, server):
    import sys

    sys.modules.pop("gallery_dl", None)
    grab(tmp_path, server.root, limit=1)
    assert "gallery_dl" not in sys.modules


def test_the_step_is_a_source_registered_through_the_entry_point():
    from lorakit.host import load_host

    assert load_host().steps["booru"] is BooruStep
    ctx_fields = StepContext.__dataclass_fields__
    assert "work_dir" in ctx_fields  # downloads live in the persistent work folder


def test_ratings_use_danbooru_words_whatever_the_engine():
    assert normalise_rating("s", "danbooru") == "sensitive"
    assert normalise_rating("s", "moebooru") == "general"  # Moebooru's s is "safe"
    assert normalise_rating("e", "gelbooru_v02") == "explicit"
    assert normalise_rating("questionable", "gelbooru") == "questionable"


def test_local_tags_filter_posts_on_this_machine(tmp_path, server):
    res = grab(tmp_path, server.root, tags="1girl", local_tags="-smile -rating:explicit")
    assert {Path(r.path).stem for r in res.images} == {server.posts[0].md5}
    assert server.paths("/posts.json")[0].startswith("/posts.json?tags=1girl&")  # the site saw one tag
    assert len(file_requests(server)) == 1  # filtered posts were never downloaded
    res = grab(tmp_path, server.root, out="out2", tags="1girl", local_tags="solo")
    assert {Path(r.path).stem for r in res.images} == {server.posts[0].md5}


def test_local_tags_accept_only_plain_tags_and_ratings():
    with pytest.raises(ParamError, match="local_tags"):
        BooruStep.configure({"site": "danbooru", "tags": "1girl", "local_tags": "order:score"})
    with pytest.raises(ParamError, match="local_tags"):
        BooruStep.configure({"site": "danbooru", "tags": "1girl", "local_tags": "rating:spicy"})


def test_booru_tags_and_a_tagger_combine_in_one_pipeline(tmp_path, server):
    pytest.importorskip("onnx")
    from test_wd14 import build_tagger

    model = build_tagger(tmp_path / "tagger", size=32)
    res = run_pipeline_dict({
        "output": str(tmp_path / "out"),
        "sources": [{"booru": {"site": server.root, "tags": "1girl", "delay": 0, "retries": 0}}],
        "steps": [{"wd14": {"model": str(model), "combine": "append", "device": "cpu"}}],
    }, tmp_path)
    rec = res.by_name(server.posts[0].md5)  # a red picture
    names = [t["name"] for t in rec.tags]
    assert names[:5] == ["hatsune_miku", "vocaloid", "1girl", "solo", "long_hair"]  # booru tags first, unscored
    assert all(t["score"] is None for t in rec.tags[:5])
    assert "red_theme" in names and rec.tags[names.index("red_theme")]["score"] >= 0.35  # scored by the tagger
    assert rec.meta["booru"]["id"] == 1 and rec.meta["rating"] == "general"


def test_upper_case_extensions_are_handled(tmp_path):
    posts = [Post(1, ["1girl"], ext="JPG")]
    with MockDanbooru(posts) as srv:
        res = grab(tmp_path, srv.root)
        assert [r.path for r in res.images] == [f"{posts[0].md5}.jpg"]
        again = grab(tmp_path, srv.root, refresh=True)
        assert len(again.images) == 1 and len(file_requests(srv)) == 1
