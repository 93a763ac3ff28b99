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

import contextlib
import functools
import os
import signal
import struct
import tempfile
import threading
import zlib
from pathlib import Path
from typing import Callable, Collection, Iterator, Sequence, TypeVar

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


def check_input_file(path: str | os.PathLike[str], what: str) -> tuple[Path, str]:
    """(path, lower-case suffix) of an existing input file of a kind we read; else InputError."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in INPUT_SUFFIXES:
        raise InputError(f"{what} file {path} must end in {', '.join(INPUT_SUFFIXES)}")
    if not path.is_file():
        raise InputError(f"{what} file {path} does not exist")
    return path, suffix


def check_noise_suffix(path: str | os.PathLike[str]) -> None:
    if Path(path).suffix.lower() != ".safetensors":
        raise InputError(f"noise file {path} must be a .safetensors file with arrays 'noise' and 'eps'")


def noise_keys(path: str | os.PathLike[str], names: Collection[str]) -> tuple[str, str]:
    """The names of the 'noise' and 'eps' arrays of a --noise file holding `names`; else InputError."""
    found = []
    for keys in (NOISE_KEYS, EPS_KEYS):
        key = next((k for k in keys if k in names), None)
        if key is None:
            raise InputError(f"noise file {path} has no array '{keys[0]}' "
                             "(expected 'noise' [B,3,H,W] and 'eps' [steps-1,B,3,H,W])")
        found.append(key)
    return found[0], found[1]


def read_arrays(path: str | os.PathLike[str], what: str) -> dict[str, Tensor]:
    """All arrays of an input file as CPU tensors (dtype unchanged), keyed by name (`.npy`: "")."""
    path, suffix = check_input_file(path, what)
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


Entry = TypeVar("Entry")  # an array, or its header (pid_runtime.headers): both are chosen the same way


def pick_array(arrays: dict[str, Entry], keys: Sequence[str], path: str | os.PathLike[str], what: str) -> Entry:
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
    check_noise_suffix(path)
    arrays = read_arrays(path, "noise")
    noise, eps = (as_float32(arrays[key], path, f"noise array '{key}'") for key in noise_keys(path, arrays))
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


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_ROWS_PER_BLOCK = 64  # rows converted and compressed at a time (a 4K block is ~3 MB of float32)
IDAT_BYTES = 1 << 20  # compressed bytes per IDAT chunk


def pixel_rows(item: Tensor, bit_depth: int, rows: slice) -> np.ndarray:
    """Rows of one image [3,H,W] in [-1,1] as [n,W,3] uint8 / big-endian uint16: image = (x + 1) / 2,
    rounded half to even. In numpy on purpose: on a busy machine torch's threads wait on each
    other for blocks this small (10x slower than one numpy thread)."""
    top = (1 << bit_depth) - 1
    block = np.clip(item[:, rows].detach().to("cpu", torch.float32).numpy(), -1, 1)
    block += 1
    block *= top / 2  # (x + 1) * (top / 2) rounds once, like ((x + 1) / 2) * top: the halving is exact
    np.rint(block, out=block)
    return block.transpose(1, 2, 0).astype(np.uint8 if bit_depth == 8 else ">u2", order="C")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def write_png(item: Tensor, path: Path, bit_depth: int = 8) -> None:
    """One image [3,H,W] in [-1,1] as an RGB PNG of 8 or 16 bits per channel, streamed.

    Rows are converted, filtered and compressed a block at a time, so the whole
    image never exists as pixels: memory is one block, whatever the size. Every
    row uses PNG's "Up" filter (the byte above subtracted; numpy does it for a
    block in one operation) and deflate's run-length strategy at level 1. Against
    Pillow's defaults (which pick a filter per row by trying all five, even at
    compress_level 0) this is 4.5-9x less CPU per 4K image, files the same size
    for detailed images, 10% larger for very smooth ones (benchmarks/README.md,
    "PNG encoding").
    """
    _, height, width = item.shape
    compressor = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    row_bytes = width * 3 * bit_depth // 8
    header = struct.pack(">IIBBBBB", width, height, bit_depth, 2, 0, 0, 0)  # truecolour, no interlace
    filtered = np.empty((PNG_ROWS_PER_BLOCK, 1 + row_bytes), np.uint8)
    filtered[:, 0] = 2  # filter type "Up" on every row
    above = np.zeros(row_bytes, np.uint8)  # the row above the first one counts as zeros
    pending: list[bytes] = []
    size = 0
    with open(path, "wb") as handle:
        handle.write(PNG_SIGNATURE + _png_chunk(b"IHDR", header))

        def emit(data: bytes, final: bool = False) -> None:
            nonlocal size
            if data:
                pending.append(data)
                size += len(data)
            if size >= IDAT_BYTES or (final and size):
                handle.write(_png_chunk(b"IDAT", b"".join(pending)))
                pending.clear()
                size = 0

        for top in range(0, height, PNG_ROWS_PER_BLOCK):
            raw = pixel_rows(item, bit_depth, slice(top, top + PNG_ROWS_PER_BLOCK))
            raw = raw.reshape(raw.shape[0], row_bytes) if bit_depth == 8 else \
                raw.view(np.uint8).reshape(raw.shape[0], row_bytes)  # big-endian bytes, as PNG stores them
            n = raw.shape[0]
            np.subtract(raw[0], above, out=filtered[0, 1:])
            np.subtract(raw[1:], raw[:-1], out=filtered[1:n, 1:])
            above = raw[-1].copy()
            emit(compressor.compress(filtered[:n].data))
        emit(compressor.flush(), final=True)
        handle.write(_png_chunk(b"IEND", b""))


def write_output(sample: Tensor, path: str | os.PathLike[str], bit_depth: int = 8) -> list[Path]:
    """Write the clamped sample [B,3,H,W]; returns the files written (all or none).

    PNGs are written one item at a time, streamed (see `write_png`); `.npy` is one file.
    """
    path = check_output_path(path, bit_depth)
    batch = sample.shape[0]
    targets = output_paths(path, batch)
    writers: list[Callable[[Path], None]]
    if path.suffix.lower() == ".npy":
        array = sample.detach().to("cpu", torch.float32).contiguous().numpy()
        writers = [lambda tmp: np.save(tmp, array)]
    else:
        writers = [functools.partial(write_png, item.detach(), bit_depth=bit_depth) for item in sample]
    _write_all_atomically(targets, writers)
    return targets


def atomic_write(target: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """`write(temp)` into a temporary file beside `target`, then rename it: never a half-written file."""
    target = Path(target)
    _write_all_atomically([target], [write])
    return target


def _new_file_mode() -> int:
    """0o666 less the process umask: the mode a plain open(..., "w") would create."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _write_all_atomically(targets: list[Path], writers: Sequence[Callable[[Path], object]]) -> None:
    """Write each target under a temporary name, then rename them all; on failure leave nothing."""
    temps: list[Path] = []
    placed: list[Path] = []
    current = targets[0] if targets else None
    try:
        for target, write in zip(targets, writers):
            current = target
            # Same directory (rename stays atomic) and same suffix (numpy appends .npy otherwise).
            # Signals wait while the temp file is made and recorded, so an interrupt cannot orphan it.
            with _signals_deferred():
                handle, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=target.suffix)
                temps.append(Path(name))
            os.close(handle)
            write(Path(name))
        mode = _new_file_mode()
        for temp, target in zip(temps, targets):
            current = target
            os.chmod(temp, mode)  # mkstemp makes 0600 files; a written image or plan gets what open() would give
            with _signals_deferred():
                os.replace(temp, target)
                placed.append(target)
    except OSError as exc:
        for leftover in temps + placed:
            leftover.unlink(missing_ok=True)
        # Name the user's file, not the temporary one (e.g. "No space left on device: out.png").
        raise OSError(exc.errno, exc.strerror or str(exc), str(current)) from None
    except BaseException:
        for leftover in temps + placed:
            leftover.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT / SIGTERM (delivered on leaving) around a step that must not be cut in two."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
