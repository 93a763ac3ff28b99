"""Batching that never changes an image: per-item noise, request checks and `decode_many`.

A served or batch-job decode gathers unrelated requests into one network call. With
the whole-batch reference noise of `pid-run --seed` (`SeededNoise`), an item's noise
would depend on its position and its batch-mates; `PerItemNoise` instead draws each
item's noise exactly as a decode of that item alone with its own seed draws it (one
`SeededNoise` of batch 1 per item). So an item decoded inside any batch equals the
same item decoded alone (`pid-run LATENT --seed S`) on the same device, provided the
backend computes each batch row independently of the others (checked bitwise for
ONNX Runtime on the CPU in tests/test_serve.py).

`decode_many(backend, requests)` groups requests that can share a network call
(same latent shape, output size, steps and caption length), runs each group in
batches of at most the profile's limit, and returns one `Outcome` per request, in
order: a bad request gets its error, the others still decode. `check_request` is the
cheap validation of one request (shapes, values, sizes) before any work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .backends.base import Backend, BackendError
from .decode import DecodeError, DecodeInputs, check_inputs, decode, fixed_batch, profile_batch_range
from .errors import first_line
from .sampler import MAX_STEPS, PerItemNoise  # PerItemNoise: re-exported, batching's noise
from .sizes import supported_size_range
from .tiling import TileSetting, canvas_size_range

DEFAULT_MAX_BATCH = 8  # ONNX Runtime has no profile; beyond a few items a batch gains little on a CPU


@dataclass(frozen=True)
class DecodeRequest:
    """One image to decode, in the network's layout (packed pipeline latents already unpacked)."""

    latents: Tensor  # [1,C,h,w] float32
    seed: int
    caption: Tensor | None = None  # [1,L,D] float32; None: the caller's default (unconditional) caption
    sigma: float = 0.0
    steps: int = MAX_STEPS
    size: tuple[int, int] | None = None  # output (H, W); None: the latent's native size
    tile: TileSetting = "auto"  # as PidDecoder.decode / pid-run --tile (pid_runtime.tiling)


@dataclass(frozen=True)
class Outcome:
    """What became of one request: the image float32 [1,3,H,W] in [-1,1] (CPU), or the error line."""

    image: Tensor | None = None
    error: str | None = None
    internal: bool = False  # the error is the backend's (a failed network call), not the request's

    @property
    def ok(self) -> bool:
        return self.error is None


def check_request(backend: Backend, request: DecodeRequest, default_caption: Tensor | None = None) -> DecodeInputs:
    """Validate one request against the model without decoding; DecodeError says what is wrong."""
    if request.latents.ndim != 4 or request.latents.shape[0] != 1:
        raise DecodeError(f"a request holds one latent [1,C,h,w], got shape {list(request.latents.shape)}")
    caption = request.caption if request.caption is not None else default_caption
    if caption is None:
        raise DecodeError("no caption embeddings given and no default caption")
    if caption.ndim != 3 or caption.shape[0] != 1:
        raise DecodeError(f"a request's caption embeddings are [1,L,D], got shape {list(caption.shape)}")
    if not isinstance(request.seed, int) or isinstance(request.seed, bool) or not 0 <= request.seed < 2 ** 63:
        raise DecodeError(f"seed must be an integer in [0, 2^63), got {request.seed!r}")
    size_range, source = supported_size_range(backend)
    return check_inputs(backend.meta, request.latents.to(torch.float32), caption.to(torch.float32), request.sigma,
                        request.steps, size_range=canvas_size_range(size_range, request.tile), range_source=source,
                        size=request.size)


def batch_limit(backend: Backend, max_batch: int | None = None) -> int:
    """Most items per network call: the engine profile's maximum, a static export's batch, else
    `max_batch` (default DEFAULT_MAX_BATCH); never above the profile."""
    profile = profile_batch_range(backend)
    fixed = fixed_batch(backend.meta)
    if fixed is not None:
        return fixed
    limit = max_batch or DEFAULT_MAX_BATCH
    return min(limit, profile[1]) if profile is not None else limit


def _group_key(checked: DecodeInputs, request: DecodeRequest) -> tuple:
    return (tuple(checked.latents.shape[1:]), checked.height, checked.width, request.steps, checked.caption.shape[1],
            request.tile)


def _decode_group(backend: Backend, items: list[tuple[int, DecodeRequest, DecodeInputs]],
                  outcomes: list[Outcome | None]) -> None:
    """Decode one batch of compatible, checked requests; on a failure, each alone (so only the bad one fails)."""
    first = items[0][2]
    try:
        result = decode(backend, torch.cat([c.latents for _, _, c in items]),
                        torch.cat([c.caption for _, _, c in items]), torch.cat([c.sigma for _, _, c in items]),
                        steps=items[0][1].steps, size=(first.height, first.width),
                        seeds=[r.seed for _, r, _ in items], tile=items[0][1].tile)
    except (DecodeError, BackendError, RuntimeError) as exc:
        if len(items) == 1:
            outcomes[items[0][0]] = Outcome(error=first_line(exc), internal=not isinstance(exc, DecodeError))
            return
        for item in items:
            _decode_group(backend, [item], outcomes)
        return
    for row, (index, _, _) in enumerate(items):
        outcomes[index] = Outcome(image=result.images[row:row + 1].clone())


def decode_many(backend: Backend, requests: Sequence[DecodeRequest], default_caption: Tensor | None = None,
                max_batch: int | None = None) -> list[Outcome]:
    """Decode every request (see the module docstring); one Outcome per request, in order."""
    outcomes: list[Outcome | None] = [None] * len(requests)
    groups: dict[tuple, list[tuple[int, DecodeRequest, DecodeInputs]]] = {}
    for index, request in enumerate(requests):
        try:
            checked = check_request(backend, request, default_caption)
        except DecodeError as exc:
            outcomes[index] = Outcome(error=first_line(exc))
            continue
        groups.setdefault(_group_key(checked, request), []).append((index, request, checked))
    limit = batch_limit(backend, max_batch)
    for members in groups.values():
        for start in range(0, len(members), limit):
            _decode_group(backend, members[start:start + limit], outcomes)
    return [outcome if outcome is not None else Outcome(error="not decoded") for outcome in outcomes]


__all__ = ["DEFAULT_MAX_BATCH", "DecodeRequest", "Outcome", "PerItemNoise", "batch_limit", "check_request",
           "decode_many"]
