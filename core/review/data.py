"""What the review page shows: the dataset folder's manifest and reports, indexed for fast filtering.

Everything here is read-only. A ``ReviewData`` is rebuilt from the dataset folder after every edit
(the curation API rewrites the manifest and captions), so the page always shows what is on disk.
Every file the page may serve is looked up here by an opaque id; a path never comes from a request.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from lorakit.buckets import make_buckets, select_bucket
from lorakit.manifest import ImageRecord, Manifest, SetAsideRecord, split_caption


class RequestError(ValueError):
    """A request the page cannot honour; the message is shown to the user (HTTP ``status``)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _short_id(identity: str) -> str:
    return hashlib.sha1(identity.encode("utf-8")).hexdigest()[:16]


@dataclass
class Entry:
    """One picture on the page: an image of the dataset, or a set-aside one (``kind == "aside"``)."""

    id: str
    kind: str  # "image" or "aside"
    name: str
    subset: str
    identity: str  # what the curation API calls this image (its key, or the manifest path)
    caption: str = ""
    tags: list[str] = field(default_factory=list)
    scores: dict[str, float | None] = field(default_factory=dict)
    width: int = 0
    height: int = 0
    bucket: str | None = None
    file: Path | None = None
    mask: Path | None = None
    mask_rejected: str | None = None
    rejected_mask: Path | None = None  # a mask taken off by hand, kept under set_aside/masks/
    mask_stats: dict[str, Any] | None = None
    source_text: str | None = None  # where the image came from (a file is shown as "before")
    edited: bool = False
    aside_step: str | None = None
    aside_reason: str | None = None
    dedupe_group: int | None = None
    sha256: str | None = None
    steps: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    tag_set: frozenset[str] = frozenset()
    caption_lower: str = ""
    record: ImageRecord | SetAsideRecord | None = None

    def source(self) -> Path | None:
        """The source file, when it is a file that still exists (looked at only when asked)."""
        if self.kind != "image" or not self.source_text or "://" in self.source_text or "\x00" in self.source_text:
            return None
        path = Path(self.source_text)
        return path if path.is_absolute() and path.is_file() else None

    def brief(self) -> dict[str, Any]:
        """What a gallery cell needs."""
        return {"id": self.id, "kind": self.kind, "name": self.name, "subset": self.subset,
                "caption": self.caption, "width": self.width, "height": self.height, "bucket": self.bucket,
                "mask": self.mask is not None, "mask_rejected": self.mask_rejected,
                "mask_view": self.mask is not None or self.rejected_mask is not None, "edited": self.edited,
                "aside_step": self.aside_step, "aside_reason": self.aside_reason,
                "dedupe_group": self.dedupe_group, "has_file": self.file is not None,
                "version": (self.sha256 or "")[:12] or self.name}  # new picture, new thumbnail URL

    def detail(self) -> dict[str, Any]:
        """What the large view needs: every tag with its tagger score, the steps, the metadata."""
        return {**self.brief(),
                "tags": [{"name": t, "score": self.scores.get(t)} for t in self.tags],
                "steps": self.steps, "meta": self.meta, "source": self.source_text,
                "has_source": self.source() is not None, "mask_stats": self.mask_stats,
                "identity": self.identity}


def record_identity(record: ImageRecord | SetAsideRecord) -> str:
    """The id the curation file knows this image by (the manifest's ``id``; for a manifest written
    before curation existed, the start of the image's SHA-256, as ``lorakit.curation`` reads it)."""
    value = getattr(record, "id", None)
    if isinstance(value, str) and value:
        return value
    sha = getattr(record, "sha256", None)
    if isinstance(sha, str) and sha:
        return sha[:16]
    return getattr(record, "path", None) or getattr(record, "name", "")


def record_edited(record: ImageRecord) -> bool:
    return bool(getattr(record, "edited", False))


def _bucket_text(bucket: Any) -> str | None:
    if isinstance(bucket, (list, tuple)) and len(bucket) == 2:
        return f"{int(bucket[0])}x{int(bucket[1])}"
    return None


class ReviewData:
    """The dataset indexed for the page: entries by id, tag frequencies, reports."""

    def __init__(self, dataset_dir: Path, pipeline_path: Path | None = None):
        self.root = Path(dataset_dir).resolve()
        self._root_text = str(self.root)
        self._root_prefix = os.path.join(self._root_text, "")
        self.pipeline_path = pipeline_path
        self.manifest = Manifest.load(self.root)
        self.entries: list[Entry] = []
        self.by_id: dict[str, Entry] = {}
        self.dedupe_groups: list[dict[str, Any]] = []
        self._build()

    # ----- building -----------------------------------------------------------------------------
    def _file(self, relative: str | None) -> Path | None:
        """A manifest path as a file inside the dataset folder (None when missing or outside it).
        Checked lexically here (strings: fast on thousands); ``served_path`` resolves links."""
        if not relative or "\x00" in relative:
            return None
        path = os.path.normpath(os.path.join(self._root_text, relative))
        if not path.startswith(self._root_prefix) or not os.path.isfile(path):
            return None
        return Path(path)

    def served_path(self, path: Path, inside: bool = True) -> Path:
        """The file to send: links resolved, and still inside the dataset when it must be."""
        resolved = path.resolve()
        if (inside and not resolved.is_relative_to(self.root)) or not resolved.is_file():
            raise RequestError(f"{path.name}: not a file of this dataset", 404)
        return resolved

    def _build(self) -> None:
        m = self.manifest
        buckets = make_buckets(m.resolution or 512)
        bucket_of: dict[tuple[int, int], str] = {}
        used: set[str] = set()

        def unique(identity: str) -> str:
            short, n = _short_id(identity), 1
            while short in used:
                n += 1
                short = _short_id(f"{identity}#{n}")
            used.add(short)
            return short

        for r in m.images:
            tags = split_caption(r.caption)
            scores = {t.get("name"): t.get("score") for t in r.tags if isinstance(t, dict)}
            meta = r.meta if isinstance(r.meta, dict) else {}
            bucket = _bucket_text(meta.get("bucket"))
            if bucket is None and r.width and r.height:
                bucket = bucket_of.get((r.width, r.height))
                if bucket is None:
                    w, h = select_bucket(r.width, r.height, buckets).bucket
                    bucket = bucket_of[(r.width, r.height)] = f"{w}x{h}"
            identity = record_identity(r)
            stem = os.path.splitext(os.path.basename(r.path))[0]
            e = Entry(id=unique("image:" + identity), kind="image", name=stem, subset=r.subset,
                      identity=identity, caption=r.caption, tags=tags, scores=scores, width=r.width,
                      height=r.height, bucket=bucket, file=self._file(r.path), mask=self._file(r.mask),
                      mask_rejected=meta.get("mask_rejected"), mask_stats=meta.get("mask"),
                      rejected_mask=self._file(meta.get("rejected_mask")) if isinstance(meta.get("rejected_mask"), str) else None,
                      source_text=r.source,
                      edited=record_edited(r), sha256=r.sha256, steps=list(r.steps), meta=meta,
                      tag_set=frozenset(tags), caption_lower=r.caption.lower(), record=r)
            self.entries.append(e)
        for a in m.set_aside:
            subset = Path(a.path).parent.name if a.path and Path(a.path).parent.name != a.step else "default"
            identity = record_identity(a)
            e = Entry(id=unique(f"aside:{identity}:{a.step}:{a.name}"), kind="aside", name=a.name, subset=subset,
                      identity=identity, file=self._file(a.path), aside_step=a.step, aside_reason=a.reason,
                      source_text=a.source, caption_lower="", record=a)
            if e.file is not None:
                try:
                    from PIL import Image

                    with Image.open(e.file) as im:
                        e.width, e.height = im.size
                except Exception:
                    pass
            self.entries.append(e)
        self.by_id = {e.id: e for e in self.entries}
        self._load_dedupe()

    def _load_dedupe(self) -> None:
        """Groups from ``reports/dedupe-groups.json``, each member matched to a page entry."""
        path = self.root / "reports" / "dedupe-groups.json"
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        images = {(e.subset, e.name): e for e in self.entries if e.kind == "image"}
        aside = {}
        for e in self.entries:
            if e.kind == "aside" and e.aside_step == "dedupe":
                aside.setdefault(e.name, e)
        for n, group in enumerate(report.get("duplicate_groups", []) if isinstance(report, dict) else []):
            kept = images.get((group.get("subset"), group.get("kept")))
            if kept is None:  # a later step renamed it (buckets, convert frames): match by name alone
                kept = next((e for e in self.entries if e.kind == "image" and e.name == group.get("kept")), None)
            members = []
            for m in group.get("members", []):
                e = aside.get(m.get("name"))
                if e is None:
                    e = next((x for x in self.entries if x.kind == "image" and x.name == m.get("name")), None)
                members.append({"name": m.get("name"), "distance": m.get("distance"), "exact": m.get("exact"),
                                "size": m.get("size"), "id": e.id if e else None, "kind": e.kind if e else None})
                if e is not None:
                    e.dedupe_group = n
            if kept is not None:
                kept.dedupe_group = n
            self.dedupe_groups.append({"index": n, "kept": group.get("kept"), "subset": group.get("subset"),
                                       "size": group.get("size"), "kept_id": kept.id if kept else None,
                                       "kept_kind": kept.kind if kept else None, "members": members})

    # ----- questions the page asks --------------------------------------------------------------
    def entry(self, entry_id: str) -> Entry:
        e = self.by_id.get(entry_id)
        if e is None:
            raise RequestError(f"no image with id {entry_id!r} (the dataset may have changed: reload the page)", 404)
        return e

    def query(self, f: "Filter") -> list[Entry]:
        return [e for e in self.entries if f.matches(e)]

    def summary(self) -> dict[str, Any]:
        m = self.manifest
        images = [e for e in self.entries if e.kind == "image"]
        tag_total: Counter[str] = Counter()
        per_subset_tags: dict[str, Counter[str]] = {}
        buckets: Counter[str] = Counter()
        for e in images:
            tag_total.update(e.tag_set)
            per_subset_tags.setdefault(e.subset, Counter()).update(e.tag_set)
            if e.bucket:
                buckets[e.bucket] += 1
        subsets = []
        for name in sorted(set(m.subsets) | {e.subset for e in images}):
            s = m.subsets.get(name)
            count = sum(1 for e in images if e.subset == name)
            repeats = s.repeats if s else 1
            subsets.append({"name": name, "images": count, "repeats": repeats, "is_reg": bool(s and s.is_reg),
                            "triggers": list(s.triggers) if s else [], "steps_per_epoch": count * repeats,
                            "top_tags": per_subset_tags.get(name, Counter()).most_common(40)})
        aside = Counter((e.aside_step, e.aside_reason) for e in self.entries if e.kind == "aside")
        aside_steps = Counter(e.aside_step for e in self.entries if e.kind == "aside")
        return {
            "dataset": str(self.root), "pipeline": str(self.pipeline_path) if self.pipeline_path else None,
            "resolution": m.resolution, "images": len(images),
            "set_aside": sum(aside_steps.values()),
            "aside_steps": sorted(aside_steps.items()),
            "aside_reasons": [[s, r, n] for (s, r), n in aside.most_common()],
            "subsets": subsets,
            "tags": tag_total.most_common(),
            "buckets": sorted(buckets.items(), key=lambda kv: -kv[1]),
            "masks": sum(1 for e in images if e.mask is not None),
            "masks_rejected": sum(1 for e in images if e.mask_rejected),
            "edited": sum(1 for e in images if e.edited),
            "dedupe_groups": len(self.dedupe_groups),
        }


# ----- filters ------------------------------------------------------------------------------------
_CHOICES = {
    "status": ("image", "aside", "all"),
    "mode": ("and", "or"),
    "mask": ("any", "present", "missing", "rejected"),
    "edited": ("any", "yes", "no"),
}


@dataclass
class Filter:
    """Filters that combine (all must hold): subset, tags AND/OR, NOT tags, caption text, bucket,
    mask, set-aside step and reason, dedupe group, edited."""

    status: str = "image"
    subsets: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    mode: str = "and"
    not_tags: tuple[str, ...] = ()
    text: str = ""
    bucket: str = ""
    mask: str = "any"
    aside_step: str = ""
    aside_reason: str = ""
    dedupe: int | None = None
    edited: str = "any"
    ids: tuple[str, ...] = ()

    @classmethod
    def parse(cls, data: dict[str, Any] | None) -> "Filter":
        """From a JSON object or query parameters; a wrong value is a RequestError naming the key."""
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise RequestError("filter must be an object")
        known = {"status", "subset", "tags", "mode", "not", "text", "bucket", "mask", "aside_step",
                 "aside_reason", "dedupe", "edited", "ids"}
        unknown = set(data) - known
        if unknown:
            raise RequestError(f"unknown filter key(s): {', '.join(sorted(unknown))}")

        def strings(key: str) -> tuple[str, ...]:
            value = data.get(key, ())
            if isinstance(value, str):
                value = [value] if value else []
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise RequestError(f"filter {key!r} must be a list of strings")
            if len(value) > 10000:
                raise RequestError(f"filter {key!r}: too many values")
            return tuple(v for v in value if v)

        def text(key: str, default: str = "") -> str:
            value = data.get(key, default)
            if value is None:
                return default
            if not isinstance(value, str) or len(value) > 1000:
                raise RequestError(f"filter {key!r} must be a short string")
            if key in _CHOICES and value not in _CHOICES[key]:
                raise RequestError(f"filter {key!r} must be one of {', '.join(_CHOICES[key])} (got {value!r})")
            return value

        dedupe = data.get("dedupe")
        if dedupe in ("", None):
            dedupe = None
        else:
            try:
                dedupe = int(dedupe)
            except (TypeError, ValueError):
                raise RequestError("filter 'dedupe' must be a group number") from None
        return cls(status=text("status", "image"), subsets=strings("subset"), tags=strings("tags"),
                   mode=text("mode", "and"), not_tags=strings("not"), text=text("text").strip().lower(),
                   bucket=text("bucket"), mask=text("mask", "any"), aside_step=text("aside_step"),
                   aside_reason=text("aside_reason").strip().lower(), dedupe=dedupe,
                   edited=text("edited", "any"), ids=strings("ids"))

    @classmethod
    def from_query(cls, params: Iterable[tuple[str, str]]) -> "Filter":
        data: dict[str, Any] = {}
        lists = {"subset", "tags", "not", "ids"}
        for key, value in params:
            if key in ("offset", "limit", "v"):
                continue
            if key in lists:
                data.setdefault(key, []).append(value)
            else:
                data[key] = value
        return cls.parse(data)

    def matches(self, e: Entry) -> bool:
        if self.ids and e.id not in self.ids:
            return False
        if self.status != "all" and e.kind != self.status:
            return False
        if self.subsets and e.subset not in self.subsets:
            return False
        if self.tags:
            hits = (t in e.tag_set for t in self.tags)
            if not (all(hits) if self.mode == "and" else any(hits)):
                return False
        if self.not_tags and any(t in e.tag_set for t in self.not_tags):
            return False
        if self.text and self.text not in e.caption_lower:
            return False
        if self.bucket and e.bucket != self.bucket:
            return False
        if self.mask == "present" and e.mask is None:
            return False
        if self.mask == "missing" and e.mask is not None:
            return False
        if self.mask == "rejected" and not e.mask_rejected:
            return False
        if self.aside_step and e.aside_step != self.aside_step:
            return False
        if self.aside_reason and self.aside_reason not in (e.aside_reason or "").lower():
            return False
        if self.dedupe is not None and e.dedupe_group != self.dedupe:
            return False
        if self.edited == "yes" and not e.edited:
            return False
        if self.edited == "no" and e.edited:
            return False
        return True
