"""Trainer speed and peak memory: lorakit's trainer beside the diffusers LoRA example's loop, like for like.

The comparator is the training loop of diffusers' ``examples/text_to_image/train_text_to_image_lora.py``
re-implemented here with the same library calls (accelerate, peft ``add_adapter``, the example's
transforms, AdamW, ``DDPMScheduler.add_noise``, ``F.mse_loss``, ``accelerator.backward``,
``clip_grad_norm_``). Both sides do the same work per step and train the same modules:

- LoRA rank 32, alpha 16 on the UNet only (no text-encoder LoRA) and on the same layers: every
  Linear and 1x1 conv inside the UNet's transformer blocks (attention to_q/to_k/to_v/to_out.0,
  ff.net.0.proj, ff.net.2, proj_in, proj_out: kohya's set, what lorakit trains). The example's own
  list is attention only; its ``target_modules`` is widened to this set, since lorakit has no
  attention-only setting. The bench checks both sides train the same number of parameters.
- each step loads the batch's images on the main thread (the example's default
  ``dataloader_num_workers=0``), resizes (Lanczos) and centre-crops them, VAE-encodes them and runs
  the text encoder; with ``--cache-latents`` both sides encode every latent once before training.
- fp32 on the CPU, the same batch size, resolution, AdamW (lr 1e-4, weight decay 0.01), constant
  LR, gradient clipping at 1.0, no gradient checkpointing (``--checkpointing``: on both).

Each run is a fresh subprocess (so peak RSS, VmHWM, is that side's own), run in pairs interleaved
lorakit, comparator, lorakit, comparator ...; the first ``--warmup`` steps of every run are excluded
from the timing on both sides, and the report gives the median ratio lorakit / comparator with its
min and max for seconds per step and peak memory, the load average around every run, and where each
side's step time goes (data + VAE, text encoder, noise + UNet forward + loss, backward, clipping,
optimiser, the rest).

    python bench/bench_train.py                         # small: tiny random SD1.5 at 64 px (a minute)
    python bench/bench_train.py --full                  # full-size SD1.5, random weights, 512 px (CPU: long)
    python bench/bench_train.py --full --pairs 2 --warmup 1 --steps 3
    python bench/bench_train.py --kohya ~/sd-scripts    # also kohya sd-scripts' train_network.py loop
    python bench/bench_train.py --json out.json

Random weights: speed and memory equal real weights' (the same shapes); nothing is downloaded.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RANK, ALPHA, LEARNING_RATE, WEIGHT_DECAY, MAX_GRAD_NORM, SEED = 32, 16, 1e-4, 1e-2, 1.0, 0
CAPTION = "bench, a photo of a cat on a sofa, red"
# The Linear and 1x1 conv layers inside the UNet's transformer blocks (peft full-matches this regex).
KOHYA_UNET_LAYERS = (r".*attentions\.\d+\.(transformer_blocks\.\d+\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)"
                     r"|transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)|proj_in|proj_out)")
PHASES = ("data+vae", "text encoder", "noise+unet+loss", "backward", "clip", "optimizer")


# ----- models and data ---------------------------------------------------------------------------------
def build_full_sd15(path: Path) -> Path:
    """A full-size SD1.5 diffusers folder with random weights (SD1.5's configs, written here; no download)."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from tests.tiny_models import _scheduler, tiny_tokenizer_vocab_size, write_tiny_clip_tokenizer

    if (path / "model_index.json").is_file():
        return path
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=512)
    vocab = tiny_tokenizer_vocab_size()  # the tokenizer is tiny; the text encoder has SD1.5's shape otherwise
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=vocab, hidden_size=768, intermediate_size=3072,
                                                num_hidden_layers=12, num_attention_heads=12,
                                                max_position_embeddings=77, hidden_act="quick_gelu",
                                                bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1))
    tokenizer = CLIPTokenizer.from_pretrained(write_tiny_clip_tokenizer(path / "_tok"))
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=_scheduler()[0], safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def sample_photos():
    """Real photographs from scikit-image's sample data (a random-noise fallback without it)."""
    import numpy as np
    from PIL import Image

    try:
        from skimage import data
        photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.hubble_deep_field(),
                  data.immunohistochemistry()]
        return [Image.fromarray(p).convert("RGB") for p in photos]
    except Exception:  # scikit-image missing or without its data
        rng = np.random.default_rng(0)
        return [Image.fromarray(rng.integers(0, 256, (600, 600, 3), dtype=np.uint8)) for _ in range(6)]


def build_dataset(root: Path, size: int, count: int) -> Path:
    """``count`` square photos 1.5x the training size (both sides downscale with Lanczos and centre-crop),
    a caption .txt beside each, and lorakit's manifest."""
    import hashlib

    from PIL import Image

    from lorakit.manifest import ImageRecord, Manifest
    from lorakit.plugin_sdk import Subset

    if (root / ".done").is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(root=root, resolution=size)
    manifest.subsets["bench"] = Subset(name="bench", repeats=1)
    photos = sample_photos()
    side = size * 3 // 2
    for i in range(count):
        photo = photos[i % len(photos)]
        short = min(photo.size)
        left, top = (photo.width - short) // 2, (photo.height - short) // 2
        square = photo.crop((left, top, left + short, top + short)).resize((side, side), Image.Resampling.LANCZOS)
        if i >= len(photos):
            square = square.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        path = root / f"{i:03d}.png"
        square.save(path)
        path.with_suffix(".txt").write_text(CAPTION, encoding="utf-8")
        manifest.images.append(ImageRecord(path=path.name, caption=CAPTION, subset="bench", width=side, height=side,
                                           sha256=hashlib.sha256(path.read_bytes()).hexdigest()))
    manifest.save()
    (root / ".done").write_text("")
    return root


# ----- timing helpers shared by both sides ----------------------------------------------------------------
class Phases:
    """Wall time spent in named phases, as (name, start, end) events; summed later over the timed window."""

    def __init__(self):
        self.events: list[tuple[str, float, float]] = []

    def wrap(self, owner, attribute: str, name: str) -> None:
        original = getattr(owner, attribute)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.events.append((name, start, time.perf_counter()))

        setattr(owner, attribute, timed)

    def add(self, name: str, start: float) -> None:
        self.events.append((name, start, time.perf_counter()))

    def window(self, start: float, end: float, steps: int) -> dict[str, float]:
        """Seconds per step of each phase inside [start, end]."""
        totals = dict.fromkeys(PHASES, 0.0)
        for name, a, b in self.events:
            if a >= start and b <= end:
                totals[name] = totals.get(name, 0.0) + (b - a)
        return {name: seconds / steps for name, seconds in totals.items()}


def wrap_accelerate(phases: Phases) -> None:
    """The same accelerate calls are timed on both sides (class-level, before anything is prepared)."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    phases.wrap(Accelerator, "backward", "backward")
    phases.wrap(Accelerator, "clip_grad_norm_", "clip")
    phases.wrap(AcceleratedOptimizer, "step", "optimizer")


def timing_result(starts: list[float], end: float, warmup: int, phases: Phases) -> dict:
    """Seconds per step from the start of the first timed step to the end of the last one."""
    timed = starts[warmup:]
    steps = len(timed)
    per_step = (end - timed[0]) / steps
    intervals = [b - a for a, b in zip(timed, timed[1:] + [end])]
    breakdown = phases.window(timed[0], end, steps)
    breakdown["other"] = per_step - sum(breakdown.values())
    return {"seconds_per_step": per_step, "step_seconds": intervals, "timed_steps": steps, "phases": breakdown}


# ----- the contenders (each run in its own subprocess) ------------------------------------------------------
def lorakit_settings(opts) -> dict:
    return {
        "base_model": opts.model, "resolution": opts.size, "batch_size": opts.batch,
        "max_train_steps": opts.warmup + opts.steps, "network_dim": RANK, "network_alpha": ALPHA,
        "train_unet": True, "train_text_encoder": False, "mixed_precision": "no", "device": "cpu" if opts.cpu else "auto",
        "gradient_checkpointing": opts.checkpointing, "optimizer": "adamw", "learning_rate": LEARNING_RATE,
        "weight_decay": WEIGHT_DECAY, "lr_scheduler": "constant", "max_grad_norm": MAX_GRAD_NORM,
        "enable_bucket": False, "cache_latents": "memory" if opts.cache_latents else "none", "seed": SEED,
    }


def run_lorakit(opts) -> dict:
    import io

    from rich.console import Console

    from lorakit.trainer.api import train, validate_settings
    from lorakit.trainer.loop import Trainer

    phases = Phases()
    wrap_accelerate(phases)
    phases.wrap(Trainer, "batch_inputs", "data+vae")
    phases.wrap(Trainer, "encode_prompts", "text encoder")
    phases.wrap(Trainer, "loss", "noise+unet+loss")
    starts: list[float] = []
    ends: list[float] = []
    seen: dict = {}
    accumulate, save_lora, setup = Trainer.accumulate, Trainer.save_lora, Trainer.setup

    def step_start(self, *args, **kwargs):
        starts.append(time.perf_counter())
        return accumulate(self, *args, **kwargs)

    def run_end(self, *args, **kwargs):  # the final save comes right after the last step
        if not ends:
            ends.append(time.perf_counter())
        return save_lora(self, *args, **kwargs)

    def keep(self, *args, **kwargs):
        setup(self, *args, **kwargs)
        seen["trainer"] = self

    Trainer.accumulate, Trainer.save_lora, Trainer.setup = step_start, run_end, keep
    settings = {**lorakit_settings(opts), "output": str(Path(tempfile.mkdtemp()) / "bench.safetensors")}
    train(Path(opts.dataset), validate_settings(settings, "bench"), console=Console(file=io.StringIO()))
    result = timing_result(starts, ends[0], opts.warmup, phases)
    result["trained_parameters"] = seen["trainer"].network.count_parameters()
    result["trained_layers"] = len(seen["trainer"].network.layers)
    return result


def comparator_settings(opts) -> dict:
    return {
        "loop": "diffusers examples/text_to_image/train_text_to_image_lora.py (re-implemented)",
        "lora": {"r": RANK, "lora_alpha": ALPHA, "init_lora_weights": "gaussian", "target_modules": KOHYA_UNET_LAYERS},
        "text_encoder_lora": False, "resolution": opts.size, "center_crop": True, "random_flip": False,
        "image_interpolation_mode": "lanczos", "train_batch_size": opts.batch, "dataloader_num_workers": 0,
        "max_train_steps": opts.warmup + opts.steps, "mixed_precision": "no", "gradient_checkpointing": opts.checkpointing,
        "optimizer": f"torch.optim.AdamW(lr={LEARNING_RATE}, betas=(0.9, 0.999), weight_decay={WEIGHT_DECAY}, eps=1e-8)",
        "lr_scheduler": "constant", "max_grad_norm": MAX_GRAD_NORM,
        "latents": "cached once (latent_dist.mean)" if opts.cache_latents else "VAE-encoded each step", "seed": SEED,
    }


def run_comparator(opts) -> dict:
    """The example's loop: load the parts, add the peft LoRA, AdamW, DataLoader, then per step encode,
    noise, predict, MSE, backward, clip, step (as train_text_to_image_lora.py does at default options)."""
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig
    from PIL import Image
    from torchvision import transforms
    from transformers import CLIPTextModel, CLIPTokenizer

    phases = Phases()
    wrap_accelerate(phases)
    accelerator = Accelerator(mixed_precision="no", cpu=opts.cpu)
    set_seed(SEED)
    model = opts.model
    noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    unet.requires_grad_(False)
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    weight_dtype = torch.float32
    unet_lora_config = LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian",
                                  target_modules=KOHYA_UNET_LAYERS)
    unet.to(accelerator.device, dtype=weight_dtype)
    vae.to(accelerator.device, dtype=weight_dtype)
    text_encoder.to(accelerator.device, dtype=weight_dtype)
    unet.add_adapter(unet_lora_config)
    lora_layers = [p for p in unet.parameters() if p.requires_grad]
    if opts.checkpointing:
        unet.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(lora_layers, lr=LEARNING_RATE, betas=(0.9, 0.999), weight_decay=WEIGHT_DECAY,
                                  eps=1e-08)

    train_transforms = transforms.Compose([
        transforms.Resize(opts.size, interpolation=transforms.InterpolationMode.LANCZOS),
        transforms.CenterCrop(opts.size),
        transforms.Lambda(lambda x: x),
        transforms.ToTensor(),
        transforms.Normalize([0.5], [0.5]),
    ])
    files = sorted(Path(opts.dataset).glob("*.png"))

    class ImageCaptions(torch.utils.data.Dataset):
        """The example's ``imagefolder`` dataset with its ``preprocess_train`` transform."""

        def __len__(self):
            return len(files)

        def __getitem__(self, index):
            with Image.open(files[index]) as image:
                pixels = train_transforms(image.convert("RGB"))
            caption = files[index].with_suffix(".txt").read_text(encoding="utf-8")
            ids = tokenizer([caption], max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                            return_tensors="pt").input_ids[0]
            return {"pixel_values": pixels, "input_ids": ids, "index": index}

    def collate_fn(examples):
        pixel_values = torch.stack([example["pixel_values"] for example in examples])
        pixel_values = pixel_values.to(memory_format=torch.contiguous_format).float()
        input_ids = torch.stack([example["input_ids"] for example in examples])
        return {"pixel_values": pixel_values, "input_ids": input_ids,
                "index": torch.tensor([example["index"] for example in examples])}

    train_dataloader = torch.utils.data.DataLoader(ImageCaptions(), shuffle=True, collate_fn=collate_fn,
                                                   batch_size=opts.batch, num_workers=0)
    max_train_steps = opts.warmup + opts.steps
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0,
                                 num_training_steps=max_train_steps)
    unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(unet, optimizer, train_dataloader,
                                                                          lr_scheduler)
    cached = None
    if opts.cache_latents:  # both sides then encode every image once, before training
        with torch.no_grad():
            cached = [vae.encode(ImageCaptions()[i]["pixel_values"][None].to(accelerator.device)).latent_dist.mean[0]
                      for i in range(len(files))]

    starts: list[float] = []
    global_step = 0
    unet.train()
    while global_step < max_train_steps:
        batches = iter(train_dataloader)
        while global_step < max_train_steps:
            starts.append(time.perf_counter())
            batch = next(batches, None)
            if batch is None:
                starts.pop()
                break
            with accelerator.accumulate(unet):
                if cached is not None:
                    latents = torch.stack([cached[i] for i in batch["index"].tolist()])
                else:
                    latents = vae.encode(batch["pixel_values"].to(dtype=weight_dtype)).latent_dist.sample()
                latents = latents * vae.config.scaling_factor
                phases.add("data+vae", starts[-1])
                began = time.perf_counter()
                noise = torch.randn_like(latents)
                bsz = latents.shape[0]
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device)
                timesteps = timesteps.long()
                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                phases.add("noise+unet+loss", began)
                began = time.perf_counter()
                encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]
                phases.add("text encoder", began)
                began = time.perf_counter()
                target = noise
                model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
                loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
                phases.add("noise+unet+loss", began)
                avg_loss = accelerator.gather(loss.repeat(opts.batch)).mean()
                float(avg_loss.item())
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(lora_layers, MAX_GRAD_NORM)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            global_step += 1
    end = time.perf_counter()
    result = timing_result(starts, end, opts.warmup, phases)
    result["trained_parameters"] = sum(p.numel() for p in lora_layers)
    result["trained_layers"] = sum(1 for name, _ in accelerator.unwrap_model(unet).named_modules()
                                   if name.endswith(".lora_A"))
    return result


def kohya_arguments(opts, data: Path, out: Path) -> list[str]:
    """sd-scripts train_network.py at the same settings (its networks.lora trains kohya's layer set)."""
    args = ["--pretrained_model_name_or_path", opts.model, "--train_data_dir", str(data), "--output_dir", str(out),
            "--output_name", "bench", "--resolution", f"{opts.size},{opts.size}", "--train_batch_size", str(opts.batch),
            "--max_train_steps", str(opts.warmup + opts.steps), "--network_module", "networks.lora",
            "--network_dim", str(RANK), "--network_alpha", str(ALPHA), "--network_train_unet_only",
            "--optimizer_type", "AdamW", "--learning_rate", str(LEARNING_RATE),
            "--optimizer_args", f"weight_decay={WEIGHT_DECAY}", "--lr_scheduler", "constant",
            "--max_grad_norm", str(MAX_GRAD_NORM), "--mixed_precision", "no", "--save_precision", "fp16",
            "--save_model_as", "safetensors", "--seed", str(SEED), "--caption_extension", ".txt", "--sdpa",
            "--max_data_loader_n_workers", "0"]
    if opts.cache_latents:
        args.append("--cache_latents")
    if opts.checkpointing:
        args.append("--gradient_checkpointing")
    # kohya reads the tokenizer by hub id; its tokenizer cache folder points that id at the model's own.
    tokenizers = out / "tokenizers"
    args += ["--tokenizer_cache_dir", str(tokenizers)]
    return args


def kohya_tokenizer(source: Path, folder: Path) -> None:
    """The model's tokenizer as vocab.json + merges.txt, the files kohya's (slow) CLIPTokenizer reads."""
    import shutil

    from tokenizers import Tokenizer

    folder.mkdir(parents=True)
    if (source / "vocab.json").is_file():
        for file in source.iterdir():
            shutil.copy(file, folder / file.name)
        return
    Tokenizer.from_file(str(source / "tokenizer.json")).model.save(str(folder))
    config = json.loads((source / "tokenizer_config.json").read_text(encoding="utf-8"))
    config = {k: v for k, v in config.items() if k in ("model_max_length", "bos_token", "eos_token", "unk_token",
                                                         "pad_token")}
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "CLIPTokenizer"}))


def run_kohya(opts) -> dict:
    """kohya's own loop, run in this process through runpy, timed at accelerate's optimiser step."""
    import runpy

    from accelerate.optimizer import AcceleratedOptimizer

    phases = Phases()
    wrap_accelerate(phases)
    ends: list[float] = []
    step = AcceleratedOptimizer.step

    def stamped(self, *args, **kwargs):
        result = step(self, *args, **kwargs)
        ends.append(time.perf_counter())
        return result

    AcceleratedOptimizer.step = stamped
    checkout = Path(opts.kohya).expanduser().resolve()
    data = Path(tempfile.mkdtemp(prefix="kohya_data_"))
    (data / "1_bench").mkdir()
    for png in sorted(Path(opts.dataset).glob("*.png")):
        for source in (png, png.with_suffix(".txt")):
            (data / "1_bench" / source.name).symlink_to(source)
    sys.path.insert(0, str(checkout))
    os.chdir(checkout)
    out = Path(tempfile.mkdtemp(prefix="kohya_out_"))
    (out / "tokenizers").mkdir()
    kohya_tokenizer(Path(opts.model) / "tokenizer", out / "tokenizers" / "openai_clip-vit-large-patch14")
    sys.argv = ["train_network.py", *kohya_arguments(opts, data, out)]
    runpy.run_path(str(checkout / "train_network.py"), run_name="__main__")
    if len(ends) < opts.warmup + opts.steps:
        raise RuntimeError(f"kohya ran {len(ends)} optimiser steps, expected {opts.warmup + opts.steps}")
    # Each step is timed from the end of the one before it (warm-up >= 1 gives that boundary).
    starts = ends[opts.warmup - 1:opts.warmup + opts.steps - 1]
    return timing_result(starts, ends[opts.warmup + opts.steps - 1], 0, phases)


def peak_rss_gb() -> float:
    """This process's own peak resident memory (VmHWM; ru_maxrss would carry the parent's over exec)."""
    import resource

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024 ** 2
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def child(opts) -> None:
    import torch

    if opts.threads:
        torch.set_num_threads(opts.threads)
    run = {"lorakit": run_lorakit, "comparator": run_comparator, "kohya": run_kohya}[opts.child]
    result = run(opts)
    result["peak_rss_gb"] = peak_rss_gb()
    result["torch_threads"] = torch.get_num_threads()
    if torch.cuda.is_available() and not opts.cpu:
        result["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1024 ** 3
    print("RESULT " + json.dumps(result), flush=True)


# ----- the parent: pairs, ratios, report ----------------------------------------------------------------------
def measure(side: str, opts, model: Path, dataset: Path) -> dict:
    python = opts.kohya_python if side == "kohya" else sys.executable
    cmd = [python, __file__, "--child", side, "--model", str(model), "--dataset", str(dataset),
           "--size", str(opts.size), "--batch", str(opts.batch), "--steps", str(opts.steps),
           "--warmup", str(opts.warmup), "--threads", str(opts.threads)]
    cmd += [flag for flag, on in (("--checkpointing", opts.checkpointing), ("--cache-latents", opts.cache_latents),
                                  ("--cpu", opts.cpu)) if on]
    if side == "kohya":
        cmd += ["--kohya", str(opts.kohya)]
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[7:])
            result["load_before"], result["load_after"] = load_before, os.getloadavg()[0]
            result["process_seconds"] = time.perf_counter() - started
            return result
    raise RuntimeError(f"{side} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")


def spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.3f}x (min {min(values):.3f}, max {max(values):.3f})"


def phase_table(runs: dict[str, list[dict]]) -> str:
    """Median seconds per step of each phase, per side, and lorakit minus the comparator."""
    sides = list(runs)
    names = [*PHASES, "other"]
    lines = [f"{'phase (s/step, median)':<24}" + "".join(f"{s:>13}" for s in sides) + f"{'lorakit-comp':>14}"]
    for name in [*names, "total"]:
        values = []
        for side in sides:
            if name == "total":
                values.append(statistics.median(r["seconds_per_step"] for r in runs[side]))
            else:
                values.append(statistics.median(r["phases"].get(name, 0.0) for r in runs[side]))
        diff = values[0] - values[1] if len(values) > 1 else 0.0
        lines.append(f"{name:<24}" + "".join(f"{v:>13.4f}" for v in values) + f"{diff:>+14.4f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="full-size SD1.5 (random weights) at 512 px")
    parser.add_argument("--pairs", type=int, default=0, help="interleaved pairs (default: 5 small, 2 full)")
    parser.add_argument("--warmup", type=int, default=0, help="untimed steps per run (default: 3 small, 1 full)")
    parser.add_argument("--steps", type=int, default=0, help="timed steps per run (default: 12 small, 3 full)")
    parser.add_argument("--batch", type=int, default=1, help="batch size (both sides)")
    parser.add_argument("--size", type=int, default=0, help="resolution (default: 64 small, 512 full)")
    parser.add_argument("--cache-latents", action="store_true", help="both sides encode the latents once, up front")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on both sides")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in each run, both sides (default 1: on a shared, loaded machine more "
                             "threads spin against each other; 0 = torch's default)")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even with a GPU")
    parser.add_argument("--kohya", type=Path, help="a local kohya-ss/sd-scripts checkout: run its train_network.py too")
    parser.add_argument("--kohya-python", default=sys.executable,
                        help="the Python that runs kohya (a venv with sd-scripts' pinned transformers/diffusers)")
    parser.add_argument("--model", help="a diffusers SD1.5 folder to use instead of building one")
    parser.add_argument("--work", type=Path, help="keep the built model and dataset here (re-used next time)")
    parser.add_argument("--json", type=Path, help="write every run's figures here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--dataset", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.child:
        child(opts)
        return
    opts.pairs = opts.pairs or (2 if opts.full else 5)
    opts.warmup = opts.warmup or (1 if opts.full else 3)
    opts.steps = opts.steps or (3 if opts.full else 12)
    opts.size = opts.size or (512 if opts.full else 64)
    import torch

    from tests.tiny_models import build_tiny_sd15

    work = opts.work or Path(tempfile.mkdtemp(prefix="bench_train_"))
    work.mkdir(parents=True, exist_ok=True)
    if opts.model:
        model = Path(opts.model)
    elif opts.full:
        model = build_full_sd15(work / "sd15-full")
    else:
        model = work / "sd15-tiny"
        if not (model / "model_index.json").is_file():
            build_tiny_sd15(model)
    dataset = build_dataset(work / f"photos{opts.size}", opts.size, max(8, opts.batch * 4))
    sides = ["lorakit", "comparator"]
    if opts.kohya:
        if not (opts.full or opts.model):
            print("kohya: skipped in the small mode (sd-scripts builds its own fixed-size SD1.5 UNet and cannot load "
                  "the tiny model); use --full")
        elif (opts.kohya / "train_network.py").is_file():
            sides.append("kohya")
        else:
            print(f"kohya: {opts.kohya} has no train_network.py (not an sd-scripts checkout); kohya skipped")
    else:
        print("kohya: skipped (sd-scripts is not on the package registry; pass --kohya PATH to a local checkout)")
    on_gpu = torch.cuda.is_available() and not opts.cpu
    print(f"device: {'cuda ' + torch.cuda.get_device_name() if on_gpu else f'cpu, {os.cpu_count()} cores'}; "
          f"torch {torch.__version__}; model {'full-size SD1.5' if opts.full else 'tiny SD1.5'} (random weights) "
          f"{model}; {opts.pairs} pairs, {opts.warmup} warm-up + {opts.steps} timed steps per run")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    shared = {k: getattr(opts, k) for k in ("size", "batch", "warmup", "steps", "cache_latents", "checkpointing")}
    print("settings, both sides:", json.dumps(shared))
    print("lorakit train settings:", json.dumps({k: v for k, v in lorakit_settings(
        argparse.Namespace(**{**vars(opts), "model": str(model)})).items() if k != "base_model"}))
    print("comparator:", json.dumps(comparator_settings(opts)))
    if "kohya" in sides:
        print("kohya train_network.py", " ".join(kohya_arguments(opts, Path("DATA"), Path("OUT"))))
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for pair in range(opts.pairs):
        for side in sides:
            result = measure(side, opts, model, dataset)
            runs[side].append(result)
            print(f"pair {pair + 1} {side:<10} {result['seconds_per_step']:.4f} s/step, peak RSS "
                  f"{result['peak_rss_gb']:.2f} GB, trained parameters {result.get('trained_parameters', '?')}, "
                  f"load {result['load_before']:.2f}->{result['load_after']:.2f}; s/step by phase: "
                  + ", ".join(f"{name} {seconds:.3f}" for name, seconds in result["phases"].items()), flush=True)
            if opts.json:  # written after every run: a long full-size run keeps what it measured so far
                opts.json.write_text(json.dumps({"runs": runs}, indent=2))
        ours, theirs = runs["lorakit"][-1], runs["comparator"][-1]
        if ours["trained_parameters"] != theirs["trained_parameters"]:
            raise SystemExit(f"not like for like: lorakit trains {ours['trained_parameters']} parameters, "
                             f"the comparator {theirs['trained_parameters']}")
    time_ratios = [a["seconds_per_step"] / b["seconds_per_step"] for a, b in zip(runs["lorakit"], runs["comparator"])]
    rss_ratios = [a["peak_rss_gb"] / b["peak_rss_gb"] for a, b in zip(runs["lorakit"], runs["comparator"])]
    print(f"\nlorakit / comparator over {opts.pairs} pairs: time per step {spread(time_ratios)}; "
          f"peak RSS {spread(rss_ratios)}")
    if "kohya" in runs:
        kohya_ratios = [a["seconds_per_step"] / b["seconds_per_step"] for a, b in zip(runs["lorakit"], runs["kohya"])]
        kohya_rss = [a["peak_rss_gb"] / b["peak_rss_gb"] for a, b in zip(runs["lorakit"], runs["kohya"])]
        print(f"lorakit / kohya: time per step {spread(kohya_ratios)}; peak RSS {spread(kohya_rss)}")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print(phase_table(runs))
    if opts.json:
        opts.json.write_text(json.dumps({"settings": shared, "lorakit": lorakit_settings(
            argparse.Namespace(**{**vars(opts), "model": str(model)})), "comparator": comparator_settings(opts),
            "runs": runs, "time_ratios": time_ratios, "rss_ratios": rss_ratios}, indent=2))


if __name__ == "__main__":
    main()
