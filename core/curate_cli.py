"""``lorakit curate``: the curation file from the terminal (list, edit, undo, apply).

Every command takes TARGET (a pipeline file or a dataset folder) and images by name (``red``,
``outfit1/red``), file path, or id; edits are applied to the dataset folder at once unless
``--no-apply`` (the next ``lorakit run`` applies them in any case).
"""
from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from lorakit.plugin_sdk import LorakitError

from .curation import Curation, apply_to_dataset, record_id

console = Console(stderr=True)
out_console = Console()

TARGET = click.argument("target", type=click.Path(exists=True))
IMAGES = click.argument("images", nargs=-1)


def _images_options(f):
    f = click.option("--no-apply", is_flag=True, help="only record the edit (the next run applies it)")(f)
    f = click.option("--has-tag", "has_tags", multiple=True, metavar="TAG", help="every image with this tag")(f)
    f = click.option("--subset", "subsets", multiple=True, metavar="NAME", help="every image of this subset")(f)
    f = click.option("--all", "all_images", is_flag=True, help="every image of the dataset")(f)
    return f


class Target:
    """The curation file and dataset folder behind TARGET, with image lookup by name/path/id."""

    def __init__(self, target: str):
        self.curation = Curation.for_target(Path(target))
        self.dataset = self.curation.dataset
        self.manifest = None
        if self.dataset is not None and (self.dataset / "manifest.json").is_file():
            from .manifest import Manifest

            self.manifest = Manifest.load(self.dataset)

    def _index(self, include_aside: bool) -> dict[str, str]:
        if self.manifest is None:
            raise LorakitError(f"{self.dataset or self.curation.path}: no dataset yet (no manifest.json); run the "
                               "pipeline first, then curate its images")
        index: dict[str, str] = {}
        stems: dict[str, list[str]] = {}
        entries = [(r.path, record_id(r)) for r in self.manifest.images]
        if include_aside:
            entries += [(r.path or r.name, r.id) for r in self.manifest.set_aside if r.id]
        for path, rid in entries:
            stem = str(Path(path).with_suffix(""))
            for key in (rid, path, stem, str((self.manifest.root / path).resolve())):
                index.setdefault(key, rid)
            stems.setdefault(Path(path).stem, []).append(rid)
        for r in self.manifest.set_aside if include_aside else []:
            if r.id:
                stems.setdefault(r.name, []).append(r.id)
        for stem, ids in stems.items():
            if len(set(ids)) == 1:
                index.setdefault(stem, ids[0])
        return index

    def resolve(self, images, all_images=False, subsets=(), has_tags=(), include_aside=False) -> list[str]:
        """Ids of the images named on the command line (names, paths or ids) and selected by flags."""
        index = self._index(include_aside)
        ids: list[str] = []
        for name in images:
            key = name if name in index else str(Path(name).resolve())
            if key not in index:
                raise LorakitError(f"no image {name!r} in {self.manifest.root / 'manifest.json'} (give its name "
                                   "as `lorakit curate list` shows it, its file path, or its id)")
            ids.append(index[key])
        wanted_tags = {t.strip().lower() for t in has_tags}
        for r in self.manifest.images:
            tags = {t.strip().lower() for t in r.caption.replace("|||", ",").split(",")}
            if all_images or r.subset in subsets or (wanted_tags and wanted_tags <= tags):
                ids.append(record_id(r))
        if not ids:
            raise LorakitError("no images selected: name some, or use --all, --subset or --has-tag")
        return list(dict.fromkeys(ids))

    def finish(self, edit, no_apply: bool) -> None:
        console.print(f"[green]Recorded[/] {edit.describe()}  [dim](batch {edit.batch} in {self.curation.path})[/]",
                      highlight=False)
        if no_apply or self.dataset is None:
            return
        result = apply_to_dataset(self.dataset, self.curation)
        for line in result.messages():
            console.print(f"  {line}", highlight=False)
        console.print(f"[green]Applied[/] to {self.dataset}", highlight=False)


def _tags(values) -> list[str]:
    return [t.strip() for v in values for t in v.split(",") if t.strip()]


@click.group(context_settings={"max_content_width": 80},
             short_help="Hand edits (tags, exclusions, subsets) that every run keeps.")
def curate():
    """Hand edits of a dataset, kept in a curation file that every run
    re-applies (TARGET: pipeline.yaml or a dataset folder).

    \b
    Images are named as `lorakit curate list` shows them (red,
    outfit1/red), by file path, or by id; or chosen with --all,
    --subset NAME, --has-tag TAG. Edits reach the dataset folder at
    once (captions, manifest.json). See docs/curation.md.
    """


@curate.command("list")
@TARGET
@click.option("--orphans", is_flag=True, help="only edits whose images are gone")
@click.option("--json", "as_json", is_flag=True, help="print JSON lines")
def list_edits(target, orphans, as_json):
    """List the edits in TARGET's curation file, oldest first."""
    t = Target(target)
    edits = t.curation.edits()
    if orphans:
        known = set()
        if t.manifest is not None:
            known = {record_id(r) for r in t.manifest.images} | {r.id for r in t.manifest.set_aside if r.id}
        edits = [e for e in edits if any(i not in known for i in e.ids + (e.drop or []))]
    if as_json:
        for e in edits:
            click.echo(e.to_json())
        return
    if not edits:
        console.print(f"No edits in {t.curation.path}", highlight=False)
        return
    table = Table(box=None, padding=(0, 1), pad_edge=False)
    for col in ("batch", "line", "by", "edit"):
        table.add_column(col, justify="right" if col in ("batch", "line") else "left")
    for e in edits:
        table.add_row(str(e.batch), str(e.line), e.by, e.describe())
    out_console.print(table)


@curate.command("add-tags")
@TARGET
@click.option("-t", "--tag", "tags", multiple=True, required=True, metavar="TAG",
              help="tag to add (repeat, or comma-separated)")
@click.option("--front", is_flag=True, help="put the tags first (default: at the end)")
@IMAGES
@_images_options
def add_tags(target, tags, front, images, all_images, subsets, has_tags, no_apply):
    """Add tags to IMAGES (again after every re-tagging)."""
    t = Target(target)
    ids = t.resolve(images, all_images, subsets, has_tags)
    t.finish(t.curation.add_tags(ids, _tags(tags), position="front" if front else "end", by="curate"), no_apply)


@curate.command("remove-tags")
@TARGET
@click.option("-t", "--tag", "tags", multiple=True, required=True, metavar="TAG",
              help="tag to remove (repeat, or comma-separated)")
@IMAGES
@_images_options
def remove_tags(target, tags, images, all_images, subsets, has_tags, no_apply):
    """Remove tags from IMAGES (they stay removed after re-tagging)."""
    t = Target(target)
    ids = t.resolve(images, all_images, subsets, has_tags)
    t.finish(t.curation.remove_tags(ids, _tags(tags), by="curate"), no_apply)


@curate.command("replace-tag")
@TARGET
@click.argument("old")
@click.argument("new")
@IMAGES
@_images_options
def replace_tag(target, old, new, images, all_images, subsets, has_tags, no_apply):
    """Replace tag OLD by NEW where IMAGES have it."""
    t = Target(target)
    ids = t.resolve(images, all_images, subsets, has_tags)
    t.finish(t.curation.replace_tag(ids, old, new, by="curate"), no_apply)


@curate.command("move-to-front")
@TARGET
@click.option("-t", "--tag", "tags", multiple=True, required=True, metavar="TAG",
              help="tag to move first (repeat, or comma-separated)")
@IMAGES
@_images_options
def move_to_front(target, tags, images, all_images, subsets, has_tags, no_apply):
    """Move tags to the front of IMAGES' captions."""
    t = Target(target)
    ids = t.resolve(images, all_images, subsets, has_tags)
    t.finish(t.curation.move_to_front(ids, _tags(tags), by="curate"), no_apply)


@curate.command("caption")
@TARGET
@click.argument("image")
@click.argument("caption")
@click.option("--no-apply", is_flag=True, help="only record the edit (the next run applies it)")
def set_caption(target, image, caption, no_apply):
    """Replace the whole caption of IMAGE by CAPTION."""
    t = Target(target)
    t.finish(t.curation.set_caption(t.resolve([image]), caption, by="curate"), no_apply)


@curate.command("picture")
@TARGET
@click.argument("image")
@click.argument("picture", type=click.Path(exists=True, dir_okay=False))
@click.option("--no-apply", is_flag=True, help="only record the edit (the next run applies it)")
def replace_picture(target, image, picture, no_apply):
    """Use PICTURE (a retouched version) instead of IMAGE's picture.

    PICTURE is copied beside the curation file (NAME.pictures/), so it
    survives re-runs and `lorakit clean`. Retouching the file in the
    dataset folder itself does the same at the next run.
    """
    t = Target(target)
    (image_id,) = t.resolve([image])
    t.finish(t.curation.replace_image(image_id, picture, by="curate"), no_apply)


@curate.command("exclude")
@TARGET
@IMAGES
@click.option("--note", default=None, help="why (shown as the set-aside reason)")
@_images_options
def exclude(target, images, note, all_images, subsets, has_tags, no_apply):
    """Leave IMAGES out of the dataset (kept in set_aside/curation/)."""
    t = Target(target)
    ids = t.resolve(images, all_images, subsets, has_tags)
    t.finish(t.curation.exclude(ids, note=note, by="curate"), no_apply)


@curate.command("restore")
@TARGET
@IMAGES
@click.option("--no-apply", is_flag=True, help="only record the edit (the next run applies it)")
def restore(target, images, no_apply):
    """Bring back excluded images, or images a step set aside."""
    t = Target(target)
    ids = t.resolve(images, include_aside=True)
    t.finish(t.curation.restore(ids, by="curate"), no_apply)


@curate.command("move")
@TARGET
@click.argument("subset")
@IMAGES
@_images_options
def move(target, subset, images, all_images, subsets, has_tags, no_apply):
    """Move IMAGES to SUBSET (a concept folder)."""
    t = Target(target)
    ids = t.resolve(images, all_images, subsets, has_tags)
    t.finish(t.curation.move_to_subset(ids, subset, by="curate"), no_apply)


@curate.command("keeper")
@TARGET
@click.argument("keeper")
@click.argument("replaces", nargs=-1, required=True)
@click.option("--no-apply", is_flag=True, help="only record the edit (the next run applies it)")
def keeper(target, keeper, replaces, no_apply):
    """Keep KEEPER of a duplicate group instead of REPLACES."""
    t = Target(target)
    new = t.resolve([keeper], include_aside=True)[0]
    t.finish(t.curation.set_keeper(new, t.resolve(replaces, include_aside=True), by="curate"), no_apply)


@curate.command("mask")
@TARGET
@click.argument("verdict", type=click.Choice(["accept", "reject"]))
@IMAGES
@click.option("--note", default=None, help="why (reject)")
@_images_options
def mask(target, verdict, images, note, all_images, subsets, has_tags, no_apply):
    """Accept or reject IMAGES' masks (rejected: trained unmasked)."""
    t = Target(target)
    ids = t.resolve(images, all_images, subsets, has_tags)
    if verdict == "accept":
        edit = t.curation.accept_mask(ids, by="curate")
    else:
        edit = t.curation.reject_mask(ids, note=note, by="curate")
    t.finish(edit, no_apply)


@curate.command("undo")
@TARGET
@click.option("--no-apply", is_flag=True, help="only change the file (the next run applies it)")
def undo(target, no_apply):
    """Remove the last batch of edits."""
    t = Target(target)
    gone = t.curation.undo()
    if not gone:
        console.print(f"Nothing to undo in {t.curation.path}", highlight=False)
        return
    for e in gone:
        console.print(f"[yellow]Undone[/] {e.describe()}", highlight=False)
    if not no_apply and t.dataset is not None and t.manifest is not None:
        for line in apply_to_dataset(t.dataset, t.curation).messages():
            console.print(f"  {line}", highlight=False)


@curate.command("apply")
@TARGET
@click.option("--json", "as_json", is_flag=True, help="print what was done as JSON")
def apply(target, as_json):
    """Take hand edits of the folder in, then apply the curation file
    to the dataset now (no re-run)."""
    t = Target(target)
    if t.dataset is None or t.manifest is None:
        raise LorakitError(f"{target}: no dataset yet (no manifest.json); `lorakit run` applies the curation")
    result = apply_to_dataset(t.dataset, t.curation)
    if as_json:
        click.echo(json.dumps({"edits": result.edits, "edited": result.edited, "excluded": result.excluded,
                               "restored": result.restored, "moved": result.moved, "captions": result.captions,
                               "orphans": [{"line": e.line, "op": e.op, "missing": m} for e, m in result.orphans],
                               "messages": result.messages()}, indent=2))
        return
    for line in result.messages() or ["no edits"]:
        console.print(f"  {line}", highlight=False)
    console.print(f"[green]Applied[/] {t.curation.path} to {t.dataset}", highlight=False)
