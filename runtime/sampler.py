"""The PiD 4-step distilled sampler (SPEC sec. 4), backend-agnostic and lean.

`sample` drives any `velocity(x, t) -> v` callable (t already x1000, shape [B]).
Memory: x is updated in place, the re-noise draw lives in one eps buffer that
each step refills, and the step math is float32 in place; so a decode holds x,
the network's v, one eps and (when asked) the result, and nothing else that
scales with the image.

Noise comes from a `Noise` source, in the reference order: one generator,
seeded once, draws the initial noise and then one eps per re-noise step, each
for the whole batch. `SeededNoise` draws lazily (one tensor at a time, only
when the sampler needs it) and can hand a chunk of the batch its own rows of
those whole-batch draws (`rows`), in any order, so chunked and unchunked
decodes see the same noise. `FixedNoise` replays given tensors.

Step math, against the reference: it forms x0 = x - t*v in float64 and rounds
it to float32, then re-noises in float32 with float32 t. Here x0 is
`x.sub_(v, alpha=t)`: t as float32, one fused multiply-add, the same value
(checked bitwise on the CPU on 3M random values; CUDA fuses it too), and within
one rounding wherever a kernel would not fuse. The re-noise multiplies exactly
as the reference does.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

T_LIST = (0.999, 0.866, 0.634, 0.342, 0.0)
MAX_STEPS = len(T_LIST) - 1
TIMESCALE = 1000.0

VelocityFn = Callable[[Tensor, Tensor], Tensor]


class NonFiniteError(ValueError):
    """The network returned NaN or Inf at a step (the message names the step)."""


def timesteps(steps: int = MAX_STEPS) -> list[float]:
    """t values for `steps` network calls (1..4), ending at 0."""
    if not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps must be between 1 and {MAX_STEPS}, got {steps}")
    if steps == 1:
        return [1.0, 0.0]  # one step: x0 = noise - v
    # t_list[round(linspace(0, 4, n+1))], with round-half-even like numpy
    idx = [round(i * MAX_STEPS / steps) for i in range(steps + 1)]
    return [T_LIST[i] for i in idx]


def num_renoise(steps: int) -> int:
    """How many eps draws a decode with `steps` calls needs."""
    return steps - 1


# ---------------------------------------------------------------------------
# Noise sources


class Noise(ABC):
    """The randomness of one decode, in the order the sampler uses it."""

    shape: tuple[int, ...]  # [B, 3, H, W]
    device: torch.device  # where it draws (or holds) its values; a sampler's x defaults to it

    @abstractmethod
    def initial(self, out: Tensor) -> None:
        """Write the initial noise into `out` (shape `self.shape`, any device)."""

    @abstractmethod
    def eps(self, index: int, out: Tensor) -> None:
        """Write the eps of re-noise `index` (0 = after the first network call) into `out`."""

    @abstractmethod
    def rows(self, lo: int, hi: int) -> "Noise":
        """The same noise for batch items lo..hi-1 only (a chunk of the batch)."""


class FixedNoise(Noise):
    """Given tensors: noise [B,3,H,W] and eps [S-1,B,3,H,W] (or a list of [B,3,H,W]), on any device."""

    def __init__(self, noise: Tensor, eps: Sequence[Tensor] | Tensor):
        self.noise = noise
        self.eps_list = list(eps)
        self.shape = tuple(noise.shape)
        self.device = noise.device

    def initial(self, out: Tensor) -> None:
        out.copy_(self.noise)

    def eps(self, index: int, out: Tensor) -> None:
        if index >= len(self.eps_list):
            raise ValueError(f"re-noise step {index + 1} needs eps tensor {index}, but only "
                             f"{len(self.eps_list)} were given")
        out.copy_(self.eps_list[index])

    def rows(self, lo: int, hi: int) -> "FixedNoise":
        return FixedNoise(self.noise[lo:hi], [e[lo:hi] for e in self.eps_list])


class SeededNoise(Noise):
    """The reference noise of a whole batch for `seed`: one torch.Generator on `device`, seeded once,
    draws the initial noise [B,3,H,W], then eps 0, eps 1, ... (each [B,3,H,W]), in that order.

    Nothing is drawn up front: `draw(k, lo, hi, out)` produces rows lo..hi-1 of draw k
    (0 = the initial noise, k = re-noise k-1) straight into `out`. The generator's state
    is saved where each piece ends, so pieces can be asked for in any order.

    How a piece is cut from a whole-batch draw depends on the generator:
    - CPU: `normal_` on a contiguous float32 tensor draws one uniform per element in
      order and turns them into normals in blocks of 16, so when an item's size
      (3*H*W; H, W multiples of 16) is a multiple of 16, drawing items one after another
      gives exactly the whole-batch values. A chunk is drawn directly; items before it
      that were never drawn are skipped by drawing them into `out` (at most once more
      RNG work than an unchunked decode, no extra memory).
    - CUDA: a draw's values depend on its total size (Philox offsets per thread of a
      grid sized by the tensor and the GPU), so a chunk draws the whole batch's tensor
      into a temporary and keeps its rows: transient memory of B image-sizes per draw,
      and the RNG work once per chunk (microseconds on a GPU).
    An unchunked decode (lo, hi = 0, B) always draws straight into `out`.
    """

    BLOCK = 16  # CPU normal_ works on blocks of 16 values (ATen normal_fill)

    def __init__(self, shape: Sequence[int], seed: int, device: torch.device | str):
        self.shape = tuple(int(d) for d in shape)
        self.batch = self.shape[0]
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # compare equal to tensors' devices
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        item_size = math.prod(self.shape[1:])
        # Items are the unit where draws are exact per item (CPU), else whole draws.
        self.item_exact = self.device.type == "cpu" and item_size >= self.BLOCK and item_size % self.BLOCK == 0
        # Generator state at the start of known positions; position = draw * B + item.
        self._states: dict[int, Tensor] = {0: self.generator.get_state()}
        self._at: int | None = 0  # the position the generator is at now (None: unknown)

    # -- the Noise interface (the whole batch) ---------------------------------
    def initial(self, out: Tensor) -> None:
        self.draw(0, 0, self.batch, out)

    def eps(self, index: int, out: Tensor) -> None:
        self.draw(index + 1, 0, self.batch, out)

    def rows(self, lo: int, hi: int) -> Noise:
        if not 0 <= lo < hi <= self.batch:
            raise ValueError(f"rows {lo}..{hi} are outside the batch of {self.batch}")
        return _Rows(self, lo, hi)

    # -- drawing -----------------------------------------------------------------
    def draw(self, draw: int, lo: int, hi: int, out: Tensor) -> None:
        """Rows lo..hi-1 of whole-batch draw `draw` into `out` ([hi-lo, 3, H, W])."""
        want = (hi - lo, *self.shape[1:])
        if tuple(out.shape) != want:
            raise ValueError(f"noise rows {lo}..{hi} have shape {list(want)}, out is {list(out.shape)}")
        direct = out.device == self.device and out.dtype == torch.float32 and out.is_contiguous()
        if self.item_exact or (lo, hi) == (0, self.batch):
            start, end = draw * self.batch + lo, draw * self.batch + hi
            self._seek(start, out if direct else None)
            if direct:
                out.normal_(generator=self.generator)
            else:
                out.copy_(torch.empty(want, device=self.device).normal_(generator=self.generator))
        else:  # a chunk of a draw that can only be made whole
            start, end = draw * self.batch, (draw + 1) * self.batch
            self._seek(start, None)
            whole = torch.empty(self.shape, device=self.device).normal_(generator=self.generator)
            out.copy_(whole[lo:hi])
            del whole
        self._mark(end)

    def _mark(self, position: int) -> None:
        self._at = position
        if position not in self._states:
            self._states[position] = self.generator.get_state()

    def _seek(self, position: int, scratch: Tensor | None) -> None:
        """Put the generator at `position`, skipping (drawing and dropping) what lies between."""
        if self._at == position:
            return
        known = max(p for p in self._states if p <= position)
        self.generator.set_state(self._states[known])
        while known < position:
            if self.item_exact:
                # Skip items; into `scratch` (the caller's out, overwritten next) when it can hold them.
                count = min(position - known, scratch.shape[0] if scratch is not None else 1)
                if scratch is not None:
                    scratch[:count].normal_(generator=self.generator)
                else:
                    torch.empty((count, *self.shape[1:]), device=self.device).normal_(generator=self.generator)
            else:  # whole draws only
                count = self.batch
                torch.empty(self.shape, device=self.device).normal_(generator=self.generator)
            known += count
            self._mark(known)
        self._at = position


class PerItemNoise(Noise):
    """Noise for a batch where item i has its own seed: item i's draws are those of a batch-1
    `SeededNoise(seed_i)`, whatever the batch around it."""

    def __init__(self, shape: Sequence[int], seeds: Sequence[int], device: torch.device | str):
        self.shape = tuple(int(d) for d in shape)
        if len(seeds) != self.shape[0]:
            raise ValueError(f"{len(seeds)} seeds for a batch of {self.shape[0]}")
        self.items = [SeededNoise((1, *self.shape[1:]), int(seed), device) for seed in seeds]
        self.device = self.items[0].device if self.items else torch.device(device)

    @classmethod
    def _of(cls, shape: tuple[int, ...], items: list[SeededNoise]) -> "PerItemNoise":
        noise = cls.__new__(cls)
        noise.shape, noise.items, noise.device = shape, items, items[0].device
        return noise

    def initial(self, out: Tensor) -> None:
        for index, item in enumerate(self.items):
            item.initial(out[index:index + 1])

    def eps(self, index: int, out: Tensor) -> None:
        for row, item in enumerate(self.items):
            item.eps(index, out[row:row + 1])

    def rows(self, lo: int, hi: int) -> Noise:
        if not 0 <= lo < hi <= len(self.items):
            raise ValueError(f"rows {lo}..{hi} are outside the batch of {len(self.items)}")
        return PerItemNoise._of((hi - lo, *self.shape[1:]), self.items[lo:hi])


class _Rows(Noise):
    """Items lo..hi-1 of a SeededNoise."""

    def __init__(self, parent: SeededNoise, lo: int, hi: int):
        self.parent, self.lo, self.hi = parent, lo, hi
        self.shape = (hi - lo, *parent.shape[1:])
        self.device = parent.device

    def initial(self, out: Tensor) -> None:
        self.parent.draw(0, self.lo, self.hi, out)

    def eps(self, index: int, out: Tensor) -> None:
        self.parent.draw(index + 1, self.lo, self.hi, out)

    def rows(self, lo: int, hi: int) -> Noise:
        return self.parent.rows(self.lo + lo, self.lo + hi)


def draw_noise(shape: Sequence[int], steps: int, seed: int, device: torch.device | str) -> tuple[Tensor, list[Tensor]]:
    """Initial noise and all re-noise eps as tensors, in the reference order (what `SeededNoise`
    draws lazily). Holds steps image-sizes at once: for tests, benchmarks and `--noise` files."""
    source = SeededNoise(shape, seed, device)
    noise = torch.empty(tuple(shape), device=device)
    source.initial(noise)
    eps = []
    for index in range(num_renoise(steps)):
        eps.append(torch.empty(tuple(shape), device=device))
        source.eps(index, eps[-1])
    return noise, eps


# ---------------------------------------------------------------------------
# The sampler


def as_noise(noise: Tensor | Noise, eps: Sequence[Tensor] | Tensor | None) -> Noise:
    """A Noise source from either a source or (noise tensor, eps tensors)."""
    if isinstance(noise, Noise):
        if eps is not None:
            raise ValueError("eps is part of the Noise source; pass eps=None")
        return noise
    if eps is None:
        raise ValueError("a noise tensor needs its eps tensors (or pass a Noise source)")
    return FixedNoise(noise, eps)


def float32(value: float) -> float:
    """`value` rounded to float32 (the reference keeps t in a float32 tensor)."""
    return float(np.float32(value))


def check_finite(v: Tensor, step: int, steps: int) -> None:
    """NaN/Inf in the network output of step `step` (0-based) -> NonFiniteError naming it.

    min and max propagate NaN, so two reductions find NaN and +-Inf without a
    full-size temporary (isfinite would allocate a bool per element).
    """
    low, high = torch.aminmax(v)
    if not (math.isfinite(float(low)) and math.isfinite(float(high))):
        raise NonFiniteError(f"the model produced NaN or Inf values at step {step + 1}/{steps} "
                             "(network output before clamping)")


def sampler_step(velocity: VelocityFn, x: Tensor, eps_buffer: Tensor | None, t_in: Tensor, t: float,
                 t_next: float) -> Tensor:
    """One network call and its update of x in place; returns the network output v.

    On entry eps_buffer holds this step's eps (when t_next > 0); it is scaled in place.
    """
    v = velocity(x, t_in)
    x.sub_(v, alpha=t)  # x0 = x - t*v: alpha is float32, one fused multiply-add
    if t_next > 0:
        assert eps_buffer is not None
        t_next32 = float32(t_next)
        eps_buffer.mul_(t_next32)
        x.mul_(float(np.float32(1.0) - np.float32(t_next))).add_(eps_buffer)  # (1 - t_next) in float32
    return v


def finish(x: Tensor, out: Tensor | None, x_is_callers: bool) -> Tensor:
    """Clamp x in place and hand the result over: into `out`, else x itself when the sampler owns it,
    else a copy (a caller's bound buffer is overwritten by its next use)."""
    x.clamp_(-1.0, 1.0)
    if out is not None:
        if out.data_ptr() != x.data_ptr():
            out.copy_(x)
        return out
    return x.clone() if x_is_callers else x


def sample(velocity: VelocityFn, noise: Tensor | Noise, eps: Sequence[Tensor] | Tensor | None = None,
           steps: int = MAX_STEPS, x_buffer: Tensor | None = None,
           on_step: Callable[[int, float], None] | None = None, out: Tensor | None = None) -> Tensor:
    """Run the sampler; returns the clamped sample in [-1, 1], float32 [B,3,H,W].

    `noise`: a `Noise` source, or the initial noise tensor with its `eps` tensors.
    `x_buffer`, when given, holds x between steps (a backend's bound input buffer,
    so the network reads it without a copy); else x is a new tensor on the noise
    tensor's device (a `Noise` source's `device`).
    `out`, when given, receives the result (it may be x_buffer itself, or a tensor
    on another device). `on_step(i, t)` is called after each network call.
    Raises NonFiniteError when a step's network output has NaN or Inf.
    """
    ts = timesteps(steps)
    source = as_noise(noise, eps)
    shape = source.shape
    x = x_buffer if x_buffer is not None else torch.empty(shape, dtype=torch.float32, device=source.device)
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"x buffer is {list(x.shape)} but the noise is {list(shape)}")
    source.initial(x)
    eps_buffer = torch.empty_like(x) if num_renoise(steps) else None
    batch = shape[0]
    for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        t_in = torch.full((batch,), float32(t) * TIMESCALE, device=x.device, dtype=torch.float32)
        if t_next > 0:
            assert eps_buffer is not None
            source.eps(i, eps_buffer)  # drawn before the call: the order of draws is what matters
        v = sampler_step(velocity, x, eps_buffer, t_in, t, t_next)
        check_finite(v, i, steps)
        del v  # the next call's output must not coexist with this one
        if on_step is not None:
            on_step(i, t)
    del eps_buffer
    return finish(x, out, x_is_callers=x_buffer is not None)
