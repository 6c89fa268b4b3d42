"""pipeline.yaml: every user mistake is caught before work starts, with file, line, key and value."""
from __future__ import annotations

import json

import jsonschema
import pytest
import yaml

from conftest import run_cli
from lorakit.host import get_host
from lorakit.pipeline import load_pipeline, pipeline_schema
from lorakit.plugin_sdk import LorakitError


def _write(tmp_path, text):
    p = tmp_path / "pipeline.yaml"
    p.write_text(text)
    return p


def test_malformed_yaml_names_the_line(tmp_path):
    p = _write(tmp_path, "output: out\nsources:\n  - folder: {path: raw\nsteps: []\n")
    with pytest.raises(LorakitError, match=r"pipeline.yaml:\d+: malformed YAML"):
        load_pipeline(p, get_host())


def test_unknown_step_lists_installed_steps(tmp_path, images_dir):
    p = _write(tmp_path, f"output: out\nsources:\n  - folder: {{path: {images_dir}}}\nsteps:\n  - trimm\n")
    with pytest.raises(LorakitError) as err:
        load_pipeline(p, get_host())
    assert "pipeline.yaml:5: unknown step 'trimm'" in str(err.value)
    assert "folder" in str(err.value) and "Installed steps" in str(err.value)


def test_bad_parameter_names_step_key_value_and_expected_type(tmp_path, images_dir):
    p = _write(tmp_path, f"output: out\nsources:\n  - folder: {{path: {images_dir}, recursive: maybe}}\n")
    with pytest.raises(LorakitError) as err:
        load_pipeline(p, get_host())
    msg = str(err.value)
    assert "pipeline.yaml:3" in msg and "'folder'" in msg and "'recursive'" in msg and "'maybe'" in msg
    assert "true or false" in msg


def test_unknown_parameter_lists_the_known_ones(tmp_path, images_dir):
    p = _write(tmp_path, f"output: out\nsources:\n  - folder: {{path: {images_dir}, recursve: true}}\n")
    with pytest.raises(LorakitError, match="this step takes: caption_extension, path, recursive"):
        load_pipeline(p, get_host())


def test_missing_source_folder_is_a_clear_error_not_a_traceback(tmp_path):
    p = _write(tmp_path, "output: out\nsources:\n  - folder: {path: no_such_folder}\n")
    proc = run_cli("run", str(p))
    assert proc.returncode != 0
    assert "pipeline.yaml:3" in proc.stderr and "no_such_folder does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_subset_setting_is_reported(tmp_path, images_dir):
    p = _write(tmp_path, f"output: out\nsources:\n  - folder: {{path: {images_dir}}}\nsubsets:\n  a: {{repeats: -1}}\n")
    with pytest.raises(LorakitError, match=r"pipeline.yaml:5: subset 'a': repeats = -1 is invalid"):
        load_pipeline(p, get_host())


def test_relative_paths_are_relative_to_the_pipeline_file(tmp_path, images_dir):
    p = _write(tmp_path, "output: out\nsources:\n  - folder: {path: raw}\n")
    pipeline = load_pipeline(p, get_host())
    assert pipeline.output == tmp_path / "out"
    assert pipeline.sources[0].step.options.path == tmp_path / "raw"


def test_exported_schema_is_valid_and_accepts_a_real_pipeline(tmp_path):
    schema = pipeline_schema(get_host())
    jsonschema.Draft202012Validator.check_schema(schema)
    doc = yaml.safe_load("output: out\nresolution: 768\nsources:\n  - folder: {path: raw, subset: a}\n"
                         "subsets:\n  a: {repeats: 3, triggers: [x]}\nsteps: []\n")
    jsonschema.validate(doc, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"output": "o", "sources": [{"folder": {"path": "r", "bogus": 1}}]}, schema)


def test_schema_command_prints_json():
    proc = run_cli("schema")
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["title"] == "lorakit pipeline"


def test_model_references_resolve_local_paths_and_keep_hub_ids(tmp_path, images_dir):
    (tmp_path / "models" / "tagger").mkdir(parents=True)
    p = _write(tmp_path, f"output: out\nsources:\n  - folder: {{path: {images_dir}}}\n"
                         "steps:\n  - wd14: {model: models/tagger}\n  - blip: {model: Salesforce/blip-image-captioning-large}\n")
    pipeline = load_pipeline(p, get_host())
    assert pipeline.steps[0].step.options.model == str(tmp_path / "models" / "tagger")
    assert pipeline.steps[1].step.options.model == "Salesforce/blip-image-captioning-large"
