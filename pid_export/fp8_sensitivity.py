"""Which layers tolerate FP8: quantise one group of layers at a time and measure the images.

    python -m pid_export.fp8_sensitivity --golden tiny_v1pt5_16ch      # a golden network
    python -m pid_export.fp8_sensitivity --backbone sd3 --variant 2kto4k --checkpoint ck.pth --size 256x256

PyTorch fake quantisation (per-tensor E4M3 on a layer's input and weight, amax
calibrated as the export does) on the float32 network, one group at a time, 4-step
decodes of held-out synthetic inputs; prints PSNR and relative error vs float32.
This is the measurement behind `fp8.QUANTIZED_LAYERS` (numbers in the FP8 notes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from pid_runtime.sizes import parse_hw

from .calibration import AmaxRecorder, CalibrationItem, decode, synthetic_items, torch_velocity
from .fp8 import FP8_MAX, quantized_layer_names
from .accuracy_guard import psnr, rel_error
from .network import PidNet

GROUPS = {
    # quantised by the policy (fp8.QUANTIZED_LAYERS)
    "patch attention qkv": r"patch_blocks\.\d+\.attn\.qkv_[xy]",
    "patch attention proj": r"patch_blocks\.\d+\.attn\.proj_[xy]",
    "patch SwiGLU": r"patch_blocks\.\d+\.mlp_[xy]\.w[123]",
    # kept in the base precision
    "pixel compress/expand (kept)": r"pixel_blocks\.\d+\.(compress_to_attn|expand_from_attn)",
    "pixel attention qkv/proj (kept)": r"pixel_blocks\.\d+\.attn\.(qkv|proj)",
    "pixel MLP (kept)": r"pixel_blocks\.\d+\.mlp\.fc[12]",
    "adaLN modulation (kept)": r".*adaLN_modulation.*",
    "embedders + final layer (kept)": r"(s_embedder|pixel_embedder|y_embedder|t_embedder\.mlp)\.?.*|final_layer\.linear",
    "LQ branch + gates (kept)": r"lq_proj\..*|pit_lq_gate\..*",
}


def fake_fp8(tensor: Tensor, amax: float) -> Tensor:
    scale = max(amax, 1e-12) / FP8_MAX
    return (tensor / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(tensor.dtype) * scale


def layers_matching(net: nn.Module, pattern: str) -> list[str]:
    regex = re.compile(pattern)
    return [name for name, module in net.named_modules()
            if isinstance(module, (nn.Linear, nn.Conv2d)) and regex.fullmatch(name)]


@contextlib.contextmanager
def fake_quantized(net: nn.Module, layers: Sequence[str], amax: dict[str, float]) -> Iterator[None]:
    modules = dict(net.named_modules())
    saved = {name: modules[name].weight.data.clone() for name in layers}
    handles = []
    for name in layers:
        module = modules[name]
        module.weight.data = fake_fp8(module.weight.data, float(module.weight.data.abs().max()))
        handles.append(module.register_forward_pre_hook(
            lambda m, args, name=name: (fake_fp8(args[0], amax[name]), *args[1:])))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for name, weight in saved.items():
            modules[name].weight.data = weight


def sensitivity(net: PidNet, calibration: Sequence[CalibrationItem], held_out: Sequence[CalibrationItem],
                groups: dict[str, str] = GROUPS, seed: int = 1000) -> dict[str, dict[str, float]]:
    """{group: {"layers", "psnr", "rel_error"}} for each group quantised alone, and all policy groups together."""
    scale = net.cfg.pixel_scale
    device = torch.device("cpu")
    every = sorted({n for p in groups.values() for n in layers_matching(net, p)})
    recorder = AmaxRecorder(net, every)
    velocity = torch_velocity(net, device)
    with recorder.recording():
        for i, item in enumerate(calibration):
            decode(velocity, item, scale, seed + 100 + i, device)
    refs = [decode(velocity, item, scale, seed + i, device).numpy() for i, item in enumerate(held_out)]
    policy = quantized_layer_names(net)
    results = {}
    for group, layers in [*((g, layers_matching(net, p)) for g, p in groups.items()), ("policy (all quantised)", policy)]:
        layers = [n for n in layers if n in recorder.amax]
        if not layers:
            continue
        with fake_quantized(net, layers, recorder.amax):
            images = [decode(velocity, item, scale, seed + i, device).numpy()
                      for i, item in enumerate(held_out)]
        results[group] = {"layers": len(layers),
                          "psnr": min(psnr(a, b) for a, b in zip(images, refs)),
                          "rel_error": max(rel_error(a, b) for a, b in zip(images, refs))}
    return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--golden", help="golden case name (../shared/golden)")
    parser.add_argument("--backbone")
    parser.add_argument("--variant")
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--size", default="256x256", help="HxW of the decodes")
    parser.add_argument("--items", type=int, default=2)
    args = parser.parse_args(argv)
    try:
        height, width = parse_hw(args.size)
    except ValueError as exc:
        parser.error(f"--size: {exc}")
    if args.golden:
        from .checkpoints import load_checkpoint

        shared = Path(__file__).resolve().parents[1].parent / "shared" / "golden"
        case = json.loads((shared / f"{args.golden}.json").read_text())
        net = PidNet.from_config(case["network"])
        net.load_state_dict(load_checkpoint(shared / f"{args.golden}.pth"), strict=True)
    else:
        from .pipeline import load_network
        from .releases import get_release

        release = get_release(args.backbone, args.variant)
        net = load_network(release.network, release, args.checkpoint).net
    net.eval()
    torch.manual_seed(0)
    calibration = synthetic_items(net.cfg, [(height, width)], args.items, seed=0)
    held_out = synthetic_items(net.cfg, [(height, width)], args.items, seed=1, prefix="held-out")
    for group, result in sensitivity(net, calibration, held_out).items():
        print(f"{group:32s} {result['layers']:4d} layers  PSNR {result['psnr']:6.1f} dB  "
              f"rel. error {result['rel_error']:.2e}")


if __name__ == "__main__":
    main()
