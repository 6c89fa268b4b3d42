"""Runs of per-image steps: one pass per image, cache keys from what each step reads.

Consecutive per-image steps that run in the worker pool form a *chain*: a worker decodes an image
once, hands the picture from step to step in memory (trim, flatten, ...) and encodes it once, after
the last step. Each step still has its own cache entry, keyed by its name, version, parameters and
only the fields of its input that it declares in ``reads`` (so a caption edit never redoes pixel
work). An entry stores what the step changed (a *delta*: the new image, tags, a meta update, a name
suffix), never the fields it did not touch, and a step that changes a field it does not declare in
``writes`` has that image set aside with a reason naming the step.

A picture made in the middle of a chain is never encoded: its identity in the next step's key is
derived from the key that made it. When a later step of a chain changes, the earlier steps of the
chain run again on the image to rebuild those pictures (counted as *replayed*, not computed).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.plugin_sdk import (
    ImageError, ImageStep, Item, LorakitError, SkipImage, StepContext, is_storage_error, reason_of,
)
from lorakit.plugin_sdk.steps import FIELDS  # noqa: F401 (re-exported for the runner)

from .curation import child_id
from .store import State, Store, digest

# What a step may declare in reads (``name`` too: a step that renames other than by a suffix reads
# it; ``train``: the pipeline's train: settings).
READABLE = FIELDS | {"name"}
_ALL_READ = tuple(sorted(READABLE))


def declared_fields(step_cls_or_step, attr: str) -> frozenset[str] | None:
    """A step's ``reads`` or ``writes``; None when the step declares nothing (read/write anything)."""
    value = getattr(step_cls_or_step, attr, None)
    if value is None:
        return None
    value = frozenset(value)
    allowed = READABLE if attr == "reads" else FIELDS
    unknown = value - allowed
    if unknown:
        raise LorakitError(f"step '{step_cls_or_step.name}' declares {attr} {sorted(unknown)}, which are not item "
                           f"fields (known: {', '.join(sorted(allowed))})")
    return value


@dataclass
class StepPlan:
    """One step of a chain as it travels to a worker: the step, its context and its key prefix."""

    step: ImageStep
    ctx: StepContext
    prefix: str
    reads: tuple[str, ...]
    writes: frozenset[str] | None
    setup_key: str
    seconds: float = 0.0  # the step's own work in this chain (its process_batch and its deltas)
    encode_seconds: float = 0.0  # writing pictures into the store after it (the chain's one encode)

    @property
    def name(self) -> str:
        return self.step.name

    def key(self, state: State) -> str:
        values = [read_value(state, f) for f in self.reads]
        text = self.prefix + json.dumps(values, ensure_ascii=False, default=str, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def make_plan(step: ImageStep, ctx: StepContext, resolution: int) -> StepPlan:
    base = {"step": step.name, "version": step.version, "params": step.options.as_json(),
            "token": step.cache_token(), "resolution": resolution}
    reads = declared_fields(step, "reads")
    writes = declared_fields(step, "writes")
    read_list = tuple(f for f in (_ALL_READ if reads is None else sorted(reads)) if f != "train")
    if reads is None or "train" in reads:  # the pipeline's train: settings, not a field of the image
        base["train"] = ctx.train
    prefix = json.dumps({**base, "reads": read_list}, sort_keys=True, ensure_ascii=False, default=str) + "|"
    setup_key = digest({"class": f"{type(step).__module__}.{type(step).__qualname__}", **base})
    return StepPlan(step, ctx, prefix, read_list, writes, setup_key)


def read_value(state: State, field_name: str) -> Any:
    if field_name == "image":
        return state.get("image") or state.get("pixels")
    if field_name == "mask":
        return state.get("mask") or state.get("mask_pixels")
    return state.get(field_name)


def materialised(state: State) -> bool:
    """True when the state's pictures are files in the store (not pictures held by a worker)."""
    return bool(state.get("image")) and not (state.get("mask_pixels") and not state.get("mask"))


def apply_delta(state: State, delta: dict, step_name: str) -> State:
    """The output state: ``state`` with what the step changed (``delta``) applied."""
    out = dict(state)
    if "name_suffix" in delta:
        out["name"] = state["name"] + delta["name_suffix"]
    elif "name" in delta:
        out["name"] = delta["name"]
    for f in ("image", "image_path", "pixels", "size", "mask", "mask_path", "mask_pixels", "caption", "tags", "subset"):
        if f in delta:
            out[f] = delta[f]
    if "meta_set" in delta or "meta_del" in delta:
        meta = dict(state.get("meta") or {})
        meta.update(delta.get("meta_set", {}))
        for k in delta.get("meta_del", ()):
            meta.pop(k, None)
        out["meta"] = meta
    out["steps"] = list(state.get("steps", [])) + [step_name]
    return out


def child_states(state: State, outputs: list[dict], step_name: str) -> list[State]:
    """The states a step's cached outputs stand for; several outputs of one image get child ids."""
    children = [apply_delta(state, d, step_name) for d in outputs]
    if len(children) > 1 and state.get("id"):
        for k, child in enumerate(children):
            child["id"] = child_id(state["id"], state["name"], child["name"], k)
    return children


def final_state(state: State) -> State:
    """A state as it leaves the chain (no in-worker picture identities)."""
    return {k: v for k, v in state.items() if k not in ("pixels", "mask_pixels")}


# ----- executing (in a worker, or in the main process) -------------------------------------------
class UndeclaredWrite(Exception):
    pass


def _same_path(a, b) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and Path(a) == Path(b))


def _delta(plan: StepPlan, key: str, index: int, state: State, before: Item, after: Item, last: bool,
           store: Store) -> tuple[dict, Item]:
    """What ``plan``'s step changed from ``before`` to ``after``; pictures encoded only when ``last``."""
    d: dict[str, Any] = {}
    changed: set[str] = set()
    if after.name != before.name:
        if after.name.startswith(before.name):
            d["name_suffix"] = after.name[len(before.name):]
        else:
            d["name"] = after.name
    image_changed = ((after.pending_image is not None and after.pending_image is not before.pending_image)
                     or (after.pending_image is None and (before.pending_image is not None
                                                          or not _same_path(after.path, before.path))))
    if image_changed:
        changed.add("image")
    if image_changed or (last and not state.get("image")):
        if last or after.pending_image is None:
            t0 = time.perf_counter()
            blob = store.image_blob(after)  # the one encode of this picture (or adoption of a step's file)
            plan.encode_seconds += time.perf_counter() - t0
            d.update(image=blob, image_path=store.in_place_path(blob), pixels=None, size=list(store.size_of(blob)))
            after = after.replace(path=store.blob_path(blob), pending_image=None)
        else:
            d.update(image=None, image_path=None, pixels=f"{key}/{index}/image", size=list(after.pending_image.size))
    mask_changed = ((after.pending_mask is not None and after.pending_mask is not before.pending_mask)
                    or (after.pending_mask is None and (before.pending_mask is not None
                                                        or not _same_path(after.mask, before.mask))))
    if mask_changed:
        changed.add("mask")
    if mask_changed or (last and state.get("mask_pixels") and not state.get("mask")):
        if after.pending_mask is None and after.mask is None:
            d.update(mask=None, mask_path=None, mask_pixels=None)
        elif last or after.pending_mask is None:
            t0 = time.perf_counter()
            blob = store.mask_blob(after)
            plan.encode_seconds += time.perf_counter() - t0
            d.update(mask=blob, mask_path=store.in_place_path(blob), mask_pixels=None)
            after = after.replace(mask=store.blob_path(blob), pending_mask=None)
        else:
            d.update(mask=None, mask_path=None, mask_pixels=f"{key}/{index}/mask")
    if after.caption != before.caption:
        d["caption"] = after.caption
        changed.add("caption")
    if list(after.tags.items()) != list(before.tags.items()):
        d["tags"] = [[t, s] for t, s in after.tags.items()]
        changed.add("tags")
    if after.meta != before.meta:
        meta_set = {k: v for k, v in after.meta.items() if k not in before.meta or before.meta[k] != v}
        meta_del = [k for k in before.meta if k not in after.meta]
        if meta_set:
            d["meta_set"] = meta_set
        if meta_del:
            d["meta_del"] = meta_del
        changed.add("meta")
    if after.subset != before.subset:
        d["subset"] = after.subset
        changed.add("subset")
    if plan.writes is not None and changed - plan.writes:
        extra = ", ".join(sorted(changed - plan.writes))
        declared = ", ".join(sorted(plan.writes)) or "nothing"
        raise UndeclaredWrite(f"step '{plan.name}' changed {extra}, which it does not declare in writes "
                              f"(it declares {declared}); the result was not kept: fix the step's writes")
    return d, after


def run_jobs(plans: list[StepPlan], store: Store, jobs: list[tuple[State, int]]) -> list[dict]:
    """Run each job (a stored state and the chain position it starts at) to the end of the chain.

    Returns one node per job: ``{"key", "entry", "children"}``, where ``entry`` is what the cache
    keeps for that step and input ({"outputs": [delta, ...]} or {"aside": reason, "final": bool})
    and ``children`` are the nodes of the next step, one per output. Steps see all the images of
    the jobs at their position at once (``process_batch``)."""
    roots: list[dict | None] = [None] * len(jobs)
    live: dict[int, list] = {}
    for j, (state, start) in enumerate(jobs):
        live.setdefault(start, []).append((store.item_from_state(state), state, roots, j))
    last = len(plans) - 1
    for k, plan in enumerate(plans):
        batch = live.pop(k, [])
        if not batch:
            continue
        t0, encoded = time.perf_counter(), plan.encode_seconds
        items = [b[0] for b in batch]
        try:
            outs = plan.step.process_batch(items, plan.ctx)
            if len(outs) != len(items):
                raise RuntimeError(f"process_batch returned {len(outs)} results for {len(items)} images")
        except Exception as exc:  # a whole batch failing sets each of its images aside
            outs = [exc] * len(items)
        for (item, state, parent, slot), out in zip(batch, outs):
            key = plan.key(state)
            node: dict[str, Any] = {"key": key}
            parent[slot] = node
            if is_storage_error(out):
                raise out  # a full or read-only disk is not about this image: the run stops with a clear message
            if isinstance(out, BaseException):
                # Decisions (SkipImage) and unreadable files are final and cached; other errors are retried.
                node["entry"] = {"aside": reason_of(out), "final": isinstance(out, (SkipImage, ImageError))}
                continue
            produced = out if isinstance(out, list) else [out]
            bad = [o for o in produced if not isinstance(o, Item)]
            if bad:
                node["entry"] = {"aside": f"step returned {type(bad[0]).__name__}, not an Item", "final": False}
                continue
            try:
                made = [_delta(plan, key, i, state, item, o, k == last, store) for i, o in enumerate(produced)]
            except Exception as exc:
                if is_storage_error(exc):
                    raise
                node["entry"] = {"aside": str(exc) if isinstance(exc, UndeclaredWrite) else reason_of(exc), "final": False}
                continue
            node["entry"] = {"outputs": [d for d, _ in made]}
            if k < last:
                children: list[dict | None] = [None] * len(made)
                node["children"] = children
                for i, (d, after) in enumerate(made):
                    live.setdefault(k + 1, []).append((after, apply_delta(state, d, plan.name), children, i))
        plan.seconds += time.perf_counter() - t0 - (plan.encode_seconds - encoded)
    return roots  # type: ignore[return-value]


# ----- worker side ---------------------------------------------------------------------------
_WORKER: dict[str, Any] = {"steps": {}}


def init_worker(store_root: str) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle: no worker tracebacks
    _WORKER["store"] = Store(Path(store_root))


def worker_jobs(plans: list[StepPlan], jobs: list[tuple[State, int]]
                ) -> tuple[list[dict], list[list[str]], list[tuple[float, float]]]:
    """Run jobs in a pool worker. The pool outlives a chain, so each configured step is set up once
    per worker process and kept (its models stay loaded) for the rest of the run."""
    steps = _WORKER["steps"]
    for plan in plans:
        if plan.setup_key not in steps:
            plan.step.setup(plan.ctx)
            steps[plan.setup_key] = plan.step
        plan.step = steps[plan.setup_key]
        plan.seconds = plan.encode_seconds = 0.0
    nodes = run_jobs(plans, _WORKER["store"], jobs)
    messages = [list(p.ctx.messages) for p in plans]  # log lines travel back with the results
    for p in plans:
        p.ctx.messages.clear()
    return nodes, messages, [(p.seconds, p.encode_seconds) for p in plans]


# ----- main side: planning from the cache, and putting results together ----------------------------
@dataclass
class _Node:
    state: State
    level: int
    key: str = ""
    entry: dict | None = None
    children: list["_Node"] = field(default_factory=list)
    anchor: "_Node | None" = None  # nearest materialised node at or above this one


@dataclass
class ChainCounts:
    inputs: int = 0
    outputs: int = 0
    set_aside: int = 0
    cached: int = 0
    computed: int = 0
    replayed: int = 0  # of the cached: run again to rebuild a picture the chain did not keep
    failed: list[str] = field(default_factory=list)  # reasons of errors (not decisions) this run


class ChainPlan:
    """What the cache already knows of a chain over some states, and the jobs still to run."""

    def __init__(self, plans: list[StepPlan], store: Store, states: list[State]):
        self.plans, self.store = plans, store
        self.counts = [ChainCounts() for _ in plans]
        self.known: dict[str, dict] = {}
        self.used_keys: list[str] = []  # the cache entries this run relies on (kept by `lorakit clean`)
        self.jobs: list[_Node] = []
        self.results: dict[int, list[tuple[str, Any]]] = {}
        # The whole chain over exactly these input states ran before: its outputs are one entry
        # (one look-up and one decode instead of a key, a look-up and a delta per image and step).
        self.memo_key = digest({"chain": [p.prefix for p in plans], "states": states})
        memo = store.cache_get(self.memo_key)
        if memo is not None and len(memo.get("counts", ())) == len(plans):
            self.slots = [(kind, value if kind == "state" else tuple(value)) for kind, value in memo["slots"]]
            for c, (inputs, outputs, set_aside) in zip(self.counts, memo["counts"]):
                c.inputs, c.outputs, c.set_aside, c.cached = inputs, outputs, set_aside, inputs
            self.used_keys = [self.memo_key, *memo["keys"]]
            self.from_memo = True
            return
        self.from_memo = False
        self.roots = [_Node(s, 0) for s in states]
        for r in self.roots:
            r.anchor = r
        missing: set[int] = set()
        level = self.roots
        for k, plan in enumerate(plans):
            for node in level:
                node.key = plan.key(node.state)
            self.known.update(store.cache_get_many(n.key for n in level))
            nxt = []
            for node in level:
                entry = node.entry = self.known.get(node.key)
                if entry is None:
                    missing.add(id(node.anchor))
                    continue
                for child_state in child_states(node.state, entry.get("outputs", []), plan.name):
                    child = _Node(child_state, k + 1)
                    child.anchor = child if materialised(child.state) else node.anchor
                    node.children.append(child)
                    nxt.append(child)
            level = nxt
        # In order: finished states, set-asides and jobs (one per anchor whose subtree has a miss).
        self.slots: list[tuple[str, Any]] = []
        stack = list(reversed(self.roots))
        while stack:
            node = stack.pop()
            if node.anchor is node and id(node) in missing:
                self.jobs.append(node)
                self.slots.append(("job", node))
                continue
            if node.level == len(plans):
                self.slots.append(("state", final_state(node.state)))
                continue
            c = self.counts[node.level]
            c.inputs += 1
            c.cached += 1
            self.used_keys.append(node.key)
            assert node.entry is not None
            if "aside" in node.entry:
                c.set_aside += 1
                self.slots.append(("aside", (node.state, plans[node.level].name, node.entry["aside"])))
            c.outputs += len(node.children)
            stack.extend(reversed(node.children))

    def take(self, job: _Node, tree: dict) -> None:
        """Record a job's result tree: cache the entries that are new, keep its states and set-asides."""
        done: list[tuple[str, Any]] = []
        stack = [(tree, job.state, job.level)]
        while stack:
            node, state, k = stack.pop()
            if k == len(self.plans):
                done.append(("state", final_state(state)))
                continue
            plan, c = self.plans[k], self.counts[k]
            entry = node["entry"]
            c.inputs += 1
            if node["key"]:
                self.used_keys.append(node["key"])
            keep = "outputs" in entry or entry.get("final")
            known = self.known.get(node["key"])
            if known is not None:  # the result was cached; the step ran only to rebuild its picture
                c.cached += 1
                c.replayed += 1
                if keep and known != entry:
                    self.store.cache_put(node["key"], entry)  # a step whose result is not deterministic
            else:
                c.computed += 1
                if keep:
                    self.store.cache_put(node["key"], entry)
            if "aside" in entry:
                c.set_aside += 1
                if not entry.get("final"):
                    c.failed.append(entry["aside"])
                done.append(("aside", (state, plan.name, entry["aside"])))
                continue
            outs = entry["outputs"]
            c.outputs += len(outs)
            children = node.get("children") or [{}] * len(outs)
            for child_state, child in reversed(list(zip(child_states(state, outs, plan.name), children))):
                stack.append((child, child_state, k + 1))
        self.results[id(job)] = done

    def _flat(self) -> list[tuple[str, Any]]:
        out: list[tuple[str, Any]] = []
        for kind, value in self.slots:
            if kind == "job":
                out.extend(self.results.get(id(value), []))
            else:
                out.append((kind, value))
        return out

    def remember(self) -> None:
        """Keep the chain's outputs over these inputs as one entry, when every result is final (an
        error is retried by the next run, so a run with one is not remembered)."""
        if self.from_memo or any(c.failed for c in self.counts) or any(id(j) not in self.results for j in self.jobs):
            return
        self.store.cache_put(self.memo_key, {
            "slots": [[kind, value] for kind, value in self._flat()],
            "counts": [[c.inputs, c.outputs, c.set_aside] for c in self.counts],
            "keys": list(dict.fromkeys(self.used_keys)),
        })
        self.used_keys.append(self.memo_key)

    def outputs(self) -> tuple[list[State], list[tuple[State, str, str]]]:
        """The chain's final states and its set-asides (state, step, reason), both in input order."""
        flat = self._flat()
        return [v for k, v in flat if k == "state"], [v for k, v in flat if k == "aside"]
