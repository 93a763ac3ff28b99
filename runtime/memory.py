"""How much memory a decode needs, and how much is free: checked before the decode starts.

Formula (bytes; B = items per network call, P = th * tw pixels of one call (the tile,
or the whole canvas untiled), L = P / patch^2 image tokens, T = L + Lt with Lt the
caption tokens, E = 4 bytes (2 for a bf16/fp16 TensorRT engine), d = hidden size, pd = pixel dim, n = injection points, heads / pixel
heads of the two attentions, H x W the canvas):

    network  = K_LIN * E * B * P * (16 * pd + (n + 12) * d / patch^2)
             + K_ATT * 4 * B * (heads * T^2 + pixel_heads * L^2)       (0 where attention is fused)
    canvas   = 4 * B * 3 * H * W * (4 + tiled)   x, eps, the network output, the output's copy (+ the blend)
    model    = the weights file (ONNX Runtime reads it into memory; TensorRT: the engine's size)
    total    = BASE + model + network + canvas

`16 * pd` floats per pixel is the pixel blocks' live set (x, its norm, the 6 * pd
adaLN chunks, the 4 * pd MLP hidden twice, the 256 * pd patch input to
compress_to_attn); `(n + 12) * d` floats per token are the n LQ injection features
(all computed before the patch blocks) and the patch block's live set (streams, qkv,
attention output, the SwiGLU hidden of 8d/3 twice). The score term is what an
unfused attention holds (scores and probabilities).

Constants, ONNX Runtime CPU (`ORT_CPU` below): fitted to the peak RSS of decodes of the
tiny golden export tiny_v1_16ch_sr4 at 256^2 .. 2048^2 on a 2-core machine (the
measurements are in benchmarks/README.md). A least-squares fit to 1-step decodes gives
K_LIN 1.76, K_ATT 0.49; ONNX Runtime's CPU arena grows over repeated runs (a 4-step
decode peaks 1.45-1.55x higher than a 1-step one: 1006 vs 651 MiB at 640^2, 2333 vs
1604 MiB at 1024^2), so the constants are that fit times ~1.8 (10% over the 4-step peaks), an upper bound for
decodes of any step count and for tiled decodes (many runs). K_LIN covers the copies
ONNX Runtime makes (Transpose/Reshape outputs) and the arena's rounding; K_ATT < 1
because its CPU Attention kernel does not hold every head's scores at once. GPU constants are derived,
not measured here (no GPU): TensorRT fuses attention (K_ATT = 0) and keeps bf16/fp16
activations; benchmarks/tiling.py measures them on a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .metadata import ModelMetadata

GIB = 1024 ** 3


@dataclass(frozen=True)
class MemoryModel:
    """Fitted constants of one backend on one kind of device (see the module docstring)."""

    k_linear: float
    k_attention: float
    base_bytes: int  # the process / context before the model loads (Python, torch, the library)
    reduced_activations: bool = False  # activations in the graph's precision (bf16/fp16: 2 bytes)

    def element_bytes(self, meta: ModelMetadata) -> int:
        return 2 if self.reduced_activations and meta.precision != "fp32" else 4


ORT_CPU = MemoryModel(k_linear=3.2, k_attention=0.95, base_bytes=300 * 1024 ** 2)
ORT_CUDA = MemoryModel(k_linear=3.2, k_attention=0.95, base_bytes=400 * 1024 ** 2)  # derived: as the CPU graph
TENSORRT = MemoryModel(k_linear=1.0, k_attention=0.0, base_bytes=400 * 1024 ** 2, reduced_activations=True)  # derived: fused attention


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one decode needs, by part."""

    network: int  # activations of one network call
    canvas: int  # the whole-canvas sampler buffers
    model: int  # weights / engine
    base: int

    @property
    def total(self) -> int:
        return self.network + self.canvas + self.model + self.base

    def describe(self) -> str:
        return (f"network {gib(self.network)}, canvas {gib(self.canvas)}, model {gib(self.model)}, "
                f"runtime {gib(self.base)}")


def gib(count: float) -> str:
    return f"{count / GIB:.2f} GiB"


# Any other backend (e.g. a benchmark's stand-in network): only the sampler's canvas buffers are known.
UNMODELLED = MemoryModel(k_linear=0.0, k_attention=0.0, base_bytes=0)


def memory_model(backend_name: str, device_type: str) -> MemoryModel:
    if backend_name == "tensorrt":
        return TENSORRT
    if backend_name == "onnxruntime":
        return ORT_CUDA if device_type == "cuda" else ORT_CPU
    return UNMODELLED


def network_bytes(meta: ModelMetadata, batch: int, height: int, width: int, model: MemoryModel) -> int:
    """Activations of one network call at height x width (the formula's `network` line)."""
    net = meta.network
    patch = int(net.get("patch_size", 16))
    hidden, pixel_dim = int(net.get("hidden_size", 1536)), int(net.get("pixel_hidden_size", 16))
    heads, pixel_heads = int(net.get("num_groups", 24)), int(net.get("pixel_num_groups", 16))
    injections = math.ceil(int(net.get("patch_depth", 14)) / int(net.get("lq_interval", 2)))
    pixels = height * width
    tokens = pixels // (patch * patch)
    text = int(meta.txt_max_length)
    per_pixel = 16 * pixel_dim + (injections + 12) * hidden / (patch * patch)
    linear = model.k_linear * model.element_bytes(meta) * batch * pixels * per_pixel
    scores = model.k_attention * 4 * batch * (heads * (tokens + text) ** 2 + pixel_heads * tokens ** 2)
    return int(linear + scores)


def estimate_decode_memory(meta: ModelMetadata, backend_name: str, device_type: str, batch: int,
                           canvas: tuple[int, int], call_size: tuple[int, int] | None = None,
                           model_bytes: int = 0) -> MemoryEstimate:
    """Memory of a decode of `batch` items (per chunk) at `canvas`; `call_size` = the tile (None: untiled)."""
    model = memory_model(backend_name, device_type)
    call = call_size or canvas
    tiled = call_size is not None
    canvas_bytes = 4 * batch * 3 * canvas[0] * canvas[1] * (4 + int(tiled))
    return MemoryEstimate(network_bytes(meta, batch, call[0], call[1], model), canvas_bytes, int(model_bytes),
                          model.base_bytes)


def available_memory(device: torch.device | str) -> int:
    """Free bytes where the decode runs: MemAvailable (/proc/meminfo) on the CPU, cudaMemGetInfo on a GPU."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


__all__ = ["MemoryEstimate", "MemoryModel", "available_memory", "estimate_decode_memory", "gib", "memory_model",
           "network_bytes"]
