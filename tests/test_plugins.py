"""Plugins: found through entry points, listed, used by `lorakit run`, standalone, and failures isolated.

A real third-party distribution (tests/fixtures/lorakit-sepia, with its own pyproject.toml and entry
point) is pip-installed into a private folder and used through the real `lorakit` command.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from conftest import FIXTURES, run_cli
from lorakit.host import load_host
from lorakit.plugin_sdk import hookimpl


@pytest.fixture(scope="module")
def broken_site(sepia_plugin_site):
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(sepia_plugin_site), str(FIXTURES / "lorakit-broken")], check=True, capture_output=True)
    return sepia_plugin_site


def test_plugins_lists_the_third_party_plugin(sepia_plugin_site):
    proc = run_cli("plugins", "--json", site=sepia_plugin_site)
    assert proc.returncode == 0, proc.stderr
    plugins = {p["name"]: p for p in json.loads(proc.stdout)}
    sepia = plugins["sepia"]
    assert sepia["distribution"] == "lorakit-sepia" and sepia["version"] == "1.2.0"
    assert sepia["steps"] == ["sepia"] and not sepia["builtin"]
    assert set(sepia["hooks"]) == {"register_commands", "register_steps"}
    assert plugins["sources"]["builtin"] and "folder" in plugins["sources"]["steps"]


def test_register_steps_third_party_step_is_used_by_run(tmp_path, images_dir, sepia_plugin_site):
    (tmp_path / "pipeline.yaml").write_text(
        f"output: out\nsources:\n  - folder: {{path: {images_dir}}}\nsteps:\n  - sepia: {{strength: 1.0}}\n")
    proc = run_cli("run", str(tmp_path / "pipeline.yaml"), site=sepia_plugin_site)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert {r["path"] for r in manifest["images"]} == {"red.png", "blue.png", "green.png"}
    assert all(r["steps"] == ["folder", "sepia"] and r["caption"].endswith("sepia") for r in manifest["images"])
    r, g, b = Image.open(tmp_path / "out" / "blue.png").convert("RGB").getpixel((5, 5))
    assert r > g > b  # sepia, not blue any more


def test_third_party_step_works_as_a_standalone_command(tmp_path, images_dir, sepia_plugin_site):
    proc = run_cli("sepia", str(images_dir), str(tmp_path / "toned"), "--min-side", "65", site=sepia_plugin_site)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "toned" / "green.png").exists()
    assert not (tmp_path / "toned" / "red.png").exists()  # 80x60: set aside
    assert "shorter side 60 < 65" in proc.stderr


def test_standalone_command_help_comes_from_the_step_declaration(sepia_plugin_site):
    proc = run_cli("sepia", "--help", site=sepia_plugin_site)
    assert proc.returncode == 0
    assert "Tint every image sepia" in proc.stdout and "--strength" in proc.stdout and "default: 1.0" in proc.stdout


def test_register_commands_adds_a_plugin_command(sepia_plugin_site):
    proc = run_cli("sepia-hello", site=sepia_plugin_site)
    assert proc.returncode == 0 and proc.stdout.strip() == "hello from lorakit-sepia"


def test_empty_load_plugins_variable_loads_only_builtins(sepia_plugin_site):
    proc = run_cli("plugins", "--json", site=sepia_plugin_site, env_extra={"LORAKIT_LOAD_PLUGINS": ""})
    names = {p["name"] for p in json.loads(proc.stdout)}
    assert "sepia" not in names and "sources" in names


def test_load_plugins_variable_selects_plugins(broken_site):
    proc = run_cli("plugins", "--json", site=broken_site, env_extra={"LORAKIT_LOAD_PLUGINS": "sepia"})
    names = {p["name"] for p in json.loads(proc.stdout)}
    assert "sepia" in names and "broken" not in names and "typo" not in names


def test_a_plugin_that_fails_to_import_is_reported_and_the_rest_works(tmp_path, images_dir, broken_site):
    proc = run_cli("plugins", "--json", site=broken_site)
    plugins = {p["name"]: p for p in json.loads(proc.stdout)}
    assert "a_module_that_does_not_exist" in plugins["broken"]["error"]
    assert plugins["sepia"]["error"] is None
    run = run_cli("sepia", str(images_dir), str(tmp_path / "o"), site=broken_site)
    assert run.returncode == 0, run.stderr
    assert "plugin 'broken' (lorakit-broken) was skipped" in run.stderr
    assert (tmp_path / "o" / "red.png").exists()


def test_a_misspelled_hook_fails_check_pending_and_is_skipped(broken_site):
    proc = run_cli("plugins", "--json", site=broken_site)
    typo = {p["name"]: p for p in json.loads(proc.stdout)}["typo"]
    assert "register_step" in typo["error"] and "unknown hook" in typo["error"].lower()


def test_two_plugins_claiming_one_step_name_the_second_is_refused():
    from steps_for_tests import InvertStep

    class First:
        @hookimpl
        def register_steps(self, register):
            register(InvertStep)

    class Second:
        @hookimpl
        def register_steps(self, register):
            register(type("OtherInvert", (InvertStep,), {}))

    host = load_host(extra_plugins=[First(), Second()])
    assert host.steps["invert"] is InvertStep
    assert "already taken" in host.plugins[-1].error


def test_a_step_declaring_a_host_reserved_parameter_is_refused():
    from lorakit.plugin_sdk import ImageStep, Param

    class Clash(ImageStep):
        name = "clash"
        summary = "Declares --workers (test)."
        params = [Param("workers", int, 2, "clashes with the host's --workers")]

    class Plugin:
        @hookimpl
        def register_steps(self, register):
            register(Clash)

    host = load_host(extra_plugins=[Plugin()])
    assert "clash" not in host.steps
    assert "reserved by the host" in host.plugins[-1].error
