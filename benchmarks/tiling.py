"""Tiled against untiled decodes: `python -m benchmarks.tiling MODEL --size HxW --tile HxW --overlaps 0,128,256`.

For a model (export directory, engine or .onnx; a real checkpoint's export on a GPU,
or a golden export on a CPU), the same latent, caption and seed are decoded whole and
with per-step tiling at each overlap. Per configuration: latency (median over
`--repeat` decodes, after one warm-up), peak memory (host: VmHWM, reset at the start;
CUDA: torch's peak allocation, which holds TensorRT's buffers and scratch, and the
whole GPU's used memory) and, against the untiled decode, PSNR (peak-to-peak 2 of the
[-1, 1] sample, the same as 1 on [0, 1] images) and relative error ||a - b|| / ||b||.
Each configuration runs in its own process, so one's allocator arena does not hide the
next one's peak. `--latents F.npy` decodes a real latent (default: a seeded random one,
which on random-weight networks overstates the loss). Writes `--out F.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pid_runtime.sizes import parse_hw

CHILD = "--child"


def run_one(args: argparse.Namespace) -> None:
    """One configuration in this process: decode `repeat` times, save the image and the numbers."""
    from benchmarks.hardware import MemoryGrowth
    from pid_runtime.backends import open_backend
    from pid_runtime.decode import decode

    backend = open_backend(args.model, device=args.device)
    meta = backend.meta
    height, width = parse_hw(args.size)
    if args.latents:
        latents = torch.from_numpy(np.load(args.latents)).float()
    else:
        g = torch.Generator().manual_seed(0)
        latents = torch.randn(1, meta.latent_channels, height // meta.pixel_scale, width // meta.pixel_scale,
                              generator=g)
    caption = torch.zeros(1, meta.txt_max_length, meta.txt_embed_dim) if args.zero_caption else \
        torch.randn(1, meta.txt_max_length, meta.txt_embed_dim, generator=torch.Generator().manual_seed(1))
    tile = None if args.config == "off" else tuple(int(v) for v in args.config.split(","))
    size = (height, width) if (height, width) != (latents.shape[-2] * meta.pixel_scale,
                                                 latents.shape[-1] * meta.pixel_scale) else None
    seconds: list[float] = []
    plans: list = []
    with MemoryGrowth(backend.device) as growth:
        for index in range(args.repeat + 1):
            start = time.perf_counter()
            result = decode(backend, latents, caption, seed=0, steps=args.steps, size=size, tile=tile,
                            on_plan=plans.append)
            if index:  # the first decode warms up (engine contexts, allocator arenas)
                seconds.append(time.perf_counter() - start)
    backend.close()
    np.save(args.image, result.images.numpy())
    Path(args.record).write_text(json.dumps({
        "config": args.config, "plan": plans[0].describe() if plans else "whole",
        "seconds_median": statistics.median(seconds), "seconds": seconds,
        "host_peak_growth_gib": (growth.host_peak_growth or 0) / 2**30,
        "device_peak_growth_gib": None if growth.device_peak_growth is None else growth.device_peak_growth / 2**30,
        "device_used_growth_gib": None if growth.device_used_growth is None else growth.device_used_growth / 2**30,
        "device": str(backend.device), "backend": backend.name}))


def compare(image: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(PSNR dB with peak-to-peak 2, relative error) of image against reference."""
    diff = image.astype(np.float64) - reference.astype(np.float64)
    mse = float(np.mean(diff ** 2))
    psnr = math.inf if mse == 0 else 10 * math.log10(4.0 / mse)
    return psnr, float(np.linalg.norm(diff) / np.linalg.norm(reference.astype(np.float64)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--size", required=True, help="output HxW")
    parser.add_argument("--tile", required=True, help="tile HxW")
    parser.add_argument("--overlaps", default="0,64,128,256")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--latents", default=None)
    parser.add_argument("--zero-caption", action="store_true", help="a zero caption instead of a seeded random one")
    parser.add_argument("--out", default=None, help="JSON file for the records")
    args, rest = parser.parse_known_args(argv)
    if CHILD in rest:  # internal: one configuration
        child = argparse.ArgumentParser()
        child.add_argument(CHILD, action="store_true")
        child.add_argument("--config")
        child.add_argument("--image")
        child.add_argument("--record")
        vars(args).update(vars(child.parse_args(rest)))
        run_one(args)
        return 0
    th, tw = parse_hw(args.tile)
    configs = ["off"] + [f"{th},{tw},{int(o)}" for o in args.overlaps.split(",")]
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for config in configs:
            image, record = Path(tmp) / f"{config}.npy", Path(tmp) / f"{config}.json"
            command = [sys.executable, "-m", "benchmarks.tiling", args.model, "--size", args.size, "--tile", args.tile,
                       "--steps", str(args.steps), "--repeat", str(args.repeat), "--device", args.device,
                       CHILD, "--config", config, "--image", str(image), "--record", str(record)]
            command += (["--latents", args.latents] if args.latents else []) + (
                ["--zero-caption"] if args.zero_caption else [])
            subprocess.run(command, check=True)
            entry = json.loads(record.read_text())
            reference = np.load(Path(tmp) / "off.npy")
            entry["psnr_db"], entry["rel_err"] = compare(np.load(image), reference)
            records.append(entry)
            print(f"{entry['plan']:<55} {entry['seconds_median']:8.3f} s  host +{entry['host_peak_growth_gib']:.2f} GiB"
                  + (f"  device +{entry['device_peak_growth_gib']:.2f} GiB" if entry["device_peak_growth_gib"] else "")
                  + f"  PSNR {entry['psnr_db']:.2f} dB  rel err {entry['rel_err']:.4f}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"model": args.model, "size": args.size, "steps": args.steps,
                                              "records": records}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
