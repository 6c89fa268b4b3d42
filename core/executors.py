"""Where per-image work runs: the local process pool, or the actors of a Ray cluster.

The runner plans a chain of per-image steps (chain.py) and hands chunks of jobs to an executor; it
keeps everything else (the cache, the SQLite index, retries of lost work, set-aside, the summary)
to itself, so a run behaves the same on either executor. An executor only has to:

* say how many workers a chain gets (``workers``), and whether to leave this process at all;
* run ``chain.worker_jobs(plans, jobs)`` on a worker and return a ``concurrent.futures.Future``
  (``submit``); a worker that died (kill -9, the out-of-memory killer, a node that went away)
  fails its futures with ``WorkerLost`` (a ``BrokenProcessPool``), which the runner retries;
* replace lost workers (``restart``) and stop (``shutdown``);
* every few seconds while chunks are pending, look for work that sits on a worker that never
  started (``watch``): such a chunk fails with ``WorkerNeverStarted`` and the runner submits it again, not
  counted as a crash. Only the Ray executor can have such workers (an actor Ray cannot place).

``ray`` is imported only by ``RayExecutor``, only when chosen (``pip install 'lorakit[ray]'``).
"""
from __future__ import annotations

import multiprocessing
import os
import secrets
import socket
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from lorakit.plugin_sdk import LorakitError

from . import chain

EXECUTORS = ("local", "ray")
RAY_MISSING = "the ray executor needs Ray, which is not installed: pip install 'lorakit[ray]'"


class WorkerLost(BrokenProcessPool):
    """A worker process, or the machine it ran on, died holding a chunk of images (retried)."""


class WorkerNeverStarted(Exception):
    """A chunk was handed to a worker that never started (Ray could not place the actor); the runner
    submits it again. Not a crash: nothing ran."""


class Executor:
    """The interface the runner uses for per-image work (see the module docstring)."""

    name = ""

    def workers(self, step, plans: list[chain.StepPlan], requested: int | None, n_jobs: int) -> tuple[int, bool]:
        """(workers for this chain, whether to run it on them rather than in this process)."""
        raise NotImplementedError

    def submit(self, n_workers: int, plans: list[chain.StepPlan], jobs: list[tuple[dict, int]]) -> Future:
        raise NotImplementedError

    def restart(self) -> None:
        """After a lost worker: fresh workers for the next submissions."""
        self.shutdown(cancel=True)

    def watch(self) -> list[str]:
        """Called every few seconds (the runner's ``_WATCH_SECONDS``) while chunks are pending: fail
        (with ``WorkerNeverStarted``) the chunks held by workers that will not start, and return
        lines for the run's log (the runner also prints them as they come)."""
        return []

    def shutdown(self, cancel: bool = False) -> None:
        raise NotImplementedError


def create(kind: str | None, store_root: Path, address: str | None = None) -> Executor:
    kind = kind or "local"
    if kind == "local":
        return LocalExecutor(store_root)
    if kind == "ray":
        return RayExecutor(store_root, address)
    raise LorakitError(f"executor must be one of {', '.join(EXECUTORS)}, not {kind!r}")


# ----- local: one pool of spawned processes for the whole run ---------------------------------------
class LocalExecutor(Executor):
    name = "local"

    def __init__(self, store_root: Path):
        self.store_root = Path(store_root)
        self._pool: ProcessPoolExecutor | None = None
        self._size = 0

    def workers(self, step, plans, requested, n_jobs):
        n = step.workers or requested or os.cpu_count() or 1
        return n, n > 1 and n_jobs >= max(16, 4 * n)  # below that, process start-up costs more

    def submit(self, n_workers, plans, jobs):
        # Starting processes costs about a second: the pool is kept for the run and only grows.
        if self._pool is None or self._size < n_workers:
            self.shutdown()
            self._pool = ProcessPoolExecutor(max_workers=n_workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=chain.init_worker, initargs=(str(self.store_root),))
            self._size = n_workers
        return self._pool.submit(chain.worker_jobs, plans, jobs)

    def shutdown(self, cancel: bool = False) -> None:
        if self._pool is not None:
            # Interrupted: stop the workers now rather than wait for the images they are on (an
            # upscale can take minutes); their results were not cached, so a re-run redoes them.
            workers = list((getattr(self._pool, "_processes", None) or {}).values()) if cancel else []
            self._pool.shutdown(wait=not cancel, cancel_futures=cancel)
            for proc in workers:
                if proc.is_alive():
                    proc.terminate()
            self._pool = None


# ----- Ray: actors that each hold the configured steps of the run ------------------------------------
class ChainWorker:
    """One Ray actor: a worker process like a local pool's, kept for the run (models load once)."""

    def __init__(self, store_root: str):
        chain.init_worker(store_root)

    def run(self, plans, jobs):
        return chain.worker_jobs(plans, jobs)

    def ready(self) -> bool:
        """The actor's first task: its answer says the actor was placed and started."""
        return True


def _probe(store_file: str, token: str, sources: list[str], classes: list[tuple[str, str, str]]) -> dict:
    """Run on each node: can it see the store (and write to it) and the source files, and does it
    have the same steps (module, class, version) as the driver?"""
    import importlib

    problems = []
    try:
        seen = Path(store_file).read_text(encoding="utf-8") == token
    except OSError:
        seen = False
    if not seen:
        problems.append(f"cannot read {store_file}, which the driver wrote into the store")
    else:
        try:
            probe = Path(store_file + ".node-" + secrets.token_hex(4))
            probe.write_text(token, encoding="utf-8")
            probe.unlink()
        except OSError as exc:
            problems.append(f"cannot write into the store ({exc.strerror or exc})")
    missing = [s for s in sources if not os.access(s, os.R_OK)]
    if missing:
        problems.append(f"cannot read the source file {missing[0]}" + (f" (and {len(missing) - 1} more)"
                                                                       if len(missing) > 1 else ""))
    for module, qualname, version in classes:
        try:
            cls = importlib.import_module(module)
            for part in qualname.split("."):
                cls = getattr(cls, part)
        except Exception as exc:  # noqa: BLE001 - any import failure is the node's problem to report
            problems.append(f"cannot import the step {module}.{qualname} ({type(exc).__name__}: {exc}); "
                            "install the same lorakit and plugins on every node")
            continue
        if str(getattr(cls, "version", "")) != version:
            problems.append(f"step {module}.{qualname} is version {getattr(cls, 'version', '?')} there, "
                            f"{version} on the driver; install the same lorakit and plugins on every node")
    return {"host": socket.gethostname(), "problems": problems}


def _check_reachable(address: str) -> None:
    """A head node's host:port that does not answer is a clear error now (Ray itself retries for minutes)."""
    host, sep, port = address.rpartition(":")
    if address in ("auto", "local") or "://" in address or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as exc:
        raise LorakitError(f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}): is the head node "
                           "running (ray start --head), and is this its address and port?") from None


class RayExecutor(Executor):
    """Per-image work as Ray actor tasks: each actor is a worker process holding the configured
    steps (models load once per actor), asking Ray for the resources its chain declares
    (``ImageStep.resources``). Results are written by the actors into the store (which every
    node must see at the same path; checked before the first chunk) and come back as states."""

    name = "ray"
    #: An actor that has not started this many seconds after it was asked for, while another of the
    #: same shape runs, is given up: Ray cannot place it (its node died as it was asked for, or the
    #: cluster's free CPUs/GPUs are held by others). Its chunks go to the actors that did start.
    start_grace = 60.0

    def __init__(self, store_root: Path, address: str | None = None):
        try:
            import ray
        except ImportError:
            raise LorakitError(RAY_MISSING) from None
        self.ray = ray
        self.store_root = Path(store_root).resolve()
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self._owns_connection = False
        self._actors: dict[tuple, list] = {}  # resource shape -> live actor handles
        self._load: dict[Any, int] = {}  # actor -> chunks in flight
        self._plan_refs: dict[int, tuple[Any, Any]] = {}  # id(plans) -> (plans, object ref)
        self._checked: set[tuple] = set()
        self._remote_cls = None
        self._asked: dict[Any, float] = {}  # actor -> when it was asked for (until it starts)
        self._started: set = set()  # actors whose ready() answered
        self._dropped: set = set()  # actors given up by watch(); their chunks fail as WorkerNeverStarted
        self._ceiling: dict[tuple, int] = {}  # shape -> the most actors Ray could start of it
        self._waiting: set[tuple] = set()  # shapes of which no actor started (said once)

    # ----- connection --------------------------------------------------------------------------
    def _connect(self) -> None:
        ray = self.ray
        if ray.is_initialized():
            return
        import logging

        # No address: a Ray instance of this machine's own, never a cluster found by guessing.
        address = self.address or "local"
        _check_reachable(address)
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                     configure_logging=True)
        except ConnectionError as exc:
            raise LorakitError(f"cannot connect to the Ray cluster at {address}: {exc}") from None
        except ValueError as exc:
            raise LorakitError(f"Ray address {address!r}: {exc}") from None
        self._owns_connection = True

    def _alive_resources(self) -> tuple[float, float]:
        cpus = gpus = 0.0
        for node in self.ray.nodes():
            if node.get("Alive"):
                cpus += node["Resources"].get("CPU", 0.0)
                gpus += node["Resources"].get("GPU", 0.0)
        return cpus, gpus

    def _shape(self, plans) -> tuple[float, float]:
        """What one worker of the chain needs: the largest need of its steps."""
        _, gpus = self._alive_resources()
        need_cpu = need_gpu = 0.0
        for plan in plans:
            res = plan.step.resources(cluster_has_gpus=gpus > 0)
            need_cpu = max(need_cpu, float(res.get("num_cpus", 1)))
            need_gpu = max(need_gpu, float(res.get("num_gpus", 0)))
        return need_cpu, need_gpu

    def _capacity(self, shape: tuple[float, float]) -> int:
        cpus, gpus = self._alive_resources()
        fits = [int(cpus // shape[0]) if shape[0] else None, int(gpus // shape[1]) if shape[1] else None]
        fits = [f for f in fits if f is not None]
        return min(fits) if fits else int(cpus)

    # ----- the executor interface ------------------------------------------------------------------
    def workers(self, step, plans, requested, n_jobs):
        self._connect()
        shape = self._shape(plans)
        capacity = self._capacity(shape)
        if capacity < 1:
            names = "+".join(p.name for p in plans)
            raise LorakitError(f"step '{names}' needs {shape[0]:g} CPU and {shape[1]:g} GPU per worker, and no "
                               "node of the Ray cluster has that free; add such a node, or set device: cpu")
        # Every chain leaves the driver (which may be a login node without a GPU), even a small one.
        return (min(capacity, requested) if requested else capacity), True

    def submit(self, n_workers, plans, jobs):
        ray = self.ray
        self._connect()
        shape = self._shape(plans)
        self._check_nodes(plans, jobs)
        actors = self._actors.setdefault(shape, [])
        n_workers = max(1, min(n_workers, self._capacity(shape), self._ceiling.get(shape, n_workers)))
        while len(actors) < n_workers:
            if self._remote_cls is None:
                self._remote_cls = ray.remote(max_restarts=0, max_task_retries=0)(ChainWorker)
            actor = self._remote_cls.options(num_cpus=shape[0], num_gpus=shape[1]).remote(str(self.store_root))
            actors.append(actor)
            self._load[actor] = 0
            self._asked[actor] = time.monotonic()
            # Tasks of one caller run on an actor in the order they were sent: this one runs first.
            actor.ready.remote().future().add_done_callback(lambda f, a=actor: self._on_ready(a, f))
        # a started actor before one still waiting to be placed, then the least loaded
        actor = min(actors[:n_workers], key=lambda a: (a not in self._started, self._load[a]))
        self._load[actor] += 1
        ref = actor.run.remote(self._plans_ref(plans), jobs)
        out: Future = Future()
        out.set_running_or_notify_cancel()

        def relay(done) -> None:
            self._load[actor] = max(0, self._load.get(actor, 1) - 1)
            try:
                out.set_result(done.result())
            except ray.exceptions.RayActorError as exc:
                if actor in self._dropped:  # given up by watch() before it started: nothing ran
                    out.set_exception(WorkerNeverStarted(f"its Ray worker never started ({type(exc).__name__})"))
                else:
                    self._forget(actor)
                    out.set_exception(WorkerLost(f"a Ray worker died: {type(exc).__name__}"))
            except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                    ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError, ray.exceptions.LocalRayletDiedError) as exc:
                self._forget(actor)
                out.set_exception(WorkerLost(f"a Ray worker died: {type(exc).__name__}"))
            except ray.exceptions.RayTaskError as exc:  # the chunk's own exception (a full disk, say)
                cause = getattr(exc, "cause", None)
                out.set_exception(cause if isinstance(cause, BaseException) else exc)
            except BaseException as exc:  # noqa: BLE001 - handed to the runner, which decides
                out.set_exception(exc)

        ref.future().add_done_callback(relay)
        return out

    def _plans_ref(self, plans):
        """The chain's plans go into Ray's object store once and travel to each actor by reference."""
        held = self._plan_refs.get(id(plans))
        if held is None or held[0] is not plans:
            held = self._plan_refs[id(plans)] = (plans, self.ray.put(plans))
        return held[1]

    def _forget(self, actor) -> None:
        for actors in self._actors.values():
            if actor in actors:
                actors.remove(actor)
        self._load.pop(actor, None)
        self._asked.pop(actor, None)
        self._started.discard(actor)

    def _on_ready(self, actor, done) -> None:
        if done.exception() is None:
            self._started.add(actor)
            self._asked.pop(actor, None)

    def watch(self) -> list[str]:
        """Give up the actors Ray has not started ``start_grace`` seconds after they were asked for,
        where another actor of the same shape did start (so the work has somewhere to go). Where
        none started, nothing is given up: the cluster is busy and the run waits for it."""
        lines = []
        now = time.monotonic()
        for shape, actors in self._actors.items():
            started = [a for a in actors if a in self._started]
            stuck = [a for a in actors if a not in self._started and now - self._asked.get(a, now) > self.start_grace]
            if stuck and not started and shape not in self._waiting:
                self._waiting.add(shape)  # said once per shape: the run waits, as it should, but not silently
                lines.append(f"no Ray worker ({shape[0]:g} CPU, {shape[1]:g} GPU each) has started in "
                             f"{self.start_grace:g} s: the cluster's free resources are held by other work "
                             "(`ray status` shows them); waiting for them")
            if not started or not stuck:
                continue
            for actor in stuck:
                self._dropped.add(actor)
                self._forget(actor)
                try:
                    self.ray.kill(actor, no_restart=True)  # its queued chunks fail: WorkerNeverStarted
                except Exception:  # noqa: BLE001 - an actor that is gone already
                    pass
            self._ceiling[shape] = len(started)
            lines.append(f"Ray could not start {len(stuck)} of {len(stuck) + len(started)} workers "
                         f"({shape[0]:g} CPU, {shape[1]:g} GPU each) within {self.start_grace:g} s (a node lost, or "
                         f"its resources held by other work); their images went to the {len(started)} that started")
        return lines

    def restart(self) -> None:
        """Lost actors were already dropped; the live ones (their models loaded) are kept."""

    def shutdown(self, cancel: bool = False) -> None:
        ray = self.ray
        if ray.is_initialized():
            for actors in self._actors.values():
                for actor in actors:
                    try:
                        ray.kill(actor)
                    except Exception:  # noqa: BLE001 - an actor that is gone already
                        pass
        self._actors.clear()
        self._load.clear()
        self._plan_refs.clear()
        self._asked.clear()
        self._started.clear()
        self._dropped.clear()
        self._waiting.clear()
        if self._owns_connection and ray.is_initialized():
            ray.shutdown()  # a Ray instance lorakit started stops with the run; a cluster's keeps running
            self._owns_connection = False

    # ----- checks before the first chunk of a chain ----------------------------------------------------
    def _check_nodes(self, plans, jobs) -> None:
        """Every node must see the store and the sources at the same paths and have the same steps:
        one probe task per live node, pinned to it, before the chain's first chunk."""
        steps = [p.step for p in plans] + [getattr(p.step, "step", None) for p in plans]  # a wrapped step (prepare)
        classes = tuple(sorted({(type(s).__module__, type(s).__qualname__, str(getattr(type(s), "version", "")))
                                for s in steps if s is not None}))
        if classes in self._checked:
            return
        ray = self.ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        token = secrets.token_hex(16)
        store_file = self.store_root / "tmp" / f"ray-probe-{token[:12]}"
        store_file.parent.mkdir(parents=True, exist_ok=True)
        store_file.write_text(token, encoding="utf-8")
        sources = sorted({st["image_path"] for st, _ in jobs if st.get("image_path")})[:8]
        probe = ray.remote(num_cpus=0, max_retries=0)(_probe)
        try:
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            refs = {n["NodeManagerAddress"]: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
                n["NodeID"], soft=False)).remote(str(store_file), token, sources, list(classes)) for n in nodes}
            for address, ref in refs.items():
                try:
                    answer = ray.get(ref, timeout=120)
                except Exception as exc:  # noqa: BLE001 - a node that cannot even run the probe
                    raise LorakitError(f"Ray node {address} could not run lorakit's check: {exc}") from None
                if answer["problems"]:
                    raise LorakitError(
                        f"Ray node {address} ({answer['host']}): {answer['problems'][0]}. Every node must see the "
                        f"work store {self.store_root} (put cache_dir: on storage every node mounts at the same "
                        "path, e.g. NFS) and the sources at the same paths.")
        finally:
            store_file.unlink(missing_ok=True)
        self._checked.add(classes)
