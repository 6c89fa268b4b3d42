"""kohya sd-scripts' dataset_config.toml rules (library/config_util.py, ``ConfigSanitizer``) as a
voluptuous schema, the library kohya validates with, for testing what ``lorakit export kohya`` writes.

Written from reading sd-scripts at commit 48d368fa (2026-02-16); train_network.py builds it as
``ConfigSanitizer(support_dreambooth=True, support_finetuning=True,
support_controlnet=args.masked_loss, support_dropout=True)``. Like kohya: unknown keys are errors
("extra keys not allowed"); a dataset whose every subset has ``conditioning_data_dir`` is a
ControlNet dataset (when masked loss is on), one whose every subset has ``metadata_file`` a
fine-tuning dataset, otherwise a DreamBooth dataset.
"""
from __future__ import annotations

import voluptuous
from voluptuous import Any, ExactSequence, Required, Schema

_SUBSET = {
    "color_aug": bool, "face_crop_aug_range": ExactSequence([float, float]), "flip_aug": bool, "num_repeats": int,
    "random_crop": bool, "shuffle_caption": bool, "keep_tokens": int, "keep_tokens_separator": str,
    "secondary_separator": str, "caption_separator": str, "enable_wildcard": bool, "token_warmup_min": int,
    "token_warmup_step": Any(float, int), "caption_prefix": str, "caption_suffix": str, "custom_attributes": dict,
    "resize_interpolation": str,
}
_DROPOUT = {"caption_dropout_every_n_epochs": int, "caption_dropout_rate": Any(float, int),
            "caption_tag_dropout_rate": Any(float, int)}
_DREAMBOOTH = {"caption_extension": str, "class_tokens": str, "cache_info": bool}
_DREAMBOOTH_SUBSET = {Required("image_dir"): str, "is_reg": bool, "alpha_mask": bool}
_FINETUNE_SUBSET = {Required("metadata_file"): str, "image_dir": str, "alpha_mask": bool}
_CONTROLNET = {"caption_extension": str, "cache_info": bool}
_CONTROLNET_SUBSET = {Required("image_dir"): str, Required("conditioning_data_dir"): str}
_DATASET = {
    "batch_size": int, "bucket_no_upscale": bool, "bucket_reso_steps": int, "enable_bucket": bool,
    "max_bucket_reso": int, "min_bucket_reso": int, "validation_seed": int, "validation_split": float,
    "resolution": Any(int, ExactSequence([int, int])), "network_multiplier": float, "resize_interpolation": str,
}


def _merge(*dicts):
    out = {}
    for d in dicts:
        out.update(d)
    return out


def kohya_config_schema(masked_loss: bool) -> Schema:
    """The schema train_network.py validates a dataset_config.toml with."""
    db_subset = _merge(_SUBSET, _DREAMBOOTH_SUBSET, _DREAMBOOTH, _DROPOUT)
    ft_subset = _merge(_SUBSET, _FINETUNE_SUBSET, _DROPOUT)
    cn_subset = _merge(_SUBSET, _CONTROLNET_SUBSET, _CONTROLNET, _DROPOUT)
    db_dataset = Schema(_merge(_DATASET, _SUBSET, _DREAMBOOTH, _DROPOUT, {"subsets": [db_subset]}))
    ft_dataset = Schema(_merge(_DATASET, _SUBSET, _DROPOUT, {"subsets": [ft_subset]}))
    cn_dataset = Schema(_merge(_DATASET, _SUBSET, _CONTROLNET, _DROPOUT, {"subsets": [cn_subset]}))

    def dataset(config: dict):
        subsets = config.get("subsets", [])
        if masked_loss and all("conditioning_data_dir" in s for s in subsets):
            return cn_dataset(config)
        if all("metadata_file" in s for s in subsets):
            return ft_dataset(config)
        if all("metadata_file" not in s for s in subsets):
            return db_dataset(config)
        raise voluptuous.Invalid("DreamBooth subset and fine tuning subset cannot be mixed in the same dataset")

    general = _merge(_DATASET, _SUBSET, _DREAMBOOTH, _CONTROLNET if masked_loss else {}, _DROPOUT)
    return Schema({"general": general, "datasets": [dataset]})
