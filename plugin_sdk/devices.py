"""Choosing where models run: CUDA when present, CPU otherwise (torch is imported lazily)."""
from __future__ import annotations


def pick_device(preference: str = "auto") -> str:
    """Return ``cuda`` when asked for or available (``auto``), else ``cpu``."""
    if preference not in ("auto", "cuda", "cpu") and not preference.startswith("cuda:"):
        raise ValueError(f"device must be auto, cpu or cuda[:N], not {preference!r}")
    if preference == "cpu":
        return "cpu"
    try:
        import torch
    except ImportError:
        return "cpu"
    if torch.cuda.is_available():
        return "cuda" if preference == "auto" else preference
    if preference.startswith("cuda"):
        from .errors import LorakitError

        raise LorakitError(f"device {preference!r} was asked for but CUDA is not available on this machine")
    return "cpu"


def onnx_providers(preference: str = "auto") -> list[str]:
    """onnxruntime execution providers: CUDA first when available and wanted, CPU always last."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    providers = []
    if preference != "cpu" and "CUDAExecutionProvider" in available:
        try:
            import torch

            has_gpu = torch.cuda.is_available()
        except ImportError:
            has_gpu = True
        if has_gpu:
            providers.append("CUDAExecutionProvider")
    providers.append("CPUExecutionProvider")
    return providers
