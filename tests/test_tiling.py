"""Per-step tiling (pid_runtime.tiling) and the decode memory estimate (pid_runtime.memory).

Fast tests decode the tiny golden export tiny_v1_16ch_sr4 (ONNX Runtime, CPU) at a few
hundred pixels. The `heavy` ones measure peak RSS of pid-run in separate processes at
1024^2 and 2048^2 (minutes on 2 cores, ~8 GB for the untiled 2048^2 decode).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from exports import export_cases, export_root  # noqa: F401 (fixture)
from pid_export.network import resize_nearest
from pid_runtime.backends import open_backend
from pid_runtime.decode import DecodeError, decode
from pid_runtime.memory import GIB, available_memory, estimate_decode_memory
from pid_runtime.tiling import LatentCrops, TiledVelocity, TilingError, parse_tile, plan_tiles

CASE = "tiny_v1_16ch_sr4"  # 16-ch latent, 32 px per latent cell, patch 16: tiles step by 32 px


@pytest.fixture(scope="module")
def export_dir(export_root) -> Path:  # noqa: F811
    return export_cases([CASE], export_root)[CASE]


@pytest.fixture(scope="module")
def backend(export_dir):
    opened = open_backend(export_dir / "model.onnx", device="cpu")
    yield opened
    opened.close()


def inputs(batch: int, lat_h: int, lat_w: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 16, lat_h, lat_w, generator=g), torch.randn(batch, 12, 40, generator=g)


# ---------------------------------------------------------------------------
# One tile is the untiled decode


@pytest.mark.parametrize("lat_hw, size, batch", [((8, 12), None, 1), ((8, 8), (272, 256), 1), ((6, 6), None, 2)])
def test_one_tile_plan_is_the_untiled_decode_bit_for_bit(backend, lat_hw, size, batch):
    latents, caption = inputs(batch, *lat_hw)
    untiled = decode(backend, latents, caption, [0.0, 0.3][:batch], seed=5, steps=4, size=size, batch_size=1)
    plans = []
    for tile in ((latents.shape[-2] * 32 * 4, latents.shape[-1] * 32 * 4), (4096, 4096, 256)):
        tiled = decode(backend, latents, caption, [0.0, 0.3][:batch], seed=5, steps=4, size=size, tile=tile,
                       on_plan=plans.append)
        assert torch.equal(tiled.images, untiled.images)
    assert [plan.count for plan in plans] == [1, 1]


def test_tiled_decode_runs_the_network_on_each_crop(backend):
    """With no overlap, the blended velocity on each tile is the network's output on that tile's crop."""
    latents, caption = inputs(1, 8, 12)
    sigma = torch.zeros(1)
    plan = plan_tiles((256, 384), (128, 192), 0, 32, None)
    assert plan.count == 4
    velocity = TiledVelocity(backend, plan, caption, latents, sigma)
    x = torch.randn(1, 3, 256, 384, generator=torch.Generator().manual_seed(1))
    t = torch.full((1,), 866.0)
    blended = velocity(x, t).clone()
    for tile in plan.tiles():
        rows, cols = slice(tile.top, tile.top + 128), slice(tile.left, tile.left + 192)
        backend.bind(caption, latents[:, :, tile.top // 32:(tile.top + 128) // 32, tile.left // 32:(tile.left + 192) // 32],
                     sigma, 128, 192)
        direct = backend.velocity(x[:, :, rows, cols].contiguous(), t)
        assert torch.equal(blended[:, :, rows, cols], direct)


def test_latent_crops_at_other_sizes_are_the_whole_alignment_cropped(export_dir):
    """Away from the native size a tile's latent is the canvas's nearest alignment under its patches."""
    from pid_runtime.metadata import ModelMetadata

    meta = ModelMetadata.load(export_dir / "pid_export.json")
    latents = torch.randn(1, 16, 7, 9)
    canvas = (240, 304)  # patch grid 15 x 19 from a 7 x 9 latent: nearest repeats unevenly
    crops = LatentCrops(meta, latents, canvas)
    whole = resize_nearest(latents, 15, 19)
    plan = plan_tiles(canvas, (112, 144), 32, 16, None)
    for tile in plan.tiles():
        crop = crops.crop(tile)
        assert torch.equal(resize_nearest(crop, tile.height // 16, tile.width // 16),
                           whole[:, :, tile.top // 16:(tile.top + tile.height) // 16,
                                 tile.left // 16:(tile.left + tile.width) // 16])


# ---------------------------------------------------------------------------
# Plans and windows


def test_blend_weights_sum_to_one_for_random_plans():
    rng = random.Random(23)
    for index in range(150):
        quantum = rng.choice([16, 32, 64])
        canvas = (rng.randint(1, 16) * quantum, rng.randint(1, 16) * quantum)
        tile = (rng.randint(2, 8) * quantum, rng.randint(2, 8) * quantum)
        # mostly up to half the tile; every 5th plan up to the whole tile (three tiles over a pixel)
        overlap = rng.randint(0, min(tile) - 1 if index % 5 == 0 else min(tile) // 2)
        try:
            plan = plan_tiles(canvas, tile, overlap, quantum, None)
        except TilingError:  # the only refusal for sides that are multiples: no room to step
            split = [side for side, whole in zip(tile, canvas) if side < whole]
            assert split and min(split) - overlap < quantum
            continue
        rows, cols = plan.windows()
        total = torch.zeros(canvas, dtype=torch.float64)
        covered = torch.zeros(canvas, dtype=torch.int64)
        for tile_ in plan.tiles():
            weight = rows[tile_.row][:, None].double() * cols[tile_.col][None, :].double()
            assert bool((weight > 0).all())
            assert tile_.top % quantum == 0 and tile_.left % quantum == 0
            assert tile_.top + tile_.height <= canvas[0] and tile_.left + tile_.width <= canvas[1]
            total[tile_.top:tile_.top + tile_.height, tile_.left:tile_.left + tile_.width] += weight
            covered[tile_.top:tile_.top + tile_.height, tile_.left:tile_.left + tile_.width] += 1
        assert bool((covered > 0).all())
        assert float((total - 1).abs().max()) < 1e-6, (canvas, tile, overlap)
        for starts, side in ((plan.tops, plan.tile[0]), (plan.lefts, plan.tile[1])):  # neighbours overlap enough
            assert all(b - a <= side - overlap for a, b in zip(starts, starts[1:]))


def test_tiles_never_leave_the_export_size_range(export_dir, tmp_path):
    """An export recording 128..256 px: auto tiles a 512x768 canvas inside it; tiles beyond it are refused."""
    limited = tmp_path / "limited"
    shutil.copytree(export_dir, limited)
    meta = json.loads((limited / "pid_export.json").read_text())
    meta.update(min_size=[128, 128], max_size=[256, 256])
    (limited / "pid_export.json").write_text(json.dumps(meta))
    small = open_backend(limited / "model.onnx", device="cpu")
    try:
        latents, caption = inputs(1, 16, 24)
        with pytest.raises(DecodeError, match="outside the range"):
            decode(small, latents, caption, seed=0, steps=1, tile="off")
        with pytest.raises(DecodeError, match="outside the sizes this model takes"):
            decode(small, latents, caption, seed=0, steps=1, tile=(320, 320))
        plans = []
        result = decode(small, latents, caption, seed=0, steps=1, tile="auto", on_plan=plans.append)
        (plan,) = plans
        assert plan.count > 1 and 128 <= min(plan.tile) and max(plan.tile) <= 256
        assert result.images.shape == (1, 3, 512, 768) and bool(torch.isfinite(result.images).all())
    finally:
        small.close()


def test_auto_does_not_tile_what_fits(backend, export_dir, tmp_path):
    latents, caption = inputs(1, 8, 8)
    plans = []
    auto = decode(backend, latents, caption, seed=3, steps=2, tile="auto", on_plan=plans.append)
    assert plans == []
    assert torch.equal(auto.images, decode(backend, latents, caption, seed=3, steps=2).images)
    np.save(tmp_path / "lat.npy", latents.numpy())
    np.save(tmp_path / "cap.npy", caption.numpy())
    run = pid_run(export_dir, tmp_path / "lat.npy", "--caption-embeds", tmp_path / "cap.npy", "--steps", "1",
                  "--out", tmp_path / "o.png")
    assert run.returncode == 0 and "tiling" not in run.stdout
    tiled = pid_run(export_dir, tmp_path / "lat.npy", "--caption-embeds", tmp_path / "cap.npy", "--steps", "1",
                    "--out", tmp_path / "t.png", "--tile", "128x128:32")
    assert tiled.returncode == 0, tiled.stderr
    assert "tiling 256x256 as 3x3 tiles of 128x128, overlap 64" in tiled.stdout  # 32 asked, 64 actual
    assert "step 1/1 tile 9/9" in tiled.stdout


def test_tile_settings_and_refusals(backend):
    assert parse_tile("auto") == "auto" and parse_tile("OFF") == "off"
    assert parse_tile("2048x1024") == (2048, 1024) and parse_tile("2304x2304:256") == (2304, 2304, 256)
    for bad in ("2048", "x", "0x64", "64x64:-1", "64x64:a"):
        with pytest.raises(TilingError):
            parse_tile(bad)
    latents, caption = inputs(1, 8, 8)
    with pytest.raises(DecodeError, match="multiple of 32"):
        decode(backend, latents, caption, seed=0, steps=1, tile=(100, 128))
    with pytest.raises(DecodeError, match="smaller than the tile"):
        decode(backend, latents, caption, seed=0, steps=1, tile=(128, 128, 128))
    with pytest.raises(DecodeError, match=r"needs about .* GiB .* but 0.10 GiB is allowed by --max-memory"):
        decode(backend, latents, caption, seed=0, steps=1, tile="off", max_memory=0.1)


def test_available_memory_reads_meminfo():
    free = available_memory("cpu")
    with open("/proc/meminfo") as meminfo:
        total = int(next(line for line in meminfo if line.startswith("MemTotal:")).split()[1]) * 1024
    assert 0 < free <= total


# ---------------------------------------------------------------------------
# Memory, measured (separate processes)


def pid_run(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pid_runtime.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=900, env=env)


# VmHWM, the high-water mark of this process image's own memory: getrusage's ru_maxrss would carry
# over the pytest worker's RSS, which a forked child inherits and exec keeps (Linux).
PEAK = """
import sys
from pid_runtime.cli import main
code = main(sys.argv[1:])
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(f"PEAK_RSS_KIB {hwm.split()[1]}")
sys.exit(code)
"""


def peak_run(tmp_path: Path, export_dir: Path, side: int, *extra: str) -> tuple[int, str]:
    """pid-run in its own process at side x side, 1 step; (peak RSS bytes, stdout)."""
    lat, cap = tmp_path / f"lat{side}.npy", tmp_path / "cap.npy"
    latents, caption = inputs(1, side // 32, side // 32)
    np.save(lat, latents.numpy())
    np.save(cap, caption.numpy())
    run = subprocess.run([sys.executable, "-c", PEAK, str(export_dir), str(lat), "--caption-embeds", str(cap),
                          "--steps", "1", "--out", str(tmp_path / f"out{side}{'-'.join(extra)}.npy"), *extra],
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr
    return int(run.stdout.split("PEAK_RSS_KIB")[-1].split()[0]) * 1024, run.stdout


@pytest.mark.heavy
def test_tiled_2048_peak_is_a_third_of_untiled(export_dir, tmp_path):
    """2048^2, one step: untiled (~8 GB, ~2 min here) and tiled at 512^2, each in its own process."""
    if available_memory("cpu") < 11 * GIB:
        pytest.skip("the untiled 2048^2 decode needs ~9 GB of free RAM")
    untiled, _ = peak_run(tmp_path, export_dir, 2048, "--tile", "off")
    tiled, stdout = peak_run(tmp_path, export_dir, 2048, "--tile", "512x512")
    print(f"peak RSS 2048^2: untiled {untiled / GIB:.2f} GiB, tiled 512^2 {tiled / GIB:.2f} GiB")
    assert "tiling 2048x2048 as 5x5 tiles of 512x512, overlap 128" in stdout
    assert tiled <= untiled / 3
    from pid_runtime.metadata import ModelMetadata

    meta = ModelMetadata.load(export_dir / "pid_export.json")
    model = sum(f.stat().st_size for f in export_dir.glob("model.onnx*"))
    for measured, call in ((untiled, None), (tiled, (512, 512))):  # the estimate, against the measurement
        estimate = estimate_decode_memory(meta, "onnxruntime", "cpu", 1, (2048, 2048), call, model).total
        assert 0.9 * measured <= estimate <= 2.0 * measured  # 1 step: below the multi-step bound, (call, estimate / GIB, measured / GIB)


@pytest.mark.heavy
def test_max_memory_below_the_untiled_estimate_tiles_and_stays_under(export_dir, tmp_path):
    from pid_runtime.metadata import ModelMetadata

    meta = ModelMetadata.load(export_dir / "pid_export.json")
    untiled_estimate = estimate_decode_memory(meta, "onnxruntime", "cpu", 1, (1024, 1024)).total
    budget = 1.0  # GiB
    assert budget * GIB < untiled_estimate
    peak, stdout = peak_run(tmp_path, export_dir, 1024, "--max-memory", str(budget))
    print(f"--max-memory {budget}: {stdout.splitlines()[2]}; peak {peak / GIB:.2f} GiB "
          f"(untiled estimate {untiled_estimate / GIB:.2f} GiB)")
    assert "tiling 1024x1024 as" in stdout
    assert peak < budget * GIB


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.skipif(not torch.cuda.is_available() or not os.environ.get("PID_TILING_ENGINE"),
                    reason="needs a CUDA GPU, TensorRT and a full-size 2kto4k engine (PID_TILING_ENGINE=export dir)")
def test_8192_from_a_2kto4k_engine(tmp_path):
    """8192^2 through an engine whose profile stops at 4096: auto tiles inside the profile."""
    engine_dir = Path(os.environ["PID_TILING_ENGINE"])
    decoder_backend = open_backend(engine_dir / "engine.plan", device="cuda")
    try:
        meta = decoder_backend.meta
        side = 8192 // meta.pixel_scale
        latents = torch.randn(1, meta.latent_channels, side, side, generator=torch.Generator().manual_seed(0))
        caption = torch.zeros(1, meta.txt_max_length, meta.txt_embed_dim)
        plans = []
        result = decode(decoder_backend, latents, caption, seed=0, tile="auto", on_plan=plans.append)
        (plan,) = plans
        assert max(plan.tile) <= 4096 and plan.count > 1
        assert result.images.shape == (1, 3, 8192, 8192) and bool(torch.isfinite(result.images).all())
    finally:
        decoder_backend.close()
