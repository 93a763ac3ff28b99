"""The rows of benchmarks/gpu.py that are more than "time a backend" (harness.time_backend):
the runtime's overhead with a stand-in network and its CUDA checks, and the runtime's decode
path with a PyTorch network as its velocity."""

from __future__ import annotations

import importlib.util
import time
from typing import Any, Callable

import torch


def overhead_row(size: tuple[int, int], device: torch.device, repeat: int) -> Callable[[dict[str, Any]], None]:
    def run(record: dict[str, Any]) -> None:
        from .overhead import measure

        document = measure(size, batch=1, device=device, formats=("png",), repeat=repeat)
        record.update(stages=document["stages"], decode_timings=document["decode_timings"],
                      file_bytes=document["file_bytes"], image_bytes=document["image_bytes"])
        if device.type == "cuda":
            record["cuda_noise_check"] = cuda_noise_check(device)
            record["cuda_graph"] = cuda_graph_check(size, device)

    return run


def cuda_noise_check(device: torch.device) -> str:
    """SeededNoise on CUDA: whole draws equal torch.randn's sequence, chunk rows equal their slices."""
    from pid_runtime.sampler import SeededNoise

    shape = (3, 3, 256, 384)
    gen = torch.Generator(device=device).manual_seed(5)
    expected = [torch.randn(shape, generator=gen, device=device) for _ in range(4)]
    source = SeededNoise(shape, 5, device)
    for draw, lo, hi in [(0, 0, 3), (1, 1, 3), (0, 0, 1), (3, 2, 3), (2, 0, 2), (1, 0, 1), (3, 0, 2)]:
        out = torch.empty((hi - lo, *shape[1:]), device=device)
        source.draw(draw, lo, hi, out)
        if not torch.equal(out, expected[draw][lo:hi]):
            return f"mismatch: draw {draw} rows {lo}..{hi}"
    return "ok"


def cuda_graph_check(size: tuple[int, int], device: torch.device) -> dict[str, Any]:
    """The per-step CUDA graphs against the eager sampler (bitwise), their memory and time."""
    from pid_runtime.cuda_graph import CapturedSampler
    from pid_runtime.sampler import SeededNoise, sample

    from .hardware import MemoryGrowth

    shape = (1, 3, *size)
    image_bytes = 3 * size[0] * size[1] * 4

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x * 0.5

    eager = sample(velocity, SeededNoise(shape, 0, device), steps=4)
    with MemoryGrowth(device) as capture_memory:
        graph = CapturedSampler(velocity, shape, 4, device)
    with MemoryGrowth(device) as replay_memory:
        start = time.perf_counter()
        replayed = graph(SeededNoise(shape, 0, device))
        torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    same = bool(torch.equal(eager, replayed))
    return {"equal_to_eager": same, "replay_s": seconds,
            "capture_device_peak_growth_images": (capture_memory.device_peak_growth or 0) / image_bytes,
            "replay_device_peak_growth_images": (replay_memory.device_peak_growth or 0) / image_bytes}


def onnxruntime_cuda_problem(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "the onnxruntime row is for ONNX Runtime's CUDA provider"
    if importlib.util.find_spec("onnxruntime") is None:
        return "onnxruntime is not importable here"
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return f"onnxruntime {onnxruntime.__version__} here has no CUDA provider (onnxruntime-gpu is not installed)"
    return None


def runtime_decode_row(size, device, inputs_for, bf16_weights, settings, outputs, compare, compare_with: str):
    """pid_runtime.decode.decode with the bf16-weight network as the velocity: the pid-run path."""

    def run(record: dict[str, Any]) -> None:
        from pid_runtime.backends.base import Backend
        from pid_runtime.decode import decode
        from pid_runtime.metadata import ModelMetadata

        from .flops import decode_flops
        from .hardware import PeakMemory, synchronize
        from .report import percentile

        net = bf16_weights()
        cfg = settings.cfg
        inputs = inputs_for(size)
        meta = ModelMetadata(release=None, latent_channels=cfg.lq_latent_channels,
                             latent_down_factor=cfg.pixel_scale, sr_factor=1, txt_embed_dim=cfg.txt_embed_dim,
                             txt_max_length=cfg.txt_max_length, precision="bf16",
                             network={"patch_size": cfg.patch_size})
        cuda = device.type == "cuda"

        class TorchNetBackend(Backend):
            name = "torch"

            def __init__(self):
                super().__init__(meta, device)
                self.calls: list[tuple[Any, Any]] = []  # (start, end) CUDA events or perf_counter times

            def bind(self, y, lq_latent, degrade_sigma, height, width):
                self.fixed = (y, lq_latent, degrade_sigma)

            def velocity(self, x, t):
                start = torch.cuda.Event(enable_timing=True) if cuda else time.perf_counter()
                if cuda:
                    start.record()
                with torch.inference_mode():
                    v = net(x, t, *self.fixed)
                if cuda:
                    end = torch.cuda.Event(enable_timing=True)
                    end.record()
                else:
                    end = time.perf_counter()
                self.calls.append((start, end))
                return v

            def network_ms(self) -> float:
                if cuda:
                    self.calls[-1][1].synchronize()
                    return sum(a.elapsed_time(b) for a, b in self.calls)
                return sum((b - a) * 1e3 for a, b in self.calls)

        backend = TorchNetBackend()
        args = dict(latents=inputs.latents, caption=inputs.caption, sigma=inputs.sigma, steps=settings.steps)
        start = time.perf_counter()
        fixed = decode(backend, noise=(inputs.noise, inputs.eps), **args)  # same noise as the other rows
        synchronize(device)
        record["first_call_ms"] = (time.perf_counter() - start) * 1e3
        same_as = [r for r, _ in outputs[size] if r["backend"] == compare_with]
        if same_as:
            eager_first = next(first for r, first in outputs[size] if r is same_as[0])
            record["max_abs_diff_vs_torch_eager_bf16w"] = float((fixed.images - eager_first).abs().max())
        compare(size, record, fixed.images)
        for _ in range(settings.warmup):
            decode(backend, seed=0, **args)
        totals, network, noise, calls = [], [], [], []
        with PeakMemory(device) as memory:
            for _ in range(settings.repeat):
                backend.calls = []
                result = decode(backend, seed=0, **args)  # seeded: noise drawn by the runtime, as pid-run does
                totals.append(result.timings.total * 1e3)
                network.append(backend.network_ms())
                noise.append(result.timings.noise * 1e3)
                calls += [s * 1e3 for chunk in result.timings.steps for s in chunk]
        median = percentile(totals, 50)
        flops = decode_flops(cfg, *size, batch=1, steps=settings.steps, text_len=settings.text_len)
        overheads = [total - net_ms for total, net_ms in zip(totals, network)]
        record.update(runs=len(totals), latency_ms_median=median, latency_ms_p90=percentile(totals, 90),
                      latency_ms_min=min(totals), per_image_ms_median=median, per_image_ms_p90=percentile(totals, 90),
                      per_call_ms_median=percentile(calls, 50), per_call_ms_p90=percentile(calls, 90),
                      network_ms_median=percentile(network, 50), overhead_ms_median=percentile(overheads, 50),
                      overhead_pct=100 * percentile(overheads, 50) / median, noise_ms_median=percentile(noise, 50),
                      tflop_per_decode=flops / 1e12, achieved_tflops=flops / (median / 1e3) / 1e12,
                      **memory.result())
        if record.get("peak_tflops"):
            record["pct_of_peak"] = 100 * record["achieved_tflops"] / record["peak_tflops"]

    return run
