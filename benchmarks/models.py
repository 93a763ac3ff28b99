"""The networks the benchmarks run: a released configuration or the quick one, with weights.

Weights come from a checkpoint file or are synthetic: drawn directly on the run
device (no download, no file) with the conventions of `pid_export.synthetic`
(normal * 0.02, norm weights near 1, gate log_alpha 0), rounded to bf16 like
the released files, then held in float32 as the reference does (it runs under
autocast with float32 weights). Timings do not depend on the weight values.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pid_export.config import PidConfig
from pid_export.network import PidNet

DEFAULT_RELEASE = "flux/2k"

# The quick mode's network: the real block structure (joint-attention patch blocks with
# an LQ injection, the last-block text skip, two pixel blocks, real head dims 64 and 72,
# real patch size and pixel width) at a size a 2-core CPU exports and runs in seconds.
QUICK_NETWORK = dict(
    hidden_size=128, num_groups=2, patch_depth=2, pixel_depth=2, pixel_hidden_size=8,
    pixel_attn_hidden_size=144, pixel_num_groups=2, txt_embed_dim=128, txt_max_length=8,
    lq_latent_channels=16, lq_hidden_dim=32, lq_num_res_blocks=1,
)
QUICK_SIZE = (128, 192)  # non-square, so a height/width mix-up shows


def quick_config() -> PidConfig:
    return PidConfig.from_dict(QUICK_NETWORK)


def release_config(name: str) -> tuple[str, PidConfig]:
    """(label, network) of a release given as `backbone/variant` or its hub directory name."""
    from pid_export.releases import get_release, release_by_name

    if "/" in name:
        backbone, variant = name.split("/", 1)
        release = get_release(backbone, variant)
    else:
        release = release_by_name(name)
    return release.label, release.network


def build_network(cfg: PidConfig, device: torch.device, checkpoint: str | Path | None = None,
                  seed: int = 0) -> tuple[PidNet, str]:
    """(float32 PidNet on `device` in eval mode, description of its weights)."""
    if checkpoint is not None:
        from pid_export.pipeline import load_network

        net = load_network(cfg, checkpoint=checkpoint).net.to(device=device, dtype=torch.float32)
        weights = f"checkpoint {Path(checkpoint).name}"
    else:
        with torch.device("meta"):
            net = PidNet(cfg)
        net = net.to_empty(device=device)
        _fill_synthetic(net, device, seed)
        weights = f"synthetic (seed {seed}, bf16-rounded, generated on {device.type})"
    return net.eval().requires_grad_(False), weights


@torch.no_grad()
def _fill_synthetic(net: PidNet, device: torch.device, seed: int) -> None:
    from pid_export.synthetic import WEIGHT_STD, released_layout

    is_norm = {name: norm for name, _, norm in released_layout(net.cfg, with_aux_head=False)}
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, tensor in net.state_dict(keep_vars=True).items():
        if name.endswith("log_alpha"):
            tensor.zero_()
            continue
        values = torch.empty(tensor.shape, dtype=torch.bfloat16, device=device)
        values.normal_(0.0, WEIGHT_STD, generator=generator)
        if is_norm.get(name, False) and name.endswith("weight"):
            values += 1.0
        tensor.copy_(values)
