"""Step base classes: the three kinds of work a plugin can add to a pipeline.

* ``ImageStep``: transforms one image at a time (trim, alpha, tagging). The host runs it over all
  images in parallel processes, caches each result by content, and sets aside images that fail.
* ``DatasetStep``: sees the whole dataset at once (dedupe, tag statistics, trigger pruning).
* ``SourceStep``: produces images (a local folder, a booru search, a kohya dataset).
"""
from __future__ import annotations

import inspect
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Iterator, Sequence

from rich.markup import escape

from .errors import SkipImage, is_storage_error
from .item import Item
from .params import Param, Params, validate_params
from .subset import Subset

FIELDS = frozenset({"image", "caption", "tags", "mask", "meta", "subset", "train"})


@dataclass
class StepContext:
    """What a step may know about the run. Picklable: it travels to worker processes.

    * ``work_dir``: a persistent folder of this step's own (downloads, model caches); it survives
      re-runs, so a source can resume.
    * ``tmp_dir``: scratch space for files a step writes before returning them in an Item.
    * ``output_dir``: the dataset folder being built (read-only for steps; the host writes it).
    * ``resolution``: the training resolution of the pipeline (512 for SD1.5, 1024 for SDXL).
    * ``subsets``: the dataset's subsets by name; a source or dataset step may add or change them.
    * ``train``: the pipeline's ``train:`` settings as written (empty without one); the runner
      keys a dataset step's cache on them only when the step declares ``"train"`` in ``reads``.
    * ``prepared``: for a dataset step with a ``prepare`` method, the host's per-image results,
      aligned with the items given to ``run`` (None before the host has filled it in).
    """

    step_name: str
    work_dir: Path
    tmp_dir: Path
    output_dir: Path
    resolution: int = 512
    subsets: dict[str, Subset] = field(default_factory=dict)
    device: str = "auto"
    messages: list[str] = field(default_factory=list)
    set_aside_items: list[tuple[Item, str]] = field(default_factory=list)
    reports: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    prepared: list[Any] | None = None
    console: Any = field(default=None, repr=False, compare=False)  # the run's rich console (main process only)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["console"] = None  # a terminal does not travel to worker processes
        return state

    def log(self, message: str) -> None:
        """A line for the user, printed in the run's summary under this step."""
        self.messages.append(message)

    def set_aside(self, item: Item, reason: str) -> None:
        """Dataset and source steps: remove ``item`` from the dataset, recording why (dataset steps'
        items are kept in set_aside/)."""
        self.set_aside_items.append((item, reason))

    def report(self, name: str, data: Any) -> Path:
        """Write a JSON report ``reports/<step>-<name>.json`` in the output folder and return its path."""
        from .images import atomic_write_text
        from .paths import confined_path

        self.reports[name] = data
        target = confined_path(self.output_dir / "reports", f"{self.step_name}-{name}.json", "report name")
        atomic_write_text(target, json.dumps(data, indent=2, ensure_ascii=False, default=str))
        return target

    @contextmanager
    def progress(self, total: int | None, description: str = "") -> Iterator[Callable[[int], None]]:
        """A progress bar for long work inside a dataset or source step; yields ``advance(n=1)``.

            with ctx.progress(len(todo), "hashing") as advance:
                for path in todo:
                    ...
                    advance()

        ``total=None`` shows a spinner with the elapsed time, for work with no count (loading a model).
        """
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        label = f"[bold]{self.step_name}[/]" + (f" {escape(description)}" if description else "")
        if total is None:
            columns = (SpinnerColumn(), TextColumn(label), TimeElapsedColumn())
        else:
            columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=self.console or Console(stderr=True), transient=True) as bar:
            task = bar.add_task(self.step_name, total=total)
            bar.refresh()  # show the bar at once, not after the first item
            yield lambda n=1: bar.advance(task, n)

    def subset(self, name: str) -> Subset:
        """The subset called ``name``, created with defaults if it is new."""
        if name not in self.subsets:
            self.subsets[name] = Subset(name)
        return self.subsets[name]


class Step:
    """Common declarations of every step. Subclass ImageStep, DatasetStep or SourceStep."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    kind: ClassVar[str] = ""
    params: ClassVar[Sequence[Param]] = ()
    # The item fields (FIELDS, and "name" for reads) the step looks at and may change. The host keys
    # a step's cache by what it reads and refuses changes to fields it does not declare in writes.
    # None (the default) means "not declared": the step may read and change anything.
    reads: ClassVar[frozenset[str] | None] = None
    writes: ClassVar[frozenset[str] | None] = None
    example: ClassVar[str] = ""
    # True when the step's results depend on something outside its inputs and parameters (the
    # network, the time, randomness without a seed): a pipeline with such a step is never reported
    # "unchanged" from the last run without running (docs/store.md, "The run-level short circuit").
    volatile: ClassVar[bool] = False

    def __init__(self, params: Params | dict[str, Any] | None = None):
        if not isinstance(params, Params):
            params = validate_params(self.name, self.params, params or {})
        self.options = params

    @classmethod
    def configure(cls, given: dict[str, Any] | None = None, where: str | None = None) -> "Step":
        """Validate ``given`` against the declared params and build the step (raises ParamError)."""
        return cls(validate_params(cls.name, cls.params, given or {}, where))

    def setup(self, ctx: StepContext) -> None:
        """Called once per process before the first image: load models here, not in ``__init__``."""

    def cache_token(self) -> str:
        """Extra text mixed into the cache key, e.g. a hash of a model file the step reads."""
        return ""

    @classmethod
    def describe(cls) -> str:
        return inspect.cleandoc(cls.__doc__ or cls.summary or "")

    def __getstate__(self):
        # Models loaded in setup() stay in their process; only the options travel.
        return {"options": self.options}

    def __setstate__(self, state):
        self.options = state["options"]


class ImageStep(Step):
    """A step applied to each image on its own.

    Override ``process(item, ctx)`` and return the item (changed with ``item.replace`` or
    ``item.with_image``), or a list of items (one image becomes several, e.g. GIF frames). Raise
    ``SkipImage(reason)`` to set the image aside. ``workers = 1`` keeps the step in the main process
    (GPU models); override ``process_batch`` for batched inference with ``batch_size`` items.
    """

    kind = "image"
    workers: ClassVar[int | None] = None
    batch_size: ClassVar[int] = 1

    def process(self, item: Item, ctx: StepContext) -> Item | list[Item]:
        raise NotImplementedError

    def resources(self, cluster_has_gpus: bool) -> dict[str, float]:
        """What one worker of this step needs on a Ray cluster (``num_cpus``, ``num_gpus``): one CPU;
        a model step (``workers = 1``) a GPU too when its ``device`` option is cuda, or auto and the
        cluster has GPUs. Override for other needs (two GPUs, half a GPU: ``{"num_gpus": 0.5}``)."""
        device = self.options["device"] if "device" in self.options else None
        if self.workers == 1 and isinstance(device, str):
            if device.startswith("cuda") or (device == "auto" and cluster_has_gpus):
                return {"num_cpus": 1, "num_gpus": 1}
        return {"num_cpus": 1}

    def process_batch(self, items: list[Item], ctx: StepContext) -> list[Item | list[Item] | BaseException]:
        """Process several items; an exception in the list sets that one item aside."""
        out: list[Item | list[Item] | BaseException] = []
        for item in items:
            try:
                out.append(self.process(item, ctx))
            except Exception as exc:  # one bad image never stops the others
                out.append(exc)
        return out


class DatasetStep(Step):
    """A step that sees every item at once. Override ``run(items, ctx)`` and return the new list.

    Remove an item with ``ctx.set_aside(item, reason)`` (and leave it out of the returned list).

    A step whose work splits into a per-image part (a perceptual hash, an embedding) and a
    whole-dataset part (grouping) also overrides ``prepare(item, ctx)``: the host runs it over the
    images in its shared worker pool, caches each result in the store by the image's content (a
    re-run, or a grown dataset, prepares only new images), sets aside an image whose ``prepare``
    raised, and hands the results to ``run`` as ``ctx.prepared`` (one per item, in order). Call
    ``self.prepared(items, ctx)`` in ``run`` to get them, computed in-process when no host did.
    """

    kind = "dataset"
    # The item fields ``prepare`` looks at: its per-image cache key (``image`` by default).
    prepare_reads: ClassVar[frozenset[str]] = frozenset({"image"})

    def run(self, items: list[Item], ctx: StepContext) -> list[Item]:
        raise NotImplementedError

    def prepare(self, item: Item, ctx: StepContext) -> Any:
        """The per-image part: a JSON-serialisable result for ``item`` (runs in a worker process).
        Raise ``SkipImage`` or let ``ImageError`` through to set the image aside."""
        raise NotImplementedError

    @classmethod
    def prepares(cls) -> bool:
        """True when the step has a per-image part (it overrides ``prepare``)."""
        return cls.prepare is not DatasetStep.prepare

    def prepared(self, items: list[Item], ctx: StepContext) -> tuple[list[Item], list[Any]]:
        """``(items, results)``: the host's ``ctx.prepared``, or, when ``run`` is called without a
        host, ``prepare`` run here on each item (an image it fails on is set aside with the reason).
        A result is None for an image a person restored after ``prepare`` had set it aside."""
        if ctx.prepared is not None:
            if len(ctx.prepared) != len(items):
                raise ValueError(f"ctx.prepared holds {len(ctx.prepared)} results for {len(items)} items")
            return items, list(ctx.prepared)
        kept, results = [], []
        for item in items:
            try:
                results.append(self.prepare(item, ctx))
            except Exception as exc:  # one bad image never stops the others
                if is_storage_error(exc):
                    raise
                ctx.set_aside(item, reason_of(exc))
                continue
            kept.append(item)
        return kept, results


class SourceStep(Step):
    """A step that produces images. Override ``produce(ctx)`` and yield Items whose ``path`` is a file.

    The host copies each file into its store (the original is never touched). Set the item's
    ``subset``; declare subset settings with ``ctx.subset(name)``. A file the source cannot use (an
    unreadable caption, say) goes to ``ctx.set_aside(item, reason)`` instead of being yielded.
    """

    kind = "source"

    def produce(self, ctx: StepContext) -> Iterable[Item]:
        raise NotImplementedError

    def inputs(self) -> list[Path]:
        """Local folders this source reads; the host refuses an output folder that overlaps them."""
        return []

    def fingerprint(self) -> str | None:
        """A string that changes whenever what ``produce`` would yield may change (for a local
        folder: the path, size, modification time and inode of every file, from one listing), or
        None (the default) when the source cannot tell without producing: a network source, say.
        With None, every run of the pipeline runs; with a fingerprint, a re-run whose fingerprints,
        steps and curation all equal the last run's is reported from it without doing anything."""
        return None


def reason_of(exc: BaseException) -> str:
    """The one-line reason recorded when an exception sets an image aside."""
    if isinstance(exc, SkipImage):
        return exc.reason
    text = str(exc).strip() or "no message"
    return f"{type(exc).__name__}: {text}"
