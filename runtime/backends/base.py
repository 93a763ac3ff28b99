"""The one interface every runtime backend implements.

A backend wraps one exported PiD network (ONNX Runtime session, TensorRT
engine, ...). The decode loop (`pid_runtime.sampler.sample`) only sees
`velocity(x, t)`; per-decode constant inputs are bound once with `bind`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from ..metadata import ModelMetadata


class BackendError(RuntimeError):
    """A problem the user can fix (bad model file, missing library, shape outside the profile)."""


class OutOfDeviceMemory(BackendError):
    """The device has too little free memory for these shapes (the message says what to make smaller)."""


class Backend(ABC):
    name: str = "base"

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

    def close(self) -> None:
        """Release what `bind` allocated. The backend stays usable: a later `bind` allocates again
        (so a decoder used in `with` can be used again); the model itself is kept."""
