"""GPU benchmark for one lent H100 / H200: `python -m benchmarks.gpu` from the repository root.

Full-size PiD network (flux/2k configuration, 1.36e9 parameters) with synthetic
bf16-rounded weights generated on the GPU (no download, no checkpoint file),
torch-eager vs torch.compile under bf16 autocast at 2048x2048 and 3840x3840,
batch 1, 4 steps, 1 warm-up + 10 timed decodes each, accuracy against the fp32
eager decode. Needs only torch (with CUDA and triton) and numpy; matplotlib and
psutil are optional. No network access, no TensorRT, no ONNX.

Results: latency-<card>.json / .md / .png in $OUT (when set, e.g. on the lent
machine) or benchmarks/results/gpu-<card>/. They are rewritten after every
measurement, so a run cut short still leaves what it measured; a time budget
(--budget-s, default 480 s) skips what is left rather than overrunning.

`--smoke` runs the same code path on the CPU at a tiny size (the quick network,
two small sizes, 2 timed decodes): a check that the script works, not a benchmark.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

GPU_SIZES = ((2048, 2048), (3840, 3840))
SMOKE_SIZES = ((128, 192), (256, 256))
BACKENDS = ["torch-eager", "torch-compile"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run of the same code path")
    parser.add_argument("--repeat", type=int, default=None, help="timed decodes (default 10; smoke 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed decodes after the first (default 1)")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="skip remaining measurements after this many seconds (default 480)")
    parser.add_argument("--no-accuracy", action="store_true", help="skip the fp32 reference decodes")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="results folder (default: $OUT, else benchmarks/results/gpu-<card>)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from .harness import Settings, run_benchmark
    from .hardware import card_slug, device_name
    from .models import DEFAULT_RELEASE, build_network, quick_config, release_config
    from .report import write_results

    if args.smoke:
        device = torch.device("cpu")
        torch.set_num_threads(1)  # stays quick on a shared CPU
        cfg, model, sizes = quick_config(), "quick config (GPU-script smoke test)", SMOKE_SIZES
        repeat, warmup = args.repeat or 2, 0 if args.warmup is None else args.warmup
    else:
        if not torch.cuda.is_available():
            print("error: no CUDA GPU visible to torch (use --smoke for a CPU check of the script)", file=sys.stderr)
            return 1
        device = torch.device("cuda", torch.cuda.current_device())
        model, cfg = release_config(DEFAULT_RELEASE)
        sizes = GPU_SIZES
        repeat, warmup = args.repeat or 10, 1 if args.warmup is None else args.warmup
    card = card_slug(device_name(device)) if device.type == "cuda" else "cpu-smoke"
    out_dir = args.out_dir or (Path(os.environ["OUT"]) if os.environ.get("OUT") else
                               Path("benchmarks/results") / f"gpu-{card}")
    stem = f"latency-{card}"
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md", "png": out_dir / f"{stem}.png"}
    print(f"device: {device_name(device)}; torch {torch.__version__} (CUDA {torch.version.cuda}); "
          f"results -> {out_dir}", flush=True)

    start = time.perf_counter()
    net, weights = build_network(cfg, device, seed=0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(f"network built in {time.perf_counter() - start:.1f} s: "
          f"{sum(p.numel() for p in net.parameters()) / 1e9:.3f}e9 parameters, {weights}", flush=True)

    settings = Settings(
        cfg=cfg, model=model, sizes=list(sizes), backends=BACKENDS, device=device, precision="bf16",
        batch=1, steps=4, warmup=warmup, repeat=repeat, text_len=cfg.txt_max_length, seed=0,
        check_accuracy=not args.no_accuracy, work_dir=out_dir / ".work", mode="gpu-smoke" if args.smoke else "gpu",
        time_budget_s=max(args.budget_s - (time.perf_counter() - began), 0.0),
        extra={"script": "benchmarks/gpu.py", "attention_kernels": "flash / memory-efficient only (no math fallback)"},
    )
    # Fused attention only: the unfused math kernel would need (L+Lt)^2 scores per head
    # (tens of GB at 4K); failing loudly beats running out of memory halfway.
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        document = run_benchmark(net, weights, settings, on_update=lambda doc: write_results(doc, paths, final=False),
                                 say=lambda msg: print(msg, flush=True))
    why_no_plot = write_results(document, paths, final=True)

    for r in document["records"]:
        if r["status"] == "ok":
            mem = r.get("peak_device_memory_gb") or r.get("peak_host_rss_gb")
            pct = f"{r['pct_of_peak']:.1f}% of {r['peak_tflops']:.0f}" if r.get("pct_of_peak") is not None else "n/a"
            print(f"{r['backend']:<14} {r['output_size']:>10}: median {r['latency_ms_median']:.1f} ms "
                  f"(p90 {r['latency_ms_p90']:.1f}), first decode {r['first_call_ms'] / 1e3:.1f} s, "
                  f"{r['achieved_tflops']:.1f} TFLOP/s ({pct}), peak mem {mem:.2f} GB, "
                  f"max rel err {r.get('max_rel_err')}, PSNR {r.get('psnr_db')}")
        else:
            print(f"{r['backend']:<14} {r['output_size']:>10}: {r['status']}: {r['reason']}")
    print(f"wrote {paths['json']}, {paths['md']}" + (f" (no plot: {why_no_plot})" if why_no_plot
                                                      else f", {paths['png']}"))
    print(f"total {time.perf_counter() - began:.0f} s")
    return 0 if any(r["status"] == "ok" for r in document["records"]) else 1


if __name__ == "__main__":
    sys.exit(main())
