"""Output sizes: `HxW` text, and a size checked against the patch size, the latent's
shape, the range the export (or an engine's profile) supports and the graph's own limits.

Every check raises `DecodeError` with the one line that says what to change.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Sequence

from torch import Tensor

from .errors import DecodeError
from .metadata import ModelMetadata

if TYPE_CHECKING:  # types only: the HxW parser is imported by modules that load no backend
    from .backends.base import Backend

SizeRange = tuple[tuple[int, int], tuple[int, int]]  # ((min H, min W), (max H, max W))

_HW = re.compile(r"\s*(\d+)\s*[xX]\s*(\d+)\s*")


def parse_hw(text: str) -> tuple[int, int]:
    """`2160x3840` (height x width, pixels) -> (2160, 3840); ValueError with a one-line message
    otherwise (zero sides included). Callers turn it into their own kind of error."""
    match = _HW.fullmatch(text)
    if match is None or int(match.group(1)) == 0 or int(match.group(2)) == 0:
        raise ValueError(f"{text!r} is not HEIGHTxWIDTH in pixels, e.g. 2160x3840")
    return int(match.group(1)), int(match.group(2))


def native_size(meta: ModelMetadata, latents: Tensor) -> tuple[int, int]:
    """The latent's own output size: h * pixel_scale x w * pixel_scale."""
    return latents.shape[-2] * meta.pixel_scale, latents.shape[-1] * meta.pixel_scale


def output_size(meta: ModelMetadata, latents: Tensor, size: tuple[int, int] | None = None) -> tuple[int, int]:
    """The requested (height, width), else the latent's native size."""
    return native_size(meta, latents) if size is None else (int(size[0]), int(size[1]))


# How far the output's aspect ratio may be from the latent's, in latent cells per side.
# Diffusers' SD3/Flux pipelines round each image side down to a multiple of 16 px, i.e.
# 2 cells of an /8 latent (Flux2 and the RAEs: 1 cell of /16), so a latent is up to 2
# cells short of the picture it stands for: 3840x2160 (16:9) is 960x540 px at the LDM
# scale, which becomes a 120x68 latent (native 3840x2176). Within 2 cells the output is
# that picture at its true shape; beyond, the decode stretches the image.
ASPECT_SLACK_CELLS = 2


def aspect_ratio_range(lat_h: int, lat_w: int, slack: int = ASPECT_SLACK_CELLS) -> tuple[float, float]:
    """(lowest, highest) output height / width for an lat_h x lat_w latent."""
    low = max(lat_h - slack, 0) / (lat_w + slack)
    high = (lat_h + slack) / (lat_w - slack) if lat_w > slack else float("inf")
    return low, high


def _multiples_near(value: int, step: int) -> str:
    below = value // step * step
    return " or ".join(str(v) for v in (below, below + step) if v > 0)


def supported_size_range(backend: "Backend") -> tuple[SizeRange | None, str]:
    """Output sizes `backend` can decode, and what sets them ("engine" profile or "export" metadata).

    A backend with an optimization profile (`profile_ranges`: TensorRT) is held to it, which
    pid-export may have built wider or narrower than the release's trained range.
    """
    ranges = backend.profile_ranges
    if ranges is not None:
        low, high = ranges["x"]
        return ((int(low[2]), int(low[3])), (int(high[2]), int(high[3]))), "engine"
    meta = backend.meta
    if meta.min_size is None or meta.max_size is None:
        return None, "export"
    return ((int(meta.min_size[0]), int(meta.min_size[1])), (int(meta.max_size[0]), int(meta.max_size[1]))), "export"


def _check_requested_size(meta: ModelMetadata, height: int, width: int, latent_hw: tuple[int, int],
                          patch: int) -> None:
    lat_h, lat_w = latent_hw
    if height <= 0 or width <= 0:
        raise DecodeError(f"output size {height}x{width} must be positive")
    for side, value in (("height", height), ("width", width)):
        if value % patch:
            raise DecodeError(f"output {side} {value} is not a multiple of {patch} (the patch size); "
                              f"use {_multiples_near(value, patch)}")
    native = (lat_h * meta.pixel_scale, lat_w * meta.pixel_scale)
    if (height, width) != native and not meta.any_output_size:
        raise DecodeError(f"this export decodes only at the latent's native size {native[0]}x{native[1]} "
                          f"(it predates free output sizes); re-export it with pid-export to decode {height}x{width}")
    low, high = aspect_ratio_range(lat_h, lat_w)
    if not low <= height / width <= high:
        high_text = f"{high:.3f}" if high != float("inf") else "any"
        raise DecodeError(f"output size {height}x{width} (height/width {height / width:.3f}) is too far from "
                          f"the shape of the {lat_h}x{lat_w} latent (height/width {lat_h / lat_w:.3f}; "
                          f"allowed {low:.3f} to {high_text}, i.e. within {ASPECT_SLACK_CELLS} latent cells "
                          f"per side): the image would be stretched; decode the native size and crop instead")


def _way_to_size(meta: ModelMetadata, height: int, width: int) -> str:
    """What to do about a size outside the range: another release of the backbone (from the
    export's recorded `variant_sides`), or a wider export / engine."""
    short, long = min(height, width), max(height, width)
    fitting = [v for v, (lo, hi) in meta.variant_sides.items() if lo <= short and long <= hi]
    others = [v for v in fitting if v != meta.variant]
    if others:
        return f"the {' or '.join(others)} release of this backbone covers it"
    if meta.variant_sides and not fitting:
        return "no PiD release of this backbone was trained for it (" + ", ".join(
            f"{v}: {lo}..{hi} px" for v, (lo, hi) in meta.variant_sides.items()) + ")"
    return "re-export (or rebuild the engine) with a range that includes it"


def check_output_size(meta: ModelMetadata, height: int, width: int, latent_hw: tuple[int, int],
                      size_range: SizeRange | None = None, source: str = "export", requested: bool = False) -> None:
    """The output size against the patch size, the latent's shape, the export and its range.

    `requested`: the size was asked for (pid-run --size) rather than the latent's native size.
    """
    patch = meta.patch_size
    lat_h, lat_w = latent_hw
    if requested:
        _check_requested_size(meta, height, width, latent_hw, patch)
    elif height % patch or width % patch:
        raise DecodeError(f"output size {height}x{width} (latent {lat_h}x{lat_w} x {meta.pixel_scale} "
                          f"px per cell) is not a multiple of {patch}; ask for a size that is (pid-run --size HxW, "
                          f"e.g. {height // patch * patch or patch}x{width // patch * patch or patch}) "
                          f"or crop or pad the latent")
    if size_range is None:
        return
    (min_h, min_w), (max_h, max_w) = size_range
    if min_h <= height <= max_h and min_w <= width <= max_w:
        return
    range_text = f"{min_h}x{min_w} to {max_h}x{max_w}" + (f", the {meta.variant} variant" if meta.variant else "")
    raise DecodeError(f"output size {height}x{width} is outside the range this {source} supports ({range_text}); "
                      f"{_way_to_size(meta, height, width)}")


def check_graph_limits(meta: ModelMetadata, latent_hw: Sequence[int], height: int, width: int) -> None:
    """The latent and output sizes against what the exported graph itself takes (its traced bounds)."""
    limits, patch = meta.limits, meta.patch_size
    lat_h, lat_w = (int(v) for v in latent_hw)
    if lat_h < 1 or lat_w < 1:
        raise DecodeError(f"latents are {lat_h}x{lat_w} cells: a latent needs at least 1x1")
    if max(lat_h, lat_w) > limits.max_latent_side:
        raise DecodeError(f"latents are {lat_h}x{lat_w} cells but this export's graph takes at most "
                          f"{limits.max_latent_side} per side")
    top = limits.max_patches_side * patch
    if max(height, width) > top:
        raise DecodeError(f"output size {height}x{width} is beyond what this export's graph takes "
                          f"(at most {top} px per side: {limits.max_patches_side} patches of {patch} px)")


__all__ = ["ASPECT_SLACK_CELLS", "SizeRange", "aspect_ratio_range", "check_graph_limits",
           "check_output_size", "native_size", "output_size", "parse_hw", "supported_size_range"]
