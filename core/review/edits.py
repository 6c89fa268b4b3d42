"""The page's edits, carried out by the curation API (``lorakit.curation``).

The page never writes the curation file, a caption or the manifest itself: a request names an
operation and its target (the selection's ids, or the filter), is checked here, recorded with the
curation API as one undoable batch (``by="review"``), and applied to the dataset folder at once
(``apply_to_dataset``: captions, manifest and set-aside copies), so a kohya user sees the change
without a re-run and the next ``lorakit run`` replays it.
"""
from __future__ import annotations

from typing import Any

from lorakit.plugin_sdk import LorakitError

from .data import Entry, Filter, RequestError

OPS = ("add_tag", "remove_tag", "replace_tag", "move_front", "replace_caption", "exclude", "restore",
       "move_subset", "keeper", "mask")
MAX_TARGETS = 100_000


def _curation(state):
    try:
        from lorakit.curation import Curation
    except ImportError:  # pragma: no cover - the API ships with lorakit
        raise RequestError("this lorakit has no curation API (lorakit.curation)", 501) from None
    target = state.pipeline_path or state.dataset_dir
    return Curation.for_target(target)


def _targets(state, data: dict[str, Any]) -> list[Entry]:
    target = data.get("target")
    if not isinstance(target, dict) or len(target) != 1 or not set(target) <= {"ids", "filter"}:
        raise RequestError('"target" must be {"ids": [...]} or {"filter": {...}}')
    if "ids" in target:
        ids = target["ids"]
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise RequestError('target "ids" must be a list of strings')
        if len(ids) > MAX_TARGETS:
            raise RequestError(f"at most {MAX_TARGETS} images per edit")
        entries = [state.data.entry(i) for i in dict.fromkeys(ids)]
    else:
        entries = state.data.query(Filter.parse(target["filter"]))
    if not entries:
        raise RequestError("no image matches the target")
    return entries


def _text(data: dict[str, Any], key: str, what: str, allow_empty: bool = False) -> str:
    value = data.get(key)
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        raise RequestError(f'"{key}" ({what}) is required and must be a string')
    if len(value) > 20_000:
        raise RequestError(f'"{key}" is too long')
    return value.strip()


def _tag(data: dict[str, Any], key: str = "tag") -> str:
    tag = _text(data, key, "a tag")
    if "," in tag or "\n" in tag:
        raise RequestError(f"tag {tag!r} contains a comma or a line break (captions are split there)")
    return tag


def _record(cur, op: str, entries: list[Entry], data: dict[str, Any], state) -> str:
    """Add the operation to the curation file; returns what it did, in words."""
    images = [e for e in entries if e.kind == "image"]
    aside = [e for e in entries if e.kind == "aside"]

    def ids(of: list[Entry], what: str) -> list[str]:
        if not of:
            raise RequestError(f"{op}: none of the {len(entries)} target image(s) {what}")
        return [e.identity for e in of]

    def names(of: list[Entry]) -> list[str]:
        return [f"{e.subset}/{e.name}" if e.subset != "default" else e.name for e in of]

    if op == "add_tag":
        position = data.get("position", "end")
        if position not in ("front", "end"):
            raise RequestError('"position" must be "front" or "end"')
        tag = _tag(data)
        cur.add_tags(ids(images, "is in the dataset"), [tag], position=position, by="review", names=names(images))
        return f"added {tag} ({position}) to {len(images)} image(s)"
    if op == "remove_tag":
        tag = _tag(data)
        having = [e for e in images if tag in e.tag_set]
        cur.remove_tags(ids(having, f"has the tag {tag!r}"), [tag], by="review", names=names(having))
        return f"removed {tag} from {len(having)} image(s)"
    if op == "replace_tag":
        old, new = _tag(data), _tag(data, "new")
        having = [e for e in images if old in e.tag_set]
        cur.replace_tag(ids(having, f"has the tag {old!r}"), old, new, by="review", names=names(having))
        return f"replaced {old} by {new} in {len(having)} image(s)"
    if op == "move_front":
        tag = _tag(data)
        having = [e for e in images if tag in e.tag_set]
        cur.move_to_front(ids(having, f"has the tag {tag!r}"), [tag], by="review", names=names(having))
        return f"moved {tag} to the front in {len(having)} image(s)"
    if op == "replace_caption":
        caption = _text(data, "caption", "the new caption", allow_empty=True)
        cur.set_caption(ids(images, "is in the dataset"), caption, by="review", names=names(images))
        return f"caption replaced on {len(images)} image(s)"
    if op == "exclude":
        note = data.get("note") or None
        if note is not None and (not isinstance(note, str) or len(note) > 2000):
            raise RequestError('"note" must be a short string')
        cur.exclude(ids(images, "is in the dataset"), note=note, by="review", names=names(images))
        return f"excluded {len(images)} image(s)"
    if op == "restore":
        cur.restore(ids(aside, "is set aside"), by="review", names=names(aside))
        return f"restored {len(aside)} image(s)"
    if op == "move_subset":
        subset = _text(data, "subset", "the subset to move to")
        moving = [e for e in images if e.subset != subset]
        cur.move_to_subset(ids(moving, f"is outside subset {subset!r}"), subset, by="review", names=names(moving))
        return f"moved {len(moving)} image(s) to {subset}"
    if op == "keeper":
        group = data.get("group")
        groups = state.data.dedupe_groups
        if not isinstance(group, int) or isinstance(group, bool) or not 0 <= group < len(groups):
            raise RequestError('"group" must be the number of a duplicate group')
        if len(entries) != 1:
            raise RequestError("keeper: name exactly one image, the new keeper")
        keeper, g = entries[0], groups[group]
        member_ids = {m["id"] for m in g["members"]} | {g["kept_id"]}
        if keeper.id not in member_ids:
            raise RequestError(f"keeper: {keeper.name} is not in duplicate group #{group}")
        if keeper.id == g["kept_id"]:
            raise RequestError(f"keeper: {keeper.name} is already the one kept")
        old = [state.data.by_id[i] for i in [g["kept_id"]] if i in state.data.by_id]
        if not old:
            raise RequestError(f"keeper: the image group #{group} kept is no longer in the dataset")
        cur.set_keeper(keeper.identity, [e.identity for e in old], by="review", names=names([keeper]))
        return f"kept {keeper.name} instead of {old[0].name}"
    if op == "mask":
        verdict = data.get("verdict")
        if verdict not in ("accept", "reject"):
            raise RequestError('"verdict" must be "accept" or "reject"')
        with_mask = [e for e in images if e.mask is not None or e.mask_rejected]
        if verdict == "accept":
            cur.accept_mask(ids(with_mask, "has a mask"), by="review", names=names(with_mask))
        else:
            cur.reject_mask(ids(with_mask, "has a mask"), note=data.get("note") or "rejected on the review page",
                            by="review", names=names(with_mask))
        return f"mask {verdict}ed on {len(with_mask)} image(s)"
    raise RequestError(f"unknown operation {op!r} (one of {', '.join(OPS)})")  # pragma: no cover


def _apply_now(state, cur) -> list[str]:
    from lorakit.curation import apply_to_dataset

    result = apply_to_dataset(state.dataset_dir, cur)
    state.reload()
    return result.messages()


def apply(state, data: dict[str, Any]) -> dict[str, Any]:
    """One edit from the page: record it, apply it to the dataset folder, reload the page's data."""
    op = data.get("op")
    if op not in OPS:
        raise RequestError(f"unknown operation {op!r} (one of {', '.join(OPS)})")
    with state.lock:
        entries = _targets(state, data)
        cur = _curation(state)
        try:
            message = _record(cur, op, entries, data, state)
        except LorakitError as exc:
            raise RequestError(str(exc)) from None
        notes = _apply_now(state, cur)
    return {"message": message, "notes": notes}


def undo(state) -> dict[str, Any]:
    with state.lock:
        cur = _curation(state)
        undone = cur.undo()
        if not undone:
            raise RequestError("nothing to undo", 409)
        notes = _apply_now(state, cur)
    return {"message": "undone: " + "; ".join(e.describe() for e in undone), "notes": notes}


def history(state) -> list[dict[str, Any]]:
    """The curation file's edits, newest first (what the History view lists)."""
    try:
        cur = _curation(state)
    except RequestError:
        return []
    return [{"batch": e.batch, "op": e.op, "text": e.describe(), "by": e.by, "when": e.at}
            for e in reversed(cur.edits())]
