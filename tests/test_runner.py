"""The pipeline runner: caching, incremental re-runs, set-aside, resume, parallelism, atomic output."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from PIL import Image

from lorakit.plugin_sdk.testing import assert_valid_manifest, run_pipeline_dict, run_step
from steps_for_tests import TEST_STEPS, InterruptAfter, InvertStep


def _digest_tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _pipeline(tmp_path, raw, steps, **extra):
    return {"output": str(tmp_path / "out"), "sources": [{"folder": {"path": str(raw)}}], "steps": steps, **extra}


def _stat(result, name):
    return next(s for s in result.stats if s.name == name)


def test_step_output_lands_in_dataset_folder_with_caption_and_manifest(tmp_path, images_dir):
    res = run_step(InvertStep, images_dir, tmp_path / "out")
    assert sorted(r.path for r in res.images) == ["blue.png", "green.png", "red.png"]
    red = res.by_name("red")
    assert red.caption == "1girl, solo, red_background, inverted"
    assert (tmp_path / "out" / "red.txt").read_text() == red.caption
    assert res.open(red).getpixel((0, 0)) == (0, 255, 255)
    assert red.steps == ["folder", "invert"]
    assert (red.width, red.height) == (80, 60)
    assert red.sha256 == hashlib.sha256((tmp_path / "out" / "red.png").read_bytes()).hexdigest()


def test_unchanged_rerun_redoes_nothing(tmp_path, images_dir):
    data = _pipeline(tmp_path, images_dir, ["invert", "addtag"])
    first = run_pipeline_dict(data, tmp_path, TEST_STEPS)
    assert not first.run.nothing_changed
    second = run_pipeline_dict(data, tmp_path, TEST_STEPS)
    assert second.run.nothing_changed
    assert all(s.cached == s.inputs for s in second.stats)


def test_changing_one_steps_params_redoes_that_step_and_later_ones_only(tmp_path, images_dir):
    run_pipeline_dict(_pipeline(tmp_path, images_dir, ["addtag", "invert", "countsubset"]), tmp_path, TEST_STEPS)
    changed = run_pipeline_dict(_pipeline(tmp_path, images_dir, ["addtag", {"invert": {"label": "neg"}}, "countsubset"]),
                                tmp_path, TEST_STEPS)
    assert _stat(changed, "addtag").computed == 0 and _stat(changed, "addtag").cached == 3
    assert _stat(changed, "invert").computed == 3
    assert _stat(changed, "countsubset").computed > 0
    assert "neg" in changed.by_name("red").caption


def test_broken_files_are_set_aside_with_reason_and_the_rest_processed(tmp_path, images_dir):
    (images_dir / "zero.png").write_bytes(b"")
    (images_dir / "text.jpg").write_text("this is not a picture")
    good = Image.new("RGB", (300, 300), "white")
    good.save(images_dir / "trunc.png")
    data = (images_dir / "trunc.png").read_bytes()
    (images_dir / "trunc.png").write_bytes(data[: len(data) // 2])
    res = run_step(InvertStep, images_dir, tmp_path / "out")
    reasons = res.reasons()
    assert "empty file" in reasons["zero"] and "zero.png" in reasons["zero"]
    assert "not an image" in reasons["text"]
    assert "trunc" in reasons and "trunc.png" in reasons["trunc"]
    assert len(res.images) == 3


def test_step_can_set_an_image_aside_and_a_copy_is_kept(tmp_path, images_dir):
    res = run_step(InvertStep, images_dir, tmp_path / "out", {"skip_red": True})
    assert res.reasons() == {"red": "top-left pixel is red"}
    record = res.set_aside[0]
    assert record.step == "invert" and (tmp_path / "out" / record.path).is_file()
    assert "red.png" not in {r.path for r in res.images}


def test_source_images_are_never_modified(tmp_path, images_dir):
    before = _digest_tree(images_dir)
    run_step(InvertStep, images_dir, tmp_path / "out")
    assert _digest_tree(images_dir) == before


def test_interrupted_run_resumes_where_it_stopped(tmp_path, images_dir):
    data = _pipeline(tmp_path, images_dir, [{"interrupt": {"after": 2}}])
    InterruptAfter.seen = 0
    with pytest.raises(KeyboardInterrupt):
        run_pipeline_dict(data, tmp_path, TEST_STEPS, workers=1)
    InterruptAfter.seen = -100  # no further interrupt
    resumed = run_pipeline_dict(data, tmp_path, TEST_STEPS, workers=1)
    step = _stat(resumed, "interrupt")
    assert step.cached == 2 and step.computed == 1 and len(resumed.images) == 3


def test_parallel_workers_give_the_same_dataset_as_one_process(tmp_path, images_dir):
    for i in range(12):
        Image.new("RGB", (40 + i, 30), (i * 20, 10, 200)).save(images_dir / f"extra{i:02}.png")
    one = run_pipeline_dict({**_pipeline(tmp_path, images_dir, ["invert"]), "output": str(tmp_path / "a")},
                            tmp_path, TEST_STEPS, workers=1)
    two = run_pipeline_dict({**_pipeline(tmp_path, images_dir, ["invert"]), "output": str(tmp_path / "b")},
                            tmp_path, TEST_STEPS, workers=2)
    assert [(r.path, r.sha256, r.caption) for r in one.images] == [(r.path, r.sha256, r.caption) for r in two.images]


def test_no_temporary_files_are_left_in_the_output(tmp_path, images_dir):
    run_step(InvertStep, images_dir, tmp_path / "out")
    leftovers = [p for p in (tmp_path / "out").rglob(".lorakit-tmp-*")]
    assert leftovers == []


def test_images_that_leave_the_dataset_are_removed_from_the_output_folder(tmp_path, images_dir):
    run_step(InvertStep, images_dir, tmp_path / "out")
    assert (tmp_path / "out" / "red.png").exists()
    res = run_step(InvertStep, images_dir, tmp_path / "out", {"skip_red": True})
    assert not (tmp_path / "out" / "red.png").exists() and not (tmp_path / "out" / "red.txt").exists()
    assert (tmp_path / "out" / res.set_aside[0].path).exists()


def test_subset_settings_from_the_pipeline_reach_the_manifest(tmp_path, images_dir):
    data = {"output": str(tmp_path / "out"),
            "sources": [{"folder": {"path": str(images_dir), "subset": "outfit1"}}],
            "subsets": {"outfit1": {"repeats": 6, "triggers": ["mychar"], "keep_tokens": 1}}}
    res = run_pipeline_dict(data, tmp_path)
    sub = res.manifest.subsets["outfit1"]
    assert (sub.repeats, sub.triggers, sub.keep_tokens, sub.folder) == (6, ["mychar"], 1, "outfit1")
    assert all(r.repeats == 6 and r.path.startswith("outfit1/") for r in res.images)


def test_dataset_step_changes_to_subsets_are_kept(tmp_path, images_dir):
    res = run_pipeline_dict(_pipeline(tmp_path, images_dir, ["countsubset"]), tmp_path, TEST_STEPS)
    assert res.manifest.subsets["default"].repeats == 3
    assert _stat(res, "countsubset").messages == ["default: 3"]


def test_same_stem_different_extensions_get_distinct_names(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    Image.new("RGB", (10, 10), "red").save(raw / "a.png")
    Image.new("RGB", (10, 10), "blue").save(raw / "a.jpg")
    res = run_step(InvertStep, raw, tmp_path / "out")
    assert sorted(r.path for r in res.images) == ["a.png", "a_2.png"]


def test_output_inside_the_source_folder_is_refused(tmp_path, images_dir):
    from lorakit.plugin_sdk import LorakitError

    with pytest.raises(LorakitError, match="overlaps the source folder"):
        run_pipeline_dict({"output": str(images_dir / "out"), "sources": [{"folder": {"path": str(images_dir)}}]}, tmp_path)


def test_decompression_bomb_is_set_aside(tmp_path, monkeypatch):
    import lorakit.plugin_sdk.images as images

    raw = tmp_path / "raw"
    raw.mkdir()
    Image.new("L", (2000, 2000)).save(raw / "bomb.png")
    Image.new("RGB", (20, 20)).save(raw / "ok.png")
    monkeypatch.setattr(images, "MAX_PIXELS", 1000 * 1000)
    res = run_step(InvertStep, raw, tmp_path / "out")
    assert "decode limit" in res.reasons()["bomb"] or "decompression bomb" in res.reasons()["bomb"]
    assert [r.path for r in res.images] == ["ok.png"]


def test_written_manifest_matches_its_schema_and_the_files(tmp_path, images_dir):
    run_pipeline_dict({"output": str(tmp_path / "out"),
                       "sources": [{"folder": {"path": str(images_dir), "subset": "a"}}],
                       "subsets": {"a": {"repeats": 2}}, "steps": ["invert"]}, tmp_path, TEST_STEPS)
    manifest = assert_valid_manifest(tmp_path / "out")
    assert len(manifest.images) == 3
    (tmp_path / "out" / "a" / "red.txt").write_text("changed")
    with pytest.raises(AssertionError, match="caption file differs"):
        assert_valid_manifest(tmp_path / "out")


def test_log_lines_from_worker_processes_reach_the_summary(tmp_path, images_dir):
    for i in range(20):
        Image.new("RGB", (20, 20), (i, 0, 0)).save(images_dir / f"n{i:02}.png")
    res = run_pipeline_dict(_pipeline(tmp_path, images_dir, ["logline"]), tmp_path, TEST_STEPS, workers=2)
    expected = {"saw red", "saw blue", "saw green"} | {f"saw n{i:02}" for i in range(20)}
    messages = _stat(res, "logline").messages
    assert len(messages) == 23 and set(messages) == expected


def test_written_files_get_the_usual_permissions_not_private_temp_ones(tmp_path, images_dir):
    import os
    import stat

    run_step(InvertStep, images_dir, tmp_path / "out")
    umask = os.umask(0)
    os.umask(umask)
    for name in ("red.png", "red.txt", "manifest.json"):
        mode = stat.S_IMODE((tmp_path / "out" / name).stat().st_mode)
        assert mode == 0o666 & ~umask, (name, oct(mode))


def test_a_killed_run_resumes_and_its_partial_files_are_cleaned_up(tmp_path, images_dir):
    import signal
    import subprocess
    import sys
    import time

    for i in range(60):
        Image.new("RGB", (400, 400), (i, 2 * i, 3 * i)).save(images_dir / f"k{i:02}.png")
    (tmp_path / "pipeline.yaml").write_text(
        f"output: out\nworkers: 1\nsources:\n  - folder: {{path: {images_dir}}}\nsteps:\n  - slow: {{seconds: 0.3}}\n")
    (tmp_path / "slowplugin.py").write_text(
        "import time\nfrom lorakit.plugin_sdk import ImageStep, Param, hookimpl\n"
        "class Slow(ImageStep):\n    name='slow'; summary='Sleep per image (test).'; workers=1\n"
        "    params=[Param('seconds', float, 0.1, 'sleep')]\n"
        "    def process(self, item, ctx):\n        time.sleep(self.options.seconds)\n"
        f"        open({str(tmp_path / 'done')!r} + '/' + item.name, 'w').close()\n        return item\n"
        "@hookimpl\ndef register_steps(register):\n    register(Slow)\n")
    (tmp_path / "run.py").write_text(
        "import sys\nsys.path.insert(0, sys.argv[1])\nimport slowplugin\nfrom lorakit.host import get_host, load_host\n"
        "import lorakit.host as h\nhost = load_host(extra_plugins=[slowplugin])\nh.get_host = lambda: host\n"
        "import lorakit.cli as c\nc.get_host = lambda: host\nsys.argv = ['lorakit', 'run', sys.argv[2]]\nc.main()\n")
    (tmp_path / "out" / "sub").mkdir(parents=True)
    (tmp_path / "out" / "sub" / ".lorakit-tmp-left0ver.png").write_bytes(b"partial")
    (tmp_path / "done").mkdir()
    proc = subprocess.Popen([sys.executable, str(tmp_path / "run.py"), str(tmp_path), str(tmp_path / "pipeline.yaml")],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while len(list((tmp_path / "done").iterdir())) < 10 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)  # killed once some images are done, however slow the machine is
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Interrupted" in err
    done = subprocess.run([sys.executable, str(tmp_path / "run.py"), str(tmp_path), str(tmp_path / "pipeline.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    import json
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert len(manifest["images"]) == 63
    assert not list((tmp_path / "out").rglob(".lorakit-tmp-*"))
    import re
    cached = int(re.search(r"slow\W+image\W+63\W+63\W+(\d+)/63", done.stderr).group(1))
    assert 0 < cached < 63  # the killed run's finished images were not redone


def test_ctrl_c_during_a_pooled_step_prints_no_worker_tracebacks(tmp_path, images_dir):
    # A terminal's Ctrl-C reaches the whole process group: the workers must leave it to the main
    # process, which prints one friendly line.
    import os
    import signal
    import subprocess
    import sys
    import time

    for i in range(40):
        Image.new("RGB", (64, 64), (i, 2 * i, 3 * i)).save(images_dir / f"c{i:02}.png")
    marker = tmp_path / "started"
    (tmp_path / "pipeline.yaml").write_text(
        f"output: out\nworkers: 2\nsources:\n  - folder: {{path: {images_dir}}}\nsteps:\n  - slow2\n")
    (tmp_path / "slowplugin2.py").write_text(
        "import time, pathlib\nfrom lorakit.plugin_sdk import ImageStep, hookimpl\n"
        "class Slow(ImageStep):\n    name='slow2'; summary='Sleep per image (test).'\n"
        f"    def process(self, item, ctx):\n        pathlib.Path({str(marker)!r}).touch()\n"
        "        time.sleep(30 if item.name == 'c00' else 0)\n        return item\n"
        "@hookimpl\ndef register_steps(register):\n    register(Slow)\n")
    (tmp_path / "run.py").write_text(
        "import signal, sys\nimport slowplugin2\nfrom lorakit.host import load_host\nimport lorakit.host as h\n"
        "import lorakit.cli as c\nif __name__ == '__main__':\n"
        "    print('SIGINT handler at start:', signal.getsignal(signal.SIGINT), file=sys.stderr)\n"
        "    host = load_host(extra_plugins=[slowplugin2])\n"
        "    h.get_host = lambda: host\n    c.get_host = lambda: host\n"
        "    sys.argv = ['lorakit', 'run', sys.argv[2]]\n    c.main()\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # A child started while the parent ignores SIGINT would inherit that (Python keeps an inherited
    # SIG_IGN): start it with the default disposition, as a terminal does.
    proc = subprocess.Popen([sys.executable, str(tmp_path / "run.py"), str(tmp_path), str(tmp_path / "pipeline.yaml")],
                            stderr=subprocess.PIPE, text=True, start_new_session=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert marker.exists(), proc.communicate(timeout=60)[1]
    time.sleep(3)  # one worker sleeps on c00, the other finishes the rest and waits idle
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Interrupted" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


def test_degenerate_pictures_are_named_for_what_they_are():
    import numpy as np

    from lorakit.plugin_sdk import degenerate_reason

    assert degenerate_reason(Image.new("RGB", (8, 8), "black")) == "the result is all black"
    assert degenerate_reason(Image.new("RGB", (8, 8), "white")) == "the result is all white"
    assert degenerate_reason(Image.new("RGB", (8, 8), (10, 120, 30))) == "the result is one flat colour (rgb 10,120,30)"
    noise = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    assert degenerate_reason(Image.fromarray(noise)) is None


def test_a_chains_one_encode_is_reported_apart_not_charged_to_its_last_step(tmp_path, images_dir, monkeypatch):
    """invert and addtag run as one chain; the picture invert made is encoded once, after addtag.
    That encode (slowed here to 0.2 s a picture) is its own line, not addtag's seconds."""
    import time

    from lorakit.store import Store

    real = Store.image_blob

    def slow_encode(self, item):
        time.sleep(0.2)
        return real(self, item)
    monkeypatch.setattr(Store, "image_blob", slow_encode)
    res = run_pipeline_dict({"output": str(tmp_path / "out"), "sources": [{"folder": {"path": str(images_dir)}}],
                             "steps": ["invert", "addtag"]}, tmp_path, TEST_STEPS, workers=1)
    addtag = next(s for s in res.stats if s.name == "addtag")
    assert addtag.seconds < 0.2  # tagging three pictures; the 0.6 s of encodes are not its own
    line = next(m for m in addtag.messages if m.startswith("writing the pictures of invert+addtag"))
    assert float(line.split(": ")[1].split(" s")[0]) >= 0.5
