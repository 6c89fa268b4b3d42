"""Runs a pipeline: sources -> steps -> dataset folder with manifest.json.

Per-image steps run over worker processes and every result is cached by content (see store.py),
so an unchanged re-run does nothing, an interrupted run resumes, and an image a step cannot handle
is set aside with the step and reason while the run goes on.
"""
from __future__ import annotations

import gc
import hashlib
import json
import os
import re
import shutil
import stat
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from lorakit.plugin_sdk import (
    DatasetStep, ImageError, ImageStep, Item, LorakitError, PathEscape, SourceStep, StepContext, Subset,
    TMP_PREFIX, atomic_path, atomic_write_text, caption_text, check_relative, confined_path, is_partial_file, is_storage_error,
    is_within,
    reason_of,
    verify_image,
)

from . import chain, executors, prepare, unchanged
from . import curation as curation_stage
from .manifest import MANIFEST_NAME, ImageRecord, Manifest, SetAsideRecord
from .pipeline import ConfiguredStep, Pipeline
from .store import State, Store, digest, sha256_file

STORE_DIR = ".lorakit"
CURATION_INPUT = "curation-input.json"  # the states before the curation stage (apply_to_dataset redoes it)
ID_META = "_lorakit_id"  # carries image ids through dataset steps
# Restarts of a step's worker pool without one image finishing before the step is given up.
_MAX_BLIND_RESTARTS = 4
_WATCH_SECONDS = 5.0  # while chunks are pending, the executor looks this often for workers that never started
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
    replayed: int = 0  # of the cached: run again to rebuild a picture a chain did not keep (chain.py)
    seconds: float = 0.0
    messages: list[str] = field(default_factory=list)


@dataclass
class RunResult:
    output_dir: Path
    manifest_path: Path
    _manifest: Manifest | None  # None: read from manifest_path when asked for (an unchanged re-run)
    stats: list[StepStats]
    set_aside: list[SetAsideRecord]
    curation: curation_stage.CurationResult | None = None
    crashed: list[str] = field(default_factory=list)  # images that killed a worker process: the run failed
    _summary: dict | None = None
    unchanged_run: bool = False  # reported from the last run without running (unchanged.py)

    @property
    def manifest(self) -> Manifest:
        if self._manifest is None:
            self._manifest = Manifest.load(self.manifest_path)
        return self._manifest

    @property
    def nothing_changed(self) -> bool:
        return all(s.computed == 0 for s in self.stats)

    def summary(self) -> dict:
        """What the run summary shows of the dataset: images, images per subset, the warnings on
        kept images by step, the subsets configured. Kept with the last run, so an unchanged re-run
        shows it without reading the manifest."""
        if self._summary is None:
            m = self.manifest
            warnings: dict[str, list[str]] = {}
            for r in m.images:
                for w in (r.meta or {}).get("warnings", []):
                    warnings.setdefault(w.get("step", "?"), []).append(Path(r.path).name)
            self._summary = {"images": len(m.images), "subsets": dict(Counter(r.subset for r in m.images)),
                             "warnings": warnings,
                             "configured_subsets": list(((m.pipeline or {}).get("subsets") or {}).keys())}
        return self._summary


# ----- the runner ---------------------------------------------------------------------------
class Runner:
    def __init__(self, pipeline: Pipeline, console: Console | None = None, workers: int | None = None,
                 force: bool = False, executor: str | None = None, ray_address: str | None = None):
        self.pipeline = pipeline
        self.force = force  # overwrite files in the output that lorakit did not write
        self.console = console or Console(stderr=True)
        self.workers = workers or pipeline.workers
        self.output = pipeline.output
        self.store = Store(pipeline.cache_dir or self.output / STORE_DIR)
        self.subsets: dict[str, Subset] = {}
        self.set_aside: list[tuple[State, str, str]] = []  # (state, step, reason)
        self.stats: list[StepStats] = []
        self.crashed: list[str] = []  # images set aside because they killed a worker process
        # where per-image work runs: the local process pool, or a Ray cluster (executors.py)
        self.executor = executors.create(executor or pipeline.executor, self.store.root, ray_address)
        curation_file = (curation_stage.curation_path_for(pipeline.path) if pipeline.path is not None
                         else self.output / curation_stage.DATASET_CURATION_NAME)
        self.curation = curation_stage.Curation(curation_file, self.output)
        self._restored: set[str] = set()
        self._refs: dict[str, list[str]] = {"cache": [], "sources": []}  # what this run used (for `clean`)
        self._marks = _OutputMarks(self.output / STORE_DIR)  # with the output it describes, as the ledger
        self._written: dict[str, list] | None = None  # the ledger of files written to the output (written.json)
        self._applied: str | None = None  # the digest of the curation file this run applied
        self._all_final = True  # no result of this run is an error to retry (unchanged.py remembers it)

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
        thresholds = gc.get_threshold()
        gc.set_threshold(thresholds[0], thresholds[1], max(thresholds[2], 100))  # full collections 10x rarer
        try:
            return self._run()
        except BaseException:
            self._shutdown_pool(cancel=True)
            raise
        finally:
            gc.unfreeze()
            gc.set_threshold(*thresholds)
            self._shutdown_pool()
            self.store.close()  # commits the results finished so far: an interrupted run resumes from them

    def _run(self) -> RunResult:
        self.output.mkdir(parents=True, exist_ok=True)
        fingerprint = None if self.force else unchanged.run_fingerprint(self)
        if fingerprint is not None:
            record = unchanged.load(self, unchanged.with_curation(fingerprint, self.curation))
            if record is not None:
                # No walk for partial files either (0.16 s at 100k images): every run that writes
                # removes the record first, so none of its leftovers can be here; another tool's
                # (a killed review save) waits for the next run that does not skip.
                return self._unchanged_result(record)
        unchanged.forget(self)  # this run may change the output: the last run's record no longer holds
        _remove_partial_files(self.output)
        # hand edits in the folder go into the curation file before anything rewrites the folder
        hand = (curation_stage.HandEdits() if self._output_untouched()
                else curation_stage.take_hand_edits(self.output, self.curation, self._ledger()))
        self._restored = curation_stage.restored_ids(self.curation.edits())
        states = self._run_sources()
        self._apply_subset_config(states)
        states = curation_stage.early_moves(states, self.curation.edits())
        self._ensure_subsets(states)
        for group in _chains(self.pipeline.steps):
            # The states of a large dataset are many small objects that live for the whole run; the
            # cycle collector would walk them all again and again (a third of an unchanged re-run of
            # 20k images). Frozen, they are left out of its walks; reference counting frees them as usual.
            gc.freeze()
            if isinstance(group[0].step, ImageStep):
                states = self._run_image_steps(group, states)
            elif isinstance(group[0].step, DatasetStep):
                states = self._run_dataset_step(group[0], states)
            self._ensure_subsets(states)
        gc.freeze()
        if not states:
            self._refuse_empty_dataset()
        manifest, curated = self.finish(states, hand)
        self.store.flush()
        self.store.record_run(self.output.resolve(), self._refs)
        result = RunResult(self.output, self.output / MANIFEST_NAME, manifest, self.stats,
                           manifest.set_aside, curated, list(self.crashed))
        # A run with an error to retry or a crash is not remembered: the next run runs again.
        if fingerprint is not None and self._all_final and not self.crashed:
            unchanged.save(self, unchanged.with_curation(fingerprint, self.curation, self._applied),
                           self.stats, result.summary(), manifest.set_aside)
        return result

    def _unchanged_result(self, record: dict) -> RunResult:
        """The last run's result, for a re-run whose fingerprint and outputs equal it: nothing written."""
        stats = []
        for data in record.get("stats") or []:
            s = StepStats(**data)
            if s.computed and s.kind == "dataset":  # as a re-run from the cache shows them
                s.messages = [f"(earlier run) {m}" for m in s.messages]
            elif s.computed and s.kind == "image":
                s.messages = []  # lines the work logged: a re-run from the cache does no work
            s.seconds, s.computed, s.replayed, s.cached = 0.0, 0, 0, s.inputs
            stats.append(s)
        self.stats = stats
        set_aside = [SetAsideRecord.from_dict(d) for d in record.get("set_aside") or []]
        return RunResult(self.output, self.output / MANIFEST_NAME, None, stats, set_aside, None, [],
                         record.get("summary"), unchanged_run=True)

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
            old_input = input_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            old_input = None
        previous = _applied_of(old_input)
        edits = self.curation.edits()
        digest_now = self._applied = self.curation.digest()
        if save_input:
            self._save_curation_input(input_path, states, digest_now, old_input)
        else:
            _set_applied(input_path, digest_now)
        n_in = len(states)
        states = [self._adopt_rejected_mask(s) for s in states]
        states, self.set_aside, result = curation_stage.apply_to_states(states, self.set_aside, edits,
                                                                        self.curation.path)
        states = [self._adopt_picture(s) if s.get("picture") else s for s in states]
        result.hand = hand
        result.changed = (digest_now != previous and (bool(edits) or previous is not None)) or bool(hand)
        self._ensure_subsets(states)
        stats = StepStats("curation", "curation", inputs=n_in, outputs=len(states), set_aside=len(result.excluded),
                          computed=int(result.changed), cached=0 if result.changed else n_in)
        stats.messages = result.messages()
        manifest = self._materialise(states)
        try:
            manifest.curation = os.path.relpath(self.curation.path.resolve(), self.output.resolve())
        except ValueError:  # another drive (Windows)
            manifest.curation = str(self.curation.path.resolve())
        _save_if_changed(manifest, self._marks)
        self._marks.save()
        stats.seconds = time.perf_counter() - t0
        self.stats.append(stats)
        return manifest, result

    def _save_curation_input(self, path: Path, states: list[State], applied: str, old: str | None) -> None:
        _write_if_changed(path, old, json.dumps({
            "version": 1, "applied": applied, "store": _store_ref(self.store.root, self.output), "states": states,
            "set_aside": [list(x) for x in self.set_aside],
            "subsets": {n: s.to_dict() for n, s in self.subsets.items()},
            "pipeline_subsets": self.pipeline.subsets, "resolution": self.pipeline.resolution,
            "pipeline": _jsonable(self.pipeline.raw),
        }, ensure_ascii=False, default=str))

    def _adopt_picture(self, state: State) -> State:
        """A picture replaced by hand (curation ``replace_image``) goes into the store in place of the
        one the steps made; a mask of another size than the new picture no longer fits and is taken off."""
        from lorakit.plugin_sdk import verify_image

        picture = Path(state["picture"])
        state = {k: v for k, v in state.items() if k not in ("picture", "image_path")}
        state["size"] = list(verify_image(picture))
        state["image"] = self.store.add_file(picture)
        if state.get("mask") and tuple(self.store.size_of(state["mask"])) != tuple(state["size"]):
            state["rejected_mask"], state["mask"] = state["mask"], None
            state["meta"] = dict(state.get("meta") or {}, mask_rejected="the picture was replaced by one of "
                                 "another size: the mask no longer fits")
        return state

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

    @property
    def _ledger_path(self) -> Path:
        """The ledger lives with the output folder it describes (``OUTPUT/.lorakit/written.json``),
        also when ``cache_dir`` puts the store elsewhere, so pipelines sharing a store keep theirs apart."""
        return self.output / STORE_DIR / "written.json"

    def _ledger(self) -> dict[str, list]:
        """The files earlier runs wrote into the output folder (relative path -> [blob, size, mtime])."""
        if self._written is None:
            try:
                self._written = json.loads(self._ledger_path.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                self._written = {}
        return self._written

    def _output_untouched(self) -> bool:
        """True when the manifest and every file the last run wrote are as it left them (same size
        and modification time): then there are no hand edits to look for, and the manifest (which
        can be large) is not read. One stat per file."""
        manifest = self.output / MANIFEST_NAME
        mark = self._marks.marks.get(os.path.abspath(manifest))
        ledger = self._ledger()
        try:
            st = os.stat(manifest)
        except OSError:
            return False
        if not isinstance(mark, dict) or mark.get("stat") != [st.st_size, st.st_mtime_ns] or not ledger:
            return False
        root = os.fspath(self.output)
        for rel, entry in ledger.items():
            try:
                st = os.stat(os.path.join(root, rel))
            except OSError:
                return False
            if len(entry) < 3 or entry[1] != st.st_size or entry[2] != st.st_mtime_ns:
                return False
        return True

    def _keep_restored(self, state: State, step: str) -> bool:
        """True when the curation restores an image that ``step`` set aside: it then goes on as kept."""
        return bool(state.get("id")) and state["id"] in self._restored and bool(state.get("image"))

    # ----- sources ---------------------------------------------------------------------------
    def _run_sources(self) -> list[State]:
        states: list[State] = []
        used_names: set[tuple[str, str]] = set()
        used_ids: set[str] = set()
        for cfg in self.pipeline.sources:
            step: SourceStep = cfg.step  # type: ignore[assignment]
            stats = StepStats(step.name, "source")
            t0 = time.perf_counter()
            ctx = self._ctx(step)
            step.setup(ctx)
            items: list[Item] = []
            with self._progress() as progress:
                task = progress.add_task(f"{step.name}: reading", total=None)
                for item in step.produce(ctx):
                    stats.inputs += 1
                    if cfg.subset is not None:
                        item = item.replace(subset=cfg.subset)
                    item.steps = [step.name]
                    item.source = item.source or str(item.path)
                    item.name = _unique(item.subset, item.name, used_names)
                    items.append(item)
                    progress.update(task, advance=1)
                progress.update(task, total=stats.inputs, completed=stats.inputs, description=f"{step.name}: {stats.inputs} files")
                for state in self._ingest_sources(items, stats):
                    state["id"] = _unique_id(curation_stage.source_id(os.path.splitext(state["image"])[0]), used_ids)
                    states.append(state)
                    stats.outputs += 1
            for item, reason in ctx.set_aside_items:  # files the source could not use (an unreadable caption)
                stats.inputs += 1
                self._aside_raw(item, step.name, reason, stats)
            stats.messages.extend(ctx.messages)
            stats.seconds = time.perf_counter() - t0
            self.stats.append(stats)
        self.store.flush()
        return states

    def _ingest_sources(self, items: list[Item], stats: StepStats) -> list[State]:
        """Check each source file once and read it in place: a file already seen (same path, size,
        modification time and inode) is found in the index in one batched look-up."""
        keys: dict[str, str] = {}  # file -> index key
        files = {}
        for item in items:
            for path in (item.path, item.mask):
                if path is not None and str(path) not in files:
                    files[str(path)] = path
        for name, path in files.items():
            try:
                st = os.stat(path)
                keys[name] = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
            except OSError as exc:
                keys[name] = "!" + (exc.strerror or str(exc))
        index = self.store.sources_get_many(k for k in keys.values() if not k.startswith("!"))

        def entry_for(path) -> dict:
            key = keys[str(path)]
            if key.startswith("!"):
                return {"error": f"cannot read file ({key[1:]})"}
            entry = index.get(key)
            if entry is None or (entry.get("blob") and "path" not in entry
                                 and not self.store.blob_path(entry["blob"]).exists()):
                stats.computed += 1
                try:
                    size = verify_image(path)
                    # read in place: the file is hashed, never copied (the store stays small)
                    entry = {"blob": sha256_file(Path(path)) + Path(path).suffix.lower(), "size": list(size),
                             "path": os.path.abspath(path)}
                except ImageError as exc:
                    entry = {"error": str(exc)}
                index[key] = entry
                self.store.source_put(key, entry)
            else:
                stats.cached += 1
            self._refs["sources"].append(key)
            return entry

        states = []
        for item in items:
            entry = entry_for(item.path)
            if "error" in entry:
                self._aside_raw(item, "source", entry["error"], stats)
                continue
            blob = entry["blob"]
            if entry.get("path"):
                self.store.read_in_place(entry["path"], blob)
            state = {"name": item.name, "image": blob, "image_path": entry.get("path"),
                     "size": entry.get("size") or list(self.store.size_of(blob)),
                     "mask": None, "subset": item.subset, "caption": item.caption,
                     "tags": [[t, s] for t, s in item.tags.items()], "meta": item.meta,
                     "source": item.source, "steps": list(item.steps)}
            if item.mask is not None:  # a mask that came with the source (kohya conditioning dir)
                stats.cached -= 1  # counted per image, not per file
                mask_entry = entry_for(item.mask)
                if "error" in mask_entry:
                    self._aside_raw(item, "source", f"mask {item.mask}: {mask_entry['error']}", stats)
                    continue
                if mask_entry.get("path"):
                    self.store.read_in_place(mask_entry["path"], mask_entry["blob"])
                state["mask"] = mask_entry["blob"]
                state["mask_path"] = mask_entry.get("path")
            states.append(state)
        return states

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
    def _run_image_steps(self, group: list[ConfiguredStep], states: list[State]) -> list[State]:
        """Run a chain of per-image steps (see chain.py): what the cache knows is taken in batched
        look-ups, the rest runs image by image through all the steps of the chain at once."""
        t0 = time.perf_counter()
        steps: list[ImageStep] = [cfg.step for cfg in group]  # type: ignore[misc]
        ctxs = [self._ctx(step) for step in steps]
        plans = [chain.make_plan(step, ctx, self.pipeline.resolution) for step, ctx in zip(steps, ctxs)]
        planned = chain.ChainPlan(plans, self.store, states)
        jobs = planned.jobs
        label = "+".join(step.name for step in steps)
        with self._progress() as progress:
            total = max(len(states), len(jobs))  # a job per image (per frame once frames are files)
            task = progress.add_task(label, total=total, completed=total - len(jobs))
            if jobs:
                for step, ctx in zip(steps, ctxs):
                    step.setup(ctx)  # load models once here: a missing model stops the run before any image
                first = steps[0]
                n_workers, remote = self.executor.workers(first, plans, self.workers, len(jobs))
                size = max(first.batch_size, 1)
                if first.batch_size <= 1 and n_workers > 1:
                    size = max(1, min(16, len(jobs) // (n_workers * 4)))
                chunks = [jobs[i:i + size] for i in range(0, len(jobs), size)]
                run_plans = [chain.StepPlan(**{**p.__dict__, "ctx": _worker_ctx(p.ctx)}) for p in plans]

                def done(chunk, trees, messages, seconds):
                    for job, tree in zip(chunk, trees):
                        planned.take(job, tree)
                    for ctx, lines in zip(ctxs, messages or ()):
                        ctx.messages.extend(lines)
                    for plan, (sec, encode) in zip(plans, seconds or ()):
                        plan.seconds += sec
                        plan.encode_seconds += encode
                    progress.update(task, advance=len(chunk))

                if remote:
                    self._run_pool(run_plans, ctxs[0], chunks, min(n_workers, len(chunks)), done)
                else:
                    for chunk in chunks:
                        for p in run_plans:
                            p.seconds = p.encode_seconds = 0.0
                        trees = chain.run_jobs(run_plans, self.store, [(j.state, j.level) for j in chunk])
                        messages = [list(p.ctx.messages) for p in run_plans]
                        for p in run_plans:
                            p.ctx.messages.clear()
                        done(chunk, trees, messages, [(p.seconds, p.encode_seconds) for p in run_plans])
        if not self.crashed:
            planned.remember()
        if self.crashed or any(c.failed for c in planned.counts):
            self._all_final = False  # an error is retried by the next run: this run is not remembered whole
        self.store.flush()
        out, asides = planned.outputs()
        for state, step_name, reason in asides:
            if self._keep_restored(state, step_name) and chain.materialised(state):
                out.append(chain.final_state(state))  # the rest of its chain is skipped
                ctxs[0].messages.append(f"{state['name']}: kept (restored by hand; {step_name} said: {reason})")
            else:
                self.set_aside.append((state, step_name, self._in_user_words(reason, state)))
        self._refs["cache"].extend(planned.used_keys)
        used: set[tuple[str, str]] = set()
        for o in out:
            o["name"] = _unique(o["subset"], o["name"], used)
        wall = time.perf_counter() - t0
        encode = sum(p.encode_seconds for p in plans)
        busy = (sum(p.seconds for p in plans) + encode) or 1.0
        for step, ctx, plan, c in zip(steps, ctxs, plans, planned.counts):
            stats = StepStats(step.name, "image", inputs=c.inputs, outputs=c.outputs, set_aside=c.set_aside,
                              cached=c.cached, computed=c.computed, replayed=c.replayed,
                              seconds=wall * plan.seconds / busy if jobs else wall / len(steps))
            stats.messages.extend(ctx.messages)
            if c.replayed:
                stats.messages.append(f"re-ran on {c.replayed} image(s) to rebuild pictures for a later step "
                                      "of its chain (results unchanged)")
            share = wall * encode / busy if jobs else 0.0  # the wall time is shared out as the workers' time was
            if step is steps[-1] and share >= 0.1:
                stats.messages.append(f"writing the pictures{' of ' + label if len(steps) > 1 else ''} into the store "
                                      f"(one encode each): {share:.1f} s, in no step's seconds")
            self.stats.append(stats)
        for step, c in zip(steps, planned.counts):
            _check_losses(step.name, c.failed, c.inputs, self.output)
        return out

    def _shutdown_pool(self, cancel: bool = False) -> None:
        self.executor.shutdown(cancel=cancel)

    def _run_pool(self, plans, ctx, chunks, n_workers, done) -> None:
        """Run ``chunks`` of chain jobs over the worker pool. A worker that dies (kill -9, a decoder
        crash, the out-of-memory killer) breaks the pool: it is restarted and the lost images are
        retried, first one per task, then alone; an image that kills its worker even alone is set
        aside, named."""
        health = {"restarts": 0, "ok_since_crash": 0}

        def hopeless() -> bool:  # the step kills its workers on every image: stop restarting
            return health["restarts"] >= _MAX_BLIND_RESTARTS and health["ok_since_crash"] == 0

        def run_round(round_chunks: list[list], in_flight: int) -> list[list]:
            """Run the chunks with at most ``in_flight`` submitted; return the chunks lost in crashes."""
            queue, lost, pending = list(round_chunks), [], {}
            watched = time.monotonic()

            def watch() -> None:  # every few seconds: is a chunk held by a worker that will never start?
                nonlocal watched
                if time.monotonic() - watched >= _WATCH_SECONDS:
                    watched = time.monotonic()
                    for line in self.executor.watch():
                        ctx.log(line)
                        self.console.print(f"[yellow]{line}[/]", highlight=False)  # now, not only in the summary

            while queue or pending:
                if hopeless():
                    return lost + list(pending.values()) + queue
                while queue and len(pending) < in_flight:
                    chunk = queue.pop(0)
                    pending[self.executor.submit(n_workers, plans, [(j.state, j.level) for j in chunk])] = chunk
                finished, _ = wait(pending, timeout=_WATCH_SECONDS, return_when=FIRST_COMPLETED)
                watch()
                if not finished:
                    continue
                if any(isinstance(f.exception(), BrokenProcessPool) for f in finished):
                    while wait(pending, timeout=_WATCH_SECONDS)[1]:  # a broken pool fails every task it still held
                        watch()
                    finished = set(pending)
                broken = False
                for fut in finished:
                    chunk = pending.pop(fut)
                    exc = fut.exception()
                    if isinstance(exc, BrokenProcessPool):
                        lost.append(chunk)
                        broken = True
                        continue
                    if isinstance(exc, executors.WorkerNeverStarted):  # nothing ran: submitted again
                        queue.insert(0, chunk)
                        continue
                    if is_storage_error(exc):
                        raise exc
                    if exc is not None:  # e.g. a result that cannot travel back: retried next run
                        reason = f"worker process failed: {reason_of(exc)}"
                        done(chunk, [_failed_tree(reason) for _ in chunk], None, None)
                    else:
                        trees, messages, seconds = fut.result()
                        health["ok_since_crash"] += bool(health["restarts"])
                        done(chunk, trees, messages, seconds)
                if broken:
                    self.executor.restart()
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
            who = chunk[0].state.get("source") or chunk[0].state["name"]
            if hopeless():
                reason = ("not processed: the worker processes of this step died on every image "
                          f"({health['restarts']} restarts)")
            else:
                reason = (f"{who}: killed its worker process twice, the second time alone (a decoder crash or "
                          "the out-of-memory killer)")
            crashed.append(who)
            done(chunk, [_failed_tree(reason)], None, None)
        if health["restarts"]:
            ctx.log(f"{health['restarts']} worker process(es) died and were restarted; "
                    + (f"{len(crashed)} image(s) set aside for it" if crashed else "every image was retried successfully"))
        self.crashed.extend(crashed)

    # ----- dataset steps ---------------------------------------------------------------------
    def _run_dataset_step(self, cfg: ConfiguredStep, states: list[State]) -> list[State]:
        step: DatasetStep = cfg.step  # type: ignore[assignment]
        t0 = time.perf_counter()
        prepared = None
        if step.prepares():  # its per-image part: a per-image step in the shared pool, cached per image
            states = self._run_image_steps([ConfiguredStep(prepare.PrepareStep(step), cfg.where)], states)
            per_image = self.stats.pop()
            states, prepared = prepare.take_results(states)
        stats = StepStats(step.name, "dataset", inputs=len(states))
        if prepared is not None:
            stats.inputs, stats.set_aside = per_image.inputs, per_image.set_aside
            stats.messages.extend(per_image.messages)
            stats.messages.append(f"per-image part: {per_image.computed} computed, {per_image.cached} from the cache")
        ctx = self._ctx(step)
        # The key holds, per image, its id, name and subset and the fields the step reads; the entry
        # keeps what the step changed per image, so a field it does not read (a caption for a step
        # that reads tags) is taken from this run's input, never from the cached result.
        reads = chain.declared_fields(step, "reads")
        fields = sorted((chain.READABLE if reads is None else reads) - {"name", "subset", "train"})
        key = digest({"step": step.name, "version": step.version, "params": step.options.as_json(),
                      "token": step.cache_token(), "resolution": self.pipeline.resolution, "reads": fields,
                      "items": [[s.get("id"), s["name"], s["subset"], *(chain.read_value(s, f) for f in fields)]
                                for s in states],
                      "subsets": {n: s.to_dict() for n, s in sorted(self.subsets.items())},
                      **({"train": self.pipeline.train} if reads is None or "train" in reads else {})})
        by_id = {s["id"]: s for s in states if s.get("id")}
        hit = self.store.cache_get(key)
        self._refs["cache"].append(key)
        if hit is None:
            with self.console.status(f"[bold]{step.name}[/] over {len(states)} images"):
                step.setup(ctx)
                items = [self.store.item_from_state(s) for s in states]
                for item, s in zip(items, states):
                    item.meta[ID_META] = s.get("id")
                by_name = {s["name"]: s.get("id") for s in states}
                ctx.prepared = prepared
                produced = step.run(items, ctx)
                if produced is None or not all(isinstance(i, Item) for i in produced):
                    raise LorakitError(f"step '{step.name}' returned {type(produced).__name__}; run() must return a list of Items")
                outputs = []
                used_ids: set[str] = set()
                for item in produced:
                    st = _with_id(self.store.state_from_item(item), by_name, used_ids)
                    if not st["steps"] or st["steps"][-1] != step.name:
                        st["steps"] = st["steps"] + [step.name]
                    outputs.append(_pack(st, by_id))
                aside = [[_pack(_with_id(self.store.state_from_item(i), by_name, used_ids), by_id), reason]
                         for i, reason in ctx.set_aside_items]
                # A report (it can list every image) is kept in an entry of its own, read only when
                # its file has to be written again; the step's entry holds its digest.
                report_digests = {name: _json_digest(data) for name, data in ctx.reports.items()}
                hit = {"outputs": outputs, "aside": aside, "messages": ctx.messages, "report_digests": report_digests,
                       "subsets": {n: s.to_dict() for n, s in ctx.subsets.items()}}
                if ctx.reports:
                    self.store.cache_put(key + ":reports", ctx.reports)
                self.store.cache_put(key, hit)
                stats.computed = len(states) or 1
                for name, content in report_digests.items():  # the next run then knows the files hold them
                    report = ctx.output_dir / "reports" / f"{ctx.step_name}-{name}.json"
                    if report.is_file():
                        self._marks.mark(report, content)
        else:
            stats.cached = len(states)
            for name, data in hit.get("reports", {}).items():  # an entry of an earlier version
                _replay_report(ctx, name, data, self._marks)
            stale = [name for name, content in hit.get("report_digests", {}).items()
                     if not self._marks.matches(ctx.output_dir / "reports" / f"{ctx.step_name}-{name}.json", content)]
            if stale:
                reports = self.store.cache_get(key + ":reports") or {}
                for name in stale:
                    if name in reports:
                        _replay_report(ctx, name, reports[name], self._marks)
        if hit.get("report_digests"):
            self._refs["cache"].append(key + ":reports")
        self.subsets.clear()
        self.subsets.update({n: Subset.from_dict(d) for n, d in hit["subsets"].items()})
        used: set[tuple[str, str]] = set()
        out = []
        undeclared: set[str] = set()
        for packed, reason in hit["aside"]:
            state = _unpack(packed, by_id, undeclared)
            if self._keep_restored(state, step.name):
                out.append(dict(state, steps=state.get("steps", []) + [step.name]))
                stats.messages.append(f"{state['name']}: kept (restored by hand; the step said: {reason})")
            else:
                self.set_aside.append((state, step.name, self._in_user_words(reason, state)))
                stats.set_aside += 1
        for packed in hit["outputs"]:
            o = _unpack(packed, by_id, undeclared)
            o["name"] = _unique(o["subset"], o["name"], used)
            out.append(o)
        writes = chain.declared_fields(step, "writes")
        if writes is not None and undeclared - writes and stats.computed:
            stats.messages.append(f"warning: step '{step.name}' changed {', '.join(sorted(undeclared - writes))}, "
                                  f"which it does not declare in writes (it declares "
                                  f"{', '.join(sorted(writes)) or 'nothing'})")
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
        ledger_path = self._ledger_path
        ledger = self._ledger()
        new_ledger: dict[str, list] = {}
        # (rel, target, lstat of target or None, file to copy, text, blob): strings, one lstat per file
        planned: list[tuple[str, str, os.stat_result | None, str | None, str | None, str | None]] = []

        confined = _Confined(out)
        file_of = self.store.file_of

        # Nothing is written until every target is known: a file lorakit did not write is never replaced.
        def place(source: str, rel: str, blob: str) -> None:
            planned.append((rel, *confined(rel, "output file"), source, None, blob))

        def place_text(text: str, rel: str) -> None:
            planned.append((rel, *confined(rel, "output file"), None, text, None))

        folders: dict[str, str] = {}
        images: list[ImageRecord] = []
        for s in list(states):
            subset = s["subset"]
            sub = self.subsets[subset]
            folder = folders.get(subset)
            if folder is None:
                folder = folders[subset] = _folder(sub)
            name = s["name"]
            try:
                check_relative(name, "image name")
            except PathEscape as exc:  # a step or a data file chose a name outside the output
                self.set_aside.append((dict(s, name=Path(s["image"]).stem), s["steps"][-1] if s.get("steps") else "output", str(exc)))
                states.remove(s)
                continue
            image = s["image"]
            rel = _join(folder, name + os.path.splitext(image)[1])
            place(file_of(image, s.get("image_path")), rel, image)
            tags = s.get("tags", [])
            text = s["text"] if s.get("text") is not None else caption_text([t for t, _ in tags], s.get("caption"))
            caption_rel = None
            if text:  # (a caption set by hand is verbatim)
                caption_rel = _join(folder, name + ".txt")
                place_text(text, caption_rel)
            mask_rel = None
            if s.get("mask"):
                mask_rel = _join("masks", folder, name + ".png")
                place(file_of(s["mask"], s.get("mask_path")), mask_rel, s["mask"])
            meta = s.get("meta", {})
            if s.get("rejected_mask"):  # kept for the review page (and for accepting it again)
                meta = dict(meta, rejected_mask=_join("set_aside", "masks", folder, name + ".png"))
                place(file_of(s["rejected_mask"], s.get("mask_path")), meta["rejected_mask"], s["rejected_mask"])
            width, height = s.get("size") or self.store.size_of(image)  # recorded: nothing is decoded
            images.append(ImageRecord(
                path=rel, caption=text, subset=subset, width=width, height=height,
                sha256=image.partition(".")[0], caption_path=caption_rel,
                tags=[{"name": t, "score": sc} for t, sc in tags], sentence=s.get("caption"),
                repeats=sub.repeats, is_reg=sub.is_reg, mask=mask_rel, source=s.get("source"),
                steps=s.get("steps", []), meta=meta, id=s.get("id"), edited=bool(s.get("edited")),
            ))

        aside_records: list[SetAsideRecord] = []
        for state, step, reason in self.set_aside:
            rel = None
            if state.get("image"):
                rel = _join("set_aside", step, state["subset"] if state["subset"] != "default" else "",
                            state["name"] + Path(state["image"]).suffix)
                place(file_of(state["image"], state.get("image_path")), rel, state["image"])
            aside_records.append(SetAsideRecord(name=state["name"], step=step, reason=reason,
                                                source=state.get("source") or state.get("raw_path"), path=rel,
                                                id=state.get("id"), subset=state.get("subset")))

        self._refuse_foreign_files(planned, ledger)
        for rel, target, st, source, text, blob in planned:
            if source is not None:
                new_ledger[rel] = _write_blob(target, st, source, ledger.get(rel), blob)
            else:
                new_ledger[rel] = _write_text(target, st, text, ledger.get(rel))
        for rel in sorted(set(ledger) - set(new_ledger)):  # files an earlier run wrote that are no longer wanted
            self._delete_written(rel, ledger[rel])
        if new_ledger != ledger:  # an unchanged re-run writes nothing
            atomic_write_text(ledger_path, json.dumps(new_ledger))
            self._written = new_ledger

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
        foreign = [rel for rel, target, st, path, text, blob in planned
                   if rel not in ledger and st is not None
                   and not _same_content(Path(target), path and Path(path), text, blob)]
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
        """Delete a file an earlier run wrote, unless it is a picture that changed since (the user's now)."""
        try:
            target = confined_path(self.output, rel, "ledger entry")
            st = target.lstat()
        except (PathEscape, FileNotFoundError):
            return
        size, mtime = (entry[1], entry[2]) if len(entry) >= 3 else (0, 0)
        # A caption edited by hand was taken into the curation file at the start of the run, so only
        # other files (pictures) that changed since lorakit wrote them are left to the user.
        if entry[0] != "text" and (size or mtime) and (st.st_size, st.st_mtime_ns) != (size, mtime):
            self.console.print(f"[yellow]kept[/] {target}: no longer wanted, but changed since lorakit wrote it",
                               highlight=False)
            return
        target.unlink(missing_ok=True)


def _unchanged(st: os.stat_result | None, prev: list | None, mark: str) -> bool:
    """True when the ledger shows that lorakit wrote ``mark`` (a blob, a caption's hash) to the file
    whose ``lstat`` is ``st`` and the file has not changed since (same size and modification time)."""
    return (st is not None and prev is not None and prev[0] == mark and len(prev) >= 3
            and prev[1] == st.st_size and prev[2] == st.st_mtime_ns and not stat.S_ISLNK(st.st_mode))


def _write_blob(target: str, st: os.stat_result | None, source: str, prev: list | None, blob: str) -> list:
    """Copy a blob to ``target`` unless the ledger shows it is already there; return its ledger entry."""
    if _unchanged(st, prev, blob):
        return prev  # type: ignore[return-value]
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)  # streamed; a large image is never read whole into memory
    st = os.stat(target)
    return [blob, st.st_size, st.st_mtime_ns]


def _write_text(target: str, st: os.stat_result | None, text: str, prev: list | None) -> list:
    """Write a caption unless the ledger shows the file holds it (then it is not even read)."""
    data = text.encode("utf-8")
    mark = "text:" + hashlib.sha1(data).hexdigest()
    if _unchanged(st, prev, mark):
        return prev  # type: ignore[return-value]
    try:
        same = st is not None and st.st_size == len(data) and Path(target).read_bytes() == data
    except OSError:
        same = False
    if not same:
        atomic_write_text(target, text)
    st = os.stat(target)
    return [mark, st.st_size, st.st_mtime_ns]


def _same_content(target: Path, path: Path | None, text: str | None, blob: str | None) -> bool:
    """True when ``target`` already holds exactly what would be written (writing it changes nothing)."""
    try:
        if not target.is_file() or target.is_symlink():
            return False
        if path is not None:
            return target.stat().st_size == path.stat().st_size and sha256_file(target) == Path(blob or path.name).stem
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


def _check_losses(step: str, failed: list[str], total: int, output: Path) -> None:
    """A step that failed (errors and crashes, not decisions) on most of its images stops the run
    before the dataset folder is touched: writing would delete the previous, good dataset."""
    if failed and len(failed) > _MOST * total:
        reasons = Counter(failed).most_common(3)
        listed = "; ".join(f"{n} x {reason}" for reason, n in reasons)
        raise LorakitError(
            f"step '{step}' failed on {len(failed)} of {total} images ({listed}). The run stopped and "
            f"{output} was left as it was. Finished results are cached: fix the cause and run again.")


_DELTA_SKIP = ("meta", "steps")


def _pack(state: State, by_id: dict[str, State]) -> dict:
    """A dataset step's output as the cache keeps it: what changed against the input with the same
    id, or the whole state for an image the step made."""
    base = by_id.get(state.get("id"))
    if base is None:
        return {"state": state}
    delta = {k: v for k, v in state.items() if k not in _DELTA_SKIP and base.get(k) != v}
    delta.update({k: None for k in base if k not in state and k not in _DELTA_SKIP})
    meta, old = state.get("meta") or {}, base.get("meta") or {}
    meta_set = {k: v for k, v in meta.items() if k not in old or old[k] != v}
    meta_del = [k for k in old if k not in meta]
    packed: dict[str, Any] = {"of": state["id"], "steps": state.get("steps", [])[len(base.get("steps", [])):]}
    for name, value in (("delta", delta), ("meta_set", meta_set), ("meta_del", meta_del)):
        if value:  # empty parts are left out: a re-run decodes this entry for every image
            packed[name] = value
    return packed


def _unpack(packed: dict, by_id: dict[str, State], changed: set[str]) -> State:
    """The state a packed output stands for in this run; ``changed`` collects the fields it changed."""
    if "state" in packed:
        return dict(packed["state"])
    base = by_id[packed["of"]]
    out = dict(base)
    delta, meta_set, meta_del = packed.get("delta"), packed.get("meta_set"), packed.get("meta_del")
    if delta:
        out.update(delta)
        changed.update(chain.FIELDS & set(delta))
    if meta_set or meta_del:
        meta = dict(base.get("meta") or {})
        meta.update(meta_set or {})
        for k in meta_del or ():
            meta.pop(k, None)
        out["meta"] = meta
        changed.add("meta")
    out["steps"] = base.get("steps", []) + packed["steps"]
    return out


class _Confined:
    """``confined_path(root, rel)`` for the many files of one dataset: each folder is resolved once,
    then only the file itself is checked for being a symlink (the same guarantee, far fewer syscalls).
    Returns the target as a string and its ``lstat`` (None when it does not exist), which the writer
    compares with the ledger: one system call per file on an unchanged re-run."""

    def __init__(self, root: Path):
        self.root = root
        self.root_text = os.fspath(root)
        self.base = os.path.realpath(root)
        self.folders: dict[str, bool] = {}

    def __call__(self, rel: str, what: str) -> tuple[str, os.stat_result | None]:
        clean = check_relative(rel, what)
        target = os.path.join(self.root_text, clean) if clean else self.root_text
        folder = os.path.dirname(clean)
        inside = self.folders.get(folder)
        if inside is None:
            inside = self.folders[folder] = is_within(self.root / folder, self.root, self.base)
        try:
            st = os.lstat(target)
        except (FileNotFoundError, NotADirectoryError):
            st = None
        if not inside or (st is not None and stat.S_ISLNK(st.st_mode)):
            confined_path(self.root, rel, what)  # the careful check, and its error message
        return target, st


def _failed_tree(reason: str) -> dict:
    """The result of a chain job whose worker failed: set aside, retried by the next run."""
    return {"key": "", "entry": {"aside": reason, "final": False}}


def _remove_partial_files(folder: Path) -> None:
    """Delete temporary files a killed run left behind (atomic writes never leave them otherwise):
    only lorakit's own names (``.lorakit-tmp-`` + 8 random characters), never a user's ``.tmp-*``.
    The store is skipped: its leftovers are never read, and `lorakit clean` removes them."""
    for root, dirs, files in os.walk(folder):
        if root == str(folder) and STORE_DIR in dirs:
            dirs.remove(STORE_DIR)
        for name in files:
            if not name.startswith(TMP_PREFIX):  # (no path object for the many other files)
                continue
            tmp = Path(root, name)
            if is_partial_file(tmp) and tmp.is_file() and not tmp.is_symlink():
                tmp.unlink(missing_ok=True)


class _OutputMarks:
    """What lorakit last wrote to the output's manifest and reports: a digest of the content and the
    file's size and modification time (``.lorakit/outputs.json``). A file whose size and time still
    match was not touched since, so comparing digests tells whether writing it would change it,
    without reading the file (a manifest of 100k images is over 100 MiB)."""

    NAME = "outputs.json"

    def __init__(self, store_root: Path):
        self.path = store_root / self.NAME
        try:
            self.marks: dict[str, dict] = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.marks = {}
        self.changed = False

    def matches(self, target: Path, content_digest: str) -> dict | None:
        """The mark of ``target`` when it holds what was written with ``content_digest``, else None."""
        mark = self.marks.get(os.path.abspath(target))
        if not isinstance(mark, dict) or mark.get("digest") != content_digest:
            return None
        try:
            st = os.stat(target)
        except OSError:
            return None
        return mark if [st.st_size, st.st_mtime_ns] == mark.get("stat") else None

    def mark(self, target: Path, content_digest: str, **extra: Any) -> None:
        st = os.stat(target)
        self.marks[os.path.abspath(target)] = {"digest": content_digest, "stat": [st.st_size, st.st_mtime_ns], **extra}
        self.changed = True

    def save(self) -> None:
        if self.changed:
            atomic_write_text(self.path, json.dumps(self.marks))
            self.changed = False


def _json_digest(data: Any) -> str:
    """SHA-256 of data as compact JSON (the C encoder: fast even for a large manifest)."""
    text = json.dumps(data, ensure_ascii=False, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _replay_report(ctx: StepContext, name: str, data: Any, marks: _OutputMarks) -> None:
    """A cached dataset step's report: rewritten only when the file differs (or is gone)."""
    target = ctx.output_dir / "reports" / f"{ctx.step_name}-{name}.json"
    content = _json_digest(data)
    if marks.matches(target, content):
        ctx.reports[name] = data
        return
    try:
        same = target.read_text(encoding="utf-8") == json.dumps(data, indent=2, ensure_ascii=False, default=str)
    except OSError:
        same = False
    if same:
        ctx.reports[name] = data
    else:
        ctx.report(name, data)
    marks.mark(target, content)


def _save_if_changed(manifest: Manifest, marks: _OutputMarks) -> Path:
    """Write manifest.json unless the one on disk says the same (apart from its creation time)."""
    target = manifest.root / MANIFEST_NAME
    mark = marks.marks.get(os.path.abspath(target))
    if isinstance(mark, dict) and mark.get("created"):
        manifest.created = mark["created"]
        content = _json_digest(manifest.to_dict())
        if marks.matches(target, content):
            return target  # the file is as lorakit wrote it, and it wrote the same content
    try:
        old = json.loads(target.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old = None
    if isinstance(old, dict) and old.get("created"):
        manifest.created = old["created"]
        new = manifest.to_dict()
        if new == old:
            marks.mark(target, _json_digest(new), created=manifest.created)
            return target
    manifest.created = ""
    data = manifest.to_dict()
    manifest.created = data["created"]
    saved = manifest.save()
    marks.mark(target, _json_digest(data), created=manifest.created)
    return saved


_APPLIED = re.compile(r'\{"version": 1, "applied": ("[0-9a-f]*"|null)[,}]')


def _applied_of(text: str | None) -> str | None:
    """The curation digest a saved curation input was last applied with (read from the head of the
    file: the states after it are not parsed)."""
    if not text:
        return None
    head = _APPLIED.match(text)
    if head:
        return json.loads(head.group(1))
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data.get("applied") if isinstance(data, dict) else None


def _write_if_changed(path: Path, old: str | None, text: str) -> None:
    """Write ``text`` unless ``old`` (the file's content, read before) is the same."""
    if old != text:
        atomic_write_text(path, text)


def _chains(steps: list[ConfiguredStep]) -> list[list[ConfiguredStep]]:
    """Group consecutive per-image steps that run in the worker pool (one pass per image); steps that
    run in the main process (models, ``workers = 1``) or in batches stay on their own."""
    groups: list[list[ConfiguredStep]] = []
    for cfg in steps:
        step = cfg.step
        fusable = isinstance(step, ImageStep) and step.workers is None and step.batch_size <= 1
        prev = groups[-1][-1].step if groups else None
        if fusable and isinstance(prev, ImageStep) and prev.workers is None and prev.batch_size <= 1:
            groups[-1].append(cfg)
        else:
            groups.append([cfg])
    return groups


def _worker_ctx(ctx: StepContext) -> StepContext:
    return StepContext(**{**ctx.__dict__, "messages": [], "set_aside_items": [], "reports": {}})


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
