"""What each client does with lorakit's LoRA files, encoded from that client's own code.

The tiny models have the real SD1.5 / SDXL block layout (tests/tiny_models.py), so the block
numbering that clients hard-code (A1111's ``1 + block * 3 + i``, kohya's SDXL conversion map,
diffusers' sgm remapping) is exercised as on a real model. Client versions read for these tests
are listed in docs/trainer.md ("Compatibility").
"""
from __future__ import annotations

import re

import pytest
import torch

from lorakit.trainer import kohya_format
from lorakit.trainer.api import validate_settings
from lorakit.trainer.models import load_base_model
from lorakit.trainer.network import LoraNetwork
from tests.tiny_models import _unet_key_to_ldm


# ----- fixtures: tiny models, networks with random (non-zero) weights ----------------------------
def network_for(base_folder, seed=0, **extra):
    """A LoRA network on a freshly loaded base model, every adapter weight random (as after training)."""
    values = {"base_model": str(base_folder), "network_dim": 2, "network_alpha": 1, "conv_dim": 2, "conv_alpha": 1}
    values.update(extra)
    config = validate_settings(values, "test")
    base = load_base_model(str(base_folder), device="cpu")
    network = LoraNetwork.create(base, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(p + 0.3 * torch.randn(p.shape, generator=generator) * (p.abs().mean() + 0.1))
    return base, network


def module_names(tensors) -> set[str]:
    return {k.split(".")[0] for k in tensors}


def clean_unet(base):
    """The base model's UNet without adapters, loaded again from its folder."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(f"{base.source}/unet")


def ldm_unet_modules(unet) -> set[str]:
    """Module paths of the original-layout (LDM/SGM) UNet with the same weights, from its state dict.

    The names come from tests/tiny_models.py's LDM writer, which diffusers' own single-file
    converter reads back exactly (checked in test_the_ldm_layout_is_the_one_diffusers_converts).
    """
    config = dict(unet.config)
    return {_unet_key_to_ldm(k, config).rsplit(".", 1)[0] for k in unet.state_dict()}


@pytest.fixture(scope="module")
def sdxl_locon(sdxl):
    base, network = network_for(sdxl)
    return base, network, kohya_format.state_dict(network, "fp32")


@pytest.fixture(scope="module")
def sd15_locon(sd15):
    base, network = network_for(sd15)
    return base, network, kohya_format.state_dict(network, "fp32")


# ----- the tiny models' layout --------------------------------------------------------------------
def test_tiny_models_have_the_real_block_layout(sd15_locon, sdxl_locon):
    for (base, _, _), levels, depths in ((sd15_locon, 4, [1, 1, 1, None]), (sdxl_locon, 3, [None, 2, 10])):
        unet = base.unet
        assert len(unet.down_blocks) == levels and len(unet.up_blocks) == levels
        assert all(len(b.resnets) == 2 for b in unet.down_blocks)
        assert all(len(b.resnets) == 3 for b in unet.up_blocks)
        for block, depth in zip(unet.down_blocks, depths):
            got = len(block.attentions[0].transformer_blocks) if hasattr(block, "attentions") else None
            assert got == depth
        assert len(unet.mid_block.attentions[0].transformer_blocks) == (depths[-1] or 1)


def test_the_ldm_layout_is_the_one_diffusers_converts(sdxl_locon, sd15_locon):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    for base, _, _ in (sdxl_locon, sd15_locon):
        unet = clean_unet(base)
        state = unet.state_dict()
        config = dict(unet.config)
        ldm = {"model.diffusion_model." + _unet_key_to_ldm(k, config): v for k, v in state.items()}
        back = convert_ldm_unet_checkpoint(ldm, config)
        assert set(back) == set(state)
        assert all(torch.equal(back[k], state[k]) for k in state)


# ----- SDXL key names -----------------------------------------------------------------------------
def test_sdxl_unet_keys_are_kohyas_ldm_names(sdxl_locon):
    _, _, tensors = sdxl_locon
    unet = {n for n in module_names(tensors) if n.startswith("lora_unet_")}
    assert unet and all(re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_\d", n) for n in unet)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k" in unet  # level 1, depth 2
    assert "lora_unet_input_blocks_7_1_transformer_blocks_9_ff_net_2" in unet  # level 2, depth 10
    assert "lora_unet_middle_block_1_transformer_blocks_9_attn1_to_out_0" in unet
    assert "lora_unet_output_blocks_2_2_conv" in unet  # the upsampler A1111 used to drop
    assert "lora_unet_input_blocks_3_0_op" in unet
    assert "lora_unet_output_blocks_8_0_in_layers_2" in unet and "lora_unet_output_blocks_0_0_skip_connection" in unet
    assert "lora_unet_input_blocks_1_0_emb_layers_1" in unet


def test_sd15_unet_keys_stay_diffusers_paths_as_kohya_writes_them(sd15_locon):
    _, _, tensors = sd15_locon
    names = module_names(tensors)
    assert "lora_unet_down_blocks_2_attentions_1_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_up_blocks_0_upsamplers_0_conv" in names
    assert not any("input_blocks" in n for n in names)


def kohya_sdxl_conversion_map() -> dict[str, str]:
    """sd-scripts' ``make_unet_conversion_map`` (library/sdxl_model_util.py), as
    ``convert_diffusers_to_sai_if_needed`` (networks/lora.py) uses it: '.' -> '_', trailing one cut."""
    pairs = []
    for i in range(3):
        for j in range(2):
            pairs.append((f"input_blocks.{3 * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            pairs.append((f"input_blocks.{3 * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(3):
            pairs.append((f"output_blocks.{3 * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            pairs.append((f"output_blocks.{3 * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        pairs.append((f"input_blocks.{3 * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
        pairs.append((f"output_blocks.{3 * i + 2}.2.", f"up_blocks.{i}.upsamplers.0."))
    pairs.append(("middle_block.1.", "mid_block.attentions.0."))
    for j in range(2):
        pairs.append((f"middle_block.{2 * j}.", f"mid_block.resnets.{j}."))
    resnet = [("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("out_layers.0.", "norm2."),
              ("out_layers.3.", "conv2."), ("emb_layers.1.", "time_emb_proj."), ("skip_connection.", "conv_shortcut.")]
    full = []
    for sd, hf in pairs:
        if "resnets" in hf:
            full += [(sd + a, hf + b) for a, b in resnet]
        else:
            full.append((sd, hf))
    return {hf.replace(".", "_")[:-1]: sd.replace(".", "_")[:-1] for sd, hf in full}


def kohya_convert_diffusers_to_sai(names: set[str]) -> set[str]:
    """``convert_diffusers_to_sai_if_needed``: untouched unless a key says down_blocks/up_blocks;
    then the first map entry whose diffusers name is a substring of the module name is replaced."""
    if not any("down_blocks" in n or "up_blocks" in n for n in names):
        return set(names)
    table = kohya_sdxl_conversion_map()
    out = set()
    for name in names:
        if not name.startswith("lora_unet_"):
            out.add(name)
            continue
        module = name[len("lora_unet_"):]
        for hf, sd in table.items():
            if hf in module:
                module = module.replace(hf, sd)
                break
        out.add("lora_unet_" + module)
    return out


def test_kohya_converter_leaves_our_sdxl_keys_alone_and_turns_old_ones_into_them(sdxl_locon):
    _, network, tensors = sdxl_locon
    ours = {n for n in module_names(tensors) if n.startswith("lora_unet_")}
    assert kohya_convert_diffusers_to_sai(ours) == ours
    old = {old for old, new in kohya_format.legacy_names(network).items() if new in ours}
    assert len(old) == len(ours)
    assert kohya_convert_diffusers_to_sai(old) == ours


def kohya_sdxl_lora_module_names(ldm_modules: set[str]) -> set[str]:
    """The module names kohya's LoRANetwork / sdxl_merge_lora build on its SDXL UNet: every Linear
    and Conv2d under Transformer2DModel, ResnetBlock2D, Downsample2D, Upsample2D, named
    ``lora_unet_<path>`` with '.' -> '_'. In kohya's SDXL UNet those blocks sit at
    ``input_blocks.N.0|1``, ``middle_block.N``, ``output_blocks.N.0|1|2`` (library/sdxl_original_unet.py);
    their Linear / Conv2d children are the weights of the LDM state dict."""
    block = re.compile(r"(input_blocks\.\d+\.\d|middle_block\.\d|output_blocks\.\d+\.\d)\.")
    names = set()
    for path in ldm_modules:
        if block.match(path) and not re.search(r"(norm\d?|in_layers\.0|out_layers\.0)$", path):
            names.add("lora_unet_" + path.replace(".", "_"))
    return names


def test_kohya_sdxl_resume_and_merge_find_a_module_for_every_unet_key(sdxl_locon):
    base, _, tensors = sdxl_locon
    kohya = kohya_sdxl_lora_module_names(ldm_unet_modules(clean_unet(base)))
    ours = {n for n in module_names(tensors) if n.startswith("lora_unet_")}
    assert ours <= kohya  # sdxl_merge_lora: "no module found" for none; --network_weights: no unexpected key
    # and kohya's own SDXL LoCon puts a LoRA on exactly these (ours is kohya's default target set)
    assert ours == kohya


def test_resume_reads_old_diffusers_spelled_sdxl_files(sdxl):
    _, network = network_for(sdxl, seed=1)
    tensors = kohya_format.state_dict(network, "fp32")
    old_spelling = {v: k for k, v in kohya_format.legacy_names(network).items()}
    old_file = {old_spelling.get(k.split(".")[0], k.split(".")[0]) + "." + k.split(".", 1)[1]: v
                for k, v in tensors.items()}
    assert any("down_blocks" in k for k in old_file)
    _, fresh = network_for(sdxl, seed=2)
    kohya_format.load_state_dict(fresh, old_file, "old.safetensors")
    again = kohya_format.state_dict(fresh, "fp32")
    assert set(again) == set(tensors) and all(torch.equal(again[k], tensors[k]) for k in tensors)


# ----- A1111 / Forge (extensions-builtin/Lora/networks.py) ----------------------------------------
_A1111_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1",
                 "conv_shortcut": "skip_connection"}


def a1111_compvis_name(key: str) -> str:
    """``convert_diffusers_name_to_compvis``: fixed SD1 numbering ``1 + block * 3 + i`` etc."""
    if m := re.match(r"lora_unet_conv_(in|out)$", key):  # LyCORIS' full preset adapts these; LoRA does not
        return "diffusion_model_input_blocks_0_0" if m[1] == "in" else "diffusion_model_out_2"
    if m := re.match(r"lora_unet_time_embedding_linear_(\d+)$", key):
        return f"diffusion_model_time_embed_{int(m[1]) * 2 - 2}"
    if m := re.match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        b, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4]
        rest = _A1111_RESNET.get(rest, rest) if kind == "resnets" else rest
        return f"diffusion_model_input_blocks_{1 + b * 3 + i}_{1 if kind == 'attentions' else 0}_{rest}"
    if m := re.match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", key):
        kind, i, rest = m[1], int(m[2]), m[3]
        rest = _A1111_RESNET.get(rest, rest) if kind == "resnets" else rest
        return f"diffusion_model_middle_block_{1 if kind == 'attentions' else i * 2}_{rest}"
    if m := re.match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        b, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4]
        rest = _A1111_RESNET.get(rest, rest) if kind == "resnets" else rest
        return f"diffusion_model_output_blocks_{b * 3 + i}_{1 if kind == 'attentions' else 0}_{rest}"
    if m := re.match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", key):
        return f"diffusion_model_input_blocks_{3 + int(m[1]) * 3}_0_op"
    if m := re.match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", key):
        b = int(m[1])
        return f"diffusion_model_output_blocks_{2 + b * 3}_{2 if b > 0 else 1}_conv"
    if m := re.match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", key):
        return f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
    if m := re.match(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", key):
        rest = m[2].replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")
        return f"1_model_transformer_resblocks_{m[1]}_{rest}"
    return key


def a1111_match(key: str, mapping: set[str]) -> str | None:
    """``load_network``'s lookup: the converted name, its ``_[qkv]_proj``-less form, then SDXL's
    ``lora_unet`` -> ``diffusion_model`` and ``lora_te1_text_model`` -> ``0_transformer_text_model``."""
    name = a1111_compvis_name(key)
    if name in mapping:
        return name
    if (m := re.match(r"(.*)_([qkv]_proj)$", name)) and m[1] in mapping:
        return m[1]
    if "lora_unet" in key:
        name = key.replace("lora_unet", "diffusion_model")
        return name if name in mapping else None
    if "lora_te1_text_model" in key:
        for replacement in ("0_transformer_text_model", "transformer_text_model"):
            name = key.replace("lora_te1_text_model", replacement)
            if name in mapping:
                return name
    return None


def clip_modules(encoder, prefix: str) -> set[str]:
    """A1111's names for a transformers-layout CLIP text encoder's Linear layers."""
    return {f"{prefix}text_model_encoder_layers_{i}_{part}" for i in range(encoder.config.num_hidden_layers)
            for part in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj",
                         "mlp_fc1", "mlp_fc2")}


def open_clip_modules(layers: int) -> set[str]:
    """SDXL's second encoder in A1111 is OpenCLIP: ``model.transformer.resblocks.N.attn`` (one
    MultiheadAttention with in_proj for q/k/v, plus ``attn.out_proj``) and ``mlp.c_fc`` / ``mlp.c_proj``."""
    return {f"1_model_transformer_resblocks_{i}_{part}" for i in range(layers)
            for part in ("attn", "attn_out_proj", "mlp_c_fc", "mlp_c_proj")}


def test_a1111_matches_every_sd15_key_through_its_fixed_block_numbering(sd15_locon):
    base, _, tensors = sd15_locon
    mapping = {"diffusion_model_" + p.replace(".", "_") for p in ldm_unet_modules(clean_unet(base))}
    mapping |= clip_modules(base.text_encoder, "transformer_")
    unmatched = [k for k in module_names(tensors) if a1111_match(k, mapping) is None]
    assert unmatched == []
    assert a1111_match("lora_unet_up_blocks_0_upsamplers_0_conv", mapping) == "diffusion_model_output_blocks_2_1_conv"


def test_a1111_matches_every_sdxl_key_including_the_first_upsampler(sdxl_locon):
    base, _, tensors = sdxl_locon
    mapping = {"diffusion_model_" + p.replace(".", "_") for p in ldm_unet_modules(clean_unet(base))}
    mapping |= clip_modules(base.text_encoder, "0_transformer_")
    mapping |= open_clip_modules(base.text_encoder_2.config.num_hidden_layers)
    names = module_names(tensors)
    assert [k for k in names if a1111_match(k, mapping) is None] == []
    assert a1111_match("lora_unet_output_blocks_2_2_conv", mapping) == "diffusion_model_output_blocks_2_2_conv"
    # what the old diffusers-path spelling did: the SDXL upsampler landed on the SD1 slot and was dropped
    assert a1111_match("lora_unet_up_blocks_0_upsamplers_0_conv", mapping) is None


# ----- ComfyUI (comfy/lora.py: model_lora_keys_unet / model_lora_keys_clip) ------------------------
def comfy_key_map(base) -> set[str]:
    """ComfyUI's key map: ``lora_unet_`` + every LDM UNet weight path (its UNet is the LDM one), the
    diffusers spellings via ``unet_to_diffusers``, and ``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` +
    ``text_model_encoder_layers_{b}_{q,k,v,out_proj, fc1, fc2}`` for clip_l / clip_g."""
    keys = {"lora_unet_" + p.replace(".", "_") for p in ldm_unet_modules(clean_unet(base))}
    keys |= {"lora_unet_" + k.rsplit(".", 1)[0].replace(".", "_") for k in clean_unet(base).state_dict()}
    parts = ("mlp_fc1", "mlp_fc2", "self_attn_k_proj", "self_attn_q_proj", "self_attn_v_proj", "self_attn_out_proj")
    prefixes = ["lora_te1_", "lora_te2_"] if base.is_sdxl else ["lora_te_"]
    for prefix, encoder in zip(prefixes, base.text_encoders):
        keys |= {f"{prefix}text_model_encoder_layers_{b}_{c}" for b in range(encoder.config.num_hidden_layers)
                 for c in parts}
    return keys


@pytest.mark.parametrize("which", ["sd15_locon", "sdxl_locon"])
def test_comfyui_key_map_has_every_key(which, request):
    base, _, tensors = request.getfixturevalue(which)
    assert sorted(module_names(tensors) - comfy_key_map(base)) == []


# ----- diffusers (load_lora_weights on the tiny pipelines) ----------------------------------------
@pytest.mark.parametrize("which", ["sd15", "sdxl"])
def test_diffusers_load_lora_weights_consumes_every_key_with_our_tensors(which, request, tmp_path):
    from peft.tuners.lora import LoraLayer

    from lorakit.trainer.models import load_pipeline

    folder = request.getfixturevalue(which)
    base, network = network_for(folder, seed=3)
    tensors = kohya_format.state_dict(network, "fp32")
    path = kohya_format.save(tmp_path / "lora.safetensors", tensors, {})
    by_module = {}
    for part in network.parts:
        for name, layer in part.layers.items():
            for path_, module in part.model.named_modules():
                if module is layer:
                    by_module[(part.prefix, path_)] = name
    pipe = load_pipeline(str(folder))
    pipe.load_lora_weights(str(path))
    loaded = 0
    parts = {"lora_unet": pipe.unet, "lora_te": pipe.text_encoder, "lora_te1": pipe.text_encoder,
             "lora_te2": getattr(pipe, "text_encoder_2", None)}
    for (prefix, module_path), name in by_module.items():
        module = parts[prefix].get_submodule(module_path)
        assert isinstance(module, LoraLayer), f"{name}: diffusers put no adapter on {module_path}"
        down = next(iter(module.lora_A.values())).weight
        up = next(iter(module.lora_B.values())).weight
        assert torch.allclose(down, tensors[f"{name}.lora_down.weight"].reshape(down.shape))
        assert torch.allclose(up, tensors[f"{name}.lora_up.weight"].reshape(up.shape))
        assert next(iter(module.scaling.values())) == pytest.approx(0.5)
        loaded += 1
    models = {id(m): m for m in parts.values() if m is not None}.values()
    adapters = sum(isinstance(m, LoraLayer) for model in models for m in model.modules())
    assert loaded == adapters == len(module_names(tensors))


# ----- DoRA: each client's maths on our tensors ---------------------------------------------------
def a1111_dora(orig: torch.Tensor, up, down, alpha: float, dora_scale) -> torch.Tensor:
    """A1111 1.10 ``NetworkModule.finalize_updown`` + ``apply_weight_decompose``: updown scaled by
    alpha / dim, ``W + updown`` normalised over the output axis (one norm per input column), times
    ``dora_scale``; whatever its shape, it broadcasts."""
    updown = (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(orig.shape)
    updown = updown * alpha / down.shape[0]
    merged = updown + orig
    norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
    norm = norm.reshape(merged.shape[1], *[1] * (orig.dim() - 1)).transpose(0, 1)
    return orig + (merged * (dora_scale / norm) - orig)


def comfy_dora(orig: torch.Tensor, up, down, alpha: float, dora_scale) -> torch.Tensor:
    """ComfyUI ``weight_adapter.base.weight_decompose`` at strength 1: output axis when
    ``dora_scale.shape[0] == out`` (norm of the *original* weight), else the input axis (norm of
    the merged weight); plus an epsilon."""
    diff = (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(orig.shape)
    calc = orig + diff * (alpha / down.shape[0])
    if dora_scale.shape[0] == calc.shape[0]:
        norm = orig.reshape(orig.shape[0], -1).norm(dim=1, keepdim=True).reshape(orig.shape[0], *[1] * (orig.dim() - 1))
    else:
        norm = calc.transpose(0, 1).reshape(calc.shape[1], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(calc.shape[1], *[1] * (calc.dim() - 1)).transpose(0, 1)
    return calc * (dora_scale / (norm + torch.finfo(orig.dtype).eps))


def lycoris_dora(orig: torch.Tensor, up, down, alpha: float, dora_scale) -> torch.Tensor:
    """LyCORIS ``LoConModule`` (its default ``wd_on_out=True``): the module's own ``dora_scale``
    has shape (out, 1, ...) and the file's is copied into it (``copy_``: another shape is an error);
    ``apply_weight_decompose`` normalises ``W + diff`` per output row."""
    target = torch.empty(orig.shape[0], *[1] * (orig.dim() - 1))
    target.copy_(dora_scale)  # raises for a (1, in) magnitude
    diff = (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(orig.shape)
    weight = orig + diff * (alpha / down.shape[0])
    norm = weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(weight.shape[0], *[1] * (orig.dim() - 1))
    return weight * (target / (norm + torch.finfo(weight.dtype).eps))


def layer_outputs(network, tensors, client, limit=None):
    """(output of our trained module, output with the client's merged weight) for every layer."""
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(5)
    for name, layer in list(network.layers.items())[:limit]:
        base = layer.get_base_layer()
        w = base.weight.detach().float()
        file = {k.split(".", 1)[1]: v.float() for k, v in tensors.items() if k.split(".")[0] == name}
        merged = client(w, file["lora_up.weight"], file["lora_down.weight"], float(file["alpha"]), file["dora_scale"])
        if isinstance(base, torch.nn.Conv2d):
            x = torch.randn(2, w.shape[1], 5, 5, generator=generator)
            ours = layer(x)
            theirs = F.conv2d(x, merged, base.bias, base.stride, base.padding)
        else:
            x = torch.randn(3, w.shape[1], generator=generator)
            ours = layer(x)
            theirs = F.linear(x, merged, base.bias)
        yield name, ours.detach(), theirs


def ours_merge(orig, up, down, alpha, dora_scale):
    return kohya_format.merged_weight(orig, {"x.lora_up.weight": up, "x.lora_down.weight": down,
                                             "x.alpha": torch.tensor(alpha), "x.dora_scale": dora_scale}, "x")


@pytest.fixture(scope="module", params=["input", "output"])
def dora_network(request, sd15):
    _, network = network_for(sd15, seed=4, dora=True, dora_axis=request.param)
    return request.param, network, kohya_format.state_dict(network, "fp32")


def test_dora_scale_has_the_axis_shape(dora_network):
    axis, network, tensors = dora_network
    for name, layer in network.layers.items():
        weight = layer.get_base_layer().weight
        ones = (1,) * (weight.dim() - 2)
        expected = (1, weight.shape[1], *ones) if axis == "input" else (weight.shape[0], 1, *ones)
        assert tuple(tensors[f"{name}.dora_scale"].shape) == expected


def test_our_merge_is_what_the_trained_layers_compute(dora_network):
    _, network, tensors = dora_network
    for name, ours, theirs in layer_outputs(network, tensors, ours_merge):
        assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("client,exact_on", [(a1111_dora, "input"), (comfy_dora, "input"), (lycoris_dora, "output")])
def test_each_clients_dora_maths_on_our_tensors(dora_network, client, exact_on):
    axis, network, tensors = dora_network
    if axis == exact_on:
        for name, ours, theirs in layer_outputs(network, tensors, client):
            assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-4), name
    elif client is lycoris_dora:
        with pytest.raises(RuntimeError):
            list(layer_outputs(network, tensors, client, limit=1))
    else:  # the other layout: A1111 broadcasts it silently, ComfyUI takes the base weight's norm
        wrong = [name for name, ours, theirs in layer_outputs(network, tensors, client)
                 if not torch.allclose(ours, theirs, atol=1e-4, rtol=1e-3)]
        assert len(wrong) == len(network.layers)


def test_dora_resume_refuses_a_file_of_the_other_axis(sd15):
    from lorakit.plugin_sdk import LorakitError

    _, output_axis = network_for(sd15, seed=6, dora=True, dora_axis="output")
    _, input_axis = network_for(sd15, seed=7, dora=True, dora_axis="input")
    with pytest.raises(LorakitError, match="dora_axis"):
        kohya_format.load_state_dict(input_axis, kohya_format.state_dict(output_axis, "fp32"), "x.safetensors")


# ----- Forge (backend/patcher/lora.py -> packages_3rdparty/comfyui_lora_collection/lora.py) -------
def forge_key_map(base) -> set[str]:
    """Forge dfdcbab6 (2025-06-26): ``backend.patcher.lora`` asks its webui collection first, whose
    ``lora.py`` is empty, so ``model_lora_keys_unet/clip`` are the ComfyUI collection's copies:
    ``lora_unet_`` + every weight of its LDM-layout ``IntegratedUNet2DConditionModel``, the
    diffusers spellings through ``unet_to_diffusers`` (ComfyUI's table), and for the text encoders
    (``clip_l`` / ``clip_g``, transformers 4.46 ``CLIPTextModel`` under ``.transformer``)
    ``lora_te_`` and ``lora_te1_`` -> clip_l, ``lora_te2_`` -> clip_g when clip_l is present. That is
    ComfyUI's map, plus ``lora_te_`` on SDXL's clip_l."""
    keys = comfy_key_map(base)
    if base.is_sdxl:
        parts = ("mlp_fc1", "mlp_fc2", "self_attn_k_proj", "self_attn_q_proj", "self_attn_v_proj", "self_attn_out_proj")
        keys |= {f"lora_te_text_model_encoder_layers_{b}_{c}"
                 for b in range(base.text_encoder.config.num_hidden_layers) for c in parts}
    return keys


def forge_lora_delta(file: dict, shape) -> torch.Tensor:
    """Forge's ``merge_lora_to_weight`` "lora" patch at strength 1: ``alpha / lora_down.shape[0]``
    times ``up.flatten(1) @ down.flatten(1)``, reshaped to the weight."""
    up, down = file["lora_up.weight"].float(), file["lora_down.weight"].float()
    scale = float(file["alpha"]) / down.shape[0] if "alpha" in file else 1.0
    return (up.flatten(1) @ down.flatten(1)).reshape(shape) * scale


@pytest.mark.parametrize("which", ["sd15_locon", "sdxl_locon"])
def test_forge_key_map_has_every_key_and_its_maths_is_ours(which, request):
    base, network, tensors = request.getfixturevalue(which)
    names = module_names(tensors)
    # load_lora_for_models: more than 12 unmatched keys and the whole file is refused ("version mismatch")
    assert sorted(names - forge_key_map(base)) == []
    for name, layer in list(network.layers.items())[:12]:
        weight = layer.get_base_layer().weight
        file = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".")[0] == name}
        merged = kohya_format.merged_weight(weight.detach().float(), tensors, name)
        assert torch.allclose(weight.float() + forge_lora_delta(file, weight.shape), merged, atol=1e-5), name


# ----- LyCORIS network types: the suffixes each client's loader consumes, and its maths ------------
# Suffixes a client's loader takes for a module of that type (per module; anything else is left over).
# A1111 1.10: network_hada / network_lokr / network_ia3 / network_oft ``create_module`` + network.py
# (``alpha``, ``dora_scale``); ComfyUI: comfy/weight_adapter loha.py 17adbb5c, lokr.py 179c2d35,
# oft.py 3684cff3 (no IA3 adapter in __init__.py 0bca89eb); Forge dfdcbab6: comfyui_lora_collection's
# ``load_lora`` (LoRA, LoHa, LoKr, GLoRA, diff/set; no OFT, no IA3).
_LOHA = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha", "dora_scale"}
_LOKR = {"lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha", "dora_scale"}
CLIENT_SUFFIXES = {
    "a1111": {"loha": _LOHA, "lokr": _LOKR, "ia3": {"weight", "on_input", "alpha"}, "diag_oft": {"oft_blocks", "alpha"}},
    "comfyui": {"loha": _LOHA, "lokr": _LOKR, "ia3": set(), "diag_oft": {"oft_blocks", "rescale", "alpha"}},
    "forge": {"loha": _LOHA, "lokr": _LOKR, "ia3": set(), "diag_oft": set()},
}


def lycoris_network_for(base_folder, network_type, seed=0, **extra):
    from lorakit.trainer.lycoris import LycorisNetwork

    values = {"base_model": str(base_folder), "network_type": network_type, "network_dim": 4, "network_alpha": 2,
              "conv_dim": 4, "conv_alpha": 2}
    values.update(extra)
    config = validate_settings(values, "test")
    base = load_base_model(str(base_folder), device="cpu")
    network = LycorisNetwork.create(base, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(p + 0.2 * torch.randn(p.shape, generator=generator))
    return base, network, network.state_dict("fp32")


@pytest.fixture(scope="module")
def lycoris_files(sd15):
    cache = {}

    def get(network_type):
        if network_type not in cache:
            cache[network_type] = lycoris_network_for(sd15, network_type)
        return cache[network_type]

    return get


def lycoris_outputs(network, tensors, client):
    """(the trained LyCORIS module's output, the output with the client's delta merged into the base
    weight) for every module, on a random input. LyCORIS 4.1.3's own ``get_diff_weight`` is not the
    reference: for LoHa it applies ``scale`` twice (``get_weight`` already has it), unlike its forward."""
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(8)
    for name, module in network.layers.items():
        layer = module.org_module[0]
        w = layer.weight.detach().float()
        file = {k.split(".", 1)[1]: v.float() for k, v in tensors.items() if k.split(".")[0] == name}
        merged = w + client(w, file)
        if isinstance(layer, torch.nn.Conv2d):
            x = torch.randn(2, w.shape[1], 5, 5, generator=generator)
            theirs, plain = (F.conv2d(x, v, layer.bias, layer.stride, layer.padding) for v in (merged, w))
        else:
            x = torch.randn(3, w.shape[1], generator=generator)
            theirs, plain = F.linear(x, merged, layer.bias), F.linear(x, w, layer.bias)
        with torch.no_grad():
            ours = module(x)
        yield name, ours, theirs, plain


def webui_loha(w, f):
    """A1111 network_hada / ComfyUI & Forge "loha": (w1a@w1b) * (w2a@w2b) * alpha / w1b.shape[0]."""
    delta = (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])
    return delta.reshape(w.shape) * (float(f["alpha"]) / f["hada_w1_b"].shape[0])


def webui_lokr(w, f):
    """A1111 network_lokr / ComfyUI & Forge "lokr": kron(w1, w2) (w1 unsqueezed for a conv w2), times
    alpha / dim where dim is the rank of a decomposed factor (w2_b, else w1_b), else 1."""
    w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
    w2 = f["lokr_w2"] if "lokr_w2" in f else f["lokr_w2_a"] @ f["lokr_w2_b"]
    dim = f["lokr_w2_b"].shape[0] if "lokr_w2_b" in f else f["lokr_w1_b"].shape[0] if "lokr_w1_b" in f else None
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    scale = float(f["alpha"]) / dim if dim else 1.0
    return torch.kron(w1, w2).reshape(w.shape) * scale


def a1111_ia3(w, f):
    """A1111 network_ia3: ``orig * w``, w on the input axis when ``on_input``, else on the output axis."""
    scale = f["weight"].reshape(1, -1) if f["on_input"].item() else f["weight"].reshape(-1, 1)
    return w * scale


def _cayley(blocks, limit):
    q = blocks - blocks.transpose(1, 2)
    norm = torch.norm(q)
    if limit is not None:
        q = q * limit(norm)
    eye = torch.eye(blocks.shape[1])
    return (eye + q) @ (eye - q).inverse()


def _rotate(w, r):
    k, n, _ = r.shape
    return torch.einsum("k n m, k n ... -> k m ...", r, w.reshape(k, n, *w.shape[1:])).reshape(w.shape) - w


def comfy_oft(w, f):
    """ComfyUI ``OFTAdapter.calculate_weight``: Cayley rotation of skew(oft_blocks), norm clamped to
    ``alpha`` only when alpha > 0, applied per output block."""
    alpha = float(f["alpha"])
    return _rotate(w, _cayley(f["oft_blocks"], (lambda n: min(1.0, alpha / (n + 1e-8))) if alpha > 0 else None))


def a1111_oft(w, f):
    """A1111 network_oft, ``oft_blocks`` = kohya COFT: the skew norm clamped to ``alpha * out_dim``
    always (``torch.clamp(norm, max=constraint)``), so alpha 0 scales the rotation to nothing."""
    constraint = float(f["alpha"]) * w.shape[0]
    return _rotate(w, _cayley(f["oft_blocks"], lambda n: (min(float(n), constraint) + 1e-8) / (float(n) + 1e-8)))


@pytest.mark.parametrize("network_type", ["loha", "lokr", "ia3", "diag_oft"])
def test_lycoris_suffixes_each_client_consumes(lycoris_files, network_type):
    base, network, tensors = lycoris_files(network_type)
    suffixes = {k.split(".", 1)[1] for k in tensors}
    names = module_names(tensors)
    assert names <= comfy_key_map(base) and names <= forge_key_map(base)  # same names as our LoRA files
    mapping = {"diffusion_model_" + p.replace(".", "_") for p in ldm_unet_modules(clean_unet(base))}
    mapping |= clip_modules(base.text_encoder, "transformer_")
    assert [n for n in names if a1111_match(n, mapping) is None] == []
    for client, table in CLIENT_SUFFIXES.items():
        left = suffixes - table[network_type]
        if network_type in ("loha", "lokr") or (client, network_type) in {("a1111", "ia3"), ("a1111", "diag_oft"),
                                                                         ("comfyui", "diag_oft")}:
            assert left == set(), (client, network_type)
        else:  # ComfyUI / Forge have no IA3 loader, Forge no OFT: every key is left over (file refused)
            assert left == suffixes, (client, network_type)
    if network_type == "diag_oft":
        assert all(v.dim() == 3 for k, v in tensors.items() if k.endswith(".oft_blocks"))  # ComfyUI takes ndim 3 only
        assert all(float(v) == 0 for k, v in tensors.items() if k.endswith(".alpha"))  # LyCORIS' constraint: none


@pytest.mark.parametrize("network_type,client,exact", [
    ("loha", webui_loha, True), ("lokr", webui_lokr, True), ("ia3", a1111_ia3, True),
    ("diag_oft", comfy_oft, True), ("diag_oft", a1111_oft, False)])
def test_lycoris_client_maths_on_our_files(lycoris_files, network_type, client, exact):
    _, network, tensors = lycoris_files(network_type)
    checked = changed = 0
    for name, ours, theirs, plain in lycoris_outputs(network, tensors, client):
        checked += 1
        changed += not torch.allclose(ours, plain, atol=1e-4, rtol=1e-3)
        if exact:
            assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-4), name
        else:  # A1111 on LyCORIS' unconstrained Diag-OFT (alpha 0): the rotation is scaled away
            assert torch.allclose(theirs, plain, atol=1e-5), name
    assert checked == len(network.layers)
    assert changed > 10  # the trained layers do differ from the base (1x1 OFT blocks cannot rotate)


def test_lycoris_sdxl_names_are_in_every_clients_map(sdxl):
    """SDXL LoHa (LyCORIS' full preset, LDM names as kohya + LyCORIS write them): every module name
    is one ComfyUI, Forge and A1111 look up (the suffixes are the SD1.5 ones checked above)."""
    base, _, tensors = lycoris_network_for(sdxl, "loha")
    names = module_names(tensors)
    assert sorted(names - comfy_key_map(base)) == [] and sorted(names - forge_key_map(base)) == []
    mapping = {"diffusion_model_" + p.replace(".", "_") for p in ldm_unet_modules(clean_unet(base))}
    mapping |= clip_modules(base.text_encoder, "0_transformer_")
    mapping |= open_clip_modules(base.text_encoder_2.config.num_hidden_layers)
    assert [n for n in names if a1111_match(n, mapping) is None] == []
    assert {"lora_unet_input_blocks_0_0", "lora_unet_out_2", "lora_unet_time_embed_0"} <= names
    assert any(n.startswith("lora_te2_") for n in names)
