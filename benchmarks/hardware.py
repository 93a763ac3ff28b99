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
from typing import Any

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
    """Peak memory over a block: on CUDA torch's allocator peak, and the whole GPU's used memory
    (NVML or cudaMemGetInfo, sampled every 5 ms: it sees TensorRT's and ONNX Runtime's own
    allocations, which torch's counter does not); on the CPU the peak host RSS, sampled every 5 ms.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._peak_rss = 0
        self._peak_used = 0
        self._usage: DeviceUsage | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            try:
                self._usage = DeviceUsage(self.device)
                self._peak_used = self._usage.used()
                self._thread = threading.Thread(target=self._sample_device, daemon=True)
                self._thread.start()
            except Exception:  # whole-GPU figures are a bonus; torch's counter still works
                self._usage = None
        elif _current_rss_bytes() is not None:
            self._peak_rss = _current_rss_bytes() or 0
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._peak_rss = max(self._peak_rss, _current_rss_bytes() or 0)

    def _sample_device(self) -> None:
        assert self._usage is not None
        while not self._stop.wait(0.005):
            try:
                self._peak_used = max(self._peak_used, self._usage.used())
            except Exception:
                return

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def result(self) -> dict[str, float | None | str]:
        if self.device.type == "cuda":
            figures: dict[str, float | None | str] = {
                "peak_device_memory_gb": torch.cuda.max_memory_allocated(self.device) / 1e9,
                "peak_host_rss_gb": None}
            if self._usage is not None:
                figures["peak_device_used_gb"] = self._peak_used / 1e9
                figures["device_used_source"] = self._usage.source
            return figures
        if self._thread is None:  # no psutil: the process-lifetime high-water mark (Linux: KiB)
            return {"peak_device_memory_gb": None,
                    "peak_host_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}
        return {"peak_device_memory_gb": None, "peak_host_rss_gb": self._peak_rss / 1e9}


# ---------------------------------------------------------------------------
# Memory growth of one stage (the overhead benchmark)

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def _status_kib(field: str) -> int | None:
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Linux: make VmHWM (the peak RSS) restart from the current RSS; False where that is not possible."""
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


class DeviceUsage:
    """Bytes in use on the whole GPU (every allocator: torch, TensorRT, ONNX Runtime, the CUDA
    context): NVML when nvidia-ml-py is installed and finds this GPU by its UUID, else
    cudaMemGetInfo (torch.cuda.mem_get_info). `source` says which."""

    def __init__(self, device: torch.device):
        self.device = device
        self._handle = None
        self.source = "cudaMemGetInfo"
        try:
            import pynvml

            pynvml.nvmlInit()
            uuid = str(torch.cuda.get_device_properties(device).uuid)
            self._handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
            self._nvml = pynvml
            self.source = "NVML"
        except Exception:  # no nvidia-ml-py, no NVML access, no uuid in this torch: the CUDA runtime call
            self._handle = None

    def used(self) -> int:
        if self._handle is not None:
            return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)
        free, total = torch.cuda.mem_get_info(self.device)
        return int(total - free)


def device_memory_used(device: torch.device) -> int | None:
    """DeviceUsage(device).used() on CUDA, None elsewhere."""
    return DeviceUsage(device).used() if device.type == "cuda" else None


class MemoryGrowth:
    """How far a block of code raises peak memory above where it started, in bytes.

    Host: the peak resident set size (VmHWM, reset at entry through
    /proc/self/clear_refs, so it is exact for this block); where that is not
    available, RSS sampled every 5 ms by a thread (which can miss short peaks). Device (CUDA): torch's peak
    allocation above its allocation at entry, and the whole GPU's used memory
    (NVML or cudaMemGetInfo) at entry and exit, which also sees memory outside
    torch's allocator (TensorRT, ONNX Runtime) but not short-lived peaks.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.host_peak_growth: int | None = None
        self.device_peak_growth: int | None = None
        self.device_used_growth: int | None = None
        self.host_method = ""
        self._sampler = None

    def __enter__(self) -> "MemoryGrowth":
        import gc

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._device_start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._used_start = device_memory_used(self.device)
        self._rss_start = _status_kib("VmRSS")
        if self._rss_start is not None and _reset_peak_rss():
            self.host_method = "VmHWM (peak RSS, reset at the start)"
        else:
            self._sampler = PeakMemory(torch.device("cpu"))
            self._sampler.__enter__()
            self.host_method = "RSS sampled every 5 ms"
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.device_peak_growth = torch.cuda.max_memory_allocated(self.device) - self._device_start
            used = device_memory_used(self.device)
            if used is not None and self._used_start is not None:
                self.device_used_growth = used - self._used_start
        if self._sampler is not None:
            self._sampler.__exit__(*exc)
            start = self._rss_start * 1024 if self._rss_start is not None else 0
            self.host_peak_growth = max(self._sampler._peak_rss - start, 0) if start else None
        else:
            peak = _status_kib("VmHWM")
            self.host_peak_growth = (peak - self._rss_start) * 1024 if peak is not None else None


# ---------------------------------------------------------------------------
# How busy the machine was (a loaded shared machine stretches p90 far above the median)


def _cpu_times() -> tuple[int, int] | None:
    """(total jiffies, steal jiffies) of all CPUs from /proc/stat; None where it does not exist."""
    try:
        fields = open("/proc/stat").readline().split()[1:]
    except OSError:
        return None
    values = [int(v) for v in fields]
    return sum(values[:8]), (values[7] if len(values) > 7 else 0)


class MachineLoad:
    """Load average at the start and end of a run, and the CPU steal share during it (Linux)."""

    def __init__(self) -> None:
        self.start_load = _load_average()
        self.start_times = _cpu_times()

    def result(self) -> dict[str, Any]:
        end_times = _cpu_times()
        steal = None
        if self.start_times and end_times and end_times[0] > self.start_times[0]:
            steal = 100.0 * (end_times[1] - self.start_times[1]) / (end_times[0] - self.start_times[0])
        return {"cpus": os.cpu_count(), "load_average_start": self.start_load, "load_average_end": _load_average(),
                "cpu_steal_pct": steal}


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def load_text(load: dict[str, Any] | None) -> str:
    """`load average 9.63 (1 min) at the end on 2 CPUs: busy, figures are noisy; CPU steal 0.0%`."""
    if not load:
        return "machine load not recorded"
    parts = []
    end, cpus = load.get("load_average_end"), load.get("cpus") or 1
    if end:
        busy = end[0] > cpus
        parts.append(f"load average {load['load_average_start'][0]:.2f} -> {end[0]:.2f} (1 min) on {cpus} CPUs"
                     + (": BUSY, other work shared the CPUs, so the figures are noisy" if busy else ": quiet"))
    if load.get("cpu_steal_pct") is not None:
        parts.append(f"CPU steal {load['cpu_steal_pct']:.1f}%")
    return "; ".join(parts) or "machine load not available on this system"
