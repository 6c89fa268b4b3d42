"""The LoRA network: which layers get an adapter (kohya's defaults), LoCon, DoRA, through peft.

kohya's choice of layers, reproduced here:

- UNet: every Linear and 1x1 Conv2d inside the transformer blocks (``Transformer2DModel``):
  attention ``to_q/to_k/to_v/to_out.0``, feed-forward ``ff.net.0.proj/ff.net.2``, ``proj_in/proj_out``.
- LoCon (``conv_dim > 0``): also the ResNet blocks and the down/up samplers; their 3x3 convs get
  ``conv_dim``/``conv_alpha``, their Linear and 1x1 convs the normal ``network_dim``/``network_alpha``.
- Text encoder(s): every Linear of the CLIP attention and MLP: ``q/k/v/out_proj``, ``fc1/fc2``.

peft's LoRA layers hold ``lora_A`` (kohya's ``lora_down``, kaiming-uniform init) and ``lora_B``
(``lora_up``, zero init, so training starts from the base model) and scale by alpha / rank, the
same maths as kohya's networks.lora. With DoRA, peft adds the magnitude vector.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

UNET_TRANSFORMER_CLASSES = {"Transformer2DModel", "SpatialTransformer"}
UNET_CONV_CLASSES = {"ResnetBlock2D", "Downsample2D", "Upsample2D"}
TEXT_ENCODER_CLASSES = {"CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP"}


def kohya_name(prefix: str, module_path: str) -> str:
    """``lora_unet_down_blocks_0_attentions_0_..._to_q``: the prefix, then the module path with '.' -> '_'."""
    return f"{prefix}_{module_path.replace('.', '_')}"


@dataclass
class Target:
    """A layer that gets an adapter, with its rank and alpha."""

    path: str
    rank: int
    alpha: float
    is_conv3x3: bool = False


def find_targets(model: torch.nn.Module, parent_classes: set[str], *, dim: int, alpha: float,
                 conv_classes: set[str] = frozenset(), conv_dim: int = 0, conv_alpha: float = 1.0) -> list[Target]:
    """The layers kohya puts a LoRA on, under modules whose class name is in ``parent_classes``."""
    targets: dict[str, Target] = {}
    for parent_path, parent in model.named_modules():
        cls = type(parent).__name__
        in_transformer = cls in parent_classes
        in_conv_block = conv_dim > 0 and cls in conv_classes
        if not (in_transformer or in_conv_block):
            continue
        for child_path, child in parent.named_modules():
            if not child_path:
                continue
            path = f"{parent_path}.{child_path}" if parent_path else child_path
            if isinstance(child, torch.nn.Linear):
                targets.setdefault(path, Target(path, dim, alpha))
            elif isinstance(child, torch.nn.Conv2d):
                if child.kernel_size == (1, 1):
                    targets.setdefault(path, Target(path, dim, alpha))
                elif in_conv_block:
                    targets.setdefault(path, Target(path, conv_dim, conv_alpha, is_conv3x3=True))
    return list(targets.values())


@dataclass
class AdaptedModel:
    """One model (UNet or a text encoder) with its adapters and its kohya prefix."""

    prefix: str  # lora_unet, lora_te, lora_te1, lora_te2
    model: torch.nn.Module
    targets: list[Target]
    layers: dict[str, Any] = field(default_factory=dict)  # kohya name -> peft LoraLayer

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for layer in self.layers.values() for p in _adapter_parameters(layer)]


ADAPTER = "default"


def _adapter_parameters(layer) -> list[torch.nn.Parameter]:
    params = list(layer.lora_A[ADAPTER].parameters()) + list(layer.lora_B[ADAPTER].parameters())
    magnitude = getattr(layer, "lora_magnitude_vector", None)
    if magnitude is not None and ADAPTER in magnitude:
        params += list(magnitude[ADAPTER].parameters())
    return params


def apply_lora(prefix: str, model: torch.nn.Module, targets: list[Target], *, dora: bool = False) -> AdaptedModel:
    """Inject peft LoRA layers into ``model`` at ``targets``; only the adapters are trainable."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    if not targets:
        raise ValueError(f"{prefix}: no layers to adapt (is this a Stable Diffusion model?)")
    model.requires_grad_(False)
    default = targets[0]
    rank_pattern = {re.escape(t.path): t.rank for t in targets if t.rank != default.rank}
    alpha_pattern = {re.escape(t.path): t.alpha for t in targets if t.alpha != default.alpha}
    config = LoraConfig(
        r=default.rank, lora_alpha=default.alpha, target_modules=[t.path for t in targets],
        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, init_lora_weights=True, use_dora=dora,
        lora_dropout=0.0, bias="none",
    )
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    by_path = {t.path: t for t in targets}
    # kohya names text encoder layers after transformers' classic CLIPTextModel layout
    # (text_model.encoder.layers...); transformers 5 dropped the text_model level, so put it back.
    classic = prefix.startswith("lora_te") and not any(p.startswith("text_model.") for p in by_path)
    layers = {}
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer) and path in by_path:
            layers[kohya_name(prefix, f"text_model.{path}" if classic else path)] = module
    missing = set(by_path) - {p for p, m in model.named_modules() if isinstance(m, LoraLayer)}
    if missing:
        raise RuntimeError(f"{prefix}: peft did not adapt {sorted(missing)[:3]}")
    adapted = AdaptedModel(prefix, model, targets, layers)
    for p in adapted.parameters():
        p.requires_grad_(True)
        p.data = p.data.float()  # adapters train in fp32 even when the base model is fp16/bf16
    return adapted


class LoraNetwork:
    """All adapted models of one training run, with the parameter groups and the kohya export."""

    def __init__(self, parts: list[AdaptedModel], unet_lr: float, text_encoder_lr: float,
                 text_encoder_2_lr: float | None = None, loraplus_unet: float | None = None,
                 loraplus_text_encoder: float | None = None):
        self.parts = parts
        self.unet_lr, self.text_encoder_lr = unet_lr, text_encoder_lr
        self.text_encoder_2_lr = text_encoder_lr if text_encoder_2_lr is None else text_encoder_2_lr
        self.loraplus = {"unet": loraplus_unet, "text_encoder": loraplus_text_encoder}

    @classmethod
    def create(cls, base, config) -> "LoraNetwork":
        parts = []
        alpha = config.network_alpha or config.network_dim  # kohya: alpha 0 (or unset) means alpha = dim, scale 1
        if config.train_unet:
            targets = find_targets(base.unet, UNET_TRANSFORMER_CLASSES, dim=config.network_dim,
                                   alpha=alpha, conv_classes=UNET_CONV_CLASSES,
                                   conv_dim=config.conv_dim, conv_alpha=config.conv_alpha or config.conv_dim)
            parts.append(apply_lora("lora_unet", base.unet, targets, dora=config.dora))
        else:
            base.unet.requires_grad_(False)
        prefixes = ["lora_te1", "lora_te2"] if base.is_sdxl else ["lora_te"]
        for prefix, encoder in zip(prefixes, base.text_encoders):
            if config.train_text_encoder:
                targets = find_targets(encoder, TEXT_ENCODER_CLASSES, dim=config.network_dim, alpha=alpha)
                parts.append(apply_lora(prefix, encoder, targets, dora=config.dora))
            else:
                encoder.requires_grad_(False)
        ratio = config.loraplus_lr_ratio
        return cls(parts, config.effective_unet_lr, config.effective_text_encoder_lr, config.text_encoder_2_lr,
                   loraplus_unet=config.loraplus_unet_lr_ratio or ratio,
                   loraplus_text_encoder=config.loraplus_text_encoder_lr_ratio or ratio)

    @property
    def layers(self) -> dict[str, Any]:
        return {name: layer for part in self.parts for name, layer in part.layers.items()}

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for part in self.parts for p in part.parameters()]

    def parameter_groups(self) -> list[dict[str, Any]]:
        """One optimiser group per learning rate: the UNet's, the text encoder's (SDXL: each one's).

        With LoRA+ (kohya's ``loraplus_lr_ratio``) the up matrices (``lora_B``) of a part train at
        ratio x its rate, in a group of their own named ``<part>_up``.
        """
        rates = {"unet": self.unet_lr, "text_encoder": self.text_encoder_lr, "text_encoder_2": self.text_encoder_2_lr}
        groups: dict[str, dict[str, Any]] = {}
        for part in self.parts:
            name = {"lora_unet": "unet", "lora_te2": "text_encoder_2"}.get(part.prefix, "text_encoder")
            ratio = self.loraplus["unet" if name == "unet" else "text_encoder"]
            for layer in part.layers.values():
                ups = list(layer.lora_B[ADAPTER].parameters())
                up_ids = {id(p) for p in ups}
                downs = [p for p in _adapter_parameters(layer) if id(p) not in up_ids]
                for key, params, lr in ((name, downs, rates[name]),
                                        (f"{name}_up" if ratio else name, ups, rates[name] * (ratio or 1.0))):
                    groups.setdefault(key, {"params": [], "lr": lr, "name": key})["params"].extend(params)
        return [g for g in groups.values() if g["params"]]

    def apply_max_norm(self, max_norm: float) -> tuple[int, float, float]:
        """kohya's ``scale_weight_norms``: scale each layer's down and up by sqrt(ratio) so that the norm of
        its change (up @ down x alpha / dim) is at most ``max_norm``. Returns (layers scaled, mean norm, max norm)."""
        scaled, norms = 0, []
        with torch.no_grad():
            for layer in self.layers.values():
                delta = layer.get_delta_weight(ADAPTER).float()
                norm = delta.norm().clamp(min=max_norm / 2)
                ratio = (torch.clamp(norm, max=max_norm) / norm).item()
                if ratio != 1:
                    scaled += 1
                    layer.lora_A[ADAPTER].weight.mul_(ratio ** 0.5)
                    layer.lora_B[ADAPTER].weight.mul_(ratio ** 0.5)
                norms.append(delta.norm().item() * ratio)
        return scaled, (sum(norms) / len(norms) if norms else 0.0), max(norms, default=0.0)

    def trains_unet(self) -> bool:
        return any(part.prefix == "lora_unet" for part in self.parts)

    def trains_text_encoder(self) -> bool:
        return any(part.prefix != "lora_unet" for part in self.parts)

    def count_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def is_finite(self) -> bool:
        return all(torch.isfinite(p).all() for p in self.parameters())
