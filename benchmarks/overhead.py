"""The runtime's own overhead: `python -m benchmarks.overhead --size HxW [--batch B] --out F.json`.

A stand-in backend (a `pid_runtime` `Backend` whose velocity is one cheap
element-wise operation, so the network costs next to nothing) runs through the
real decode path (`pid_runtime.decode.decode`: input checks, noise, chunking,
the sampler) and the real output writing (`pid_runtime.io.write_output`). For
each stage it reports the seconds (median over `--repeat` runs) and how far the
stage raised peak memory above where it started, in image-sizes: one image is
one item's float32 [3, H, W] (169 MiB at 3840x3840). What remains is what the
runtime adds around a real network, whose own buffers (activations, bound I/O)
come on top.

Host memory is the peak resident set size (exact on Linux: VmHWM reset per
stage); on CUDA (`--device cuda`) also torch's peak device allocation and the
GPU's used memory (NVML or cudaMemGetInfo). Needs only torch, numpy and the
runtime (`pip install -e .`); no model, no ONNX, no TensorRT.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from pid_runtime.backends.base import Backend
from pid_runtime.decode import decode
from pid_runtime.io import atomic_write, write_output
from pid_runtime.metadata import ModelMetadata
from pid_runtime.sampler import MAX_STEPS
from pid_runtime.sizes import parse_hw

from .hardware import MemoryGrowth, device_name

FORMATS = {"png": (".png", 8), "png16": (".png", 16), "npy": (".npy", 8)}
LATENT_CHANNELS = 16
PIXEL_SCALE = 32  # latent down factor 8 x SR 4, as the Flux / SD3 releases
CAPTION = (8, 64)  # tokens, width: small, the network never reads it


def stand_in_metadata() -> ModelMetadata:
    """Metadata of a Flux-like export with no size range (any multiple of 32 px decodes)."""
    return ModelMetadata(release=None, latent_channels=LATENT_CHANNELS, latent_down_factor=8, sr_factor=4,
                         txt_embed_dim=CAPTION[1], txt_max_length=300, precision="fp32")


class StandInBackend(Backend):
    """velocity(x, t) = x / 2 as a new tensor per call (as ONNX Runtime returns one): a network that costs
    one element-wise pass, so what is measured is the runtime around it.

    `max_batch` gives it an engine-like `profile_ranges` (batch 1..max_batch) for the chunking tests;
    `bind` then refuses larger batches, as TensorRT does. `bound_batches` records every bind's batch.
    """

    name = "stand-in"

    def __init__(self, device: torch.device | str = "cpu", max_batch: int | None = None):
        super().__init__(stand_in_metadata(), torch.device(device))
        self.bound_batches: list[int] = []
        if max_batch is not None:
            self.profile_ranges = {"x": ((1, 3, 32, 32), (max_batch, 3, 8192, 8192))}

    def bind(self, y: Tensor, lq_latent: Tensor, degrade_sigma: Tensor, height: int, width: int) -> None:
        batch = int(lq_latent.shape[0])
        ranges = self.profile_ranges
        if ranges is not None and batch > ranges["x"][1][0]:
            raise RuntimeError(f"batch {batch} is above the profile's maximum {ranges['x'][1][0]}")
        self.bound_batches.append(batch)

    def velocity(self, x: Tensor, t: Tensor) -> Tensor:
        return x * 0.5


def parse_size(text: str) -> tuple[int, int]:
    try:
        height, width = parse_hw(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if height % PIXEL_SCALE or width % PIXEL_SCALE:
        raise argparse.ArgumentTypeError(f"{text}: sides must be positive multiples of {PIXEL_SCALE}")
    return height, width


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=(3840, 3840), help="output HxW (default 3840x3840)")
    parser.add_argument("--batch", type=int, default=1, help="latents in the batch (default 1)")
    parser.add_argument("--batch-size", type=int, default=None, help="decode at most N items at a time")
    parser.add_argument("--steps", type=int, default=MAX_STEPS, help=f"network calls (default {MAX_STEPS})")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--formats", default="png,npy",
                        help=f"outputs to write, from {', '.join(FORMATS)} (default png,npy; '' for none)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per stage; the median time is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    args = parser.parse_args(argv)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        parser.error(f"unknown format(s) {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
    args.formats = formats
    if args.batch < 1 or args.repeat < 1 or not 1 <= args.steps <= MAX_STEPS:
        parser.error(f"--batch and --repeat must be >= 1 and --steps 1..{MAX_STEPS}")
    return args


def _stage(device: torch.device, image_bytes: int, run) -> tuple[dict[str, Any], Any]:
    """Run `run()` once under MemoryGrowth and a clock; the record and run's result."""
    with MemoryGrowth(device) as memory:
        start = time.perf_counter()
        result = run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    record: dict[str, Any] = {"seconds": seconds, "host_peak_growth_bytes": memory.host_peak_growth,
                              "host_method": memory.host_method}
    if memory.host_peak_growth is not None:
        record["host_peak_growth_images"] = memory.host_peak_growth / image_bytes
    if memory.device_peak_growth is not None:
        record["device_peak_growth_bytes"] = memory.device_peak_growth
        record["device_peak_growth_images"] = memory.device_peak_growth / image_bytes
        record["device_used_growth_bytes"] = memory.device_used_growth
    return record, result


def _summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median seconds over the runs; the largest memory growth seen."""
    summary: dict[str, Any] = {"seconds_median": statistics.median(r["seconds"] for r in runs),
                               "seconds_all": [r["seconds"] for r in runs]}
    for key in ("host_peak_growth_bytes", "host_peak_growth_images", "device_peak_growth_bytes",
                "device_peak_growth_images", "device_used_growth_bytes"):
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            summary[key] = max(values)
    summary["host_method"] = runs[0]["host_method"]
    return summary


def measure(size: tuple[int, int], batch: int = 1, batch_size: int | None = None, steps: int = MAX_STEPS,
            device: str | torch.device = "cpu", formats: Sequence[str] = ("png", "npy"), repeat: int = 3,
            work_dir: Path | None = None) -> dict[str, Any]:
    """The results document: settings, environment and one entry per stage."""
    run_device = torch.device(device)
    if run_device.type == "cuda" and run_device.index is None:
        run_device = torch.device("cuda", torch.cuda.current_device())
    height, width = size
    image_bytes = 3 * height * width * 4
    backend = StandInBackend(run_device)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, LATENT_CHANNELS, height // PIXEL_SCALE, width // PIXEL_SCALE, generator=gen)
    caption = torch.randn(1, *CAPTION, generator=gen)

    # Warm-up at a tiny size: lazy initialisation (kernels, allocator, encoders) is not the decode's cost.
    warm = decode(backend, latents[:1, :, :2, :2], caption, seed=0, steps=steps)
    with tempfile.TemporaryDirectory(dir=work_dir) as folder:
        for name in formats:
            suffix, bits = FORMATS[name]
            write_output(warm.images, Path(folder) / f"warm{suffix}", bits)
    del warm

    stages: dict[str, list[dict[str, Any]]] = {"decode": []}
    timings: list[dict[str, Any]] = []
    sizes: dict[str, int] = {}
    with tempfile.TemporaryDirectory(dir=work_dir) as folder:
        for _ in range(repeat):
            record, result = _stage(run_device, image_bytes, lambda: decode(
                backend, latents, caption, seed=0, steps=steps, batch_size=batch_size))
            stages["decode"].append(record)
            timings.append({"noise_s": result.timings.noise, "bind_s": sum(result.timings.bind),
                            "steps_s": result.timings.step_totals(), "loops_s": sum(result.timings.loops),
                            "total_s": result.timings.total, "chunks": len(result.timings.loops)})
            images = result.images
            del result
            for name in formats:
                suffix, bits = FORMATS[name]
                target = Path(folder) / f"out-{name}{suffix}"
                write = functools.partial(write_output, images, target, bits)
                record, written = _stage(run_device, image_bytes, write)
                stages.setdefault(f"write_{name}", []).append(record)
                sizes[name] = sum(p.stat().st_size for p in written)
                for path in written:
                    path.unlink()
            del images

    document: dict[str, Any] = {
        "benchmark": "pid-export runtime overhead (stand-in backend: velocity = x / 2)",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {"size": f"{height}x{width}", "batch": batch, "batch_size": batch_size, "steps": steps,
                     "device": str(run_device), "formats": list(formats), "repeat": repeat,
                     "torch_threads": torch.get_num_threads()},
        "environment": {"device_name": device_name(run_device), "python": platform.python_version(),
                        "torch": torch.__version__, "host": platform.platform()},
        "image_bytes": image_bytes,
        "stages": {name: _summarise(runs) for name, runs in stages.items()},
        "decode_timings": timings,
        "file_bytes": sizes,
    }
    return document


def summary_lines(document: dict[str, Any]) -> list[str]:
    s = document["settings"]
    lines = [f"{s['size']}, B={s['batch']}, {s['steps']} steps on {document['environment']['device_name']}; "
             f"one image-size = {document['image_bytes'] / 2**20:.0f} MiB; median of {s['repeat']} run(s)"]
    for name, stage in document["stages"].items():
        growth = stage.get("host_peak_growth_images")
        text = f"  {name:<12} {stage['seconds_median']:7.3f} s   host peak +{growth:.2f} image-sizes" \
            if growth is not None else f"  {name:<12} {stage['seconds_median']:7.3f} s"
        if "device_peak_growth_images" in stage:
            text += f", device peak +{stage['device_peak_growth_images']:.2f} (torch)"
        if name.startswith("write_"):
            size = document["file_bytes"].get(name.removeprefix("write_"))
            text += f", file {size / 1e6:.1f} MB" if size is not None else ""
        lines.append(text)
    t = document["decode_timings"][-1]
    steps = ", ".join(f"{v:.3f}" for v in t["steps_s"])
    lines.append(f"  decode parts (last run): noise {t['noise_s']:.3f} s, bind {t['bind_s']:.3f} s, "
                 f"steps [{steps}] s, {t['chunks']} chunk(s)")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda needs a CUDA GPU visible to torch", file=sys.stderr)
        return 1
    document = measure(args.size, args.batch, args.batch_size, args.steps, args.device, args.formats,
                       args.repeat, work_dir=args.out.parent if args.out else None)
    for line in summary_lines(document):
        print(line)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(document, indent=1) + "\n"
        atomic_write(args.out, lambda temp: temp.write_text(text))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
