"""Runtime backends, chosen by the model path (one module per backend, one interface).

    *.plan, *.engine   TensorRT / TensorRT-RTX engine (backends/tensorrt.py, imported only when asked for)
    *.onnx             ONNX Runtime session   (backends/onnxruntime.py; CUDA provider when available)
    a directory        its engine.plan if present and runnable here, else its model.onnx

Each model file has the export's metadata sidecar (pid_export.json) beside it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from ..metadata import ENGINE_NAME, ONNX_NAME
# The helpers every backend uses live with the interface (base.py), not in this factory.
from .base import Backend, BackendError, load_model_metadata, resolve_device

TENSORRT_SUFFIXES = (".plan", ".engine")
ONNX_SUFFIXES = (".onnx",)
ACCEPTED_KINDS = "a TensorRT engine (.plan/.engine), an ONNX model (.onnx) or an export directory"

__all__ = ["ACCEPTED_KINDS", "Backend", "BackendError", "load_model_metadata", "open_backend",
           "preflight", "resolve_model_path", "resolve_device"]


def resolve_model_path(path: str | os.PathLike[str], trt: str | None = None,
                       note: Callable[[str], None] | None = None,
                       device: str | torch.device | None = None) -> Path:
    """The model file `path` names: itself, or an export directory's engine (preferred when it
    can run here, on `device`) or ONNX. A directory whose engine cannot run on this machine (no GPU, no
    library for it; TensorRT-RTX builds engines on CPU-only machines) uses its ONNX, with a note."""
    path = Path(path)
    if path.is_dir():
        engine, onnx = path / ENGINE_NAME, path / ONNX_NAME
        if engine.is_file():
            from ..trt_plan import why_plan_cannot_run_here  # needs no TensorRT

            problem = why_plan_cannot_run_here(engine, trt, device) if onnx.is_file() else None
            if problem is None:
                return engine
            if note is not None:
                note(f"note: {engine} cannot run here ({problem}); using {onnx} with ONNX Runtime")
            return onnx
        if onnx.is_file():
            return onnx
        raise BackendError(f"export directory {path} has neither {ENGINE_NAME} nor {ONNX_NAME}")
    suffix = path.suffix.lower()
    if suffix not in TENSORRT_SUFFIXES + ONNX_SUFFIXES:
        raise BackendError(f"cannot tell what kind of model {path} is: give {ACCEPTED_KINDS}")
    if not path.is_file():
        raise BackendError(f"model file {path} does not exist")
    return path


def preflight(path: str | os.PathLike[str], trt: str | None = None,
              note: Callable[[str], None] | None = None, device: str | torch.device | None = None) -> Path:
    """Cheap checks before any input is read: the model file, and a TensorRT library for an engine.

    `device` is the one that will run it (None/"auto": the current CUDA device): an engine is
    checked against that GPU, so `--device cuda:1` with an H100 plan is not judged by cuda:0.

    An engine's blockers (not a plan at all, no library that can load it, no GPU it runs on)
    are reported first, so `pid-run some.plan ...` on a machine without TensorRT says so
    straight away.
    """
    model_path = resolve_model_path(path, trt, note, device)
    if model_path.suffix.lower() in TENSORRT_SUFFIXES:
        from ..trt_plan import ONNX_FALLBACK, probe_plan, why_plan_cannot_run_here  # all work without TensorRT

        problem = probe_plan(model_path)
        if problem is not None:
            raise BackendError(problem)
        why = why_plan_cannot_run_here(model_path, trt, device)
        if why is not None:
            raise BackendError(f"cannot run {model_path}: {why} ({ONNX_FALLBACK})")
    return model_path


def open_backend(path: str | os.PathLike[str], device: str | torch.device | None = None,
                 cuda_graph: bool = False, trt: str | None = None,
                 log: Callable[[str], None] | None = None, threads: int | None = None) -> Backend:
    """Open the model at `path` with the backend its kind needs (see the module docstring).

    `trt` picks the TensorRT library for an engine (default: the one that built it);
    `log` receives notes (which model file a directory resolved to, runtime-cache notes).
    `threads`: ONNX Runtime's intra-op threads (TensorRT runs on the GPU and ignores it).
    """
    model_path = preflight(path, trt, log, device)
    if model_path.suffix.lower() in TENSORRT_SUFFIXES:
        from .tensorrt import TensorRTBackend  # importable without TensorRT; it imports TensorRT lazily

        # "auto" is left to the engine's backend: it needs a CUDA device and says so.
        chosen = None if device is None or str(device) == "auto" else resolve_device(device)
        return TensorRTBackend(model_path, device=chosen, cuda_graph=cuda_graph, log=log, library=trt)
    if cuda_graph:
        raise BackendError("--cuda-graph needs a TensorRT engine (.plan); ONNX Runtime models run without it")
    from .onnxruntime import OnnxRuntimeBackend

    return OnnxRuntimeBackend(model_path, device=device, threads=threads)
