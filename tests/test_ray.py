"""The ray executor on a real two-node Ray cluster on loopback (ray.cluster_utils.Cluster: a head and
a worker node, one CPU each, on this machine): the same dataset and store entries as the local process
pool, a broken image set aside with the same reason, a killed worker's images retried, an
interrupted run resumed from the store. Everything Ray writes stays under the test's temp folder."""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image
from rich.console import Console

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from lorakit import chain  # noqa: E402
from lorakit.pipeline import parse_pipeline  # noqa: E402
from lorakit.executors import _probe  # noqa: E402
from lorakit.plugin_sdk import ImageStep, LorakitError, Param  # noqa: E402
from lorakit.plugin_sdk.testing import _host_with  # noqa: E402
from lorakit.runner import Runner  # noqa: E402
from conftest import run_cli  # noqa: E402
from steps_for_tests import CountSetups, KillNode, KillWorker, LoggingStep  # noqa: E402

_TESTS = str(Path(__file__).parent)
_MB = 1024 * 1024


@pytest.fixture(scope="module")
def cluster():
    """A head node and a worker node on this machine; RAY_ADDRESS points lorakit at them. Ray's
    session files and sockets live under a temp folder (nothing under ~ or /tmp/ray)."""
    # A short path: Ray's Unix sockets must fit in 107 characters.
    tmp = tempfile.mkdtemp(prefix="lkray-")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TMPDIR", tmp)
        # Token auth would write ~/.ray/auth_token; this cluster listens on 127.0.0.1 only and dies with the tests.
        mp.setenv("RAY_AUTH_MODE", "disabled")
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        mp.setenv("PYTHONPATH", os.pathsep.join([_TESTS, os.environ.get("PYTHONPATH", "")]))  # test steps
        args = {"num_cpus": 1, "object_store_memory": 80 * _MB}  # on this machine's own address
        # a lost node is noticed in about two seconds, not Ray's default of about fifteen
        fast = {"health_check_period_ms": 500, "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}
        c = Cluster(initialize_head=True, head_node_args={**args, "include_dashboard": False, "_system_config": fast,
                                                          "temp_dir": os.path.join(tmp, "ray")})
        try:
            c.add_node(**args)
            c.wait_for_nodes()
            assert _ray_processes(tmp)  # the leak check below can see this cluster's processes
            mp.setenv("RAY_ADDRESS", c.address)
            ray.init(address=c.address)  # one connection for the module: lorakit uses it and leaves it open
            yield c
        finally:
            if ray.is_initialized():
                ray.shutdown()
            c.shutdown()
    _assert_no_ray_processes(tmp)
    shutil.rmtree(tmp, ignore_errors=True)  # Ray's session logs and sockets


def _ray_processes(tmp: str) -> list[str]:
    """The processes of the cluster whose temp folder is ``tmp`` (their command lines name it)."""
    found = []
    for pid in os.listdir("/proc"):
        try:
            cmd = Path("/proc", pid, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if tmp in cmd and int(pid) != os.getpid():
            found.append(f"{pid}: {cmd[:120]}")
    return found


def _assert_no_ray_processes(tmp: str) -> None:
    """No process of this cluster outlives the tests."""
    left = _ray_processes(tmp)
    assert not left, "Ray processes left running:\n" + "\n".join(left)


def _dataset(folder: Path, n: int = 24) -> Path:
    """Small real pictures with a border to trim and transparency to flatten, and one broken JPEG
    (valid chunks, pixel data that does not decompress: only decoding it finds out, in a worker)."""
    folder.mkdir(parents=True)
    for i in range(n):
        im = Image.new("RGBA", (48 + i, 40), (255, 255, 255, 255))
        for x in range(8, 30 + i):
            for y in range(6, 30):
                im.putpixel((x, y), ((x * 9 + i * 13) % 256, (y * 7) % 256, (x * y) % 256, 128 + (x % 2) * 127))
        im.save(folder / f"img{i:02d}.png")
    (folder / "broken.png").write_bytes(_png_with_garbage_pixels(32, 32))
    return folder


def _png_with_garbage_pixels(width: int, height: int) -> bytes:
    """A PNG whose chunks and checksums are all valid but whose pixel data does not decompress."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"not zlib data" * 4) + chunk(b"IEND", b"")


def _run(tmp_path: Path, raw: Path, out: str, executor: str, steps=None, extra=(), workers=2):
    data = {"output": str(tmp_path / out), "sources": [{"folder": {"path": str(raw)}}],
            "steps": steps or [{"trim": {"fuzz": "5%"}}, {"alpha": {}}, {"logline": {}}]}
    pipeline = parse_pipeline(data, _host_with([LoggingStep, *extra]), tmp_path)
    return Runner(pipeline, console=Console(stderr=True, quiet=True), workers=workers, executor=executor).run()


def _manifest(result) -> dict:
    data = json.loads(result.manifest_path.read_text())
    data.pop("created", None)
    data.pop("pipeline", None)
    return data


def _cache(result) -> dict:
    """The store's cache entries. A chain's memo lists the keys it relies on in the order chunks
    finished, which differs between any two pool runs: that list is compared as a set."""
    db = sqlite3.connect(result.output_dir / ".lorakit" / "index.sqlite")
    try:
        entries = {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM cache")}
    finally:
        db.close()
    for entry in entries.values():
        if isinstance(entry, dict) and isinstance(entry.get("keys"), list):
            entry["keys"] = sorted(entry["keys"])
    return entries


def _blobs(result) -> set[str]:
    return {p.name for p in (result.output_dir / ".lorakit" / "blobs").rglob("*") if p.is_file()}


def _stat(result, name):
    return next(s for s in result.stats if s.name == name)


def test_ray_gives_the_same_dataset_and_store_entries_as_the_local_pool(cluster, tmp_path):
    raw = _dataset(tmp_path / "raw")
    steps = [{"dedupe": {}}, {"trim": {"fuzz": "5%"}}, {"alpha": {}}, {"logline": {}}]  # dedupe: hashes on the workers
    local = _run(tmp_path, raw, "local", "local", steps=steps)
    remote = _run(tmp_path, raw, "ray", "ray", steps=steps)
    assert _manifest(remote) == _manifest(local)
    assert _cache(remote) == _cache(local)
    assert _blobs(remote) == _blobs(local)
    kept = sorted(Path(r.path).stem for r in remote.manifest.images)
    assert len(kept) >= 6 and "broken" in {a.name for a in remote.set_aside}
    # log lines written by steps on the Ray workers reach the summary
    assert sorted(m for m in _stat(remote, "logline").messages if m.startswith("saw ")) == [f"saw {n}" for n in kept]


def test_a_broken_image_is_set_aside_with_the_same_reason_as_locally(cluster, tmp_path):
    raw = _dataset(tmp_path / "raw", n=3)
    local = _run(tmp_path, raw, "local", "local", workers=1)
    remote = _run(tmp_path, raw, "ray", "ray")
    [aside] = remote.set_aside
    assert aside.name == "broken" and aside.step == "trim"
    assert str(raw / "broken.png") in aside.reason
    assert [(a.name, a.step, a.reason) for a in local.set_aside] == [(aside.name, aside.step, aside.reason)]
    assert len(remote.manifest.images) == 3


def test_the_ray_executor_without_ray_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails as if it were not installed
    raw = _dataset(tmp_path / "raw", n=1)
    with pytest.raises(LorakitError, match=r"pip install 'lorakit\[ray\]'"):
        _run(tmp_path, raw, "out", "ray")


def test_each_ray_worker_sets_a_step_up_once_for_many_chunks(cluster, tmp_path):
    raw = _dataset(tmp_path / "raw", n=11)
    (tmp_path / "marks").mkdir()
    res = _run(tmp_path, raw, "out", "ray", steps=[{"countsetups": {"marks": str(tmp_path / "marks")}}],
               extra=[CountSetups], workers=2)
    assert len(res.manifest.images) + len(res.set_aside) == 12  # 12 chunks of one image (few images, 2 workers)
    workers = {p.name for p in (tmp_path / "marks").iterdir()} - {str(os.getpid())}  # the driver sets up too
    assert 1 <= len(workers) <= 2


class GpuModelStep(ImageStep):
    """A model step (workers = 1) whose device option asks for CUDA."""

    name = "gpumodel"
    summary = "A model step on CUDA (test step)."
    workers = 1
    params = [Param("device", str, "cuda", "where the model runs")]

    def process(self, item, ctx):
        return item


def test_a_model_step_asks_ray_for_a_gpu_when_its_device_wants_one():
    assert GpuModelStep.configure().resources(cluster_has_gpus=False) == {"num_cpus": 1, "num_gpus": 1}
    auto = GpuModelStep.configure({"device": "auto"})
    assert auto.resources(cluster_has_gpus=True) == {"num_cpus": 1, "num_gpus": 1}
    assert auto.resources(cluster_has_gpus=False) == {"num_cpus": 1}
    assert GpuModelStep.configure({"device": "cpu"}).resources(cluster_has_gpus=True) == {"num_cpus": 1}
    assert LoggingStep.configure().resources(cluster_has_gpus=True) == {"num_cpus": 1}  # not a model step


def test_a_gpu_step_on_a_cluster_without_gpus_stops_with_a_clear_error(cluster, tmp_path):
    raw = _dataset(tmp_path / "raw", n=2)
    with pytest.raises(LorakitError, match=r"step 'gpumodel' needs 1 CPU and 1 GPU per worker.*device: cpu"):
        _run(tmp_path, raw, "out", "ray", steps=[{"gpumodel": {}}], extra=[GpuModelStep])


def test_the_node_check_names_what_a_node_cannot_see_or_import(tmp_path):
    store_file = tmp_path / "probe"
    store_file.write_text("token")
    from lorakit.plugins.trim import TrimStep

    ok = _probe(str(store_file), "token", [str(store_file)], [("lorakit.plugins.trim", "TrimStep", TrimStep.version)])
    assert ok["problems"] == []
    wrong = _probe(str(store_file), "another run's token", [str(tmp_path / "gone.png")],
                   [("lorakit_no_such_plugin", "Step", "1"), ("lorakit.plugins.trim", "TrimStep", "999")])
    assert wrong["problems"][0].startswith(f"cannot read {store_file}, which the driver wrote into the store")
    assert f"cannot read the source file {tmp_path / 'gone.png'}" in wrong["problems"][1]
    assert "cannot import the step lorakit_no_such_plugin.Step" in wrong["problems"][2]
    assert "step lorakit.plugins.trim.TrimStep is version" in wrong["problems"][3]


def test_executor_settings_are_checked_before_any_work(tmp_path):
    raw = _dataset(tmp_path / "raw", n=1)
    (tmp_path / "p.yaml").write_text(f"output: out\nexecutor: spark\nsources:\n  - folder: {{path: {raw}}}\n")
    bad = run_cli("validate", str(tmp_path / "p.yaml"))
    assert bad.returncode != 0 and "executor must be local or ray, not 'spark'" in bad.stderr
    (tmp_path / "p.yaml").write_text(f"output: out\nsources:\n  - folder: {{path: {raw}}}\n")
    stray = run_cli("run", str(tmp_path / "p.yaml"), "--ray-address", "127.0.0.1:1")
    assert stray.returncode != 0 and "--ray-address is for the ray executor" in stray.stderr
    assert not (tmp_path / "out").exists()
    (tmp_path / "p.yaml").write_text(f"output: out2\nsources:\n  - folder: {{path: {raw}}}\nsteps: [trim]\n")
    nobody = run_cli("run", str(tmp_path / "p.yaml"), "--executor", "ray", "--ray-address", "127.0.0.1:1")
    assert nobody.returncode != 0 and "cannot reach the Ray cluster at 127.0.0.1:1" in nobody.stderr


def test_a_killed_ray_worker_loses_no_image(cluster, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    names = [f"img{i:02d}" for i in range(14)] + ["once_a", "once_b"]
    for i, name in enumerate(names):
        Image.new("RGB", (8 + i, 8), (i * 9, 40, 0)).save(raw / f"{name}.png")
    (tmp_path / "marks").mkdir()
    res = _run(tmp_path, raw, "out", "ray", steps=[{"killworker": {"marks": str(tmp_path / "marks")}}],
               extra=[KillWorker])
    assert len(res.manifest.images) == len(names) and not res.set_aside and not res.crashed
    assert all("survived" in r.caption for r in res.manifest.images)
    assert any("restarted" in m for s in res.stats for m in s.messages)


def test_an_interrupted_ray_run_resumes_from_the_store(cluster, tmp_path, monkeypatch):
    raw = _dataset(tmp_path / "raw")
    take = chain.ChainPlan.take
    taken = []

    def interrupt_after_three_chunks(self, job, tree):
        if len(taken) >= 9:  # three chunks of three images (24 jobs over 2 workers)
            raise KeyboardInterrupt
        taken.append(job)
        take(self, job, tree)

    monkeypatch.setattr(chain.ChainPlan, "take", interrupt_after_three_chunks)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, raw, "out", "ray")
    monkeypatch.setattr(chain.ChainPlan, "take", take)
    resumed = _run(tmp_path, raw, "out", "ray")
    trim = _stat(resumed, "trim")
    assert (trim.cached, trim.computed) == (9, 25 - 9)  # the images finished before the interrupt are not redone
    fresh = _run(tmp_path, raw, "fresh", "local", workers=1)
    assert _manifest(resumed) == _manifest(fresh)


@ray.remote(num_cpus=1)
class _HoldACpu:
    def where(self):
        return ray.get_runtime_context().get_node_id()


def _run_while_held(tmp_path, monkeypatch, cpus: int, hold_for: float, grace: float):
    """A ray run of 16 small pictures while other work (``cpus`` plain actors) holds that many of
    the cluster's CPUs, freed after ``hold_for`` seconds or when the run ends, whichever is first
    (so a run that hangs finishes and its test fails rather than hangs). Returns whether the run
    was still going when the CPUs were freed, and its result."""
    import threading

    from lorakit.executors import RayExecutor

    monkeypatch.setattr(RayExecutor, "start_grace", grace)
    holders = [_HoldACpu.remote() for _ in range(cpus)]
    ray.get([h.where.remote() for h in holders])  # placed: those CPUs are taken
    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(16):
        Image.new("RGB", (8 + i, 8), (i * 9, 40, 0)).save(raw / f"img{i:02d}.png")
    outcome = {}
    run = threading.Thread(target=lambda: outcome.update(res=_run(tmp_path, raw, "out", "ray", steps=[{"logline": {}}])))
    run.start()
    run.join(timeout=hold_for)
    going = run.is_alive()
    for h in holders:
        ray.kill(h)
    run.join(timeout=180)
    assert not run.is_alive()
    res = outcome["res"]
    assert len(res.manifest.images) == 16 and not res.set_aside and not res.crashed
    return going, res


def test_a_worker_ray_cannot_start_gives_its_images_to_one_that_did(cluster, tmp_path, monkeypatch):
    """The cluster counts two CPUs, but another job holds one: of the two workers the run asks for,
    Ray can start one. The chunks sent to the other (which would wait for ever, as after a node is
    lost while the cluster still counts its CPUs) go to the one that started."""
    hung, res = _run_while_held(tmp_path, monkeypatch, cpus=1, hold_for=180, grace=2.0)
    assert not hung, "the run waited on a worker Ray could not start"
    lines = [m for s in res.stats for m in s.messages]
    assert any("could not start 1 of 2 workers" in m for m in lines), lines
    assert not any("restarted" in m for m in lines)  # not counted as a crash: nothing ran on it


def test_a_run_whose_workers_cannot_start_waits_and_says_so(cluster, tmp_path, monkeypatch):
    """Other work holds every CPU of the cluster: the run waits for it (it must not give up or set
    images aside) and says, while it waits, why nothing happens."""
    waited, res = _run_while_held(tmp_path, monkeypatch, cpus=2, hold_for=12, grace=1.0)  # past the grace and a watch
    assert waited
    lines = [m for s in res.stats for m in s.messages]
    assert any("no Ray worker (1 CPU, 0 GPU each) has started in 1 s" in m for m in lines), lines


def test_the_images_of_a_lost_node_are_retried_on_the_others(cluster, tmp_path):
    """Last in the module: the worker node is killed for good."""
    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(16):
        Image.new("RGB", (8 + i, 8), (i * 9, 40, 0)).save(raw / f"img{i:02d}.png")
    (tmp_path / "marks").mkdir()
    worker_node = next(iter(cluster.worker_nodes)).node_id
    res = _run(tmp_path, raw, "out", "ray", extra=[KillNode],
               steps=[{"killnode": {"node_id": worker_node, "marks": str(tmp_path / "marks")}}])
    assert (tmp_path / "marks" / "killed").exists()  # the node did die under the run
    assert len(res.manifest.images) == 16 and not res.set_aside and not res.crashed
    assert all("survived" in r.caption for r in res.manifest.images)
    assert any("restarted" in m for s in res.stats for m in s.messages)
    # Ray marks the node dead after its health checks fail (about 2 s here), which can be after the
    # run has finished on the other node
    deadline = time.monotonic() + 60
    while [n["Alive"] for n in ray.nodes()].count(True) != 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert [n["Alive"] for n in ray.nodes()].count(True) == 1
