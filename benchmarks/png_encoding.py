"""PNG encoding of one image, before and after: `python -m benchmarks.png_encoding [--size HxW] [--repeat N]`.

Encoders (8-bit RGB):
  pillow-default   what pid-run did before: the whole image converted to uint8, then Pillow's
                   PNG encoder at its default settings (zlib level 6, a filter chosen per row)
  pillow-fast      Pillow at compress_level=1 with zlib's run-length strategy: the fastest
                   setting the library offers (it still chooses filters per row)
  pid-runtime      pid_runtime.io.write_png: streamed in blocks of rows, "Up" filter, zlib
                   level 1 with the run-length strategy

Contents: `photo` (matplotlib's sample photograph, upscaled, with film grain: the detail of a
4K decode), `smooth` (the same without grain), `noise` (uniform random pixels: incompressible,
what the overhead benchmark's stand-in network produces). Each encoder's file is decoded with
Pillow and checked to hold exactly the same pixels. Reported: median wall and CPU seconds over
--repeat runs, file size.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from pid_runtime.io import atomic_write, write_png
from pid_runtime.sizes import parse_hw


def contents(height: int, width: int) -> dict[str, np.ndarray]:
    """[H,W,3] uint8 test images (see the module docstring)."""
    rng = np.random.default_rng(0)
    try:
        import matplotlib

        photo = Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB")
        smooth = np.asarray(photo.resize((width, height), Image.Resampling.BICUBIC))
    except (ImportError, OSError):  # no matplotlib: smooth synthetic gradients instead of the photograph
        y, x = np.mgrid[0:height, 0:width] / max(height, width)
        smooth = (np.stack([np.sin(7 * x + 3 * y), np.cos(5 * y - 2 * x), np.sin(9 * x * y)], -1) * 110 + 128)
        smooth = smooth.astype(np.uint8)
    grain = rng.normal(0, 3, smooth.shape).round().astype(np.int16)
    photo = np.clip(smooth.astype(np.int16) + grain, 0, 255).astype(np.uint8)
    noise = rng.integers(0, 256, smooth.shape, dtype=np.uint8)
    return {"photo": photo, "smooth": smooth, "noise": noise}


def as_sample(pixels: np.ndarray) -> torch.Tensor:
    """The [3,H,W] float sample in [-1,1] whose image is exactly `pixels`."""
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div(255).mul(2).sub(1).contiguous()


def pillow_default(sample: torch.Tensor, path: Path) -> None:
    pixels = ((sample.clamp(-1, 1) + 1) / 2 * 255).round().permute(1, 2, 0).numpy().astype(np.uint8)
    Image.fromarray(pixels).save(path, format="PNG")


def pillow_fast(sample: torch.Tensor, path: Path) -> None:
    import zlib

    pixels = ((sample.clamp(-1, 1) + 1) / 2 * 255).round().permute(1, 2, 0).numpy().astype(np.uint8)
    Image.fromarray(pixels).save(path, format="PNG", compress_level=1, compress_type=zlib.Z_RLE)


ENCODERS: dict[str, Callable[[torch.Tensor, Path], None]] = {
    "pillow-default": pillow_default, "pillow-fast": pillow_fast, "pid-runtime": write_png}


def measure(size: tuple[int, int], repeat: int, folder: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for content, pixels in contents(*size).items():
        sample = as_sample(pixels)
        for name, encode in ENCODERS.items():
            path = folder / f"{content}-{name}.png"
            walls, cpus = [], []
            for _ in range(repeat):
                wall, cpu = time.perf_counter(), time.process_time()
                encode(sample, path)
                walls.append(time.perf_counter() - wall)
                cpus.append(time.process_time() - cpu)
            with Image.open(io.BytesIO(path.read_bytes())) as png:
                exact = bool(np.array_equal(np.asarray(png.convert("RGB")), pixels))
            results[f"{content}/{name}"] = {"wall_s_median": statistics.median(walls),
                                            "cpu_s_median": statistics.median(cpus), "wall_s_all": walls,
                                            "bytes": path.stat().st_size, "same_pixels": exact}
            path.unlink()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.png_encoding", description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="3840x3840", help="HxW (default 3840x3840)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per encoder and content (default 5)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    args = parser.parse_args(argv)
    try:
        height, width = parse_hw(args.size)
    except ValueError as exc:
        parser.error(str(exc))
    torch.set_num_threads(1)  # the encoders are single-threaded; so is the conversion here
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        results = measure((height, width), args.repeat, Path(folder))
    print(f"{height}x{width}, median of {args.repeat}; wall / CPU seconds, file size, ratio to pillow-default:")
    for key, r in results.items():
        content, name = key.split("/")
        base = results[f"{content}/pillow-default"]
        print(f"  {content:<7} {name:<15} {r['wall_s_median']:6.2f} / {r['cpu_s_median']:5.2f} s  "
              f"{r['bytes'] / 1e6:6.1f} MB  x{base['cpu_s_median'] / r['cpu_s_median']:.1f} CPU, "
              f"x{base['wall_s_median'] / r['wall_s_median']:.1f} wall"
              + ("" if r["same_pixels"] else "  PIXELS DIFFER"))
    if args.out:
        text = json.dumps({"size": f"{height}x{width}", "repeat": args.repeat, "results": results}, indent=1) + "\n"
        atomic_write(args.out, lambda temp: temp.write_text(text))
    return 0 if all(r["same_pixels"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
