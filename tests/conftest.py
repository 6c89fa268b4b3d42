"""Shared fixtures for lorakit's test suite: real files in temp folders, real libraries."""
from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def images_dir(tmp_path) -> Path:
    """A folder of three small valid images (one with a caption) plus nothing else."""
    d = tmp_path / "raw"
    d.mkdir()
    Image.new("RGB", (80, 60), "red").save(d / "red.png")
    Image.new("RGB", (60, 80), "blue").save(d / "blue.jpg")
    Image.new("RGBA", (70, 70), (0, 255, 0, 128)).save(d / "green.png")
    (d / "red.txt").write_text("1girl, solo, red_background")
    return d


@pytest.fixture(scope="session")
def sepia_plugin_site(tmp_path_factory) -> Path:
    """The third-party fixture plugin distribution (tests/fixtures/lorakit-sepia), pip-installed into
    a private folder; put it on PYTHONPATH to make its entry points visible to a lorakit process."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(FIXTURES / "lorakit-sepia")],
        check=True, capture_output=True, text=True,
    )
    return target


def run_cli(*args: str, env_extra: dict | None = None, cwd: Path | None = None, site: Path | None = None):
    """Run the real ``lorakit`` command in a subprocess; returns CompletedProcess (text)."""
    env = dict(os.environ)
    env.pop("LORAKIT_LOAD_PLUGINS", None)
    if site is not None:
        env["PYTHONPATH"] = str(site) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_extra or {})
    env["COLUMNS"] = "200"
    return subprocess.run([sys.executable, "-m", "lorakit", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


def run_cli_unprivileged(*args: str, env_extra: dict | None = None, cwd: Path | None = None):
    """Run ``lorakit`` where file permissions apply: as root (which reads and writes anything), the
    permission-bypassing capabilities are dropped with util-linux's setpriv; skip when that is impossible."""
    import shutil

    if os.geteuid() != 0:
        return run_cli(*args, env_extra=env_extra, cwd=cwd)
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: file permissions cannot be tested")
    env = dict(os.environ, COLUMNS="200", **(env_extra or {}))
    env.pop("LORAKIT_LOAD_PLUGINS", None)
    command = ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search,-fowner",
               sys.executable, "-m", "lorakit", *args]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
    if proc.returncode != 0 and "setpriv:" in proc.stderr:
        pytest.skip(f"setpriv cannot drop capabilities here: {proc.stderr.strip()}")
    return proc


def write_png_bomb(path: Path, side: int) -> None:
    """A real PNG of side x side black 1-bit pixels: tiny on disk, huge when decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" * (1 + (side + 7) // 8)
    comp = zlib.compressobj(9)
    body = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))


# ----- tiny diffusers models (random weights), built once per test session -------------------------
# Tests load them read-only (a test that changes a model copies it first).
@pytest.fixture(scope="session")
def sd15(tmp_path_factory) -> Path:
    """A tiny random-weight SD1.5-shaped diffusers folder (tests/tiny_models.py)."""
    from tests.tiny_models import build_tiny_sd15

    return build_tiny_sd15(tmp_path_factory.mktemp("models") / "sd15")


@pytest.fixture(scope="session")
def sdxl(tmp_path_factory) -> Path:
    """A tiny random-weight SDXL-shaped diffusers folder (two text encoders)."""
    from tests.tiny_models import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("models") / "sdxl")
