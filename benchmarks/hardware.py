"""What the benchmark knows about the machine: device names, peak rates, memory, clocks.

Peak rates are dense (no 2:4 sparsity) vendor datasheet figures in TFLOP/s; the
sources are listed in benchmarks/README.md. "matrix" is the tensor-core rate for
bf16/fp16 with float32 accumulation (what PyTorch, ONNX Runtime and TensorRT use
for these networks); "fp32" is the plain float32 rate (no TF32), which is what an
fp32 run without TF32 can reach. A CPU has no entry: its peak depends on the
exact part, clocks and vector units, so % of peak is reported as n/a there unless
the user states one with --peak-tflops.
"""

from __future__ import annotations

import os
import platform
import resource
import threading
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PeakRate:
    card: str
    matrix_tflops: float  # bf16 / fp16 tensor cores, fp32 accumulate, dense
    fp32_tflops: float  # float32 without TF32
    note: str = ""


# Matched in order against torch.cuda.get_device_name(); the first pattern that is a
# substring of the (lower-cased) name wins, so the more specific names come first.
PEAK_TABLE: tuple[tuple[str, PeakRate], ...] = (
    ("h200 nvl", PeakRate("H200 NVL", 835.5, 60.0)),
    ("h200", PeakRate("H200 SXM", 989.4, 66.9)),
    ("h100 nvl", PeakRate("H100 NVL", 835.5, 60.0)),
    ("h100 pcie", PeakRate("H100 PCIe", 756.5, 51.2)),
    ("h100", PeakRate("H100 SXM5", 989.4, 66.9)),  # "NVIDIA H100 80GB HBM3" is the SXM5 part
    ("rtx 4090", PeakRate("RTX 4090", 165.2, 82.6, "330.3 with fp16 accumulation")),
    ("rtx 5090", PeakRate("RTX 5090", 209.5, 104.8, "419 with fp16 accumulation")),
)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:  # the model name is more useful than the ISA; Linux only
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu} ({os.cpu_count()} threads, torch uses {torch.get_num_threads()})"


def card_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (for file and folder names)."""
    slug = "".join(c if c.isalnum() else "-" for c in name.lower())
    return "-".join(part for part in slug.split("-") if part)


def peak_rate(name: str) -> PeakRate | None:
    lowered = name.lower()
    for pattern, rate in PEAK_TABLE:
        if pattern in lowered:
            return rate
    return None


def peak_tflops(name: str, precision: str, override: float | None = None) -> tuple[float | None, str]:
    """(peak TFLOP/s or None, where the figure comes from) for a device and precision."""
    if override is not None:
        return override, "--peak-tflops"
    rate = peak_rate(name)
    if rate is None:
        return None, "n/a (no datasheet peak for this device)"
    if precision == "fp32":
        return rate.fp32_tflops, f"{rate.card} fp32 (no TF32) datasheet"
    return rate.matrix_tflops, f"{rate.card} dense {precision} tensor datasheet"


# ---------------------------------------------------------------------------
# Clocks: CUDA events on the GPU (device time, no host sync per step), perf_counter on the CPU


class StepClock:
    """Timestamps a decode: `start()`, `mark()` after each network call, then `elapsed_ms()`."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        self.marks = [self._now()]

    def mark(self) -> None:
        self.marks.append(self._now())

    def elapsed_ms(self) -> list[float]:
        """Milliseconds between consecutive marks (one entry per network call)."""
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------
# Memory


def _current_rss_bytes() -> int | None:
    try:
        import psutil
    except ModuleNotFoundError:
        return None
    return psutil.Process().memory_info().rss


class PeakMemory:
    """Peak device memory (torch allocator) on CUDA; peak host RSS, sampled every 5 ms, on the CPU.

    ONNX Runtime's and TensorRT's own GPU allocations are invisible to torch's counter,
    so for those backends the device figure covers only the torch-side buffers.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._peak_rss = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif _current_rss_bytes() is not None:
            self._peak_rss = _current_rss_bytes() or 0
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._peak_rss = max(self._peak_rss, _current_rss_bytes() or 0)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def result(self) -> dict[str, float | None | str]:
        if self.device.type == "cuda":
            return {"peak_device_memory_gb": torch.cuda.max_memory_allocated(self.device) / 1e9,
                    "peak_host_rss_gb": None}
        if self._thread is None:  # no psutil: the process-lifetime high-water mark (Linux: KiB)
            return {"peak_device_memory_gb": None,
                    "peak_host_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}
        return {"peak_device_memory_gb": None, "peak_host_rss_gb": self._peak_rss / 1e9}
