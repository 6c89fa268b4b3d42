"""A LoRA file of any common kind (lorakit, kohya, LyCORIS) and the maths a client applies to use it.

A file holds modules named ``lora_unet_...`` / ``lora_te_...`` / ``lora_te1_...``, each a few
tensors whose suffixes say the kind: ``lora_down.weight`` + ``lora_up.weight`` (LoRA, LoCon,
DyLoRA; ``lora_mid`` with Tucker, ``dora_scale`` with DoRA), ``hada_w1_a``... (LoHa), ``lokr_w1``...
(LoKr), ``weight`` + ``on_input`` (IA3), ``oft_blocks`` (Diag-OFT), ``diff`` (full). The change
each kind makes to a layer's weight ``W`` is written below from the formats' definitions (the same
maths A1111, ComfyUI and LyCORIS apply), so ``lorakit compare`` can merge any file at any weight
and ``lorakit inspect`` can measure how much each block changes.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorakit.plugin_sdk import LorakitError

PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te_")
KIND_MARKERS = [  # the first marker found names the kind
    ("lora_down.weight", "lora"), ("hada_w1_a", "loha"), ("lokr_w1", "lokr"), ("lokr_w1_a", "lokr"),
    ("lokr_w2", "lokr"), ("lokr_w2_a", "lokr"), ("oft_blocks", "oft"), ("on_input", "ia3"), ("diff", "full"),
    ("w_norm", "norm"),
]
# Kinds whose change is a multiple of the base weight: without the base model only a relative size is known.
RELATIVE_KINDS = {"ia3", "oft"}


@dataclass
class Module:
    """One adapted layer of a LoRA file: its name, kind and tensors (by suffix)."""

    name: str
    kind: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def part(self) -> str:
        """unet, te, te1 or te2."""
        return next(p for p in PREFIXES if self.name.startswith(p))[len("lora_"):-1]

    @property
    def rank(self) -> int | None:
        t = self.tensors
        if self.kind == "lora":
            return int(t["lora_down.weight"].shape[0])
        if self.kind == "loha":
            return int(t["hada_w1_b"].shape[0])
        if self.kind == "lokr":
            for key in ("lokr_w2_b", "lokr_w1_b"):
                if key in t:
                    return int(t[key].shape[0])
            return None
        if self.kind == "oft":
            return int(t["oft_blocks"].shape[1])  # the block size is the "dim" of Diag-OFT
        return None

    @property
    def alpha(self) -> float | None:
        if "alpha" not in self.tensors:
            return None
        return float(self.tensors["alpha"].float())

    @property
    def scale(self) -> float:
        """alpha / rank for the low-rank kinds (no alpha: 1)."""
        rank, alpha = self.rank, self.alpha
        if self.kind == "lokr" and not any(k in self.tensors for k in ("lokr_w1_b", "lokr_w2_b")):
            return 1.0  # both Kronecker factors stored whole: no low-rank scale
        if self.kind in ("lora", "loha", "lokr") and rank and alpha is not None:
            return alpha / rank
        return 1.0


def kind_of(suffixes: set[str]) -> str:
    for marker, kind in KIND_MARKERS:
        if marker in suffixes:
            return kind
    return "unknown"


def group_modules(tensors: dict[str, torch.Tensor], where: str = "LoRA file") -> dict[str, Module]:
    """The modules of a file's tensors, by name; every key must belong to a ``lora_*`` module."""
    modules: dict[str, Module] = {}
    for key, value in tensors.items():
        name, dot, suffix = key.partition(".")
        if not dot or not name.startswith(PREFIXES):
            raise LorakitError(f"{where}: {key} is not a LoRA key (expected lora_unet_... / lora_te_... names)")
        modules.setdefault(name, Module(name, "unknown")).tensors[suffix] = value
    for module in modules.values():
        module.kind = kind_of(set(module.tensors))
    return modules


def read_lora(path: str | Path) -> tuple[dict[str, Module], dict[str, str]]:
    """Modules and metadata of a ``.safetensors`` LoRA (pickled files are refused)."""
    from safetensors import safe_open

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise LorakitError(f"{path}: LoRA files are read only as .safetensors (pickled files can run code)")
    if not path.is_file():
        raise LorakitError(f"{path}: no such LoRA file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise LorakitError(f"{path}: not a readable .safetensors file ({exc})") from None
    if not tensors:
        raise LorakitError(f"{path}: the file holds no tensors")
    return group_modules(tensors, str(path)), meta


# ----- the change to a weight ----------------------------------------------------------------------
def _low_rank(up: torch.Tensor, down: torch.Tensor, shape: torch.Size, mid: torch.Tensor | None = None) -> torch.Tensor:
    """up @ down for Linear and Conv weights (``mid``: Tucker core, shape (rank, rank, k, k))."""
    if mid is not None:
        return torch.einsum("oa,abkl,bi->oikl", up.flatten(1), mid, down.flatten(1)).reshape(shape)
    return (up.flatten(1) @ down.flatten(1)).reshape(shape)


def _tucker(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A LoHa/LoKr factor rebuilt from its Tucker core: (out, in, k, k)."""
    return torch.einsum("ijkl,jr,ip->prkl", core, b, a)


def additive_delta(module: Module, shape: torch.Size) -> torch.Tensor:
    """The change ``ΔW`` at weight 1 for the kinds that add to the weight (LoRA, LoHa, LoKr, full)."""
    t = {k: v.float() for k, v in module.tensors.items()}
    kind = module.kind
    if kind == "lora":
        delta = _low_rank(t["lora_up.weight"], t["lora_down.weight"], shape, t.get("lora_mid.weight"))
    elif kind == "loha":
        if "hada_t1" in t:
            w1 = _tucker(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"])
            w2 = _tucker(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
        else:
            w1, w2 = t["hada_w1_a"] @ t["hada_w1_b"], t["hada_w2_a"] @ t["hada_w2_b"]
        delta = (w1 * w2).reshape(shape)
    elif kind == "lokr":
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        elif "lokr_t2" in t:
            w2 = _tucker(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
        else:
            w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
        if w2.dim() == 4 and w1.dim() == 2:
            w1 = w1[:, :, None, None]
        delta = torch.kron(w1, w2).reshape(shape)
    elif kind == "full":
        delta = t["diff"].reshape(shape)
    else:
        raise LorakitError(f"{module.name}: a {kind} module does not add a fixed change to the weight")
    return delta * module.scale


def oft_rotation(module: Module) -> torch.Tensor:
    """Diag-OFT's block-diagonal rotation: R = (I + Q)(I - Q)^-1, Q = B - B^T (norm capped by alpha)."""
    blocks = module.tensors["oft_blocks"].float()
    q = blocks - blocks.transpose(1, 2)
    constraint = module.alpha or 0.0
    if constraint > 0:
        norm = torch.norm(q) + 1e-8
        if norm > constraint:
            q = q * constraint / norm
    eye = torch.eye(blocks.shape[1], dtype=q.dtype)
    return (eye + q) @ torch.linalg.inv(eye - q)


def merged_weight(module: Module, weight: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """The layer's weight with the module applied at ``strength`` (float32)."""
    w = weight.float()
    t = module.tensors
    if module.kind == "ia3":
        scale = t["weight"].float()
        on_input = bool(float(t["on_input"])) if "on_input" in t else False
        shape = [1] * w.dim()
        shape[1 if on_input else 0] = -1
        return w + strength * w * scale.reshape(shape)
    if module.kind == "oft":
        r = oft_rotation(module)
        blocks, size = r.shape[0], r.shape[1]
        rotated = torch.einsum("knm,kn...->km...", r, w.reshape(blocks, size, *w.shape[1:])).reshape(w.shape)
        if "rescale" in t:
            rotated = t["rescale"].float().reshape(-1, *([1] * (w.dim() - 1))) * rotated
        return w + strength * (rotated - w)
    delta = additive_delta(module, w.shape)
    if "dora_scale" in t:
        # DoRA: the magnitude (one per output channel, or per input channel) times the direction.
        scale = t["dora_scale"].float()
        combined = w + delta
        if scale.shape[0] == w.shape[0] and scale.numel() == w.shape[0]:
            norm = combined.flatten(1).norm(dim=1).reshape(-1, *([1] * (w.dim() - 1)))
            decomposed = combined * (scale.reshape(norm.shape) / norm)
        else:
            norm = combined.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *([1] * (w.dim() - 2)))
            decomposed = combined * (scale.reshape(norm.shape) / norm)
        return w + strength * (decomposed - w)
    return w + strength * delta


def change_norm(module: Module) -> tuple[float, bool]:
    """How much the module changes its layer, without the base model: (norm, relative?).

    Additive kinds: ``‖ΔW‖`` (Frobenius). IA3 scales rows by ``1 + w`` and OFT rotates them by
    ``R``: their change is ``‖w‖`` / ``‖R - I‖``, relative to the base weight.
    """
    t = module.tensors
    if module.kind == "ia3":
        return float(t["weight"].float().norm()), True
    if module.kind == "oft":
        r = oft_rotation(module)
        return float((r - torch.eye(r.shape[1])).norm()), True
    if module.kind in ("lora", "loha", "lokr", "full"):
        shape = _natural_shape(module)
        return float(additive_delta(module, shape).norm()), False
    return 0.0, False


def _natural_shape(module: Module) -> torch.Size:
    """The weight shape a module implies (for the norm of its change; the layout does not change it)."""
    t = module.tensors
    if module.kind == "lora":
        up, down = t["lora_up.weight"], t["lora_down.weight"]
        if "lora_mid.weight" in t:
            mid = t["lora_mid.weight"]
            return torch.Size([up.shape[0], down.shape[1], *mid.shape[2:]])
        return torch.Size([up.shape[0], down.flatten(1).shape[1]])
    if module.kind == "loha":
        if "hada_t1" in t:
            return torch.Size([t["hada_w1_a"].shape[0], t["hada_w1_b"].shape[1], *t["hada_t1"].shape[2:]])
        return torch.Size([t["hada_w1_a"].shape[0], t["hada_w1_b"].shape[1]])
    if module.kind == "lokr":
        w1 = t["lokr_w1"].shape if "lokr_w1" in t else (t["lokr_w1_a"].shape[0], t["lokr_w1_b"].shape[1])
        if "lokr_w2" in t:
            w2 = t["lokr_w2"].shape
        elif "lokr_t2" in t:
            w2 = (t["lokr_w2_a"].shape[0], t["lokr_w2_b"].shape[1], *t["lokr_t2"].shape[2:])
        else:
            w2 = (t["lokr_w2_a"].shape[0], t["lokr_w2_b"].shape[1])
        return torch.Size([w1[0] * w2[0], w1[1] * w2[1], *w2[2:]])
    return t["diff"].shape


# ----- applying a file to a pipeline ------------------------------------------------------------------
def model_layers(pipe) -> dict[str, torch.nn.Module]:
    """Every layer of a diffusers SD/SDXL pipeline under the name a kohya/LyCORIS file gives it."""
    from .kohya_format import ldm_unet_path
    from .lycoris import classic_text_encoder

    layers: dict[str, torch.nn.Module] = {}
    parts = [("lora_unet", pipe.unet)]
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) else [])
    prefixes = ["lora_te1", "lora_te2"] if len(encoders) == 2 else ["lora_te"]
    parts += [(prefix, classic_text_encoder(e)) for prefix, e in zip(prefixes, encoders)]
    sdxl = len(encoders) == 2
    for prefix, model in parts:
        for path, module in model.named_modules():
            if path and hasattr(module, "weight") and isinstance(getattr(module, "weight"), torch.Tensor):
                layers[f"{prefix}_{path.replace('.', '_')}"] = module
                if sdxl and prefix == "lora_unet":  # kohya's SDXL files name the UNet layers by the LDM layout
                    try:
                        layers[f"{prefix}_{ldm_unet_path(path, model.config).replace('.', '_')}"] = module
                    except (ValueError, KeyError, IndexError):
                        pass
    return layers


@contextlib.contextmanager
def applied(pipe, modules: dict[str, Module], strength: float, where: str = "LoRA file"):
    """Merge ``modules`` into the pipeline's weights at ``strength`` for the ``with`` block, then undo."""
    layers = model_layers(pipe)
    unknown = sorted(name for name in modules if name not in layers)
    if unknown:
        raise LorakitError(f"{where}: {len(unknown)} modules name no layer of this base model, e.g. {unknown[0]} "
                           "(a LoRA for another model, or SDXL's LDM key names)")
    saved: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for name, module in modules.items():
                if module.kind in ("norm", "unknown"):
                    raise LorakitError(f"{where}: {name}: {module.kind} modules are not supported "
                                       f"(keys {sorted(module.tensors)})")
                layer = layers[name]
                saved[name] = layer.weight.detach().clone()
                new = merged_weight(module, layer.weight, strength)
                layer.weight.copy_(new.to(layer.weight.dtype))
        yield
    finally:
        with torch.no_grad():
            for name, weight in saved.items():
                layers[name].weight.copy_(weight)
