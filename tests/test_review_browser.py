"""The review page in a real browser: headless Chromium from the distribution (apt's `chromium` and
`chromium-driver`), driven by Selenium, on a generated dataset of 200 pictures. Then the curation
file, the captions on disk and the next `lorakit run` are checked.

Set LORAKIT_REVIEW_SCREENSHOTS=docs/images to save the pictures docs/review.md shows."""
from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from review_dataset import run_project, write_project

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    if os.environ.get("CI"):  # CI installs both (README's install line): a missing browser is a failure there
        raise RuntimeError("chromium and chromium-driver are not installed (apt-get install -y chromium chromium-driver)")
    pytest.skip("headless Chromium not installed (apt-get install -y chromium chromium-driver)", allow_module_level=True)

import uvicorn  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from lorakit.review.app import create_app  # noqa: E402
from lorakit.review.security import allowed_hosts  # noqa: E402

SHOTS = os.environ.get("LORAKIT_REVIEW_SCREENSHOTS")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("review-browser")
    tagger = None
    if SHOTS:  # the pictures for the docs show tagger scores: tag with the tiny WD14 model (slower)
        from test_wd14 import build_tagger

        tagger = build_tagger(folder / "tagger", size=64)
    pipeline = write_project(folder, 200, tagger=tagger)
    run_project(pipeline)
    return pipeline


@pytest.fixture(scope="module")
def page(project):
    """The real server (uvicorn, in a thread) and a headless Chromium on the page."""
    port = _free_port()
    app = create_app(project.parent / "dataset", project, hosts=allowed_hosts("127.0.0.1", port))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,900", "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    driver.get(f"http://127.0.0.1:{port}/?token={app.token}")
    try:
        yield driver, app
    finally:
        driver.quit()
        server.should_exit = True
        thread.join(timeout=10)


def wait_for(driver, condition, timeout=15):
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition())


def match_count(driver) -> int:
    text = driver.find_element(By.ID, "match-count").text
    return int(text.split()[0]) if text else -1


def shot(driver, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        time.sleep(0.3)  # lazy thumbnails
        import io

        from PIL import Image

        picture = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
        picture = picture.resize((picture.width * 3 // 4, picture.height * 3 // 4), Image.Resampling.LANCZOS)
        picture.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(
            Path(SHOTS) / f"review-{name}.png", optimize=True)  # small files for the docs


def manifest(project: Path) -> dict:
    return json.loads((project.parent / "dataset" / "manifest.json").read_text(encoding="utf-8"))


def edits(project: Path) -> list[dict]:
    path = project.with_name(project.stem + ".curation.jsonl")
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [e for e in lines if "op" in e]


def caption_on_disk(project: Path, record: dict) -> str:
    return (project.parent / "dataset" / record["caption_path"]).read_text(encoding="utf-8")


def test_filter_batch_remove_exclude_restore_then_the_next_run_keeps_it(project, page):
    driver, app = page
    data = manifest(project)
    total = len(data["images"])
    wait_for(driver, lambda: match_count(driver) == total)
    assert len(driver.find_elements(By.CSS_SELECTOR, "#grid .cell")) == min(total, 200)

    # filter by tag: click red_dress in the tag list, Shift+click smile to exclude it
    red = [r for r in data["images"] if "red_dress" in r["caption"].split(", ")]
    driver.find_element(By.CSS_SELECTOR, '#tag-list li[data-tag="red_dress"]').click()
    wait_for(driver, lambda: match_count(driver) == len(red))
    smile = driver.find_element(By.CSS_SELECTOR, '#tag-list li[data-tag="smile"]')
    ActionChains(driver).key_down(Keys.SHIFT).click(smile).key_up(Keys.SHIFT).perform()
    no_smile = [r for r in red if "smile" not in r["caption"].split(", ")]
    wait_for(driver, lambda: match_count(driver) == len(no_smile))
    smile = driver.find_element(By.CSS_SELECTOR, '#tag-list li[data-tag="smile"]')
    ActionChains(driver).key_down(Keys.SHIFT).click(smile).key_up(Keys.SHIFT).perform()  # again: off
    wait_for(driver, lambda: match_count(driver) == len(red))
    shot(driver, "gallery")

    # batch: remove 'hat' from everything the filter shows
    Select(driver.find_element(By.ID, "b-target")).select_by_value("filter")
    Select(driver.find_element(By.ID, "b-op")).select_by_value("remove_tag")
    driver.find_element(By.ID, "b-tag").send_keys("hat")
    driver.find_element(By.ID, "b-apply").click()
    wait_for(driver, lambda: "removed hat" in driver.find_element(By.ID, "message").text)
    after = manifest(project)
    for r in after["images"]:
        tags = caption_on_disk(project, r).split(", ")
        assert tags == r["caption"].split(", ")
        if "red_dress" in tags:
            assert "hat" not in tags
    assert any("hat" in r["caption"].split(", ") for r in after["images"])  # only the filtered ones lost it
    last = edits(project)[-1]
    assert last["op"] == "remove_tags" and last["tags"] == ["hat"] and last["by"] == "review"
    assert len(last["ids"]) == sum(1 for r in red if "hat" in r["caption"].split(", "))

    # exclude one image from the large view (keyboard: Enter opens the focused one)
    driver.find_element(By.ID, "grid").send_keys(Keys.ARROW_RIGHT)
    driver.find_element(By.ID, "grid").send_keys(Keys.ENTER)
    wait_for(driver, lambda: driver.find_element(By.ID, "viewer").is_displayed())
    name = driver.find_element(By.ID, "v-name").text.split("/")[-1]
    wait_for(driver, lambda: driver.find_elements(By.CSS_SELECTOR, "#v-tags li .score"))
    assert driver.find_element(By.CSS_SELECTOR, "#v-tags li .score").text == "–"  # from a caption file: no score
    shot(driver, "viewer")
    driver.find_element(By.ID, "v-exclude").click()
    wait_for(driver, lambda: "excluded 1" in driver.find_element(By.ID, "message").text)
    wait_for(driver, lambda: driver.find_element(By.ID, "v-name").text.split("/")[-1] != name)  # the next one
    driver.find_element(By.ID, "v-close").click()
    wait_for(driver, lambda: match_count(driver) == len(red) - 1)
    assert name not in {Path(r["path"]).stem for r in manifest(project)["images"]}
    assert edits(project)[-1]["op"] == "exclude"

    # restore a set-aside duplicate from the Set aside view, in one click
    driver.find_element(By.CSS_SELECTOR, '#tabs button[data-view="aside"]').click()
    wait_for(driver, lambda: "curation" in {c.text for c in driver.find_elements(By.CSS_SELECTOR, "#aside-list .card .step")})
    shot(driver, "aside")
    Select(driver.find_element(By.ID, "aside-step")).select_by_value("dedupe")
    wait_for(driver, lambda: {c.text for c in driver.find_elements(By.CSS_SELECTOR, "#aside-list .card .step")}
             == {"dedupe"})
    card = driver.find_elements(By.CSS_SELECTOR, "#aside-list .card")[0]
    restored = card.find_element(By.CSS_SELECTOR, ".row span").text
    card.find_element(By.CSS_SELECTOR, "button.restore").click()
    wait_for(driver, lambda: "restored 1" in driver.find_element(By.ID, "message").text)
    assert restored in {Path(r["path"]).stem for r in manifest(project)["images"]}
    assert edits(project)[-1]["op"] == "restore"

    for view in ("dupes", "masks", "stats"):
        driver.find_element(By.CSS_SELECTOR, f'#tabs button[data-view="{view}"]').click()
        shot(driver, view)
    driver.find_element(By.CSS_SELECTOR, '#tabs button[data-view="history"]').click()
    wait_for(driver, lambda: len(driver.find_elements(By.CSS_SELECTOR, "#history-list li")) == 3)
    # script errors fail the test (a picture whose id an edit just retired may 404 while loading: not an error)
    logs = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE" and entry["source"] != "network"]
    assert not logs, logs

    # the next run replays every edit
    # (the restored duplicate goes through the steps after dedupe now, so only its presence is checked)
    before = {r["path"]: r["caption"] for r in manifest(project)["images"] if Path(r["path"]).stem != restored}
    run_project(project)
    again = manifest(project)
    assert {r["path"]: r["caption"] for r in again["images"] if Path(r["path"]).stem != restored} == before
    names = {Path(r["path"]).stem for r in again["images"]}
    assert name not in names and restored in names
    assert any(a["step"] == "curation" and a["name"] == name for a in again["set_aside"])
    for r in again["images"]:
        assert caption_on_disk(project, r) == r["caption"]
