"""Tiny Stable Diffusion models with random weights, built and saved locally (no download).

They have the real architecture and file layout of SD1.5 / SDXL (diffusers folders, a CLIP BPE
tokenizer, an 8x VAE) at a size that trains in well under a second per step on a CPU. Their output
is noise; tests use them to prove loading, training and LoRA round trips, never image quality.

    from tests.tiny_models import build_tiny_sd15, build_tiny_sdxl
    folder = build_tiny_sd15(tmp_path / "sd15")           # a diffusers folder
    single = save_tiny_sd15_single_file(folder, tmp_path / "sd15.safetensors")   # original LDM layout
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

# A tokenizer needs a vocabulary: every byte (as CLIP's byte-to-unicode table spells it), alone and
# as a word end, plus a few merges so that BPE really merges. Enough for any caption; no download.
_EXTRA_MERGES = [("t", "h"), ("th", "e</w>"), ("i", "n"), ("a", "n"), ("e", "r</w>"), ("o", "n</w>")]


def _bytes_to_unicode() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tiny_clip_tokenizer(folder: Path, max_length: int = 77) -> Path:
    """Write vocab.json, merges.txt and the tokenizer configs of a small CLIP BPE tokenizer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab[s] = len(vocab)
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    for a, b in _EXTRA_MERGES:
        vocab.setdefault(a + b, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in _EXTRA_MERGES)
    (folder / "merges.txt").write_text(merges, encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
    }), encoding="utf-8")
    return folder


def tiny_tokenizer_vocab_size() -> int:
    return 2 * 256 + len({a + b for a, b in _EXTRA_MERGES}) + 2


def _text_config(projection_dim: int | None = None, hidden_size: int = 32):
    from transformers import CLIPTextConfig

    from transformers import CLIPTokenizer  # noqa: F401  (import check: same package as the model)
    vocab = tiny_tokenizer_vocab_size()
    return CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden_size, intermediate_size=37, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
        projection_dim=projection_dim or hidden_size, bos_token_id=vocab - 2, eos_token_id=vocab - 1,
        pad_token_id=vocab - 1,
    )


def _tiny_vae():
    from diffusers import AutoencoderKL

    # Four blocks, like the real VAE: the latent is 1/8 of the image side with 4 channels.
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64, norm_num_groups=4,
        block_out_channels=(4, 8, 8, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )


def _scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDIMScheduler, DDPMScheduler

    # The scheduler configs of SD1.5 / SDXL (scaled-linear betas, 1000 steps).
    common = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  prediction_type=prediction_type)
    return DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1, **common), DDPMScheduler(**common)


def build_tiny_sd15(path: str | Path, *, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Save a tiny random-weight SD1.5-shaped diffusers pipeline in ``path`` and return ``path``."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = Path(path)
    torch.manual_seed(seed)
    # SD1.5's block layout (v1-inference.yaml / the diffusers config): four levels, two ResNets per
    # down level and three per up level, one transformer block per attention, cross-attention on
    # the first three levels; only the widths are tiny.
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(8, 8, 16, 16), norm_num_groups=4, cross_attention_dim=32, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    vae = _tiny_vae()
    text_encoder = CLIPTextModel(_text_config())
    tok_dir = write_tiny_clip_tokenizer(path / "_tokenizer_src")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    scheduler, _ = _scheduler(prediction_type)
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    _remove_tree(tok_dir)
    return path


def build_tiny_sdxl(path: str | Path, *, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Save a tiny random-weight SDXL-shaped diffusers pipeline (two text encoders) in ``path``."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = Path(path)
    torch.manual_seed(seed)
    te1_hidden, te2_hidden, time_dim = 32, 32, 8
    # SDXL base's block layout: three levels, two ResNets per down level and three per up level,
    # no attention on the first level, transformer depth 2 and 10 on the others (10 in the middle
    # block too), linear projections; only the widths are tiny.
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(8, 8, 16), norm_num_groups=4, attention_head_dim=(2, 2, 4),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        use_linear_projection=True, transformer_layers_per_block=(1, 2, 10),
        cross_attention_dim=te1_hidden + te2_hidden,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + te2_hidden,
    )
    vae = _tiny_vae()
    text_encoder = CLIPTextModel(_text_config(hidden_size=te1_hidden))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(projection_dim=te2_hidden, hidden_size=te2_hidden))
    tok_dir = write_tiny_clip_tokenizer(path / "_tokenizer_src")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    tokenizer_2 = CLIPTokenizer.from_pretrained(tok_dir)
    scheduler, _ = _scheduler(prediction_type)
    pipe = StableDiffusionXLPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, scheduler=scheduler,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    _remove_tree(tok_dir)
    return path


# ----- single-file checkpoints in the original (LDM / "CompVis") key layout --------------------------
# What model sites distribute: one .safetensors with ``model.diffusion_model.*`` (UNet),
# ``first_stage_model.*`` (VAE) and ``cond_stage_model.transformer.*`` (CLIP text encoder). The
# mapping below is the inverse of diffusers' single-file conversion (convert_ldm_unet_checkpoint,
# convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint), written for the block counts of the
# model's own config so that tiny non-standard UNets and VAEs get the right LDM block indices.
_UNET_RESNET_PARTS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
                      "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_UNET_TOP_LEVEL = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                   "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
                   "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_VAE_ATTENTION_PARTS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _unet_key_to_ldm(key: str, config: dict) -> str:
    """One diffusers UNet2DConditionModel key -> its name under ``model.diffusion_model.``."""
    per_block = config["layers_per_block"]
    if not isinstance(per_block, int):
        raise ValueError(f"layers_per_block must be one number for the LDM layout, got {per_block!r}")
    for diffusers_name, ldm_name in _UNET_TOP_LEVEL.items():
        if key.startswith(diffusers_name + "."):
            return ldm_name + key[len(diffusers_name):]

    def resnet(rest: str) -> str:
        part, _, tail = rest.partition(".")
        return f"{_UNET_RESNET_PARTS[part]}.{tail}"

    # LDM numbers the down path as one flat list: input_blocks.0 is conv_in, then each level has
    # layers_per_block (resnet [+ attention]) entries and, except the last level, a downsampler.
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        level, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = 1 + level * (per_block + 1) + layer
        return f"input_blocks.{index}.0.{resnet(rest)}" if kind == "resnets" else f"input_blocks.{index}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{1 + int(m[1]) * (per_block + 1) + per_block}.0.op.{m[2]}"
    # The middle block is resnet, attention, resnet.
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    # The up path has layers_per_block + 1 entries per level; a level's upsampler sits in its last
    # entry, after the resnet (slot 1) or after the resnet and the attention (slot 2).
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        level, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = level * (per_block + 1) + layer
        return f"output_blocks.{index}.0.{resnet(rest)}" if kind == "resnets" else f"output_blocks.{index}.1.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        level = int(m[1])
        slot = 2 if "CrossAttn" in config["up_block_types"][level] else 1
        return f"output_blocks.{level * (per_block + 1) + per_block}.{slot}.conv.{m[2]}"
    raise ValueError(f"no LDM name for UNet weight {key}")


def _vae_key_to_ldm(key: str, tensor: torch.Tensor, config: dict) -> tuple[str, torch.Tensor]:
    """One diffusers AutoencoderKL key (and tensor) -> its name under ``first_stage_model.``."""
    key = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}", tensor
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.{m[2]}", tensor
    # The decoder's up levels are numbered the other way round in LDM.
    last = len(config["up_block_types"]) - 1
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(.+)", key):
        return f"decoder.up.{last - int(m[1])}.block.{m[2]}", tensor
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
        return f"decoder.up.{last - int(m[1])}.upsample.{m[2]}", tensor
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}", tensor
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
        part = _VAE_ATTENTION_PARTS[m[2]]
        # LDM's attention projections are 1x1 convolutions, diffusers' are linear layers.
        if m[3] == "weight" and part != "norm":
            tensor = tensor[:, :, None, None]
        return f"{m[1]}.mid.attn_1.{part}.{m[3]}", tensor
    if re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out|norm_out)\.(weight|bias)", key) \
            or re.fullmatch(r"(post_)?quant_conv\.(weight|bias)", key):
        return key, tensor
    raise ValueError(f"no LDM name for VAE weight {key}")


def save_tiny_sd15_single_file(pipeline_folder: str | Path, target_file: str | Path) -> Path:
    """Write the SD1.5 diffusers pipeline in ``pipeline_folder`` as ONE original-layout .safetensors.

    The result is what a model site distributes (and what ``from_single_file`` converts back):
    ``model.diffusion_model.*``, ``first_stage_model.*`` and ``cond_stage_model.transformer.*``.
    """
    from safetensors.torch import load_file, save_file

    folder, target = Path(pipeline_folder), Path(target_file)
    tensors: dict[str, torch.Tensor] = {}

    def weights(part: str) -> tuple[dict, dict[str, torch.Tensor]]:
        config = json.loads((folder / part / "config.json").read_text(encoding="utf-8"))
        state: dict[str, torch.Tensor] = {}
        for file in sorted((folder / part).glob("*.safetensors")):
            state.update(load_file(str(file)))
        if not state:
            raise FileNotFoundError(f"{folder / part}: no .safetensors weights")
        return config, state

    config, unet = weights("unet")
    for key, tensor in unet.items():
        tensors["model.diffusion_model." + _unet_key_to_ldm(key, config)] = tensor
    config, vae = weights("vae")
    for key, tensor in vae.items():
        name, tensor = _vae_key_to_ldm(key, tensor, config)
        tensors["first_stage_model." + name] = tensor
    _, text_encoder = weights("text_encoder")
    for key, tensor in text_encoder.items():
        # transformers >= 5.6 saves CLIPTextModel without the ``text_model.`` level; LDM files have it.
        name = key if key.startswith("text_model.") else "text_model." + key
        tensors["cond_stage_model.transformer." + name] = tensor
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(target))
    return target


def _remove_tree(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


def write_tiny_images(folder: str | Path, count: int = 4, sizes=((64, 64), (96, 64), (64, 96)), seed: int = 0,
                      caption: str | None = "a photo, red, blue") -> list[Path]:
    """Write ``count`` random RGB PNGs (and same-stem captions) into ``folder``; for dataset tests."""
    import numpy as np
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        w, h = sizes[i % len(sizes)]
        arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        p = folder / f"img{i:03d}.png"
        Image.fromarray(arr).save(p)
        if caption is not None:
            p.with_suffix(".txt").write_text(caption, encoding="utf-8")
        paths.append(p)
    return paths


BLIP_WORDS = ("a an the photo picture image of cat dog woman man girl boy red blue green white black sitting "
              "standing on in with long short hair and at is room street table chair window tree sky water coffee "
              "cup rocket space suit face close up view background light dark small large").split()


def build_tiny_blip(path: str | Path, *, seed: int = 0, image_size: int = 32, width: int = 16, layers: int = 1,
                    heads: int = 2, patch_size: int = 8, weight_std: float = 0.5, subwords: bool = True) -> Path:
    """Save a BLIP captioning model with random weights (real transformers classes) and its processor.

    The tests use the defaults (a 32 px ViT, one-layer decoder); the bench builds a realistic-size one.
    Weights are drawn wider than the init (``weight_std``) so that the sentence depends on the picture.
    """
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *BLIP_WORDS]
    if subwords:
        vocab += [*"abcdefghijklmnopqrstuvwxyz", *("##" + c for c in "abcdefghijklmnopqrstuvwxyz")]
    vocab_file = folder / "_vocab_src.txt"
    vocab_file.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(vocab=str(vocab_file), do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})  # BLIP's decoder start token
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": image_size, "width": image_size}),
                              tokenizer=tokenizer)
    config = BlipConfig(
        vision_config=dict(hidden_size=width, intermediate_size=2 * width if width < 64 else 4 * width,
                           num_hidden_layers=layers, num_attention_heads=heads, image_size=image_size,
                           patch_size=patch_size),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=width,
                         intermediate_size=2 * width if width < 64 else 4 * width, num_hidden_layers=layers,
                         num_attention_heads=heads, max_position_embeddings=128, encoder_hidden_size=width,
                         bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.sep_token_id),
        projection_dim=width,
    )
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0, weight_std)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    vocab_file.unlink()
    return folder
