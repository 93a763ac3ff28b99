"""Latents as diffusers pipelines return them -> the `[B,C,h,w]` float32 latent a PiD release takes.

`pipe(..., output_type="latent")` returns each LDM's latent in its own layout. The
facts below come from diffusers' pipelines (the packing static methods named) and the
reference inference code's pipeline registry; `from_pipeline` undoes them. H x W is
the pipeline's image size in pixels (diffusers rounds it down to whole tokens).

    backbone (aliases)        pipeline output                              network latent
    flux (zimage,             FluxPipeline: packed [B,(H/16)(W/16),64],    [B,16,H/8,W/8]
      zimage-turbo)             2x2 cells per token, channel c*4+2i+j
                              ZImagePipeline: [B,16,H/8,W/8] as is
    flux2 (flux2-klein-4b,    Flux2Pipeline: [B,(H/16)(W/16),128] tokens   [B,128,H/16,W/16],
      flux2-klein-9b)           in position-id (row-major) order             batch-norm-normalised
                              Flux2KleinPipeline: the raw VAE latent
                                [B,32,H/8,W/8] (it undoes the batch norm
                                and the 2x2 patchify before returning)
    qwenimage                 QwenImagePipeline: packed [B,(H/16)(W/16),64] [B,16,H/8,W/8]
                                of the video latent [B,16,1,H/8,W/8]
    sd3, sdxl                 [B,C,H/8,W/8] as is                          the same
    dinov2, siglip (RAE)      [B,C,h,w] normalised encoder features        the same

Klein's raw latent goes back to the normalised 128-channel one with the VAE's
batch-norm statistics (`BatchNormStats`): patchify 2x2 (channel c*4 + 2i + j), then
`(x - running_mean) / sqrt(running_var + eps)`, as diffusers' Flux2 pipelines normalise.

Sampling frames (`to_training_frame`): the flow-matching backbones keep intermediate
latents in the frame PiD was trained in (x_t = (1-s) x0 + s eps, s in [0, 1]). SDXL's
Euler scheduler keeps them in the variance-exploding frame x_t = x0 + s eps (s up to
~15) while the SDXL PiD was trained in the variance-preserving one:
x_vp = x_eu / sqrt(s^2 + 1), s_vp = s / sqrt(s^2 + 1).

The table here mirrors pid_export.releases, which the runtime must not import; a test
keeps the two in agreement. Nothing here needs diffusers.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from .errors import first_line
from .io import atomic_write
from .metadata import ModelMetadata
from .sizes import parse_hw


class LatentError(ValueError):
    """Latents (or their settings) that fit no layout of the named backbone; the message lists the accepted ones."""


TOKEN_PIXELS = 16  # image pixels per token side in every packed layout (8x VAE x 2x2 cells)
FLUX2_RAW_PATCH = 2  # Flux2's VAE latent is 2x2-patchified into channels before the batch norm
DEFAULT_BN_EPS = 1e-4  # AutoencoderKLFlux2's batch_norm_eps default (the released FLUX.2 VAE config)


@dataclass(frozen=True)
class LatentLayout:
    """How one backbone's pipelines hand out latents, and what its PiD network takes."""

    backbone: str
    channels: int  # C of the [B,C,h,w] latent the network takes
    down_factor: int  # image pixels per network latent cell
    token_cells: int = 0  # p > 0: pipelines pack p x p latent cells into one token [B, L, C*p*p]
    video: bool = False  # the pipeline's VAE latent is 5-D [B,C,1,h,w] (a one-frame video)
    raw_channels: int = 0  # > 0: also accepts the raw unpatchified VAE latent (needs BatchNormStats)
    euler_frame: bool = False  # intermediate latents come in the variance-exploding Euler frame
    pipelines: str = ""  # diffusers pipelines producing these latents (for messages)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Network latent (h, w) of an H x W pipeline image, rounded down as the pipelines round it."""
        cells = max(self.token_cells, 1)
        unit = self.down_factor * cells
        return (height // unit) * cells, (width // unit) * cells

    def accepted(self) -> list[str]:
        """The shapes `from_pipeline` takes for this backbone, as text."""
        c, d = self.channels, self.down_factor
        shapes = []
        if self.token_cells:
            p = self.token_cells
            shapes.append(f"packed tokens [B, (H/{TOKEN_PIXELS})*(W/{TOKEN_PIXELS}), {c * p * p}] "
                          "(needs the pipeline's image size H x W)")
        if self.raw_channels:
            shapes.append(f"the raw VAE latent [B, {self.raw_channels}, H/{d // FLUX2_RAW_PATCH}, "
                          f"W/{d // FLUX2_RAW_PATCH}] (needs the VAE's batch-norm statistics)")
        if self.video:
            shapes.append(f"[B, {c}, 1, H/{d}, W/{d}]")
        shapes.append(f"[B, {c}, H/{d}, W/{d}]")
        return shapes


LAYOUTS: dict[str, LatentLayout] = {
    layout.backbone: layout
    for layout in (
        LatentLayout("flux", 16, 8, token_cells=2, pipelines="FluxPipeline, ZImagePipeline"),
        LatentLayout("flux2", 128, 16, token_cells=1, raw_channels=32,
                     pipelines="Flux2Pipeline, Flux2KleinPipeline"),
        LatentLayout("sd3", 16, 8, pipelines="StableDiffusion3Pipeline"),
        LatentLayout("dinov2", 768, 16, pipelines="RAE (DINOv2-B)"),
        LatentLayout("siglip", 1152, 16, pipelines="Scale-RAE (SigLIP-2)"),
        LatentLayout("sdxl", 4, 8, euler_frame=True, pipelines="StableDiffusionXLPipeline"),
        LatentLayout("qwenimage", 16, 8, token_cells=2, video=True, pipelines="QwenImagePipeline"),
    )
}
# Models whose latents share a released backbone's latent space (as in pid_export.releases).
ALIASES = {
    "zimage": "flux",
    "zimage-turbo": "flux",
    "flux2-klein-4b": "flux2",
    "flux2-klein-9b": "flux2",
}
BACKBONE_NAMES = tuple(LAYOUTS) + tuple(ALIASES)


def layout_for(backbone: str) -> LatentLayout:
    """The layout of a backbone or alias (case-insensitive)."""
    key = str(backbone).strip().lower()
    layout = LAYOUTS.get(ALIASES.get(key, key))
    if layout is None:
        raise LatentError(f"unknown backbone {backbone!r}: use one of {', '.join(BACKBONE_NAMES)}")
    return layout


def check_backbone_fits(meta: ModelMetadata, backbone: str) -> LatentLayout:
    """The backbone's layout, if an export with `meta` decodes its latents; LatentError otherwise."""
    layout = layout_for(backbone)
    released_for = meta.backbone  # recorded at export time (None: a custom network, or an older export)
    if released_for is not None and released_for != layout.backbone:
        raise LatentError(f"this export ({meta.release}) decodes {released_for} latents, not "
                          f"{_named(backbone, layout)} latents: export the {layout.backbone} release for them")
    if (meta.latent_channels, meta.latent_down_factor) != (layout.channels, layout.down_factor):
        model = meta.release or "this export"
        raise LatentError(f"{_named(backbone, layout)} latents have {layout.channels} channels at "
                          f"1/{layout.down_factor} of the image size but {model} takes "
                          f"{meta.latent_channels} channels at 1/{meta.latent_down_factor}")
    return layout


# ---------------------------------------------------------------------------
# Flux2's batch-norm statistics


@dataclass(frozen=True)
class BatchNormStats:
    """The FLUX.2 VAE's latent batch norm: running mean / variance [128] of the patchified latent, and eps."""

    running_mean: Tensor
    running_var: Tensor
    eps: float = DEFAULT_BN_EPS

    @classmethod
    def from_vae(cls, vae: Any) -> "BatchNormStats":
        """From a diffusers AutoencoderKLFlux2 (`pipe.vae`): its `bn` buffers and `config.batch_norm_eps`."""
        bn = getattr(vae, "bn", None)
        if bn is None or getattr(bn, "running_mean", None) is None:
            raise LatentError(f"{type(vae).__name__} has no batch norm with running statistics "
                              "(expected a FLUX.2 VAE, diffusers' AutoencoderKLFlux2)")
        eps = getattr(getattr(vae, "config", None), "batch_norm_eps", None)
        return cls(bn.running_mean.detach().float().cpu(), bn.running_var.detach().float().cpu(),
                   float(eps if eps is not None else bn.eps))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "BatchNormStats":
        """From a .safetensors file: `running_mean` and `running_var` (or `bn.running_mean` / `bn.running_var`,
        as in the FLUX.2 VAE's own diffusion_pytorch_model.safetensors), eps from an `eps` entry, else from
        `batch_norm_eps` in a config.json beside the file, else the AutoencoderKLFlux2 default (1e-4)."""
        path = Path(path)
        if path.suffix.lower() != ".safetensors":
            raise LatentError(f"batch-norm statistics file {path} must be a .safetensors file")
        if not path.is_file():
            raise LatentError(f"batch-norm statistics file {path} does not exist")
        found: dict[str, Tensor] = {}
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:  # reads only these entries of a VAE file
                keys = set(handle.keys())
                for name in ("running_mean", "running_var", "eps"):
                    for key in (name, f"bn.{name}"):
                        if key in keys:
                            found[name] = handle.get_tensor(key)
                            break
        except Exception as exc:  # safetensors raises its own error types
            raise LatentError(f"cannot read batch-norm statistics file {path}: {first_line(exc)}") from None
        if "running_mean" not in found or "running_var" not in found:
            raise LatentError(f"{path} holds no batch-norm statistics: expected 'running_mean' and 'running_var' "
                              "(or 'bn.running_mean' / 'bn.running_var', as in the FLUX.2 VAE's weights file)")
        if "eps" in found:
            eps = float(found["eps"].reshape(-1)[0])
        else:
            eps = _eps_from_config(path.parent / "config.json")
        return cls(found["running_mean"].float(), found["running_var"].float(), eps)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write `running_mean`, `running_var` and `eps` (float32) for `pid-run --vae-bn-stats`."""
        from safetensors.torch import save_file

        tensors = {"running_mean": self.running_mean.detach().float().cpu().contiguous(),
                   "running_var": self.running_var.detach().float().cpu().contiguous(),
                   "eps": torch.tensor([self.eps], dtype=torch.float32)}
        return atomic_write(path, lambda temp: save_file(tensors, str(temp)))

    def check(self, channels: int) -> None:
        for name, values in (("running_mean", self.running_mean), ("running_var", self.running_var)):
            if tuple(values.shape) != (channels,):
                raise LatentError(f"batch-norm {name} has shape {list(values.shape)}, expected [{channels}] "
                                  "(the FLUX.2 VAE's 128-channel batch norm)")
            if not bool(torch.isfinite(values).all()):
                raise LatentError(f"batch-norm {name} contains NaN or Inf values")
        if bool((self.running_var < 0).any()) or not (math.isfinite(self.eps) and self.eps >= 0):
            raise LatentError("batch-norm running_var and eps must not be negative")

    def normalise(self, patched: Tensor) -> Tensor:
        """(x - running_mean) / sqrt(running_var + eps) per channel of a [B,128,h,w] float32 latent."""
        mean = self.running_mean.to(patched.device, torch.float32).view(1, -1, 1, 1)
        std = torch.sqrt(self.running_var.to(patched.device, torch.float32).view(1, -1, 1, 1) + self.eps)
        return (patched - mean) / std


def _eps_from_config(config: Path) -> float:
    if not config.is_file():
        return DEFAULT_BN_EPS
    try:
        eps = json.loads(config.read_text()).get("batch_norm_eps", DEFAULT_BN_EPS)
        return float(eps)
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise LatentError(f"cannot read batch_norm_eps from {config}: {first_line(exc)}") from None


def as_bn_stats(value: Any) -> BatchNormStats | None:
    """A BatchNormStats from itself, a FLUX.2 VAE (`pipe.vae`), a pipeline (`pipe`) or a file path."""
    if value is None or isinstance(value, BatchNormStats):
        return value
    if isinstance(value, (str, os.PathLike)):
        return BatchNormStats.load(value)
    if getattr(value, "bn", None) is None and getattr(value, "vae", None) is not None:
        value = value.vae
    return BatchNormStats.from_vae(value)


# ---------------------------------------------------------------------------
# Layout conversion


def _shape_text(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def _named(backbone: str, layout: LatentLayout) -> str:
    """`flux2-klein-4b (flux2)` for an alias, `flux2` for the backbone itself."""
    return backbone if layout.backbone == backbone.strip().lower() else f"{backbone} ({layout.backbone})"


def _no_fit(latents: Tensor, backbone: str, layout: LatentLayout) -> LatentError:
    return LatentError(f"latents of shape {_shape_text(latents.shape)} fit no {_named(backbone, layout)} layout; "
                       "accepted: " + "; ".join(layout.accepted()))


def _image_size(height: int | None, width: int | None) -> tuple[int, int] | None:
    if height is None and width is None:
        return None
    if height is None or width is None:
        raise LatentError("give both the pipeline image height and width, or neither")
    if int(height) != height or int(width) != width or height < 1 or width < 1:
        raise LatentError(f"the pipeline image size must be positive whole pixels, got {height}x{width}")
    return int(height), int(width)


def _check_grid(latents: Tensor, hw: Sequence[int], size: tuple[int, int] | None, layout: LatentLayout,
                what: str, scale: int = 1) -> None:
    """When the image size is known, the latent grid must be the one the pipeline makes for it."""
    if size is None:
        return
    want = tuple(n * scale for n in layout.grid(*size))
    if tuple(hw) != want:
        raise LatentError(f"{what} of shape {_shape_text(latents.shape)} are {hw[0]}x{hw[1]} cells but a "
                          f"{size[0]}x{size[1]} {layout.backbone} image gives {want[0]}x{want[1]}: "
                          "is the image size right?")


def _unpack_tokens(tokens: Tensor, layout: LatentLayout, size: tuple[int, int] | None, backbone: str) -> Tensor:
    """[B, L, C*p*p] -> [B, C, h, w]: token (row, col) holds the p x p cells below it, channel c*p*p + i*p + j."""
    batch, length, _ = tokens.shape
    p = layout.token_cells
    if size is None:
        raise LatentError(f"packed {backbone} latents of shape {_shape_text(tokens.shape)} do not say the image "
                          "size: give the pipeline's height and width (pid-run: --ldm-size HxW)")
    height, width = layout.grid(*size)
    rows, cols = height // p, width // p
    if rows * cols != length:
        raise LatentError(f"packed latents of shape {_shape_text(tokens.shape)} hold {length} tokens but a "
                          f"{size[0]}x{size[1]} {layout.backbone} image packs into {rows}x{cols} = {rows * cols}: "
                          "is the image size right?")
    grid = tokens.reshape(batch, rows, cols, layout.channels, p, p)
    return grid.permute(0, 3, 1, 4, 2, 5).reshape(batch, layout.channels, height, width)


def _patchify_raw(raw: Tensor, layout: LatentLayout, size: tuple[int, int] | None,
                  bn_stats: BatchNormStats | None, backbone: str) -> Tensor:
    """Flux2's raw VAE latent [B,32,2h,2w] -> the normalised [B,128,h,w] (channel c*4 + 2i + j)."""
    batch, channels, raw_h, raw_w = raw.shape
    f = FLUX2_RAW_PATCH
    if raw_h % f or raw_w % f:
        raise LatentError(f"raw {backbone} VAE latents of shape {_shape_text(raw.shape)} must have an even height "
                          f"and width (they are {f}x{f}-patchified)")
    _check_grid(raw, (raw_h, raw_w), size, layout, f"raw {backbone} VAE latents", scale=f)
    if bn_stats is None:
        raise LatentError(f"raw {raw.shape[1]}-channel {backbone} VAE latents {_shape_text(raw.shape)} (what "
                          "Flux2KleinPipeline returns) need the VAE's batch-norm statistics to become the normalised "
                          f"{layout.channels}-channel latent PiD takes: pass bn_stats=pipe.vae "
                          "(pid-run: --vae-bn-stats FILE)")
    bn_stats.check(layout.channels)
    cells = raw.reshape(batch, channels, raw_h // f, f, raw_w // f, f).permute(0, 1, 3, 5, 2, 4)
    return bn_stats.normalise(cells.reshape(batch, channels * f * f, raw_h // f, raw_w // f).float())


def from_pipeline(latents: Tensor | np.ndarray, backbone: str, height: int | None = None, width: int | None = None,
                  bn_stats: Any = None) -> Tensor:
    """A diffusers pipeline's `output_type="latent"` output -> float32 [B,C,h,w] for the backbone's PiD.

    `height`, `width`: the pipeline's image size in pixels; needed to unpack packed
    tokens, and checked against the latent grid when given. `bn_stats`: the FLUX.2
    VAE's batch-norm statistics (BatchNormStats, `pipe.vae`, `pipe` or a .safetensors
    path), needed for Flux2-Klein's raw 32-channel latent. Stays on the input's device.
    """
    layout = layout_for(backbone)
    x = torch.as_tensor(latents)
    if not x.is_floating_point():
        raise LatentError(f"latents are {str(x.dtype).removeprefix('torch.')}, expected a floating-point type")
    size = _image_size(height, width)
    channels = x.shape[1] if x.ndim >= 2 else None
    if x.ndim == 3 and layout.token_cells and x.shape[2] == layout.channels * layout.token_cells ** 2:
        out = _unpack_tokens(x, layout, size, backbone)
    elif x.ndim == 5 and layout.video and channels == layout.channels and x.shape[2] == 1:
        out = x[:, :, 0]
        _check_grid(x, tuple(out.shape[-2:]), size, layout, f"{backbone} latents")
    elif x.ndim == 4 and channels == layout.channels:
        out = x
        _check_grid(x, tuple(out.shape[-2:]), size, layout, f"{backbone} latents")
    elif x.ndim == 4 and layout.raw_channels and channels == layout.raw_channels:
        out = _patchify_raw(x, layout, size, as_bn_stats(bn_stats), backbone)
    else:
        raise _no_fit(x, backbone, layout)
    return out.to(torch.float32).contiguous()


SigmaLike = float | Sequence[float] | Tensor | np.ndarray


def to_training_frame(latents: Tensor, sigma: SigmaLike, backbone: str) -> tuple[Tensor, Any]:
    """(latents, sigma) of a scheduler's intermediate latent -> the frame the backbone's PiD was trained in.

    Identity for the flow-matching backbones. SDXL (Euler, variance-exploding):
    x / sqrt(s^2 + 1) and s / sqrt(s^2 + 1), per item. A float sigma comes back a
    float, anything else a float32 tensor [1 or B].
    """
    layout = layout_for(backbone)
    if not layout.euler_frame:
        return latents, sigma
    s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
    if s.numel() == 0 or not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
        raise LatentError(f"{backbone} scheduler sigma must be finite and >= 0 (0 for a final clean latent), "
                          f"got {', '.join(f'{v:g}' for v in s.tolist()) or 'none'}")
    batch = latents.shape[0]
    if s.numel() not in (1, batch):
        raise LatentError(f"{s.numel()} sigma values for {batch} latents: give 1 or {batch}")
    denom = torch.sqrt(s * s + 1)
    scaled = latents / denom.to(latents.device, latents.dtype).view(-1, *([1] * (latents.ndim - 1)))
    new_sigma = s / denom
    if isinstance(sigma, (int, float)):
        return scaled, float(new_sigma[0])
    return scaled, new_sigma.to(torch.float32)


# ---------------------------------------------------------------------------
# Files (pid-run --pipeline)


def parse_image_size(text: str) -> tuple[int, int]:
    """`1024x768` (height x width) -> (1024, 768)."""
    try:
        return parse_hw(text)
    except ValueError as exc:
        raise LatentError(f"image size {exc}") from None


def from_pipeline_array(array: Tensor, backbone: str, size: tuple[int, int] | None = None,
                        bn_stats: Any = None) -> Tensor:
    """`from_pipeline` for an array read from a file, which may have lost its batch axis (one item saved)."""
    height, width = size or (None, None)
    try:
        return from_pipeline(array, backbone, height, width, bn_stats)
    except LatentError as first:
        if array.ndim in (2, 3, 4):
            try:
                return from_pipeline(array[None], backbone, height, width, bn_stats)
            except LatentError:
                pass
        raise first from None


def pipeline_latents_for_cli(path: str | os.PathLike[str], backbone: str, model_file: str | os.PathLike[str],
                             ldm_size: str | None, bn_stats_file: str | None,
                             sigma: Sequence[float]) -> tuple[Tensor, Any]:
    """`pid-run --pipeline`: the latents file (as the pipeline returned them) and --sigma in the network's terms."""
    from .backends import load_model_metadata
    from .io import LATENT_KEYS, as_float32, pick_array, read_arrays

    layout = check_backbone_fits(load_model_metadata(model_file), backbone)
    if bn_stats_file and not layout.raw_channels:
        raise LatentError(f"--vae-bn-stats is for FLUX.2's raw VAE latents; {backbone} latents need none")
    size = parse_image_size(ldm_size) if ldm_size else None
    bn_stats = BatchNormStats.load(bn_stats_file) if bn_stats_file else None
    array = as_float32(pick_array(read_arrays(path, "latents"), LATENT_KEYS, path, "latents"), path, "latents")
    return to_training_frame(from_pipeline_array(array, backbone, size, bn_stats), list(sigma), backbone)


__all__ = ["ALIASES", "BACKBONE_NAMES", "LAYOUTS", "BatchNormStats", "LatentError", "LatentLayout",
           "as_bn_stats", "check_backbone_fits", "from_pipeline", "from_pipeline_array",
           "layout_for", "parse_image_size", "pipeline_latents_for_cli", "to_training_frame"]
