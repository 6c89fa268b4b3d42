"""Runs a pipeline: sources -> steps -> dataset folder with manifest.json.

Per-image steps run over worker processes and every result is cached by content (see store.py),
so an unchanged re-run does nothing, an interrupted run resumes, and an image a step cannot handle
is set aside with the step and reason while the run goes on.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from lorakit.plugin_sdk import (
    DatasetStep, ImageError, ImageStep, Item, LorakitError, PathEscape, SkipImage, SourceStep, StepContext, Subset,
    TMP_PREFIX, atomic_path, atomic_write_text, check_relative, confined_path, image_size, is_partial_file, is_storage_error,
    reason_of,
    verify_image,
)

from . import curation as curation_stage
from .manifest import MANIFEST_NAME, ImageRecord, Manifest, SetAsideRecord
from .pipeline import ConfiguredStep, Pipeline
from .store import State, Store, content_of, digest, sha256_file

STORE_DIR = ".lorakit"
CURATION_INPUT = "curation-input.json"  # the states before the curation stage (apply_to_dataset redoes it)
ID_META = "_lorakit_id"  # carries image ids through dataset steps
# Restarts of a step's worker pool without one image finishing before the step is given up.
_MAX_BLIND_RESTARTS = 4
# A step that sets aside more than this share of its images for errors (not decisions) fails the run.
_MOST = 0.5


@dataclass
class StepStats:
    name: str
    kind: str
    inputs: int = 0
    outputs: int = 0
    set_aside: int = 0
    cached: int = 0
    computed: int = 0
    seconds: float = 0.0
    messages: list[str] = field(default_factory=list)


@dataclass
class RunResult:
    output_dir: Path
    manifest_path: Path
    manifest: Manifest
    stats: list[StepStats]
    set_aside: list[SetAsideRecord]
    curation: curation_stage.CurationResult | None = None
    crashed: list[str] = field(default_factory=list)  # images that killed a worker process: the run failed

    @property
    def nothing_changed(self) -> bool:
        return all(s.computed == 0 for s in self.stats)


# ----- worker side --------------------------------------------------------------------------
_WORKER: dict[str, Any] = {"steps": {}}


def _init_worker(store_root: str) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle: no worker tracebacks
    _WORKER["store"] = Store(Path(store_root))


def _worker_chunk(step: ImageStep, step_key: str, ctx: StepContext, states: list[State]) -> tuple[list[dict], list[str]]:
    """Run one chunk in a worker. The pool outlives a step, so each configured step is set up once
    per worker process and kept (its models stay loaded) for the rest of the run."""
    steps = _WORKER["steps"]
    if step_key not in steps:
        step.setup(ctx)
        steps[step_key] = step
    results = apply_image_step(steps[step_key], ctx, _WORKER["store"], states)
    return results, list(ctx.messages)  # log lines travel back to the main process with the results


def apply_image_step(step: ImageStep, ctx: StepContext, store: Store, states: list[State]) -> list[dict]:
    """Run ``step`` on ``states``; each result is {"outputs": [...]} or {"aside": reason, "final": bool}."""
    items = [store.item_from_state(s) for s in states]
    try:
        outs = step.process_batch(items, ctx)
        if len(outs) != len(items):
            raise RuntimeError(f"process_batch returned {len(outs)} results for {len(items)} images")
    except Exception as exc:  # a whole batch failing sets each of its images aside
        outs = [exc] * len(items)
    results: list[dict] = []
    for out in outs:
        if is_storage_error(out):
            raise out  # a full or read-only disk is not about this image: the run stops with a clear message
        if isinstance(out, BaseException):
            # Decisions (SkipImage) and unreadable files are final and cached; other errors are retried.
            results.append({"aside": reason_of(out), "final": isinstance(out, (SkipImage, ImageError))})
            continue
        produced = out if isinstance(out, list) else [out]
        bad = [o for o in produced if not isinstance(o, Item)]
        if bad:
            results.append({"aside": f"step returned {type(bad[0]).__name__}, not an Item", "final": False})
            continue
        try:
            results.append({"outputs": [store.state_from_item(o) for o in produced]})
        except Exception as exc:
            if is_storage_error(exc):
                raise
            results.append({"aside": reason_of(exc), "final": False})
    return results


# ----- the runner ---------------------------------------------------------------------------
class Runner:
    def __init__(self, pipeline: Pipeline, console: Console | None = None, workers: int | None = None,
                 force: bool = False):
        self.pipeline = pipeline
        self.force = force  # overwrite files in the output that lorakit did not write
        self.console = console or Console(stderr=True)
        self.workers = workers or pipeline.workers
        self.output = pipeline.output
        self.store = Store(pipeline.cache_dir or self.output / STORE_DIR)
        self.subsets: dict[str, Subset] = {}
        self.set_aside: list[tuple[State, str, str]] = []  # (state, step, reason)
        self.stats: list[StepStats] = []
        self._executor: ProcessPoolExecutor | None = None
        self.crashed: list[str] = []  # images set aside because they killed a worker process
        self._executor_size = 0
        curation_file = (curation_stage.curation_path_for(pipeline.path) if pipeline.path is not None
                         else self.output / curation_stage.DATASET_CURATION_NAME)
        self.curation = curation_stage.Curation(curation_file, self.output)
        self._restored: set[str] = set()

    def _ctx(self, step) -> StepContext:
        work = self.store.root / "steps" / step.name
        tmp = self.store.tmp / step.name
        work.mkdir(parents=True, exist_ok=True)
        tmp.mkdir(parents=True, exist_ok=True)
        return StepContext(step_name=step.name, work_dir=work, tmp_dir=tmp, output_dir=self.output,
                           resolution=self.pipeline.resolution, subsets=self.subsets, console=self.console,
                           train=dict(self.pipeline.train or {}))

    def _progress(self) -> Progress:
        return Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, transient=False)

    # ----- main entry ------------------------------------------------------------------------
    def run(self) -> RunResult:
        try:
            return self._run()
        except BaseException:
            self._shutdown_pool(cancel=True)
            raise
        finally:
            self._shutdown_pool()

    def _run(self) -> RunResult:
        self.output.mkdir(parents=True, exist_ok=True)
        _remove_partial_files(self.output)
        # hand edits in the folder go into the curation file before anything rewrites the folder
        hand = curation_stage.take_hand_edits(self.output, self.curation, self._ledger())
        self._restored = curation_stage.restored_ids(self.curation.edits())
        states = self._run_sources()
        self._apply_subset_config(states)
        states = curation_stage.early_moves(states, self.curation.edits())
        self._ensure_subsets(states)
        for cfg in self.pipeline.steps:
            if isinstance(cfg.step, ImageStep):
                states = self._run_image_step(cfg, states)
            elif isinstance(cfg.step, DatasetStep):
                states = self._run_dataset_step(cfg, states)
            self._ensure_subsets(states)
        if not states:
            self._refuse_empty_dataset()
        manifest, curated = self.finish(states, hand)
        return RunResult(self.output, self.output / MANIFEST_NAME, manifest, self.stats,
                         manifest.set_aside, curated, list(self.crashed))

    def _refuse_empty_dataset(self) -> None:
        """A run that would write a dataset of no images failed: say why, leave the output as it was."""
        if not self.set_aside:
            raise LorakitError(f"no images: the sources gave none, so there is no dataset to write ({self.output} "
                               "was not changed). Check the source paths and searches.")
        reasons = Counter(f"{step}: {reason}" for _, step, reason in self.set_aside).most_common(3)
        listed = "; ".join(f"{n} x {reason}" for reason, n in reasons)
        raise LorakitError(f"every image was set aside ({len(self.set_aside)}), so the dataset would be empty; "
                           f"{self.output} was not changed. Most common reasons: {listed}")

    # ----- the curation stage (last of every run) ---------------------------------------------
    def finish(self, states: list[State], hand=None, save_input: bool = True):
        """Apply the curation file to the final states, then write the dataset folder and manifest."""
        t0 = time.perf_counter()
        input_path = self.output / STORE_DIR / CURATION_INPUT
        try:
            previous = json.loads(input_path.read_text(encoding="utf-8")).get("applied")
        except (FileNotFoundError, json.JSONDecodeError, AttributeError):
            previous = None
        edits = self.curation.edits()
        digest_now = self.curation.digest()
        if save_input:
            self._save_curation_input(input_path, states, digest_now)
        else:
            _set_applied(input_path, digest_now)
        n_in = len(states)
        states = [self._adopt_rejected_mask(s) for s in states]
        states, self.set_aside, result = curation_stage.apply_to_states(states, self.set_aside, edits,
                                                                        self.curation.path)
        result.hand = hand
        result.changed = digest_now != previous or bool(hand)
        self._ensure_subsets(states)
        stats = StepStats("curation", "curation", inputs=n_in, outputs=len(states), set_aside=len(result.excluded),
                          computed=int(result.changed), cached=0 if result.changed else n_in)
        stats.messages = result.messages()
        manifest = self._materialise(states)
        try:
            manifest.curation = os.path.relpath(self.curation.path.resolve(), self.output.resolve())
        except ValueError:  # another drive (Windows)
            manifest.curation = str(self.curation.path.resolve())
        manifest.save()
        stats.seconds = time.perf_counter() - t0
        self.stats.append(stats)
        return manifest, result

    def _save_curation_input(self, path: Path, states: list[State], applied: str) -> None:
        atomic_write_text(path, json.dumps({
            "version": 1, "applied": applied, "store": _store_ref(self.store.root, self.output), "states": states,
            "set_aside": [list(x) for x in self.set_aside],
            "subsets": {n: s.to_dict() for n, s in self.subsets.items()},
            "pipeline_subsets": self.pipeline.subsets, "resolution": self.pipeline.resolution,
            "pipeline": _jsonable(self.pipeline.raw),
        }, ensure_ascii=False, default=str))

    def _adopt_rejected_mask(self, state: State) -> State:
        """A mask a step rejected but kept (meta ``rejected_mask_file``) becomes the state's
        ``rejected_mask``: written under set_aside/masks/, and a mask a person can accept."""
        kept = (state.get("meta") or {}).get("rejected_mask_file")
        if not kept:
            return state
        state = dict(state, meta={k: v for k, v in state["meta"].items() if k != "rejected_mask_file"})
        if Path(kept).is_file() and not state.get("mask"):
            state["rejected_mask"] = self.store.add_file(Path(kept))
        return state

    def _ledger(self) -> dict[str, list]:
        """The files earlier runs wrote into the output folder (relative path -> [blob, size, mtime])."""
        try:
            return json.loads((self.store.root / "written.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def _keep_restored(self, state: State, step: str) -> bool:
        """True when the curation restores an image that ``step`` set aside: it then goes on as kept."""
        return bool(state.get("id")) and state["id"] in self._restored and bool(state.get("image"))

    # ----- sources ---------------------------------------------------------------------------
    def _run_sources(self) -> list[State]:
        index_path = self.store.root / "source-index.json"
        try:
            index = json.loads(index_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            index = {}
        states: list[State] = []
        used_names: set[tuple[str, str]] = set()
        used_ids: set[str] = set()
        for cfg in self.pipeline.sources:
            step: SourceStep = cfg.step  # type: ignore[assignment]
            stats = StepStats(step.name, "source")
            t0 = time.perf_counter()
            ctx = self._ctx(step)
            step.setup(ctx)
            with self._progress() as progress:
                task = progress.add_task(f"{step.name}: reading", total=None)
                for item in step.produce(ctx):
                    stats.inputs += 1
                    if cfg.subset is not None:
                        item = item.replace(subset=cfg.subset)
                    item.steps = [step.name]
                    item.source = item.source or str(item.path)
                    item.name = _unique(item.subset, item.name, used_names)
                    state = self._ingest_source(Path(item.path), item, index, stats)
                    if state is not None:
                        state["id"] = _unique_id(curation_stage.source_id(Path(state["image"]).stem), used_ids)
                        states.append(state)
                        stats.outputs += 1
                    progress.update(task, advance=1)
                progress.update(task, total=stats.inputs, completed=stats.inputs, description=f"{step.name}: {stats.inputs} files")
            for item, reason in ctx.set_aside_items:  # files the source could not use (an unreadable caption)
                stats.inputs += 1
                self._aside_raw(item, step.name, reason, stats)
            stats.messages.extend(ctx.messages)
            stats.seconds = time.perf_counter() - t0
            self.stats.append(stats)
        atomic_write_text(index_path, json.dumps(index))
        return states

    def _ingest_source(self, path: Path, item: Item, index: dict, stats: StepStats) -> State | None:
        try:
            st = path.stat()
            key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        except OSError as exc:
            self._aside_raw(item, "source", f"cannot read file ({exc.strerror})", stats)
            return None
        entry = index.get(key)
        if entry is None or (entry.get("blob") and not self.store.blob_path(entry["blob"]).exists()):
            stats.computed += 1
            try:
                verify_image(path)
                entry = {"blob": self.store.add_file(path)}
            except ImageError as exc:
                entry = {"error": str(exc)}
            index[key] = entry
        else:
            stats.cached += 1
        if "error" in entry:
            self._aside_raw(item, "source", entry["error"], stats)
            return None
        state = self.store.state_from_item(item.replace(path=self.store.blob_path(entry["blob"])))
        if item.mask is not None:  # a mask that came with the source (kohya conditioning dir)
            state["mask"] = self.store.add_file(Path(item.mask))
        return state

    def _aside_raw(self, item: Item, step: str, reason: str, stats: StepStats) -> None:
        stats.set_aside += 1
        self.set_aside.append(({"name": item.name, "subset": item.subset, "image": None, "source": item.source,
                                "raw_path": str(item.path)}, step, reason))

    def _in_user_words(self, reason: str, state: State) -> str:
        """A reason names the user's file (the source), not the work store's copy of it."""
        source = state.get("source") or state.get("name", "")
        for key, what in (("image", source), ("mask", f"the mask of {source}")):
            if state.get(key):
                reason = reason.replace(str(self.store.blob_path(state[key])), what)
        return reason

    def _apply_subset_config(self, states: list[State]) -> None:
        """Settings from pipeline.yaml override what sources declared (steps may change them later)."""
        for name, cfg in self.pipeline.subsets.items():
            base = self.subsets.get(name, Subset(name))
            self.subsets[name] = base.replace(**cfg)
        self._ensure_subsets(states)

    def _ensure_subsets(self, states: list[State]) -> None:
        for s in states:
            if s["subset"] not in self.subsets:
                self.subsets[s["subset"]] = Subset(s["subset"])

    # ----- image steps -----------------------------------------------------------------------
    def _run_image_step(self, cfg: ConfiguredStep, states: list[State]) -> list[State]:
        step: ImageStep = cfg.step  # type: ignore[assignment]
        stats = StepStats(step.name, "image", inputs=len(states))
        t0 = time.perf_counter()
        ctx = self._ctx(step)
        base = {"step": step.name, "version": step.version, "params": step.options.as_json(),
                "token": step.cache_token()}
        keys = [digest({**base, "item": content_of(s)}) for s in states]
        results: list[dict | None] = [self.store.cache_get(k) for k in keys]
        todo = [i for i, r in enumerate(results) if r is None]
        stats.cached = len(states) - len(todo)

        with self._progress() as progress:
            task = progress.add_task(step.name, total=len(states), completed=stats.cached)
            if todo:
                step.setup(ctx)  # load models once here: a missing model stops the run before any image
                n_workers = step.workers or self.workers or os.cpu_count() or 1
                size = max(step.batch_size, 1)
                if step.batch_size <= 1 and n_workers > 1:
                    size = max(1, min(16, len(todo) // (n_workers * 4)))
                chunks = [todo[i:i + size] for i in range(0, len(todo), size)]

                def done(chunk, chunk_results):
                    for i, r in zip(chunk, chunk_results):
                        results[i] = r
                        if "outputs" in r or r.get("final"):
                            self.store.cache_put(keys[i], r)
                    stats.computed += len(chunk)
                    progress.update(task, advance=len(chunk))

                if n_workers > 1 and len(todo) >= max(16, 4 * n_workers):  # below that, process start-up costs more
                    self._run_pool(step, base, ctx, states, chunks, min(n_workers, len(chunks)), done)
                else:
                    for chunk in chunks:
                        done(chunk, apply_image_step(step, ctx, self.store, [states[i] for i in chunk]))

        out: list[State] = []
        used: set[tuple[str, str]] = set()
        for state, r in zip(states, results):
            assert r is not None
            if "outputs" in r:
                many = len(r["outputs"]) > 1
                for k, o in enumerate(r["outputs"]):
                    o = dict(o, steps=state.get("steps", []) + [step.name], source=o.get("source") or state.get("source"))
                    if state.get("id"):
                        o["id"] = curation_stage.child_id(state["id"], state["name"], o["name"], k) if many else state["id"]
                    o["name"] = _unique(o["subset"], o["name"], used)
                    out.append(o)
            elif self._keep_restored(state, step.name):
                out.append(state)
                stats.messages.append(f"{state['name']}: kept (restored by hand; the step said: {r['aside']})")
            else:
                stats.set_aside += 1
                self.set_aside.append((state, step.name, self._in_user_words(r["aside"], state)))
        stats.outputs = len(out)
        stats.messages.extend(ctx.messages)
        stats.seconds = time.perf_counter() - t0
        self.stats.append(stats)
        _check_losses(step.name, states, results, self.output)
        return out

    def _pool(self, n_workers: int) -> ProcessPoolExecutor:
        """One pool of spawned workers for the whole run (starting processes costs about a second)."""
        if self._executor is None or self._executor_size < n_workers:
            self._shutdown_pool()
            self._executor = ProcessPoolExecutor(max_workers=n_workers, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_init_worker, initargs=(str(self.store.root),))
            self._executor_size = n_workers
        return self._executor

    def _shutdown_pool(self, cancel: bool = False) -> None:
        if self._executor is not None:
            # Interrupted: stop the workers now rather than wait for the images they are on (an
            # upscale can take minutes); their results were not cached, so a re-run redoes them.
            workers = list((getattr(self._executor, "_processes", None) or {}).values()) if cancel else []
            self._executor.shutdown(wait=not cancel, cancel_futures=cancel)
            for proc in workers:
                if proc.is_alive():
                    proc.terminate()
            self._executor = None

    def _run_pool(self, step, base, ctx, states, chunks, n_workers, done) -> None:
        """Run ``chunks`` over the worker pool. A worker that dies (kill -9, a decoder crash, the
        out-of-memory killer) breaks the pool: it is restarted and the lost images are retried, first
        one per task, then alone; an image that kills its worker even alone is set aside, named."""
        # ``base`` already holds options and cache token: cache_token() may hash or resolve a model
        step_key = digest({"class": f"{type(step).__module__}.{type(step).__qualname__}", **base})
        worker_ctx = StepContext(**{**ctx.__dict__, "messages": [], "set_aside_items": [], "reports": {}})
        health = {"restarts": 0, "ok_since_crash": 0}

        def hopeless() -> bool:  # the step kills its workers on every image: stop restarting
            return health["restarts"] >= _MAX_BLIND_RESTARTS and health["ok_since_crash"] == 0

        def run_round(round_chunks: list[list[int]], in_flight: int) -> list[list[int]]:
            """Run the chunks with at most ``in_flight`` submitted; return the chunks lost in crashes."""
            queue, lost, pending = list(round_chunks), [], {}
            while queue or pending:
                if hopeless():
                    return lost + list(pending.values()) + queue
                pool = self._pool(n_workers)
                while queue and len(pending) < in_flight:
                    chunk = queue.pop(0)
                    pending[pool.submit(_worker_chunk, step, step_key, worker_ctx, [states[i] for i in chunk])] = chunk
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                if any(isinstance(f.exception(), BrokenProcessPool) for f in finished):
                    wait(pending)  # a broken pool fails every task it still held
                    finished = set(pending)
                broken = False
                for fut in finished:
                    chunk = pending.pop(fut)
                    exc = fut.exception()
                    if isinstance(exc, BrokenProcessPool):
                        lost.append(chunk)
                        broken = True
                        continue
                    if is_storage_error(exc):
                        raise exc
                    if exc is not None:  # e.g. a result that cannot travel back: retried next run
                        chunk_results = [{"aside": f"worker process failed: {reason_of(exc)}", "final": False}] * len(chunk)
                    else:
                        chunk_results, messages = fut.result()
                        ctx.messages.extend(messages)
                        health["ok_since_crash"] += bool(health["restarts"])
                    done(chunk, chunk_results)
                if broken:
                    self._shutdown_pool(cancel=True)
                    health["restarts"] += 1
            return lost

        lost = run_round(chunks, 2 * n_workers)
        if lost:
            lost = run_round([[i] for chunk in lost for i in chunk], n_workers)
        crashed: list[str] = []
        for chunk in lost:
            again = [chunk] if hopeless() else run_round([chunk], 1)
            if not again:
                continue
            i = chunk[0]
            who = states[i].get("source") or states[i]["name"]
            if hopeless():
                reason = ("not processed: the worker processes of this step died on every image "
                          f"({health['restarts']} restarts)")
            else:
                reason = (f"{who}: killed its worker process twice, the second time alone (a decoder crash or "
                          "the out-of-memory killer)")
            crashed.append(who)
            done(chunk, [{"aside": reason, "final": False, "crashed": True}])
        if health["restarts"]:
            ctx.log(f"{health['restarts']} worker process(es) died and were restarted; "
                    + (f"{len(crashed)} image(s) set aside for it" if crashed else "every image was retried successfully"))
        self.crashed.extend(crashed)

    # ----- dataset steps ---------------------------------------------------------------------
    def _run_dataset_step(self, cfg: ConfiguredStep, states: list[State]) -> list[State]:
        step: DatasetStep = cfg.step  # type: ignore[assignment]
        stats = StepStats(step.name, "dataset", inputs=len(states))
        t0 = time.perf_counter()
        ctx = self._ctx(step)
        key = digest({"step": step.name, "version": step.version, "params": step.options.as_json(),
                      "token": step.cache_token(), "resolution": self.pipeline.resolution,
                      "items": [content_of(s) for s in states],
                      "subsets": {n: s.to_dict() for n, s in sorted(self.subsets.items())},
                      **({"train": self.pipeline.train} if "train" in step.reads else {})})
        hit = self.store.cache_get(key)
        if hit is None:
            with self.console.status(f"[bold]{step.name}[/] over {len(states)} images"):
                step.setup(ctx)
                items = [self.store.item_from_state(s) for s in states]
                for item, s in zip(items, states):
                    item.meta[ID_META] = s.get("id")
                by_name = {s["name"]: s.get("id") for s in states}
                produced = step.run(items, ctx)
                if produced is None or not all(isinstance(i, Item) for i in produced):
                    raise LorakitError(f"step '{step.name}' returned {type(produced).__name__}; run() must return a list of Items")
                outputs = []
                used_ids: set[str] = set()
                for item in produced:
                    st = _with_id(self.store.state_from_item(item), by_name, used_ids)
                    if not st["steps"] or st["steps"][-1] != step.name:
                        st["steps"] = st["steps"] + [step.name]
                    outputs.append(st)
                aside = [[_with_id(self.store.state_from_item(i), by_name, used_ids), reason]
                         for i, reason in ctx.set_aside_items]
                hit = {"outputs": outputs, "aside": aside, "messages": ctx.messages, "reports": ctx.reports,
                       "subsets": {n: s.to_dict() for n, s in ctx.subsets.items()}}
                self.store.cache_put(key, hit)
                stats.computed = len(states) or 1
        else:
            stats.cached = len(states)
            for name, data in hit.get("reports", {}).items():
                ctx.report(name, data)
        self.subsets.clear()
        self.subsets.update({n: Subset.from_dict(d) for n, d in hit["subsets"].items()})
        used: set[tuple[str, str]] = set()
        out = []
        for state, reason in hit["aside"]:
            if self._keep_restored(state, step.name):
                out.append(dict(state, steps=state.get("steps", []) + [step.name]))
                stats.messages.append(f"{state['name']}: kept (restored by hand; the step said: {reason})")
            else:
                self.set_aside.append((state, step.name, self._in_user_words(reason, state)))
                stats.set_aside += 1
        for o in hit["outputs"]:
            o = dict(o)
            o["name"] = _unique(o["subset"], o["name"], used)
            out.append(o)
        stats.outputs = len(out)
        messages = hit.get("messages", [])
        # a cached result's log lines describe the run that computed it, not this one
        stats.messages.extend(messages if stats.computed else [f"(earlier run) {m}" for m in messages])
        stats.seconds = time.perf_counter() - t0
        self.stats.append(stats)
        return out

    # ----- output ----------------------------------------------------------------------------
    def _materialise(self, states: list[State]) -> Manifest:
        out = self.output
        ledger_path = self.store.root / "written.json"
        try:
            ledger: dict[str, list] = json.loads(ledger_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            ledger = {}
        new_ledger: dict[str, list] = {}
        planned: list[tuple[str, Path, Path | None, str | None]] = []  # (rel, target, blob, text)

        # Nothing is written until every target is known: a file lorakit did not write is never replaced.
        def place(blob_path: Path, rel: str) -> None:
            planned.append((rel, confined_path(out, rel, "output file"), blob_path, None))

        def place_text(text: str, rel: str) -> None:
            planned.append((rel, confined_path(out, rel, "output file"), None, text))

        images: list[ImageRecord] = []
        for s in list(states):
            sub = self.subsets[s["subset"]]
            folder = _folder(sub)
            try:
                check_relative(s["name"], "image name")
            except PathEscape as exc:  # a step or a data file chose a name outside the output
                self.set_aside.append((dict(s, name=Path(s["image"]).stem), s["steps"][-1] if s.get("steps") else "output", str(exc)))
                states.remove(s)
                continue
            blob = self.store.blob_path(s["image"])
            rel = _join(folder, s["name"] + Path(s["image"]).suffix)
            place(blob, rel)
            item = self.store.item_from_state(s)
            text = s["text"] if s.get("text") is not None else item.text  # a caption set by hand is verbatim
            caption_rel = None
            if text:
                caption_rel = _join(folder, s["name"] + ".txt")
                place_text(text, caption_rel)
            mask_rel = None
            if s.get("mask"):
                mask_rel = _join("masks", folder, s["name"] + ".png")
                place(self.store.blob_path(s["mask"]), mask_rel)
            meta = s.get("meta", {})
            if s.get("rejected_mask"):  # kept for the review page (and for accepting it again)
                meta = dict(meta, rejected_mask=_join("set_aside", "masks", folder, s["name"] + ".png"))
                place(self.store.blob_path(s["rejected_mask"]), meta["rejected_mask"])
            width, height = image_size(blob)  # header only: never decoded here
            images.append(ImageRecord(
                path=rel, caption=text, subset=s["subset"], width=width, height=height,
                sha256=Path(s["image"]).stem, caption_path=caption_rel,
                tags=[{"name": t, "score": sc} for t, sc in s.get("tags", [])], sentence=s.get("caption"),
                repeats=sub.repeats, is_reg=sub.is_reg, mask=mask_rel, source=s.get("source"),
                steps=s.get("steps", []), meta=meta, id=s.get("id"), edited=bool(s.get("edited")),
            ))

        aside_records: list[SetAsideRecord] = []
        for state, step, reason in self.set_aside:
            rel = None
            if state.get("image"):
                rel = _join("set_aside", step, state["subset"] if state["subset"] != "default" else "",
                            state["name"] + Path(state["image"]).suffix)
                place(self.store.blob_path(state["image"]), rel)
            aside_records.append(SetAsideRecord(name=state["name"], step=step, reason=reason,
                                                source=state.get("source") or state.get("raw_path"), path=rel,
                                                id=state.get("id"), subset=state.get("subset")))

        self._refuse_foreign_files(planned, ledger)
        for rel, target, blob_path, text in planned:
            if blob_path is not None:
                new_ledger[rel] = _write_blob(target, blob_path, ledger.get(rel))
            else:
                new_ledger[rel] = _write_text(target, text)
        for rel in sorted(set(ledger) - set(new_ledger)):  # files an earlier run wrote that are no longer wanted
            self._delete_written(rel, ledger[rel])
        atomic_write_text(ledger_path, json.dumps(new_ledger))

        used_subsets = {s["subset"] for s in states}
        return Manifest(
            root=out,
            subsets={n: s for n, s in self.subsets.items() if n in used_subsets or n in self.pipeline.subsets},
            images=images, set_aside=aside_records, pipeline=_jsonable(self.pipeline.raw),
            resolution=self.pipeline.resolution,
        )


    def _refuse_foreign_files(self, planned: list, ledger: dict[str, list]) -> None:
        """The output folder is the user's too: a file there that lorakit's ledger does not list is
        never overwritten (unless --force)."""
        if self.force:
            return
        foreign = [rel for rel, target, blob, text in planned
                   if rel not in ledger and (target.exists() or target.is_symlink()) and not _same_content(target, blob, text)]
        manifest = self.output / MANIFEST_NAME
        if manifest.exists() and not _is_lorakit_manifest(manifest):
            foreign.insert(0, MANIFEST_NAME)
        if foreign:
            listed = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise LorakitError(
                f"{self.output}: {len(foreign)} file(s) the run would write already exist and were not written by "
                f"lorakit: {listed}. Nothing was changed; move them away, choose another output, or run with "
                "--force to overwrite them.")

    def _delete_written(self, rel: str, entry: list) -> None:
        """Delete a file an earlier run wrote, unless it has changed since (then it is the user's now)."""
        try:
            target = confined_path(self.output, rel, "ledger entry")
            st = target.lstat()
        except (PathEscape, FileNotFoundError):
            return
        size, mtime = (entry[1], entry[2]) if len(entry) >= 3 else (0, 0)
        if (size or mtime) and (st.st_size, st.st_mtime_ns) != (size, mtime):
            self.console.print(f"[yellow]kept[/] {target}: no longer wanted, but changed since lorakit wrote it",
                               highlight=False)
            return
        target.unlink(missing_ok=True)


def _write_blob(target: Path, blob_path: Path, prev: list | None) -> list:
    """Copy a blob to ``target`` unless the ledger shows it is already there; return its ledger entry."""
    try:
        st = target.stat()
    except FileNotFoundError:
        st = None
    if st and prev and prev[0] == blob_path.name and prev[1] == st.st_size and prev[2] == st.st_mtime_ns:
        return prev
    with atomic_path(target) as tmp:
        shutil.copyfile(blob_path, tmp)  # streamed; a large image is never read whole into memory
    st = target.stat()
    return [blob_path.name, st.st_size, st.st_mtime_ns]


def _write_text(target: Path, text: str) -> list:
    data = text.encode("utf-8")
    try:
        same = target.is_file() and target.stat().st_size == len(data) and target.read_bytes() == data
    except OSError:
        same = False
    if not same:
        atomic_write_text(target, text)
    st = target.stat()
    return ["text", st.st_size, st.st_mtime_ns]


def _same_content(target: Path, blob: Path | None, text: str | None) -> bool:
    """True when ``target`` already holds exactly what would be written (writing it changes nothing)."""
    try:
        if not target.is_file() or target.is_symlink():
            return False
        if blob is not None:
            return target.stat().st_size == blob.stat().st_size and sha256_file(target) == blob.stem
        return target.read_bytes() == text.encode("utf-8")
    except OSError:
        return False


def _is_lorakit_manifest(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(1 << 16)
        return b'"lorakit.manifest"' in head
    except OSError:
        return False


def _unique_id(image_id: str, used: set[str]) -> str:
    """The same bytes read twice get ``~2``, ``~3``... (in source order, so it is stable)."""
    candidate, n = image_id, 1
    while candidate in used:
        n += 1
        candidate = f"{image_id}~{n}"
    used.add(candidate)
    return candidate


def _with_id(state: State, by_name: dict[str, str | None], used: set[str]) -> State:
    """A dataset step's output state gets back the id its input carried (through meta, else by name)."""
    image_id = state["meta"].pop(ID_META, None) or by_name.get(state["name"])
    if not image_id:
        image_id = curation_stage.source_id(Path(state["image"]).stem)  # an image the step made
    state["id"] = _unique_id(image_id, used)
    return state


def _set_applied(path: Path, applied: str) -> None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return
    data["applied"] = applied
    atomic_write_text(path, json.dumps(data, ensure_ascii=False, default=str))


def reapply_curation(dataset: Path, curation: "curation_stage.Curation", take_hand: bool = True,
                     console: Console | None = None) -> "curation_stage.CurationResult":
    """Redo only the curation stage of the last run over ``dataset`` (no step runs): what
    ``lorakit.curation.apply_to_dataset`` does for the review page and ``lorakit curate apply``."""
    from .pipeline import Pipeline

    dataset = Path(dataset)
    input_path = dataset / STORE_DIR / CURATION_INPUT
    try:
        saved = json.loads(input_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        saved = None
    except json.JSONDecodeError as exc:
        raise LorakitError(f"{input_path}: damaged ({exc.msg}); run the pipeline again") from None
    if saved is None:
        saved = _input_from_manifest(dataset)
    pipeline = Pipeline(path=None, output=dataset, sources=[], steps=[], subsets=saved.get("pipeline_subsets") or {},
                        resolution=saved.get("resolution") or 512, raw=saved.get("pipeline") or {},
                        cache_dir=dataset / saved["store"])  # relative: the store inside a moved or copied dataset
    runner = Runner(pipeline, console=console or Console(stderr=True, quiet=True), workers=1)
    runner.curation = curation
    runner.subsets = {n: Subset.from_dict(d) for n, d in saved.get("subsets", {}).items()}
    runner.set_aside = [(s, step, reason) for s, step, reason in saved.get("set_aside", [])]
    hand = curation_stage.take_hand_edits(dataset, curation, runner._ledger()) if take_hand else None
    _, result = runner.finish(saved["states"], hand, save_input=False)
    return result


def _store_ref(store: Path, dataset: Path) -> str:
    """The work store as the curation input records it: relative to the dataset when inside it, so a
    dataset folder that was moved or copied edits its own files, not the original's."""
    store, dataset = store.resolve(), dataset.resolve()
    return store.relative_to(dataset).as_posix() if store.is_relative_to(dataset) else str(store)


def _input_from_manifest(dataset: Path) -> dict:
    """Without the saved states (an older dataset, or .lorakit/ deleted) the manifest is the base: its
    files are taken into a work store and its images become the states the curation applies to."""
    manifest = Manifest.load(dataset)
    store = Store(dataset / STORE_DIR)
    states: list[State] = []
    aside = []
    records = [(r, None, None) for r in manifest.images]
    records += [(r, r.step, r.reason) for r in manifest.set_aside if r.path]
    for r, step, reason in records:
        path = manifest.abspath(r.path)
        if not path.is_file():
            if step is None:
                raise LorakitError(f"{path}: image listed in {dataset / MANIFEST_NAME} is missing")
            continue
        subset = getattr(r, "subset", None) or "default"
        sub = manifest.subsets.get(subset) or Subset(subset)
        folder = _folder(sub)
        stem = Path(r.path).with_suffix("").as_posix()
        if step is not None:
            stem = r.name
        elif folder and stem.startswith(folder + "/"):
            stem = stem[len(folder) + 1:]
        state = {"name": stem, "image": store.add_file(path), "mask": None, "subset": subset,
                 "caption": getattr(r, "sentence", None),
                 "tags": [[t["name"], t.get("score")] for t in getattr(r, "tags", [])],
                 "meta": dict(getattr(r, "meta", {}) or {}), "source": r.source, "steps": list(getattr(r, "steps", [])),
                 "id": curation_stage.record_id(r) if step is None else r.id}
        if getattr(r, "mask", None) and manifest.abspath(r.mask).is_file():
            state["mask"] = store.add_file(manifest.abspath(r.mask))
        if step is None or step == "curation":  # excluded by hand: the curation decides again
            states.append(state)
        else:
            aside.append([state, step, reason])
    return {"store": _store_ref(store.root, dataset), "states": states, "set_aside": aside,
            "subsets": {n: s.to_dict() for n, s in manifest.subsets.items()},
            "pipeline_subsets": {}, "resolution": manifest.resolution, "pipeline": manifest.pipeline}


def _check_losses(step: str, states: list[State], results: list[dict | None], output: Path) -> None:
    """A step that failed (errors and crashes, not decisions) on most of its images stops the run
    before the dataset folder is touched: writing would delete the previous, good dataset."""
    failed = [(s, r) for s, r in zip(states, results) if r is not None and "aside" in r and not r.get("final")]
    if failed and len(failed) > _MOST * len(states):
        reasons = Counter(r["aside"] for _, r in failed).most_common(3)
        listed = "; ".join(f"{n} x {reason}" for reason, n in reasons)
        raise LorakitError(
            f"step '{step}' failed on {len(failed)} of {len(states)} images ({listed}). The run stopped and "
            f"{output} was left as it was. Finished results are cached: fix the cause and run again.")


def _remove_partial_files(folder: Path) -> None:
    """Delete temporary files a killed run left behind (atomic writes never leave them otherwise):
    only lorakit's own names (``.lorakit-tmp-`` + 8 random characters), never a user's ``.tmp-*``."""
    for tmp in folder.rglob(TMP_PREFIX + "*"):
        if is_partial_file(tmp) and tmp.is_file() and not tmp.is_symlink():
            tmp.unlink(missing_ok=True)


def _folder(sub: Subset) -> str:
    """The subset's folder inside the output (refused when it would leave the output)."""
    return check_relative((sub.folder or ".").strip("/") or ".", f"subset '{sub.name}': folder")


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def _unique(subset: str, name: str, used: set[tuple[str, str]]) -> str:
    """Names are unique within a subset (case-insensitively, for Windows and macOS users)."""
    candidate, n = name, 1
    while (subset, candidate.lower()) in used:
        n += 1
        candidate = f"{name}_{n}"
    used.add((subset, candidate.lower()))
    return candidate


def _jsonable(data: Any) -> Any:
    return json.loads(json.dumps(data, default=str))
