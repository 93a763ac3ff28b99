"""An input array's shape and dtype from its file header, without reading the data.

`.npy` (numpy.lib.format's header reader), `.npz` (the header of each member, read
from the zip without extracting it) and `.safetensors` (safetensors' own header, via
safe_open's slices, which map the file rather than read it). pid-run checks these
shapes against the model before loading anything, so a huge or empty latent is
refused without allocating it.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Sequence

import numpy as np
from numpy.lib import format as npy_format

from .errors import first_line
from .io import InputError, check_input_file, pick_array

SAFETENSORS_FLOATS = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64",
                      "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


@dataclass(frozen=True)
class ArrayHeader:
    """What a file says about one of its arrays."""

    name: str  # "" for a .npy file
    shape: tuple[int, ...]
    dtype: str  # numpy / torch dtype name, e.g. float32, bfloat16, int64
    floating: bool

    @property
    def elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


def _npy_header(handle: BinaryIO, name: str) -> ArrayHeader:
    version = npy_format.read_magic(handle)
    if version == (1, 0):
        shape, _, dtype = npy_format.read_array_header_1_0(handle)
    elif version == (2, 0):
        shape, _, dtype = npy_format.read_array_header_2_0(handle)
    else:  # 3.0 (utf-8 field names) has no public reader; its header is 2.0's
        shape, _, dtype = npy_format._read_array_header(handle, version)  # noqa: SLF001
    return ArrayHeader(name, tuple(int(d) for d in shape), dtype.name, bool(np.issubdtype(dtype, np.floating)))


def read_headers(path: str | os.PathLike[str], what: str) -> dict[str, ArrayHeader]:
    """Every array's header in an input file, keyed by name (`.npy`: "")."""
    path, suffix = check_input_file(path, what)
    try:
        if suffix == ".npy":
            with open(path, "rb") as handle:
                return {"": _npy_header(handle, "")}
        if suffix == ".npz":
            headers = {}
            with zipfile.ZipFile(path) as archive:
                for member in archive.namelist():
                    name = member.removesuffix(".npy")
                    with archive.open(member) as handle:
                        headers[name] = _npy_header(handle, name)
            return headers
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            headers = {}
            for name in handle.keys():
                array = handle.get_slice(name)
                dtype = array.get_dtype()
                headers[name] = ArrayHeader(name, tuple(int(d) for d in array.get_shape()),
                                            SAFETENSORS_FLOATS.get(dtype, dtype.lower()), dtype in SAFETENSORS_FLOATS)
            return headers
    except Exception as exc:  # numpy / zipfile / safetensors each raise their own types
        raise InputError(f"cannot read {what} file {path}: {first_line(exc)}") from None


def pick_header(headers: dict[str, ArrayHeader], keys: Sequence[str], path: str | os.PathLike[str],
                what: str) -> ArrayHeader:
    """The single array of a file, else the first of `keys` present (as io.pick_array chooses the array)."""
    return pick_array(headers, keys, path, what)


def check_float(header: ArrayHeader, path: str | os.PathLike[str], what: str) -> None:
    if not header.floating:
        raise InputError(f"{what} in {path} are {header.dtype}, expected float16 or float32")


__all__ = ["ArrayHeader", "check_float", "pick_header", "read_headers"]
