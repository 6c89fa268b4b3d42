"""The training data: manifest images -> buckets -> batches, captions, and the latent cache.

Everything the trainer knows about the dataset comes from the manifest (``lorakit.manifest``).
Bucketing is kohya's (``lorakit.buckets``): every image goes to the bucket of nearest aspect ratio,
is scaled to cover it and centre-cropped (``random_crop``: cropped at a random place); with
``bucket_no_upscale`` the bucket comes from the image's own size instead. A batch holds images of
one bucket only. Repeats put an image that many times in each epoch; regularisation images fill as
many places as training images.
"""
from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorakit.buckets import bucket_bounds, make_buckets, sdxl_time_ids, select_bucket, select_bucket_no_upscale
from lorakit.plugin_sdk import LorakitError, file_digest, image_size, open_image


@dataclass
class TrainImage:
    """One image of the dataset with everything the trainer needs to turn it into a sample."""

    path: Path
    caption: str
    subset: str
    repeats: int
    is_reg: bool
    size: tuple[int, int]
    bucket: tuple[int, int]
    resized: tuple[int, int]
    mask: Path | None = None
    keep_tokens: int = 0
    keep_tokens_separator: str | None = None
    shuffle_caption: bool = False
    caption_dropout_rate: float = 0.0
    caption_tag_dropout_rate: float = 0.0
    flip_aug: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_every_n_epochs: int = 0
    random_crop: bool = False

    @property
    def crop(self) -> tuple[int, int]:
        """(top, left) of the centre crop from the resized image to the bucket."""
        return (self.resized[1] - self.bucket[1]) // 2, (self.resized[0] - self.bucket[0]) // 2

    def crop_for_sample(self, rng: random.Random) -> tuple[int, int]:
        """(top, left) of this sample's crop: the centre one, or with ``random_crop`` a random one (kohya:
        the left drawn first, then the top, each uniform over every whole offset). Without
        ``random_crop`` ``rng`` is not used, so the other draws of a run stay the same."""
        if not self.random_crop:
            return self.crop
        left = rng.randint(0, self.resized[0] - self.bucket[0])
        top = rng.randint(0, self.resized[1] - self.bucket[1])
        return top, left

    def time_ids(self, flipped: bool) -> list[int]:
        """SDXL's size and crop conditioning for this image, as kohya computes it (``sdxl_time_ids``)."""
        return sdxl_time_ids(self.size, self.bucket, flipped)


@dataclass
class TrainingData:
    images: list[TrainImage]
    buckets: list[tuple[int, int]]
    resolution: int
    batch_size: int
    subsets: dict[str, Any] = field(default_factory=dict)

    @property
    def train_images(self) -> list[TrainImage]:
        return [i for i in self.images if not i.is_reg]

    @property
    def reg_images(self) -> list[TrainImage]:
        return [i for i in self.images if i.is_reg]

    def epoch_samples(self, epoch: int, seed: int) -> list[tuple[int, ...]]:
        """The batches of one epoch: tuples of indexes into ``images``, each batch within one bucket.

        The order depends only on (seed, epoch), so a resumed run sees the same batches.
        """
        rng = random.Random(f"{seed}:{epoch}:order")
        entries: list[int] = []
        for index, image in enumerate(self.images):
            if not image.is_reg:
                entries.extend([index] * image.repeats)
        train_count = len(entries)
        reg = [index for index, image in enumerate(self.images) if image.is_reg for _ in range(image.repeats)]
        if reg:
            # kohya: regularisation images take as many places as training images (cycled when fewer).
            entries.extend(reg[i % len(reg)] for i in range(train_count))
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for index in entries:
            by_bucket.setdefault(self.images[index].bucket, []).append(index)
        batches: list[tuple[int, ...]] = []
        for bucket in sorted(by_bucket):
            members = by_bucket[bucket]
            rng.shuffle(members)
            batches.extend(tuple(members[i:i + self.batch_size]) for i in range(0, len(members), self.batch_size))
        rng.shuffle(batches)
        return batches

    def batches_per_epoch(self) -> int:
        return len(self.epoch_samples(0, 0))

    def bucket_counts(self) -> dict[tuple[int, int], int]:
        """Images per bucket, repeats and regularisation places included (kohya's bucket report)."""
        counts: dict[tuple[int, int], int] = {}
        for batch in self.epoch_samples(0, 0):
            for index in batch:
                bucket = self.images[index].bucket
                counts[bucket] = counts.get(bucket, 0) + 1
        return dict(sorted(counts.items()))

    def mean_aspect_error(self) -> float:
        errors = [abs(i.bucket[0] / i.bucket[1] - i.size[0] / i.size[1]) for i in self.images]
        return float(np.mean(errors)) if errors else 0.0


def build_training_data(manifest, config, resolution: int, *, use_masks: bool = False) -> TrainingData:
    """Turn the manifest's images into ``TrainImage`` records with their buckets and caption settings."""
    if not manifest.images:
        raise LorakitError(f"{manifest.root}: the dataset has no images")
    no_upscale = config.enable_bucket and config.values.get("bucket_no_upscale", False)
    if no_upscale:
        buckets: list[tuple[int, int]] = []  # each image makes its own (min/max_bucket_reso are not used)
    elif config.enable_bucket:
        try:
            low, high = bucket_bounds(resolution, config.min_bucket_reso, config.max_bucket_reso,
                                      config.bucket_reso_steps)
        except ValueError as exc:
            raise LorakitError(f"train settings: {exc}") from None
        buckets = make_buckets(resolution, low, high, config.bucket_reso_steps)
    else:
        side = resolution // config.bucket_reso_steps * config.bucket_reso_steps
        buckets = [(side, side)]
    images = []
    for record in manifest.images:
        subset = manifest.subsets.get(record.subset)
        path = manifest.abspath(record.path)
        if not path.is_file():
            raise LorakitError(f"{manifest.root}: image {record.path} is listed in the manifest but missing")
        width, height = record.width, record.height
        if not width or not height:
            width, height = image_size(path)  # header only
        if no_upscale:
            choice = select_bucket_no_upscale(width, height, resolution * resolution, config.bucket_reso_steps)
            if not all(choice.bucket):
                raise LorakitError(f"{manifest.root}: image {record.path} is {width}x{height}, smaller than one bucket "
                                   f"step ({config.bucket_reso_steps}); with bucket_no_upscale it fits no bucket "
                                   "(upscale it, remove it or lower bucket_reso_steps)")
        else:
            choice = select_bucket(width, height, buckets)

        def pick(name: str, default):
            value = getattr(subset, name, None) if subset is not None else None
            return default if value is None else value

        mask = manifest.abspath(record.mask) if (use_masks and record.mask) else None
        if use_masks and mask is None and not record.is_reg:
            raise LorakitError(
                f"{manifest.root}: masked_loss is on but image {record.path} has no mask (run the mask step, or "
                "turn masked_loss off)"
            )
        keep_tokens = subset.keep_tokens if subset is not None and subset.keep_tokens else config.keep_tokens
        images.append(TrainImage(
            path=path, caption=record.caption, subset=record.subset,
            repeats=max(1, int(record.repeats or (subset.repeats if subset else 1))),
            is_reg=bool(record.is_reg or (subset.is_reg if subset else False)),
            size=(width, height), bucket=choice.bucket, resized=choice.resized, mask=mask,
            keep_tokens=keep_tokens,
            keep_tokens_separator=subset.keep_tokens_separator if subset is not None else None,
            shuffle_caption=pick("shuffle_caption", config.shuffle_caption),
            caption_dropout_rate=pick("caption_dropout_rate", config.caption_dropout_rate),
            caption_tag_dropout_rate=pick("caption_tag_dropout_rate", config.caption_tag_dropout_rate),
            flip_aug=pick("flip_aug", config.flip_aug),
            caption_prefix=config.caption_prefix, caption_suffix=config.caption_suffix,
            caption_dropout_every_n_epochs=config.caption_dropout_every_n_epochs,
            random_crop=bool(config.values.get("random_crop", False)),
        ))
    if no_upscale:
        buckets = sorted({image.bucket for image in images})  # kohya: the buckets the images made
    if not any(not i.is_reg for i in images):
        raise LorakitError(f"{manifest.root}: the dataset has only regularisation images; nothing to train on")
    return TrainingData(images=images, buckets=buckets, resolution=resolution, batch_size=config.batch_size,
                        subsets=dict(manifest.subsets))


# ----- captions ---------------------------------------------------------------------------------
def make_caption(image: TrainImage, rng: random.Random, *, step: int = 0, token_warmup_min: int = 1,
                 token_warmup_step: int = 0, epoch: int = 1) -> str:
    """The caption of one sample, as kohya's ``process_caption`` makes it.

    The prefix and suffix are joined with a space. Caption dropout (by chance, or every Nth epoch,
    counted from 1) empties the whole caption. A caption with the keep-tokens separator (``|||``)
    keeps everything before it (and, with a second separator, everything after that); otherwise the
    first ``keep_tokens`` tags are kept. Only the other tags are warmed up, shuffled and dropped.
    """
    caption = image.caption
    if image.caption_prefix:
        caption = f"{image.caption_prefix} {caption}"
    if image.caption_suffix:
        caption = f"{caption} {image.caption_suffix}"
    if image.caption_dropout_rate and rng.random() < image.caption_dropout_rate:
        return ""
    if image.caption_dropout_every_n_epochs and epoch % image.caption_dropout_every_n_epochs == 0:
        return ""
    separator = image.keep_tokens_separator or "|||"
    suffix: list[str] = []
    if separator in caption:
        head, tail = caption.split(separator, 1)
        if separator in tail:
            tail, end = tail.split(separator, 1)
            suffix = [t.strip() for t in end.split(",") if t.strip()]
        fixed = [t.strip() for t in head.split(",") if t.strip()]
        rest = [t.strip() for t in tail.split(",") if t.strip()]
    else:
        tags = [t.strip() for t in caption.split(",") if t.strip()]
        fixed, rest = tags[:image.keep_tokens], tags[image.keep_tokens:]
    if token_warmup_step and step < token_warmup_step:
        # kohya: the shuffled tags grow from token_warmup_min to all of them; the kept ones are always there.
        count = math.floor(step * (len(rest) - token_warmup_min) / token_warmup_step) + token_warmup_min
        rest = rest[:max(0, count)]
    if image.shuffle_caption:
        rng.shuffle(rest)
    if image.caption_tag_dropout_rate:
        rest = [t for t in rest if rng.random() >= image.caption_tag_dropout_rate]
    return ", ".join(fixed + rest + suffix)


# ----- pixels -----------------------------------------------------------------------------------
def load_pixels(image: TrainImage, flip: bool, crop: tuple[int, int] | None = None) -> torch.Tensor:
    """The image scaled to cover its bucket and cropped to it (at ``crop`` = (top, left), by default the
    centre), as a (3, H, W) tensor in [-1, 1]."""
    from PIL import Image

    with open_image(image.path) as im:
        rgb = im.convert("RGB")
    if rgb.size != image.size:
        # The manifest is stale: bucket from the real size (the image was edited after the manifest).
        raise LorakitError(f"{image.path}: size {rgb.size} differs from the manifest's {image.size}; re-run the pipeline")
    resample = Image.Resampling.LANCZOS if rgb.size[0] > image.resized[0] else Image.Resampling.BICUBIC
    rgb = rgb.resize(image.resized, resample)
    top, left = image.crop if crop is None else crop
    rgb = rgb.crop((left, top, left + image.bucket[0], top + image.bucket[1]))
    array = np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0
    tensor = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    return torch.flip(tensor, dims=[2]) if flip else tensor


def load_mask(image: TrainImage, latent_size: tuple[int, int], flip: bool,
              crop: tuple[int, int] | None = None) -> torch.Tensor:
    """The mask at latent resolution as (1, h, w) in [0, 1]: white = train, black = ignore."""
    from PIL import Image

    with open_image(image.mask) as im:
        grey = im.convert("L")
    grey = grey.resize(image.resized, Image.Resampling.BILINEAR)
    top, left = image.crop if crop is None else crop
    grey = grey.crop((left, top, left + image.bucket[0], top + image.bucket[1]))
    grey = grey.resize(latent_size, Image.Resampling.BILINEAR)
    tensor = torch.from_numpy(np.asarray(grey, dtype=np.float32) / 255.0)[None]
    return torch.flip(tensor, dims=[2]) if flip else tensor


# ----- latent cache -----------------------------------------------------------------------------
def file_sha256(path: Path) -> str:
    return file_digest(path)


def vae_fingerprint(vae) -> str:
    """A hash of the VAE's weights and config: latents from another VAE are never reused."""
    digest = hashlib.sha256(repr(sorted(dict(vae.config).items())).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class LatentCache:
    """VAE latents keyed by image content, bucket, crop, flip and VAE; in memory, on disk or not at all.

    An image whose bytes change gets a new key and is encoded again; an unchanged one is read back.
    ``encoded`` counts the VAE encodes of this run (tests use it).
    """

    def __init__(self, vae, mode: str, folder: Path | None, device: str):
        self.vae, self.mode, self.folder, self.device = vae, mode, folder, device
        self.memory: dict[str, torch.Tensor] = {}
        self.encoded = 0
        self.read_from_disk = 0
        self._hashes: dict[Path, str] = {}
        self.fingerprint = vae_fingerprint(vae)
        if mode == "disk":
            if folder is None:
                raise LorakitError("cache_latents = disk needs a cache folder")
            folder.mkdir(parents=True, exist_ok=True)

    def key(self, image: TrainImage, flip: bool) -> str:
        if image.path not in self._hashes:
            self._hashes[image.path] = file_sha256(image.path)
        parts = [self._hashes[image.path], f"{image.bucket[0]}x{image.bucket[1]}", f"{image.resized[0]}x{image.resized[1]}",
                 "flip" if flip else "noflip", self.fingerprint]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]

    def get(self, image: TrainImage, flip: bool, crop: tuple[int, int] | None = None) -> torch.Tensor:
        """The latent of ``image`` (flipped or not) cropped at ``crop`` (default: the centre). Only the
        centre crop is cached: ``random_crop`` needs ``cache_latents: none``, as in kohya."""
        if self.mode == "none" or (crop is not None and crop != image.crop):
            if self.mode != "none":
                raise LorakitError("random_crop needs cache_latents = none (a cached latent has one crop)")
            return self._encode([image], [flip], [crop])[0]
        key = self.key(image, flip)
        if key in self.memory:
            return self.memory[key]
        if self.mode == "disk":
            path = self.folder / f"{key}.safetensors"
            if path.is_file():
                from safetensors.torch import load_file

                try:
                    latent = load_file(str(path))["latent"]
                    self.read_from_disk += 1
                    self.memory[key] = latent
                    return latent
                except Exception:
                    path.unlink(missing_ok=True)  # a torn or foreign file: encode again
        latent = self._encode([image], [flip])[0]
        self.memory[key] = latent
        if self.mode == "disk":
            from safetensors.torch import save_file

            from lorakit.plugin_sdk import atomic_path

            with atomic_path(self.folder / f"{key}.safetensors") as tmp:
                save_file({"latent": latent.contiguous()}, str(tmp))
        return latent

    @torch.no_grad()
    def encode(self, images: list[TrainImage], flips: list[bool],
               crops: list[tuple[int, int] | None] | None = None) -> torch.Tensor:
        """The latents of a batch in one VAE call, fp32 on the VAE's device (``none``: at every step)."""
        crops = crops or [None] * len(images)
        pixels = torch.stack([load_pixels(i, f, c) for i, f, c in zip(images, flips, crops)]).to(self.device,
                                                                                                 self.vae.dtype)
        # The distribution's mean: deterministic, so a cached latent equals a fresh one.
        latents = self.vae.encode(pixels).latent_dist.mean
        self.encoded += len(images)
        return latents.float()

    def _encode(self, images: list[TrainImage], flips: list[bool],
                crops: list[tuple[int, int] | None] | None = None) -> list[torch.Tensor]:
        return [latent.to("cpu") for latent in self.encode(images, flips, crops)]

    def fill(self, data: TrainingData, progress=None) -> None:
        """Encode (or read) every latent the run needs, up front, with progress."""
        if self.mode == "none":
            return
        work = [(image, flip) for image in data.images for flip in ((False, True) if image.flip_aug else (False,))]
        for image, flip in work:
            self.get(image, flip)
            if progress is not None:
                progress()
