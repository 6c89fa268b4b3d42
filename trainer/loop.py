"""The training loop: one readable training step, epochs, saving, resuming, sampling, logging.

The maths of a step is written out in ``Trainer.loss`` (diffusers training-example style): noise
the latents at a random timestep, predict the noise (or the velocity), weight the per-image loss.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.plugin_sdk import LorakitError, pick_device

from . import kohya_format
from .data import LatentCache, TrainingData, build_training_data, load_mask, make_caption
from .lycoris import LycorisNetwork, create_network, load_network_state_dict, network_state_dict
from .optim import make_optimizer, make_scheduler
from .prompts import MAX_TOKEN_LENGTHS, chunk_ids, join_chunks, token_count
from .plan import make_plan, render, schedule


class TrainingStopped(LorakitError):
    """The run stopped on its own (NaN or infinite loss); the message says what was kept."""


@dataclass
class StepResult:
    loss: float
    lr: float


def resolve_precision(config, device: str) -> str:
    """``no``/``fp16``/``bf16``: mixed precision runs on CUDA only; the CPU trains in fp32."""
    if not device.startswith("cuda"):
        return "no"  # the CPU trains in fp32 (the plan says so)
    if config.mixed_precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return config.mixed_precision


def training_noise_scheduler(scheduler_config, zero_terminal_snr: bool = False):
    """DDPM's forward process with the model's betas; ``zero_terminal_snr`` rescales them so that the
    last timestep is pure noise (Lin et al. 2023, as kohya's ``--zero_terminal_snr``)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(scheduler_config, rescale_betas_zero_snr=zero_terminal_snr)


def epoch_file(output: Path, epoch: int) -> Path:
    return output.with_name(f"{output.stem}-{epoch:06d}.safetensors")


def state_folder(output: Path, epoch: int | None = None) -> Path:
    return output.with_name(f"{output.stem}-{epoch:06d}-state" if epoch is not None else f"{output.stem}-state")


def default_output(dataset: Path) -> Path:
    folder = dataset if dataset.is_dir() else dataset.parent
    return folder.parent / f"{folder.name}.safetensors"


def load_manifest(dataset: Path):
    """The manifest of a dataset folder / manifest file / kohya folder (through the foundation's import)."""
    import lorakit.manifest as manifest_module

    loader = getattr(manifest_module, "load_dataset", None)
    if loader is not None:
        return loader(dataset)
    return manifest_module.Manifest.load(dataset)


# Settings that change where things go or how they are shown, not what is trained.
NOT_IN_FINGERPRINT = {"output", "resume", "logging_dir", "device", "cache_dir", "cache_latents", "model_type",
                      "sample_every_n_epochs", "sample_prompts", "sample_steps"}


def run_record(output: Path) -> Path:
    """``name.run.json`` beside the LoRA: the fingerprint of the run that wrote it and its files."""
    return output.with_name(f"{output.stem}.run.json")


class Trainer:
    def __init__(self, dataset: Path, config, console=None, force: bool = False):
        from rich.console import Console

        self.dataset = Path(dataset)
        self.config = config
        self.console = console or Console(stderr=True)
        self.output = Path(config.output) if config.output else default_output(self.dataset)
        self.manifest = load_manifest(self.dataset)
        self.force = force
        self.device = pick_device(config.device)
        self.precision = resolve_precision(config, self.device)
        from .config import config_warnings

        for warning in config_warnings(config):
            self.console.print(f"[yellow]warning[/yellow]: {warning}")

    # ----- re-runs --------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """A hash of what the LoRA is trained from: every image (bytes, caption, repeats, mask) and the settings."""
        import hashlib

        images = [[r.path, r.sha256, r.caption, r.repeats, bool(r.is_reg), r.mask, r.subset]
                  for r in self.manifest.images]
        subsets = {name: repr(sub) for name, sub in sorted(self.manifest.subsets.items())}
        settings = {k: v for k, v in sorted(self.config.values.items()) if k not in NOT_IN_FINGERPRINT}
        text = json.dumps({"images": images, "subsets": subsets, "settings": settings}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    def existing_outputs(self) -> list[Path]:
        """The files and state folders this run would write that are already there."""
        pattern = [self.output, state_folder(self.output)]
        pattern += sorted(self.output.parent.glob(f"{self.output.stem}-[0-9]*"))
        return [p for p in pattern if p.exists()]

    def already_trained(self) -> bool:
        """True when the output is from a run with the same dataset and settings (say so; --force retrains).
        Raises when the output (or its epoch files/state) is from another run: it is never overwritten unasked."""
        if self.force or self.config.resume:
            return False
        record_file = run_record(self.output)
        try:
            record = json.loads(record_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            record = None
        existing = self.existing_outputs()
        fingerprint = self.fingerprint()
        if record and record.get("fingerprint") == fingerprint and self.output.is_file():
            self.console.print(f"already trained: {self.output} is from this dataset with these settings "
                               "(nothing to do; --force retrains)")
            return True
        if existing:
            why = "another dataset or other settings" if record else "a run lorakit has no record of"
            raise LorakitError(f"{existing[0]} exists, from {why}; pass --force to overwrite it, set another "
                               "output, or --resume a saved state")
        return False

    def write_run_record(self) -> None:
        from lorakit.plugin_sdk import atomic_write_text

        if self.accelerator.is_main_process:
            atomic_write_text(run_record(self.output), json.dumps({
                "fingerprint": self.fingerprint(), "output": self.output.name,
                "files": sorted(p.name for p in self.existing_outputs())}, indent=2))

    # ----- planning -----------------------------------------------------------------------------
    def resolution(self, is_sdxl: bool) -> int:
        return self.config.resolution or self.manifest.resolution or (1024 if is_sdxl else 512)

    def data(self, is_sdxl: bool) -> TrainingData:
        return build_training_data(self.manifest, self.config, self.resolution(is_sdxl), use_masks=self.config.masked_loss)

    def plan(self):
        from lorakit.plugin_sdk import ModelNotFound

        from .models import STANDARD_PARAMETERS, describe_base_model

        config = self.config
        hint = config.model_type
        if not config.base_model and not hint:
            raise LorakitError("train settings: 'base_model' is required (a .safetensors file, diffusers folder or hub id)")
        try:
            # The file header, the folder's configs or the hub cache say what the model is; no weights are read.
            model = describe_base_model(config.base_model) if config.base_model else None
        except ModelNotFound as exc:
            if not hint:
                raise LorakitError(f"{exc}. For a plan without the weights, pass --model-type sd15 or sdxl") from None
            model = None
        if model is None or (hint and not model.get("counted")):
            is_sdxl = hint == "sdxl" if hint else model["is_sdxl"]
            model = {"is_sdxl": is_sdxl, **STANDARD_PARAMETERS[is_sdxl], "counted": False}
        data = self.data(model["is_sdxl"])
        return make_plan(self.manifest, data, config, model, self.device,
                         self.precision if self.precision != "no" else "fp32", output=self.output)

    def dry_run(self):
        plan = self.plan()
        render(plan, self.console)
        return plan

    # ----- setup --------------------------------------------------------------------------------
    def setup(self) -> None:
        from accelerate import Accelerator

        from .models import load_base_model

        config = self.config
        if not config.base_model:
            raise LorakitError("train settings: 'base_model' is required (a .safetensors file, diffusers folder or hub id)")
        # Gradient accumulation is done by ``accumulate`` (the loss of each micro-batch divided by their
        # count); the Accelerator is not told about it, or ``backward`` would divide a second time.
        self.accelerator = Accelerator(mixed_precision=self.precision, cpu=self.device == "cpu")
        device = self.accelerator.device
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision, torch.float32)
        self.base = load_base_model(config.base_model, vae=config.vae, device=str(device), dtype=self.weight_dtype,
                                    v_prediction=config.v_prediction, config=config.base_config)
        self.base.noise_scheduler = training_noise_scheduler(self.base.noise_scheduler.config, config.zero_terminal_snr)
        if self.base.vae.dtype != torch.float32:
            self.base.vae.to(device, torch.float32)  # the VAE encodes in fp32 (the SDXL VAE overflows in fp16)
        self.base.vae.requires_grad_(False)
        self.data_ = self.data(self.base.is_sdxl)
        self.warn_about_cut_captions()
        torch.manual_seed(config.seed)  # LoRA initialisation
        self.network = create_network(self.base, config, console=self.console)
        # The trained parameters, gathered once (clipping needs them every step; resuming copies in place).
        self.trained_parameters = self.network.parameters()
        if config.gradient_checkpointing:
            self.base.unet.enable_gradient_checkpointing()
            for encoder in self.base.text_encoders:
                if self.network.trains_text_encoder():
                    enable = getattr(encoder, "activation_checkpointing_enable", None) or encoder.gradient_checkpointing_enable
                    enable()
        self.steps_per_epoch, self.epochs, self.total_steps = schedule(
            self.data_.batches_per_epoch(), config, self.accelerator.num_processes)
        groups = self.network.parameter_groups()
        self.optimizer = make_optimizer(config.optimizer, groups, weight_decay=config.weight_decay,
                                        extra=config.optimizer_args, device=str(device))
        # accelerate steps a prepared scheduler once per process at each optimiser step, so the schedule
        # is built for steps x processes (as kohya does); otherwise it would end after 1/N of the run.
        processes = self.accelerator.num_processes
        self.lr_scheduler = make_scheduler(config.lr_scheduler, self.optimizer,
                                           warmup_steps=config.lr_warmup_steps * processes,
                                           total_steps=self.total_steps * processes, cycles=config.lr_scheduler_cycles)
        models = [self.base.unet, *self.base.text_encoders]
        prepared = self.accelerator.prepare(*models, self.optimizer, self.lr_scheduler)
        self.unet, self.text_encoders = prepared[0], list(prepared[1:len(models)])
        self.optimizer, self.lr_scheduler = prepared[len(models)], prepared[len(models) + 1]
        self.global_step = 0
        self.start_epoch = 0
        self.session_id = kohya_format.new_session_id()
        self.started_at = time.time()
        self.saved: list[Path] = []
        self.writer = None
        if config.logging_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise LorakitError("logging_dir needs tensorboard: pip install tensorboard") from None
            self.writer = SummaryWriter(str(Path(config.logging_dir) / f"{self.output.stem}-{self.session_id}"))

    def fill_latent_cache(self, progress) -> None:
        config = self.config
        folder = Path(config.cache_dir) if config.cache_dir else self.manifest.root / ".lorakit-cache" / "latents"
        self.cache = LatentCache(self.base.vae, config.cache_latents, folder if config.cache_latents == "disk" else None,
                                 str(self.accelerator.device))
        if config.cache_latents != "none":
            work = sum(2 if i.flip_aug else 1 for i in self.data_.images)
            task = progress.add_task("caching latents", total=work, info="")
            self.cache.fill(self.data_, progress=lambda: progress.advance(task))
            progress.remove_task(task)
            if self.device.startswith("cuda") and config.sample_every_n_epochs is None:
                self.base.vae.to("cpu")  # every latent is cached: free the GPU memory

    # ----- one training step ----------------------------------------------------------------------
    def encode_prompts(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text encoder hidden states (and SDXL's pooled embedding) for a batch of captions."""
        device = self.accelerator.device
        base = self.base
        grad = torch.enable_grad() if self.network.trains_text_encoder() else torch.no_grad()
        length = self.config.max_token_length
        with grad:
            if not base.is_sdxl:
                ids = chunk_ids(base.tokenizer, captions, length).to(device)
                batch, chunks = ids.shape[:2]
                out = self.text_encoders[0](ids.reshape(batch * chunks, -1),
                                            output_hidden_states=self.config.clip_skip > 1)
                if self.config.clip_skip == 1:
                    return join_chunks(out.last_hidden_state, batch, chunks), None
                # clip skip N: the Nth-from-last layer, through the final layer norm (as A1111 does).
                hidden = out.hidden_states[-self.config.clip_skip]
                encoder = self.accelerator.unwrap_model(self.text_encoders[0])
                final_norm = getattr(encoder, "text_model", encoder).final_layer_norm  # transformers 5: no text_model
                return join_chunks(final_norm(hidden), batch, chunks), None
            states = []
            pooled = None
            for tokenizer, encoder in zip(base.tokenizers, self.text_encoders):
                ids = chunk_ids(tokenizer, captions, length).to(device)
                batch, chunks = ids.shape[:2]
                out = encoder(ids.reshape(batch * chunks, -1), output_hidden_states=True)
                states.append(join_chunks(out.hidden_states[-2], batch, chunks))  # SDXL: the penultimate layer
                if hasattr(out, "text_embeds"):
                    pooled = out.text_embeds[::chunks]  # the first chunk's pooled embedding, as kohya
            return torch.cat(states, dim=-1), pooled

    def warn_about_cut_captions(self) -> None:
        """Captions longer than max_token_length lose their tail: say how many and what to set."""
        limit = self.config.max_token_length
        tokenizer = self.base.tokenizer
        counts = {}
        for image in self.data_.images:
            caption = image.caption.replace(image.keep_tokens_separator or "|||", ",")
            caption = " ".join(t for t in (image.caption_prefix, caption, image.caption_suffix) if t)
            counts[image.path] = token_count(tokenizer, caption)
        cut = [(path, n) for path, n in counts.items() if n > limit]
        if cut:
            path, n = max(cut, key=lambda pair: pair[1])
            longer = [x for x in MAX_TOKEN_LENGTHS if x > limit and x >= n] or [MAX_TOKEN_LENGTHS[-1]]
            self.console.print(
                f"[yellow]warning[/yellow]: {len(cut)} of {len(counts)} captions are longer than max_token_length "
                f"{limit} and lose their last tags (longest: {path.name}, {n} tokens); set max_token_length {longer[0]}")

    def loss(self, latents: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor | None,
             time_ids: torch.Tensor | None, weights: torch.Tensor, masks: torch.Tensor | None,
             generator: torch.Generator) -> torch.Tensor:
        """The diffusion loss of one batch (latents already scaled by the VAE factor)."""
        config = self.config
        scheduler = self.base.noise_scheduler
        device = latents.device

        # 1-2. Noise and a random timestep per image (``sample_noise``), then the forward process q(x_t | x_0).
        noise, timesteps = self.sample_noise(latents, generator)
        input_noise = noise
        if config.ip_noise_gamma:
            # Input perturbation: noise the input a little more than the target says.
            strength = config.ip_noise_gamma
            if config.ip_noise_gamma_random_strength:
                strength = torch.rand(1, generator=generator).item() * config.ip_noise_gamma
            input_noise = noise + strength * torch.randn(latents.shape, generator=generator).to(device)
        noisy = scheduler.add_noise(latents, input_noise, timesteps)
        # 3. The prediction and its target: the noise (epsilon) or the velocity v = a_t * eps - s_t * x_0.
        added = {"text_embeds": pooled, "time_ids": time_ids} if self.base.is_sdxl else None
        with self.accelerator.autocast():
            prediction = self.unet(noisy.to(self.weight_dtype), timesteps, context.to(self.weight_dtype),
                                   added_cond_kwargs=added).sample
        target = scheduler.get_velocity(latents, noise, timesteps) if self.base.v_prediction else noise
        prediction = prediction.float()
        # 4. The element-wise loss: L2, or Huber / smooth L1 with a timestep-dependent c.
        error = prediction - target
        if config.loss_type == "l2":
            loss = error ** 2
        else:
            c = self.huber_c(timesteps).view(-1, 1, 1, 1)
            smooth = torch.sqrt(error ** 2 + c ** 2) - c
            loss = 2 * c * smooth if config.loss_type == "huber" else 2 * smooth
        # 5. Masked loss: only the white parts of the mask count.
        if masks is not None:
            loss = loss * masks
        loss = loss.mean(dim=(1, 2, 3))
        # 6. Per-image weights: the prior-loss weight of regularisation images, then the SNR weights
        #    (min-SNR, v-pred scaling, v-pred-like loss, debiased estimation; ``snr_weights``).
        loss = loss * weights
        if self.weights_by_snr():
            loss = loss * self.snr_weights(timesteps)
        return loss.mean()

    def weights_by_snr(self) -> bool:
        """Whether a setting weights the loss by the SNR (otherwise every weight is 1 and is skipped)."""
        config = self.config
        return bool(config.min_snr_gamma or config.scale_v_pred_loss_like_noise_pred or config.v_pred_like_loss
                    or config.debiased_estimation_loss)

    def sample_noise(self, latents: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The noise and a timestep per image, as kohya draws them.

        Noise offset shifts each channel (darker darks, brighter brights); its strength may be drawn
        in 0..noise_offset and grow with the latent's mean (adaptive). Multires noise adds coarser
        noise at random scales and normalises to unit variance. Timesteps are uniform in
        [min_timestep, max_timestep).
        """
        config = self.config
        device, (batch, channels, height, width) = latents.device, latents.shape
        noise = torch.randn(latents.shape, generator=generator).to(device)
        if config.noise_offset:
            offset = config.noise_offset
            if config.noise_offset_random_strength:
                offset = torch.rand(1, generator=generator).item() * config.noise_offset
            if config.adaptive_noise_scale is not None:
                mean = latents.mean(dim=(2, 3), keepdim=True).abs()
                offset = torch.clamp(offset + config.adaptive_noise_scale * mean, min=0.0)
            noise = noise + offset * torch.randn((batch, channels, 1, 1), generator=generator).to(device)
        if config.multires_noise_iterations:
            upsample = torch.nn.Upsample(size=(height, width), mode="bilinear")
            for i in range(config.multires_noise_iterations):
                r = torch.rand(1, generator=generator).item() * 2 + 2  # each level 2-4 times coarser
                h, w = max(1, int(height / r ** i)), max(1, int(width / r ** i))
                noise = noise + upsample(torch.randn((batch, channels, h, w), generator=generator)).to(device) \
                    * config.multires_noise_discount ** i
                if h == 1 or w == 1:
                    break
            noise = noise / noise.std()
        steps = self.base.noise_scheduler.config.num_train_timesteps
        low = config.min_timestep or 0
        high = steps if config.max_timestep is None else config.max_timestep
        if low < high:
            timesteps = torch.randint(low, high, (batch,), generator=generator)
        else:
            timesteps = torch.full((batch,), high)
        return noise, timesteps.long().to(device)

    def snr_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The per-image loss weight from the signal-to-noise ratio: min-SNR, v-pred scaling,
        v-pred-like loss and debiased estimation, in kohya's order (``post_process_loss``)."""
        config = self.config
        v_prediction = self.base.v_prediction
        alphas_cumprod = self.base.noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
        snr = alphas_cumprod / (1 - alphas_cumprod)
        weight = torch.ones_like(snr)
        if config.min_snr_gamma:
            clipped = torch.clamp(snr, max=config.min_snr_gamma)
            weight = weight * (clipped / (snr + 1) if v_prediction else clipped / snr.clamp(min=1e-12))
        capped = torch.clamp(snr, max=1000)  # SNR at t = 0 is huge; kohya caps it at 1000
        v_scale = capped / (capped + 1)
        if config.scale_v_pred_loss_like_noise_pred:
            weight = weight * v_scale
        if config.v_pred_like_loss:
            weight = weight * (1 + config.v_pred_like_loss / v_scale.clamp(min=1e-12))
        if config.debiased_estimation_loss:
            weight = weight * (1 / (capped + 1) if v_prediction else 1 / capped.clamp(min=1e-12).sqrt())
        return weight

    def huber_c(self, timesteps: torch.Tensor) -> torch.Tensor:
        config = self.config
        scheduler = self.base.noise_scheduler
        if config.huber_schedule == "constant":
            return torch.full(timesteps.shape, config.huber_c, device=timesteps.device)
        if config.huber_schedule == "exponential":
            rate = -math.log(config.huber_c) / scheduler.config.num_train_timesteps
            return torch.exp(-rate * timesteps.float())
        alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        return (1 - config.huber_c) / (1 + sigmas) ** 2 + config.huber_c

    def batch_inputs(self, batch: tuple[int, ...], epoch: int, batch_index: int):
        """Latents, captions, SDXL size conditioning, loss weights and masks of one batch."""
        config = self.config
        device = self.accelerator.device
        images = [self.data_.images[index] for index in batch]
        rngs = [random.Random(f"{config.seed}:{epoch}:{batch_index}:{position}") for position in range(len(batch))]
        # Each image's own generator draws its flip, then its crop, then (below) its caption's shuffles.
        flips = [bool(image.flip_aug and rng.random() < 0.5) for image, rng in zip(images, rngs)]
        crops = [image.crop_for_sample(rng) for image, rng in zip(images, rngs)]  # the centre, or random_crop's
        if self.cache.mode == "none":  # encoded now, the whole batch in one VAE call, left on the device
            stacked = self.cache.encode(images, flips, crops)
        else:
            stacked = torch.stack([self.cache.get(image, flip, crop)
                                   for image, flip, crop in zip(images, flips, crops)]).to(device)
        height, width = stacked.shape[2:]
        captions, time_ids, weights, masks = [], [], [], []
        for image, rng, flip, crop in zip(images, rngs, flips, crops):
            captions.append(make_caption(image, rng, step=self.global_step, token_warmup_min=config.token_warmup_min,
                                         token_warmup_step=config.token_warmup_step, epoch=epoch + 1))
            time_ids.append(image.time_ids(flip))  # SDXL: kohya's original size, crop top/left, target size
            weights.append(config.prior_loss_weight if image.is_reg else 1.0)
            if config.masked_loss:
                if image.mask is not None:
                    masks.append(load_mask(image, (width, height), flip, crop))
                else:
                    masks.append(torch.ones(1, height, width))
        vae_config = self.base.vae.config
        shift = getattr(vae_config, "shift_factor", None) or 0.0
        stacked = (stacked - shift) * vae_config.scaling_factor if shift else stacked * vae_config.scaling_factor
        return (stacked, captions, torch.tensor(time_ids, dtype=torch.float32, device=device),
                torch.tensor(weights, dtype=torch.float32, device=device),
                torch.stack(masks).to(device) if masks else None)

    # ----- saving and resuming ------------------------------------------------------------------------
    def save_lora(self, path: Path, epoch: int) -> Path:
        config = self.config
        tensors = network_state_dict(self.network, config.save_precision)
        meta = kohya_format.metadata(config=config, data=self.data_, manifest=self.manifest, base=self.base,
                                     network=self.network, epoch=epoch, step=self.global_step,
                                     max_steps=self.total_steps, started_at=self.started_at,
                                     session_id=self.session_id, output_name=self.output.stem, tensors=tensors,
                                     num_epochs=self.epochs, mixed_precision=self.precision,
                                     num_processes=self.accelerator.num_processes)
        if isinstance(self.network, LycorisNetwork):
            meta.update(self.network.metadata())
        if self.accelerator.is_main_process:
            kohya_format.save(path, tensors, meta)
        return path

    def save_state(self, folder: Path, epoch: int) -> None:
        """Everything needed to go on exactly where this left off: weights, optimiser, scheduler, counters."""
        if not self.accelerator.is_main_process:
            return
        from lorakit.plugin_sdk import atomic_path, atomic_write_text

        folder.mkdir(parents=True, exist_ok=True)
        kohya_format.save(folder / "lora.safetensors", network_state_dict(self.network, "fp32"), {})
        with atomic_path(folder / "optimizer.pt") as tmp:
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.lr_scheduler.state_dict(),
                        "scaler": self.accelerator.scaler.state_dict() if self.accelerator.scaler else None}, tmp)
        atomic_write_text(folder / "state.json", json.dumps({
            "epoch": epoch, "global_step": self.global_step, "steps_per_epoch": self.steps_per_epoch,
            "session_id": self.session_id, "started_at": self.started_at, "base_model": str(self.config.base_model),
            "network_dim": self.config.network_dim, "seed": self.config.seed,
            "learning_rates": [float(lr) for lr in self.lr_scheduler.get_last_lr()],
        }, indent=2))

    def load_state(self, folder: Path) -> None:
        folder = Path(folder)
        state_file = folder / "state.json"
        if not state_file.is_file():
            raise LorakitError(f"resume: {folder} is not a saved training state (no state.json)")
        missing = [name for name in ("lora.safetensors", "optimizer.pt") if not (folder / name).is_file()]
        if missing:
            raise LorakitError(f"resume: the training state {folder} is incomplete (no {', '.join(missing)}); "
                               "resume from an earlier state, or start again without --resume")
        try:
            state = json.loads(state_file.read_text(encoding="utf-8"))
            int(state["global_step"]), int(state["epoch"]), int(state["steps_per_epoch"])
        except (ValueError, KeyError, TypeError) as exc:
            raise LorakitError(f"resume: {state_file} is damaged ({type(exc).__name__}: {exc}); resume from an "
                               "earlier state, or start again without --resume") from None
        if state["steps_per_epoch"] != self.steps_per_epoch:
            raise LorakitError(
                f"resume: {folder} was saved with {state['steps_per_epoch']} steps per epoch, this run has "
                f"{self.steps_per_epoch}; the dataset or batch settings changed"
            )
        try:
            tensors, _ = kohya_format.read(folder / "lora.safetensors")
        except Exception as exc:  # truncated by a crash while saving
            raise LorakitError(f"resume: {folder / 'lora.safetensors'} is not a readable .safetensors file ({exc}); "
                               "resume from an earlier state, or start again without --resume") from None
        load_network_state_dict(self.network, tensors, str(folder / "lora.safetensors"))
        # weights_only=True: the state holds only tensors and numbers; nothing is unpickled as code.
        try:
            saved = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
            saved["optimizer"], saved["scheduler"]
        except Exception as exc:  # a truncated file, or a pickle that wants to run code: refused
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise LorakitError(f"resume: {folder / 'optimizer.pt'} cannot be read with a safe weights-only load "
                               f"({type(exc).__name__}: {first}); lorakit never unpickles code. Resume from an "
                               "earlier state, or start again without --resume") from None
        self.optimizer.load_state_dict(saved["optimizer"])
        self.lr_scheduler.load_state_dict(saved["scheduler"])
        if saved.get("scaler") and self.accelerator.scaler:
            self.accelerator.scaler.load_state_dict(saved["scaler"])
        self.global_step = int(state["global_step"])
        self.start_epoch = int(state["epoch"])
        self.session_id = state.get("session_id", self.session_id)
        self.started_at = state.get("started_at", self.started_at)
        self.console.print(f"resumed from {folder}: epoch {self.start_epoch}, step {self.global_step}")

    def save_epoch(self, epoch: int) -> None:
        config = self.config
        path = self.save_lora(epoch_file(self.output, epoch), epoch)
        self.saved.append(path)
        if config.save_state:
            self.save_state(state_folder(self.output, epoch), epoch)
        if config.save_last_n_epochs and self.accelerator.is_main_process:
            self.prune_epochs(config.save_last_n_epochs)

    def prune_epochs(self, keep: int) -> None:
        """Keep the last ``keep`` epoch files (and their states) of this training session; older ones go.

        Only files this session wrote are candidates: the name must be exactly ``<stem>-NNNNNN`` (so
        ``<stem>-2-000001`` of another output is never touched) and the file's ``ss_session_id`` must be
        this session's (a resumed run keeps its session id; files of another run are left alone).
        """
        import re
        import shutil

        pattern = re.compile(re.escape(self.output.stem) + r"-(\d{6})")
        ours = []
        for path in self.output.parent.glob(f"{self.output.stem}-*.safetensors"):
            match = pattern.fullmatch(path.stem)
            if match and kohya_format.read_metadata(path).get("ss_session_id") == str(self.session_id):
                ours.append(int(match.group(1)))
        for old in sorted(ours)[:-keep]:
            epoch_file(self.output, old).unlink(missing_ok=True)
            shutil.rmtree(state_folder(self.output, old), ignore_errors=True)

    # ----- sampling -----------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, epoch: int) -> list[Path]:
        from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

        config = self.config
        base = self.base
        unwrap = self.accelerator.unwrap_model
        device = self.accelerator.device
        base.vae.to(device)
        scheduler = DDIMScheduler.from_config(base.noise_scheduler.config)
        if base.is_sdxl:
            pipe = StableDiffusionXLPipeline(vae=base.vae, text_encoder=unwrap(self.text_encoders[0]),
                                             text_encoder_2=unwrap(self.text_encoders[1]), tokenizer=base.tokenizer,
                                             tokenizer_2=base.tokenizer_2, unet=unwrap(self.unet), scheduler=scheduler)
        else:
            pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=unwrap(self.text_encoders[0]),
                                           tokenizer=base.tokenizer, unet=unwrap(self.unet), scheduler=scheduler,
                                           safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        folder = self.output.parent / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        side = self.data_.resolution
        for i, prompt in enumerate(config.sample_prompts):
            generator = torch.Generator(device="cpu").manual_seed(config.seed + i)
            with self.accelerator.autocast():
                image = pipe(prompt, num_inference_steps=config.sample_steps, height=side, width=side,
                             generator=generator).images[0]
            path = folder / f"{self.output.stem}-e{epoch:06d}-{i:02d}.png"
            from lorakit.plugin_sdk import save_image

            save_image(image, path)
            paths.append(path)
        for model in (self.unet, *self.text_encoders):
            model.train()
        return paths

    # ----- one optimiser step's gradients ---------------------------------------------------------------
    def accumulate(self, batches: list[tuple[int, ...]], epoch: int, first_index: int) -> list[float]:
        """Forward and backward over the micro-batches of one optimiser step; returns their losses.

        Each micro-batch's loss is divided by the number of micro-batches, so the gradient is their
        mean: k micro-batches give the gradient of one batch k times the size.
        """
        losses = []
        trained = [self.unet] if self.network.trains_unet() else []
        if self.network.trains_text_encoder():
            trained += self.text_encoders
        for offset, batch in enumerate(batches):
            batch_index = first_index + offset
            step_seed = self.config.seed * 1_000_003 + epoch * 10_007 + batch_index
            generator = torch.Generator().manual_seed(step_seed)
            # Code that draws from the global generators (DyLoRA's rank, network/module dropout) gets
            # a state that depends on the step alone, so a resumed run repeats a straight one exactly.
            random.seed(step_seed)
            torch.manual_seed(step_seed)
            latents, captions, time_ids, weights, masks = self.batch_inputs(batch, epoch, batch_index)
            with contextlib.ExitStack() as stack:
                if offset < len(batches) - 1 and self.accelerator.num_processes > 1:
                    for model in trained:  # gradients are averaged across processes on the last micro-batch only
                        stack.enter_context(self.accelerator.no_sync(model))
                context, pooled = self.encode_prompts(captions)
                loss = self.loss(latents, context, pooled, time_ids, weights, masks, generator)
                value = loss.item()  # the one device sync of the step
                if not math.isfinite(value):
                    self.stop_on_bad_loss(loss, epoch)
                self.accelerator.backward(loss / len(batches))
            losses.append(value)
        return losses

    # ----- the run ------------------------------------------------------------------------------------
    def run(self) -> Path:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        config = self.config
        if self.already_trained():
            return self.output
        self.setup()
        if config.resume:
            self.load_state(Path(config.resume))
        # fixed-width parts first and a short bar, so the times are never cut to "0:00:…" at 80 columns
        columns = [TextColumn("{task.description}"), BarColumn(bar_width=16), MofNCompleteColumn(),
                   TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
        # Redrawn twice a second: a step takes longer, and a 10 Hz redraw costs a few % of a core.
        with Progress(*columns, console=self.console, transient=False, refresh_per_second=2) as progress:
            self.fill_latent_cache(progress)
            task = progress.add_task("training", total=self.total_steps, completed=self.global_step, info="")
            for model in (self.unet, *self.text_encoders):
                model.train()
            run_started = time.perf_counter()
            steps_this_run = 0
            accumulation = config.gradient_accumulation_steps
            finished = self.start_epoch
            for epoch in range(self.start_epoch, self.epochs):
                batches = self.data_.epoch_samples(epoch, config.seed)
                batches = batches[self.accelerator.process_index::self.accelerator.num_processes]
                losses = []
                for first in range(0, len(batches), accumulation):
                    if self.global_step >= self.total_steps:
                        break
                    recent = self.accumulate(batches[first:first + accumulation], epoch, first)
                    losses += recent
                    if config.max_grad_norm:
                        self.accelerator.clip_grad_norm_(self.trained_parameters, config.max_grad_norm)
                    self.optimizer.step()
                    if config.scale_weight_norms:
                        scaled, _, largest = self.network.apply_max_norm(config.scale_weight_norms)
                        if self.writer is not None:
                            self.writer.add_scalar("max_norm/keys_scaled", scaled, self.global_step + 1)
                            self.writer.add_scalar("max_norm/max_norm", largest, self.global_step + 1)
                    self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.global_step += 1
                    steps_this_run += 1
                    lr = self.lr_scheduler.get_last_lr()[0]
                    rate = steps_this_run / max(1e-9, time.perf_counter() - run_started)
                    recent = sum(recent) / len(recent)
                    progress.update(task, advance=1, info=f"epoch {epoch + 1}/{self.epochs} loss {recent:.4f} "
                                                          f"lr {lr:.2e} {rate:.2f} it/s")
                    if self.writer is not None:
                        self.writer.add_scalar("loss/step", recent, self.global_step)
                        for group, value in zip(self.optimizer.param_groups, self.lr_scheduler.get_last_lr()):
                            self.writer.add_scalar(f"lr/{group.get('name', 'group')}", value, self.global_step)
                if self.writer is not None and losses:
                    self.writer.add_scalar("loss/epoch", sum(losses) / len(losses), epoch + 1)
                self.accelerator.wait_for_everyone()
                finished = epoch + 1
                last = finished == self.epochs or self.global_step >= self.total_steps
                if config.save_every_n_epochs and finished % config.save_every_n_epochs == 0 and not last:
                    self.save_epoch(finished)
                if config.sample_every_n_epochs and finished % config.sample_every_n_epochs == 0:
                    self.sample(finished)
                if last:
                    break
            final_epoch = finished
        path = self.save_lora(self.output, final_epoch)
        if config.save_state:
            self.save_state(state_folder(self.output), final_epoch)
        self.write_run_record()
        if self.writer is not None:
            self.writer.close()
        self.accelerator.end_training()
        self.console.print(f"saved {path}")
        if config.compare_epochs and self.accelerator.is_main_process:
            self.compare_epochs(path)
        return path

    def compare_epochs(self, final: Path) -> None:
        """The epochs x weights grid of this run's saves (``compare_epochs``), on a fresh base model."""
        import gc

        from .compare import compare_after_training

        # The training models are done: free their memory before the comparison loads the base model again.
        for name in ("unet", "text_encoders", "optimizer", "lr_scheduler", "network", "trained_parameters", "base"):
            setattr(self, name, None)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        png, page = compare_after_training(self, final)
        self.console.print(f"comparison: {png} and {page}")

    def stop_on_bad_loss(self, loss: torch.Tensor, epoch: int) -> None:
        """NaN or infinite loss: keep the last good weights, say where they are, and stop."""
        kept = []
        if self.network.is_finite():
            # The loss is checked before backward, so the weights are still those of the last good step.
            kept.append(self.save_lora(self.output.with_name(f"{self.output.stem}-last-good.safetensors"), epoch))
        kept += [p for p in self.saved if p.is_file()]
        where = f"; last good checkpoint: {kept[0]}" if kept else "; no good checkpoint was saved before"
        raise TrainingStopped(
            f"training stopped: the loss became {loss.item()} at step {self.global_step + 1} (epoch {epoch + 1}){where}. "
            "Lower the learning rate, use bf16 or fp32 instead of fp16, or turn off noise offset / ip noise gamma."
        )
