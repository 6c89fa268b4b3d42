"""A subset: one concept folder of the dataset, with its repeats and triggers (kohya's ``N_name``)."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Subset:
    """Dataset-level settings of one concept folder.

    ``repeats`` is kohya's ``num_repeats`` (the N of ``N_name``); ``triggers`` are prepended to every
    caption of the subset by the trigger step; ``keep_tokens`` (or ``keep_tokens_separator``, e.g.
    ``|||``) tells the trainer how many leading tags caption shuffling must not move. The optional
    caption/augment fields override the trainer's defaults for this subset when set.
    """

    name: str
    folder: str | None = None
    repeats: int = 1
    triggers: list[str] = field(default_factory=list)
    class_tokens: str | None = None
    keep_tokens: int = 0
    keep_tokens_separator: str | None = None
    is_reg: bool = False
    shuffle_caption: bool | None = None
    caption_dropout_rate: float | None = None
    caption_tag_dropout_rate: float | None = None
    flip_aug: bool | None = None

    def __post_init__(self):
        if self.folder is None:
            self.folder = "." if self.name == "default" else self.name

    @property
    def kohya_folder(self) -> str:
        """The ``N_name`` folder kohya sees for this subset (``lorakit export kohya`` writes it, the
        trainer's ``ss_dataset_dirs`` / ``ss_reg_dataset_dirs`` / ``ss_tag_frequency`` use it): a reg
        subset is named after its class tokens, as kohya's reg folders are (``1_1girl``)."""
        label = (self.class_tokens or self.name.removeprefix("reg_")) if self.is_reg else self.name
        safe = re.sub(r"[^\w.-]+", "_", label).strip("_.") or "subset"
        return f"{self.repeats}_{safe}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Subset":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def replace(self, **changes: Any) -> "Subset":
        return dataclasses.replace(self, **changes)


SUBSET_FIELDS = [f.name for f in dataclasses.fields(Subset)]
