"""The lean decode loop: noise order and laziness, chunking (by --batch-size and by an engine
profile's max batch), the per-step NaN/Inf check, the memory bound, streamed PNG writing.

Most of these run the real `pid_runtime.decode.decode` with `StandInBackend` (the overhead
benchmark's stand-in network: velocity = x / 2), so the sampler, noise and chunking code
under test is the code pid-run runs.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.overhead import PIXEL_SCALE, StandInBackend, measure
from test_runtime import _independent_png16_read
from pid_runtime import io as runtime_io
from pid_runtime.decode import DecodeError, decode
from pid_runtime.io import write_output
from pid_runtime.sampler import FixedNoise, SeededNoise, draw_noise, sample, timesteps

SIZE = (64, 96)  # output H, W: a multiple of 32, non-square


def latents(batch: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 16, SIZE[0] // PIXEL_SCALE, SIZE[1] // PIXEL_SCALE, generator=gen)


CAPTION = torch.ones(1, 8, 64)


def reference_draws(shape, count: int, seed: int, device: str = "cpu") -> list[torch.Tensor]:
    """The reference order, written out: one generator, seeded once, whole-batch randn after randn."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(shape, generator=gen, device=device) for _ in range(count)]


def reference_sample(noise: torch.Tensor, eps: list[torch.Tensor], steps: int) -> torch.Tensor:
    """The reference sampler (SPEC 4) for velocity = x / 2: x0 in float64 rounded to float32 (float32 t),
    re-noise in float32 with float32 t; no in-place tricks."""
    ts = torch.tensor(timesteps(steps), dtype=torch.float32)
    x = noise.clone()
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        v = x * 0.5
        x0 = (x.double() - t.double() * v.double()).float()
        x = (1.0 - t_next) * x0 + t_next * eps[i] if t_next > 0 else x0
    return x.clamp(-1, 1)


# ---------------------------------------------------------------------------
# Noise


def test_seeded_noise_is_drawn_lazily_in_the_reference_order():
    """SeededNoise hands out the reference whole-batch draws, one at a time, and draw_noise agrees."""
    shape = (3, 3, 32, 48)
    expected = reference_draws(shape, 4, seed=11)
    source = SeededNoise(shape, 11, "cpu")
    out = torch.empty(shape)
    source.initial(out)
    assert torch.equal(out, expected[0])
    for k in range(3):
        source.eps(k, out)
        assert torch.equal(out, expected[k + 1])
    noise, eps = draw_noise(shape, 4, 11, "cpu")
    assert torch.equal(noise, expected[0]) and all(torch.equal(a, b) for a, b in zip(eps, expected[1:]))


@pytest.mark.parametrize("item_exact", [True, False], ids=["cpu-items", "whole-draws (the CUDA path)"])
def test_chunk_rows_equal_the_whole_batch_draws_in_any_order(item_exact):
    """Rows of any chunk, asked for in any order, are the rows of the whole-batch draws. With
    item_exact=False this runs the algorithm CUDA generators need (whole draws, then slice) on the CPU."""
    shape = (5, 3, 16, 32)
    expected = reference_draws(shape, 4, seed=3)
    source = SeededNoise(shape, 3, "cpu")
    source.item_exact = item_exact
    requests = [(2, 1, 3), (0, 3, 5), (3, 0, 2), (1, 0, 2), (0, 0, 3), (1, 2, 5), (3, 4, 5), (2, 0, 1), (3, 2, 4)]
    for draw, lo, hi in requests:
        out = torch.empty(hi - lo, *shape[1:])
        source.draw(draw, lo, hi, out)
        assert torch.equal(out, expected[draw][lo:hi]), (draw, lo, hi)


def test_sampler_matches_the_reference_formula_bitwise():
    """In-place float32 step math gives the reference's values (x0 via float64, re-noise in float32)."""
    shape = (2, 3, 48, 64)
    for steps in (1, 2, 3, 4):
        draws = reference_draws(shape, steps, seed=steps)
        got = sample(lambda x, t: x * 0.5, draws[0], draws[1:], steps=steps)
        assert torch.equal(got, reference_sample(draws[0], draws[1:], steps)), steps


def test_seeded_decode_uses_the_reference_noise():
    backend = StandInBackend()
    result = decode(backend, latents(2), CAPTION, seed=21, steps=4)
    draws = reference_draws((2, 3, *SIZE), 4, seed=21)
    assert torch.equal(result.images, reference_sample(draws[0], draws[1:], 4))
    assert result.seed == 21 and result.timings.noise > 0 and len(result.timings.steps[0]) == 4


@pytest.mark.parametrize("batch_size", [1, 2, 3, 4])
def test_chunked_and_unchunked_decodes_are_identical(batch_size):
    lat = latents(5)
    whole = decode(StandInBackend(), lat, CAPTION, seed=8, steps=4).images
    backend = StandInBackend()
    chunked = decode(backend, lat, CAPTION, seed=8, steps=4, batch_size=batch_size)
    assert torch.equal(chunked.images, whole)
    assert backend.bound_batches == [min(batch_size, 5 - lo) for lo in range(0, 5, batch_size)]


def test_fixed_noise_decode_equals_seeded_decode_chunked_or_not():
    lat = latents(3)
    noise, eps = draw_noise((3, 3, *SIZE), 3, 5, "cpu")
    seeded = decode(StandInBackend(), lat, CAPTION, seed=5, steps=3).images
    for batch_size in (None, 2):
        fixed = decode(StandInBackend(), lat, CAPTION, noise=(noise, torch.stack(eps)), steps=3,
                       batch_size=batch_size)
        assert torch.equal(fixed.images, seeded) and fixed.seed is None


# ---------------------------------------------------------------------------
# Chunking by the engine profile's max batch (issue 10, fix 5)


def test_batch_above_the_profile_max_decodes_in_chunks_of_the_max():
    lat = latents(5)
    capped = StandInBackend(max_batch=2)
    result = decode(capped, lat, CAPTION, seed=4, steps=4)
    assert capped.bound_batches == [2, 2, 1]
    assert len(result.timings.loops) == 3
    assert torch.equal(result.images, decode(StandInBackend(), lat, CAPTION, seed=4, steps=4).images)
    # An explicit --batch-size above the profile's max is capped too; one below it is kept.
    capped.bound_batches.clear()
    decode(capped, lat, CAPTION, seed=4, steps=1, batch_size=4)
    assert capped.bound_batches == [2, 2, 1]
    capped.bound_batches.clear()
    decode(capped, lat, CAPTION, seed=4, steps=1, batch_size=1)
    assert capped.bound_batches == [1] * 5


def test_profile_min_batch_above_a_chunk_is_a_clear_error():
    backend = StandInBackend(max_batch=4)
    backend.profile_ranges = {"x": ((2, 3, 32, 32), (4, 3, 8192, 8192))}
    with pytest.raises(DecodeError, match="at least 2 items per call"):
        decode(backend, latents(5), CAPTION, seed=0, steps=1)


# ---------------------------------------------------------------------------
# The backend contract: what decode asks of a backend is declared on Backend (issue 20)


class OwnLoop(StandInBackend):
    """A backend with its own whole-decode loop (as TensorRT's, which keeps x in its bound buffer)."""

    def __init__(self):
        super().__init__()
        self.own_loops = 0

    def sample(self, noise, eps=None, steps=4, on_step=None, out=None):
        self.own_loops += 1
        return super().sample(noise, eps, steps, on_step=on_step, out=out)


def test_decode_runs_a_backends_own_loop_and_the_declared_defaults():
    plain = StandInBackend()
    assert plain.profile_ranges is None and plain.onnx_path is None  # declared: any size, no ONNX on the host
    own = OwnLoop()
    lat = latents(3)
    result = decode(own, lat, CAPTION, seed=5, steps=4, batch_size=2)
    assert own.own_loops == 2  # once per chunk
    assert torch.equal(result.images, decode(plain, lat, CAPTION, seed=5, steps=4).images)
    assert len(result.timings.steps[0]) == 4  # its steps are still timed and reported
    # A tiled decode binds tile by tile, so the backend's own loop (one bound shape) is not used.
    own.own_loops = 0
    tiled = decode(own, latents(1), CAPTION, seed=5, steps=2, tile=(32, 64, 0))
    assert own.own_loops == 0 and tiled.images.shape == (1, 3, *SIZE)


# ---------------------------------------------------------------------------
# NaN / Inf: each step's network output, before any clamp (issue 10, fix 2)


class Overflowing(StandInBackend):
    """Returns +Inf in one pixel at step `bad_step` (0-based) -- what an fp16 overflow looks like;
    the clamp at the end would have hidden it."""

    def __init__(self, bad_step: int, value: float = float("inf")):
        super().__init__()
        self.bad_step, self.value, self.calls = bad_step, value, 0

    def velocity(self, x, t):
        v = super().velocity(x, t)
        if self.calls == self.bad_step:
            v[0, 1, 2, 3] = self.value
        self.calls += 1
        return v


@pytest.mark.parametrize("bad_step,value", [(1, float("inf")), (3, float("-inf")), (0, float("nan"))])
def test_non_finite_network_output_names_the_step(bad_step, value):
    backend = Overflowing(bad_step, value)
    with pytest.raises(DecodeError, match=rf"NaN or Inf values at step {bad_step + 1}/4 "):
        decode(backend, latents(1), CAPTION, seed=0, steps=4)
    assert backend.calls == bad_step + 1  # stopped at the bad step


def test_non_finite_step_in_a_chunk_names_the_items():
    backend = Overflowing(bad_step=5)  # chunk 2 (items 3..4), its second step
    with pytest.raises(DecodeError, match=r"step 2/4 .*\(items 3\.\.4 of 4\)"):
        decode(backend, latents(4), CAPTION, seed=0, steps=4, batch_size=2)


# ---------------------------------------------------------------------------
# Memory (issue 12): the decode loop adds at most 4 image-sizes; PNG writing streams


def test_decode_loop_memory_is_at_most_four_image_sizes():
    """Through the real decode path and output writing (benchmarks.overhead), B=1 at 2048x2048
    (the 3840x3840 figure is in benchmarks/README.md). Peak RSS is exact here (VmHWM)."""
    document = measure((2048, 2048), batch=1, formats=("png", "png16"), repeat=1)
    stages = document["stages"]
    if not stages["decode"]["host_method"].startswith("VmHWM"):
        pytest.skip("exact peak RSS needs Linux /proc/self/clear_refs")
    assert stages["decode"]["host_peak_growth_images"] <= 4.0
    # x lives in the result, plus the network output and one eps: 3 on the CPU.
    assert stages["decode"]["host_peak_growth_images"] > 2.5
    # The result exists already; writing it adds a block of rows, not an image.
    assert stages["write_png"]["host_peak_growth_images"] < 0.5
    assert stages["write_png16"]["host_peak_growth_images"] < 0.5


def _chunk_kinds(path) -> list[bytes]:
    data = path.read_bytes()
    pos, kinds = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        assert struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0] == \
            zlib.crc32(data[pos + 4:pos + 8 + length])
        kinds.append(kind)
        pos += 12 + length
    return kinds


def test_streamed_png_spans_blocks_and_idat_chunks(tmp_path, monkeypatch):
    """Rows in several blocks (one partial), several IDAT chunks: Pillow reads back the exact pixels."""
    monkeypatch.setattr(runtime_io, "PNG_ROWS_PER_BLOCK", 16)
    monkeypatch.setattr(runtime_io, "IDAT_BYTES", 2000)
    gen = torch.Generator().manual_seed(1)
    sample_ = (torch.rand(2, 3, 270, 145, generator=gen) * 2.4 - 1.2)  # some values outside [-1, 1]
    expected = np.round((sample_.clamp(-1, 1) + 1).numpy() / 2 * 255).astype(np.uint8).transpose(0, 2, 3, 1)
    written = write_output(sample_, tmp_path / "img.png")
    for i, path in enumerate(written):
        kinds = _chunk_kinds(path)
        assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and kinds.count(b"IDAT") > 1
        with Image.open(path) as png:
            assert png.mode == "RGB" and png.size == (145, 270)
            assert np.array_equal(np.asarray(png), expected[i])
    [deep] = write_output(sample_[:1], tmp_path / "deep.png", bit_depth=16)
    assert _chunk_kinds(deep).count(b"IDAT") > 1
    expected16 = np.round((sample_[0].clamp(-1, 1) + 1).numpy() / 2 * 65535).astype(np.uint16).transpose(1, 2, 0)
    assert np.array_equal(_independent_png16_read(deep), expected16)
