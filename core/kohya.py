"""The kohya sd-scripts dataset layout: reading it (``N_name`` folders, reg folders, or a
``dataset_config.toml``) and writing a manifest's dataset back out in that layout."""
from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from lorakit.plugin_sdk import (
    IMAGE_EXTENSIONS, CaptionError, ImageError, LorakitError, Subset, confined_path, is_within,
    read_caption, verify_image,
)

from .buckets import bucket_bounds
from .manifest import Manifest, split_caption

FOLDER_RE = re.compile(r"^(\d+)_(.+)$")


@dataclass
class KohyaImage:
    path: Path
    caption: str | None
    mask: Path | None
    subset: str
    caption_error: str | None = None  # the caption file exists but cannot be used (the image is set aside)


def _safe_name(text: str) -> str:
    """A folder name from a label: word characters, dots and dashes; never '.', '..' or hidden."""
    return re.sub(r"[^\w.-]+", "_", text).strip("_.") or "subset"


def _images_in(folder: Path) -> list[Path]:
    """The pictures of a concept folder; hidden names (``.x.png``) are left out, as kohya's glob
    does (and as lorakit's fingerprint of the folder does)."""
    return sorted(p for p in folder.iterdir()
                  if not p.name.startswith(".") and p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _read_folder(folder: Path, subset: Subset, caption_ext: str, mask_dir: Path | None) -> list[KohyaImage]:
    out = []
    for img in _images_in(folder):
        cap_file = img.with_suffix(caption_ext)
        # A caption or mask that is a symlink to a file outside its folder is not read.
        caption = error = None
        if cap_file.is_file() and is_within(cap_file, folder):
            try:
                caption = read_caption(cap_file)
            except CaptionError as exc:
                error = str(exc)
        mask = None
        if mask_dir is not None:
            for ext in (".png", img.suffix):
                cand = mask_dir / (img.stem + ext)
                if cand.is_file() and is_within(cand, mask_dir):
                    mask = cand
                    break
        out.append(KohyaImage(img, caption, mask, subset.name, error))
    return out


def read_kohya(path: Path, reg: Path | None = None) -> tuple[dict[str, Subset], list[KohyaImage]]:
    """Subsets and images of a kohya dataset: a folder of ``N_name`` folders, or a dataset_config.toml."""
    path = Path(path)
    if not path.exists():
        raise LorakitError(f"{path}: kohya dataset not found")
    if path.is_file():
        return _read_toml(path)
    subsets: dict[str, Subset] = {}
    images: list[KohyaImage] = []
    train_root, reg_root = path, reg
    if not _concept_dirs(path):
        for train_name in ("img", "train", "image"):
            if _concept_dirs(path / train_name):
                train_root = path / train_name
                break
        if reg_root is None and _concept_dirs(path / "reg"):
            reg_root = path / "reg"
    if not _concept_dirs(train_root):
        raise LorakitError(f"{path}: no kohya concept folders (named like 10_mychar) found")
    for root, is_reg in ((train_root, False), (reg_root, True)):
        if root is None:
            continue
        for folder, repeats, label in _concept_dirs(root):
            name = ("reg_" if is_reg else "") + _safe_name(label)
            sub = Subset(name, folder=("reg/" if is_reg else "") + _safe_name(label), repeats=repeats,
                         class_tokens=label, is_reg=is_reg)
            subsets[name] = sub
            mask_dir = None
            for cand in (root.parent / "mask" / folder.name, root.parent / "masks" / folder.name):
                if cand.is_dir():
                    mask_dir = cand
            images += _read_folder(folder, sub, ".txt", mask_dir)
    return subsets, images


def kohya_fingerprint(path: Path, reg: Path | None = None) -> str | None:
    """A digest of everything ``read_kohya(path, reg)`` reads (folders by their entries' stat, the
    dataset_config.toml by its bytes), with no image or caption opened; None where that cannot be
    known (a config that does not parse: the run reads it and says what is wrong)."""
    import hashlib

    from .unchanged import folder_fingerprint

    path = Path(path)
    parts: list[str] = []
    if path.is_file():
        try:
            raw = path.read_bytes()
            config = tomllib.loads(raw.decode("utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            return None
        parts.append(hashlib.blake2b(raw, digest_size=20).hexdigest())
        for _, opts in _toml_subsets(config):  # the folders _read_toml reads, one level each
            for key in ("image_dir", "conditioning_data_dir"):
                if isinstance(opts.get(key), str):
                    folder = (path.parent / opts[key]).resolve()
                    parts.append(f"{key}={folder}:{folder_fingerprint(folder, recursive=False)}")
    else:
        # the folder itself (img/, train/, reg/ and the concept folders in it), a separate reg
        # folder, and the mask/ or masks/ folders read beside either
        for folder in (path, reg):
            if folder is None:
                continue
            folder = Path(folder).resolve()
            parts.append(f"{folder}:{folder_fingerprint(folder)}")
            for masks in ("mask", "masks"):
                beside = folder.parent / masks
                parts.append(f"{beside}:{folder_fingerprint(beside) if beside.is_dir() else '-'}")
    return hashlib.blake2b("\n".join(parts).encode("utf-8", "surrogateescape"), digest_size=20).hexdigest()


def _concept_dirs(root: Path) -> list[tuple[Path, int, str]]:
    if not root or not root.is_dir():
        return []
    found = []
    for d in sorted(root.iterdir()):
        m = FOLDER_RE.match(d.name)
        if d.is_dir() and m:
            found.append((d, int(m.group(1)), m.group(2)))
    return found


def _toml_subsets(config: dict):
    """(where, options) of each subset of a dataset_config.toml, with kohya's inheritance: the
    subset's own keys over its dataset's over ``[general]``."""
    general = config.get("general", {})
    for d_index, dataset in enumerate(config.get("datasets", [])):
        defaults = {**general, **{k: v for k, v in dataset.items() if k != "subsets"}}
        for s_index, raw in enumerate(dataset.get("subsets", [])):
            yield f"datasets[{d_index}].subsets[{s_index}]", {**defaults, **raw}


def _read_toml(path: Path) -> tuple[dict[str, Subset], list[KohyaImage]]:
    try:
        config = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise LorakitError(f"{path}: invalid TOML ({exc})") from None
    subsets: dict[str, Subset] = {}
    images: list[KohyaImage] = []
    for where, opts in _toml_subsets(config):
        if "image_dir" not in opts:
            raise LorakitError(f"{path}: {where} has no image_dir")
        image_dir = (path.parent / opts["image_dir"]).resolve()
        if not image_dir.is_dir():
            raise LorakitError(f"{path}: image_dir {image_dir} does not exist")
        m = FOLDER_RE.match(image_dir.name)
        label = m.group(2) if m else image_dir.name
        is_reg = bool(opts.get("is_reg", False))
        name = ("reg_" if is_reg else "") + _safe_name(label)
        while name in subsets:
            name += "_"
        sub = Subset(
            name, folder=("reg/" if is_reg else "") + name.removeprefix("reg_"),
            repeats=int(opts.get("num_repeats", 1)), class_tokens=opts.get("class_tokens"),
            keep_tokens=int(opts.get("keep_tokens", 0)), keep_tokens_separator=opts.get("keep_tokens_separator") or None,
            is_reg=is_reg, shuffle_caption=opts.get("shuffle_caption"),
            caption_dropout_rate=opts.get("caption_dropout_rate"),
            caption_tag_dropout_rate=opts.get("caption_tag_dropout_rate"), flip_aug=opts.get("flip_aug"),
        )
        subsets[name] = sub
        mask_dir = opts.get("conditioning_data_dir")
        mask_path = (path.parent / mask_dir).resolve() if mask_dir else None
        images += _read_folder(image_dir, sub, opts.get("caption_extension", ".txt"), mask_path)
    if not images:
        raise LorakitError(f"{path}: the dataset config lists no images")
    return subsets, images


def manifest_from_kohya(path: Path, reg: Path | None = None) -> Manifest:
    """An in-memory manifest over a kohya dataset, pointing at its files where they are (no copy).

    Images that are not usable (broken, over the pixel cap) are listed as set aside, not read."""
    from .manifest import ImageRecord, SetAsideRecord
    from .store import sha256_file

    subsets, images = read_kohya(path, reg)
    records, aside = [], []
    for img in images:
        if img.caption_error:
            aside.append(SetAsideRecord(name=img.path.stem, step="kohya", reason=img.caption_error, source=str(img.path)))
            continue
        try:
            w, h = verify_image(img.path)  # header and structure, under the pixel cap; no decode
        except ImageError as exc:
            aside.append(SetAsideRecord(name=img.path.stem, step="kohya", reason=str(exc), source=str(img.path)))
            continue
        sub = subsets[img.subset]
        caption = img.caption or (sub.class_tokens or "")
        records.append(ImageRecord(
            path=str(img.path.resolve()), caption=caption, subset=img.subset, width=w, height=h,
            sha256=sha256_file(img.path), tags=[{"name": t, "score": None} for t in split_caption(caption)],
            repeats=sub.repeats, is_reg=sub.is_reg, mask=str(img.mask.resolve()) if img.mask else None,
            source=str(img.path), steps=["kohya"],
        ))
    return Manifest(root=Path(path).resolve().parent if Path(path).is_file() else Path(path).resolve(),
                    subsets=subsets, images=records, set_aside=aside, external_paths=True)


@dataclass
class KohyaExport:
    """What ``export_kohya`` wrote: the config, whether it needs ``--masked_loss``, what kohya cannot keep."""

    config: Path
    masked_loss: bool
    lost: list[str]
    kept: list[str] = field(default_factory=list)  # stale files of an earlier export kept: changed since

    def command(self, sdxl: bool = False) -> str:
        """The sd-scripts command line for this config (model, output and network options to add)."""
        script = "sdxl_train_network.py" if sdxl else "train_network.py"
        return (f"accelerate launch {script} --dataset_config {self.config} --network_module networks.lora"
                + (" --masked_loss" if self.masked_loss else ""))


def export_kohya(manifest: Manifest, out: Path, *, relative_paths: bool = False, force: bool = False,
                 bucket_no_upscale: bool = False, random_crop: bool = False) -> Path:
    """Write ``img/N_name``, ``reg/N_name``, ``mask/N_name`` and a ``dataset_config.toml``; return its path.

    See ``export_kohya_report`` for what the config needs (``--masked_loss``) and what it loses."""
    return export_kohya_report(manifest, out, relative_paths=relative_paths, force=force,
                               bucket_no_upscale=bucket_no_upscale, random_crop=random_crop).config


def export_kohya_report(manifest: Manifest, out: Path, *, relative_paths: bool = False, force: bool = False,
                        bucket_no_upscale: bool = False, random_crop: bool = False) -> KohyaExport:
    """Export in kohya's layout, with a ``dataset_config.toml`` that kohya's ``ConfigSanitizer`` accepts.

    kohya reads masks for masked loss only from a ControlNet-style dataset (every subset with a
    ``conditioning_data_dir``, and then no ``is_reg`` / ``class_tokens``), and refuses
    ``conditioning_data_dir`` in a DreamBooth subset. So subsets with masks go into a ``[[datasets]]``
    block of their own (an image without a mask gets a white one: train everywhere, as without a
    mask); regularisation subsets cannot be masked in kohya and keep their images without masks.
    ``image_dir`` paths are absolute (kohya resolves relative ones against its working directory);
    ``relative_paths`` writes them relative to the config's folder instead. The folder is an
    ``ExportTarget``: a non-empty folder that is not a lorakit export is refused unless ``force``.
    ``bucket_no_upscale`` and ``random_crop`` are the trainer settings of the same names (``[general]``
    and every subset).
    """
    from .export_target import ExportTarget

    out = Path(out)
    dest = ExportTarget(out, force=force, where="export kohya")
    plain, masked, lost = [], [], []
    for name, sub in manifest.subsets.items():
        records = manifest.images_in(name)
        if not records:
            continue
        folder = confined_path(out, f"{'reg' if sub.is_reg else 'img'}/{sub.kohya_folder}", "export folder")
        mask_folder = confined_path(out, f"mask/{sub.kohya_folder}", "export folder")
        with_masks = any(r.mask for r in records) and not sub.is_reg
        if sub.is_reg and any(r.mask for r in records):
            lost.append(f"{name}: kohya cannot mask regularisation images; its masks are not exported")
        for r in records:
            src = manifest.abspath(r.path)
            dest.copy(src, folder / src.name)
            dest.write_text((folder / src.name).with_suffix(".txt"), r.caption)
            if with_masks:
                mask_target = mask_folder / (Path(src.name).stem + ".png")
                if r.mask:
                    dest.copy(manifest.abspath(r.mask), mask_target)
                else:
                    dest.write_with(mask_target, lambda tmp, src=src: _white_mask(src, tmp))
        entry = {"image_dir": _config_path(folder, out, relative_paths), "num_repeats": sub.repeats,
                 "caption_extension": ".txt", "keep_tokens": sub.keep_tokens}
        if random_crop:
            entry["random_crop"] = True
        if sub.keep_tokens_separator:
            entry["keep_tokens_separator"] = sub.keep_tokens_separator
        for key in ("shuffle_caption", "caption_dropout_rate", "caption_tag_dropout_rate", "flip_aug"):
            if getattr(sub, key) is not None:
                entry[key] = getattr(sub, key)
        if with_masks:
            entry["conditioning_data_dir"] = _config_path(mask_folder, out, relative_paths)
            if entry.pop("random_crop", False):
                lost.append(f"{name}: random_crop (kohya's masked datasets refuse it; they are centre-cropped)")
            if sub.class_tokens:
                lost.append(f"{name}: class_tokens {sub.class_tokens!r} (kohya's masked datasets have none; "
                            "every image has its caption file)")
            if any(not r.mask for r in records):
                lost.append(f"{name}: images without a mask get a white one (trained everywhere)")
            masked.append(entry)
        else:
            entry["is_reg"] = sub.is_reg
            if sub.class_tokens:
                entry["class_tokens"] = sub.class_tokens
            plain.append(entry)
    resolution = manifest.resolution or 512
    min_bucket, max_bucket = bucket_bounds(resolution, step=64)  # the rule the trainer and the buckets step use
    datasets = [{"resolution": resolution, "batch_size": 1, "subsets": subsets} for subsets in (plain, masked) if subsets]
    config = {
        "general": {"enable_bucket": True, "bucket_no_upscale": bool(bucket_no_upscale), "min_bucket_reso": min_bucket,
                    "max_bucket_reso": max_bucket, "bucket_reso_steps": 64},
        "datasets": datasets,
    }
    target = out / "dataset_config.toml"
    report = KohyaExport(target.resolve() if not relative_paths else target, bool(masked), lost)
    header = ["Written by lorakit export kohya.",
              "Paths are relative to this file's folder: run sd-scripts from here." if relative_paths
              else "Paths are absolute.",
              "Train with: " + report.command(sdxl=(manifest.resolution or 512) >= 1024)]
    if masked:
        header.append("The masked subsets are a dataset of their own: kohya reads masks (white = train) from "
                      "conditioning_data_dir only there, and only with --masked_loss.")
    header += ["Not kept by kohya: " + item for item in lost]
    dest.write_text(target, "".join(f"# {line}\n" for line in header) + tomli_w.dumps(config))
    report.kept = dest.finish()
    return report


def _config_path(folder: Path, out: Path, relative: bool) -> str:
    return folder.relative_to(out).as_posix() if relative else str(folder.resolve())


def _white_mask(image: Path, target: Path) -> None:
    """A white mask (train everywhere) the size of ``image``, for kohya's masked dataset."""
    from PIL import Image

    with Image.open(image) as im:
        size = im.size
    Image.new("L", size, 255).save(target, format="PNG")
