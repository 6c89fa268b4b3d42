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
