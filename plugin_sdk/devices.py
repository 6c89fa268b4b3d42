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


def _check_device(value: str) -> None:
    if value not in ("auto", "cpu", "cuda") and not (value.startswith("cuda:") and value[5:].isdigit()):
        raise ValueError("auto, cpu, cuda or cuda:N")


def device_param():
    """The ``device`` option of a model-backed step: where the model runs (default auto)."""
    from .params import Param

    return Param("device", str, "auto", "where the model runs: auto (CUDA when present), cpu, cuda or cuda:N",
                 validate=_check_device, type_name="auto, cpu, cuda or cuda:N")


def chosen_device(option: str, ctx_device: str) -> str:
    """The step's own device option wins over the run's (both default to auto)."""
    return ctx_device if option == "auto" else option
