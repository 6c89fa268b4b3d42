"""Tiny Stable Diffusion models with random weights, built and saved locally (no download).

They have the real architecture and file layout of SD1.5 / SDXL (diffusers folders, a CLIP BPE
tokenizer, an 8x VAE) at a size that trains in well under a second per step on a CPU. Their output
is noise; tests use them to prove loading, training and LoRA round trips, never image quality.

    from tests.tiny_models import build_tiny_sd15, build_tiny_sdxl
    folder = build_tiny_sd15(tmp_path / "sd15")           # a diffusers folder
    single = export_tiny_sd15_single_file(folder, tmp_path / "sd15.safetensors")
"""
from __future__ import annotations

import json
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
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
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
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), norm_num_groups=8, attention_head_dim=(2, 4),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        use_linear_projection=True, transformer_layers_per_block=(1, 2),
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
