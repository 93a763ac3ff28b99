"""`pid-export`: release (or custom network) -> checkpoint -> ONNX -> TensorRT engine."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from . import interrupts
from .config import ConfigError, PidConfig
from .interrupts import Interrupted
from .pipeline import run_export
from .request import EngineOptions, ExportRequest
from .stages import PipelineError, WriteFailure
from .releases import VARIANTS, UnknownReleaseError, backbone_names, get_release, released_pairs_text
from .staging import StagingError, check_output_dir

DEFAULT_OUT_ROOT = Path("engines")
DEFAULT_PRECISION = "bf16"


class UsageProblem(click.ClickException):
    """One-line error for the user; exit code 2."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"pid-export: error: {self.message}", err=True)


class RunFailed(UsageProblem):
    """The run failed although its input was fine (e.g. a full disk); one line, exit code 1."""

    exit_code = 1


def _say(msg: str) -> None:
    click.echo(msg, err=False)


def _check_writable(out_dir: Path) -> None:
    """Fail before any slow work if the export directory cannot be created."""
    parent = out_dir.resolve().parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise UsageProblem(f"cannot write the export to {out_dir}: {probe} is not a writable directory")
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageProblem(f"cannot write the export to {out_dir}: it exists and is not a directory")
    try:
        check_output_dir(out_dir)  # only an export of this tool is ever replaced
    except StagingError as exc:
        raise UsageProblem(str(exc)) from None


def _load_network_config(path: Path) -> PidConfig:
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise UsageProblem(f"cannot read network config {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise UsageProblem(f"network config {path} is not valid JSON: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("network"), dict):
        data = data["network"]  # a golden-style file with the config under "network"
    try:
        return PidConfig.from_dict(data)
    except ConfigError as exc:
        raise UsageProblem(f"network config {path}: {exc}") from None


def _hw_option(text: str | None):
    if text is None:
        return None
    from .engine_profiles import EngineError, parse_hw

    try:
        return parse_hw(text)
    except EngineError as exc:
        raise UsageProblem(str(exc)) from None


def _engine_options(min_hw, opt_hw, max_hw, max_batch, profiles, trt, compute_capability, workspace_gb,
                    strip_weights, verify) -> EngineOptions:
    from .engine_plan import EngineError, parse_compute_capabilities
    from .engine_profiles import parse_profiles

    if profiles is not None and opt_hw is not None:
        raise UsageProblem("give either --opt or --profiles (each profile names its opt size), not both")
    try:
        specs = parse_profiles(profiles) if profiles is not None else None
        targets = parse_compute_capabilities(compute_capability) if compute_capability is not None else None
    except EngineError as exc:
        raise UsageProblem(str(exc)) from None
    return EngineOptions(min_hw=_hw_option(min_hw), opt_hw=_hw_option(opt_hw), max_hw=_hw_option(max_hw),
                         max_batch=max_batch, profiles=specs, library=trt, compute_capabilities=targets,
                         workspace_gb=workspace_gb, strip_weights=strip_weights, verify=verify)


HELP = f"""Export a PiD decoder to ONNX (dynamic 2K-4K shapes) and, where TensorRT or
TensorRT-RTX is installed, build an engine from it (TensorRT-RTX builds without a GPU).

\b
Releases (--backbone / --variant):
{released_pairs_text()}

\b
Examples:
  pid-export --backbone sd3 --variant 2kto4k
  pid-export --backbone flux --variant 2k --precision fp16 --out engines/flux-2k
  pid-export --backbone sd3 --variant 2kto4k --precision fp8 --calibration my-latents/
  pid-export --network-config net.json --checkpoint ft.pth --precision fp32 --onnx-only --out my-export
  pid-export --backbone sd3 --variant 2kto4k --trt rtx --compute-capability 8.9,12.0
  pid-export --demo      # small built-in model, no download: export (+ engine) + one decode
"""


@click.command(help=HELP, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--backbone", type=str, metavar="NAME",
              help=f"LDM backbone of the release: {', '.join(backbone_names())}.")
@click.option("--variant", type=str, metavar="NAME", help=f"Release variant: {', '.join(VARIANTS)}.")
@click.option("--checkpoint", type=click.Path(path_type=Path), metavar="PATH",
              help="Local checkpoint (.pth or .safetensors); default: the release's file from the "
                   "Hugging Face hub (nvidia/PiD), through its normal cache.")
@click.option("--network-config", type=click.Path(path_type=Path), metavar="FILE.json",
              help="Custom network settings (reference keyword naming); needs --checkpoint.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16", "fp8"]), default=DEFAULT_PRECISION,
              show_default=True, help="Precision inside the graph (float32 at the boundary). bf16 is "
                                      "the safe choice at 4K; fp16 may overflow there. fp8: E4M3 transformer "
                                      "blocks, calibrated, checked by an accuracy guard (Ada / Hopper / "
                                      "Blackwell GPUs).")
@click.option("--fp8-base", type=click.Choice(["bf16", "fp16"]), default="bf16", show_default=True,
              help="fp8: precision of the layers that stay out of FP8.")
@click.option("--calibration", "calibration_dir", type=click.Path(path_type=Path), metavar="DIR",
              help="fp8: your latents (+ NAME.caption.npy caption embeddings), the files pid-run reads; "
                   "a quarter is held out for the accuracy guard. Default: a built-in synthetic set.")
@click.option("--guard-min-psnr", type=float, default=35.0, show_default=True, metavar="DB",
              help="fp8: fail unless the FP8 images reach this PSNR vs float32 on held-out inputs.")
@click.option("--guard-max-error-ratio", type=click.FloatRange(min=0), default=4.0, show_default=True,
              metavar="X", help="fp8: fail when the FP8 error exceeds X times the base precision's error.")
@click.option("--accept-accuracy-loss", is_flag=True,
              help="fp8: keep the export (and build the engine) even when the accuracy guard fails.")
@click.option("--fp8-attention", is_flag=True,
              help="fp8, EXPERIMENTAL: attention in FP8 too (Q/DQ on its Q, K, V); not yet checked on a GPU.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), metavar="DIR",
              help="Export directory (default: engines/<release>-<precision>/). Replaced whole on success.")
@click.option("--onnx-only", is_flag=True, help="Stop after the ONNX export.")
@click.option("--engine", "want_engine", is_flag=True,
              help="Require the engine: fail (instead of skipping it) when no TensorRT library can build it.")
@click.option("--trt", type=click.Choice(["auto", "tensorrt", "rtx"]), default=None,
              help="TensorRT library: tensorrt (enterprise; data-centre and RTX GPUs; builds on the GPU) or rtx "
                   "(TensorRT-RTX; RTX GPUs; builds without a GPU). Default: $PID_TRT, else auto (enterprise "
                   "first when a CUDA GPU is visible).")
@click.option("--compute-capability", metavar="LIST",
              help="TensorRT-RTX build targets, e.g. 8.9,12.0 (default: its defaults 8.0, 8.6, 8.9, 12.0+). "
                   "Enterprise TensorRT builds for the GPU it runs on.")
@click.option("--min", "min_hw", metavar="HxW", help="Engine profile: smallest output size.")
@click.option("--opt", "opt_hw", metavar="HxW", help="Engine profile: size the kernels are tuned for.")
@click.option("--max", "max_hw", metavar="HxW", help="Engine profile: largest output size.")
@click.option("--profiles", metavar="SPECS",
              help="Several optimization profiles, comma-separated, each OPT or MIN:OPT:MAX (HxW), e.g. "
                   "2048x2048,3840x3840; the runtime picks, per decode, the profile covering the size whose "
                   "OPT is nearest. Default: 2kto4k releases get 2048x2048 (up to 2688x2688) and 3840x3840; "
                   "others one profile. Any of --min/--opt/--max instead asks for one profile.")
@click.option("--max-batch", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Engine profile: largest batch.")
@click.option("--workspace-gb", type=click.FloatRange(min=0.1), help="TensorRT builder workspace limit.")
@click.option("--strip-weights", is_flag=True,
              help="Weight-stripped refittable plan (MBs); weights are refitted from the ONNX at load. "
                   "TensorRT-RTX builds one on the target GPU only.")
@click.option("--verify", is_flag=True,
              help="After building, run the engine at each profile's min, opt and max size against the float32 "
                   "PyTorch network; fail when it is wrong. Needs a GPU the engine runs on.")
@click.option("--allow-lint-problems", is_flag=True,
              help="Keep an export whose graph fails the TensorRT lint (unsupported op, unfused attention, "
                   "float64) instead of failing; the engine build may then fail or run slowly.")
@click.option("--static", "static_hw", metavar="HxW",
              help="Export fixed shapes (batch 1, this output size) instead of dynamic ones.")
@click.option("--caption-model", metavar="ID|DIR",
              help="Gemma-2 caption encoder (hub id, local dir or exported encoder dir) used to store the "
                   "unconditional (empty-caption) embedding in the export, so pid-run can decode without a "
                   "caption. A hub model that is not cached is downloaded into the Hugging Face cache (size "
                   "announced first) unless HF_HUB_OFFLINE=1; a failed download only skips the embedding. "
                   "Default: $PID_CAPTION_MODEL, else Efficient-Large-Model/gemma-2-2b-it.")
@click.option("--no-empty-caption", is_flag=True,
              help="Do not store the unconditional caption embedding (and download nothing for it).")
@click.option("--demo", is_flag=True,
              help="Run the whole job on the embedded default: the sd3/2kto4k checkpoint if it is in the "
                   "local cache, else a small built-in model of the real architecture; then decode a "
                   "sample latent with pid-run's runtime.")
def cli(backbone, variant, checkpoint, network_config, precision, fp8_base, calibration_dir, guard_min_psnr,
        guard_max_error_ratio, accept_accuracy_loss, fp8_attention, out_dir, onnx_only, want_engine, trt,
        compute_capability, min_hw, opt_hw, max_hw, profiles, max_batch, workspace_gb, strip_weights, verify,
        allow_lint_problems, static_hw, caption_model, no_empty_caption, demo):
    if demo:
        from .demo import run_demo

        try:
            run_demo(out_dir=out_dir, log=_say, library=trt)
        except WriteFailure as exc:
            raise RunFailed(str(exc)) from None
        except (PipelineError, StagingError) as exc:
            raise UsageProblem(str(exc)) from None
        return

    release = None
    if network_config is not None:
        if backbone or variant:
            raise UsageProblem("give either --backbone/--variant or --network-config, not both")
        if checkpoint is None:
            raise UsageProblem("--network-config needs --checkpoint PATH (the weights of that network)")
        network = _load_network_config(network_config)
        label = network_config.stem
    else:
        if backbone and not variant:
            raise UsageProblem(_variants_of(backbone))
        if not backbone or not variant:
            raise UsageProblem("choose a release with --backbone NAME --variant NAME (see --help), "
                               "or a custom network with --network-config FILE --checkpoint PATH")
        try:
            release = get_release(backbone, variant)
        except UnknownReleaseError as exc:
            raise UsageProblem(str(exc)) from None
        network = release.network
        label = release.name
    out_dir = out_dir or DEFAULT_OUT_ROOT / f"{label}-{precision}"
    static_shape = None
    if static_hw is not None:
        height, width = _hw_option(static_hw)
        scale = network.pixel_scale
        if height < scale or width < scale or height % scale or width % scale:
            raise UsageProblem(f"--static {static_hw}: height and width must be positive multiples of this "
                               f"network's pixel scale {scale}")
        static_shape = (1, height, width)
    engine = _engine_options(min_hw, opt_hw, max_hw, max_batch, profiles, trt, compute_capability, workspace_gb,
                             strip_weights, verify)
    _check_writable(out_dir)
    if release is not None and checkpoint is None:
        from .checkpoints import why_checkpoint_unavailable

        unavailable = why_checkpoint_unavailable(release)  # said before the engine plan and minutes of work
        if unavailable is not None:
            raise UsageProblem(unavailable)
    fp8 = _fp8_options(precision, fp8_base, calibration_dir, guard_min_psnr, guard_max_error_ratio,
                       accept_accuracy_loss, fp8_attention)

    request = ExportRequest(
        network=network, out_dir=out_dir, release=release, checkpoint=checkpoint, precision=precision,
        static_shape=static_shape, onnx_only=onnx_only, require_engine=want_engine, engine=engine,
        allow_lint_problems=allow_lint_problems, empty_caption=not no_empty_caption, caption_model=caption_model,
        fp8=fp8)
    try:
        export_dir = run_export(request, _say)
    except WriteFailure as exc:
        raise RunFailed(str(exc)) from None
    except PipelineError as exc:
        raise UsageProblem(str(exc)) from None
    _say(f"export ready: {export_dir}")
    if release is not None:  # where the user decides to deploy
        from .releases import WEIGHTS_LICENCE_NOTE

        _say(WEIGHTS_LICENCE_NOTE)


def _variants_of(backbone: str) -> str:
    """The one line for --backbone without --variant: that backbone's released variants."""
    from .releases import variants_of

    try:
        variants = variants_of(backbone)
    except UnknownReleaseError as exc:
        return str(exc)
    return (f"--backbone {backbone} needs --variant NAME: its releases are {', '.join(variants)} "
            f"(e.g. pid-export --backbone {backbone} --variant {variants[-1]})")


def _fp8_options(precision, base, calibration_dir, min_psnr, max_ratio, accept_loss, attention):
    """Fp8Options for --precision fp8; the fp8-only options are refused with another precision."""
    from .accuracy_guard import GuardThresholds
    from .calibration import ItemSettings
    from .fp8_export import Fp8Options

    context = click.get_current_context()
    given = [f"--{name.replace('_', '-')}" for name in ("fp8_base", "calibration_dir", "guard_min_psnr",
                                                      "guard_max_error_ratio", "accept_accuracy_loss", "fp8_attention")
             if context.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]
    if precision != "fp8":
        if given:
            raise UsageProblem(f"{given[0].replace('--calibration-dir', '--calibration')} applies to "
                               "--precision fp8 only")
        return None
    if calibration_dir is not None and not calibration_dir.is_dir():
        raise UsageProblem(f"--calibration {calibration_dir} is not a directory")
    return Fp8Options(base=base, attention=attention, thresholds=GuardThresholds(min_psnr, max_ratio),
                      accept_accuracy_loss=accept_loss, items=ItemSettings(calibration_dir=calibration_dir))


def main(argv: list[str] | None = None) -> None:
    """The entry point: every way of ending is one line and an exit code (0 done, 1 failed,
    2 bad usage, 130 SIGINT, 143 SIGTERM); click's own usage blocks and "Aborted!" are not used."""
    interrupts.install()
    try:
        code = cli.main(args=argv, prog_name="pid-export", standalone_mode=False)
    except Interrupted as exc:
        click.echo(f"pid-export: interrupted by {exc.name}{'; ' + exc.outcome if exc.outcome else ''}", err=True)
        sys.exit(exc.exit_code)
    except click.Abort:  # a KeyboardInterrupt our handler did not raise (e.g. from a prompt)
        click.echo("pid-export: interrupted by SIGINT", err=True)
        sys.exit(130)
    except click.UsageError as exc:  # click's own (unknown option, bad value): one line, not 4
        click.echo(f"pid-export: error: {exc.format_message()} (see pid-export --help)", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
