"""LyCORIS network types (LoCon, LoHa, LoKr, IA3, DyLoRA, Diag-OFT) through the reference implementation.

The networks are built by ``lycoris.kohya.create_network``, exactly as kohya users get them with
``--network_module lycoris.kohya --network_args algo=loha ...``; lorakit adds only what the
trainer needs around it: the settings (``network_type``, or kohya's ``network_module`` +
``network_args``), the guides' recipes, the parameter groups and the file.

The file is LyCORIS' own state dict (``<lora name>.hada_w1_a``, ``.lokr_w1``, ``.oft_blocks``,
``.weight`` + ``.on_input`` for IA3, ``.lora_up/.lora_down`` for LoCon and DyLoRA, ``.alpha``),
which A1111/Forge (built-in ``networks``), ComfyUI (``comfy/weight_adapter``) and LyCORIS' own
loader read. Names follow kohya: ``lora_unet_<diffusers module path>``, and the text encoder under
transformers' classic ``text_model.`` path (``lora_te_text_model_encoder_layers_0_...``) even
where transformers 5 dropped that level, because that is the name the web UIs look up.

Three things of lycoris-lora 4.1.3 are worked around, without changing the library:
- its presets list ``TimestepEmbedding`` (for Anima) as a block class *and* ``time_embedding.*``
  as names, so on a Stable Diffusion UNet ``create_network`` stops with "duplicated lora name";
  lorakit passes the same presets without that class (the classes and names SD files always had);
- its ``ia3`` preset names layers (``to_k``...) that ``re.match`` never finds inside a full
  module path, so IA3 would train nothing; lorakit's ``ia3`` preset matches them as path suffixes;
- its DyLoRA saves a conv layer's ``lora_up`` without the two 1x1 axes (see ``state_dict``).
"""
from __future__ import annotations

import contextlib
import copy
import difflib
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorakit.plugin_sdk import LorakitError

if TYPE_CHECKING:  # annotations only: torch is imported where it is used
    import torch

# network_type -> LyCORIS algo. "lora" is lorakit's own kohya-format LoRA (trainer/network.py).
LYCORIS_ALGOS = {"locon": "locon", "loha": "loha", "lokr": "lokr", "ia3": "ia3", "dylora": "dylora",
                 "diag_oft": "diag-oft"}
NETWORK_TYPES = ("lora", *LYCORIS_ALGOS)
ALGO_TO_TYPE = {"lora": "locon", "locon": "locon", "loha": "loha", "lokr": "lokr", "ia3": "ia3",
                "dylora": "dylora", "diag-oft": "diag_oft", "diag_oft": "diag_oft", "oft": "diag_oft"}
KOHYA_MODULES = ("networks.lora", "lycoris.kohya")

# The guides' recipes (seed 002, "baking"; shared/DOMAIN.md "Training recipes"). A recipe fills
# each setting still at its schema default; what the user sets wins.
RECIPES: dict[str, dict[str, Any]] = {
    "lora": {},
    "locon": {"network_dim": 32, "network_alpha": 16, "conv_dim": 32, "conv_alpha": 16},
    "loha": {"network_dim": 32, "network_alpha": 16, "conv_dim": 32, "conv_alpha": 16},
    "lokr": {"network_dim": 32, "network_alpha": 16, "conv_dim": 32, "conv_alpha": 16, "learning_rate": 5e-5},
    "ia3": {"learning_rate": 5e-3},
    "dylora": {"network_dim": 64, "network_alpha": 32, "conv_dim": 64, "conv_alpha": 32},
    "diag_oft": {"network_dim": 2, "network_alpha": 2, "conv_dim": 2, "conv_alpha": 2},
}
RECIPE_ARGS: dict[str, dict[str, str]] = {"dylora": {"block_size": "4"}, "ia3": {"preset": "ia3"}}
# The guides' limits: a warning, not an error.
LIMITS = {"locon": {"conv_dim": 64, "conv_alpha": 32}, "loha": {"network_dim": 32}, "lokr": {"network_dim": 32}}
ADAPTIVE_OPTIMIZERS = ("prodigy", "dadapt")

# network_args that lycoris.kohya.create_network reads (what kohya passes through).
LYCORIS_ARGS = {
    "algo", "preset", "conv_dim", "conv_alpha", "dropout", "rank_dropout", "module_dropout", "use_tucker",
    "use_conv_cp", "use_cp", "disable_conv_cp", "use_scalar", "block_size", "constraint", "rescaled", "factor",
    "decompose_both", "full_matrix", "unbalanced_factorization", "rs_lora", "bypass_mode", "train_norm", "dora_wd",
    "wd_on_output", "rank_dropout_scale", "loraplus_lr_ratio", "loraplus_unet_lr_ratio",
    "loraplus_text_encoder_lr_ratio",
}
# Arguments lorakit sets from its own settings (conv_dim/conv_alpha) or that make no sense here.
REFUSED_ARGS = {"train_t5xxl", "train_llm_adapter"}


# ----- settings ---------------------------------------------------------------------------------
def parse_network_args(items: list[str] | dict | None, where: str) -> dict[str, str]:
    """kohya's ``network_args`` (``["algo=loha", "conv_dim=8"]``) as a dict of strings."""
    if not items:
        return {}
    if isinstance(items, dict):
        return {str(k): str(v) for k, v in items.items()}
    args: dict[str, str] = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise LorakitError(f"{where}: train setting 'network_args' item {item!r} is invalid: expected key=value "
                               "(e.g. algo=loha)")
        args[key] = value
    return args


def resolve_network_settings(values: dict[str, Any], where: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """Check network_type / network_module / network_args together and apply the type's recipe.

    ``network_module: lycoris.kohya`` with ``algo=...`` (kohya's spelling) and ``network_type``
    name the same thing; both may be given if they agree. Afterwards ``network_type`` is the type,
    ``network_module`` the kohya module that reads the file and ``network_args`` the arguments.
    """
    network_type = values.get("network_type") or "lora"
    module = values.get("network_module")
    args = parse_network_args(values.get("network_args"), where)
    if module is not None and module not in KOHYA_MODULES:
        raise LorakitError(f"{where}: train setting 'network_module' = {module!r} is invalid: expected "
                           f"{' or '.join(KOHYA_MODULES)}")
    from .blocks import BLOCK_ARGS, check_block_args

    plain = network_type == "lora" and module != "lycoris.kohya" and "algo" not in args
    for key in args:
        if key in BLOCK_ARGS and not plain:
            raise LorakitError(f"{where}: train setting 'network_args' has '{key}': block-wise dims and LR weights "
                               "are kohya's networks.lora arguments, for network_type lora (LyCORIS does not take "
                               "them)")
        if plain and key in (*BLOCK_ARGS, "conv_dim", "conv_alpha"):
            continue
        if plain:
            near = difflib.get_close_matches(key, BLOCK_ARGS, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise LorakitError(f"{where}: train setting 'network_args' has '{key}', which plain LoRA (kohya's "
                               f"networks.lora) does not take{hint}; it takes conv_dim, conv_alpha and "
                               f"{', '.join(BLOCK_ARGS)}; set network_type for a LyCORIS type")
        if key in REFUSED_ARGS or key not in LYCORIS_ARGS:
            near = difflib.get_close_matches(key, sorted(LYCORIS_ARGS), n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise LorakitError(f"{where}: train setting 'network_args' has '{key}', which lorakit's LyCORIS networks "
                               f"do not take{hint}")
    if "algo" in args:
        algo = args["algo"].lower()
        if algo not in ALGO_TO_TYPE:
            raise LorakitError(f"{where}: network_args algo={args['algo']!r} is not supported: expected one of "
                               f"{', '.join(sorted(set(ALGO_TO_TYPE) - {'diag_oft', 'oft'}))}")
        from_algo = ALGO_TO_TYPE[algo]
        if network_type != "lora" and network_type != from_algo:
            raise LorakitError(f"{where}: network_type = {network_type!r} but network_args says algo={algo}; "
                               "give one of them")
        network_type = from_algo
        if module == "networks.lora":
            raise LorakitError(f"{where}: network_args algo={algo} needs network_module = 'lycoris.kohya'")
    elif module == "lycoris.kohya" and network_type == "lora":
        network_type = "locon"  # LyCORIS' default algo ("lora" is its LoCon module)
    if network_type == "lora":
        if module == "lycoris.kohya":
            raise LorakitError(f"{where}: network_module 'lycoris.kohya' needs a LyCORIS network_type")
        for name in ("conv_dim", "conv_alpha"):
            if name in args:  # kohya's networks.lora reads them from network_args; they become the settings
                try:
                    values[name] = int(args.pop(name)) if name == "conv_dim" else float(args.pop(name))
                except ValueError:
                    raise LorakitError(f"{where}: network_args {name} must be a number") from None
        check_block_args(args, where, values.get("model_type"))  # its warnings come again on the real model
        # network_module stays as given (None: the default); the block-wise arguments as kohya spells them
        values.update(network_type="lora", network_args=[f"{k}={v}" for k, v in args.items()])
        return values
    if values.get("dora"):
        raise LorakitError(f"{where}: 'dora' is lorakit's DoRA on plain LoRA; for a LyCORIS type use "
                           "network_args dora_wd=True")
    for name, value in RECIPES[network_type].items():
        if name == "learning_rate" and str(values.get("optimizer", "")).lower().startswith(ADAPTIVE_OPTIMIZERS):
            continue  # an adaptive optimiser keeps its own learning rate (Prodigy: 1)
        if values.get(name) == defaults.get(name):
            values[name] = value
    for name, value in RECIPE_ARGS.get(network_type, {}).items():
        args.setdefault(name, value)
    args.pop("algo", None)
    for name in ("conv_dim", "conv_alpha"):
        if name in args:  # kohya passes conv_dim/conv_alpha through network_args; they become the settings
            try:
                values[name] = int(args.pop(name)) if name == "conv_dim" else float(args.pop(name))
            except ValueError:
                raise LorakitError(f"{where}: network_args {name} must be a number") from None
    if args.get("preset") and args["preset"] not in _preset_names() and not Path(args["preset"]).is_file():
        raise LorakitError(f"{where}: network_args preset={args['preset']!r} is neither a LyCORIS preset "
                           f"({', '.join(_preset_names())}) nor a preset .toml file")
    values.update(network_type=network_type, network_module="lycoris.kohya",
                  network_args=[f"{k}={v}" for k, v in args.items()])
    return values


def guide_warnings(config) -> list[str]:
    """The guides' limits for the chosen type that this configuration goes past."""
    notes = []
    for name, limit in LIMITS.get(config.network_type, {}).items():
        if getattr(config, name) > limit:
            notes.append(f"{config.network_type}: the guides advise {name} <= {limit:g} (this run: "
                         f"{getattr(config, name):g})")
    if config.network_type == "diag_oft":
        args = parse_network_args(config.network_args, "network_args")
        try:
            constraint = float(args.get("constraint", 0))
        except ValueError:
            constraint = 0.0
        if constraint <= 0:  # docs/trainer.md, LyCORIS table: checked against A1111's network_oft.py
            notes.append("diag_oft without a constraint: A1111 reads the file's alpha (0) as its COFT constraint and "
                         "applies nothing, silently; Forge does not load OFT at all. The file works in ComfyUI and "
                         "diffusers+LyCORIS; set network_args constraint=... (> 0) for A1111")
    return notes


def _preset_names() -> list[str]:
    try:
        from lycoris.config import PRESET
    except ImportError:  # checked again, with the install hint, when the network is built
        return ["full", "ia3"]
    return sorted(PRESET)


# ----- presets ------------------------------------------------------------------------------------
def sd_preset(name: str) -> dict[str, Any]:
    """A LyCORIS preset for Stable Diffusion models (see the module docstring for the two fixes)."""
    from lycoris.config import PRESET

    if name == "ia3":
        # (IA)^3: scale the keys, the values and the feed-forward input (train_on_input).
        return {
            "enable_conv": False, "use_fnmatch": True,
            "unet_target_module": [], "unet_target_name": ["*.to_k", "*.to_v", "*.ff.net.2"],
            "text_encoder_target_module": [], "text_encoder_target_name": ["*.k_proj", "*.v_proj", "*.mlp.fc2"],
            "name_algo_map": {"*.ff.net.2": {"train_on_input": True}, "*.mlp.fc2": {"train_on_input": True}},
        }
    preset = copy.deepcopy(PRESET[name])
    if "unet_target_module" in preset:
        preset["unet_target_module"] = [m for m in preset["unet_target_module"] if m != "TimestepEmbedding"]
    return preset


_CLASS_STATE = ("ENABLE_CONV", "UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME",
                "TEXT_ENCODER_TARGET_REPLACE_MODULE", "TEXT_ENCODER_TARGET_REPLACE_NAME", "MODULE_ALGO_MAP",
                "NAME_ALGO_MAP", "USE_FNMATCH", "TARGET_EXCLUDE_NAME")
_PRISTINE: dict[str, Any] = {}


@contextlib.contextmanager
def _fresh_lycoris():
    """lycoris.kohya keeps the preset in class attributes: start every network from its defaults."""
    import lycoris.kohya as lycoris_kohya
    from lycoris.logging import logger

    cls = lycoris_kohya.LycorisNetworkKohya
    if not _PRISTINE:
        _PRISTINE.update({name: copy.deepcopy(getattr(cls, name)) for name in _CLASS_STATE})
    for name, value in _PRISTINE.items():
        setattr(cls, name, copy.deepcopy(value))
    level = logger.level
    logger.setLevel("ERROR")  # its INFO lines (one per setting) would drown lorakit's progress
    try:
        yield lycoris_kohya
    finally:
        logger.setLevel(level)


def _use_ldm_names(network, unet) -> None:
    """SDXL: kohya names UNet layers after its own LDM-layout UNet (``lora_unet_input_blocks_4_1_...``),
    and so does kohya + LyCORIS; rename LyCORIS' diffusers-path names the same way (before ``apply_to``)."""
    from .kohya_format import ldm_unet_path

    renames = {}
    for path, _ in unet.named_modules():
        if path:
            try:
                renames[f"lora_unet_{path.replace('.', '_')}"] = f"lora_unet_{ldm_unet_path(path, unet.config).replace('.', '_')}"
            except (ValueError, KeyError, IndexError):
                continue
    for lora in network.unet_loras:
        lora.lora_name = renames.get(lora.lora_name, lora.lora_name)


_CLASSIC: list = []


def _classic_text_model_class():
    """``ClassicTextModel``, made on first use so that checking settings never imports torch."""
    if not _CLASSIC:
        import torch

        class ClassicTextModel(torch.nn.Module):
            """Shows a transformers-5 CLIP text model under the classic ``text_model.`` path kohya names use."""

            def __init__(self, encoder: torch.nn.Module):
                super().__init__()
                self.text_model = encoder

        _CLASSIC.append(ClassicTextModel)
    return _CLASSIC[0]


def classic_text_encoder(encoder: torch.nn.Module) -> torch.nn.Module:
    has_text_model = any(name == "text_model" for name, _ in encoder.named_children())
    return encoder if has_text_model else _classic_text_model_class()(encoder)


def _import_lycoris():
    try:
        import lycoris.kohya  # noqa: F401
    except ImportError:
        raise LorakitError("LyCORIS network types need the lycoris-lora package: pip install lycoris-lora") from None


# ----- the network ---------------------------------------------------------------------------------
class LycorisNetwork:
    """A LyCORIS network on the base model, with what the training loop asks of a network."""

    def __init__(self, network, config, algo: str, args: dict[str, str]):
        self.network = network
        self.config = config
        self.algo = algo
        self.args = args

    @classmethod
    def create(cls, base, config, console=None) -> "LycorisNetwork":
        import torch

        _import_lycoris()
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            raise LorakitError("LyCORIS network types train on one process for now (their weights live outside "
                               "the models accelerate synchronises); use one GPU or network_type lora")
        algo = LYCORIS_ALGOS[config.network_type]
        args = parse_network_args(config.network_args, "network_args")
        preset = args.pop("preset", "full")
        kwargs: dict[str, Any] = dict(args)
        kwargs.update(algo=algo, conv_dim=config.conv_dim or config.network_dim,
                      conv_alpha=config.conv_alpha if config.conv_dim else config.network_alpha)
        for setting, argument in (("network_dropout", "dropout"), ("rank_dropout", "rank_dropout"),
                                  ("module_dropout", "module_dropout")):
            value = config.values.get(setting)
            if value and argument not in kwargs:  # kohya's dropout settings, applied by LyCORIS itself
                kwargs[argument] = value
        ratio = config.values.get("loraplus_lr_ratio")
        if ratio and "loraplus_lr_ratio" not in kwargs:
            kwargs["loraplus_lr_ratio"] = ratio
        encoders = [classic_text_encoder(e) for e in base.text_encoders] if config.train_text_encoder else []
        text_encoder = (encoders if base.is_sdxl else encoders[0]) if encoders else None
        for model in (base.unet, *base.text_encoders):
            model.requires_grad_(False)
        with _fresh_lycoris() as lycoris_kohya, tempfile.TemporaryDirectory() as folder:
            if Path(preset).is_file():
                kwargs["preset"] = preset
            else:
                import toml

                path = Path(folder) / f"{preset}.toml"
                path.write_text(toml.dumps(sd_preset(preset)), encoding="utf-8")
                kwargs["preset"] = str(path)
            network = lycoris_kohya.create_network(1.0, config.network_dim, config.network_alpha, base.vae,
                                                   text_encoder, base.unet if config.train_unet else None,
                                                   warn_on_unmatched=False, **kwargs)
            if base.is_sdxl:
                _use_ldm_names(network, base.unet)
            network.apply_to(text_encoder, base.unet, apply_text_encoder=bool(encoders),
                             apply_unet=config.train_unet)
        if not network.loras:
            raise LorakitError(f"{config.network_type}: LyCORIS found no layers to adapt (preset {preset}); is this "
                               "a Stable Diffusion model?")
        device = next(base.unet.parameters()).device
        network.to(device=device, dtype=torch.float32)  # adapters train in fp32 even on an fp16 model
        network.requires_grad_(True)
        for note in guide_warnings(config):
            if console is not None:
                console.print(f"[yellow]warning:[/] {note}")
        recorded = {"algo": algo, **args, "preset": preset,
                    "conv_dim": str(kwargs["conv_dim"]), "conv_alpha": str(kwargs["conv_alpha"])}
        return cls(network, config, algo, recorded)

    # what the training loop uses ------------------------------------------------------------------
    @property
    def layers(self) -> dict[str, Any]:
        return {lora.lora_name: lora for lora in self.network.loras}

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.network.parameters() if p.requires_grad]

    def parameter_groups(self) -> list[dict[str, Any]]:
        """LyCORIS' groups (text encoder, UNet; LoRA+ 'plus' groups), named for the logs."""
        config = self.config
        groups, descriptions = self.network.prepare_optimizer_params(
            config.effective_text_encoder_lr, config.effective_unet_lr, config.learning_rate)
        named = []
        for group, description in zip(groups, descriptions):
            name = description.replace("textencoder", "text_encoder").replace(" ", "_")
            named.append({**group, "params": list(group["params"]), "name": name})
        return named

    def trains_text_encoder(self) -> bool:
        return bool(self.network.text_encoder_loras)

    def trains_unet(self) -> bool:
        return bool(self.network.unet_loras)

    def count_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def is_finite(self) -> bool:
        import torch

        return all(torch.isfinite(p).all() for p in self.network.parameters())

    def apply_max_norm(self, max_norm: float) -> tuple[int, float, float]:
        """kohya's ``scale_weight_norms`` through LyCORIS' own: (layers scaled, mean norm, max norm)."""
        device = next(iter(self.network.parameters())).device
        scaled, mean, largest = self.network.apply_max_norm_regularization(max_norm, device)
        return int(scaled), float(mean), float(largest)

    # the file ------------------------------------------------------------------------------------
    def state_dict(self, save_precision: str = "fp16") -> dict[str, torch.Tensor]:
        """LyCORIS' state dict in the save precision, as its ``save_weights`` writes it.

        One fix: lycoris-lora 4.1.3's DyLoRA writes a conv layer's ``lora_up`` as (out, rank), which
        no loader (LyCORIS' own, diffusers, the web UIs) accepts for a conv; it is written as the
        LoRA layout (out, rank, 1, 1), the shape kohya's own DyLoRA writes.
        """
        from lycoris.modules.dylora import DyLoraModule

        from .kohya_format import SAVE_DTYPES

        dtype = SAVE_DTYPES[save_precision]
        tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in self.network.state_dict().items()}
        for lora in self.network.loras:
            key = f"{lora.lora_name}.lora_up.weight"
            if isinstance(lora, DyLoraModule) and len(lora.shape) > 2 and tensors[key].dim() == 2:
                tensors[key] = tensors[key].reshape(*tensors[key].shape, *([1] * (len(lora.shape) - 2)))
        return tensors

    def load_state_dict(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        """Put saved weights back (to resume); every key must match, shapes too."""
        import torch

        from lycoris.modules.dylora import DyLoraModule

        expected = self.state_dict("fp32")
        missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if unexpected:
            raise LorakitError(f"{where}: {unexpected[0]} belongs to no layer of this network (other base model or "
                               "settings?)")
        if missing:
            raise LorakitError(f"{where}: no weights for {missing[0]} (and {len(missing) - 1} more)")
        for key, value in tensors.items():
            if tuple(value.shape) != tuple(expected[key].shape):
                raise LorakitError(f"{where}: {key} has shape {tuple(value.shape)}, the network expects "
                                   f"{tuple(expected[key].shape)}")
        with torch.no_grad():
            for lora in self.network.loras:
                if isinstance(lora, DyLoraModule):  # its own load_state_dict does nothing; split the blocks back
                    up = tensors[f"{lora.lora_name}.lora_up.weight"].flatten(1)
                    down = tensors[f"{lora.lora_name}.lora_down.weight"].reshape(lora.lora_dim, -1)
                    for i, (u, d) in enumerate(zip(lora.up_list, lora.down_list)):
                        u.copy_(up[:, i * lora.block_size:(i + 1) * lora.block_size])
                        d.copy_(down[i * lora.block_size:(i + 1) * lora.block_size])
            rest = {k: v for k, v in tensors.items()
                    if not isinstance(self.layers.get(k.split(".", 1)[0]), DyLoraModule)}
            self.network.load_state_dict(rest, strict=False)

    def metadata(self) -> dict[str, str]:
        """What kohya writes for ``--network_module lycoris.kohya``: the module and its network_args."""
        return {
            "ss_network_module": "lycoris.kohya",
            "ss_network_dim": str(self.config.network_dim),
            "ss_network_alpha": str(self.config.network_alpha),
            "ss_network_args": json.dumps(self.args),
        }


def create_network(base, config, console=None):
    """The network of ``config.network_type``: lorakit's LoRA (peft) or a LyCORIS one."""
    if config.values.get("network_type", "lora") == "lora":
        from .network import LoraNetwork

        return LoraNetwork.create(base, config, console=console)
    return LycorisNetwork.create(base, config, console=console)


def network_state_dict(network, save_precision: str) -> dict[str, torch.Tensor]:
    """The tensors of a network as they go into the file."""
    if isinstance(network, LycorisNetwork):
        return network.state_dict(save_precision)
    from . import kohya_format

    return kohya_format.state_dict(network, save_precision)


def load_network_state_dict(network, tensors: dict[str, torch.Tensor], where: str) -> None:
    if isinstance(network, LycorisNetwork):
        network.load_state_dict(tensors, where)
        return
    from . import kohya_format

    kohya_format.load_state_dict(network, tensors, where)
