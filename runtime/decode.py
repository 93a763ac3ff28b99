"""One decode, backend-agnostic: check the inputs, bind, sample (noise drawn lazily), time each step.

Noise and batching: with a seed, the noise is the reference draw for the *whole*
batch (initial noise [B,3,H,W], then one eps [B,3,H,W] per re-noise step, from
one torch.Generator on the backend's device, seeded once), exactly as an
un-chunked reference decode draws it. It is drawn lazily, one tensor at a time
(`pid_runtime.sampler.SeededNoise`), and a chunk of the batch (`batch_size`, or
the engine profile's maximum batch) gets its own rows of those draws, so every
item's image is the same whatever the chunking. With fixed noise (`noise`,
`eps` [S-1,B,3,H,W]) the chunks take rows of the given tensors the same way.

Memory (beyond the network's own buffers): x (the backend's bound input buffer
when it has one), the network output, one eps buffer, and the result, which is
allocated once on the CPU ([B,3,H,W] float32) and filled chunk by chunk; on the
CPU, x lives in the result itself.
"""

from __future__ import annotations

import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from .backends.base import Backend
from .errors import DecodeError
from .metadata import ModelMetadata
from .sampler import MAX_STEPS, FixedNoise, Noise, NonFiniteError, PerItemNoise, SeededNoise, num_renoise, sample
from .sizes import SizeRange, check_graph_limits, check_output_size, output_size, supported_size_range
from .tiling import TiledVelocity, TilePlan, TileSetting, TilingError, canvas_size_range, choose_plan, decode_budget

PATCH_SIZE = 16  # SPEC: every released network; a custom export's own value is in its metadata


@dataclass
class DecodeInputs:
    """Checked inputs, batch-aligned: every tensor has the latents' batch size B."""

    latents: Tensor  # [B,C,h,w]
    caption: Tensor  # [B,Lt,D]
    sigma: Tensor  # [B]
    height: int
    width: int
    noise: Tensor | None = None  # [B,3,H,W]
    eps: Tensor | None = None  # [steps-1,B,3,H,W]

    @property
    def batch(self) -> int:
        return self.latents.shape[0]


@dataclass
class DecodeTimings:
    """Seconds. `steps[c][i]`: network call i of chunk c with its eps draw and step math;
    `loops[c]`: chunk c's whole sampler loop. `noise`: host time spent drawing noise (part
    of the steps; on a GPU the draws are queued asynchronously, so this is their launch time)."""

    noise: float = 0.0
    bind: list[float] = field(default_factory=list)
    steps: list[list[float]] = field(default_factory=list)
    loops: list[float] = field(default_factory=list)
    total: float = 0.0

    def step_totals(self) -> list[float]:
        """Per step index, summed over chunks (empty when a chunk has no per-step times)."""
        if not self.steps or any(len(chunk) != len(self.steps[0]) for chunk in self.steps):
            return []
        return [sum(chunk[i] for chunk in self.steps) for i in range(len(self.steps[0]))]


@dataclass
class DecodeResult:
    images: Tensor  # float32 [B,3,H,W] in [-1,1] (the clamped sample), on the CPU
    timings: DecodeTimings
    seed: int | None


# ---------------------------------------------------------------------------
# Checks


def _need_finite(tensor: Tensor, what: str) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise DecodeError(f"{what} contain NaN or Inf values")


def _batched(values: Tensor, batch: int, what: str, latents_batch_text: str) -> Tensor:
    """Expand a batch of 1 to `batch`; any other count must equal `batch`."""
    if values.shape[0] == batch:
        return values
    if values.shape[0] == 1:
        return values.expand(batch, *values.shape[1:])
    raise DecodeError(f"batch mismatch: {latents_batch_text} but {what} have {values.shape[0]} (give 1 or {batch})")


def check_inputs(meta: ModelMetadata, latents: Tensor, caption: Tensor, sigma: float | Sequence[float] | Tensor,
                 steps: int = MAX_STEPS, noise: Tensor | None = None, eps: Tensor | None = None,
                 size_range: SizeRange | None = None, range_source: str = "export",
                 size: tuple[int, int] | None = None) -> DecodeInputs:
    """Validate everything against the model and each other; raise DecodeError with the fix.

    `size` = output (height, width); default the latent's native size.
    """
    if not 1 <= steps <= MAX_STEPS:
        raise DecodeError(f"steps must be between 1 and {MAX_STEPS}, got {steps}")
    if latents.ndim != 4:
        raise DecodeError(f"latents have shape {list(latents.shape)}, expected [B,C,h,w]")
    batch, channels, lat_h, lat_w = latents.shape
    if channels != meta.latent_channels:
        model = meta.release or "this model"
        raise DecodeError(f"latents have {channels} channels but {model} takes {meta.latent_channels}-channel latents "
                          "(was the latent made by a different LDM?)")
    height, width = output_size(meta, latents, size)
    check_graph_limits(meta, (lat_h, lat_w), height, width)
    _need_finite(latents, "latents")
    check_output_size(meta, height, width, (lat_h, lat_w), size_range, range_source, requested=size is not None)
    items = f"latents have {batch} item{'s' if batch != 1 else ''}"

    if caption.ndim != 3:
        raise DecodeError(f"caption embeddings have shape {list(caption.shape)}, expected [B or 1, tokens, dim]")
    if caption.shape[-1] != meta.txt_embed_dim:
        raise DecodeError(f"caption embeddings have dim {caption.shape[-1]} but this model takes "
                          f"{meta.txt_embed_dim} (Gemma-2-2b-it hidden states for the released models)")
    if caption.shape[1] == 0:
        raise DecodeError("caption embeddings have 0 tokens")
    _need_finite(caption, "caption embeddings")
    # The network reads only the first txt_max_length tokens (SPEC 3.5); longer files are cut here.
    caption = _batched(caption[:, : meta.txt_max_length], batch, "caption embeddings", items)

    sigma_t = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1)
    if sigma_t.numel() == 0:
        raise DecodeError("no sigma given")
    if not bool(torch.isfinite(sigma_t).all()) or bool(((sigma_t < 0) | (sigma_t > 1)).any()):
        raise DecodeError(f"sigma must be within [0, 1] (0 for a final, clean latent), got "
                          f"{', '.join(f'{s:g}' for s in sigma_t.tolist())}")
    sigma_t = _batched(sigma_t, batch, "sigma values", items)

    if (noise is None) != (eps is None):
        raise DecodeError("fixed noise needs both 'noise' and 'eps'")
    if noise is not None and eps is not None:
        want = [batch, 3, height, width]
        if list(noise.shape) != want:
            kind = "batch mismatch" if list(noise.shape[1:]) == want[1:] else "shape mismatch"
            raise DecodeError(f"{kind}: noise is {list(noise.shape)} but these latents need {want}")
        if eps.ndim != 5 or list(eps.shape[1:]) != want or eps.shape[0] < num_renoise(steps):
            raise DecodeError(f"eps is {list(eps.shape)} but {steps} steps on these latents need "
                              f"[{num_renoise(steps)}, {', '.join(map(str, want))}]")
        _need_finite(noise, "noise")
        _need_finite(eps, "eps")
    return DecodeInputs(latents, caption, sigma_t, height, width, noise, eps)


def fixed_batch(meta: ModelMetadata) -> int | None:
    """The batch size a static-shape export was built for (None when dynamic)."""
    for spec in meta.inputs:
        dims = spec.get("shape") or [None]
        if spec.get("name") == "x" and isinstance(dims[0], int) and dims[0] > 0:
            return dims[0]
    return None


def profile_batch_range(backend: Backend) -> tuple[int, int] | None:
    """(min, max) batch of the backend's engine profile (`profile_ranges`), else None (any)."""
    if backend.profile_ranges is None:
        return None
    low, high = backend.profile_ranges["x"]
    return int(low[0]), int(high[0])


def chunk_bounds(batch: int, batch_size: int | None, meta: ModelMetadata,
                 batch_range: tuple[int, int] | None = None) -> list[tuple[int, int]]:
    """[(lo, hi), ...]: the items each chunk decodes.

    `batch_range` (the engine profile's min and max batch) caps the chunk size at
    the profile's maximum, so a larger batch decodes in chunks instead of failing.
    """
    size = batch if batch_size is None else batch_size
    if size < 1:
        raise DecodeError(f"batch size must be at least 1, got {size}")
    if batch_range is not None:
        size = min(size, batch_range[1])
    size = min(size, meta.limits.max_batch)  # the graph's own bound on items per call
    bounds = [(start, min(start + size, batch)) for start in range(0, batch, size)]
    fixed = fixed_batch(meta)
    if fixed is not None and any(stop - start != fixed for start, stop in bounds):
        raise DecodeError(f"this export has a fixed batch of {fixed}: decode {fixed} item(s) at a time "
                          f"(--batch-size {fixed} with a multiple of {fixed} latents) or re-export with dynamic shapes")
    if batch_range is not None and any(stop - start < batch_range[0] for start, stop in bounds):
        raise DecodeError(f"the engine's profile needs at least {batch_range[0]} items per call: decode a "
                          f"multiple of {batch_range[0]} latents, or build the engine with a minimum batch of 1")
    return bounds


# ---------------------------------------------------------------------------
# The decode


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _TimedNoise(Noise):
    """A noise source that adds the host seconds spent drawing to `timings.noise`."""

    def __init__(self, inner: Noise, timings: DecodeTimings):
        self.inner, self.timings, self.shape, self.device = inner, timings, inner.shape, inner.device

    def _timed(self, draw: Callable[[], None]) -> None:
        start = time.perf_counter()
        draw()
        self.timings.noise += time.perf_counter() - start

    def initial(self, out: Tensor) -> None:
        self._timed(lambda: self.inner.initial(out))

    def eps(self, index: int, out: Tensor) -> None:
        self._timed(lambda: self.inner.eps(index, out))

    def rows(self, lo: int, hi: int) -> Noise:
        return _TimedNoise(self.inner.rows(lo, hi), self.timings)


def decode(backend: Backend, latents: Tensor, caption: Tensor, sigma: float | Sequence[float] | Tensor = 0.0,
           seed: int | None = 0, steps: int = MAX_STEPS, noise: tuple[Tensor, Tensor] | None = None,
           batch_size: int | None = None,
           on_step: Callable[[int, int, float, float], None] | None = None,
           size: tuple[int, int] | None = None, seeds: Sequence[int] | None = None, tile: TileSetting = None,
           max_memory: float | None = None, on_tile: Callable[[int, int], None] | None = None,
           on_plan: Callable[[TilePlan], None] | None = None) -> DecodeResult:
    """Decode `latents` [B,C,h,w] to images float32 [B,3,H,W] in [-1,1] (on the CPU).

    `seeds` (one per item) gives each item its own noise, drawn as a decode of that item
    alone with its seed draws it (`pid_runtime.sampler.PerItemNoise`): an item's image then
    does not depend on its batch-mates. Without it, `seed` is the whole batch's reference noise.

    `size` = (H, W), multiples of 16 near the latent's aspect ratio; default its native size.

    `noise` = (noise [B,3,H,W], eps [S-1,B,3,H,W]) replaces the seeded draw.
    `batch_size` decodes at most that many items at a time (an engine's profile caps it too).
    `on_step(chunk, step, t, seconds)` reports each network step as it finishes.
    `tile`: "auto" | (h, w) | (h, w, overlap) | None / "off" (pid_runtime.tiling); `max_memory` GiB
    (default: what is free); a decode whose estimate exceeds it is tiled (auto) or refused.
    `on_plan(plan)` hears the tile plan when the decode tiles; `on_tile(index, count)` each tile.
    """
    fixed_noise, fixed_eps = noise if noise is not None else (None, None)
    size_range, range_source = supported_size_range(backend)
    canvas_range = canvas_size_range(size_range, tile)
    inputs = check_inputs(backend.meta, latents, caption, sigma, steps, fixed_noise, fixed_eps,
                          canvas_range, range_source, size)
    try:
        plan = choose_plan(backend, (inputs.height, inputs.width), inputs.latents,
                           min(inputs.batch, batch_size or inputs.batch), tile, size_range,
                           decode_budget(backend.device, max_memory), model_file_bytes(backend))
    except TilingError as exc:
        raise DecodeError(str(exc)) from None
    if plan is not None and on_plan is not None:
        on_plan(plan)
    # A tiled decode goes item by item: each tile then holds one item's activations.
    bounds = chunk_bounds(inputs.batch, 1 if plan is not None and fixed_batch(backend.meta) is None else batch_size,
                          backend.meta, profile_batch_range(backend))
    device = backend.device
    timings = DecodeTimings()
    start = time.perf_counter()

    shape = (inputs.batch, 3, inputs.height, inputs.width)
    source: Noise
    if inputs.noise is not None and inputs.eps is not None:
        source = FixedNoise(inputs.noise, inputs.eps[: num_renoise(steps)])
        used_seed = None
    elif seeds is not None:
        if len(seeds) != inputs.batch:
            raise DecodeError(f"{len(seeds)} seeds for {inputs.batch} latents: give one seed per item")
        source = PerItemNoise(shape, seeds, device)
        used_seed = None
    else:
        if seed is None:
            raise DecodeError("give a seed or fixed noise")
        source = SeededNoise(shape, seed, device)
        used_seed = seed
    source = _TimedNoise(source, timings)
    images = torch.empty(shape, dtype=torch.float32)  # the result, filled chunk by chunk

    for chunk, (lo, hi) in enumerate(bounds):
        t0 = time.perf_counter()
        tiled: TiledVelocity | None = None
        if plan is None:
            backend.bind(inputs.caption[lo:hi].to(device), inputs.latents[lo:hi].to(device),
                         inputs.sigma[lo:hi].to(device), inputs.height, inputs.width)
        else:  # each tile binds its own crop; the sampler and its noise stay whole-canvas
            tiled = TiledVelocity(backend, plan, inputs.caption[lo:hi], inputs.latents[lo:hi],
                                     inputs.sigma[lo:hi], on_tile)
        _sync(device)
        timings.bind.append(time.perf_counter() - t0)
        chunk_steps: list[float] = []
        loop_start = time.perf_counter()
        last = [loop_start]

        def record(step: int, t: float, chunk: int = chunk, chunk_steps: list[float] = chunk_steps,
                   last: list[float] = last) -> None:
            _sync(device)
            now = time.perf_counter()
            chunk_steps.append(now - last[0])
            last[0] = now
            if on_step is not None:
                on_step(chunk, step, t, chunk_steps[-1])

        result_rows = images[lo:hi]
        try:
            if tiled is None:  # the backend's loop (TensorRT's: x in its bound buffer, optionally CUDA graphs)
                backend.sample(source.rows(lo, hi), None, steps, on_step=record, out=result_rows)
            else:  # tiles have no input buffer: x lives in the result on the CPU, else on the device
                x_buffer = result_rows if device.type == "cpu" else torch.empty(
                    result_rows.shape, dtype=torch.float32, device=device)
                sample(tiled, source.rows(lo, hi), steps=steps, x_buffer=x_buffer,
                       on_step=record, out=result_rows)
                del x_buffer
        except NonFiniteError as exc:  # e.g. an fp16 engine overflowing
            where = f" (items {lo + 1}..{hi} of {inputs.batch})" if len(bounds) > 1 else ""
            raise DecodeError(f"{exc}{where}") from None
        _sync(device)
        timings.loops.append(time.perf_counter() - loop_start)
        timings.steps.append(chunk_steps)
    timings.total = time.perf_counter() - start
    return DecodeResult(images, timings, used_seed)


def model_file_bytes(backend: Backend) -> int:
    """Size of the model's weight files (ONNX and its external data), for a --max-memory budget."""
    path = backend.onnx_path
    if path is None:
        return 0
    files = [path, Path(f"{path}.data")]
    return sum(f.stat().st_size for f in files if f.is_file())


def format_timings(timings: DecodeTimings) -> str:
    """The summary line: total, then where the time went (per-step lines come from `on_step`)."""
    per_step = timings.step_totals()
    detail = f" ({', '.join(f'{seconds * 1e3:.1f}' for seconds in per_step)} ms)" if per_step else ""
    chunks = f", {len(timings.loops)} chunks" if len(timings.loops) > 1 else ""
    return (f"total {timings.total:.3f} s: steps {sum(timings.loops):.3f} s{detail} including noise draws "
            f"{timings.noise * 1e3:.1f} ms, bind {sum(timings.bind) * 1e3:.1f} ms{chunks}")


# The size checks are pid_runtime.sizes'; DecodeError is pid_runtime.errors', importable from here too.
__all__ = ["DecodeError", "DecodeInputs", "DecodeResult", "DecodeTimings", "check_inputs", "decode", "fixed_batch",
           "format_timings", "profile_batch_range"]
