"""`pid-export --demo`: the whole job on an embedded default, no download needed.

If the default release's checkpoint (sd3 / 2kto4k) is already in the local
Hugging Face cache, the demo exports it like `pid-export --backbone sd3
--variant 2kto4k`. Otherwise (it downloads nothing) it uses a small built-in
model of the real architecture (same blocks, interfaces and latent/caption
layout as the sd3 release, fewer and narrower layers, seeded random weights),
exports it to ONNX with dynamic shapes, builds its engine when a TensorRT library is
importable (TensorRT-RTX builds on a CPU-only machine), and decodes a sample latent
through pid_runtime (the same path as `pid-run`: the engine where it can run, else the
ONNX with ONNX Runtime), writing `demo.png`.

The built-in export also holds what that decode used, so `pid-run` repeats it exactly:
`demo_latents.npy` (the sample latent) and `empty_caption.npy` (the random caption, stored
as the export's unconditional caption, the one pid-run takes when given none: the built-in
model has no caption encoder). The demo ends with `export ready:` and that pid-run line.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import torch

from .config import PidConfig
from .releases import WEIGHTS_LICENCE_NOTE, Release, get_release
from .staging import check_output_dir

DEFAULT_BACKBONE, DEFAULT_VARIANT = "sd3", "2kto4k"
DEMO_LATENTS_NAME = "demo_latents.npy"  # the sample latent, beside demo.png (pid-run writes demo_latents.png)
DEMO_IMAGE_NAME = "demo.png"

# The sd3 release's interface (16-ch latent, x8 VAE, x4 SR, 2304-d captions of 300 tokens),
# with a small transformer: hidden 384 (6 heads of 64), 4 patch blocks, pixel attention 288 (4 x 72).
DEMO_NETWORK = PidConfig(
    num_groups=6, hidden_size=384, pixel_hidden_size=16, pixel_attn_hidden_size=288, pixel_num_groups=4,
    patch_depth=4, pixel_depth=2, lq_latent_channels=16, lq_hidden_dim=64, lq_num_res_blocks=2,
    sr_scale=4, latent_spatial_down_factor=8,
)


# The built-in model as a registry entry, so the export treats it like any release. It was
# trained on nothing: its "trained sizes" are the range its export covers (128..1024, one
# engine profile tuned at 256x256), and its checkpoint is made in memory, never looked up.
DEMO_RELEASE = Release(name="builtin-small-sd3-layout", backbone=DEFAULT_BACKBONE, variant="builtin",
                       network=DEMO_NETWORK,
                       trained_sizes=((128, 128), (256, 256), (256, 384), (512, 512), (1024, 1024)),
                       opt_size=(256, 256))


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
    from .engine_plan import EngineError, build_target

    try:
        return build_target(library).why_it_cannot_run_here() is None
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
        log(WEIGHTS_LICENCE_NOTE)
        return export_dir

    out_dir = out_dir or Path("engines") / "demo-builtin-fp32"
    check_output_dir(out_dir)  # a foreign directory is refused before any work
    log(f"demo: the released checkpoint is not in the local Hugging Face cache ({_hub_note()}), so this "
        "uses a SMALL BUILT-IN MODEL of the real PiD architecture with random weights: the image shows the "
        "pipeline works, not PiD's quality. Use --backbone/--variant (or --checkpoint) for a real release.")
    export_dir = _run_builtin(out_dir, log, size, seed, library)
    log(f"export ready: {out_dir}")
    latents = out_dir / DEMO_LATENTS_NAME
    log(f"next: pid-run {out_dir} {latents}   # the same decode again: writes {latents.with_suffix('.png')}, "
        f"equal to {DEMO_IMAGE_NAME}")
    return export_dir


def _hub_note() -> str:
    """What is true about the hub, checked once and quickly (the demo downloads nothing either way)."""
    from pid_runtime.caption import hub_offline
    from pid_runtime.hub import hub_unreachable

    if hub_offline():
        return "HF_HUB_OFFLINE is set"
    unreachable = hub_unreachable()
    if unreachable is not None:
        return unreachable
    return (f"the hub is reachable, but the demo downloads nothing: `pid-export --backbone {DEFAULT_BACKBONE} "
            f"--variant {DEFAULT_VARIANT}` fetches the 2.7 GB checkpoint")


def _run_builtin(out_dir: Path, log: Callable[[str], None], size: tuple[int, int], seed: int,
                 library: str | None = None) -> Path:
    from pid_runtime.backends import open_backend
    from pid_runtime.caption import write_embeddings
    from pid_runtime.decode import decode
    from pid_runtime.io import write_output
    from pid_runtime.metadata import EMPTY_CAPTION_NAME

    from .engine_plan import library_line, plan_engine
    from .engine_step import build_and_verify
    from .load_step import LoadedNetwork
    from .network import PidNet
    from .onnx_step import export_network
    from .request import EngineOptions, ExportRequest
    from .staging import ExportTransaction
    from .stages import Stages, one_line_write_errors
    from .synthetic import synthetic_state_dict

    cfg = DEMO_NETWORK
    with torch.device("meta"):
        net = PidNet(cfg)
    net.load_state_dict(synthetic_state_dict(cfg, dtype=torch.float32, seed=seed, with_aux_head=False, prefix=""),
                        strict=True, assign=True)
    count = sum(p.numel() for p in net.parameters())
    log(f"the built-in model: {count / 1e6:.1f} M parameters, exported with dynamic shapes")
    plan = plan_engine(ExportRequest(network=cfg, out_dir=out_dir, release=DEMO_RELEASE, precision="fp32",
                                     engine=EngineOptions(library=library)), log)
    if plan is not None and plan.target.why_it_cannot_run_here() is None:
        # It runs here, so it is checked: the network stays float32 (an fp32 export), the reference.
        plan = dataclasses.replace(plan, verify=True)
    stages = Stages(log)
    # One transaction like pid-export's: everything (ONNX, engine, latent, caption, demo.png) is written
    # into a staging directory that replaces out_dir in one rename at the end (staging.py).
    with one_line_write_errors(out_dir), ExportTransaction(out_dir, log) as transaction:
        stage = transaction.stage
        export_network(LoadedNetwork(net.eval(), None, None), stage, "fp32", DEMO_RELEASE, stages=stages,
                       in_place=True, shown_as=out_dir)
        if plan is not None:
            log(f"a TensorRT library is installed, {library_line(plan.library)}: building the built-in model's "
                "engine")
            build_and_verify(stage, plan, reference=LoadedNetwork(net, None, None) if plan.verify else None,
                             stages=stages)

        height, width = size
        scale = cfg.pixel_scale
        gen = torch.Generator().manual_seed(seed)
        latents = torch.randn(1, cfg.lq_latent_channels, height // scale, width // scale, generator=gen)
        caption = torch.randn(1, cfg.txt_max_length, cfg.txt_embed_dim, generator=gen)
        # Saved first, as pid-run reads them: the latent, and the caption as the export's unconditional one.
        save_latents(latents, stage / DEMO_LATENTS_NAME)
        write_embeddings(caption, stage / EMPTY_CAPTION_NAME)
        with stages(f"decoding a {list(latents.shape)} latent to {height}x{width} with a random caption "
                    f"(4 steps, seed {seed})"):
            stages.detail(f"saved both for pid-run: {DEMO_LATENTS_NAME}, and the caption as {EMPTY_CAPTION_NAME} "
                          "(the export's unconditional caption; the built-in model has no caption encoder)")
            backend = open_backend(stage, log=stages.detail)  # its engine where that can run, else the ONNX
            stages.detail(f"with {backend.name} on {backend.device}")
            try:
                decoded = decode(backend, latents, caption, sigma=0.0, seed=seed, steps=4)
            finally:
                backend.close()
            write_output(decoded.images, stage / DEMO_IMAGE_NAME)
            stages.detail(f"{out_dir / DEMO_IMAGE_NAME} (decode {decoded.timings.total:.1f} s)")
        transaction.commit()
    return out_dir


def save_latents(latents: torch.Tensor, path: Path) -> Path:
    """float32 [B,C,h,w] .npy, written aside and renamed (the file pid-run's LATENTS argument reads)."""
    import numpy as np

    from pid_runtime.io import atomic_write

    return atomic_write(path, lambda temp: np.save(temp, latents.numpy().astype(np.float32)))
