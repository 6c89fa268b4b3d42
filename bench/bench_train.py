"""Trainer speed and peak memory: lorakit's trainer side by side with a diffusers-example LoRA loop.

The baseline is what a user would otherwise run: the loop of diffusers' ``train_text_to_image_lora``
example (peft LoRA on the UNet attention, AdamW, epsilon MSE), on the same model, images, batch
size and device. Both run in their own subprocess (so peak memory is each one's own), in the same
invocation, and the report gives ratios.

    python bench/bench_train.py                  # tiny random SD1.5 (CPU seconds)
    python bench/bench_train.py --full           # + full-size SD1.5 (random weights) at 512, a few steps
    python bench/bench_train.py --full --sdxl    # + full-size SDXL at 1024 (GPU only)
    python bench/bench_train.py --json out.json

Timings exclude model loading and latent caching: seconds per step are taken between the first and
the last step (the median interval; the first step warms up). Random weights: speed and memory equal real weights'.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# ----- models and data ---------------------------------------------------------------------------------
def build_full_sd15(path: Path) -> Path:
    """A full-size SD1.5 diffusers folder with random weights (the real configs, not downloaded)."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from tests.tiny_models import _scheduler, tiny_tokenizer_vocab_size, write_tiny_clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=512)
    vocab = tiny_tokenizer_vocab_size()
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


def build_dataset(root: Path, size: int, count: int) -> Path:
    import numpy as np
    from PIL import Image

    from lorakit.manifest import ImageRecord, Manifest
    from lorakit.plugin_sdk import Subset

    root.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(root=root, resolution=size)
    manifest.subsets["bench"] = Subset(name="bench", repeats=1)
    rng = np.random.default_rng(0)
    for i in range(count):
        path = root / f"{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        manifest.images.append(ImageRecord(path=path.name, caption="bench, a photo, red", subset="bench", width=size,
                                           height=size, sha256=hashlib.sha256(path.read_bytes()).hexdigest()))
    manifest.save()
    return root


def _median_interval(stamps: list[float]) -> float:
    """Median seconds between consecutive steps (robust to a busy shared machine)."""
    import statistics

    return statistics.median(b - a for a, b in zip(stamps, stamps[1:]))


# ----- the two contenders (each run in a subprocess) -------------------------------------------------------
def run_lorakit(model: str, dataset: str, size: int, batch: int, steps: int, precision: str, checkpointing: bool) -> dict:
    import io

    from rich.console import Console

    from lorakit.trainer.api import train, validate_settings
    from lorakit.trainer.loop import Trainer

    stamps: list[float] = []
    original = Trainer.loss

    def timed(self, *args, **kwargs):
        stamps.append(time.perf_counter())
        return original(self, *args, **kwargs)

    Trainer.loss = timed
    out = Path(tempfile.mkdtemp()) / "bench.safetensors"
    config = validate_settings({
        "base_model": model, "output": str(out), "resolution": size, "batch_size": batch, "max_train_steps": steps,
        "network_dim": 32, "network_alpha": 16, "mixed_precision": precision, "gradient_checkpointing": checkpointing,
        "lr_scheduler": "constant", "min_bucket_reso": min(256, size), "bucket_reso_steps": min(64, size // 2),
    }, "bench")
    train(Path(dataset), config, console=Console(file=io.StringIO()))
    return {"seconds_per_step": _median_interval(stamps)}


def run_diffusers_example(model: str, dataset: str, size: int, batch: int, steps: int, precision: str,
                          checkpointing: bool) -> dict:
    """The loop of diffusers' train_text_to_image_lora example, written out (UNet attention LoRA, rank 32)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32) if device == "cuda" else torch.float32
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=dtype).to(device)
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae").to(device)
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", torch_dtype=dtype).to(device)
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=32, lora_alpha=16, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    files = sorted(Path(dataset).glob("*.png"))[:batch]
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 127.5 - 1)
                          .permute(2, 0, 1) for f in files]).to(device)
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        ids = tokenizer(["bench, a photo, red"] * batch, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(device)
        context = text_encoder(ids)[0]
    stamps = []
    for _ in range(steps):
        stamps.append(time.perf_counter())
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=device)
        noisy = scheduler.add_noise(latents, noise, t)
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            pred = unet(noisy.to(dtype), t, context).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
    if device == "cuda":
        torch.cuda.synchronize()
    stamps.append(time.perf_counter())
    return {"seconds_per_step": _median_interval(stamps[1:])}


def _peak_rss_gb() -> float:
    """This process's own peak resident memory (VmHWM; ru_maxrss would carry the parent's over exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024 ** 2
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def child(args) -> None:
    import torch

    fn = run_lorakit if args.child == "lorakit" else run_diffusers_example
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = fn(args.model, args.dataset, args.size, args.batch, args.steps, args.precision, args.checkpointing)
    result["peak_rss_gb"] = _peak_rss_gb()
    if torch.cuda.is_available():
        result["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1024 ** 3
    print("RESULT " + json.dumps(result))


def measure(contender: str, model: Path, dataset: Path, size: int, batch: int, steps: int, precision: str,
            checkpointing: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", contender, "--model", str(model), "--dataset", str(dataset),
           "--size", str(size), "--batch", str(batch), "--steps", str(steps), "--precision", precision]
    if checkpointing:
        cmd.append("--checkpointing")
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{contender} failed:\n{proc.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="also full-size SD1.5 at 512 (slow on a CPU)")
    parser.add_argument("--sdxl", action="store_true", help="also full-size SDXL at 1024 (GPU; not built here)")
    parser.add_argument("--steps", type=int, default=0, help="steps per measurement (default: 12 tiny, 3 full)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--child")
    parser.add_argument("--model")
    parser.add_argument("--dataset")
    parser.add_argument("--size", type=int)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--precision", default="no")
    parser.add_argument("--checkpointing", action="store_true")
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    import torch

    from tests.tiny_models import build_tiny_sd15

    on_gpu = torch.cuda.is_available()
    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    cases = [("tiny SD1.5", build_tiny_sd15(work / "tiny"), 64, args.steps or 12)]
    if args.full:
        cases.append(("SD1.5 full size", build_full_sd15(work / "sd15"), 512, args.steps or 3))
    if args.sdxl:
        print("SDXL full size: not built by this script yet (see docs/trainer.md); skipped")
    results = []
    print(f"device: {'cuda ' + torch.cuda.get_device_name() if on_gpu else f'cpu, {os.cpu_count()} cores'}; "
          f"torch {torch.__version__}")
    for name, model, size, steps in cases:
        dataset = build_dataset(work / f"data{size}", size, 4)
        variants = [(1, "no", False)]
        if on_gpu:
            variants = [(b, p, c) for b in (1, 4) for p in ("fp16", "bf16") for c in (False, True)]
        for batch, precision, checkpointing in variants:
            ours = measure("lorakit", model, dataset, size, batch, steps, precision, checkpointing)
            base = measure("diffusers-example", model, dataset, size, batch, steps, precision, checkpointing)
            row = {"model": name, "size": size, "batch": batch, "precision": precision if on_gpu else "fp32",
                   "checkpointing": checkpointing, "lorakit": ours, "diffusers_example": base,
                   "time_ratio": ours["seconds_per_step"] / base["seconds_per_step"],
                   "rss_ratio": ours["peak_rss_gb"] / base["peak_rss_gb"]}
            results.append(row)
            print(f"{name} {size}px batch {batch} {row['precision']} ckpt={checkpointing}: lorakit "
                  f"{ours['seconds_per_step']:.3f} s/it ({1 / ours['seconds_per_step']:.2f} it/s), peak RSS "
                  f"{ours['peak_rss_gb']:.2f} GB | diffusers example {base['seconds_per_step']:.3f} s/it, "
                  f"{base['peak_rss_gb']:.2f} GB | ratio time {row['time_ratio']:.2f}x, memory {row['rss_ratio']:.2f}x",
                  flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
