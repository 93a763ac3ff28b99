"""Decode latency, memory and accuracy of each backend: `python -m benchmarks.latency ...`.

Modes:
  --quick   CPU only, the small quick network (benchmarks/models.py), torch-eager vs
            onnxruntime (a static-shape export made on the spot) at 128x192; ~half a minute.
  default   a released network configuration (--release, default flux/2k) with a
            checkpoint (--checkpoint) or synthetic weights, every backend, the trained
            output sizes.
Results: JSON (`records` list), a markdown table and a PNG plot; see benchmarks/README.md.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import click
import torch

from pid_export.pipeline import PipelineError
from pid_runtime.sizes import parse_hw

from .hardware import load_text

DEFAULT_SIZES = ((2048, 2048), (2304, 1728), (2688, 1536), (3840, 3840), (4096, 3072))
DEFAULT_BACKENDS = ("torch-eager", "torch-compile", "onnxruntime", "tensorrt")
QUICK_BACKENDS = ("torch-eager", "onnxruntime")


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'2048x2048,3840x3840' -> [(2048, 2048), (3840, 3840)] (height x width)."""
    sizes = []
    for part in text.split(","):
        try:
            sizes.append(parse_hw(part))
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
    return sizes


def parse_backends(text: str) -> list[str]:
    from .backends import BACKEND_NAMES

    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in BACKEND_NAMES]
    if unknown or not names:
        raise click.BadParameter(f"unknown backend(s) {', '.join(unknown) or '(none)'}; "
                                 f"choose from {', '.join(BACKEND_NAMES)}")
    return names


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise click.ClickException(f"device {name} requested but torch sees no CUDA GPU")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def psnr_text(record: dict) -> str:
    """PSNR as the table says it: `identical` for bit-equal output (no finite PSNR), else dB or n/a."""
    if record.get("max_abs_err") == 0:
        return "identical"
    return f"{record['psnr_db']:.1f}" if record.get("psnr_db") is not None else "n/a"


def output_paths(out: Path | None, results_dir: Path | None, stem: str) -> dict[str, Path]:
    """Where the JSON / markdown / PNG go: --out FILE.json puts the other two beside it."""
    if results_dir is None and out is not None:
        base = out.with_suffix("")
        return {"json": out, "md": base.with_suffix(".md"), "png": base.with_suffix(".png")}
    folder = results_dir or Path("benchmarks/results") / stem
    return {"json": out or folder / f"{stem}.json", "md": folder / f"{stem}.md", "png": folder / f"{stem}.png"}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--quick", is_flag=True, help="CPU smoke benchmark: small network, torch-eager vs onnxruntime.")
@click.option("--sizes", help="Output sizes HEIGHTxWIDTH, comma-separated (default: the trained sizes).")
@click.option("--backends", help=f"Comma-separated, from: {', '.join(DEFAULT_BACKENDS)}.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="auto: bf16 on a GPU, fp32 on the CPU.")
@click.option("--batch", type=click.IntRange(1), default=1, show_default=True)
@click.option("--steps", type=click.IntRange(1, 4), default=4, show_default=True)
@click.option("--warmup", type=click.IntRange(0), default=1, show_default=True,
              help="Untimed decodes after the first one.")
@click.option("--repeat", type=click.IntRange(1), default=10, show_default=True, help="Timed decodes.")
@click.option("--text-len", type=click.IntRange(1), help="Caption tokens (default: the network's maximum).")
@click.option("--release", default=None, help="Network configuration: backbone/variant or hub name "
              "(default flux/2k).")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Weights file; without it the weights are synthetic (random, generated on the device).")
@click.option("--onnx", "onnx_path", type=click.Path(exists=True, path_type=Path),
              help="Existing export directory for onnxruntime (default: a static export per size).")
@click.option("--engine", "engine_path", type=click.Path(exists=True, path_type=Path),
              help="TensorRT engine (.plan) or export directory with engine.plan.")
@click.option("--threads", type=click.IntRange(1), help="torch CPU threads (default: torch's choice; "
              "--quick: 1, which stays fast on a shared machine). ONNX Runtime keeps its own thread pool.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--no-accuracy", is_flag=True, help="Skip the fp32 reference decode.")
@click.option("--peak-tflops", type=click.FloatRange(min=0, min_open=True),
              help="Peak TFLOP/s for '% of peak' (default: the datasheet table; none for CPUs).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="JSON file to write.")
@click.option("--results-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the results (default benchmarks/results/<mode>).")
def main(quick, sizes, backends, device, precision, batch, steps, warmup, repeat, text_len, release, checkpoint,
         onnx_path, engine_path, threads, seed, no_accuracy, peak_tflops, out, results_dir) -> None:
    """Time a whole PiD decode on each backend with the same inputs and noise."""
    from .harness import Settings, run_benchmark
    from .report import write_results
    from .models import DEFAULT_RELEASE, QUICK_SIZE, build_network, quick_config, release_config

    if quick:
        if release or checkpoint:
            raise click.UsageError("--quick uses its own small network; drop --release / --checkpoint")
        if device not in ("auto", "cpu"):
            raise click.UsageError("--quick runs on the CPU; drop --device (or use the full mode)")
        run_device = torch.device("cpu")
        cfg, model = quick_config(), "quick config (hidden 128, 2+2 blocks)"
        chosen_sizes = parse_sizes(sizes) if sizes else [QUICK_SIZE]
        chosen_backends = parse_backends(backends) if backends else list(QUICK_BACKENDS)
        mode = "quick"
    else:
        run_device = resolve_device(device)
        try:
            model, cfg = release_config(release or DEFAULT_RELEASE)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from None
        chosen_sizes = parse_sizes(sizes) if sizes else list(DEFAULT_SIZES)
        chosen_backends = parse_backends(backends) if backends else list(DEFAULT_BACKENDS)
        mode = "full"
    if threads or quick:
        torch.set_num_threads(threads or 1)
    run_precision = precision if precision != "auto" else ("bf16" if run_device.type == "cuda" else "fp32")
    scale = cfg.pixel_scale
    bad = [f"{h}x{w}" for h, w in chosen_sizes if h % scale or w % scale]
    if bad:
        raise click.ClickException(f"size(s) {', '.join(bad)} are not multiples of this network's pixel scale {scale}")

    paths = output_paths(out, results_dir, mode)
    settings = Settings(
        cfg=cfg, model=model, sizes=chosen_sizes, backends=chosen_backends, device=run_device,
        precision=run_precision, batch=batch, steps=steps, warmup=warmup, repeat=repeat,
        text_len=min(text_len or cfg.txt_max_length, cfg.txt_max_length), seed=seed,
        check_accuracy=not no_accuracy, onnx_path=onnx_path, engine_path=engine_path,
        work_dir=paths["json"].parent / f".{mode}-work", peak_override=peak_tflops, mode=mode,
        extra={"torch_threads": torch.get_num_threads()} if run_device.type == "cpu" else {},
    )
    try:
        net, weights = build_network(cfg, run_device, checkpoint, seed)
        document = run_benchmark(net, weights, settings,
                                 on_update=lambda doc: write_results(doc, paths, final=False),
                                 say=lambda msg: click.echo(msg, err=True))
        why_no_plot = write_results(document, paths, final=True)
    except (PipelineError, ValueError, OSError) as exc:  # bad checkpoint or export, sizes, disk
        raise click.ClickException(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    finally:
        shutil.rmtree(settings.work_dir, ignore_errors=True)  # the per-size ONNX exports

    for record in document["records"]:
        if record["status"] == "ok":
            click.echo(f"{record['backend']:<14} {record['output_size']:>10} {record['precision']}: "
                       f"latency_ms_median={record['latency_ms_median']:.1f} p90={record['latency_ms_p90']:.1f} "
                       f"per_call_ms={record['per_call_ms_median']:.1f} "
                       f"TFLOP/s={record['achieved_tflops']:.3f} psnr_db={psnr_text(record)}")
        else:
            click.echo(f"{record['backend']:<14} {record['output_size']:>10} {record['status']}: {record['reason']}")
    click.echo(f"wrote {paths['json']} and {paths['md']}" + (f"; no plot: {why_no_plot}" if why_no_plot
                                                             else f" and {paths['png']}"))
    exporting = document.get("export_s") or 0.0
    click.echo(f"wall time {document['wall_s']:.1f} s: {exporting:.1f} s exporting ONNX, "
               f"{document['wall_s'] - exporting:.1f} s decoding (timed runs, warm-up, reference)")
    click.echo(f"machine: {load_text(document.get('machine_load'))}")
    if not any(r["status"] == "ok" for r in document["records"]):
        raise click.ClickException("no backend produced a measurement (see the reasons above)")


if __name__ == "__main__":
    sys.exit(main())
