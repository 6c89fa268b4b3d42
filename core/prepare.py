"""The per-image part of a dataset step (``DatasetStep.prepare``), run as a per-image step.

A dataset step such as dedupe has an expensive per-image part (decoding and hashing each picture)
and a cheap whole-dataset part (grouping). The runner runs the per-image part through the same
machinery as any per-image step (chain.py): in the run's shared worker pool, each result cached in
the store by the image's content, an image that fails set aside with the reason. The result rides
in the state's meta under ``PREPARED_META`` until ``take_results`` hands it to the dataset step.
"""
from __future__ import annotations

from typing import Any

from lorakit.plugin_sdk import DatasetStep, ImageStep, Item, StepContext

PREPARED_META = "_lorakit_prepared"


class PrepareStep(ImageStep):
    """An image step that runs a dataset step's ``prepare`` and keeps the result in the item's meta."""

    workers = None  # runs in the shared pool, fused with nothing (see runner._chains)
    batch_size = 1

    def __init__(self, step: DatasetStep):
        self.step = step
        self.options = step.options
        self.name = step.name
        self.version = f"{step.version}+prepare"  # never the key of the dataset step's own result
        self.summary = step.summary
        self.reads = frozenset(step.prepare_reads)
        self.writes = frozenset({"meta"})

    def __getstate__(self):
        return {"step": self.step}

    def __setstate__(self, state):
        self.__init__(state["step"])

    def cache_token(self) -> str:
        return self.step.cache_token()

    def setup(self, ctx: StepContext) -> None:
        self.step.setup(ctx)

    def process(self, item: Item, ctx: StepContext) -> Item:
        result = self.step.prepare(item, ctx)
        return item.replace(meta={**item.meta, PREPARED_META: result})


def take_results(states: list[dict]) -> tuple[list[dict], list[Any]]:
    """The states without the per-image results, and the results in the same order (None for a
    state that has none: an image restored by hand after ``prepare`` had set it aside)."""
    clean, results = [], []
    for state in states:
        meta = state.get("meta") or {}
        results.append(meta.get(PREPARED_META))
        if PREPARED_META in meta:
            state = dict(state, meta={k: v for k, v in meta.items() if k != PREPARED_META})
        clean.append(state)
    return clean, results
