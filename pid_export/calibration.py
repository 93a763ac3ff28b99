"""FP8 calibration data and max (amax) calibration of the float32 PidNet.

Calibration runs the real 4-step sampler (SPEC sec. 4) on each calibration item
with the float32 network and records, per quantised layer, the largest |input|
seen over all steps: the activations of every timestep the engine will meet
(noise at t=0.999 to nearly clean at t=0.342) are covered, not one.

Data:
- `--calibration DIR`: the user's own inputs, the files pid-run reads. Each
  latents file `NAME.npy|.npz|.safetensors` is one item; its caption embedding is
  `NAME.caption.npy|.npz|.safetensors`, or an array named `y` / `caption_embeds` in
  the latents file itself (so golden-vector files work as they are). With two or
  more items the last quarter (by name, at least one) is held out for the
  accuracy guard and not calibrated on.
- Otherwise a built-in synthetic set: unit-normal latents at the release's
  trained aspect ratios and captions shaped like Gemma-2 hidden states (unit-scale
  values, a few channels with ~1e3 outliers on every token and a larger BOS token).
  Random inputs calibrate worse than real ones; the export says so.

Size: on a GPU the items run at the release's trained sizes. On a CPU that
costs ~45 TFLOP per network call at 2048x2048 (SPEC sec. 8; tens of minutes
each here), so items are scaled down to at most `CPU_MAX_SIDE` px per side,
same aspect ratio: amax is a max over tokens, whose distribution does not
depend on the image size, and a 512x512 step still has 1024 patch tokens and
262,144 pixel tokens per item.
"""

from __future__ import annotations

import contextlib
import math
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from pid_runtime.io import CAPTION_KEYS, INPUT_SUFFIXES, InputError, as_float32, load_caption, load_latents, read_arrays
from pid_runtime.sampler import MAX_STEPS, NonFiniteError, draw_noise, sample

from .config import PidConfig
from .releases import Release

CPU_MAX_SIDE = 512
SYNTHETIC_ITEMS = 4
GUARD_ITEMS = 2
CAPTION_SUFFIX = ".caption"
# Gemma-2 hidden-state shape of the synthetic captions: a few fixed channels carry
# values of ~1e3 on every token (the outliers that overflow fp16), BOS is ~10x larger.
OUTLIER_CHANNELS = 3
OUTLIER_SCALE = 1000.0
BOS_SCALE = 10.0

Log = Callable[[str], None]


class CalibrationError(ValueError):
    """Calibration inputs the user has to fix (one line)."""


@dataclass
class CalibrationItem:
    name: str
    latents: Tensor  # [1, C, h, w] float32
    caption: Tensor  # [1, Lt, D] float32
    sigma: float = 0.0

    def describe(self, pixel_scale: int) -> str:
        h, w = self.latents.shape[-2:]
        return f"{self.name} ({h * pixel_scale}x{w * pixel_scale})"


# ---------------------------------------------------------------------------
# Data


def synthetic_caption(cfg: PidConfig, length: int, gen: torch.Generator) -> Tensor:
    y = torch.randn(1, length, cfg.txt_embed_dim, generator=gen)
    channels = torch.randperm(cfg.txt_embed_dim, generator=gen)[:OUTLIER_CHANNELS]
    signs = torch.where(torch.rand(OUTLIER_CHANNELS, generator=gen) < 0.5, -1.0, 1.0)
    y[..., channels] = signs * OUTLIER_SCALE * (0.5 + torch.rand(1, length, OUTLIER_CHANNELS, generator=gen))
    y[:, 0] *= BOS_SCALE
    return y


def scaled_sizes(sizes: Sequence[Sequence[int]], pixel_scale: int, max_side: int | None) -> list[tuple[int, int]]:
    """Sizes (H, W) shrunk to at most `max_side` px per side (same aspect), multiples of the
    network's granularity (lcm of the pixel scale and the patch size 16)."""
    step = pixel_scale * 16 // math.gcd(pixel_scale, 16)
    out = []
    for height, width in sizes:
        factor = 1.0 if max_side is None else min(1.0, max_side / max(height, width))
        size = (max(step, round(height * factor / step) * step), max(step, round(width * factor / step) * step))
        if size not in out:
            out.append(size)
    return out


def synthetic_items(cfg: PidConfig, sizes: Sequence[tuple[int, int]], count: int, seed: int,
                    prefix: str = "synthetic") -> list[CalibrationItem]:
    """`count` items cycling over `sizes` (output px); sigma 0 (clean latent) except every third."""
    gen = torch.Generator().manual_seed(seed)
    scale = cfg.pixel_scale
    items = []
    for i in range(count):
        height, width = sizes[i % len(sizes)]
        latents = torch.randn(1, cfg.lq_latent_channels, height // scale, width // scale, generator=gen)
        caption = synthetic_caption(cfg, cfg.txt_max_length, gen)
        items.append(CalibrationItem(f"{prefix}-{i}", latents, caption, sigma=0.3 if i % 3 == 2 else 0.0))
    return items


def load_calibration_dir(directory: Path, cfg: PidConfig) -> list[CalibrationItem]:
    """The user's calibration items (see the module doc for the layout)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CalibrationError(f"calibration directory {directory} does not exist")
    files = sorted(p for p in directory.iterdir()
                   if p.suffix.lower() in INPUT_SUFFIXES and not p.stem.endswith(CAPTION_SUFFIX))
    if not files:
        raise CalibrationError(f"calibration directory {directory} has no latents files "
                               f"({', '.join(INPUT_SUFFIXES)})")
    items = []
    try:
        for path in files:
            latents = load_latents(path)
            caption = _caption_for(path)
            if latents.shape[1] != cfg.lq_latent_channels:
                raise CalibrationError(f"{path}: latents have {latents.shape[1]} channels, this network takes "
                                       f"{cfg.lq_latent_channels}")
            if caption.shape[-1] != cfg.txt_embed_dim:
                raise CalibrationError(f"{path}: caption embeddings have dim {caption.shape[-1]}, this network "
                                       f"takes {cfg.txt_embed_dim}")
            if caption.shape[0] not in (1, latents.shape[0]):
                raise CalibrationError(f"{path}: {latents.shape[0]} latents but {caption.shape[0]} captions")
            for b in range(latents.shape[0]):
                cap = caption[b if caption.shape[0] > 1 else 0][None, : cfg.txt_max_length]
                if not (torch.isfinite(latents[b]).all() and torch.isfinite(cap).all()):
                    raise CalibrationError(f"{path}: item {b} has NaN or Inf values")
                name = path.stem if latents.shape[0] == 1 else f"{path.stem}[{b}]"
                items.append(CalibrationItem(name, latents[b: b + 1].contiguous(), cap.contiguous()))
    except InputError as exc:
        raise CalibrationError(str(exc)) from None
    return items


def _caption_for(latents_path: Path) -> Tensor:
    for suffix in INPUT_SUFFIXES:
        candidate = latents_path.with_name(latents_path.stem + CAPTION_SUFFIX + suffix)
        if candidate.is_file():
            return load_caption(candidate)
    arrays = read_arrays(latents_path, "latents")
    for key in CAPTION_KEYS:
        if key in arrays:
            caption = as_float32(arrays[key], latents_path, "caption embeddings")
            return caption[None] if caption.ndim == 2 else caption
    raise CalibrationError(f"no caption embedding for {latents_path.name}: add "
                           f"{latents_path.stem}{CAPTION_SUFFIX}.npy (pid-run embed writes one) or a 'y' array")


def split_held_out(items: list[CalibrationItem]) -> tuple[list[CalibrationItem], list[CalibrationItem]]:
    """(calibrate on, hold out for the guard): the last quarter is held out when there are >= 2 items."""
    if len(items) < 2:
        return items, []
    held = max(1, len(items) // 4)
    return items[:-held], items[-held:]


def crop_for(item: CalibrationItem, pixel_scale: int, max_side: int | None) -> CalibrationItem:
    """The item's latents centre-cropped so the output is at most `max_side` px per side."""
    if max_side is None:
        return item
    limit = max(1, max_side // pixel_scale)
    h, w = item.latents.shape[-2:]
    if h <= limit and w <= limit:
        return item
    top, left = (h - min(h, limit)) // 2, (w - min(w, limit)) // 2
    latents = item.latents[..., top: top + min(h, limit), left: left + min(w, limit)].contiguous()
    return CalibrationItem(item.name + " (cropped)", latents, item.caption, item.sigma)


# ---------------------------------------------------------------------------
# Decoding and amax


def decode(velocity: Callable[[Tensor, Tensor, CalibrationItem], Tensor], item: CalibrationItem,
           pixel_scale: int, seed: int, device: torch.device, steps: int = MAX_STEPS) -> Tensor:
    """The 4-step sample of `item` with seeded noise; float32 [1,3,H,W] in [-1, 1] on the CPU."""
    h, w = item.latents.shape[-2:]
    noise, eps = draw_noise((1, 3, h * pixel_scale, w * pixel_scale), steps, seed, device)
    return sample(lambda x, t: velocity(x, t, item), noise, eps, steps).cpu()


def torch_velocity(net: nn.Module, device: torch.device):
    """velocity(x, t, item) of a PyTorch PidNet (float32 at the boundary, like the export)."""
    def velocity(x: Tensor, t: Tensor, item: CalibrationItem) -> Tensor:
        with torch.no_grad():
            return net(x, t, item.caption.to(device), item.latents.to(device),
                       torch.full((1,), item.sigma, device=device)).float()
    return velocity


class AmaxRecorder:
    """Forward hooks that record max |input| per layer (and max |q|, |k|, |v| per attention)."""

    def __init__(self, net: nn.Module, layers: Sequence[str], attention: Sequence[str] = ()):
        self.net = net
        self.layers = list(layers)
        self.attention_modules = list(attention)
        self.amax: dict[str, float] = {}
        self.attention: dict[str, dict[str, float]] = {}
        self._current_attention: str | None = None

    def _record(self, table: dict, key: str, tensor: Tensor) -> None:
        value = float(tensor.detach().abs().max())
        table[key] = max(table.get(key, 0.0), value) if value == value else float("nan")

    @contextlib.contextmanager
    def recording(self) -> Iterator["AmaxRecorder"]:
        from . import network

        modules = dict(self.net.named_modules())
        handles = [modules[name].register_forward_pre_hook(
            lambda module, args, name=name: self._record(self.amax, name, args[0])) for name in self.layers]
        original = network.attention
        if self.attention_modules:
            for name in self.attention_modules:
                handles.append(modules[name].register_forward_pre_hook(
                    lambda module, args, name=name: setattr(self, "_current_attention", name)))

            def recording_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
                table = self.attention.setdefault(self._current_attention or "?", {})
                for key, tensor in zip("qkv", (q, k, v)):
                    self._record(table, key, tensor)
                return original(q, k, v)

            # The attention modules call network.attention by name; swapped only while recording.
            network.attention = recording_attention
        try:
            yield self
        finally:
            network.attention = original
            for handle in handles:
                handle.remove()


def calibrate(net: nn.Module, cfg: PidConfig, items: Sequence[CalibrationItem], layers: Sequence[str],
              attention_modules: Sequence[str] = (), *, seed: int = 0, device: torch.device | None = None,
              log: Log = lambda message: None) -> AmaxRecorder:
    """Run the 4-step sampler over `items` with the float32 `net`; returns the amax recorded at the
    inputs of `layers` (and the q/k/v of `attention_modules`): the ones the quantiser will quantise
    (fp8.quantized_layer_names / attention_module_names), which the caller names."""
    device = device or torch.device("cpu")
    recorder = AmaxRecorder(net, layers, attention_modules)
    velocity = torch_velocity(net, device)
    with recorder.recording():
        for index, item in enumerate(items):
            log(f"calibrating on {item.describe(cfg.pixel_scale)} ({index + 1}/{len(items)}, {MAX_STEPS} steps)")
            try:
                decode(velocity, item, cfg.pixel_scale, seed + index, device)
            except NonFiniteError as exc:
                raise CalibrationError(f"the float32 network produced NaN/Inf on calibration item {item.name}: "
                                       f"{exc}") from None
    bad = [name for name, value in recorder.amax.items() if not math.isfinite(value)]
    if bad:
        raise CalibrationError(f"calibration produced NaN/Inf activations in {bad[0]} "
                               f"({len(bad)} layer(s)); check the calibration inputs")
    # The last patch block's text branch feeds nothing: it was never run and is not in the graph.
    return recorder


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def item_sizes(release: Release | None, cfg: PidConfig) -> list[tuple[int, int]]:
    """The release's trained sizes, or (custom network) its RoPE reference size."""
    sizes = [(int(h), int(w)) for h, w in release.trained_sizes] if release else []
    return sizes or [(cfg.rope_ref_h, cfg.rope_ref_w)]


def max_side_for(device: torch.device) -> int | None:
    return None if device.type == "cuda" else CPU_MAX_SIDE


@dataclass(frozen=True)
class ItemSettings:
    """Which items calibrate and guard an FP8 export (pid-export's --calibration and FP8 options)."""

    calibration_dir: Path | None = None
    calibration_items: int = SYNTHETIC_ITEMS
    guard_items: int = GUARD_ITEMS
    max_side: int | None | str = "auto"  # decode size cap in px; "auto": trained sizes on a GPU, 512 on a CPU
    guard_max_side: int | None | str = "auto"  # "auto": trained sizes on a GPU, 256 on a CPU
    seed: int = 0


GUARD_CPU_MAX_SIDE = 256


def _cap(value: int | None | str, device: torch.device, cpu_default: int) -> int | None:
    if value == "auto":
        return None if device.type == "cuda" else cpu_default
    return value  # type: ignore[return-value]


def prepare_items(net_cfg: PidConfig, release: Release | None, options: ItemSettings, device: torch.device,
                  say: Log, static_shape: tuple[int, int, int] | None = None
                  ) -> tuple[list[CalibrationItem], list[CalibrationItem], str]:
    """(calibration items, held-out items, where the held-out ones came from).

    A static export's items are made at the trained sizes, then reshaped to its inputs."""
    if static_shape is not None:
        options = dataclasses.replace(options, max_side=None, guard_max_side=None)
    calib_side = _cap(options.max_side, device, CPU_MAX_SIDE)
    guard_side = _cap(options.guard_max_side, device, GUARD_CPU_MAX_SIDE)
    sizes = item_sizes(release, net_cfg)
    scale = net_cfg.pixel_scale
    if options.calibration_dir is not None:
        items = load_calibration_dir(options.calibration_dir, net_cfg)
        calibration, held_out = split_held_out(items)
        calibration = [crop_for(item, scale, calib_side) for item in calibration]
        held_out = [crop_for(item, scale, guard_side) for item in held_out]
        source = f"{len(held_out)} of the {len(items)} items in {options.calibration_dir}"
        say(f"calibration: {len(calibration)} item(s) from {options.calibration_dir}")
    else:
        calibration = synthetic_items(net_cfg, scaled_sizes(sizes, scale, calib_side),
                                      options.calibration_items, seed=options.seed)
        held_out = []
        say(f"calibration: built-in synthetic set ({len(calibration)} items with Gemma-like caption outliers); "
            "your own latents and captions calibrate better: --calibration DIR")
    if not held_out:
        held_out = synthetic_items(net_cfg, scaled_sizes(sizes, scale, guard_side), options.guard_items,
                                   seed=options.seed + 7919, prefix="held-out")
        source = f"{len(held_out)} synthetic item(s), seeds unlike the calibration set's"
    if device.type == "cpu" and (calib_side or guard_side):
        say(f"no GPU: calibrating at <= {calib_side} px and guarding at <= {guard_side} px per side "
            "(trained sizes cost ~45 TFLOP per network call)")
    if static_shape is not None:
        # The static export's size (latents resized by nearest) and caption length (onnx_export's: the maximum).
        _, height, width = static_shape
        latent_size, text_len = (height // scale, width // scale), net_cfg.txt_max_length
        calibration, held_out = ([CalibrationItem(item.name, torch.nn.functional.interpolate(
            item.latents, size=latent_size, mode="nearest"), item.caption[:, :text_len], item.sigma)
            for item in items] for items in (calibration, held_out))
    return calibration, held_out, source


def reference_images(net: torch.nn.Module, pixel_scale: int, items: Sequence[CalibrationItem], seed: int,
                     device: torch.device, log: Log = lambda message: None) -> list[Tensor]:
    """The float32 network's decodes of `items` (computed before the network is cast for export)."""
    velocity = torch_velocity(net, device)
    images = []
    for index, item in enumerate(items):
        log(f"float32 reference decode of {item.describe(pixel_scale)}")
        try:
            images.append(decode(velocity, item, pixel_scale, seed + index, device))
        except NonFiniteError as exc:
            raise CalibrationError(f"the float32 network produced NaN/Inf on held-out item {item.name}: "
                                   f"{exc}") from None
    return images
