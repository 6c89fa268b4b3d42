"""The review page's server: the API, thumbnails, and the security rules (tested over HTTP with
Starlette's test client, and through the real `lorakit review` process)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

from lorakit.review.app import create_app
from lorakit.review.security import MAX_BODY, allowed_hosts

from conftest import run_cli
from review_dataset import run_project, write_project

HOST = "127.0.0.1:8765"


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A pipeline of 40 generated pictures, run once: two subsets, duplicates, masks, a broken file."""
    folder = tmp_path_factory.mktemp("review")
    pipeline = write_project(folder, 40)
    run_project(pipeline)
    return pipeline


def client_for(pipeline: Path, *, token=True, hosts=None) -> TestClient:
    app = create_app(pipeline.parent / "dataset", pipeline, hosts=hosts or allowed_hosts("127.0.0.1", 8765))
    client = TestClient(app, base_url=f"http://{HOST}")
    client.app_ = app
    if token:
        client.cookies.set("lorakit_review", app.token)
    return client


def post(client: TestClient, path: str, body, **headers):
    base = {"Content-Type": "application/json", "X-CSRF-Token": client.app_.csrf_token,
            "Origin": f"http://{HOST}", "Sec-Fetch-Site": "same-origin"}
    base.update(headers)
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return client.post(path, content=data, headers={k: v for k, v in base.items() if v is not None})


# ----- what the page shows --------------------------------------------------------------------------
def test_summary_lists_subsets_with_steps_per_epoch_tags_buckets_and_set_aside_reasons(project):
    s = client_for(project).get("/api/summary").json()
    subsets = {x["name"]: x for x in s["subsets"]}
    assert set(subsets) == {"outfit_a", "outfit_b"}
    assert subsets["outfit_a"]["repeats"] == 2 and subsets["outfit_b"]["repeats"] == 3
    for x in subsets.values():
        assert x["steps_per_epoch"] == x["images"] * x["repeats"]
    assert s["images"] == sum(x["images"] for x in subsets.values())
    tags = dict(s["tags"])
    assert tags["1girl"] == s["images"] and tags["solo"] == s["images"]
    assert sum(n for _, n in s["buckets"]) == s["images"]
    steps = dict(s["aside_steps"])
    assert steps["dedupe"] == 3 and steps["source"] == 1
    assert s["masks"] > 0 and s["masks_rejected"] > 0
    assert s["dedupe_groups"] == 3


def test_gallery_pages_through_every_image(project):
    c = client_for(project)
    total = c.get("/api/summary").json()["images"]
    first = c.get("/api/images", params={"limit": 25}).json()
    second = c.get("/api/images", params={"limit": 25, "offset": 25}).json()
    assert first["total"] == total and len(first["items"]) == 25
    assert len(second["items"]) == total - 25
    assert not {i["id"] for i in first["items"]} & {i["id"] for i in second["items"]}


def ids(c, **params) -> set[str]:
    r = c.get("/api/ids", params=params)
    assert r.status_code == 200, r.text
    return set(r.json()["ids"])


def captions(c, **params) -> list[str]:
    return [i["caption"] for i in c.get("/api/images", params={**params, "limit": 500}).json()["items"]]


def test_tag_filters_combine_with_and_or_and_not(project):
    c = client_for(project)
    long_hair = ids(c, tags="long_hair")
    red = ids(c, tags="red_dress")
    assert long_hair and red
    assert ids(c, tags=["long_hair", "red_dress"], mode="and") == long_hair & red
    assert ids(c, tags=["long_hair", "red_dress"], mode="or") == long_hair | red
    assert ids(c, tags="long_hair", **{"not": "red_dress"}) == long_hair - red
    assert all("long_hair" in cap and "red_dress" not in cap
               for cap in captions(c, tags="long_hair", **{"not": "red_dress"}))


def test_subset_text_bucket_mask_and_edited_filters(project):
    c = client_for(project)
    items = c.get("/api/images", params={"limit": 500}).json()["items"]
    assert {i["subset"] for i in c.get("/api/images", params={"subset": "outfit_b", "limit": 500}).json()["items"]} == {"outfit_b"}
    assert all("blue" in cap for cap in captions(c, text="BLUE_dr"))
    bucket = items[0]["bucket"]
    assert ids(c, bucket=bucket) == {i["id"] for i in items if i["bucket"] == bucket}
    rejected = ids(c, mask="rejected")
    assert rejected and rejected == {i["id"] for i in items if i["mask_rejected"]}
    assert ids(c, mask="present") == {i["id"] for i in items if i["mask"]}
    assert ids(c, edited="no") == {i["id"] for i in items}
    assert ids(c, edited="yes") == set()


def test_set_aside_filter_by_step_and_reason_and_dedupe_groups(project):
    c = client_for(project)
    aside = c.get("/api/images", params={"status": "aside"}).json()["items"]
    assert {i["aside_step"] for i in aside} == {"dedupe", "source"}
    dupes = c.get("/api/images", params={"status": "aside", "aside_step": "dedupe"}).json()["items"]
    assert len(dupes) == 3 and all("duplicate" in i["aside_reason"] for i in dupes)
    broken = c.get("/api/images", params={"status": "aside", "aside_reason": "truncated"}).json()["items"]
    assert [i["name"] for i in broken] == ["broken0"]
    groups = c.get("/api/dedupe").json()["groups"]
    assert len(groups) == 3
    g = groups[0]
    assert g["kept_id"] and g["members"][0]["distance"] == 0 and g["members"][0]["exact"]
    assert ids(c, status="all", dedupe=0) == {g["kept_id"], g["members"][0]["id"]}


def test_large_view_has_each_tag_with_its_score_and_the_steps(project):
    c = client_for(project)
    first = c.get("/api/images", params={"limit": 1}).json()["items"][0]
    d = c.get(f"/api/image/{first['id']}").json()
    assert [t["name"] for t in d["tags"]] == [t.strip() for t in d["caption"].split(",")]
    assert all("score" in t for t in d["tags"])
    assert d["steps"][:2] == ["folder", "convert"] and d["has_source"]


def test_the_large_view_shows_the_tagger_score_of_each_tag(fresh):
    manifest_path = fresh.parent / "dataset" / "manifest.json"
    data = json.loads(manifest_path.read_text(encoding="utf-8"))
    record = data["images"][0]
    record["tags"] = [{"name": t, "score": 0.25 + i / 10} for i, t in enumerate(record["caption"].split(", "))]
    record["tags"][0]["score"] = None  # a tag from a caption file
    manifest_path.write_text(json.dumps(data), encoding="utf-8")
    c = client_for(fresh)
    item = next(i for i in c.get("/api/images", params={"limit": 500}).json()["items"]
                if i["name"] == Path(record["path"]).stem)
    tags = c.get(f"/api/image/{item['id']}").json()["tags"]
    assert tags == [{"name": t["name"], "score": t["score"]} for t in record["tags"]]


def test_thumbnails_are_made_once_and_kept_in_the_dataset_store(project):
    c = client_for(project)
    first = c.get("/api/images", params={"limit": 1}).json()["items"][0]
    r = c.get(f"/media/thumb/{first['id']}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg" and r.content[:2] == b"\xff\xd8"
    cached = list((project.parent / "dataset" / ".lorakit" / "review" / "thumbs").rglob("*.jpg"))
    assert cached
    stamps = {p: p.stat().st_mtime_ns for p in cached}
    again = client_for(project).get(f"/media/thumb/{first['id']}")
    assert again.content == r.content
    assert {p: p.stat().st_mtime_ns for p in cached} == stamps


def test_media_serves_the_image_its_mask_and_its_source(project):
    c = client_for(project)
    item = c.get("/api/images", params={"mask": "present", "limit": 1}).json()["items"][0]
    dataset = project.parent / "dataset"
    record = next(r for r in json.loads((dataset / "manifest.json").read_text())["images"]
                  if Path(r["path"]).stem == item["name"] and r["subset"] == item["subset"])
    assert c.get(f"/media/image/{item['id']}").content == (dataset / record["path"]).read_bytes()
    assert c.get(f"/media/mask/{item['id']}").content == (dataset / record["mask"]).read_bytes()
    assert c.get(f"/media/source/{item['id']}").content == Path(record["source"]).read_bytes()


# ----- security ---------------------------------------------------------------------------------------
def test_nothing_is_served_without_the_access_token(project):
    c = client_for(project, token=False)
    for path in ("/", "/api/summary", "/assets/app.js"):
        r = c.get(path)
        assert r.status_code == 401 and "token" in r.json()["error"]
    c.cookies.set("lorakit_review", "wrong")
    assert c.get("/api/summary").status_code == 401


def test_the_token_in_the_url_becomes_a_strict_cookie_and_leaves_the_url(project):
    c = client_for(project, token=False)
    r = c.get(f"/?token={c.app_.token}", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    page = c.get("/")
    assert page.status_code == 200 and c.app_.csrf_token in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY"


def test_a_foreign_host_header_is_refused(project):
    c = client_for(project)
    r = c.get("/api/summary", headers={"Host": "attacker.example:8765"})
    assert r.status_code == 403 and "DNS rebinding" in r.json()["error"]
    assert c.get("/api/summary", headers={"Host": "localhost:8765"}).status_code == 200
    assert c.get("/api/summary", headers={"Host": "127.0.0.1:9999"}).status_code == 403


@pytest.mark.parametrize("headers, status, words", [
    ({"Sec-Fetch-Site": "cross-site"}, 403, "cross-site"),
    ({"Sec-Fetch-Site": "same-site"}, 403, "cross-site"),
    ({"Origin": "http://attacker.example"}, 403, "cross-origin"),
    ({"Origin": "null"}, 403, "cross-origin"),
    ({"X-CSRF-Token": "guess"}, 403, "CSRF"),
    ({"X-CSRF-Token": None}, 403, "CSRF"),
    ({"Content-Type": "text/plain"}, 415, "JSON"),
    ({"Content-Type": "application/x-www-form-urlencoded"}, 415, "JSON"),
])
def test_cross_site_and_unguarded_posts_are_refused(project, headers, status, words):
    c = client_for(project)
    before = sorted(p.name for p in project.parent.iterdir())
    r = post(c, "/api/edit", {"op": "exclude", "target": {"filter": {}}}, **headers)
    assert r.status_code == status and words in r.json()["error"]
    assert sorted(p.name for p in project.parent.iterdir()) == before  # no curation file was written


def test_an_oversized_body_is_refused(project):
    c = client_for(project)
    r = post(c, "/api/edit", b'{"op": "exclude", "note": "' + b"x" * MAX_BODY + b'"}')
    assert r.status_code == 413


def test_only_files_the_manifest_names_are_served(project):
    c = client_for(project)
    item = c.get("/api/images", params={"limit": 1}).json()["items"][0]
    for path in ("/media/image/../../manifest.json", "/media/image/..%2F..%2Fmanifest.json",
                 "/media/image/%2Fetc%2Fpasswd", "/media/image/0000000000000000",
                 f"/media/file/{item['id']}", "/assets/..%2Fapp.py", "/assets/app.py", "/etc/passwd"):
        r = c.get(path)
        assert r.status_code in (400, 404), path
        assert "error" in r.json(), path
    rejected = c.get("/api/images", params={"mask": "missing", "limit": 1}).json()["items"][0]
    assert rejected["mask_view"]  # the mask the quality check rejected is kept, so it can be looked at
    assert c.get(f"/media/mask/{rejected['id']}").status_code == 200
    no_mask = next(i for i in c.get("/api/images", params={"status": "aside", "limit": 500}).json()["items"]
                   if not i["mask_view"])
    assert c.get(f"/media/mask/{no_mask['id']}").status_code == 404


@pytest.mark.parametrize("params", [
    {"mode": "xor"}, {"mask": "maybe"}, {"status": "gone"}, {"offset": "-1"}, {"limit": "0"},
    {"limit": "many"}, {"dedupe": "first"}, {"colour": "red"}, {"limit": "100000"},
])
def test_malformed_queries_get_a_400_with_a_message(project, params):
    r = client_for(project).get("/api/images", params=params)
    assert r.status_code == 400 and r.json()["error"]


@pytest.mark.parametrize("body, words", [
    (b"{not json", "not valid JSON"), (b"[1, 2]", "JSON object"), (b"\xff\xfe", "not valid JSON"),
    ({"op": "explode", "target": {"ids": []}}, "unknown operation"),
    ({"op": "exclude"}, "target"), ({"op": "exclude", "target": {"ids": "abc"}}, "list of strings"),
    ({"op": "exclude", "target": {"ids": ["nope"]}}, "no image with id"),
    ({"op": "exclude", "target": {"filter": {"mode": 3}}}, "mode"),
    ({"op": "exclude", "target": {"filter": {"tags": ["no_such_tag_anywhere"]}}}, "no image matches"),
])
def test_malformed_edits_get_a_4xx_with_a_message(project, body, words):
    c = client_for(project)
    r = post(c, "/api/edit", body)
    assert 400 <= r.status_code < 500 and words in r.json()["error"], r.text
    assert c.get("/api/summary").status_code == 200  # and the server goes on


def test_a_wildcard_bind_answers_any_host_name_but_still_needs_the_token(project):
    c = client_for(project, hosts=None)
    c.app_.hosts = allowed_hosts("0.0.0.0", 8765)
    assert c.get("/api/summary", headers={"Host": "myserver.lan:8765"}).status_code == 200
    c.cookies.clear()
    assert c.get("/api/summary", headers={"Host": "myserver.lan:8765"}).status_code == 401


# ----- the command --------------------------------------------------------------------------------------
def test_review_refuses_a_non_loopback_host_without_allow_remote(project):
    r = run_cli("review", str(project), "--host", "0.0.0.0", "--no-browser")
    assert r.returncode != 0 and "--allow-remote" in r.stderr


def test_review_refuses_a_folder_without_a_dataset(tmp_path):
    r = run_cli("review", str(tmp_path), "--no-browser")
    assert r.returncode != 0 and "manifest.json" in r.stderr and "Traceback" not in r.stderr


def test_review_command_serves_the_page_on_loopback_at_the_printed_url(project):
    env = dict(os.environ, COLUMNS="200")
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", "review", str(project), "--port", "0", "--no-browser"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = None
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            found = re.search(r"(http://127\.0\.0\.1:\d+/\?token=\S+)", line)
            url = found.group(1) if found else None
        assert url, proc.stderr.read() if proc.poll() is not None else "no URL printed"
        with httpx.Client(follow_redirects=True) as http:
            page = http.get(url)
            assert page.status_code == 200 and "lorakit review" in page.text
            assert http.get(url.split("?")[0] + "api/summary").json()["images"] > 0
        assert httpx.get(url.split("?")[0] + "api/summary").status_code == 401  # no cookie, no token
    finally:
        proc.terminate()
        proc.wait(timeout=20)


# ----- edits go through the curation API ----------------------------------------------------------------
@pytest.fixture
def fresh(project, tmp_path) -> Path:
    """A copy of the generated project that a test may change."""
    import shutil

    shutil.copytree(project.parent, tmp_path / "p", symlinks=True)
    return tmp_path / "p" / project.name


def curation_edits(pipeline: Path) -> list[dict]:
    path = pipeline.with_name(pipeline.stem + ".curation.jsonl")
    return [e for e in map(json.loads, path.read_text(encoding="utf-8").splitlines()) if "op" in e]


def records_by_name(pipeline: Path) -> dict[str, dict]:
    data = json.loads((pipeline.parent / "dataset" / "manifest.json").read_text(encoding="utf-8"))
    return {Path(r["path"]).stem: r for r in data["images"]}


def on_disk(pipeline: Path, record: dict) -> str:
    return (pipeline.parent / "dataset" / record["caption_path"]).read_text(encoding="utf-8")


def first_item(c, **params) -> dict:
    return c.get("/api/images", params={**params, "limit": 1}).json()["items"][0]


def edit(c, body, status=200):
    r = post(c, "/api/edit", body)
    assert r.status_code == status, r.text
    return r.json()


def test_tag_edits_reach_the_curation_file_the_captions_and_the_page_at_once(fresh):
    c = client_for(fresh)
    item = first_item(c, tags="long_hair")
    target = {"ids": [item["id"]]}
    edit(c, {"op": "add_tag", "tag": "mychar", "position": "front", "target": target})
    edit(c, {"op": "replace_tag", "tag": "long_hair", "new": "very_long_hair", "target": target})
    edit(c, {"op": "move_front", "tag": "solo", "target": target})
    edit(c, {"op": "add_tag", "tag": "sketch", "position": "end", "target": target})
    record = records_by_name(fresh)[item["name"]]
    tags = record["caption"].split(", ")
    assert tags[0] == "solo" and tags[1] == "mychar" and tags[-1] == "sketch"
    assert "very_long_hair" in tags and "long_hair" not in tags
    assert on_disk(fresh, record) == record["caption"] and record["edited"]
    assert [e["op"] for e in curation_edits(fresh)] == ["add_tags", "replace_tag", "move_to_front", "add_tags"]
    assert all(e["by"] == "review" and e["ids"] == [record["id"]] for e in curation_edits(fresh))
    detail = c.get("/api/image/" + first_item(c, tags="very_long_hair")["id"]).json()
    assert detail["caption"] == record["caption"] and detail["edited"]
    assert item["id"] in ids(c, edited="yes")


def test_a_filter_target_edits_everything_the_filter_shows(fresh):
    c = client_for(fresh)
    red = ids(c, tags="red_dress")
    result = edit(c, {"op": "remove_tag", "tag": "solo", "target": {"filter": {"tags": ["red_dress"]}}})
    assert result["message"] == f"removed solo from {len(red)} image(s)"
    for r in records_by_name(fresh).values():
        tags = on_disk(fresh, r).split(", ")
        assert ("solo" in tags) == ("red_dress" not in tags)


def test_replace_caption_writes_the_text_verbatim(fresh):
    c = client_for(fresh)
    item = first_item(c)
    edit(c, {"op": "replace_caption", "caption": "mychar, 1girl, red dress", "target": {"ids": [item["id"]]}})
    assert on_disk(fresh, records_by_name(fresh)[item["name"]]) == "mychar, 1girl, red dress"


def test_exclude_then_restore_moves_the_image_out_and_back(fresh):
    c = client_for(fresh)
    item = first_item(c, subset="outfit_b")
    edit(c, {"op": "exclude", "note": "off-model", "target": {"ids": [item["id"]]}})
    assert item["name"] not in records_by_name(fresh)
    aside = c.get("/api/images", params={"status": "aside", "aside_step": "curation"}).json()["items"]
    assert [a["name"] for a in aside] == [item["name"]] and "off-model" in aside[0]["aside_reason"]
    edit(c, {"op": "restore", "target": {"ids": [aside[0]["id"]]}})
    assert item["name"] in records_by_name(fresh)
    assert [e["op"] for e in curation_edits(fresh)] == ["exclude", "restore"]


def test_a_set_aside_duplicate_is_restored_and_a_keeper_changed(fresh):
    c = client_for(fresh)
    groups = c.get("/api/dedupe").json()["groups"]
    member = groups[0]["members"][0]
    edit(c, {"op": "restore", "target": {"ids": [member["id"]]}})
    assert member["name"] in records_by_name(fresh)
    g = groups[1]
    kept_name, new_keeper = g["kept"], g["members"][0]
    edit(c, {"op": "keeper", "group": 1, "target": {"ids": [new_keeper["id"]]}})
    names = records_by_name(fresh)
    assert new_keeper["name"] in names and kept_name not in names
    assert curation_edits(fresh)[-1]["op"] == "set_keeper"
    r = post(c, "/api/edit", {"op": "keeper", "group": 99, "target": {"ids": [first_item(c)["id"]]}})
    assert r.status_code == 400 and "duplicate group" in r.json()["error"]


def test_move_to_subset_and_mask_verdicts(fresh):
    c = client_for(fresh)
    item = first_item(c, subset="outfit_a", mask="present")
    edit(c, {"op": "move_subset", "subset": "outfit_b", "target": {"ids": [item["id"]]}})
    assert records_by_name(fresh)[item["name"]]["subset"] == "outfit_b"
    item = next(i for i in c.get("/api/images", params={"subset": "outfit_b", "limit": 500}).json()["items"]
                if i["name"] == item["name"])
    edit(c, {"op": "mask", "verdict": "reject", "target": {"ids": [item["id"]]}})
    assert item["id"] in ids(c, mask="rejected") and item["id"] not in ids(c, mask="present")
    assert records_by_name(fresh)[item["name"]]["mask"] is None
    assert c.get(f"/media/mask/{item['id']}").status_code == 200  # the page still shows the rejected mask
    edit(c, {"op": "mask", "verdict": "accept", "target": {"ids": [item["id"]]}})
    assert records_by_name(fresh)[item["name"]]["mask"] is not None
    assert item["id"] in ids(c, mask="present")
    assert [e["op"] for e in curation_edits(fresh)] == ["move_to_subset", "reject_mask", "accept_mask"]


def test_undo_removes_the_last_edit_from_the_file_and_the_captions(fresh):
    c = client_for(fresh)
    item = first_item(c)
    before = on_disk(fresh, records_by_name(fresh)[item["name"]])
    edit(c, {"op": "add_tag", "tag": "mychar", "position": "front", "target": {"ids": [item["id"]]}})
    assert on_disk(fresh, records_by_name(fresh)[item["name"]]).startswith("mychar, ")
    assert c.get("/api/history").json()["edits"][0]["op"] == "add_tags"
    r = post(c, "/api/undo", {})
    assert r.status_code == 200 and "undone" in r.json()["message"]
    assert on_disk(fresh, records_by_name(fresh)[item["name"]]) == before
    assert curation_edits(fresh) == []
    r = post(c, "/api/undo", {})
    assert r.status_code == 409 and "nothing to undo" in r.json()["error"]


def test_a_copied_dataset_edits_its_own_files_not_the_originals(project, fresh):
    original = json.loads((project.parent / "dataset" / ".lorakit" / "written.json").read_text())
    c = client_for(fresh)
    item = first_item(c, subset="outfit_a")
    edit(c, {"op": "move_subset", "subset": "outfit_b", "target": {"ids": [item["id"]]}})
    assert json.loads((project.parent / "dataset" / ".lorakit" / "written.json").read_text()) == original
    assert (fresh.parent / "dataset" / "outfit_b" / f"{item['name']}.png").is_file()
    assert (project.parent / "dataset" / "outfit_a" / f"{item['name']}.png").is_file()


def test_a_link_leading_out_of_the_dataset_is_not_served(fresh, tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"not for the page")
    data = json.loads((fresh.parent / "dataset" / "manifest.json").read_text(encoding="utf-8"))
    linked = data["images"][0]
    (fresh.parent / "dataset" / linked["path"]).unlink()
    (fresh.parent / "dataset" / linked["path"]).symlink_to(secret)
    c = client_for(fresh)
    item = next(i for i in c.get("/api/images", params={"limit": 500}).json()["items"]
                if i["name"] == Path(linked["path"]).stem)
    for kind in ("image", "thumb"):
        r = c.get(f"/media/{kind}/{item['id']}")
        assert r.status_code == 404 and b"not for the page" not in r.content


def test_a_manifest_path_leading_out_of_the_dataset_stops_the_page_with_a_clear_error(fresh):
    from lorakit.plugin_sdk import LorakitError

    manifest_path = fresh.parent / "dataset" / "manifest.json"
    data = json.loads(manifest_path.read_text(encoding="utf-8"))
    data["images"][1]["path"] = "../../secret.png"
    manifest_path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(LorakitError, match="leaves its folder"):
        client_for(fresh)


def test_review_says_when_the_port_is_taken(project):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        r = run_cli("review", str(project), "--port", str(taken.getsockname()[1]), "--no-browser")
    assert r.returncode != 0 and "--port" in r.stderr and "Traceback" not in r.stderr


def test_the_review_command_makes_every_thumbnail_ahead_of_the_first_view(tmp_path, monkeypatch):
    from lorakit.review import thumbs

    pipeline = write_project(tmp_path, 24)
    run_project(pipeline)
    app = create_app(pipeline.parent / "dataset", pipeline, hosts=allowed_hosts("127.0.0.1", 8765), prefetch=True)
    state = app.review
    state.prefetcher.join(timeout=120)
    assert not state.prefetcher.is_alive()
    pictures = [e for e in state.data.entries if e.file is not None]
    made = list((pipeline.parent / "dataset" / ".lorakit" / "review" / "thumbs").rglob("*.jpg"))
    assert len(made) >= len(pictures) - 1  # every picture but the broken one, if it is listed

    def no_render(self, image, side=None):
        raise AssertionError(f"{image} rendered on request: it should have been made ahead")

    monkeypatch.setattr(thumbs.Thumbnails, "render", no_render)
    c = TestClient(app, base_url=f"http://{HOST}")
    c.cookies.set("lorakit_review", app.token)
    for item in c.get("/api/images", params={"limit": 200}).json()["items"]:
        assert c.get(f"/media/thumb/{item['id']}").status_code == 200
