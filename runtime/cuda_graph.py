"""The whole sampler loop captured as one CUDA graph (`pid-run --cuda-graph`).

A graph replays fixed kernels on fixed addresses, so:
- one capture serves one (batch, H, W, steps); a new shape needs a new capture;
- the graph reads noise and eps from its own static buffers: each run copies
  the caller's noise/eps into them (one device copy each) and returns a copy of
  the graph's static output;
- the velocity function must keep its inputs and outputs at fixed addresses
  between calls (the TensorRT backend's bound buffers do) and must run its work
  on the current torch stream while capturing;
- per-step callbacks cannot fire during a replay (the steps are one launch).

Backend-agnostic: works for any velocity function that runs on CUDA.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .sampler import VelocityFn, num_renoise, sample


class CapturedSampler:
    def __init__(self, velocity: VelocityFn, shape: Sequence[int], steps: int, device: torch.device,
                 x_buffer: Tensor | None = None):
        self.shape = tuple(shape)
        self.steps = steps
        self.noise = torch.zeros(self.shape, dtype=torch.float32, device=device)
        self.eps = [torch.zeros_like(self.noise) for _ in range(num_renoise(steps))]
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            # Warm-up outside the capture: TensorRT needs one execute before it
            # can be captured, and torch initialises its kernels lazily.
            sample(velocity, self.noise, self.eps, steps, x_buffer=x_buffer)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=side):
            self.output = sample(velocity, self.noise, self.eps, steps, x_buffer=x_buffer)

    def __call__(self, noise: Tensor, eps: Sequence[Tensor]) -> Tensor:
        if tuple(noise.shape) != self.shape:
            raise ValueError(f"captured for noise shape {list(self.shape)}, got {list(noise.shape)}")
        if len(eps) < len(self.eps):
            raise ValueError(f"{self.steps} steps need {len(self.eps)} eps tensors, got {len(eps)}")
        self.noise.copy_(noise)
        for static, given in zip(self.eps, eps):
            static.copy_(given)
        self.graph.replay()
        return self.output.clone()
