"""`pid-export --demo`: the whole job on an embedded default, no download needed.

If the default release's checkpoint (sd3 / 2kto4k) is already in the local
Hugging Face cache, the demo exports it like `pid-export --backbone sd3
--variant 2kto4k`. Otherwise (no hub access here) it uses a small built-in
model of the real architecture (same blocks, interfaces and latent/caption
layout as the sd3 release, fewer and narrower layers, seeded random weights),
exports it to ONNX with dynamic shapes, builds its engine when a TensorRT library is
importable (TensorRT-RTX builds on a CPU-only machine), and decodes a sample latent
through pid_runtime (the same path as `pid-run`: the engine where it can run, else the
ONNX with ONNX Runtime), writing `demo.png`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .config import PidConfig
from .releases import get_release
from .staging import check_output_dir

DEFAULT_BACKBONE, DEFAULT_VARIANT = "sd3", "2kto4k"

# The sd3 release's interface (16-ch latent, x8 VAE, x4 SR, 2304-d captions of 300 tokens),
# with a small transformer: hidden 384 (6 heads of 64), 4 patch blocks, pixel attention 288 (4 x 72).
DEMO_NETWORK = PidConfig(
    num_groups=6, hidden_size=384, pixel_hidden_size=16, pixel_attn_hidden_size=288, pixel_num_groups=4,
    patch_depth=4, pixel_depth=2, lq_latent_channels=16, lq_hidden_dim=64, lq_num_res_blocks=2,
    sr_scale=4, latent_spatial_down_factor=8,
)


@dataclass(frozen=True)
class DemoRelease:
    """Registry-like description of the built-in model (what export metadata records)."""

    name: str = "builtin-small-sd3-layout"
    trained_sizes: tuple = ((256, 256), (256, 384), (512, 512))
    min_size: tuple = (128, 128)
    max_size: tuple = (1024, 1024)


def _cached_default_checkpoint() -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    release = get_release(DEFAULT_BACKBONE, DEFAULT_VARIANT)
    try:
        found = try_to_load_from_cache(release.hub_repo, release.checkpoint_file)
    except Exception:  # a broken cache is the same as no cache here
        return None
    return Path(found) if isinstance(found, str) else None


def _engine_runs_here(library: str | None) -> bool:
    """Whether an engine built here could also run here (then the demo verifies it)."""
    from .engine import EngineError, build_target, why_engines_cannot_run_here

    try:
        return why_engines_cannot_run_here(build_target(library).library) is None
    except EngineError:
        return False


def run_demo(out_dir: Path | None, log: Callable[[str], None] = print, size: tuple[int, int] = (256, 384),
             seed: int = 0, library: str | None = None) -> Path:
    cached = _cached_default_checkpoint()
    if cached is not None:
        from .pipeline import EngineOptions, ExportRequest, run_export

        release = get_release(DEFAULT_BACKBONE, DEFAULT_VARIANT)
        log(f"demo: using the cached {release.label} checkpoint {cached}")
        request = ExportRequest(network=release.network, out_dir=out_dir or Path("engines") / f"{release.name}-bf16",
                                release=release, checkpoint=cached, precision="bf16",
                                engine=EngineOptions(library=library, verify=_engine_runs_here(library)))
        export_dir = run_export(request, log)
        log(f"export ready: {export_dir}")
        return export_dir

    out_dir = out_dir or Path("engines") / "demo-builtin-fp32"
    check_output_dir(out_dir)  # a foreign directory is refused before any work
    log("demo: the released checkpoint is not in the local Hugging Face cache (no hub access here), so this "
        "uses a SMALL BUILT-IN MODEL of the real PiD architecture with random weights: the image shows the "
        "pipeline works, not PiD's quality. Use --backbone/--variant (or --checkpoint) for a real release.")
    return _run_builtin(out_dir, log, size, seed, library)


def _run_builtin(out_dir: Path, log: Callable[[str], None], size: tuple[int, int], seed: int,
                 library: str | None = None) -> Path:
    from pid_runtime.backends import open_backend
    from pid_runtime.decode import decode
    from pid_runtime.io import write_output

    from .network import PidNet
    from .pipeline import (EngineOptions, LoadedNetwork, Stages, one_line_write_errors, build_and_verify, engine_status,
                           export_network)
    from .staging import ExportTransaction
    from .synthetic import synthetic_state_dict

    cfg = DEMO_NETWORK
    with torch.device("meta"):
        net = PidNet(cfg)
    net.load_state_dict(synthetic_state_dict(cfg, dtype=torch.float32, seed=seed, with_aux_head=False, prefix=""),
                        strict=True, assign=True)
    count = sum(p.numel() for p in net.parameters())
    log(f"the built-in model: {count / 1e6:.1f} M parameters, exported with dynamic shapes")
    stages = Stages(log)
    # One transaction like pid-export's: everything (ONNX, engine, demo.png) is written into a
    # staging directory that replaces out_dir in one rename at the end (staging.py).
    with one_line_write_errors(out_dir), ExportTransaction(out_dir, log) as transaction:
        stage = transaction.stage
        export_network(LoadedNetwork(net.eval(), None, None), stage, "fp32", DemoRelease(), stages=stages,
                       in_place=True, shown_as=out_dir)
        usable, library_line = engine_status(library)
        if usable:
            log(f"a TensorRT library is installed, {library_line}: building the built-in model's engine")
            verify = _engine_runs_here(library)  # the network is still float32: it is the reference
            build_and_verify(stage, DemoRelease(), "fp32", EngineOptions(library=library, verify=verify),
                             reference=LoadedNetwork(net, None, None) if verify else None, stages=stages)

        height, width = size
        scale = cfg.pixel_scale
        gen = torch.Generator().manual_seed(seed)
        latents = torch.randn(1, cfg.lq_latent_channels, height // scale, width // scale, generator=gen)
        caption = torch.randn(1, cfg.txt_max_length, cfg.txt_embed_dim, generator=gen)
        with stages(f"decoding a {list(latents.shape)} latent to {height}x{width} (4 steps, seed {seed})"):
            backend = open_backend(stage, log=stages.detail)  # its engine where that can run, else the ONNX
            stages.detail(f"with {backend.name} on {backend.device}")
            try:
                decoded = decode(backend, latents, caption, sigma=0.0, seed=seed, steps=4)
            finally:
                backend.close()
            write_output(decoded.images, stage / "demo.png")
            stages.detail(f"{out_dir / 'demo.png'} (decode {decoded.timings.total:.1f} s)")
        transaction.commit()
    return out_dir
