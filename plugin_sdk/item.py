"""The Item: one image travelling through the pipeline with its caption, tags, mask and metadata."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from .images import open_image


@dataclass
class Item:
    """One image and everything known about it.

    Steps never modify the file at ``path`` (it may be the user's original). To change the picture,
    return ``item.with_image(new_pil_image)``; to change anything else, ``item.replace(...)``.

    * ``name``: output name without extension, may contain ``/`` for sub-folders (``outfit1/001``).
    * ``path``: the current image file (read-only for steps).
    * ``subset``: the subset (concept folder) the image belongs to.
    * ``caption``: free-text caption (BLIP-style sentence), or None.
    * ``tags``: ordered tags; the value is the tagger's score, or None when unknown.
    * ``mask``: mask file (white = train, black = ignore), or None.
    * ``meta``: JSON-serialisable metadata (booru post info, rating, ...).
    * ``source``: where the image originally came from (file path or URL), for reports.
    * ``steps``: names of the steps that produced this item, in order.
    """

    name: str
    path: Path
    subset: str = "default"
    caption: str | None = None
    tags: dict[str, float | None] = field(default_factory=dict)
    mask: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    source: str | None = None
    steps: list[str] = field(default_factory=list)
    # Pictures produced by a step and not yet written; the host writes them (PNG) after the step.
    pending_image: Image.Image | None = field(default=None, repr=False, compare=False)
    pending_mask: Image.Image | None = field(default=None, repr=False, compare=False)
    # The picture at ``path`` as an earlier step already decoded it (``item.keeping_decoded(im)``): a
    # cache for the next step of a chain, never a change. Dropped when ``path`` or the picture changes.
    decoded: Image.Image | None = field(default=None, repr=False, compare=False)

    def open(self) -> Image.Image:
        """Decode the current image (safely: size-capped, broken files raise ImageError).

        A step gets its own copy: it may change it freely."""
        if self.pending_image is not None:
            return self.pending_image.copy()
        if self.decoded is not None:
            return self.decoded.copy()
        return open_image(self.path)

    def keeping_decoded(self, image: Image.Image) -> "Item":
        """A copy that remembers ``image``, the unchanged decode of ``path``, so that the next step of
        the chain does not decode the file again (a step that looked at the picture and left it as it
        was: convert of a PNG that is already fine, a trim with nothing to cut)."""
        return self.replace(decoded=image)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["decoded"] = None  # a cache: never sent to another process
        return state

    def open_mask(self) -> Image.Image | None:
        if self.pending_mask is not None:
            return self.pending_mask.copy()
        return open_image(self.mask) if self.mask else None

    def replace(self, **changes: Any) -> "Item":
        """A copy with some fields changed (tags and meta are copied, never shared)."""
        changes.setdefault("tags", dict(self.tags))
        changes.setdefault("meta", dict(self.meta))
        changes.setdefault("steps", list(self.steps))
        if "decoded" not in changes and ("path" in changes or changes.get("pending_image") is not None):
            changes["decoded"] = None  # the cached decode is of the old file
        return dataclasses.replace(self, **changes)

    def with_image(self, image: Image.Image, **changes: Any) -> "Item":
        """A copy whose picture is ``image``; the host saves it as PNG after the step."""
        return self.replace(pending_image=image, **changes)

    def with_mask(self, mask: Image.Image, **changes: Any) -> "Item":
        """A copy with a new mask picture (mode L, same size as the image)."""
        return self.replace(pending_mask=mask, **changes)

    def warned(self, step: str, message: str) -> "Item":
        """A copy carrying a warning for the user (``meta["warnings"]``: shown in the run's summary and
        the review page; the image stays in the dataset). For results that are suspicious, not wrong:
        a trim that removed most of the picture, an upscale still below the target size."""
        meta = dict(self.meta)
        meta["warnings"] = list(meta.get("warnings", [])) + [{"step": step, "message": message}]
        return self.replace(meta=meta)

    @property
    def text(self) -> str:
        """The caption as written to the ``.txt`` file: tags joined by ", ", then the free-text caption."""
        return caption_text(self.tags, self.caption)

    @property
    def trigger_names(self) -> list[str]:
        return list(self.meta.get("triggers", []))


def caption_text(tags, caption: str | None) -> str:
    """The text of a ``.txt`` caption file: the tags joined by ", ", then the free-text caption."""
    parts = list(tags)
    if caption:
        parts.append(caption)
    # The keep-tokens separator stands between tags, not as a tag: "mychar ||| smile, solo".
    return ", ".join(parts).replace(", |||, ", " ||| ").replace(", |||", " |||").replace("|||, ", "||| ")
