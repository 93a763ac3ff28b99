"""Residual streams in 16 bit or float32? Error of reduced-precision networks vs float32.

    flock /tmp/pid-bigjob.lock python -m benchmarks.residual_precision --out results/residuals.json

The full-size network (a release's configuration, synthetic bf16 weights from
pid_export.synthetic) on outlier-heavy captions (a few Gemma-like channels of
magnitude ~1e3) at a small output size. For each precision, the velocity with the
residual streams (patch, text, pixel) in 16 bit and in float32 is compared with the
float32 network's (relative L2 error and max abs error):
- bf16: PyTorch on the CPU (ONNX Runtime has no bf16 CPU kernels), plus the
  reference's own policy for comparison: float32 weights under bf16 autocast, with
  float32 residual streams (the reference's adds promote to float32 through its
  float32 parameters; this network needs `residual_dtype` for that);
- fp16: the exported ONNX graph in ONNX Runtime's CPU provider.
Needs ~12 GB of RAM and tens of minutes on a small CPU.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import click
import torch

from pid_export import PidConfig, PidNet, get_release
from pid_export.precision import apply_precision
from pid_export.synthetic import synthetic_state_dict
from pid_runtime.sizes import parse_hw

OUTLIER_CHANNELS = (7, 311, 1024, 2000)  # arbitrary fixed channels, scaled to ~1e3 like Gemma-2's outliers


def make_inputs(cfg, size: tuple[int, int], t: float, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    height, width = size
    scale = cfg.pixel_scale
    y = torch.randn(1, cfg.txt_max_length, cfg.txt_embed_dim, generator=gen)
    y[..., [c % cfg.txt_embed_dim for c in OUTLIER_CHANNELS]] *= 1000.0
    return (torch.randn(1, 3, height, width, generator=gen), torch.tensor([t]), y,
            torch.randn(1, cfg.lq_latent_channels, height // scale, width // scale, generator=gen),
            torch.tensor([0.0]))


def errors(got: torch.Tensor, want: torch.Tensor) -> dict[str, float]:
    got, want = torch.as_tensor(got).double(), want.double()
    return {"rel_l2": float((got - want).norm() / want.norm()), "max_abs": float((got - want).abs().max()),
            "finite": bool(torch.isfinite(got).all())}


def network(cfg, state: dict[str, torch.Tensor]) -> PidNet:
    with torch.device("meta"):
        net = PidNet(cfg)
    net.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)
    return net.eval().requires_grad_(False)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--release", default="sd3/2kto4k", show_default=True,
              help="backbone/variant, or a JSON network config (a golden case's file: a quick smoke run).")
@click.option("--size", default="256x256", show_default=True, help="Output HxW.")
@click.option("--timesteps", default="999,342", show_default=True, help="t x 1000 values, one input each.")
@click.option("--parts", default="autocast,bf16,fp16", show_default=True, help="Which comparisons to run.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write the numbers as JSON here.")
def main(release: str, size: str, timesteps: str, parts: str, out: str | None) -> None:
    torch.set_num_threads(2)
    if release.endswith(".json"):
        data = json.loads(Path(release).read_text())
        cfg = PidConfig.from_dict(data.get("network", data))
    else:
        cfg = get_release(*release.split("/")).network
    try:
        hw = parse_hw(size)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--size'") from None
    inputs = [make_inputs(cfg, hw, float(t), seed=i) for i, t in enumerate(timesteps.split(","))]
    state = synthetic_state_dict(cfg, prefix="", with_aux_head=False)
    rows: list[dict] = []

    def record(precision: str, residuals: str, how: str, outputs: list[torch.Tensor], seconds: float) -> None:
        for inp, got, want in zip(inputs, outputs, reference):
            row = {"precision": precision, "residuals": residuals, "run": how, "t": float(inp[1]),
                   **errors(got, want), "seconds": seconds / len(outputs)}
            rows.append(row)
            click.echo(f"{precision:5} residuals {residuals:7} ({how}) t={row['t']:.0f}: "
                       f"rel L2 {row['rel_l2']:.3e}, max abs {row['max_abs']:.3e}")

    wanted = set(parts.split(","))
    net = network(cfg, state)
    with torch.no_grad():
        start = time.perf_counter()
        reference = [net(*inp) for inp in inputs]
        click.echo(f"fp32 reference: {time.perf_counter() - start:.0f} s")
        if "autocast" in wanted:
            net.residual_dtype = torch.float32
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                autocast = [net(*inp) for inp in inputs]
            record("bf16", "float32", "PyTorch autocast, fp32 weights (the reference's policy)", autocast,
                   time.perf_counter() - start)
    del net

    for float32_residuals in (False, True) if "bf16" in wanted else ():
        net = apply_precision(network(cfg, state), "bf16", float32_residuals=float32_residuals)
        with torch.no_grad():
            start = time.perf_counter()
            outputs = [net(*inp) for inp in inputs]
        record("bf16", "float32" if float32_residuals else "16-bit", "PyTorch CPU", outputs,
               time.perf_counter() - start)
        del net

    from pid_export.onnx_export import export_onnx
    from pid_runtime.backends.onnxruntime import create_session
    from pid_runtime.metadata import INPUT_NAMES

    for float32_residuals in (False, True) if "fp16" in wanted else ():
        with tempfile.TemporaryDirectory(prefix="pid-residuals-") as tmp:
            start = time.perf_counter()
            result = export_onnx(network(cfg, state), Path(tmp) / "fp16", "fp16",
                                 float32_residuals=float32_residuals)
            click.echo(f"fp16 export ({'float32' if float32_residuals else '16-bit'} residuals): "
                       f"{time.perf_counter() - start:.0f} s")
            session = create_session(result.onnx_path, torch.device("cpu"))
            start = time.perf_counter()
            outputs = [torch.from_numpy(session.run(None, {n: v.numpy() for n, v in zip(INPUT_NAMES, inp)})[0])
                       for inp in inputs]
            record("fp16", "float32" if float32_residuals else "16-bit", "ONNX Runtime CPU", outputs,
                   time.perf_counter() - start)
            del session

    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps({"release": release, "size": size, "outlier_channels": OUTLIER_CHANNELS,
                                         "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
