"""Reading a decode request: the body (.npy / .npz / .safetensors) and the query parameters.

Everything here raises `HttpError` with the status a client gets and one line saying why;
nothing touches the model. Formats are told apart by their magic bytes, not by the
Content-Type (which must only be a binary type: 415 otherwise).
"""

from __future__ import annotations

import io
import json
import struct
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..errors import first_line
from ..sizes import parse_hw
from ..tiling import TileSetting, TilingError, parse_tile

ACCEPTED_TYPES = ("application/octet-stream", "application/x-npy", "application/x-npz",
                  "application/x-safetensors", "application/zip")
LATENT_KEYS = ("latents", "latent", "lq_latent")
CAPTION_KEYS = ("caption", "caption_embeds", "y")
OUTPUTS = ("png", "npy")


class HttpError(Exception):
    """A request the service refuses: `status`, a one-line `message`, optional extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


@dataclass(frozen=True)
class DecodeQuery:
    seed: int
    sigma: float = 0.0
    size: tuple[int, int] | None = None
    steps: int = 4
    output: str = "png"
    pipeline: str | None = None
    ldm_size: tuple[int, int] | None = None
    tile: TileSetting = "auto"


def _size(text: str, name: str) -> tuple[int, int]:
    try:
        return parse_hw(text)
    except ValueError as exc:
        raise HttpError(422, f"{name}: {exc}") from None


def parse_query(params: dict[str, str]) -> DecodeQuery:
    known = {"seed", "sigma", "size", "steps", "output", "pipeline", "ldm_size", "prompt", "tile"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise HttpError(422, f"unknown parameter(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    if "prompt" in params:
        raise HttpError(422, "this server has no caption encoder: send caption embeddings in the body")
    if "seed" not in params:
        raise HttpError(422, "seed is required (decodes are seeded, so a retried request gives the same image)")
    try:
        seed = int(params["seed"])
        sigma = float(params.get("sigma", "0"))
        steps = int(params.get("steps", "4"))
    except ValueError:
        raise HttpError(422, "seed and steps must be integers and sigma a number") from None
    if not 0 <= seed < 2 ** 63:
        raise HttpError(422, f"seed must be in [0, 2^63), got {seed}")
    output = params.get("output", "png")
    if output not in OUTPUTS:
        raise HttpError(422, f"output must be png or npy, got {output!r}")
    size = _size(params["size"], "size") if "size" in params else None
    ldm_size = _size(params["ldm_size"], "ldm_size") if "ldm_size" in params else None
    try:
        tile = parse_tile(params.get("tile", "auto"))
    except TilingError as exc:
        raise HttpError(422, str(exc)) from None
    return DecodeQuery(seed, sigma, size, steps, output, params.get("pipeline"), ldm_size, tile)


def check_content_type(value: str | None) -> None:
    kind = (value or "application/octet-stream").split(";")[0].strip().lower()
    if kind not in ACCEPTED_TYPES:
        raise HttpError(415, f"Content-Type {kind} is not accepted: send the .npy, .npz or .safetensors file "
                             "as application/octet-stream")


def _float32(array: Tensor, what: str) -> Tensor:
    if not array.is_floating_point():
        raise HttpError(422, f"{what} are {str(array.dtype).removeprefix('torch.')}, expected float16 or float32")
    return array.to(torch.float32).contiguous()


def _arrays(body: bytes) -> dict[str, Tensor]:
    try:
        if body.startswith(b"\x93NUMPY"):
            return {"": torch.from_numpy(np.load(io.BytesIO(body), allow_pickle=False).copy())}
        if body.startswith(b"PK"):
            with np.load(io.BytesIO(body), allow_pickle=False) as archive:
                return {name: torch.from_numpy(archive[name].copy()) for name in archive.files}
        if len(body) >= 8:
            header = struct.unpack("<Q", body[:8])[0]
            if 0 < header <= len(body) - 8 and body[8:9] == b"{":
                json.loads(body[8:8 + header])  # a clear 400 for a broken header
                from safetensors.torch import load

                return dict(load(body))
    except Exception as exc:  # numpy / zipfile / safetensors each raise their own types
        raise HttpError(400, f"cannot read the body: {first_line(exc)}") from None
    raise HttpError(400, "the body is not a .npy, .npz or .safetensors file")


def _pick(arrays: dict[str, Tensor], keys: tuple[str, ...]) -> Tensor | None:
    for key in keys:
        if key in arrays:
            return arrays[key]
    return None


def parse_body(body: bytes) -> tuple[Tensor, Tensor | None]:
    """(latents [1,C,h,w] or a packed [1,N,D] / [1,C,h,w] pipeline latent, caption [1,L,D] or None)."""
    if not body:
        raise HttpError(400, "empty body: send the latent as a .npy, .npz or .safetensors file")
    arrays = _arrays(body)
    latents = next(iter(arrays.values())) if len(arrays) == 1 else _pick(arrays, LATENT_KEYS)
    if latents is None:
        raise HttpError(422, f"the body holds {', '.join(sorted(arrays)) or 'no arrays'}; name the latent "
                             f"{' or '.join(LATENT_KEYS)}")
    latents = _float32(latents, "latents")
    if latents.ndim in (2, 3) and latents.shape[0] != 1:
        latents = latents[None]
    if latents.shape[:1] != (1,):
        raise HttpError(422, f"one latent per request: shape {list(latents.shape)} (batching is the server's job)")
    caption = None if len(arrays) == 1 else _pick(arrays, CAPTION_KEYS)
    if caption is not None:
        caption = _float32(caption, "caption embeddings")
        caption = caption[None] if caption.ndim == 2 else caption
    return latents, caption


def npy_bytes(image: Tensor) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, image.detach().to("cpu", torch.float32).contiguous().numpy())
    return buffer.getvalue()


def png_bytes(image: Tensor) -> bytes:
    """The PNG pid-run writes for this image [1,3,H,W] (the same streamed writer)."""
    import tempfile
    from pathlib import Path

    from ..io import write_png

    with tempfile.TemporaryDirectory(prefix="pid-serve-") as scratch:
        path = Path(scratch) / "image.png"
        write_png(image[0], path)
        return path.read_bytes()
