"""Block-wise dims, alphas and learning-rate weights for plain LoRA, as kohya's ``networks.lora`` reads
them from ``network_args``.

kohya numbers the UNet's blocks the way the block-merge tools and A1111's LoRA block weights do:

- SD1/SD2: 25 blocks. ``IN00``..``IN11`` (index 0-11; IN00 is ``conv_in`` and never has a LoRA),
  ``MID`` (12), ``OUT00``..``OUT11`` (13-24). A diffusers module ``down_blocks.i.{attentions,resnets}.j``
  is ``IN(1 + 3i + j)``, ``down_blocks.i.downsamplers`` is ``IN(3 + 3i)``; ``up_blocks.i...j`` is
  ``OUT(3i + j)`` (the upsampler with the level's last entry, ``OUT(3i + 2)``); ``mid_block`` is ``MID``.
- SDXL: 23 blocks, from the LDM names kohya's SDXL files use: 0 is ``time_embed`` / ``label_emb``,
  ``input_blocks.n`` is 1 + n (1-9), ``middle_block.n`` is 10 + n (10-12), ``output_blocks.n`` is
  13 + n (13-21), 22 is ``out``.

``down_lr_weight`` / ``up_lr_weight`` have one weight per IN / OUT block (12 for SD1, 9 for SDXL;
``up`` is listed deepest first, as the OUT blocks are), ``mid_lr_weight`` one per middle block (1 /
3). Each is a comma-separated list (an empty item is 0) or, for down/up, a preset: ``cosine``,
``sine``, ``linear``, ``reverse_linear`` or ``zeros``, optionally ``+offset`` (``sine+0.5``). A list
that is too short is filled with 1, one too long is cut (both with a warning, as kohya does). A
weight at or below ``block_lr_zero_threshold`` (default 0) becomes 0, and a block of weight 0 gets no
LoRA at all. ``block_dims`` / ``block_alphas`` (and ``conv_block_dims`` / ``conv_block_alphas`` for
the 3x3 convolutions) give one value per block, all 25 (SD1) or 23 (SDXL); a dim of 0 means no LoRA
in that block. The text encoders are not affected. This module imports no torch.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

from lorakit.plugin_sdk import LorakitError

BLOCK_ARGS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold", "block_dims",
              "block_alphas", "conv_block_dims", "conv_block_alphas")
LR_PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")
# (IN or OUT blocks, middle blocks, all blocks)
LAYOUT = {False: (12, 1, 25), True: (9, 3, 23)}
_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")


def block_count(is_sdxl: bool) -> int:
    return LAYOUT[is_sdxl][2]


def block_index(lora_name: str, is_sdxl: bool) -> int:
    """kohya's block index of a UNet LoRA module name (``lora_unet_...``); -1 when it is in no block."""
    per_side = LAYOUT[is_sdxl][0]
    if not is_sdxl:
        m = _UPDOWN.search(lora_name)
        if m:
            level, kind, layer = int(m.group(2)), m.group(3), int(m.group(4))
            within = 3 * level + (2 if kind in ("upsamplers", "downsamplers") else layer)
            return 1 + within if m.group(1) == "down" else per_side + 1 + within
        return per_side if "mid_block_" in lora_name else -1
    if not lora_name.startswith("lora_unet_"):
        return -1
    name = lora_name[len("lora_unet_"):]
    if name.startswith(("time_embed_", "label_emb_")):
        return 0
    for prefix, first in (("input_blocks_", 1), ("middle_block_", 10), ("output_blocks_", 13)):
        if name.startswith(prefix):
            number = name[len(prefix):].split("_", 1)[0]
            return first + int(number) if number.isdigit() else -1
    return 22 if name.startswith("out_") else -1


def block_label(index: int, is_sdxl: bool) -> str:
    """``IN04``, ``MID``, ``OUT11`` (SD1); ``IN00``..``IN08``, ``MID00``..``MID02``, ``OUT00``..``OUT08``,
    ``BASE`` and ``OUT`` (SDXL's time/label embedding and final layers)."""
    per_side, mids, total = LAYOUT[is_sdxl]
    if index < 0 or index >= total:
        return "other"
    if not is_sdxl:
        if index < per_side:
            return f"IN{index:02d}"
        return "MID" if index == per_side else f"OUT{index - per_side - 1:02d}"
    if index == 0:
        return "BASE"
    if index <= per_side:
        return f"IN{index - 1:02d}"
    if index <= per_side + mids:
        return f"MID{index - per_side - 1:02d}"
    return f"OUT{index - per_side - mids - 1:02d}" if index < total - 1 else "OUT"


# ----- parsing (kohya's rules) --------------------------------------------------------------------
def preset_weights(spec: str, count: int, where: str = "network_args") -> list[float]:
    """A down/up weight preset with an optional ``+offset``: ``cosine`` falls from 1 to 0 over the
    blocks, ``sine`` rises from 0 to 1 (quarter waves), ``linear`` rises and ``reverse_linear`` falls
    in equal steps, ``zeros`` is 0 everywhere; the offset is added to every weight."""
    name, _, offset_text = spec.partition("+")
    name = name.strip()
    try:
        offset = float(offset_text) if offset_text.strip() else 0.0
    except ValueError:
        raise LorakitError(f"{where}: {spec!r}: the part after '+' must be a number") from None
    last = count - 1
    if name == "cosine":
        weights = [math.sin(math.pi * (i / last) / 2) for i in reversed(range(count))]
    elif name == "sine":
        weights = [math.sin(math.pi * (i / last) / 2) for i in range(count)]
    elif name == "linear":
        weights = [i / last for i in range(count)]
    elif name == "reverse_linear":
        weights = [i / last for i in reversed(range(count))]
    elif name == "zeros":
        weights = [0.0] * count
    else:
        raise LorakitError(f"{where}: {spec!r} is neither a comma-separated list of weights nor a preset "
                           f"({', '.join(LR_PRESETS)}, optionally +number)")
    return [w + offset for w in weights]


def _floats(text: str, name: str, where: str, *, empty_is_zero: bool = True) -> list[float]:
    values = []
    for item in text.split(","):
        item = item.strip()
        if not item and empty_is_zero:
            values.append(0.0)
            continue
        try:
            values.append(float(item))
        except ValueError:
            raise LorakitError(f"{where}: network_args {name}={text!r}: {item!r} is not a number") from None
    return values


def _ints(text: str, name: str, where: str) -> list[int]:
    values = []
    for item in text.split(","):
        try:
            value = int(item.strip())
        except ValueError:
            raise LorakitError(f"{where}: network_args {name}={text!r}: {item.strip()!r} is not a whole number") from None
        if value < 0:
            raise LorakitError(f"{where}: network_args {name}: dims cannot be negative ({value})")
        values.append(value)
    return values


def _side_weights(text: str | None, name: str, count: int, where: str, warn: Callable[[str], None],
                  preset_allowed: bool) -> list[float] | None:
    if text is None:
        return None
    if preset_allowed and "," not in text:
        weights = preset_weights(text, count, f"{where}: network_args {name}")
    else:
        weights = _floats(text, name, where)
    if len(weights) > count:
        warn(f"network_args {name} has {len(weights)} weights, this model has {count} such blocks: the rest are "
             "ignored (as kohya does)")
        weights = weights[:count]
    elif len(weights) < count:
        warn(f"network_args {name} has {len(weights)} weights, this model has {count} such blocks: the missing "
             "ones are 1 (as kohya does)")
        weights = weights + [1.0] * (count - len(weights))
    return weights


def lr_weights(args: dict[str, str], is_sdxl: bool, where: str = "network_args",
               warn: Callable[[str], None] = lambda _: None) -> list[float] | None:
    """The learning-rate weight of every block (25 or 23 values), or None when no lr weight is given."""
    if not any(args.get(k) is not None for k in ("down_lr_weight", "mid_lr_weight", "up_lr_weight")):
        return None
    per_side, mids, _ = LAYOUT[is_sdxl]
    try:
        threshold = float(args.get("block_lr_zero_threshold", 0.0))
    except ValueError:
        raise LorakitError(f"{where}: network_args block_lr_zero_threshold must be a number") from None
    parts = []
    for name, count, preset_allowed in (("down_lr_weight", per_side, True), ("mid_lr_weight", mids, False),
                                        ("up_lr_weight", per_side, True)):
        weights = _side_weights(args.get(name), name, count, where, warn, preset_allowed)
        parts.append([1.0] * count if weights is None else [w if w > threshold else 0.0 for w in weights])
    weights = parts[0] + parts[1] + parts[2]
    return [1.0, *weights, 1.0] if is_sdxl else weights


@dataclass
class BlockDims:
    """The dim and alpha of every block for the Linear / 1x1 layers and (when given) the 3x3 convs."""

    dims: list[int]
    alphas: list[float]
    conv_dims: list[int] | None
    conv_alphas: list[float | None] | None

    def of(self, index: int, conv3x3: bool) -> tuple[int, float | None]:
        """(dim, alpha) for a layer of block ``index``; dim 0 is no LoRA. An alpha of None means dim."""
        if index < 0:
            index += len(self.dims)  # kohya indexes the list the same way for a name in no block
        if conv3x3:
            if self.conv_dims is None:
                return 0, None
            return self.conv_dims[index], self.conv_alphas[index]
        return self.dims[index], self.alphas[index]


def block_dims(args: dict[str, str], is_sdxl: bool, *, dim: int, alpha: float, conv_dim: int, conv_alpha: float,
               weights: list[float] | None, where: str = "network_args") -> BlockDims | None:
    """Per-block dims and alphas: on when ``block_dims`` or any lr weight is given (kohya), else None.

    Unset lists are ``dim`` / ``alpha`` everywhere; the 3x3 convs get ``conv_block_dims`` or, with
    ``conv_dim`` > 0, ``conv_dim`` everywhere (else none). A block whose lr weight is 0 gets dim 0.
    """
    if args.get("block_dims") is None and weights is None:
        return None
    total = block_count(is_sdxl)
    model = "SDXL" if is_sdxl else "SD1/SD2"

    def exact(name: str, values: list) -> list:
        if len(values) != total:
            raise LorakitError(f"{where}: network_args {name} has {len(values)} values; an {model} UNet has {total} "
                               f"blocks, one value each")
        return values

    dims = exact("block_dims", _ints(args["block_dims"], "block_dims", where)) if args.get("block_dims") else [dim] * total
    alphas = exact("block_alphas", _floats(args["block_alphas"], "block_alphas", where, empty_is_zero=False)) \
        if args.get("block_alphas") else [alpha] * total
    conv_dims: list[int] | None = None
    conv_alphas: list[float | None] | None = None
    if args.get("conv_block_dims"):
        conv_dims = exact("conv_block_dims", _ints(args["conv_block_dims"], "conv_block_dims", where))
        if args.get("conv_block_alphas"):
            conv_alphas = exact("conv_block_alphas", _floats(args["conv_block_alphas"], "conv_block_alphas", where,
                                                             empty_is_zero=False))
        else:
            # kohya: conv_alpha when conv_dim was given, else no alpha (= the dim, scale 1)
            conv_alphas = [conv_alpha if conv_dim else None] * total
    elif conv_dim:
        conv_dims, conv_alphas = [conv_dim] * total, [conv_alpha] * total
    if weights is not None:
        for i, weight in enumerate(weights):
            if weight == 0:
                dims[i] = 0
                if conv_dims is not None:
                    conv_dims[i] = 0
    return BlockDims(dims, alphas, conv_dims, conv_alphas)


def check_block_args(args: dict[str, str], where: str, model_type: str | None) -> list[str]:
    """Check the block-wise network_args when the settings are read (no model yet): numbers, presets and,
    for the per-block lists, 25 (SD1) or 23 (SDXL) values (the one of ``model_type`` when it is known).
    Returns the warnings kohya would print for the model type(s) still possible."""
    kinds = [model_type == "sdxl"] if model_type else [False, True]
    lists = {name: len(args[name].split(",")) for name in ("block_dims", "block_alphas", "conv_block_dims",
                                                           "conv_block_alphas") if args.get(name)}
    fitting = [k for k in kinds if all(count == block_count(k) for count in lists.values())]
    if not fitting:
        allowed = {block_count(k) for k in kinds}
        wrong = [(n, c) for n, c in lists.items() if c not in allowed] or list(lists.items())  # else: mixed lengths
        name, count = wrong[0]
        expected = " or ".join(str(block_count(k)) for k in kinds)
        raise LorakitError(f"{where}: network_args {name} has {count} values; expected one per UNet block, all lists "
                           f"the same length: {expected} (SD1/SD2 has 25 blocks, SDXL 23)")
    if args.get("block_alphas") and not args.get("block_dims") and not any(
            args.get(k) for k in ("down_lr_weight", "mid_lr_weight", "up_lr_weight")):
        raise LorakitError(f"{where}: network_args block_alphas needs block_dims or an lr weight (kohya ignores it "
                           "otherwise)")
    if (args.get("conv_block_dims") or args.get("conv_block_alphas")) and not args.get("block_dims") and not any(
            args.get(k) for k in ("down_lr_weight", "mid_lr_weight", "up_lr_weight")):
        raise LorakitError(f"{where}: network_args conv_block_dims needs block_dims or an lr weight (kohya ignores it "
                           "otherwise)")
    if args.get("conv_block_alphas") and not args.get("conv_block_dims"):
        raise LorakitError(f"{where}: network_args conv_block_alphas needs conv_block_dims")
    notes: list[str] = []
    for is_sdxl in fitting:
        warnings: list[str] = []
        weights = lr_weights(args, is_sdxl, where, warnings.append)
        block_dims(args, is_sdxl, dim=1, alpha=1.0, conv_dim=0, conv_alpha=1.0, weights=weights, where=where)
        if len(kinds) == 1:
            notes += warnings
    return notes
