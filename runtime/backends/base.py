"""The one interface every runtime backend implements.

A backend wraps one exported PiD network (ONNX Runtime session, TensorRT
engine, ...). The decode loop (`pid_runtime.sampler.sample`) only sees
`velocity(x, t)`; per-decode constant inputs are bound once with `bind`.

What `pid_runtime.decode` asks of a backend is declared here, with defaults that
mean "nothing special", so the decode never probes for attributes:
    profile_ranges   the input shapes it accepts (an engine's profiles; None: any the graph takes)
    onnx_path        the ONNX file whose weights it holds on the host (None: none)
    sample           the whole sampler loop for the bound inputs (TensorRT overrides it)
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch import Tensor

from ..metadata import MODEL_METADATA, MetadataError, ModelMetadata
from ..sampler import MAX_STEPS, sample
from ..signature import Shape

if TYPE_CHECKING:
    from ..sampler import Noise

# Per input name: (min shape, max shape) that some optimization profile accepts.
ProfileRanges = dict[str, tuple[Shape, Shape]]


class BackendError(RuntimeError):
    """A problem the user can fix (bad model file, missing library, shape outside the profile)."""


class OutOfDeviceMemory(BackendError):
    """The device has too little free memory for these shapes (the message says what to make smaller)."""


class Backend(ABC):
    name: str = "base"
    # None: any shape the exported graph takes (its own limits are in the metadata).
    profile_ranges: ProfileRanges | None = None
    # The ONNX model run from the host, whose weight files count toward a --max-memory budget.
    onnx_path: Path | None = None

    def __init__(self, meta: ModelMetadata, device: torch.device):
        self.meta = meta
        self.device = device

    @abstractmethod
    def bind(self, y: Tensor, lq_latent: Tensor, degrade_sigma: Tensor, height: int, width: int) -> None:
        """Fix the per-decode inputs (float32, on any device) for output size (height, width).

        Called once per decode before the sampler runs; a backend allocates or
        reuses its per-shape buffers here.
        """

    @abstractmethod
    def velocity(self, x: Tensor, t: Tensor) -> Tensor:
        """Network output [B,3,H,W] float32 on `self.device`; t is [B], already x1000."""

    def input_buffer(self) -> Tensor | None:
        """A device tensor the sampler may keep x in, so `velocity` needs no copy (TensorRT)."""
        return None

    def sample(self, noise: "Tensor | Noise", eps: Sequence[Tensor] | Tensor | None = None, steps: int = MAX_STEPS,
               on_step: Callable[[int, float], None] | None = None, out: Tensor | None = None) -> Tensor:
        """The sampler loop over `velocity` for the bound inputs (arguments: `pid_runtime.sampler.sample`).

        x lives in `input_buffer()` when there is one (the network reads it without a copy); on
        the CPU, in `out` itself, so the result needs no copy at the end either.
        """
        x_buffer = self.input_buffer()
        if x_buffer is None and out is not None and out.device.type == self.device.type == "cpu":
            x_buffer = out
        return sample(self.velocity, noise, eps, steps, x_buffer=x_buffer, on_step=on_step, out=out)

    def close(self) -> None:
        """Release what `bind` allocated. The backend stays usable: a later `bind` allocates again
        (so a decoder used in `with` can be used again); the model itself is kept."""


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
