"""`pid-export`: release (or custom network) -> checkpoint -> ONNX -> TensorRT engine."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click

from .config import ConfigError, PidConfig
from .releases import VARIANTS, UnknownReleaseError, backbone_names, get_release, released_pairs_text

DEFAULT_OUT_ROOT = Path("engines")
DEFAULT_PRECISION = "bf16"


class UsageProblem(click.ClickException):
    """One-line error for the user; exit code 2."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"pid-export: error: {self.message}", err=True)


def _say(msg: str) -> None:
    click.echo(msg, err=False)


class Stage:
    """Prints `[n] title ... done in Xs` around a long step."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, title: str):
        self.count += 1
        return _StageTimer(f"[{self.count}] {title}")


class _StageTimer:
    def __init__(self, title: str) -> None:
        self.title = title

    def __enter__(self):
        self.start = time.perf_counter()
        _say(f"{self.title} ...")
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            _say(f"    done in {time.perf_counter() - self.start:.1f} s")
        return False


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
    from .engine import EngineError, parse_hw

    try:
        return parse_hw(text)
    except EngineError as exc:
        raise UsageProblem(str(exc)) from None


HELP = f"""Export a PiD decoder to ONNX (dynamic 2K-4K shapes) and, where TensorRT is
installed, build a TensorRT engine from it.

\b
Releases (--backbone / --variant):
{released_pairs_text()}

\b
Examples:
  pid-export --backbone sd3 --variant 2kto4k
  pid-export --backbone flux --variant 2k --precision fp16 --out engines/flux-2k
  pid-export --network-config net.json --checkpoint ft.pth --precision fp32 --onnx-only --out my-export
  pid-export --demo      # small built-in model, no download: export + one decode
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
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default=DEFAULT_PRECISION,
              show_default=True, help="Precision inside the graph (float32 at the boundary). bf16 is "
                                      "the safe choice at 4K; fp16 may overflow there.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), metavar="DIR",
              help="Export directory (default: engines/<release>-<precision>/). Replaced whole on success.")
@click.option("--onnx-only", is_flag=True, help="Stop after the ONNX export.")
@click.option("--engine", "want_engine", is_flag=True,
              help="Require the TensorRT engine: fail (instead of skipping it) when TensorRT is absent.")
@click.option("--min", "min_hw", metavar="HxW", help="Engine profile: smallest output size.")
@click.option("--opt", "opt_hw", metavar="HxW", help="Engine profile: size the kernels are tuned for.")
@click.option("--max", "max_hw", metavar="HxW", help="Engine profile: largest output size.")
@click.option("--max-batch", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Engine profile: largest batch.")
@click.option("--workspace-gb", type=click.FloatRange(min=0.1), help="TensorRT builder workspace limit.")
@click.option("--strip-weights", is_flag=True,
              help="Weight-stripped refittable plan (MBs); weights are refitted from the ONNX at load.")
@click.option("--verify", is_flag=True, help="After building, compare the engine with the float32 PyTorch network at a small size.")
@click.option("--static", "static_hw", metavar="HxW",
              help="Export fixed shapes (batch 1, this output size) instead of dynamic ones.")
@click.option("--caption-model", metavar="ID|DIR",
              help="Gemma-2 caption encoder (hub id, local dir or exported encoder dir) used to store the "
                   "unconditional (empty-caption) embedding in the export; only local/cached models are used. "
                   "Default: $PID_CAPTION_MODEL, else Efficient-Large-Model/gemma-2-2b-it if cached.")
@click.option("--no-empty-caption", is_flag=True, help="Do not store the unconditional caption embedding.")
@click.option("--demo", is_flag=True,
              help="Run the whole job on the embedded default: the sd3/2kto4k checkpoint if it is in the "
                   "local cache, else a small built-in model of the real architecture; then decode a "
                   "sample latent with pid-run's runtime.")
def cli(backbone, variant, checkpoint, network_config, precision, out_dir, onnx_only, want_engine,
        min_hw, opt_hw, max_hw, max_batch, workspace_gb, strip_weights, verify, static_hw, caption_model,
        no_empty_caption, demo):
    if demo:
        from .demo import run_demo

        run_demo(out_dir=out_dir, log=_say)
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
        static_shape = (1, height, width)
    profile_hw = (_hw_option(min_hw), _hw_option(opt_hw), _hw_option(max_hw))
    _check_writable(out_dir)

    # Say up front (before minutes of export) whether the engine step will happen.
    build = False
    if not onnx_only:
        from .engine import tensorrt_status

        usable, why = tensorrt_status()
        if usable:
            build = True
            if precision == "fp32":
                _say("note: building an fp32 engine; use --precision bf16 for speed")
        elif want_engine:
            raise UsageProblem(f"cannot build the engine: {why}")
        else:
            _say(f"engine step will be skipped: {why}")

    export_dir, checkpoint_path = export_release(network, release, checkpoint, precision, out_dir, static_shape)
    if not no_empty_caption:
        store_unconditional_caption(export_dir, network, caption_model)
    if build:
        build_and_verify(export_dir, release, precision, profile_hw, max_batch, workspace_gb, strip_weights,
                         verify_against=(network, checkpoint_path) if verify else None)
    _say(f"export ready: {export_dir}")


def export_release(network: PidConfig, release, checkpoint: Path | None, precision: str, out_dir: Path,
                   static_shape) -> tuple[Path, Path]:
    """Checkpoint -> verified PidNet -> ONNX export directory; returns it and the checkpoint used."""
    import torch

    from .checkpoints import CheckpointError, file_sha256, load_checkpoint, resolve_checkpoint, verify_checkpoint
    from .network import PidNet
    from .onnx_export import ExportError, export_onnx

    stage = Stage()
    try:
        with stage("locating the checkpoint"):
            path = resolve_checkpoint(release, checkpoint)
            _say(f"    {path} ({path.stat().st_size / 1e9:.2f} GB)")
        with stage("loading and verifying the checkpoint"):
            state = load_checkpoint(path)
            verify_checkpoint(state, network, release.label if release else None)
            sha = file_sha256(path)
            count = sum(t.numel() for t in state.values())
            _say(f"    {len(state)} tensors, {count / 1e9:.3f} B parameters, sha256 {sha[:16]}...")
    except CheckpointError as exc:
        raise UsageProblem(str(exc)) from None
    with stage("building the network"):
        with torch.device("meta"):
            net = PidNet(network)
        # The export runs in float32 on the CPU; reduced precision is applied by export_onnx.
        net.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
        del state
    try:
        with stage(f"exporting ONNX ({precision}) to {out_dir}"):
            result = export_onnx(net, out_dir, precision, release=release, checkpoint_sha256=sha,
                                 static_shape=static_shape, progress=lambda m: _say(f"    {m}"))
    except ExportError as exc:
        raise UsageProblem(str(exc)) from None
    except OSError as exc:
        raise UsageProblem(f"cannot write the export to {out_dir}: {exc.strerror or exc}") from None
    _say(f"    {result.size_bytes / 1e9:.2f} GB; ops: {result.lint.histogram()}")
    for problem in result.lint.problems:
        _say(f"    TensorRT lint: {problem}")
    return result.out_dir, path


def store_unconditional_caption(export_dir: Path, network: PidConfig, caption_model: str | None) -> None:
    """empty_caption.npy for pid-run's caption-less default, when an encoder is on this machine."""
    from .caption_export import store_empty_caption

    store_empty_caption(export_dir, caption_model, notify=lambda m: _say(f"    {m}"),
                        txt_embed_dim=network.txt_embed_dim)


def _reference_net(network: PidConfig, checkpoint_path: Path):
    """The float32 PyTorch network of the export, for --verify (ORT's CPU provider has no bf16)."""
    import torch

    from .checkpoints import load_checkpoint
    from .network import PidNet

    with torch.device("meta"):
        net = PidNet(network)
    net.load_state_dict({k: v.float() for k, v in load_checkpoint(checkpoint_path).items()}, assign=True)
    return net.eval()


def build_and_verify(export_dir: Path, release, precision: str, profile_hw, max_batch: int,
                     workspace_gb, strip_weights: bool, verify_against: tuple[PidConfig, Path] | None) -> None:
    from pid_runtime.metadata import MODEL_METADATA, ONNX_NAME, ModelMetadata

    from .engine import EngineError, EngineProfile, build_engine, verify_engine

    meta = ModelMetadata.load(export_dir / MODEL_METADATA)
    min_hw, opt_hw, max_hw = profile_hw
    if opt_hw is None and release is not None:
        opt_hw = tuple(release.opt_size)
    stage = Stage()
    try:
        profile = EngineProfile.for_metadata(meta, min_hw, opt_hw, max_hw, max_batch=max_batch)
        with stage(f"building the TensorRT engine ({precision}, sizes {profile.min_hw}..{profile.max_hw}, "
                   f"tuned for {profile.opt_hw})"):
            plan = build_engine(export_dir / ONNX_NAME, export_dir, profile, workspace_gb=workspace_gb,
                                strip_weights=strip_weights, log=lambda m: _say(f"    {m}"))
            _say(f"    {plan} ({plan.stat().st_size / 1e6:.1f} MB)")
        if verify_against is not None:
            with stage("verifying the engine against the float32 PyTorch network"):
                net = _reference_net(*verify_against)
                verify_engine(plan, export_dir / ONNX_NAME, net=net, log=lambda m: _say(f"    {m}"))
    except EngineError as exc:
        raise UsageProblem(str(exc)) from None


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="pid-export", standalone_mode=True)
    except KeyboardInterrupt:
        click.echo("pid-export: interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
