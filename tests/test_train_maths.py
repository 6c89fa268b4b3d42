"""The trainer's maths and options, each checked against an independent formula (kohya's meaning)."""
from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from rich.console import Console
from rich.progress import Progress

from lorakit.trainer.loop import Trainer
from tests.test_train import make_dataset, settings
from tests.tiny_models import build_tiny_sd15


def quiet():
    return Console(file=io.StringIO(), width=120)


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    return build_tiny_sd15(tmp_path_factory.mktemp("models") / "sd15")


@pytest.fixture(scope="module")
def square_dataset(tmp_path_factory):
    # make_dataset cycles 64x64, 96x64, 64x128: images 0 and 3 share the 64x64 bucket.
    return make_dataset(tmp_path_factory.mktemp("data") / "square", subsets=(("outfit", 4, 1),))


def prepared(dataset: Path, config) -> Trainer:
    """A trainer with its models, network, optimiser and latent cache ready, before the first step."""
    trainer = Trainer(dataset, config, quiet())
    trainer.setup()
    with Progress(console=quiet()) as progress:
        trainer.fill_latent_cache(progress)
    return trainer


def fixed_noise(latents: torch.Tensor, generator: torch.Generator):
    """Noise and timestep that depend on the image only, not on how images are batched."""
    noise = [torch.randn(latent.shape, generator=torch.Generator().manual_seed(int(latent.abs().sum() * 1000) % 2**31))
             for latent in latents]
    return torch.stack(noise).to(latents.device), torch.full((latents.shape[0],), 500, device=latents.device)


def gradients(trainer: Trainer) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in trainer.network.parameters()]


# ----- gradient accumulation ---------------------------------------------------------------------
def test_k_micro_batches_give_the_gradient_of_one_batch_k_times_the_size(sd15, square_dataset, tmp_path):
    # One trainer at a time: accelerate keeps its gradient state in a process-wide singleton.
    one = prepared(square_dataset, settings(sd15, tmp_path / "a.safetensors", batch_size=2))
    pair = [i for i, image in enumerate(one.data_.images) if image.bucket == (64, 64)][:2]
    assert len(pair) == 2
    one.sample_noise = fixed_noise
    one.accumulate([tuple(pair)], epoch=0, first_index=0)
    big = gradients(one)
    del one
    two = prepared(square_dataset, settings(sd15, tmp_path / "b.safetensors", batch_size=1,
                                            gradient_accumulation_steps=2))
    two.sample_noise = fixed_noise
    two.accumulate([(pair[0],), (pair[1],)], epoch=0, first_index=0)
    accumulated = gradients(two)
    assert any(g.abs().max() > 0 for g in big)
    for expected, got in zip(big, accumulated):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-8)


# ----- several processes -------------------------------------------------------------------------
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_follow_the_whole_lr_schedule(sd15, tmp_path):
    """A real two-process CPU run (gloo): the linear schedule is half way at half the steps, 0 at the end.

    accelerate steps the scheduler once per process per optimiser step; built for the per-process
    step count, the schedule would reach 0 half way through.
    """
    import json
    import os
    import subprocess
    import sys

    dataset = make_dataset(tmp_path / "data")  # 4 images x 2 repeats = 8 batches, 4 per process
    out = tmp_path / "lora.safetensors"
    # torchrun, as accelerate's multi-process launcher does (``accelerate launch --cpu`` starts one
    # process unless mpirun is set up); accelerate then joins the processes over gloo.
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "lorakit", "train", str(dataset),
               "--base-model", str(sd15), "--output", str(out), "--resolution", "64", "--min-bucket-reso", "32",
               "--max-bucket-reso", "128", "--bucket-reso-steps", "32", "--network-dim", "2", "--network-alpha", "1",
               "--epochs", "2", "--learning-rate", "0.01", "--lr-scheduler", "linear", "--save-every-n-epochs", "1",
               "--save-state", "--device", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    half = json.loads((tmp_path / "lora-000001-state" / "state.json").read_text())
    end = json.loads((tmp_path / "lora-state" / "state.json").read_text())
    total, base = 8 // 2 * 2, 0.01  # 4 optimiser steps per epoch (8 batches over 2 processes), 2 epochs
    assert (half["global_step"], end["global_step"]) == (total // 2, total)
    linear = lambda step: base * (total - step) / total  # diffusers' linear schedule without warm-up
    assert half["learning_rates"] == pytest.approx([linear(4)] * 2)
    assert end["learning_rates"] == pytest.approx([linear(8)] * 2, abs=1e-12)
