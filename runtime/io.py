"""Reading pid-run's input arrays and writing its images, atomically.

Inputs (latents, caption embeddings) come as `.npy`, `.npz` or `.safetensors`.
An `.npz` / `.safetensors` file holding one array is read as that array; with
several arrays the conventional name is used (`lq_latent`/`latents` for latents,
`y`/`caption_embeds` for captions), so a golden-vector file works for both.

Outputs: `.npy` (float32 [B,3,H,W], the clamped sample in [-1, 1]) or `.png`
(image = (x + 1) / 2; 8 or 16 bits per channel; with B > 1 one file per item,
`out_0.png`, `out_1.png`, ...). Every file is written under a temporary name in
its target directory and renamed into place only when all of them are complete.
"""

from __future__ import annotations

import functools
import os
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from .errors import first_line

INPUT_SUFFIXES = (".npy", ".npz", ".safetensors")
OUTPUT_SUFFIXES = (".png", ".npy")
LATENT_KEYS = ("lq_latent", "latents", "latent")
CAPTION_KEYS = ("y", "caption_embeds", "caption")
NOISE_KEYS = ("noise", "sampler_noise")
EPS_KEYS = ("eps", "sampler_eps")


class InputError(ValueError):
    """An input or output file the user has to fix (missing, unreadable, wrong shape or dtype)."""


# ---------------------------------------------------------------------------
# Reading


def read_arrays(path: str | os.PathLike[str], what: str) -> dict[str, Tensor]:
    """All arrays of an input file as CPU tensors (dtype unchanged), keyed by name (`.npy`: "")."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in INPUT_SUFFIXES:
        raise InputError(f"{what} file {path} must end in {', '.join(INPUT_SUFFIXES)}")
    if not path.is_file():
        raise InputError(f"{what} file {path} does not exist")
    try:
        if suffix == ".npy":
            return {"": torch.from_numpy(np.load(path, allow_pickle=False))}
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                return {name: torch.from_numpy(archive[name]) for name in archive.files}
        from safetensors.torch import load_file  # torch, not numpy: keeps bfloat16 readable

        return dict(load_file(str(path)))
    except Exception as exc:  # numpy / zipfile / safetensors each raise their own types
        raise InputError(f"cannot read {what} file {path}: {first_line(exc)}") from None


def pick_array(arrays: dict[str, Tensor], keys: Sequence[str], path: str | os.PathLike[str], what: str) -> Tensor:
    """The single array of a file, else the first of `keys` present."""
    if len(arrays) == 1:
        return next(iter(arrays.values()))
    for key in keys:
        if key in arrays:
            return arrays[key]
    names = ", ".join(sorted(arrays)) or "none"
    raise InputError(f"{what} file {path} holds several arrays ({names}); name the {what} one "
                     f"{' or '.join(repr(k) for k in keys)}")


def as_float32(array: Tensor, path: str | os.PathLike[str], what: str) -> Tensor:
    if not array.is_floating_point():
        raise InputError(f"{what} in {path} are {str(array.dtype).removeprefix('torch.')}, "
                         "expected float16 or float32")
    return array.to(torch.float32).contiguous()


def load_latents(path: str | os.PathLike[str]) -> Tensor:
    """LDM latents as float32 [B,C,h,w] (a [C,h,w] file is one item)."""
    latents = as_float32(pick_array(read_arrays(path, "latents"), LATENT_KEYS, path, "latents"), path, "latents")
    if latents.ndim == 3:
        latents = latents[None]
    if latents.ndim != 4:
        raise InputError(f"latents in {path} have shape {list(latents.shape)}, expected [B,C,h,w] or [C,h,w]")
    return latents


def load_caption(path: str | os.PathLike[str]) -> Tensor:
    """Caption embeddings as float32 [B or 1, Lt, D] (a [Lt, D] file is one caption)."""
    caption = as_float32(pick_array(read_arrays(path, "caption embedding"), CAPTION_KEYS, path,
                                    "caption embedding"), path, "caption embeddings")
    if caption.ndim == 2:
        caption = caption[None]
    if caption.ndim != 3:
        raise InputError(f"caption embeddings in {path} have shape {list(caption.shape)}, "
                         "expected [B, tokens, dim] or [tokens, dim]")
    return caption


def load_noise(path: str | os.PathLike[str]) -> tuple[Tensor, Tensor]:
    """Fixed sampler noise: `noise` [B,3,H,W] and `eps` [S-1,B,3,H,W] (float32) from a safetensors file."""
    if Path(path).suffix.lower() != ".safetensors":
        raise InputError(f"noise file {path} must be a .safetensors file with arrays 'noise' and 'eps'")
    arrays = read_arrays(path, "noise")
    found = []
    for keys in (NOISE_KEYS, EPS_KEYS):
        key = next((k for k in keys if k in arrays), None)
        if key is None:
            raise InputError(f"noise file {path} has no array '{keys[0]}' "
                             f"(expected 'noise' [B,3,H,W] and 'eps' [steps-1,B,3,H,W])")
        found.append(as_float32(arrays[key], path, f"noise array '{key}'"))
    noise, eps = found
    if noise.ndim != 4 or eps.ndim != 5:
        raise InputError(f"noise file {path}: 'noise' is {list(noise.shape)} and 'eps' is {list(eps.shape)}, "
                         "expected [B,3,H,W] and [steps-1,B,3,H,W]")
    return noise, eps


# ---------------------------------------------------------------------------
# Writing


def check_output_path(path: str | os.PathLike[str], bit_depth: int = 8) -> Path:
    """Validate an output name before any slow work starts."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise InputError(f"output {path} must end in .png or .npy")
    if bit_depth not in (8, 16):
        raise InputError(f"bit depth must be 8 or 16, got {bit_depth}")
    if bit_depth == 16 and suffix != ".png":
        raise InputError("--bit-depth 16 applies to .png output only (.npy is always float32)")
    if not path.parent.is_dir():
        raise InputError(f"output directory {path.parent} does not exist")
    return path


def output_paths(path: Path, batch: int) -> list[Path]:
    """Where a batch goes: `.npy` one file; `.png` one file, or `stem_i.png` per item when batch > 1."""
    if path.suffix.lower() == ".npy" or batch == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{i}{path.suffix}") for i in range(batch)]


def to_pixels(sample: Tensor, bit_depth: int) -> np.ndarray:
    """[B,3,H,W] in [-1,1] -> [B,H,W,3] uint8 / uint16, image = (x + 1) / 2, rounded."""
    top = (1 << bit_depth) - 1
    image = ((sample.detach().to("cpu", torch.float32).clamp(-1, 1) + 1) / 2 * top).round()
    return image.permute(0, 2, 3, 1).numpy().astype(np.uint8 if bit_depth == 8 else np.uint16)


def encode_png16(pixels: np.ndarray) -> bytes:
    """A 16-bit RGB PNG of [H,W,3] uint16 (Pillow writes 16 bits only for greyscale)."""
    height, width, _ = pixels.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = pixels.astype(">u2").reshape(height, width * 3)
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rows.view(np.uint8)], axis=1)  # filter 0 per row
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)  # 16 bit, truecolour
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6)) + chunk(b"IEND", b""))


def _write_png(pixels: np.ndarray, path: Path) -> None:
    """One [H,W,3] image (uint8 or uint16) as PNG."""
    if pixels.dtype == np.uint16:
        path.write_bytes(encode_png16(pixels))
    else:
        from PIL import Image

        Image.fromarray(pixels).save(path, format="PNG")


def write_output(sample: Tensor, path: str | os.PathLike[str], bit_depth: int = 8) -> list[Path]:
    """Write the clamped sample [B,3,H,W]; returns the files written (all or none)."""
    path = check_output_path(path, bit_depth)
    batch = sample.shape[0]
    targets = output_paths(path, batch)
    writers: list[Callable[[Path], None]]
    if path.suffix.lower() == ".npy":
        array = sample.detach().to("cpu", torch.float32).contiguous().numpy()
        writers = [lambda tmp: np.save(tmp, array)]
    else:
        writers = [functools.partial(_write_png, item) for item in to_pixels(sample, bit_depth)]
    _write_all_atomically(targets, writers)
    return targets


def atomic_write(target: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """`write(temp)` into a temporary file beside `target`, then rename it: never a half-written file."""
    target = Path(target)
    _write_all_atomically([target], [write])
    return target


def _write_all_atomically(targets: list[Path], writers: Sequence[Callable[[Path], object]]) -> None:
    """Write each target under a temporary name, then rename them all; on failure leave nothing."""
    temps: list[Path] = []
    placed: list[Path] = []
    try:
        for target, write in zip(targets, writers):
            # Same directory (rename stays atomic) and same suffix (numpy appends .npy otherwise).
            handle, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=target.suffix)
            os.close(handle)
            temps.append(Path(name))
            write(Path(name))
        for temp, target in zip(temps, targets):
            os.replace(temp, target)
            placed.append(target)
    except BaseException:
        for leftover in temps + placed:
            leftover.unlink(missing_ok=True)
        raise
