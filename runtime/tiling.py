"""Per-step spatial tiling: decode a canvas larger than one network call can take.

At each sampler step the network runs on overlapping tiles of the canvas, each with
its aligned crop of the latent and the same caption, and the tiles' velocities are
blended into one whole-canvas velocity. The sampler's update and its noise stay
whole-canvas (`pid_runtime.sampler.sample` sees one `velocity(x, t)`), so where
tiles overlap they see the same x and the same noise, and a one-tile plan is the
untiled decode bit for bit (its window is exactly 1.0 everywhere).

Blend: separable trapezoidal windows. Along each axis a tile's weight ramps
linearly over its overlap with each neighbour ((k + 0.5) / overlap, never 0), is 1
elsewhere and has no ramp at the canvas edge; the per-axis weights are divided by
their sum over the tiles (float64, then float32), so the 2D weights w_y * w_x of a
grid plan sum to one at every pixel (to float32 rounding).

Positions are tile-relative, as the exported network computes them: its 2D RoPE
(with NTK scaling from the tile's own patch grid) and its pixel sin-cos table span
each tile, not the canvas. Canvas-global positions would need the graph to take a
position offset and the canvas grid as inputs (a re-export); the network was trained
on whole images of 1.5K-4K, so tile-relative positions keep each call in that range.

Latent crops: at the latent's native size (H = h * pixel_scale) tiles start and end
on latent cells (multiples of lcm(patch, pixel_scale)) and get the latent cells
under them, which the network aligns exactly as it aligns the whole latent. At other
sizes (pid-run --size) with nearest alignment (align ratio > 1, no unpatchify), a tile
gets the whole canvas's nearest-aligned latent rows and columns under its patches (a
latent at the tile's patch-grid size, which the network keeps as is); an engine whose
profile caps lq_latent at the native size cannot take those, and bilinear/folded
alignments are not tiled at other sizes (the decode says so).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Union

import torch
from torch import Tensor

from .backends.base import Backend
from .memory import GIB, MemoryEstimate, available_memory, estimate_decode_memory, gib
from .metadata import ModelMetadata
from .sizes import SizeRange, parse_hw

TileSetting = Union[str, tuple[int, int], tuple[int, int, int], None]  # "auto" | "off" | None | (h, w[, overlap])
DEFAULT_OVERLAP = 256  # px; capped at a quarter of the tile side


def canvas_size_range(size_range: SizeRange | None, tile: TileSetting) -> SizeRange | None:
    """The range the whole canvas must fit: when it may be tiled, tiles
    (not the canvas) must fit the model's range, so only the smallest size still applies."""
    if size_range is None or tile is None or tile == "off":
        return size_range
    return (size_range[0], (1 << 30, 1 << 30))


class TilingError(ValueError):
    """A tile setting this model or canvas cannot take (the message says what would)."""


@dataclass(frozen=True)
class Tile:
    top: int
    left: int
    height: int
    width: int
    row: int  # index in the plan's grid
    col: int


@dataclass(frozen=True)
class TilePlan:
    """A grid of equal tiles covering an H x W canvas; tile starts per axis."""

    canvas: tuple[int, int]
    tile: tuple[int, int]
    overlap: int  # the overlap asked for (neighbours overlap at least this much)
    tops: tuple[int, ...]
    lefts: tuple[int, ...]

    @property
    def count(self) -> int:
        return len(self.tops) * len(self.lefts)

    def tiles(self) -> list[Tile]:
        return [Tile(top, left, self.tile[0], self.tile[1], r, c)
                for r, top in enumerate(self.tops) for c, left in enumerate(self.lefts)]

    @property
    def actual_overlap(self) -> int:
        """The smallest overlap of neighbours (>= the one asked for: starts are spread evenly)."""
        gaps = [side - (b - a) for starts, side in ((self.tops, self.tile[0]), (self.lefts, self.tile[1]))
                for a, b in zip(starts, starts[1:])]
        return min(gaps) if gaps else self.overlap

    def describe(self) -> str:
        (h, w), (th, tw) = self.canvas, self.tile
        return (f"tiling {h}x{w} as {len(self.tops)}x{len(self.lefts)} tiles of {th}x{tw}, "
                f"overlap {self.actual_overlap}")

    def windows(self) -> tuple[list[Tensor], list[Tensor]]:
        """Per-axis blend weights (float32): one [tile height] vector per tile row, one [tile width] per column."""
        return (axis_windows(self.canvas[0], self.tops, self.tile[0]),
                axis_windows(self.canvas[1], self.lefts, self.tile[1]))


def axis_windows(length: int, starts: tuple[int, ...], side: int) -> list[Tensor]:
    """Trapezoidal weights of tiles [start, start + side) along one axis, normalised to sum to one."""
    raw = []
    for i, start in enumerate(starts):
        weight = torch.ones(side, dtype=torch.float64)
        position = torch.arange(side, dtype=torch.float64) + 0.5
        if i > 0:  # ramp up over the overlap with the previous tile
            ramp = starts[i - 1] + side - start
            if ramp > 0:
                weight = torch.minimum(weight, position / ramp)
        if i + 1 < len(starts):  # ramp down over the overlap with the next tile
            ramp = start + side - starts[i + 1]
            if ramp > 0:
                weight = torch.minimum(weight, (side - position) / ramp)
        raw.append(weight)
    total = torch.zeros(length, dtype=torch.float64)
    for start, weight in zip(starts, raw):
        total[start:start + side] += weight
    return [(weight / total[start:start + side]).to(torch.float32) for start, weight in zip(starts, raw)]


def axis_starts(length: int, side: int, overlap: int, quantum: int) -> tuple[int, ...]:
    """Fewest starts (multiples of `quantum`) of `side`-long tiles covering `length`, neighbours
    overlapping by at least `overlap`, spread evenly."""
    if side >= length:
        return (0,)
    span = (length - side) // quantum  # the last start, in quanta
    stride = (side - overlap) // quantum  # the largest gap between starts that keeps the overlap
    if stride < 1:
        raise TilingError(f"overlap {overlap} leaves no stride for tiles of {side} (tile step {quantum} px)")
    gaps = math.ceil(span / stride)
    return tuple((i * span // gaps) * quantum for i in range(gaps + 1))


def tile_quantum(meta: ModelMetadata, native: bool) -> int:
    """What tile sides and starts must be multiples of: the patch, and at the native size the latent cell."""
    patch = int(meta.network.get("patch_size", 16))
    return math.lcm(patch, meta.pixel_scale) if native else patch


def plan_tiles(canvas: tuple[int, int], tile: tuple[int, int], overlap: int, quantum: int,
               size_range: SizeRange | None) -> TilePlan:
    """Check a tile size against the canvas, the quantum and the model's size range; lay out the grid."""
    height, width = canvas
    th, tw = min(tile[0], height), min(tile[1], width)  # a tile never exceeds the canvas
    for what, value in (("tile height", th), ("tile width", tw)):
        if value <= 0 or value % quantum:
            raise TilingError(f"{what} {value} must be a positive multiple of {quantum} px here "
                              f"(patch size and latent cell), e.g. {max(value // quantum * quantum, quantum)}")
    split_sides = [side for side, whole in ((th, height), (tw, width)) if side < whole]
    if overlap < 0 or (split_sides and overlap >= min(split_sides)):
        raise TilingError(f"overlap {overlap} must be at least 0 and smaller than the tile ({th}x{tw})")
    if size_range is not None:
        (min_h, min_w), (max_h, max_w) = size_range
        if not (min_h <= th <= max_h and min_w <= tw <= max_w):
            raise TilingError(f"tiles of {th}x{tw} are outside the sizes this model takes "
                              f"({min_h}x{min_w} to {max_h}x{max_w})")
    return TilePlan((height, width), (th, tw), overlap,
                    axis_starts(height, th, overlap, quantum), axis_starts(width, tw, overlap, quantum))


def parse_tile(text: str) -> TileSetting:
    """`auto`, `off`, `HxW` or `HxW:OVERLAP` (pixels)."""
    value = text.strip().lower()
    if value in ("auto", "off"):
        return value
    size, colon, overlap = value.partition(":")
    try:
        height, width = parse_hw(size)
        if not colon:
            return height, width
        if not overlap.strip().isdigit():  # int() would take "-1" and "+1"
            raise ValueError(overlap)
        return height, width, int(overlap)
    except ValueError:
        raise TilingError(f"--tile {text!r} is not auto, off, HxW or HxW:OVERLAP (pixels), e.g. 2048x2048:256") from None


# ---------------------------------------------------------------------------
# Latent crops


def _nearest_rows(size_in: int, size_out: int) -> Tensor:
    """Source index of each output row of F.interpolate(mode="nearest"), in torch's float32 arithmetic
    (the network's own alignment; the runtime does not import pid_export)."""
    scale = torch.full((), size_in, dtype=torch.float32) / size_out
    return torch.floor(torch.arange(size_out, dtype=torch.float32) * scale).to(torch.int64).clamp(max=size_in - 1)


class LatentCrops:
    """The latent under each tile (see the module docstring)."""

    def __init__(self, meta: ModelMetadata, latents: Tensor, canvas: tuple[int, int]):
        self.latents, self.scale = latents, meta.pixel_scale
        self.patch = int(meta.network.get("patch_size", 16))
        self.native = canvas == (latents.shape[-2] * self.scale, latents.shape[-1] * self.scale)
        self.rows = self.cols = None
        if not self.native:
            unpatchify = int(meta.network.get("lq_latent_unpatchify_factor", 1))
            ratio = meta.pixel_scale / unpatchify / self.patch
            if unpatchify != 1 or ratio <= 1:
                raise TilingError(f"this network aligns its latent by {'unpatchify' if unpatchify != 1 else 'resampling'}"
                                  f", so it tiles only at the latent's native size "
                                  f"{latents.shape[-2] * self.scale}x{latents.shape[-1] * self.scale}")
            self.rows = _nearest_rows(latents.shape[-2], canvas[0] // self.patch).to(latents.device)
            self.cols = _nearest_rows(latents.shape[-1], canvas[1] // self.patch).to(latents.device)

    def crop(self, tile: Tile) -> Tensor:
        if self.rows is None or self.cols is None:
            s = self.scale
            return self.latents[:, :, tile.top // s:(tile.top + tile.height) // s,
                                tile.left // s:(tile.left + tile.width) // s]
        p = self.patch
        rows = self.rows[tile.top // p:(tile.top + tile.height) // p]
        cols = self.cols[tile.left // p:(tile.left + tile.width) // p]
        return self.latents.index_select(2, rows).index_select(3, cols)


# ---------------------------------------------------------------------------
# The tiled velocity


class TiledVelocity:
    """`velocity(x, t)` over a tile plan: each tile bound and run, velocities blended.

    Holds one whole-canvas velocity (the blend) besides what the backend holds per tile.
    `on_tile(index, count)` is called after each tile's network call.
    """

    def __init__(self, backend: Backend, plan: TilePlan, caption: Tensor, latents: Tensor, sigma: Tensor,
                 on_tile: Callable[[int, int], None] | None = None):
        self.backend, self.plan, self.on_tile = backend, plan, on_tile
        device = backend.device
        self.caption, self.sigma = caption.to(device), sigma.to(device)
        self.crops = LatentCrops(backend.meta, latents.to(device), plan.canvas)
        window_rows, window_cols = plan.windows()
        self.window_rows = [w.to(device) for w in window_rows]
        self.window_cols = [w.to(device) for w in window_cols]
        self.tiles = plan.tiles()
        self._blend: Tensor | None = None

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        if self._blend is None or self._blend.shape != x.shape:
            self._blend = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        blend = self._blend
        blend.zero_()
        for index, tile in enumerate(self.tiles):
            rows = slice(tile.top, tile.top + tile.height)
            cols = slice(tile.left, tile.left + tile.width)
            self.backend.bind(self.caption, self.crops.crop(tile), self.sigma, tile.height, tile.width)
            v = self.backend.velocity(x[:, :, rows, cols].contiguous(), t)
            weight = self.window_rows[tile.row][:, None] * self.window_cols[tile.col][None, :]
            blend[:, :, rows, cols].addcmul_(v.to(blend.device), weight)
            del v
            if self.on_tile is not None:
                self.on_tile(index, len(self.tiles))
        return blend


# ---------------------------------------------------------------------------
# When and how to tile


@dataclass(frozen=True)
class Budget:
    """The memory a decode may use: free memory now (the model already loaded), or --max-memory for
    the whole process / device use (then the model and the runtime count too)."""

    limit: int  # bytes
    whole_process: bool  # True: --max-memory (base + model + decode); False: free memory (decode only)
    source: str  # "free RAM" | "free device memory" | "--max-memory"

    def need(self, estimate: MemoryEstimate) -> int:
        return estimate.total if self.whole_process else estimate.network + estimate.canvas

    def refusal(self, estimate: MemoryEstimate, what: str, hint: str) -> str:
        parts = estimate.describe() if self.whole_process else \
            f"network {gib(estimate.network)}, canvas {gib(estimate.canvas)}"
        limit = f"{gib(self.limit)} is allowed by --max-memory" if self.whole_process else \
            f"{gib(self.limit)} is {self.source}"
        return f"{what} needs about {gib(self.need(estimate))} ({parts}; estimate) but {limit}; {hint}"


def decode_budget(device: torch.device, max_memory_gib: float | None) -> Budget:
    if max_memory_gib is not None:
        return Budget(int(max_memory_gib * GIB), True, "--max-memory")
    return Budget(available_memory(device), False, "free device memory" if device.type == "cuda" else "free RAM")


def _fits(canvas: tuple[int, int], size_range: SizeRange | None) -> bool:
    return size_range is None or (canvas[0] <= size_range[1][0] and canvas[1] <= size_range[1][1])


def choose_plan(backend: Backend, canvas: tuple[int, int], latents: Tensor, batch: int, setting: TileSetting,
                size_range: SizeRange | None, budget: Budget, model_bytes: int = 0) -> TilePlan | None:
    """The tile plan of a decode (None: whole), or TilingError with what to change.

    off / None: whole, refused when its estimate exceeds the budget. (h, w[, overlap]): that
    plan. auto: whole when the canvas is inside the model's range and its estimate fits the
    budget; else the largest tiles inside the range whose estimate fits (items go one at a time).
    """
    meta = backend.meta
    native = canvas == (latents.shape[-2] * meta.pixel_scale, latents.shape[-1] * meta.pixel_scale)
    quantum = tile_quantum(meta, native)

    def estimate(call: tuple[int, int] | None, items: int) -> MemoryEstimate:
        return estimate_decode_memory(meta, backend.name, backend.device.type, items, canvas, call, model_bytes)

    whole = estimate(None, batch)
    if setting is None or setting == "off":
        if budget.need(whole) > budget.limit:
            raise TilingError(budget.refusal(whole, f"decoding {canvas[0]}x{canvas[1]} whole",
                                             "decode it tiled (--tile auto) or fewer items at a time (--batch-size)"))
        return None
    if setting != "auto":
        if not isinstance(setting, tuple) or len(setting) not in (2, 3):
            raise TilingError(f"tile must be 'auto', 'off', None, (h, w) or (h, w, overlap), got {setting!r}")
        size = (int(setting[0]), int(setting[1]))
        overlap = int(setting[2]) if len(setting) == 3 else default_overlap(size, quantum)
        plan = plan_tiles(canvas, size, overlap, quantum, size_range)
        tiled = estimate(plan.tile, 1)
        if budget.need(tiled) > budget.limit:
            raise TilingError(budget.refusal(tiled, plan.describe(), "use smaller tiles"))
        return plan
    if _fits(canvas, size_range) and budget.need(whole) <= budget.limit:
        return None
    largest = [min(side, size_range[1][i]) if size_range else side for i, side in enumerate(canvas)]
    smallest = [-(-max(size_range[0][i], quantum) // quantum) * quantum if size_range else quantum for i in range(2)]
    scale = 1.0
    while True:  # shrink both sides until the estimate fits
        size = (max(int(largest[0] * scale) // quantum * quantum, smallest[0]),
                max(int(largest[1] * scale) // quantum * quantum, smallest[1]))
        tiled = estimate(size, 1)
        if budget.need(tiled) <= budget.limit:
            return plan_tiles(canvas, size, default_overlap(size, quantum), quantum, size_range)
        if list(size) == smallest:
            raise TilingError(budget.refusal(tiled, f"decoding {canvas[0]}x{canvas[1]} even in tiles of "
                                             f"{size[0]}x{size[1]}", "free some memory or raise --max-memory"))
        scale *= 0.8


def default_overlap(tile: tuple[int, int], quantum: int) -> int:
    """DEFAULT_OVERLAP px, at most a quarter of the shorter tile side, in whole patches."""
    return max(min(DEFAULT_OVERLAP, min(tile) // 4) // 16 * 16, 0)


__all__ = ["Budget", "DEFAULT_OVERLAP", "canvas_size_range", "choose_plan", "decode_budget", "default_overlap", "LatentCrops", "Tile", "TilePlan", "TiledVelocity", "TileSetting", "TilingError",
           "axis_starts", "axis_windows", "parse_tile", "plan_tiles", "tile_quantum"]
