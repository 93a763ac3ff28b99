"""pid-run's checks before the model is opened: everything the files' headers and the export's metadata decide.

Opening a model costs seconds (ONNX Runtime session, TensorRT engine); reading a latent
file costs its size. So the order is: arguments, the model file and its metadata, the
input files' headers (shape and dtype; nothing is read yet), the output location; only
then the data, which is checked in full (`decode.check_inputs`) before the model opens.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import DecodeError
from .tiling import TileSetting, canvas_size_range
from .headers import ArrayHeader, check_float, pick_header, read_headers
from .io import CAPTION_KEYS, LATENT_KEYS, InputError, check_noise_suffix, noise_keys
from .metadata import ModelMetadata
from .sampler import num_renoise
from .sizes import check_graph_limits, check_output_size

SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed takes
TENSORRT_SUFFIXES = (".plan", ".engine")


def check_seed(seed: object) -> int:
    """A whole number torch can seed a generator with."""
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise DecodeError(f"seed must be a whole number, got {seed!r}")
    seed = int(seed)
    low, high = SEED_RANGE
    if not low <= seed <= high:
        raise DecodeError(f"seed {seed} is out of range: use a whole number from {low} to {high} (64 bits)")
    return seed


def export_size_range(meta: ModelMetadata, model_file: Path):
    """The output size range known before opening: the export's, except for an engine (its profile decides)."""
    if model_file.suffix.lower() in TENSORRT_SUFFIXES or meta.min_size is None or meta.max_size is None:
        return None
    return (tuple(meta.min_size), tuple(meta.max_size))


@dataclass(frozen=True)
class LatentPlan:
    """What the latents file's header says, checked: batch and output size."""

    batch: int
    latent_hw: tuple[int, int]
    height: int
    width: int


def latent_shape(header: ArrayHeader, path: str | os.PathLike[str]) -> tuple[int, ...]:
    shape = header.shape
    if len(shape) == 3:
        shape = (1, *shape)
    if len(shape) != 4:
        raise InputError(f"latents in {path} have shape {list(header.shape)}, expected [B,C,h,w] or [C,h,w]")
    if 0 in shape:
        raise InputError(f"latents in {path} have shape {list(header.shape)}: every side must be at least 1")
    return shape


def check_latents_header(meta: ModelMetadata, model_file: Path, path: str | os.PathLike[str],
                         size: tuple[int, int] | None, tile: TileSetting = None) -> LatentPlan:
    """The latents' shape (from the header) against the model, the graph's limits and the requested size."""
    header = pick_header(read_headers(path, "latents"), LATENT_KEYS, path, "latents")
    check_float(header, path, "latents")
    batch, channels, lat_h, lat_w = latent_shape(header, path)
    if channels != meta.latent_channels:
        model = meta.release or "this model"
        raise InputError(f"latents in {path} have {channels} channels but {model} takes {meta.latent_channels}-channel "
                         "latents (was the latent made by a different LDM?)")
    height, width = (lat_h * meta.pixel_scale, lat_w * meta.pixel_scale) if size is None else size
    check_graph_limits(meta, (lat_h, lat_w), height, width)
    check_output_size(meta, height, width, (lat_h, lat_w), canvas_size_range(export_size_range(meta, model_file), tile),
                      "export",
                      requested=size is not None)
    return LatentPlan(batch, (lat_h, lat_w), height, width)


def check_pipeline_latents_header(meta: ModelMetadata, path: str | os.PathLike[str]) -> None:
    """--pipeline latents (packed or not): nothing empty, floating point, and no side beyond the graph's reach."""
    header = pick_header(read_headers(path, "latents"), LATENT_KEYS, path, "latents")
    check_float(header, path, "latents")
    if not header.shape or 0 in header.shape:
        raise InputError(f"latents in {path} have shape {list(header.shape)}: every side must be at least 1")
    reach = meta.limits.max_latent_side
    # Tokens [B, L, C] hold up to side^2 cells each; spatial sides may be up to 2x (Flux2's raw latent).
    too_big = header.shape[-2] > reach * reach if len(header.shape) <= 3 else max(header.shape[-2:]) > 2 * reach
    if too_big:
        raise InputError(f"latents in {path} have shape {list(header.shape)}, beyond what this export's graph "
                         f"takes (at most {reach} latent cells per side)")


def check_caption_header(meta: ModelMetadata, path: str | os.PathLike[str], batch: int,
                         note: Callable[[str], None]) -> None:
    """Caption embeddings [B or 1, tokens, dim]; a note when the model reads only the first tokens."""
    header = pick_header(read_headers(path, "caption embedding"), CAPTION_KEYS, path, "caption embedding")
    check_float(header, path, "caption embeddings")
    shape = header.shape if len(header.shape) != 2 else (1, *header.shape)
    if len(shape) != 3:
        raise InputError(f"caption embeddings in {path} have shape {list(header.shape)}, "
                         "expected [B, tokens, dim] or [tokens, dim]")
    items, tokens, dim = shape
    if dim != meta.txt_embed_dim:
        raise InputError(f"caption embeddings have dim {dim} but this model takes {meta.txt_embed_dim} "
                         f"(Gemma-2-2b-it hidden states for the released models; {path})")
    if tokens == 0 or items == 0:
        raise InputError(f"caption embeddings in {path} have shape {list(header.shape)}: no tokens")
    if items not in (1, batch):
        raise InputError(f"batch mismatch: latents have {batch} item{'s' if batch != 1 else ''} but caption "
                         f"embeddings have {items} (give 1 or {batch}; {path})")
    if tokens > meta.txt_max_length:
        note(f"note: caption embeddings in {path} have {tokens} tokens; this model reads the first "
             f"{meta.txt_max_length}, the last {tokens - meta.txt_max_length} are cut")


def check_noise_header(path: str | os.PathLike[str], batch: int, height: int, width: int, steps: int) -> None:
    """--noise: 'noise' [B,3,H,W] and 'eps' [steps-1,B,3,H,W] for these latents, from the header."""
    check_noise_suffix(path)
    headers = read_headers(path, "noise")
    found = []
    for key in noise_keys(path, headers):
        check_float(headers[key], path, f"noise array '{key}'")
        found.append(list(headers[key].shape))
    noise, eps = found
    want = [batch, 3, height, width]
    if noise != want:
        kind = "batch mismatch" if noise[1:] == want[1:] else "shape mismatch"
        raise InputError(f"{kind}: noise is {noise} but these latents need {want} ({path})")
    if len(eps) != 5 or eps[1:] != want or eps[0] < num_renoise(steps):
        raise InputError(f"eps is {eps} but {steps} steps on these latents need "
                         f"[{num_renoise(steps)}, {', '.join(map(str, want))}] ({path})")


__all__ = ["LatentPlan", "check_caption_header", "check_latents_header", "check_noise_header",
           "check_pipeline_latents_header", "check_seed", "export_size_range"]
