"""Clear errors instead of tracebacks: a full disk, a read-only or non-writable output, refused
pickles and an incomplete training state on --resume."""
from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli_unprivileged
from lorakit.plugin_sdk import LorakitError
from lorakit.trainer.api import train
from lorakit.trainer.models import load_pipeline
from tests.test_train import make_dataset, quiet, settings


def _raw(tmp_path: Path, n: int = 3) -> Path:
    """Noise pictures of about 120 KB each: more than the small disk holds."""
    import numpy as np
    from PIL import Image

    (tmp_path / "raw").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(tmp_path / "raw" / f"img{i}.png")
    return tmp_path / "raw"


def _in_small_tmpfs(tmp_path: Path, script: str, size: str = "64k", read_only: bool = False):
    """Run ``script`` (sh) with a tiny tmpfs mounted at tmp_path/mnt, in a private mount namespace."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare to mount a small file system")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    remount = f" && mount -o remount,ro {mnt}" if read_only else ""
    command = f"mount -t tmpfs -o size={size} none {mnt}{remount} && {script}"
    proc = subprocess.run(["unshare", "-m", "sh", "-c", command], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "200"})
    if "mount:" in proc.stderr or "unshare:" in proc.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()[:200]}")
    return proc


def test_a_full_disk_is_one_clear_error(tmp_path):
    raw = _raw(tmp_path)
    proc = _in_small_tmpfs(tmp_path, f"{sys.executable} -m lorakit alpha {raw} {tmp_path / 'mnt' / 'out'}")
    assert proc.returncode == 1, proc.stderr
    assert "disk is full" in proc.stderr and "ENOSPC" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_read_only_output_is_one_clear_error(tmp_path):
    raw = _raw(tmp_path)
    proc = _in_small_tmpfs(tmp_path, f"{sys.executable} -m lorakit alpha {raw} {tmp_path / 'mnt' / 'out'}",
                           read_only=True)
    assert proc.returncode == 1, proc.stderr
    assert "read-only" in proc.stderr and "Traceback" not in proc.stderr


def test_a_non_writable_output_folder_is_one_clear_error(tmp_path):
    raw = _raw(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        proc = run_cli_unprivileged("alpha", str(raw), str(out))
    finally:
        out.chmod(0o755)
    assert proc.returncode == 1, proc.stderr
    assert "permission denied" in proc.stderr and "Traceback" not in proc.stderr


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {_RunsCode.marker}",))


@pytest.fixture(scope="module")
def saved_state(sd15, tmp_path_factory):
    root = tmp_path_factory.mktemp("state")
    dataset = make_dataset(root / "dataset", subsets=(("outfit", 1, 1),))  # one step per epoch: quick
    out = root / "run" / "lora.safetensors"
    train(dataset, settings(sd15, out, epochs=2, save_every_n_epochs=1, save_state=True), console=quiet())
    return dataset, root / "run" / "lora-000001-state"


@pytest.mark.parametrize("damage", ["no_optimizer", "truncated_lora", "pickle"])
def test_an_incomplete_or_unsafe_training_state_is_refused_on_resume(sd15, saved_state, tmp_path, damage):
    dataset, original = saved_state
    state = tmp_path / "state"
    shutil.copytree(original, state)
    _RunsCode.marker = tmp_path / "code-ran"
    if damage == "no_optimizer":
        (state / "optimizer.pt").unlink()
    elif damage == "no_lora":
        (state / "lora.safetensors").unlink()
    elif damage == "truncated_lora":
        data = (state / "lora.safetensors").read_bytes()
        (state / "lora.safetensors").write_bytes(data[: len(data) // 3])
    elif damage == "bad_json":
        (state / "state.json").write_text('{"epoch": 1')
    else:
        (state / "optimizer.pt").write_bytes(pickle.dumps({"optimizer": _RunsCode(), "scheduler": {}}))
    with pytest.raises(LorakitError, match="resume: "):
        train(dataset, settings(sd15, tmp_path / "b" / "lora.safetensors", epochs=2, resume=str(state)),
              console=quiet())
    assert not _RunsCode.marker.exists()


def test_a_diffusers_folder_of_pickled_weights_is_refused(sd15, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(sd15, folder)
    for weights in folder.rglob("*.safetensors"):
        weights.with_suffix(".bin").write_bytes(b"pickle data, never read")
        weights.unlink()
    with pytest.raises(LorakitError, match="only pickled weights"):
        load_pipeline(folder)
    with pytest.raises(LorakitError, match="VAE: .* only pickled weights"):
        load_pipeline(sd15, vae=folder / "vae")
