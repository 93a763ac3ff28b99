"""Type and value checks of `PidDecoder.decode`'s arguments: the same rules as pid-run's, as DecodeError lines.

Without them an int tensor is silently cast, a PIL image or a string reaches torch as a raw
error, and `size="64x96"` is read as the characters ('6', '4').
"""

from __future__ import annotations

from numbers import Real
from typing import Any

import numpy as np
import torch

from .decode import DecodeError
from .preflight import check_seed
from .sampler import MAX_STEPS


def _kind(value: Any) -> str:
    kind = type(value)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def check_array(value: Any, what: str) -> None:
    """A floating-point torch.Tensor or numpy array (what a pipeline's output_type="latent" gives)."""
    if not isinstance(value, (torch.Tensor, np.ndarray)):
        raise DecodeError(f"{what} must be a torch.Tensor or numpy array, got {_kind(value)}")
    floating = value.is_floating_point() if isinstance(value, torch.Tensor) else np.issubdtype(value.dtype,
                                                                                               np.floating)
    if not floating:
        dtype = str(value.dtype).removeprefix("torch.")
        raise DecodeError(f"{what} are {dtype}, expected a floating-point type (float16, bfloat16 or float32)")
    if 0 in tuple(value.shape):
        raise DecodeError(f"{what} have shape {list(value.shape)}: every side must be at least 1")


def _whole(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_size(size: Any) -> tuple[int, int] | None:
    """(height, width) in pixels, two positive whole numbers."""
    if size is None:
        return None
    if isinstance(size, (str, bytes)) or not isinstance(size, (tuple, list)) or len(size) != 2 \
            or not all(_whole(v) and v > 0 for v in size):
        raise DecodeError(f"size must be (height, width) in pixels, two positive whole numbers, got {size!r}")
    return int(size[0]), int(size[1])


def check_sigma(sigma: Any) -> None:
    if isinstance(sigma, torch.Tensor):
        if not sigma.is_floating_point():
            raise DecodeError(f"sigma is a {str(sigma.dtype).removeprefix('torch.')} tensor, expected floating point")
        return
    values = sigma if isinstance(sigma, (list, tuple, np.ndarray)) else [sigma]
    if not all(isinstance(v, Real) and not isinstance(v, (bool, np.bool_)) for v in values):
        raise DecodeError(f"sigma must be a number or a sequence of numbers, got {sigma!r}")


def check_decode_args(latents: Any, prompt: Any, caption_embeds: Any, sigma: Any, seed: Any, height: Any,
                      width: Any, steps: Any, batch_size: Any, output_type: Any, size: Any,
                      output_types: tuple[str, ...]) -> tuple[int, int] | None:
    """Raise DecodeError for the first argument of `PidDecoder.decode` that the CLI would refuse; returns size."""
    if output_type not in output_types:
        raise DecodeError(f"output_type must be one of {', '.join(output_types)}, got {output_type!r}")
    check_array(latents, "latents")
    if caption_embeds is not None:
        check_array(caption_embeds, "caption_embeds")
    if prompt is not None and not isinstance(prompt, str) and not (
            isinstance(prompt, (list, tuple)) and all(isinstance(p, str) for p in prompt)):
        raise DecodeError(f"prompt must be a string or a list of strings, got {_kind(prompt)}")
    check_sigma(sigma)
    if seed is not None:
        check_seed(seed)
    for name, value in (("height", height), ("width", width)):
        if value is not None and not (_whole(value) and value > 0):
            raise DecodeError(f"{name} must be a positive whole number of pixels, got {value!r}")
    if not (_whole(steps) and 1 <= steps <= MAX_STEPS):
        raise DecodeError(f"steps must be a whole number from 1 to {MAX_STEPS}, got {steps!r}")
    if batch_size is not None and not (_whole(batch_size) and batch_size >= 1):
        raise DecodeError(f"batch_size must be a whole number of at least 1, got {batch_size!r}")
    return check_size(size)


__all__ = ["check_array", "check_decode_args", "check_sigma", "check_size"]
