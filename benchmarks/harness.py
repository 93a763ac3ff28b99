"""The measurement loop: every backend decodes the same inputs with the same noise.

For each output size: draw the latent, caption embedding and sampler noise once
on the CPU (seeded) and move them to the run device; then for each backend:
`prepare` (timed as setup), one first decode (timed apart: compile, lazy
allocation, engine warm-up), `warmup` untimed decodes, and `repeat` timed
decodes with a timestamp after each network call. Last, the float32 eager
PyTorch reference decodes the same inputs and every backend's first output is
compared with it.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pid_export.config import PidConfig
from pid_export.network import PidNet
from pid_runtime.errors import first_line
from pid_runtime.sampler import draw_noise, sample

from .backends import BackendSkipped, BenchBackend, DecodeInputs, make_backend
from .flops import decode_flops
from .hardware import MachineLoad, PeakMemory, StepClock, device_name, peak_tflops, synchronize
from .report import accuracy, percentile


@dataclass
class Settings:
    cfg: PidConfig
    model: str  # what the network is, for the report ("flux/2k", "quick config", ...)
    sizes: list[tuple[int, int]]
    backends: list[str]
    device: torch.device
    precision: str
    batch: int = 1
    steps: int = 4
    warmup: int = 1
    repeat: int = 10
    text_len: int = 300
    seed: int = 0
    check_accuracy: bool = True
    onnx_path: Path | None = None
    engine_path: Path | None = None
    work_dir: Path = Path("benchmarks/results/work")
    peak_override: float | None = None
    mode: str = "full"
    time_budget_s: float | None = None  # skip what is left once this much wall time has passed
    extra: dict[str, Any] = field(default_factory=dict)


def make_inputs(cfg: PidConfig, size: tuple[int, int], batch: int, steps: int, text_len: int, seed: int,
                device: torch.device) -> DecodeInputs:
    """Seeded inputs drawn on the CPU (identical on any device), then moved to `device`."""
    height, width = size
    scale = cfg.pixel_scale
    if height % scale or width % scale:
        raise ValueError(f"output size {height}x{width} is not a multiple of this network's pixel scale {scale}")
    gen = torch.Generator().manual_seed(seed)
    lq_latent = torch.randn(batch, cfg.lq_latent_channels, height // scale, width // scale, generator=gen)
    y = torch.randn(batch, text_len, cfg.txt_embed_dim, generator=gen)
    noise, eps = draw_noise((batch, 3, height, width), steps, seed, "cpu")
    move = lambda t: t.to(device)  # noqa: E731
    return DecodeInputs(latents=move(lq_latent), caption=move(y), sigma=torch.zeros(batch, device=device),
                        height=height, width=width, noise=move(noise),
                        eps=move(torch.stack(eps) if eps else noise.new_empty(0, *noise.shape)))


def _decode(velocity, inputs: DecodeInputs, steps: int, buffer, on_step=None) -> torch.Tensor:
    assert inputs.noise is not None and inputs.eps is not None  # make_inputs draws them
    return sample(velocity, inputs.noise, inputs.eps, steps, x_buffer=buffer, on_step=on_step)


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {first_line(exc)}"


def time_backend(backend: BenchBackend, inputs: DecodeInputs, s: Settings, record: dict[str, Any]
                 ) -> torch.Tensor | None:
    """Fill `record` with one backend's timings at one size; returns its first decode (on the CPU)."""
    device = s.device
    start = time.perf_counter()
    backend.prepare(inputs)
    synchronize(device)
    record["setup_s"] = time.perf_counter() - start
    if backend.export_s is not None:
        record["export_s"] = backend.export_s
    velocity = backend.velocity_fn(inputs)
    buffer = backend.input_buffer()

    start = time.perf_counter()
    first = _decode(velocity, inputs, s.steps, buffer)
    synchronize(device)
    record["first_call_ms"] = (time.perf_counter() - start) * 1e3
    first = first.float().cpu()
    for _ in range(s.warmup):
        _decode(velocity, inputs, s.steps, buffer)

    decode_ms: list[float] = []
    call_ms: list[float] = []
    clock = StepClock(device)
    with PeakMemory(device) as memory:
        for _ in range(s.repeat):
            clock.start()
            _decode(velocity, inputs, s.steps, buffer, on_step=lambda i, t: clock.mark())
            calls = clock.elapsed_ms()
            call_ms += calls
            decode_ms.append(sum(calls))
    synchronize(device)

    median = percentile(decode_ms, 50)
    flops = decode_flops(s.cfg, inputs.height, inputs.width, batch=inputs.batch, steps=s.steps, text_len=s.text_len)
    achieved = flops / (median / 1e3) / 1e12
    record.update(
        status="ok",
        runs=len(decode_ms),
        latency_ms_median=median,
        latency_ms_p90=percentile(decode_ms, 90),
        latency_ms_min=min(decode_ms),
        per_image_ms_median=median / inputs.batch,
        per_image_ms_p90=percentile(decode_ms, 90) / inputs.batch,
        per_call_ms_median=percentile(call_ms, 50),
        per_call_ms_p90=percentile(call_ms, 90),
        tflop_per_decode=flops / 1e12,
        achieved_tflops=achieved,
        pct_of_peak=100 * achieved / record["peak_tflops"] if record["peak_tflops"] else None,
        **memory.result(),
    )
    return first


def reference_decode(net: PidNet, inputs: DecodeInputs, s: Settings) -> torch.Tensor:
    """The float32 PyTorch decode (no autocast, no TF32) of the same inputs: the network called
    directly by the sampler, independent of every benchmarked backend (torch-eager included)."""
    matmul_tf32, cudnn_tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return net(x, t, inputs.caption, inputs.latents, inputs.sigma)

        with torch.no_grad():
            return _decode(velocity, inputs, s.steps, None).float().cpu()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul_tf32, cudnn_tf32


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {"device": str(device), "device_name": device_name(device),
                           "python": platform.python_version(), "torch": torch.__version__,
                           "numpy": np.__version__, "host": platform.platform()}
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["gpu_memory_gb"] = torch.cuda.get_device_properties(device).total_memory / 1e9
    try:
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
    except ModuleNotFoundError:
        env["onnxruntime"] = None
    return env


def run_benchmark(net: PidNet, weights: str, s: Settings,
                  on_update: Callable[[dict[str, Any]], object] = lambda doc: None,
                  say: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure every (size, backend); returns the results document (also passed to on_update)."""
    began = time.perf_counter()
    load = MachineLoad()  # reported beside the figures: a busy machine stretches p90 far above the median
    env = environment(s.device)
    peak, peak_source = peak_tflops(env["device_name"], s.precision, s.peak_override)
    document: dict[str, Any] = {
        "benchmark": "pid-export decode latency",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "mode": s.mode,
        "model": s.model,
        "weights": weights,
        "network": s.cfg.to_dict(),
        "environment": env,
        "settings": {"sizes": [f"{h}x{w}" for h, w in s.sizes], "backends": s.backends, "precision": s.precision,
                     "batch": s.batch, "steps": s.steps, "warmup": s.warmup, "repeat": s.repeat,
                     "text_len": s.text_len, "seed": s.seed, **s.extra},
        "records": [],
    }
    backends = {name: make_backend(name, net, s.device, s.precision, onnx_path=s.onnx_path,
                                   engine_path=s.engine_path, work_dir=s.work_dir) for name in s.backends}
    try:
        for size in s.sizes:
            inputs = make_inputs(s.cfg, size, s.batch, s.steps, s.text_len, s.seed, s.device)
            outputs: dict[int, torch.Tensor] = {}
            for name, backend in backends.items():
                record = new_record(name, size, s, env, peak, peak_source)
                document["records"].append(record)
                if s.time_budget_s is not None and time.perf_counter() - began > s.time_budget_s:
                    record.update(status="skipped", reason=f"time budget of {s.time_budget_s:.0f} s used up")
                    continue
                say(f"[{name} {record['output_size']}] ...")
                try:
                    first = time_backend(backend, inputs, s, record)
                    # An FP8 (or other) export given with --engine/--onnx gets its own row label.
                    record["precision"] = getattr(backend, "model_precision", None) or record["precision"]
                    if first is not None:
                        outputs[id(record)] = first
                    say(f"[{name} {record['output_size']}] median {record['latency_ms_median']:.1f} ms per decode, "
                        f"first decode {record['first_call_ms'] / 1e3:.2f} s, setup {record['setup_s']:.1f} s")
                except BackendSkipped as exc:
                    record.update(status="skipped", reason=str(exc))
                    say(f"[{name} {record['output_size']}] skipped: {exc}")
                except Exception as exc:  # one failing backend must not lose the others' numbers
                    record.update(status="failed", reason=_first_line(exc))
                    say(f"[{name} {record['output_size']}] failed: {record['reason']}")
                    if s.device.type == "cuda":
                        torch.cuda.empty_cache()
                on_update(document)
            _fill_accuracy(net, inputs, s, document["records"], outputs, began, say)
            del inputs, outputs
            on_update(document)
    finally:
        for backend in backends.values():
            backend.close()
    document["wall_s"] = time.perf_counter() - began
    document["export_s"] = sum(r.get("export_s") or 0.0 for r in document["records"])
    document["machine_load"] = load.result()
    on_update(document)
    return document


def new_record(backend: str, size: tuple[int, int], s: Settings, env: dict, peak: float | None,
               peak_source: str) -> dict[str, Any]:
    height, width = size
    return {
        "backend": backend, "status": "pending", "reason": None,
        "device": env["device"], "device_name": env["device_name"], "precision": s.precision,
        "batch": s.batch, "height": height, "width": width, "output_size": f"{height}x{width}",
        "megapixels": height * width / 1e6, "steps": s.steps, "text_len": s.text_len,
        "peak_tflops": peak, "peak_source": peak_source,
    }


def _fill_accuracy(net: PidNet, inputs: DecodeInputs, s: Settings, records: list[dict],
                   outputs: dict[int, torch.Tensor], began: float, say: Callable[[str], None]) -> None:
    todo = [r for r in records if id(r) in outputs]
    if not todo or not s.check_accuracy:
        return
    if s.time_budget_s is not None and time.perf_counter() - began > s.time_budget_s:
        say("accuracy skipped: time budget used up")
        return
    # Decoded apart even when an fp32 torch-eager record exists, so that record is checked too.
    try:
        reference = reference_decode(net, inputs, s)
    except Exception as exc:
        say(f"accuracy reference failed: {_first_line(exc)}")
        return
    for record in todo:
        record.update(accuracy(outputs[id(record)], reference), accuracy_reference="torch fp32 eager")
