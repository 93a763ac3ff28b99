"""The PiD 4-step distilled sampler (SPEC sec. 4), backend-agnostic.

`sample` drives any `velocity(x, t) -> v` callable (t already x1000, shape [B]);
all step math runs on the device of the noise. `draw_noise` reproduces the
reference's noise order: one torch.Generator on the run device, seeded once,
draws the initial noise and then one `eps` per re-noise step.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

T_LIST = (0.999, 0.866, 0.634, 0.342, 0.0)
MAX_STEPS = len(T_LIST) - 1
TIMESCALE = 1000.0

VelocityFn = Callable[[Tensor, Tensor], Tensor]


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


def draw_noise(shape: Sequence[int], steps: int, seed: int, device: torch.device | str) -> tuple[Tensor, list[Tensor]]:
    """Initial noise and the re-noise eps, drawn in the reference order."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    noise = torch.randn(tuple(shape), generator=gen, device=device, dtype=torch.float32)
    eps = [torch.randn(tuple(shape), generator=gen, device=device, dtype=torch.float32)
           for _ in range(num_renoise(steps))]
    return noise, eps


def sample(velocity: VelocityFn, noise: Tensor, eps: Sequence[Tensor], steps: int = MAX_STEPS,
           x_buffer: Tensor | None = None,
           on_step: Callable[[int, float], None] | None = None) -> Tensor:
    """Run the sampler; returns the clamped sample in [-1, 1], float32 [B,3,H,W].

    `x_buffer`, when given, holds x between steps (a backend's bound input
    buffer, so the network reads it without a copy). `on_step(i, t)` is called
    after each network call (for timing / progress).
    """
    ts = timesteps(steps)
    if len(eps) < num_renoise(steps):
        raise ValueError(f"{steps} steps need {num_renoise(steps)} eps tensors, got {len(eps)}")
    x = noise.clone() if x_buffer is None else x_buffer.copy_(noise)
    batch = noise.shape[0]
    for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        t_in = torch.full((batch,), t * TIMESCALE, device=noise.device, dtype=torch.float32)
        v = velocity(x, t_in)
        # The reference forms x0 in float64; elementwise, so cheap on any device.
        x0 = x.double() - t * v.double()
        if t_next > 0:
            x.copy_((1.0 - t_next) * x0 + t_next * eps[i].double())
        else:
            x.copy_(x0)
        if on_step is not None:
            on_step(i, t)
    return x.clamp(-1.0, 1.0)
