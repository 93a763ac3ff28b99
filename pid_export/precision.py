"""Precision policies: which parameters run in fp16/bf16 and which stay float32.

TensorRT's strongly typed mode takes precision from the graph's dtypes, so the
policy is applied to the PyTorch network before export: every layer casts its
input to its own weight dtype (see network.py), so a parameter's dtype decides
the dtype its matmul runs in. Kept in float32 whatever the precision:
- the timestep embedder (fp32 sin/cos of t*1000 and its MLP);
- the LQ gates' log_alpha (the sigma term of the gate);
- in fp16 only, the caption projection `y_embedder.proj`: Gemma-2 hidden states
  have outliers of ~1e3 whose products overflow fp16's 65504; its RMSNorm
  brings them back to unit scale before the stream is cast to fp16.
Norm statistics, RoPE and the boundary (inputs, velocity) are float32 by
construction in network.py.

The residual streams (patch, text and pixel tokens: the running sums that every
block adds into) stay float32 too, as in the reference, which runs float32
weights under bf16 autocast so its adds promote to float32: 16-bit matmuls, float32
adds. Measured on the full-size sd3/2kto4k network (synthetic weights, 256x256,
300 caption tokens with four ~1e3 outlier channels, t = 999 and 342), relative L2
error of the velocity vs float32: bf16 (PyTorch CPU) 5.8e-3 with 16-bit streams,
3.7e-3 with float32 streams; fp16 (ONNX Runtime CPU) 2.8e-4 and 2.3e-4
(benchmarks/residual_precision.py).
"""

from __future__ import annotations

import torch
from torch import nn

from .network import PidNet

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def precision_dtype(precision: str) -> torch.dtype:
    try:
        return PRECISIONS[precision]
    except KeyError:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}") from None


FLOAT32_RESIDUALS = True  # see above; float32_residuals=False in apply_precision gives 16-bit streams


def float32_islands(net: PidNet, precision: str) -> list[nn.Module]:
    islands: list[nn.Module] = [net.t_embedder]
    if precision == "fp16":
        islands.append(net.y_embedder.proj)
    return islands


def apply_precision(net: PidNet, precision: str, float32_residuals: bool | None = None) -> PidNet:
    """Cast `net` in place to `precision` with the float32 islands above; returns net.

    `float32_residuals` keeps the residual streams in float32 (None: FLOAT32_RESIDUALS).
    """
    dtype = precision_dtype(precision)
    net.to(dtype)
    keep = FLOAT32_RESIDUALS if float32_residuals is None else float32_residuals
    net.residual_dtype = torch.float32 if keep and dtype != torch.float32 else None
    if dtype != torch.float32:
        for module in float32_islands(net, precision):
            module.to(torch.float32)
        for name, param in net.named_parameters():
            if name.endswith("log_alpha"):
                param.data = param.data.float()
    return net
