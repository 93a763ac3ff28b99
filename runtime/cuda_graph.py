"""The sampler's steps captured as CUDA graphs (`pid-run --cuda-graph`).

One graph per step (the network call and its in-place update of x), replayed
in order. Between replays, eagerly and outside the graphs, the next eps is
drawn into the one static eps buffer the graphs read: the noise (its values
and the order of draws) is exactly what the eager sampler uses, and memory is
the same as without graphs: x (the caller's bound buffer), the network's
output, one eps. Per-step callbacks and the NaN/Inf check of each step's output
run between replays too.

A graph replays fixed kernels on fixed addresses, so:
- one capture serves one (batch, H, W, steps); a new shape needs a new capture;
- the velocity function must keep its inputs and outputs at fixed addresses
  between calls (the TensorRT backend's bound buffers do) and must run its work
  on the current torch stream while capturing.

Backend-agnostic: works for any velocity function that runs on CUDA.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .sampler import (MAX_STEPS, TIMESCALE, Noise, VelocityFn, as_noise, check_finite, finish, float32,
                      num_renoise, sampler_step, timesteps)


def _capture(graph: torch.cuda.CUDAGraph, stream: torch.cuda.Stream, pool: Any,
             step: Callable[[], Tensor]) -> Tensor:
    """`step()` captured into `graph`. When the step itself fails (an engine launch refused
    during capture), that error is raised, not the capture's own "operation not permitted"
    that ending a broken capture raises on top of it."""
    failure: BaseException | None = None
    try:
        with torch.cuda.graph(graph, stream=stream, pool=pool):
            try:
                return step()
            except BaseException as exc:
                failure = exc
                raise
    except BaseException:
        if failure is not None:
            raise failure from None
        raise


class CapturedSampler:
    def __init__(self, velocity: VelocityFn, shape: Sequence[int], steps: int = MAX_STEPS,
                 device: torch.device | str = "cuda", x_buffer: Tensor | None = None):
        self.shape = tuple(int(d) for d in shape)
        self.steps = steps
        self.device = torch.device(device)
        self.ts = timesteps(steps)
        with torch.cuda.device(self.device):
            self.x = torch.zeros(self.shape, dtype=torch.float32, device=self.device) if x_buffer is None \
                else x_buffer
            if tuple(self.x.shape) != self.shape:
                raise ValueError(f"x buffer is {list(self.x.shape)}, captured shape {list(self.shape)}")
            self.eps = torch.zeros_like(self.x) if num_renoise(steps) else None
            batch = self.shape[0]
            self.t_in = [torch.full((batch,), float32(t) * TIMESCALE, device=self.device) for t in self.ts[:-1]]
            pairs = list(zip(self.ts[:-1], self.ts[1:]))
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                # Warm-up outside the capture: TensorRT needs one execute before it can be
                # captured, and torch initialises its kernels lazily. One step is enough (every
                # step runs the same network; a whole decode per new shape costs seconds at 4K).
                # x holds zeros or the caller's last values; finite, and overwritten on every run.
                self.x.zero_()
                sampler_step(velocity, self.x, self.eps, self.t_in[0], *pairs[0])
            torch.cuda.current_stream(self.device).wait_stream(side)
            self.graphs: list[torch.cuda.CUDAGraph] = []
            self.outputs: list[Tensor] = []  # each step's network output (its address is fixed)
            pool = None
            for i, (t, t_next) in enumerate(pairs):
                graph = torch.cuda.CUDAGraph()
                self.outputs.append(_capture(graph, side, pool, lambda: sampler_step(
                    velocity, self.x, self.eps, self.t_in[i], t, t_next)))
                pool = graph.pool()  # one memory pool for all steps
                self.graphs.append(graph)

    def __call__(self, noise: Tensor | Noise, eps: Sequence[Tensor] | Tensor | None = None,
                 on_step: Callable[[int, float], None] | None = None, out: Tensor | None = None) -> Tensor:
        """The clamped sample for this noise (see `pid_runtime.sampler.sample` for `noise`, `eps`, `out`)."""
        source = as_noise(noise, eps)
        if tuple(source.shape) != self.shape:
            raise ValueError(f"captured for noise shape {list(self.shape)}, got {list(source.shape)}")
        with torch.cuda.device(self.device):
            source.initial(self.x)
            for i, (t, t_next) in enumerate(zip(self.ts[:-1], self.ts[1:])):
                if t_next > 0:
                    assert self.eps is not None
                    source.eps(i, self.eps)
                self.graphs[i].replay()
                check_finite(self.outputs[i], i, self.steps)
                if on_step is not None:
                    on_step(i, t)
            # x is the graphs' static buffer: without `out`, the caller gets a copy.
            return finish(self.x, out, x_is_callers=True)
