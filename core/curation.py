"""Curation: every human decision about a dataset, kept in one file and re-applied on every run.

The curation file is JSON Lines (one edit a line, oldest first) beside ``pipeline.yaml``
(``pipeline.yaml`` -> ``pipeline.curation.jsonl``), or ``curation.jsonl`` inside a dataset folder
that no pipeline made. ``docs/curation.md`` documents the format. Each edit names images by an
*image id* that survives re-runs: the first 16 hex digits of the SHA-256 of the source file's bytes,
plus ``:suffix`` for each image one source became (``:0003`` for an animation's third frame, the
name suffix a crop step gives), plus ``~N`` when the same bytes came in more than once.

    from lorakit.curation import Curation, apply_to_dataset
    cur = Curation.for_target("pipeline.yaml")          # or a dataset folder
    cur.remove_tags(["3f2a9c01d4e5b6a7"], ["watermark"])
    cur.exclude(["77aa01b2c3d4e5f6"], note="off-model")
    apply_to_dataset("dataset/")                         # captions and manifest.json updated now
    cur.undo()                                           # the last batch is gone again

Edits replay in file order over what the pipeline produced, so they keep their meaning when
upstream steps change: a tag removed by hand is removed again after the tagger re-ran with another
threshold, an added tag is added again. An edit whose image no longer exists is reported, never
dropped.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from lorakit.plugin_sdk import LorakitError, atomic_path, atomic_write_text, check_relative

__all__ = [
    "CURATION_VERSION", "DATASET_CURATION_NAME", "OPS", "TAG_OPS",
    "Edit", "Decision", "Curation", "CurationResult", "HandEdits",
    "curation_path_for", "source_id", "child_id", "record_id",
    "decisions", "curate_tags", "parse_caption", "apply_to_states", "restored_ids",
    "take_hand_edits", "apply_to_dataset",
]

CURATION_VERSION = 1
DATASET_CURATION_NAME = "curation.jsonl"
ID_LENGTH = 16
TAG_OPS = ("add_tags", "remove_tags", "replace_tag", "move_to_front", "set_caption")
OPS = TAG_OPS + ("exclude", "restore", "move_to_subset", "set_keeper", "accept_mask", "reject_mask", "replace_image")
HAND_DELETED_NOTE = "deleted from the dataset folder"
_SUBSET_RE = re.compile(r"^[^\W][\w.\- ]*$")
_LOCKS: dict[str, threading.Lock] = {}


# ----- image identity ------------------------------------------------------------------------------
def source_id(sha256_hex: str) -> str:
    """The id of an image read from a source: the start of the SHA-256 of the source file's bytes."""
    return sha256_hex[:ID_LENGTH]


def child_id(parent: str, parent_name: str, child_name: str, index: int) -> str:
    """The id of one of several images a step made from one (animation frames, crops).

    The suffix is what the step added to the name (``red`` -> ``red_0003`` gives ``:0003``), or the
    output's position when the name says nothing; an output that kept the input's name keeps its id.
    """
    if child_name == parent_name:
        return parent
    suffix = ""
    if child_name.startswith(parent_name):
        suffix = child_name[len(parent_name):].strip("_-. /")
    suffix = re.sub(r"[^\w.-]+", "_", suffix) or str(index + 1)
    return f"{parent}:{suffix}"


def record_id(record: Any) -> str:
    """The id of a manifest record (ImageRecord/SetAsideRecord or dict); older manifests had none, so
    the image file's SHA-256 stands in."""
    get = record.get if isinstance(record, dict) else lambda k, d=None: getattr(record, k, d)
    return get("id") or source_id(get("sha256") or "")


# ----- the file ------------------------------------------------------------------------------------
@dataclass
class Edit:
    """One line of the curation file: an operation on some images, in one undoable batch.

    Only the fields an operation uses are written: ``tags`` (+ ``position``) for tag edits, ``old``
    and ``new`` for replace_tag, ``caption`` for set_caption, ``note`` for exclude, ``subset`` for
    move_to_subset, ``drop`` (the ids that lose) for set_keeper. ``names`` are the images' names
    when the edit was made (for people reading the file and for reports); ``by`` says who made it
    (``review``, ``curate``, ``hand`` for edits found in the dataset folder, ``api``).
    """

    batch: int
    op: str
    ids: list[str]
    tags: list[str] | None = None
    position: str | None = None
    old: str | None = None
    new: str | None = None
    caption: str | None = None
    note: str | None = None
    subset: str | None = None
    drop: list[str] | None = None
    image: str | None = None  # replace_image: the picture, relative to the curation file's folder
    names: list[str] | None = None
    by: str = "api"
    at: str = ""
    line: int = 0  # where it was read from (0 = not yet written)

    def to_json(self) -> str:
        data = {k: v for k, v in dataclasses.asdict(self).items() if v is not None and k != "line"}
        order = ["batch", "op", "ids", "tags", "position", "old", "new", "caption", "note", "subset", "drop",
                 "image", "names", "by", "at"]
        return json.dumps({k: data[k] for k in order if k in data}, ensure_ascii=False)

    def describe(self) -> str:
        """One line for people: ``remove_tags [watermark] on 3 image(s)``."""
        what = {
            "add_tags": lambda: f"add {', '.join(self.tags or [])} ({self.position or 'end'})",
            "remove_tags": lambda: f"remove {', '.join(self.tags or [])}",
            "replace_tag": lambda: f"replace {self.old} -> {self.new}",
            "move_to_front": lambda: f"move {', '.join(self.tags or [])} to the front",
            "set_caption": lambda: f"caption = {self.caption!r}",
            "exclude": lambda: "exclude" + (f" ({self.note})" if self.note else ""),
            "restore": lambda: "restore",
            "move_to_subset": lambda: f"move to subset {self.subset}",
            "set_keeper": lambda: f"keep instead of {len(self.drop or [])} duplicate(s)",
            "accept_mask": lambda: "accept mask",
            "reject_mask": lambda: "reject mask" + (f" ({self.note})" if self.note else ""),
            "replace_image": lambda: f"picture replaced by {self.image}",
        }[self.op]()
        names = self.names or self.ids
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        return f"{what}: {shown}"

    @classmethod
    def from_json(cls, data: Any, where: str) -> "Edit":
        if not isinstance(data, dict):
            raise LorakitError(f"{where}: an edit is a JSON object, not {type(data).__name__}")
        op = data.get("op")
        if op not in OPS:
            raise LorakitError(f"{where}: unknown op {op!r} (known: {', '.join(OPS)})")
        known = {f.name for f in dataclasses.fields(cls)} - {"line"}
        unknown = set(data) - known
        if unknown:
            raise LorakitError(f"{where}: unknown key {sorted(unknown)[0]!r} (known: {', '.join(sorted(known))})")
        batch = data.get("batch", 0)
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 0:
            raise LorakitError(f"{where}: batch must be a non-negative integer, not {batch!r}")
        ids = data.get("ids")
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) and i for i in ids):
            raise LorakitError(f"{where}: ids must be a non-empty list of image ids")
        edit = cls(**{"batch": 0, **{k: v for k, v in data.items() if k in known}})
        names = edit.names
        if names is not None and (not isinstance(names, list) or len(names) != len(ids)
                                  or not all(isinstance(n, str) for n in names)):
            edit.names = None  # informative only: a hand-edited list that does not match is ignored
        if not isinstance(edit.by, str) or not isinstance(edit.at, str):
            raise LorakitError(f"{where}: by and at must be strings")
        try:
            _check(edit)
        except LorakitError as exc:
            raise LorakitError(f"{where}: {exc}") from None
        return edit


def _check(edit: Edit) -> None:
    """Validate the fields an operation needs (raises LorakitError saying which and why)."""
    op = edit.op
    if op in ("add_tags", "remove_tags", "move_to_front"):
        if not isinstance(edit.tags, list) or not edit.tags:
            raise LorakitError(f"{op} needs tags (a non-empty list)")
        for t in edit.tags:
            _check_tag(t)
    if op == "add_tags" and edit.position not in (None, "front", "end"):
        raise LorakitError(f"position must be front or end, not {edit.position!r}")
    if op == "replace_tag":
        _check_tag(edit.old)
        _check_tag(edit.new)
    if op == "set_caption" and not isinstance(edit.caption, str):
        raise LorakitError("set_caption needs caption (a string)")
    if op == "move_to_subset":
        if not isinstance(edit.subset, str) or not _SUBSET_RE.match(edit.subset) or edit.subset.strip() != edit.subset:
            raise LorakitError(f"subset {edit.subset!r} is not a valid subset name (letters, digits, _ - . and "
                               "spaces, not starting with . or -)")
    if op == "set_keeper":
        if len(edit.ids) != 1:
            raise LorakitError("set_keeper names exactly one id (the new keeper)")
        if not isinstance(edit.drop, list) or not all(isinstance(i, str) and i for i in edit.drop):
            raise LorakitError("set_keeper needs drop (the ids of the images the keeper replaces)")
    if op == "replace_image":
        if len(edit.ids) != 1:
            raise LorakitError("replace_image names exactly one id")
        if not isinstance(edit.image, str):
            raise LorakitError("replace_image needs image (the picture's path beside the curation file)")
        check_relative(edit.image, "replace_image's image")
    for key in ("note", "caption"):
        value = getattr(edit, key)
        if value is not None and not isinstance(value, str):
            raise LorakitError(f"{key} must be a string")


def _check_tag(tag: Any) -> None:
    if not isinstance(tag, str) or not tag.strip():
        raise LorakitError(f"a tag must be a non-empty string, not {tag!r}")
    if "," in tag or "\n" in tag:
        raise LorakitError(f"tag {tag!r} contains a comma or line break (captions are split there)")


def curation_path_for(target: str | os.PathLike) -> Path:
    """The curation file of a pipeline file (``X.yaml`` -> ``X.curation.jsonl`` beside it) or of a
    dataset folder (the file its manifest names, else ``curation.jsonl`` inside it)."""
    target = Path(target)
    if target.is_dir():
        manifest = target / "manifest.json"
        if manifest.is_file():
            try:
                named = json.loads(manifest.read_text(encoding="utf-8")).get("curation")
            except (json.JSONDecodeError, OSError, AttributeError):
                named = None
            if named:
                path = Path(named)
                return path if path.is_absolute() else (target / path).resolve()
        return target / DATASET_CURATION_NAME
    if target.suffix.lower() in (".yaml", ".yml"):
        return target.with_name(target.stem + ".curation.jsonl")
    if target.name.endswith(".jsonl"):
        return target
    raise LorakitError(f"{target}: expected a pipeline file (.yaml), a dataset folder or a curation .jsonl file")


class Curation:
    """The curation file: read it, add edits (each call one undoable batch), undo the last batch.

    ``dataset`` (optional) is the dataset folder the edits are about; when given, new edits record
    the images' names and ids unknown to its manifest are refused. Writes are atomic and serialised
    (a lock file beside the curation file), so the review page and a terminal can edit at once.
    """

    def __init__(self, path: str | os.PathLike, dataset: str | os.PathLike | None = None):
        self.path = Path(path)
        self.dataset = Path(dataset) if dataset is not None else None
        self._cache: tuple[tuple[int, int], list[Edit]] | None = None
        self._pending: list[Edit] | None = None
        self._names: tuple[Any, dict[str, str]] | None = None

    @classmethod
    def for_target(cls, target: str | os.PathLike) -> "Curation":
        """The curation of a pipeline file or a dataset folder (see ``curation_path_for``)."""
        target = Path(target)
        dataset = None
        if target.is_dir():
            dataset = target
        elif target.suffix.lower() in (".yaml", ".yml") and target.is_file():
            dataset = _pipeline_output(target)
        return cls(curation_path_for(target), dataset)

    # ----- reading -----------------------------------------------------------------------------
    def edits(self) -> list[Edit]:
        """Every edit in the file, in order (an absent file has none)."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return []
        key = (st.st_size, st.st_mtime_ns)
        if self._cache is not None and self._cache[0] == key:
            return list(self._cache[1])
        edits = parse_curation(self.path.read_text(encoding="utf-8"), str(self.path))
        self._cache = (key, edits)
        return list(edits)

    def edits_for(self, image_id: str) -> list[Edit]:
        """The edits that touch one image (as a target or as a dropped duplicate)."""
        return [e for e in self.edits() if image_id in e.ids or image_id in (e.drop or [])]

    def edited_ids(self) -> set[str]:
        """Ids of every image some edit touches."""
        return {i for e in self.edits() for i in e.ids + (e.drop or [])}

    def digest(self) -> str:
        """SHA-256 of the edits (a changed curation re-applies even when nothing else changed)."""
        return hashlib.sha256("\n".join(e.to_json() for e in self.edits()).encode()).hexdigest()

    # ----- writing -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def batch(self, by: str = "api") -> Iterator["Curation"]:
        """Group several operations into one batch (one write, one undo)::

            with cur.batch(by="review"):
                cur.remove_tags(ids, ["meme"])
                cur.add_tags(ids, ["mychar"], position="front")
        """
        if self._pending is not None:
            yield self
            return
        self._pending = []
        try:
            yield self
            pending, self._pending = self._pending, None
            if pending:
                self._write(pending)
        finally:
            self._pending = None

    def _add(self, op: str, ids: Sequence[str] | str, by: str, names: Sequence[str] | None = None, **fields) -> Edit:
        ids = _id_list(ids)
        edit = Edit(batch=0, op=op, ids=ids, by=by, at=_now(), **{k: v for k, v in fields.items() if v is not None})
        _check(edit)
        self._check_known(ids + (edit.drop or []), op)
        edit.names = list(names) if names is not None else self._names_of(ids)
        if self._pending is not None:
            self._pending.append(edit)
        else:
            self._write([edit])
        return edit

    def _write(self, new: list[Edit]) -> None:
        with _locked(self.path):
            self._cache = None
            edits = self.edits()
            number = max((e.batch for e in edits), default=0) + 1
            for e in new:
                e.batch = number
            self._save(edits + new)

    def _save(self, edits: list[Edit]) -> None:
        header = json.dumps({"lorakit_curation": CURATION_VERSION,
                             "about": "hand edits of a lorakit dataset, one JSON object a line; see docs/curation.md"})
        atomic_write_text(self.path, "\n".join([header] + [e.to_json() for e in edits]) + "\n")
        self._cache = None

    def undo(self) -> list[Edit]:
        """Remove the last batch from the file; returns its edits (empty when there is none)."""
        with _locked(self.path):
            self._cache = None
            edits = self.edits()
            if not edits:
                return []
            last = max(e.batch for e in edits)
            self._save([e for e in edits if e.batch != last])
            return [e for e in edits if e.batch == last]

    # ----- the operations (each one batch unless inside ``batch()``) --------------------------
    def add_tags(self, ids: Sequence[str] | str, tags: Sequence[str] | str, position: str = "end",
                 by: str = "api", names: Sequence[str] | None = None) -> Edit:
        """Add ``tags`` to each image, at the ``front`` or the ``end`` of its tags (a tag it already
        has stays where it is). Re-applied on every run, so the tag comes back after re-tagging."""
        return self._add("add_tags", ids, by, names, tags=_tag_list(tags), position=position)

    def remove_tags(self, ids: Sequence[str] | str, tags: Sequence[str] | str, by: str = "api",
                    names: Sequence[str] | None = None) -> Edit:
        """Remove ``tags`` from each image (``long hair`` matches ``long_hair``); a re-run with another
        tagger threshold removes them again."""
        return self._add("remove_tags", ids, by, names, tags=_tag_list(tags))

    def replace_tag(self, ids: Sequence[str] | str, old: str, new: str, by: str = "api",
                    names: Sequence[str] | None = None) -> Edit:
        """Replace tag ``old`` by ``new`` in place, where an image has ``old`` (``bow`` -> ``black_bow``)."""
        return self._add("replace_tag", ids, by, names, old=old.strip(), new=new.strip())

    def move_to_front(self, ids: Sequence[str] | str, tags: Sequence[str] | str, by: str = "api",
                      names: Sequence[str] | None = None) -> Edit:
        """Move ``tags`` (those an image has, in the given order) to the front of its tags."""
        return self._add("move_to_front", ids, by, names, tags=_tag_list(tags))

    def set_caption(self, ids: Sequence[str] | str, caption: str, by: str = "api",
                    names: Sequence[str] | None = None) -> Edit:
        """Replace the whole caption by ``caption`` (written verbatim to the .txt). Later tag edits
        still apply to it; what the tagger says about the image no longer matters."""
        return self._add("set_caption", ids, by, names, caption=caption.strip())

    def exclude(self, ids: Sequence[str] | str, note: str | None = None, by: str = "api",
                names: Sequence[str] | None = None) -> Edit:
        """Leave images out of the dataset (kept under set_aside/curation/ with the note as reason)."""
        return self._add("exclude", ids, by, names, note=note or None)

    def restore(self, ids: Sequence[str] | str, by: str = "api", names: Sequence[str] | None = None) -> Edit:
        """Bring images back: undo an exclusion, or keep an image a step set aside (the run then
        passes it on to the later steps as if that step had kept it)."""
        return self._add("restore", ids, by, names)

    def move_to_subset(self, ids: Sequence[str] | str, subset: str, by: str = "api",
                       names: Sequence[str] | None = None) -> Edit:
        """Put images in another subset (concept folder). A run applies it before the steps, so
        the subset's triggers and repeats follow; an immediate apply moves the files."""
        return self._add("move_to_subset", ids, by, names, subset=subset)

    def set_keeper(self, keeper: str, drop: Sequence[str] | str, by: str = "api",
                   names: Sequence[str] | None = None) -> Edit:
        """Change a dedupe group's keeper: keep ``keeper`` (restored if a step set it aside) and
        exclude the images in ``drop`` (the one kept before) as its duplicates."""
        return self._add("set_keeper", [keeper], by, names, drop=_id_list(drop))

    def accept_mask(self, ids: Sequence[str] | str, by: str = "api", names: Sequence[str] | None = None) -> Edit:
        """Keep images' masks, overriding a quality-check rejection when the mask was kept."""
        return self._add("accept_mask", ids, by, names)

    def replace_image(self, image_id: str, picture: str | os.PathLike, by: str = "api",
                      names: Sequence[str] | None = None) -> Edit:
        """Use ``picture`` (a retouched version) instead of the pipeline's picture of ``image_id``.

        The file is copied beside the curation file, into ``<name>.pictures/`` (by content), so the
        edit survives ``lorakit clean`` and a deleted work store; every later run writes it in place
        of what the steps made (captions, subset and mask decisions still apply)."""
        from lorakit.plugin_sdk import ImageError, verify_image

        picture = Path(picture)
        try:
            verify_image(picture)
        except ImageError as exc:  # it names the file and the problem
            raise LorakitError(f"replace_image: {exc}") from None
        rel = self._keep_picture(picture)
        return self._add("replace_image", [image_id], by, names, image=rel)

    def pictures_dir(self) -> Path:
        return self.path.with_name(self.path.name.removesuffix(".jsonl") + ".pictures")

    def _keep_picture(self, picture: Path) -> str:
        import hashlib
        import shutil

        digest = hashlib.sha256(picture.read_bytes()).hexdigest()
        folder = self.pictures_dir()
        target = folder / (digest + picture.suffix.lower())
        if not target.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(target) as tmp:
                shutil.copyfile(picture, tmp)
        return f"{folder.name}/{target.name}"

    def reject_mask(self, ids: Sequence[str] | str, note: str | None = None, by: str = "api",
                    names: Sequence[str] | None = None) -> Edit:
        """Train images without their mask (the mask is kept under set_aside/masks/)."""
        return self._add("reject_mask", ids, by, names, note=note or None)

    # ----- names from the dataset ---------------------------------------------------------------
    def _index(self) -> dict[str, str]:
        """id -> name of every image and set-aside image of the bound dataset's manifest."""
        if self.dataset is None:
            return {}
        manifest = self.dataset / "manifest.json"
        try:
            st = manifest.stat()
        except FileNotFoundError:
            return {}
        key = (st.st_size, st.st_mtime_ns)
        if self._names is not None and self._names[0] == key:
            return self._names[1]
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, OSError):
            return {}
        index: dict[str, str] = {}
        for r in data.get("set_aside", []):
            if r.get("id"):
                index[r["id"]] = r.get("name") or r["id"]
        for r in data.get("images", []):
            index[record_id(r)] = str(Path(r.get("path", "")).with_suffix(""))
        self._names = (key, index)
        return index

    def _names_of(self, ids: list[str]) -> list[str] | None:
        index = self._index()
        return [index.get(i, i) for i in ids] if index else None

    def _check_known(self, ids: list[str], op: str) -> None:
        index = self._index()
        if not index:
            return
        unknown = [i for i in ids if i not in index]
        if unknown:
            raise LorakitError(f"{op}: no image with id {unknown[0]} in {self.dataset / 'manifest.json'}"
                               + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))


def parse_curation(text: str, where: str) -> list[Edit]:
    """Edits of a curation file's text; blank lines and lines starting with # are skipped."""
    edits: list[Edit] = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LorakitError(f"{where}:{n}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if isinstance(data, dict) and "lorakit_curation" in data:
            version = data["lorakit_curation"]
            if not isinstance(version, int) or version > CURATION_VERSION:
                raise LorakitError(f"{where}:{n}: curation file version {version!r} is newer than this lorakit "
                                   f"understands ({CURATION_VERSION}); upgrade lorakit")
            continue
        edit = Edit.from_json(data, f"{where}:{n}")
        edit.line = n
        if "batch" not in data:  # a line written by hand is a batch of its own
            edit.batch = max((e.batch for e in edits), default=0) + 1
        edits.append(edit)
    return edits


def _id_list(ids: Sequence[str] | str) -> list[str]:
    if isinstance(ids, str):
        ids = [ids]
    out: list[str] = []
    for i in ids:
        if not isinstance(i, str) or not i.strip():
            raise LorakitError(f"an image id must be a non-empty string, not {i!r}")
        if i.strip() not in out:
            out.append(i.strip())
    if not out:
        raise LorakitError("no image ids given")
    return out


def _tag_list(tags: Sequence[str] | str) -> list[str]:
    if isinstance(tags, str):
        tags = [tags]
    out = []
    for t in tags:
        _check_tag(t)
        if t.strip() not in out:
            out.append(t.strip())
    if not out:
        raise LorakitError("no tags given")
    return out


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise writers of one curation file: a thread lock, plus an OS lock on a hidden lock file."""
    lock = _LOCKS.setdefault(str(path.resolve()), threading.Lock())
    with lock:
        try:
            import fcntl
        except ImportError:  # Windows: the thread lock is all
            yield
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name("." + path.name + ".lock"), "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def _pipeline_output(pipeline_file: Path) -> Path | None:
    """The output folder a pipeline file names (without validating the rest of it)."""
    import yaml

    try:
        data = yaml.safe_load(pipeline_file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, OSError):
        return None
    if not isinstance(data, dict) or not data.get("output"):
        return None
    out = Path(os.path.expanduser(str(data["output"])))
    return out if out.is_absolute() else (pipeline_file.parent.resolve() / out)


# ----- replaying edits ------------------------------------------------------------------------------
@dataclass
class Decision:
    """What the edits say about one image, folded in file order."""

    excluded: bool = False
    note: str | None = None
    restored: bool = False
    subset: str | None = None
    mask: str | None = None  # "accept" | "reject"
    mask_note: str | None = None
    caption_edits: list[Edit] = field(default_factory=list)
    image: str | None = None  # replace_image: the picture's path relative to the curation file's folder
    edits: int = 0


def decisions(edits: Iterable[Edit]) -> dict[str, Decision]:
    """id -> Decision, from the edits in order (a later edit wins over an earlier one)."""
    out: dict[str, Decision] = {}
    for e in edits:
        for i in e.ids:
            d = out.setdefault(i, Decision())
            d.edits += 1
            if e.op in TAG_OPS:
                d.caption_edits.append(e)
            elif e.op == "exclude":
                d.excluded, d.note = True, e.note
            elif e.op in ("restore", "set_keeper"):
                d.excluded, d.note, d.restored = False, None, True
            elif e.op == "move_to_subset":
                d.subset = e.subset
            elif e.op == "accept_mask":
                d.mask, d.mask_note = "accept", None
            elif e.op == "reject_mask":
                d.mask, d.mask_note = "reject", e.note
            elif e.op == "replace_image":
                d.image = e.image
        if e.op == "set_keeper":
            keeper = (e.names or e.ids)[0]
            for i in e.drop or []:
                d = out.setdefault(i, Decision())
                d.edits += 1
                d.excluded, d.restored = True, False
                d.note = f"duplicate of {keeper} (keeper chosen by hand)"
    return out


def restored_ids(edits: Iterable[Edit]) -> set[str]:
    """Ids the edits want kept even where a step sets them aside."""
    return {i for i, d in decisions(edits).items() if d.restored}


def _key(tag: str) -> str:
    """How tags compare: case, spaces and underscores, and prompt escapes do not matter."""
    return re.sub(r"[\s_]+", "_", tag.replace("\\(", "(").replace("\\)", ")").strip().lower())


def parse_caption(text: str) -> list[str]:
    """The tags of a caption text (the keep-tokens separator ``|||`` stays an entry of its own)."""
    return [t.strip() for t in text.replace("|||", ",|||,").split(",") if t.strip()]


def curate_tags(tags: Sequence[Sequence[Any]], sentence: str | None, edits: Iterable[Edit]
                ) -> tuple[list[list[Any]], str | None, str | None]:
    """Replay caption edits over the pipeline's ``tags`` ([[name, score], ...]) and ``sentence``.

    Returns (tags, sentence, text): ``text`` is the caption to write verbatim when the last edit was
    set_caption, else None (the caption is then the tags joined, then the sentence).
    """
    current: list[list[Any]] = [[t, s] for t, s in tags]
    scores = {_key(t): s for t, s in current}
    text: str | None = None
    for e in edits:
        if e.op == "set_caption":
            text = e.caption or ""
            current = [[t, scores.get(_key(t))] for t in parse_caption(text)]
            sentence = None
            continue
        text = None  # a tag edit after set_caption rewrites the caption from its tags
        if e.op == "add_tags":
            have = {_key(t) for t, _ in current}
            new = [[t, None] for t in e.tags or [] if _key(t) not in have]
            current = new + current if e.position == "front" else current + new
        elif e.op == "remove_tags":
            gone = {_key(t) for t in e.tags or []}
            current = [p for p in current if _key(p[0]) not in gone]
        elif e.op == "replace_tag":
            old, new_key = _key(e.old or ""), _key(e.new or "")
            if any(_key(t) == old for t, _ in current):
                has_new = any(_key(t) == new_key for t, _ in current)
                out, placed = [], has_new
                for t, s in current:
                    if _key(t) == old:
                        if not placed:
                            out.append([e.new, None])
                            placed = True
                    else:
                        out.append([t, s])
                current = out
        elif e.op == "move_to_front":
            wanted = [_key(t) for t in e.tags or []]
            front = [p for k in wanted for p in current if _key(p[0]) == k]
            current = front + [p for p in current if _key(p[0]) not in wanted]
    return current, sentence, text


def caption_text(tags: Sequence[Sequence[Any]], sentence: str | None) -> str:
    """The caption written to the .txt file (the same rule as ``Item.text``)."""
    parts = [t for t, _ in tags] + ([sentence] if sentence else [])
    return ", ".join(parts).replace(", |||, ", " ||| ").replace(", |||", " |||").replace("|||, ", "||| ")


@dataclass
class CurationResult:
    """What applying the curation did, for the run summary (``messages``) and the review page."""

    path: Path
    edits: int = 0
    edited: int = 0
    excluded: list[str] = field(default_factory=list)
    restored: list[str] = field(default_factory=list)
    moved: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    masks: list[str] = field(default_factory=list)
    pictures: list[str] = field(default_factory=list)  # pictures replaced by hand (retouched)
    orphans: list[tuple[Edit, list[str]]] = field(default_factory=list)  # (edit, missing ids)
    unrestorable: list[tuple[str, str]] = field(default_factory=list)  # (name, why)
    hand: "HandEdits | None" = None
    changed: bool = False

    def messages(self) -> list[str]:
        lines = []
        if self.hand is not None:
            lines += self.hand.messages(self.path)
        if self.edits:
            parts = [f"{len(v)} {k}" for k, v in (("excluded", self.excluded), ("restored", self.restored),
                                                  ("moved", self.moved), ("captions edited", self.captions),
                                                  ("masks decided", self.masks),
                                                  ("pictures replaced", self.pictures)) if v]
            lines.append(f"{self.edits} edit(s) from {self.path.name} applied to {self.edited} image(s)"
                         + (": " + ", ".join(parts) if parts else ""))
        for edit, missing in self.orphans[:10]:
            names = [(edit.names or edit.ids)[edit.ids.index(i)] if i in edit.ids else i for i in missing]
            lines.append(f"edit on line {edit.line} ({edit.op}) names {len(missing)} image(s) no longer in the "
                         f"dataset: {', '.join(names[:5])}" + (" ..." if len(names) > 5 else ""))
        if len(self.orphans) > 10:
            lines.append(f"... and {len(self.orphans) - 10} more edits for images no longer in the dataset "
                         "(lorakit curate list --orphans)")
        for name, why in self.unrestorable[:10]:
            lines.append(f"cannot restore {name}: {why}")
        return lines


def apply_to_states(states: list[dict], set_aside: list[tuple[dict, str, str]], edits: list[Edit],
                    path: Path) -> tuple[list[dict], list[tuple[dict, str, str]], CurationResult]:
    """The last stage of a run: apply the edits to the pipeline's final states (JSON-able dicts with
    ``id``, ``name``, ``subset``, ``tags``, ``caption``, ``mask``, ``meta``) and its set-aside list.

    Returns the curated states (``text`` holds a verbatim caption, ``edited`` marks touched images,
    ``rejected_mask`` a mask taken off), the new set-aside list, and what was done.
    """
    result = CurationResult(path=path, edits=len(edits))
    plan = decisions(edits)
    kept: list[dict] = []
    aside: list[tuple[dict, str, str]] = []
    seen: set[str] = set()

    def curate(state: dict) -> dict | None:
        d = plan.get(state.get("id") or "")
        if d is None:
            return state
        state = dict(state, edited=True, meta=dict(state.get("meta") or {}))
        result.edited += 1
        name = state["name"]
        if d.excluded:
            aside.append((state, "curation", "excluded by hand" + (f": {d.note}" if d.note else "")))
            result.excluded.append(name)
            return None
        if d.subset and d.subset != state["subset"]:
            state["subset"] = d.subset
            result.moved.append(name)
        if d.image:
            picture = path.parent / d.image
            if picture.is_file():
                state["picture"] = str(picture)  # the runner puts it in the store in place of the image
                result.pictures.append(name)
            else:
                result.unrestorable.append((name, f"its replacement picture {picture} is missing"))
        if d.caption_edits:
            before = caption_text(state.get("tags", []), state.get("caption"))
            tags, sentence, text = curate_tags(state.get("tags", []), state.get("caption"), d.caption_edits)
            state["tags"], state["caption"] = tags, sentence
            if text is not None:
                state["text"] = text
            if (text if text is not None else caption_text(tags, sentence)) != before:
                result.captions.append(name)
        if d.mask == "reject" and state.get("mask"):
            state["rejected_mask"], state["mask"] = state["mask"], None
            state["meta"]["mask_rejected"] = "rejected by hand" + (f": {d.mask_note}" if d.mask_note else "")
            result.masks.append(name)
        elif d.mask == "accept":
            if state.get("mask"):
                state["meta"].pop("mask_rejected", None)
                result.masks.append(name)
            elif state.get("rejected_mask"):
                state["mask"] = state.pop("rejected_mask")
                state["meta"].pop("mask_rejected", None)
                result.masks.append(name)
            else:
                result.unrestorable.append((name, "it has no mask to accept (the mask step did not keep one)"))
        return state

    for state in states:
        if state.get("id"):
            seen.add(state["id"])
        out = curate(state)
        if out is not None:
            kept.append(out)
    for state, step, reason in set_aside:
        sid = state.get("id")
        if sid:
            seen.add(sid)
        d = plan.get(sid or "")
        if d is not None and d.restored and step != "curation":
            if not state.get("image"):
                result.unrestorable.append((state["name"], f"{step} could not read it ({reason})"))
                aside.append((state, step, reason))
                continue
            out = curate(dict(state, meta=dict(state.get("meta") or {}), restored_from=step))
            if out is not None:
                kept.append(out)
                result.restored.append(state["name"])
            continue
        aside.append((state, step, reason))
    for e in edits:
        missing = [i for i in e.ids + (e.drop or []) if i not in seen]
        if missing:
            result.orphans.append((e, missing))
    return kept, aside, result


def early_moves(states: list[dict], edits: list[Edit]) -> list[dict]:
    """Subset moves, applied right after the sources so steps see the image in its new subset."""
    plan = decisions(edits)
    out = []
    for s in states:
        d = plan.get(s.get("id") or "")
        out.append(dict(s, subset=d.subset) if d is not None and d.subset else s)
    return out


# ----- hand edits in the dataset folder ------------------------------------------------------------
@dataclass
class HandEdits:
    """Changes a person made in the dataset folder itself, taken into the curation file."""

    captions: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    pictures: list[str] = field(default_factory=list)
    unkeyed: int = 0

    def __bool__(self) -> bool:
        return bool(self.captions or self.deleted or self.pictures)

    def messages(self, path: Path) -> list[str]:
        lines = []
        if self.captions:
            lines.append(f"{len(self.captions)} caption(s) edited by hand in the dataset folder, kept (in {path.name}): "
                         + ", ".join(self.captions[:5]) + (" ..." if len(self.captions) > 5 else ""))
        if self.deleted:
            lines.append(f"{len(self.deleted)} image(s) deleted by hand from the dataset folder, now excluded (in "
                         f"{path.name}; `lorakit curate restore` brings them back): "
                         + ", ".join(self.deleted[:5]) + (" ..." if len(self.deleted) > 5 else ""))
        if self.pictures:
            lines.append(f"{len(self.pictures)} picture(s) changed by hand in the dataset folder, kept (in "
                         f"{path.name}, the files under {path.name.removesuffix('.jsonl')}.pictures/): "
                         + ", ".join(self.pictures[:5]) + (" ..." if len(self.pictures) > 5 else ""))
        if self.unkeyed:
            lines.append(f"{self.unkeyed} hand edit(s) could not be kept: the manifest predates image ids")
        return lines


def _take_picture(image: Path, record: dict, curation: "Curation", found: HandEdits) -> None:
    """A picture lorakit wrote that is no longer as it left it (retouched, cropped, inpainted by
    hand): when its content changed and it is a readable image, it becomes a replace_image edit."""
    try:
        digest = hashlib.sha256(image.read_bytes()).hexdigest()
    except OSError:
        return
    if digest == record.get("sha256"):
        return  # touched, not changed
    name = str(Path(record["path"]).with_suffix(""))
    from lorakit.plugin_sdk import ImageError, verify_image

    try:
        verify_image(image)
    except ImageError:
        return  # half-saved or broken: not an edit; the run writes the picture again
    curation.replace_image(record["id"], image, by="hand", names=[name])
    found.pictures.append(name)


def _tag_ops(before: list[str], after: list[str]) -> list[tuple[str, list[str]]] | None:
    """Tag edits (remove, add front, add end) that turn ``before`` into ``after`` exactly, or None."""
    bk = [_key(t) for t in before]
    ak = [_key(t) for t in after]
    if len(set(ak)) != len(ak):
        return None
    removed = [t for t, k in zip(before, bk) if k not in ak]
    kept = [k for k in bk if k in ak]
    added_keys = [k for k in ak if k not in bk]
    first_kept = next((n for n, k in enumerate(ak) if k in bk), len(ak))
    front = [t for n, (t, k) in enumerate(zip(after, ak)) if k in added_keys and n < first_kept]
    end = [t for n, (t, k) in enumerate(zip(after, ak)) if k in added_keys and n >= first_kept]
    ops: list[tuple[str, list[str]]] = []
    if removed:
        ops.append(("remove", removed))
    if front:
        ops.append(("front", front))
    if end:
        ops.append(("end", end))
    # check: replaying these gives exactly ``after`` (else the change is an edit of the whole caption)
    replay = [k for k in bk if k not in {_key(t) for t in removed}]
    replay = [_key(t) for t in front] + replay + [_key(t) for t in end]
    if replay != ak or kept != [k for k in ak if k in bk]:
        return None
    return ops


def take_hand_edits(dataset: str | os.PathLike, curation: Curation, written: dict[str, Any] | None = None
                    ) -> HandEdits:
    """Find hand edits in a dataset folder and record them in ``curation`` (one batch, ``by: hand``).

    A caption .txt that differs from the caption in manifest.json (what lorakit last wrote) becomes
    tag edits when it only removes/adds tags, else a set_caption; an image listed in the manifest
    (and, when ``written`` is given, in the ledger of files lorakit wrote) but gone from the folder
    is excluded. Run it before anything rewrites the folder.
    """
    dataset = Path(dataset)
    found = HandEdits()
    manifest_path = dataset / "manifest.json"
    try:
        data = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, OSError):
        return found
    records = data.get("images", []) if isinstance(data, dict) else []
    root = os.fspath(dataset)
    with curation.batch(by="hand"):
        for r in records:
            if not isinstance(r, dict) or not r.get("path"):
                continue
            cap_rel = r.get("caption_path") or os.path.splitext(r["path"])[0] + ".txt"
            entry = (written or {}).get(cap_rel)
            try:  # strings, not paths: this runs for every image of every run
                st = os.stat(os.path.join(root, cap_rel))
            except OSError:
                st = None
            try:
                image_st = os.stat(os.path.join(root, r["path"]))
            except OSError:
                image_st = None
            image_entry = (written or {}).get(r["path"])
            if image_st is not None and image_entry and len(image_entry) >= 3 and image_entry[1] and \
                    (image_entry[1], image_entry[2]) != (image_st.st_size, image_st.st_mtime_ns) and r.get("id"):
                _take_picture(dataset / r["path"], r, curation, found)
            if st is not None and entry and len(entry) >= 3 and entry[1] and (entry[1], entry[2]) == (st.st_size, st.st_mtime_ns):
                if image_st is not None:
                    continue  # the caption is exactly as lorakit wrote it (the ledger's size and time)
            image = dataset / r["path"]
            name = str(Path(r["path"]).with_suffix(""))
            rid = r.get("id")
            if not image.exists():
                if written is not None and r["path"] not in written:
                    continue  # not a file lorakit wrote here: nothing a person deleted
                if not rid:
                    found.unkeyed += 1
                    continue
                curation.exclude([rid], note=HAND_DELETED_NOTE, by="hand", names=[name])
                found.deleted.append(name)
                continue
            cap_rel = r.get("caption_path") or str(Path(r["path"]).with_suffix(".txt"))
            cap = dataset / cap_rel
            try:
                st = cap.stat()
            except OSError:
                continue  # a deleted caption file is rewritten
            entry = (written or {}).get(cap_rel)
            if entry and len(entry) >= 3 and entry[1] and (entry[1], entry[2]) == (st.st_size, st.st_mtime_ns):
                continue  # exactly as lorakit wrote it (the ledger's size and time): no need to read it
            try:
                text = cap.read_text(encoding="utf-8").strip()
            except (UnicodeDecodeError, OSError):
                continue
            old = (r.get("caption") or "").strip()
            if text == old or (not r.get("caption_path") and not text):
                continue
            if not rid:
                found.unkeyed += 1
                continue
            ops = None if r.get("sentence") else _tag_ops(parse_caption(old), parse_caption(text))
            if ops is None:
                curation.set_caption([rid], text, by="hand", names=[name])
            else:
                for kind, tags in ops:
                    if kind == "remove":
                        curation.remove_tags([rid], tags, by="hand", names=[name])
                    else:
                        curation.add_tags([rid], tags, position=kind, by="hand", names=[name])
            found.captions.append(name)
    return found


def apply_to_dataset(dataset: str | os.PathLike, curation: Curation | None = None, take_hand: bool = True
                     ) -> CurationResult:
    """Apply the curation to a dataset folder now, without re-running the pipeline: captions (.txt)
    and manifest.json are rewritten atomically, excluded images move to set_aside/curation/,
    restored ones come back, moved ones change folder. The result is the same as the last stage of
    a ``lorakit run``. With ``take_hand``, hand edits in the folder are recorded first."""
    from .runner import reapply_curation

    dataset = Path(dataset)
    curation = curation or Curation.for_target(dataset)
    return reapply_curation(dataset, curation, take_hand=take_hand)
