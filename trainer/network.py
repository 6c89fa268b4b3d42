"""The LoRA network: which layers get an adapter (kohya's defaults), LoCon, DoRA, through peft.

kohya's choice of layers, reproduced here:

- UNet: every Linear and 1x1 Conv2d inside the transformer blocks (``Transformer2DModel``):
  attention ``to_q/to_k/to_v/to_out.0``, feed-forward ``ff.net.0.proj/ff.net.2``, ``proj_in/proj_out``.
- LoCon (``conv_dim > 0``): also the ResNet blocks and the down/up samplers; their 3x3 convs get
  ``conv_dim``/``conv_alpha``, their Linear and 1x1 convs the normal ``network_dim``/``network_alpha``.
- Text encoder(s): every Linear of the CLIP attention and MLP: ``q/k/v/out_proj``, ``fc1/fc2``.

peft's LoRA layers hold ``lora_A`` (kohya's ``lora_down``, kaiming-uniform init) and ``lora_B``
(``lora_up``, zero init, so training starts from the base model) and scale by alpha / rank, the
same maths as kohya's networks.lora.

DoRA (``W' = m * V / ||V||`` with ``V = W + scale * up @ down``) comes in two layouts, and clients
read only one each (the table is in docs/trainer.md):

- ``input`` (default): one magnitude per *input* channel, the norm taken over the output axis,
  ``dora_scale`` shaped ``(1, in)`` / ``(1, in, 1, 1)``. A1111/Forge and ComfyUI compute this one
  exactly. Trained here by scaling the layer's input channels by ``m / ||V||`` (the same as
  scaling V's columns), see ``InputAxisDoRA``.
- ``output``: one magnitude per *output* channel (LyCORIS's ``wd_on_output``, peft's own DoRA),
  ``dora_scale`` shaped ``(out, 1)`` / ``(out, 1, 1, 1)``. Trained with peft's ``use_dora``.

The norm is treated as a constant in the backward pass, as in the DoRA paper (section 4.3) and peft.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from lorakit.plugin_sdk import LorakitError

UNET_TRANSFORMER_CLASSES = {"Transformer2DModel", "SpatialTransformer"}
UNET_CONV_CLASSES = {"ResnetBlock2D", "Downsample2D", "Upsample2D"}
TEXT_ENCODER_CLASSES = {"CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP"}


def kohya_name(prefix: str, module_path: str) -> str:
    """``lora_unet_down_blocks_0_attentions_0_..._to_q``: the prefix, then the module path with '.' -> '_'."""
    return f"{prefix}_{module_path.replace('.', '_')}"


DORA_AXES = ("input", "output")


def lora_delta(layer) -> torch.Tensor:
    """``scale * up @ down`` of a peft LoRA layer, in the shape of its base weight (fp32)."""
    down = layer.lora_A[ADAPTER].weight.float()
    up = layer.lora_B[ADAPTER].weight.float()
    base = layer.get_base_layer().weight
    delta = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
    return (delta * layer.scaling[ADAPTER]).reshape(base.shape)


def input_axis_norm(weight: torch.Tensor) -> torch.Tensor:
    """The norm of each input channel's column (over the output and kernel axes), shape ``(in,)``."""
    return weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)


class InputAxisDoRA(torch.nn.Module):
    """The input-axis DoRA magnitude of one LoRA layer: ``m`` with one value per input channel.

    Scaling the layer's input channels by ``g = m / ||V||_col`` computes ``V @ diag(g) x``, which is
    exactly the decomposed weight ``m * V / ||V||_col`` applied to ``x`` (zero padding stays zero,
    so this holds for convolutions too). The bias is not decomposed, as in every client.
    """

    def __init__(self, layer):
        super().__init__()
        base = layer.get_base_layer().weight.detach().float()
        self.weight = torch.nn.Parameter(input_axis_norm(base))  # ||W||: training starts at the base model
        self.layer = [layer]  # not a submodule: the layer owns this, not the other way round
        self.hook = layer.register_forward_pre_hook(self._scale_input)

    def gain(self) -> torch.Tensor:
        layer = self.layer[0]
        with torch.no_grad():
            merged = layer.get_base_layer().weight.float() + lora_delta(layer)
            norm = input_axis_norm(merged)
        return self.weight / norm

    def _scale_input(self, module, args):
        x, *rest = args
        gain = self.gain().to(x.dtype)
        shape = (1, -1, 1, 1) if x.dim() == 4 and isinstance(module.get_base_layer(), torch.nn.Conv2d) else (-1,)
        return (x * gain.reshape(shape), *rest)


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
    legacy_names: dict[str, str] = field(default_factory=dict)  # an older spelling -> its kohya name

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for layer in self.layers.values() for p in _adapter_parameters(layer)]


ADAPTER = "default"


def _adapter_parameters(layer) -> list[torch.nn.Parameter]:
    params = list(layer.lora_A[ADAPTER].parameters()) + list(layer.lora_B[ADAPTER].parameters())
    magnitude = getattr(layer, "lora_magnitude_vector", None)
    if magnitude is not None and ADAPTER in magnitude:
        params += list(magnitude[ADAPTER].parameters())
    if getattr(layer, "lorakit_dora", None) is not None:
        params.append(layer.lorakit_dora.weight)
    return params


def dora_magnitude(layer) -> tuple[str, torch.nn.Parameter] | None:
    """``(axis, magnitude)`` of a DoRA layer (``input``: shape (in,), ``output``: (out,)), else None."""
    if getattr(layer, "lorakit_dora", None) is not None:
        return "input", layer.lorakit_dora.weight
    magnitude = getattr(layer, "lora_magnitude_vector", None)
    if magnitude is not None and ADAPTER in magnitude:
        return "output", magnitude[ADAPTER].weight
    return None


def apply_lora(prefix: str, model: torch.nn.Module, targets: list[Target], *, dora: bool = False,
               dora_axis: str = "input", file_path=None) -> AdaptedModel:
    """Inject peft LoRA layers into ``model`` at ``targets``; only the adapters are trainable.

    ``file_path`` turns a module path into the path the file's key is made of (SDXL: the LDM path);
    by default the module path itself.
    """
    if dora_axis not in DORA_AXES:
        raise ValueError(f"dora_axis must be one of {DORA_AXES}, got {dora_axis!r}")
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
        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, init_lora_weights=True,
        use_dora=dora and dora_axis == "output",
        lora_dropout=0.0, bias="none",
    )
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    by_path = {t.path: t for t in targets}
    # kohya names text encoder layers after transformers' classic CLIPTextModel layout
    # (text_model.encoder.layers...); transformers 5 dropped the text_model level, so put it back.
    classic = prefix.startswith("lora_te") and not any(p.startswith("text_model.") for p in by_path)
    layers, legacy = {}, {}
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer) and path in by_path:
            named = f"text_model.{path}" if classic else path
            name = kohya_name(prefix, file_path(named) if file_path else named)
            layers[name] = module
            if name != kohya_name(prefix, named):
                legacy[kohya_name(prefix, named)] = name
            if dora and dora_axis == "input":
                module.lorakit_dora = InputAxisDoRA(module)
    missing = set(by_path) - {p for p, m in model.named_modules() if isinstance(m, LoraLayer)}
    if missing:
        raise RuntimeError(f"{prefix}: peft did not adapt {sorted(missing)[:3]}")
    adapted = AdaptedModel(prefix, model, targets, layers, legacy)
    for p in adapted.parameters():
        p.requires_grad_(True)
        p.data = p.data.float()  # adapters train in fp32 even when the base model is fp16/bf16
    return adapted


def _block_targets(targets: list[Target], per_block, is_sdxl: bool, file_path) -> list[Target]:
    """The UNet targets with kohya's per-block dims and alphas; the layers of a dim-0 block are left out."""
    from .blocks import block_index

    kept = []
    for target in targets:
        named = file_path(target.path) if file_path else target.path
        index = block_index(kohya_name("lora_unet", named), is_sdxl)
        dim, alpha = per_block.of(index, target.is_conv3x3)
        if dim:
            # kohya: alpha 0 or none means alpha = dim (scale 1)
            kept.append(Target(target.path, dim, float(alpha) if alpha else float(dim), target.is_conv3x3))
    return kept


def add_dropout(layer, *, neuron: float = 0.0, rank: float = 0.0, module: float = 0.0) -> None:
    """kohya's LoRA dropouts, on the down projection's output ``lx`` while training: ``network_dropout``
    drops single values, ``rank_dropout`` whole ranks (the rest scaled by 1 / (1 - p)), and
    ``module_dropout`` the whole layer's change for that step."""
    def hook(down, inputs, lx):
        if not down.training:
            return lx
        if module and torch.rand(1).item() < module:
            return torch.zeros_like(lx)
        if neuron:
            lx = torch.nn.functional.dropout(lx, p=neuron)
        if rank:
            mask = (torch.rand((lx.shape[0], lx.shape[1] if lx.dim() == 4 else lx.shape[-1]), device=lx.device) > rank)
            mask = mask.to(lx.dtype)
            mask = mask[:, :, None, None] if lx.dim() == 4 else (mask[:, None, :] if lx.dim() == 3 else mask)
            lx = lx * mask / (1.0 - rank)
        return lx

    layer.lora_A[ADAPTER].register_forward_hook(hook)


class LoraNetwork:
    """All adapted models of one training run, with the parameter groups and the kohya export."""

    def __init__(self, parts: list[AdaptedModel], unet_lr: float, text_encoder_lr: float,
                 text_encoder_2_lr: float | None = None, loraplus_unet: float | None = None,
                 loraplus_text_encoder: float | None = None, block_lr_weights: list[float] | None = None,
                 is_sdxl: bool = False):
        self.parts = parts
        self.block_lr_weights = block_lr_weights  # kohya's per-block LR weights of the UNet (None: off)
        self.is_sdxl = is_sdxl
        self.unet_lr, self.text_encoder_lr = unet_lr, text_encoder_lr
        self.text_encoder_2_lr = text_encoder_lr if text_encoder_2_lr is None else text_encoder_2_lr
        self.loraplus = {"unet": loraplus_unet, "text_encoder": loraplus_text_encoder}

    @classmethod
    def create(cls, base, config, console=None) -> "LoraNetwork":
        from . import blocks
        from .kohya_format import ldm_unet_path
        from .lycoris import parse_network_args

        parts = []
        alpha = config.network_alpha or config.network_dim  # kohya: alpha 0 (or unset) means alpha = dim, scale 1
        dora_axis = getattr(config, "dora_axis", "input")
        args = parse_network_args(config.values.get("network_args"), "network_args")

        def warn(note: str) -> None:
            if console is not None:
                console.print(f"[yellow]warning:[/] {note}")

        block_weights = blocks.lr_weights(args, base.is_sdxl, "network_args", warn)
        per_block = blocks.block_dims(args, base.is_sdxl, dim=config.network_dim, alpha=config.network_alpha,
                                      conv_dim=config.conv_dim, conv_alpha=config.conv_alpha,
                                      weights=block_weights)
        # kohya names SDXL UNet layers after its own (LDM-layout) SDXL UNet, SD1 after diffusers'.
        file_path = (lambda path: ldm_unet_path(path, base.unet.config)) if base.is_sdxl else None
        targets = []
        if config.train_unet:
            with_convs = per_block.conv_dims is not None if per_block else config.conv_dim > 0
            targets = find_targets(base.unet, UNET_TRANSFORMER_CLASSES, dim=config.network_dim,
                                   alpha=alpha, conv_classes=UNET_CONV_CLASSES,
                                   conv_dim=config.conv_dim or int(with_convs),
                                   conv_alpha=config.conv_alpha or config.conv_dim)
            if per_block is not None:
                targets = _block_targets(targets, per_block, base.is_sdxl, file_path)
        if targets:
            parts.append(apply_lora("lora_unet", base.unet, targets, dora=config.dora, dora_axis=dora_axis,
                                    file_path=file_path))
        else:
            base.unet.requires_grad_(False)
        prefixes = ["lora_te1", "lora_te2"] if base.is_sdxl else ["lora_te"]
        for prefix, encoder in zip(prefixes, base.text_encoders):
            if config.train_text_encoder:
                targets = find_targets(encoder, TEXT_ENCODER_CLASSES, dim=config.network_dim, alpha=alpha)
                parts.append(apply_lora(prefix, encoder, targets, dora=config.dora, dora_axis=dora_axis))
            else:
                encoder.requires_grad_(False)
        if config.network_dropout or config.rank_dropout or config.module_dropout:
            for part in parts:
                for layer in part.layers.values():
                    add_dropout(layer, neuron=config.network_dropout, rank=config.rank_dropout,
                                module=config.module_dropout)
        if not parts:
            raise LorakitError("network_args: every UNet block has dim 0 or LR weight 0 and the text encoder is not "
                               "trained; nothing to train")
        ratio = config.loraplus_lr_ratio
        return cls(parts, config.effective_unet_lr, config.effective_text_encoder_lr, config.text_encoder_2_lr,
                   loraplus_unet=config.loraplus_unet_lr_ratio or ratio,
                   loraplus_text_encoder=config.loraplus_text_encoder_lr_ratio or ratio,
                   block_lr_weights=block_weights, is_sdxl=bool(base.is_sdxl))

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
        from .blocks import block_index

        rates = {"unet": self.unet_lr, "text_encoder": self.text_encoder_lr, "text_encoder_2": self.text_encoder_2_lr}
        groups: dict[str, dict[str, Any]] = {}
        for part in self.parts:
            name = {"lora_unet": "unet", "lora_te2": "text_encoder_2"}.get(part.prefix, "text_encoder")
            ratio = self.loraplus["unet" if name == "unet" else "text_encoder"]
            for layer_name, layer in part.layers.items():
                group, rate = name, rates[name]
                if name == "unet" and self.block_lr_weights is not None:
                    # kohya: one group per block at unet_lr x the block's weight, named unet_block<index>
                    index = block_index(layer_name, self.is_sdxl)
                    group, rate = f"unet_block{index}", rate * self.block_lr_weights[index]
                ups = list(layer.lora_B[ADAPTER].parameters())
                up_ids = {id(p) for p in ups}
                downs = [p for p in _adapter_parameters(layer) if id(p) not in up_ids]
                for key, params, lr in ((group, downs, rate),
                                        (f"{group}_up" if ratio else group, ups, rate * (ratio or 1.0))):
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
