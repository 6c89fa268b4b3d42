"""The lorakit plugin SDK: everything a plugin author imports comes from this one module.

    from lorakit.plugin_sdk import hookimpl, ImageStep, Param, SkipImage

    class Sepia(ImageStep):
        name = "sepia"
        summary = "Tint images sepia."
        params = [Param("strength", float, 1.0, "0 = unchanged, 1 = full sepia", min=0, max=1)]
        reads = writes = frozenset({"image"})

        def process(self, item, ctx):
            ...
            return item.with_image(tinted)

    @hookimpl
    def register_steps(register):
        register(Sepia)
"""
from .captions import MAX_CAPTION_BYTES, CaptionError, decode_caption, read_caption
from .devices import chosen_device, device_param, onnx_providers, pick_device
from .errors import (
    LorakitError, ManyErrors, ModelNotFound, ParamError, SkipImage, is_storage_error, storage_error_message,
)
from .hookspecs import hookimpl, hookspec
from .images import (
    IMAGE_EXTENSIONS,
    MAX_PIXELS,
    PNG_COMPRESS_LEVEL,
    ImageError,
    TMP_PREFIX,
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    degenerate_reason,
    file_digest,
    image_header,
    image_size,
    is_partial_file,
    open_image,
    save_image,
    verify_image,
)
from .item import Item, caption_text
from .models import model_file_digest, resolve_model_files
from .paths import PathEscape, check_relative, confined_path, is_within
from .params import REQUIRED, Color, Fuzz, ModelRef, Param, Params, Percent, validate_params
from .steps import DatasetStep, ImageStep, SourceStep, Step, StepContext, reason_of
from .subset import Subset

__all__ = [
    "hookimpl", "hookspec",
    "Step", "ImageStep", "DatasetStep", "SourceStep", "StepContext", "reason_of",
    "Item", "Subset", "caption_text",
    "Param", "Params", "Percent", "Fuzz", "Color", "ModelRef", "REQUIRED", "validate_params",
    "is_storage_error", "storage_error_message",
    "LorakitError", "ManyErrors", "ParamError", "SkipImage", "ModelNotFound", "ImageError", "PathEscape",
    "confined_path", "check_relative", "is_within", "CaptionError", "read_caption", "decode_caption", "MAX_CAPTION_BYTES",
    "file_digest", "degenerate_reason", "open_image", "verify_image", "save_image", "image_size", "image_header",
    "atomic_path", "atomic_write_bytes", "atomic_write_text",
    "IMAGE_EXTENSIONS", "MAX_PIXELS", "PNG_COMPRESS_LEVEL", "TMP_PREFIX", "is_partial_file",
    "pick_device", "onnx_providers", "device_param", "chosen_device", "resolve_model_files", "model_file_digest",
]
