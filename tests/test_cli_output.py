"""What a user reads: help at 80 columns, markup-free text, truthful summaries."""
from __future__ import annotations

import os
import subprocess
import sys

import yaml
from PIL import Image


def lorakit(*args, columns=80, cwd=None):
    env = dict(os.environ, COLUMNS=str(columns))
    env.pop("LORAKIT_LOAD_PLUGINS", None)
    return subprocess.run([sys.executable, "-m", "lorakit", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def test_steps_list_reads_at_80_columns_with_every_parameter_described():
    out = lorakit("steps").stdout
    lines = out.splitlines()
    assert not [line for line in lines if len(line) > 80]
    assert not [line for line in lines if line != line.rstrip()]  # no padding to copy along
    # every option is named in full and followed by its description
    assert "  --base-model  (required)" in out
    assert "the base model: a .safetensors checkpoint" in out
    assert "…" not in out


def test_step_detail_keeps_brackets_and_braces_as_written():
    out = lorakit("steps", "triggers").stdout
    assert "{outfit1: [katana, sheath]}" in out


def test_step_docstrings_are_reflowed_not_hard_wrapped():
    out = lorakit("steps", "reg", columns=80).stdout
    wide = lorakit("steps", "reg", columns=160).stdout
    # the same paragraph is one line on a wide terminal: the source's wrapping at ~100 is gone
    assert any(len(line) > 100 and "captions: one image per training caption" in line for line in wide.splitlines())
    assert max(len(line) for line in out.splitlines() if not line.startswith("lorakit ")) <= 80


def test_step_command_example_stays_on_one_line():
    out = lorakit("reg", "--help").stdout
    assert "lorakit reg tagged/ with_reg/ --base-model models/anything-v4.5.safetensors --mode captions" in out


def test_errors_are_not_wrapped_inside_paths(tmp_path):
    deep = tmp_path / ("a-very-long-folder-name-" * 4) / "pipeline.yaml"
    deep.parent.mkdir(parents=True)
    deep.write_text("sources: [{folder: {path: nowhere}}]\noutput: out\n")
    proc = lorakit("validate", str(deep))
    assert proc.returncode == 1
    assert str(deep) in proc.stderr.replace("\n", "") and str(deep.parent) in proc.stderr


def _pipeline(tmp_path, steps=()):
    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(5):
        Image.new("RGB", (64, 64), (40 * i, 0, 0)).save(raw / f"good{i}.png")
    for i in range(4):
        (raw / f"broken{i}.png").write_bytes(b"not a picture [really]")
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"sources": [{"folder": {"path": "raw"}}], "output": "out", "steps": list(steps)}))
    return path


def test_set_aside_summary_names_images_and_says_unreadable_files_have_no_copy(tmp_path):
    proc = lorakit("run", str(_pipeline(tmp_path)), columns=200)
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr
    assert "4 image(s) set aside (no copies: the files could not be read)" in err
    assert "broken0.png, broken1.png, broken2.png and 1 more" in err
    assert "copies in" not in err
    assert "every image is in the set_aside list of" in err


def test_fully_cached_rerun_marks_earlier_log_lines(tmp_path):
    path = _pipeline(tmp_path, steps=[{"repeats": {"steps_per_epoch": 100}}])
    first = lorakit("run", str(path), columns=200)
    assert first.returncode == 0, first.stderr
    again = lorakit("run", str(path), columns=200)
    lines = [line for line in again.stderr.splitlines() if line.strip().startswith("repeats:")]
    assert lines and all("(earlier run)" in line for line in lines)
    assert "Nothing changed" in again.stderr


def test_export_diffusers_counts_what_it_wrote_and_names_reg_images_left_out(tmp_path):
    from lorakit.manifest import Manifest, ImageRecord
    from lorakit.plugin_sdk import Subset

    root = tmp_path / "ds"
    root.mkdir()
    images = []
    for i, reg in enumerate([False, False, True]):
        Image.new("RGB", (32, 32), (i, 0, 0)).save(root / f"img{i}.png")
        images.append(ImageRecord(path=f"img{i}.png", caption="a", subset="reg" if reg else "default",
                                  width=32, height=32, sha256=str(i), is_reg=reg))
    Manifest(root=root, subsets={"default": Subset("default"), "reg": Subset("reg", is_reg=True)},
             images=images).save()
    proc = lorakit("export", "diffusers", str(root), str(tmp_path / "exp"), columns=200)
    assert proc.returncode == 0, proc.stderr
    written = (tmp_path / "exp" / "metadata.jsonl").read_text().splitlines()
    assert len(written) == 2
    assert "Exported 2 image(s)" in proc.stderr and "1 regularisation image(s) left out" in proc.stderr


def test_validate_reports_every_problem_at_once_with_the_closest_names(tmp_path):
    (tmp_path / "raw").mkdir()
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({
        "sources": [{"folder": {"path": "raw"}}], "output": "out", "resolutoin": 512,
        "steps": [{"trimm": {"fuzz": "20%"}}, {"dedupe": {"treshold": 8, "method": "nope"}},
                  {"wd14": {"model": "models/wd14/model.onnx"}}],
        "subsets": {"a": {"repeat": 3}},
    }, sort_keys=False))
    proc = lorakit("validate", str(path), columns=200)
    assert proc.returncode == 1
    err = proc.stderr
    assert "problems" in err
    assert "did you mean 'resolution'?" in err
    assert "unknown step 'trimm'. did you mean 'trim'?" in err
    assert "'treshold'" in err and "did you mean 'threshold'?" in err and "'method'" in err
    assert "models/wd14/model.onnx" in err and "no such file or folder" in err
    assert "did you mean 'repeats'?" in err


def test_validate_with_a_train_section_does_not_import_torch(tmp_path):
    (tmp_path / "raw").mkdir()
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"sources": [{"folder": {"path": "raw"}}], "output": "out",
                                    "train": {"base_model": "owner/model", "max_train_steps": 10}}))
    code = ("import sys\nsys.argv = ['lorakit', 'validate', sys.argv[1]]\nimport lorakit.cli as c\n"
            "try:\n    c.main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print('torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "False"


def test_a_configured_subset_that_gets_no_images_is_named_as_a_likely_typo(tmp_path):
    raw = tmp_path / "raw" / "mychar"
    raw.mkdir(parents=True)
    Image.new("RGB", (64, 64), "red").save(raw / "a.png")
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"sources": [{"folder": {"path": "raw/mychar", "subset": "mychar"}}],
                                    "output": "out", "subsets": {"mychr": {"repeats": 5}}}))
    proc = lorakit("run", str(path), columns=200)
    assert proc.returncode == 0, proc.stderr
    assert "subsets: 'mychr' has no images" in proc.stderr and "Did you mean 'mychar'?" in proc.stderr


def test_validate_takes_a_hub_repo_with_a_file_for_a_hub_id_not_a_missing_path(tmp_path):
    (tmp_path / "raw").mkdir()
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"sources": [{"folder": {"path": "raw"}}], "output": "out",
                                    "steps": [{"crops": {"face_model": "deepghs/anime_face_detection:face_v1/model.onnx"}}]}))
    proc = lorakit("validate", str(path), columns=200)
    assert proc.returncode == 0, proc.stderr
