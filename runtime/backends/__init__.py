"""Runtime backends, chosen by the model path (one module per backend, one interface).

    *.plan, *.engine   TensorRT engine        (backends/tensorrt.py, imported only when asked for)
    *.onnx             ONNX Runtime session   (backends/onnxruntime.py; CUDA provider when available)
    a directory        its engine.plan if present, else its model.onnx

Each model file has the export's metadata sidecar (pid_export.json) beside it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..metadata import ENGINE_NAME, MODEL_METADATA, ONNX_NAME, MetadataError, ModelMetadata
from .base import Backend, BackendError

TENSORRT_SUFFIXES = (".plan", ".engine")
ONNX_SUFFIXES = (".onnx",)
ACCEPTED_KINDS = "a TensorRT engine (.plan/.engine), an ONNX model (.onnx) or an export directory"

__all__ = ["ACCEPTED_KINDS", "Backend", "BackendError", "load_model_metadata", "open_backend",
           "preflight", "resolve_model_path", "resolve_device"]


def resolve_model_path(path: str | os.PathLike[str]) -> Path:
    """The model file `path` names: itself, or an export directory's engine (preferred) or ONNX."""
    path = Path(path)
    if path.is_dir():
        for name in (ENGINE_NAME, ONNX_NAME):
            if (path / name).is_file():
                return path / name
        raise BackendError(f"export directory {path} has neither {ENGINE_NAME} nor {ONNX_NAME}")
    suffix = path.suffix.lower()
    if suffix not in TENSORRT_SUFFIXES + ONNX_SUFFIXES:
        raise BackendError(f"cannot tell what kind of model {path} is: give {ACCEPTED_KINDS}")
    if not path.is_file():
        raise BackendError(f"model file {path} does not exist")
    return path


def load_model_metadata(model_path: str | os.PathLike[str]) -> ModelMetadata:
    """The metadata sidecar next to a model file; a clear BackendError when it is missing."""
    sidecar = Path(model_path).parent / MODEL_METADATA
    if not sidecar.is_file():
        raise BackendError(f"{model_path} has no {MODEL_METADATA} beside it: keep the model in the "
                           "directory pid-export wrote (the runtime needs that metadata)")
    try:
        return ModelMetadata.load(sidecar)
    except MetadataError as exc:
        raise BackendError(str(exc)) from None


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`None`/"auto": the current CUDA device when torch sees one, else the CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError):
        raise BackendError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if resolved.type not in ("cpu", "cuda"):
        raise BackendError(f"unsupported device {device!r}: use auto, cpu, cuda or cuda:N")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendError(f"device {device} requested but torch sees no CUDA GPU")
        if resolved.index is None:
            resolved = torch.device("cuda", torch.cuda.current_device())
        elif resolved.index >= torch.cuda.device_count():
            raise BackendError(f"device {device} requested but only {torch.cuda.device_count()} CUDA GPU(s) exist")
    return resolved


def preflight(path: str | os.PathLike[str]) -> Path:
    """Cheap checks before any input is read: the model file, and TensorRT for an engine.

    An engine's blockers (not a plan at all, TensorRT missing) are reported first,
    so `pid-run some.plan ...` on a machine without TensorRT says so straight away.
    """
    path = Path(path)
    named = path / ENGINE_NAME if path.is_dir() and (path / ENGINE_NAME).is_file() else path
    if named.suffix.lower() in TENSORRT_SUFFIXES:
        from .tensorrt import probe_plan, require_tensorrt  # both work without TensorRT

        problem = probe_plan(named)
        if problem is not None:
            raise BackendError(problem)
        try:
            require_tensorrt()
        except BackendError as exc:
            raise BackendError(f"cannot run {named}: {exc}") from None
    return resolve_model_path(path)


def open_backend(path: str | os.PathLike[str], device: str | torch.device | None = None,
                 cuda_graph: bool = False) -> Backend:
    """Open the model at `path` with the backend its kind needs (see the module docstring)."""
    model_path = preflight(path)
    if model_path.suffix.lower() in TENSORRT_SUFFIXES:
        from .tensorrt import TensorRTBackend  # importable without TensorRT; it imports TensorRT lazily

        # "auto" is left to the engine's backend: it needs a CUDA device and says so.
        chosen = None if device is None or str(device) == "auto" else resolve_device(device)
        return TensorRTBackend(model_path, device=chosen, cuda_graph=cuda_graph)
    if cuda_graph:
        raise BackendError("--cuda-graph needs a TensorRT engine (.plan); ONNX Runtime models run without it")
    from .onnxruntime import OnnxRuntimeBackend

    return OnnxRuntimeBackend(model_path, device=device)
