"""``lorakit inspect LORA``: what a LoRA file is, what it was trained on, and how much each block changes.

Reads lorakit, kohya and LyCORIS files (the tensors and the ``ss_*`` / ``modelspec.*`` metadata);
nothing is loaded but the file. The change of a block is the norm of the weight changes of its
layers (``sqrt(sum ‖ΔW‖²)``, at weight 1): a block, or a whole LoRA, that "does nothing" shows 0.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import click

from lorakit.plugin_sdk import LorakitError


TYPE_NAMES = {"lora": "LoRA", "locon": "LoCon", "loha": "LoHa", "lokr": "LoKr", "ia3": "IA3", "dylora": "DyLoRA",
              "diag-oft": "Diag-OFT", "oft": "Diag-OFT", "boft": "BOFT", "full": "full fine-tune (diff)"}
BASE_NAMES = {"sd_v1": "Stable Diffusion 1.x", "sd_v2": "Stable Diffusion 2.x", "sdxl_base_v1-0": "SDXL 1.0",
              "stable-diffusion-v1": "Stable Diffusion 1.x", "stable-diffusion-xl-v1-base": "SDXL 1.0"}
# Below this the block's change is numerically nothing (fp16 files round tiny values away anyway).
NOTHING = 1e-6


def block_of(name: str) -> str:
    """The block a module belongs to: ``unet down_blocks.0``, ``unet mid_block``, ``te layers.3``..."""
    part, _, rest = name[len("lora_"):].partition("_")
    if part == "unet":
        for pattern, label in ((r"(down_blocks|up_blocks|input_blocks|output_blocks)_(\d+)", None),
                               (r"(mid_block|middle_block)", None)):
            m = re.match(pattern, rest)
            if m:
                return f"unet {m.group(1)}" + (f".{m.group(2)}" if m.lastindex and m.lastindex > 1 else "")
        m = re.match(r"(conv_in|conv_out|time_embedding|add_embedding|time_embed|label_emb)", rest)
        return f"unet {m.group(1) if m else rest.split('_')[0]}"
    m = re.search(r"encoder_layers_(\d+)", rest)
    return f"{part} layers.{m.group(1)}" if m else f"{part} {rest.split('_')[0]}"


def _block_sort_key(block: str):
    part, _, rest = block.partition(" ")
    order = {"down_blocks": 1, "input_blocks": 1, "mid_block": 2, "middle_block": 2, "up_blocks": 3,
             "output_blocks": 3, "layers": 0}
    kind, _, index = rest.partition(".")
    return (0 if part == "unet" else 1, part, order.get(kind, 4 if part == "unet" else 0), kind,
            int(index) if index.isdigit() else -1)


def network_type(modules: dict, meta: dict[str, str]) -> str:
    """The network's type, from the metadata when it says (DyLoRA looks like LoRA) and from the keys."""
    args = _json(meta.get("ss_network_args")) or {}
    algo = str(args.get("algo", "")).lower() if isinstance(args, dict) else ""
    kinds = {m.kind for m in modules.values()}
    if meta.get("ss_network_module") == "lycoris.kohya" and algo:
        name = TYPE_NAMES.get(algo, algo)
    elif kinds == {"lora"} or not kinds:
        convs = any(m.tensors["lora_down.weight"].dim() == 4 and m.tensors["lora_down.weight"].shape[-1] > 1
                    for m in modules.values() if m.kind == "lora")
        name = "LoCon (LoRA with 3x3 convs)" if convs else "LoRA"
    else:
        name = " + ".join(sorted(TYPE_NAMES.get(k, k) for k in kinds))
    if any("dora_scale" in m.tensors for m in modules.values()):
        name += " with DoRA"
    return name


def base_model(modules: dict, meta: dict[str, str]) -> dict[str, Any]:
    version = meta.get("ss_base_model_version")
    architecture = meta.get("modelspec.architecture", "").split("/")[0]
    parts = {m.part for m in modules.values()}
    if version or architecture:
        family = BASE_NAMES.get(version or "", BASE_NAMES.get(architecture, version or architecture))
    elif {"te1", "te2"} & parts:
        family = "SDXL (from the key names)"
    elif "te" in parts or "unet" in parts:
        family = "Stable Diffusion 1.x/2.x (from the key names)"
    else:
        family = "unknown"
    v_pred = meta.get("ss_v_parameterization") == "True" or meta.get("modelspec.prediction_type") == "v"
    return {"model": meta.get("ss_sd_model_name") or None, "version": family, "v_prediction": v_pred}


def _json(text: str | None):
    if not text or text == "None":
        return None
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return None


def top_tags(meta: dict[str, str], count: int) -> list[tuple[str, int]]:
    frequency = _json(meta.get("ss_tag_frequency")) or {}
    totals: dict[str, int] = {}
    if isinstance(frequency, dict):
        for folder in frequency.values():
            if isinstance(folder, dict):
                for tag, n in folder.items():
                    if isinstance(n, (int, float)):
                        totals[tag.strip()] = totals.get(tag.strip(), 0) + int(n)
    return sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))[:count]


def triggers(meta: dict[str, str]) -> list[str]:
    phrase = meta.get("modelspec.trigger_phrase", "")
    found = [t.strip() for t in phrase.split(",") if t.strip()]
    comment = meta.get("ss_training_comment", "")
    if not found and comment.lower().startswith("triggers:"):
        found = [t.strip() for t in comment.split(":", 1)[1].split(",") if t.strip()]
    return found


def _format(meta: dict[str, str]) -> str:
    if "lorakit_version" in meta:
        return f"lorakit {meta['lorakit_version']}"
    if meta.get("ss_network_module") == "lycoris.kohya":
        return "kohya sd-scripts + LyCORIS"
    if any(k.startswith("ss_") for k in meta):
        return "kohya sd-scripts"
    return "no training metadata"


def _number(text: str | None):
    if text in (None, "", "None"):
        return None
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() else value


def describe(path: str | Path, top: int = 10) -> dict[str, Any]:
    """Everything ``lorakit inspect`` shows, as a JSON-ready dict."""
    from .lora_file import change_norm, read_lora

    path = Path(path)
    modules, meta = read_lora(path)
    blocks: dict[str, dict[str, Any]] = {}
    relative = False
    for name in sorted(modules):
        module = modules[name]
        norm, is_relative = change_norm(module)
        relative = relative or is_relative
        block = blocks.setdefault(block_of(name), {"modules": 0, "dims": set(), "alphas": set(), "kinds": set(),
                                                    "squared": 0.0})
        block["modules"] += 1
        block["kinds"].add(module.kind)
        if module.rank is not None:
            block["dims"].add(module.rank)
        if module.alpha is not None:
            block["alphas"].add(round(module.alpha, 4))
        block["squared"] += norm * norm
    rows = []
    for block in sorted(blocks, key=_block_sort_key):
        b = blocks[block]
        rows.append({"block": block, "modules": b["modules"], "dim": sorted(b["dims"]),
                     "alpha": sorted(b["alphas"]), "types": sorted(b["kinds"]), "change": math.sqrt(b["squared"])})
    total = math.sqrt(sum(r["change"] ** 2 for r in rows))
    kohya_rows = kohya_blocks(modules)
    training = {
        "resolution": meta.get("modelspec.resolution") or meta.get("ss_resolution"),
        "steps": _number(meta.get("ss_steps")),
        "epoch": _number(meta.get("ss_epoch")),
        "epochs": _number(meta.get("ss_num_epochs")),
        "images": _number(meta.get("ss_num_train_images")),
        "batch_size": _number(meta.get("ss_batch_size_per_device")),
        "learning_rate": _number(meta.get("ss_learning_rate")),
        "unet_lr": _number(meta.get("ss_unet_lr")),
        "text_encoder_lr": _number(meta.get("ss_text_encoder_lr")),
        "optimizer": meta.get("ss_optimizer"),
        "scheduler": meta.get("ss_lr_scheduler"),
        "clip_skip": _number(meta.get("ss_clip_skip")),
    }
    return {
        "file": str(path),
        "size_bytes": path.stat().st_size,
        "written_by": _format(meta),
        "base_model": base_model(modules, meta),
        "network": {
            "type": network_type(modules, meta),
            "module": meta.get("ss_network_module"),
            "dim": _number(meta.get("ss_network_dim")),
            "alpha": _number(meta.get("ss_network_alpha")),
            "args": _json(meta.get("ss_network_args")),
            "modules": len(modules),
            "parts": sorted({m.part for m in modules.values()}),
        },
        "triggers": triggers(meta),
        "top_tags": [{"tag": t, "count": n} for t, n in top_tags(meta, top)],
        "comment": meta.get("ss_training_comment") or None,
        "training": {k: v for k, v in training.items() if v is not None},
        "blocks": rows,
        "kohya_blocks": kohya_rows,
        "total_change": total,
        "change_is_relative": relative,
        "does_nothing": total < NOTHING,
    }


def kohya_blocks(modules: dict) -> list[dict[str, Any]]:
    """The UNet modules by kohya's block numbering (IN01, MID, OUT11...; what block_dims and the
    *_lr_weight network_args count), with the dims and alphas found in each block."""
    from .blocks import block_index, block_label

    unet = [name for name in modules if name.startswith("lora_unet_")]
    is_sdxl = any(re.match(r"lora_unet_(input_blocks|output_blocks|middle_block)_", n) for n in unet) or \
        any(m.part in ("te1", "te2") for m in modules.values())
    found: dict[int, dict[str, Any]] = {}
    for name in unet:
        module = modules[name]
        index = block_index(name, is_sdxl)
        row = found.setdefault(index, {"block": block_label(index, is_sdxl), "index": index, "modules": 0,
                                       "dim": set(), "alpha": set()})
        row["modules"] += 1
        if module.rank is not None:
            row["dim"].add(module.rank)
        if module.alpha is not None:
            row["alpha"].add(round(module.alpha, 4))
    return [{**row, "dim": sorted(row["dim"]), "alpha": sorted(row["alpha"])}
            for _, row in sorted(found.items(), key=lambda kv: (kv[0] < 0, kv[0]))]


def render(info: dict[str, Any], console) -> None:
    from rich.table import Table

    network = info["network"]
    base = info["base_model"]
    console.print(f"[bold]{info['file']}[/] ({info['size_bytes'] / 1e6:.1f} MB, written by {info['written_by']})")
    base_text = base["version"] + (" (v-prediction)" if base["v_prediction"] else "")
    if base["model"]:
        base_text += f", trained on {base['model']}"
    console.print(f"  base model:  {base_text}")
    dims = f"dim {network['dim']} / alpha {network['alpha']}" if network["dim"] is not None else "dims from the keys"
    console.print(f"  network:     {network['type']}, {dims}, {network['modules']} modules "
                  f"({', '.join(network['parts'])})")
    if network["args"]:
        console.print(f"  network args: {json.dumps(network['args'])}")
    console.print(f"  triggers:    {', '.join(info['triggers']) or '(none recorded)'}")
    if info["top_tags"]:
        console.print("  top tags:    " + ", ".join(f"{t['tag']} ({t['count']})" for t in info["top_tags"]))
    training = info["training"]
    if training:
        console.print("  training:    " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in training.items()))
    table = Table(title="blocks (change = sqrt of the sum of ‖ΔW‖² at weight 1)" if not info["change_is_relative"]
                  else "blocks (change relative to the base weight for IA3 / OFT)", title_justify="left")
    for column in ("block", "modules", "dim", "alpha", "change"):
        table.add_column(column, justify="left" if column == "block" else "right")
    for row in info["blocks"]:
        change = f"{row['change']:.4g}" if row["change"] >= NOTHING else "[red]0 (does nothing)[/]"
        table.add_row(row["block"], str(row["modules"]), _span(row["dim"]), _span(row["alpha"]), change)
    console.print(table)
    kohya_rows = info.get("kohya_blocks") or []
    if len({(tuple(r["dim"]), tuple(r["alpha"])) for r in kohya_rows}) > 1:
        # per-block dims or alphas (kohya's block_dims / block_alphas): show them in kohya's numbering
        console.print("  UNet dim/alpha by kohya block: " + ", ".join(
            f"{r['block']} {_span(r['dim'])}/{_span(r['alpha'])}" for r in kohya_rows))
    if info["does_nothing"]:
        console.print("[red]This LoRA changes nothing:[/] every weight change is zero (untrained, or trained at "
                      "learning rate 0).")
    else:
        console.print(f"  total change: {info['total_change']:.4g}")


def _span(values: list) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:g}"
    return f"{values[0]:g}..{values[-1]:g}"


def build_command() -> click.Command:
    @click.command("inspect", short_help="Show what a LoRA file is and how much each block changes.",
                   epilog="\b\nExamples:\n  lorakit inspect mychar.safetensors\n"
                          "  lorakit inspect mychar-000004.safetensors --json | jq .blocks")
    @click.argument("lora", type=click.Path(dir_okay=False, path_type=Path))
    @click.option("--json", "as_json", is_flag=True, help="print everything as JSON")
    @click.option("--top", default=10, show_default=True, type=click.IntRange(0), help="how many top tags to list")
    def inspect_command(lora: Path, as_json: bool, top: int):
        """Show a LoRA's base model, network type, dim/alpha per block, triggers and top tags,
        resolution and steps, and the size of each block's change (lorakit, kohya and LyCORIS
        files)."""
        from rich.console import Console

        if not lora.exists():
            raise LorakitError(f"{lora}: no such LoRA file")
        info = describe(lora, top=top)
        if as_json:
            click.echo(json.dumps(info, indent=2))
        else:
            render(info, Console())

    return inspect_command
