"""The runtime library: noise order, backends agreeing, chunking, backend routing, file I/O."""

from __future__ import annotations

import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from exports import export_cases, export_root, golden_net, golden_tensors  # noqa: F401 (fixtures)
from PIL import Image

from pid_runtime.backends import BackendError, open_backend
from pid_runtime.backends.base import Backend
from pid_runtime.backends.onnxruntime import OnnxRuntimeBackend
from pid_runtime.backends.tensorrt import why_plan_cannot_run_here
from pid_runtime.decode import decode
from pid_runtime.io import InputError, load_caption, load_latents, write_output
from pid_runtime.metadata import ModelMetadata
from pid_runtime.sampler import draw_noise

CASE = "tiny_v1_16ch_sr4_b2"  # batch 2, per-item sigma, short caption


@pytest.fixture(scope="module")
def export_dir(export_root: Path) -> Path:  # noqa: F811
    return export_cases([CASE])[CASE]


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return golden_tensors(CASE)


class RecordingBackend(Backend):
    """Wraps a backend and keeps the x of every velocity call (step 0's x is the initial noise)."""

    def __init__(self, inner: Backend):
        super().__init__(inner.meta, inner.device)
        self.inner = inner
        self.name = inner.name
        self.seen_x: list[torch.Tensor] = []

    def bind(self, y, lq_latent, degrade_sigma, height, width):
        self.inner.bind(y, lq_latent, degrade_sigma, height, width)

    def velocity(self, x, t):
        self.seen_x.append(x.clone())
        return self.inner.velocity(x, t)


class TorchBackend(Backend):
    """A second real backend: the PyTorch PidNet itself (reference semantics, fp32)."""

    name = "torch"

    def __init__(self, net, meta: ModelMetadata):
        super().__init__(meta, torch.device("cpu"))
        self.net = net

    def bind(self, y, lq_latent, degrade_sigma, height, width):
        self.fixed = (y, lq_latent, degrade_sigma)

    @torch.no_grad()
    def velocity(self, x, t):
        return self.net(x, t, *self.fixed)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_draw_noise_is_the_reference_order():
    """One generator seeded once: initial noise first, then eps for re-noise steps 1, 2, 3, in order."""
    shape = (2, 3, 32, 48)
    gen = torch.Generator(device="cpu").manual_seed(1234)
    expected = [torch.randn(shape, generator=gen) for _ in range(4)]
    noise, eps = draw_noise(shape, 4, 1234, "cpu")
    assert torch.equal(noise, expected[0])
    assert len(eps) == 3
    for got, want in zip(eps, expected[1:]):
        assert torch.equal(got, want)
    # Fewer steps draw fewer eps, from the same stream.
    noise2, eps2 = draw_noise(shape, 2, 1234, "cpu")
    assert torch.equal(noise2, expected[0]) and len(eps2) == 1 and torch.equal(eps2[0], expected[1])


def test_onnxruntime_and_pytorch_backends_draw_the_same_noise_and_agree(export_dir, golden):
    onnx_backend = RecordingBackend(open_backend(export_dir / "model.onnx", device="cpu"))
    assert isinstance(onnx_backend.inner, OnnxRuntimeBackend)
    torch_backend = RecordingBackend(TorchBackend(golden_net(CASE), onnx_backend.meta))
    args = dict(latents=golden["lq_latent"], caption=golden["y"], sigma=golden["degrade_sigma"].tolist(),
                seed=77, steps=4)
    from_onnx = decode(onnx_backend, **args)
    from_torch = decode(torch_backend, **args)

    # The same initial noise reached both networks, and it is the reference draw for seed 77.
    reference_noise, _ = draw_noise(golden["sampler_noise"].shape, 4, 77, "cpu")
    assert torch.equal(onnx_backend.seen_x[0], torch_backend.seen_x[0])
    assert torch.equal(onnx_backend.seen_x[0], reference_noise)
    assert len(onnx_backend.seen_x) == len(torch_backend.seen_x) == 4
    assert from_onnx.images.shape == (2, 3, 96, 64)
    assert rel_error(from_onnx.images, from_torch.images) < 1e-4
    assert from_onnx.seed == 77 and len(from_onnx.timings.steps[0]) == 4


def test_seeded_decode_equals_decode_from_reference_noise(export_dir, golden):
    """decode(seed=S) uses exactly the noise a torch.Generator seeded with S draws in reference order."""
    backend = open_backend(export_dir, device="cpu")
    shape = tuple(golden["sampler_noise"].shape)
    gen = torch.Generator(device="cpu").manual_seed(5)
    noise = torch.randn(shape, generator=gen)
    eps = torch.stack([torch.randn(shape, generator=gen) for _ in range(3)])
    args = dict(latents=golden["lq_latent"], caption=golden["y"], sigma=[0.0, 0.35], steps=4)
    seeded = decode(backend, seed=5, **args).images
    explicit = decode(backend, noise=(noise, eps), **args).images
    other_seed = decode(backend, seed=6, **args).images
    assert torch.allclose(seeded, explicit, rtol=0, atol=1e-6)
    assert not torch.allclose(seeded, other_seed, atol=1e-3)


def test_batch_size_chunks_give_the_same_images(export_dir, golden):
    backend = open_backend(export_dir, device="cpu")
    args = dict(latents=golden["lq_latent"], caption=golden["y"][:1], sigma=0.1, seed=3, steps=3)
    whole = decode(backend, **args)
    chunked = decode(backend, batch_size=1, **args)
    assert len(chunked.timings.steps) == 2 and len(chunked.timings.steps[0]) == 3
    assert rel_error(chunked.images, whole.images) < 1e-5


def test_open_backend_routes_by_path(export_dir, tmp_path):
    assert isinstance(open_backend(export_dir), OnnxRuntimeBackend)  # a directory without engine.plan
    assert isinstance(open_backend(export_dir / "model.onnx"), OnnxRuntimeBackend)
    with pytest.raises(BackendError, match=r"\.plan/\.engine.*\.onnx.*export directory"):
        open_backend(export_dir / "pid_export.json")
    # A model file away from its metadata sidecar.
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copy(export_dir / "model.onnx", lonely / "model.onnx")
    with pytest.raises(BackendError, match="pid_export.json"):
        open_backend(lonely / "model.onnx")
    with pytest.raises(BackendError, match="--cuda-graph needs a TensorRT engine"):
        open_backend(export_dir, cuda_graph=True)


def test_one_onnxruntime_session_setup(export_dir, tmp_path):
    """create_session is what the backend, --verify's reference and the FP8 guard use: the providers for the
    device, the thread setting, and a load failure as one BackendError line."""
    from pid_runtime.backends.onnxruntime import create_session, session_device

    cpu = torch.device("cpu")
    session = create_session(export_dir / "model.onnx", cpu, threads=1)
    assert session.get_providers() == ["CPUExecutionProvider"]
    assert session.get_session_options().intra_op_num_threads == 1
    assert sorted(i.name for i in session.get_inputs()) == sorted(["x", "t", "y", "lq_latent", "degrade_sigma"])
    assert session_device("cpu") == cpu
    with pytest.raises(BackendError, match="threads must be at least 1"):
        create_session(export_dir / "model.onnx", cpu, threads=0)
    with pytest.raises(BackendError, match="threads must be at least 1"):
        OnnxRuntimeBackend(export_dir / "model.onnx", device="cpu", threads=0)
    damaged = tmp_path / "damaged.onnx"
    damaged.write_bytes(b"not a protobuf")
    with pytest.raises(BackendError) as info:
        create_session(damaged, cpu)
    assert str(info.value).startswith(f"ONNX Runtime cannot load {damaged}: ") and "\n" not in str(info.value)
    import onnxruntime

    if torch.cuda.is_available() and "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(BackendError, match="needs ONNX Runtime's CUDA provider"):
            session_device("cuda")


def _engine_dir(export_dir, tmp_path):
    with_engine = tmp_path / "exp"
    shutil.copytree(export_dir, with_engine)
    (with_engine / "engine.plan").write_bytes(b"\x00" * 64)  # nothing probe_plan recognises
    return with_engine


@pytest.mark.skipif(why_plan_cannot_run_here(Path("engine.plan")) is not None,
                    reason="needs a TensorRT library and a CUDA GPU")
def test_export_dir_prefers_its_engine(export_dir, tmp_path):
    with pytest.raises(BackendError):  # the library refuses the garbage plan: it was chosen over the ONNX
        open_backend(_engine_dir(export_dir, tmp_path))


@pytest.mark.skipif(why_plan_cannot_run_here(Path("engine.plan")) is None,
                    reason="checks a machine where engines cannot run (no TensorRT library or no GPU)")
def test_export_dir_whose_engine_cannot_run_here_uses_its_onnx(export_dir, tmp_path):
    # TensorRT-RTX builds engines on CPU-only machines: the directory still decodes there.
    with_engine = _engine_dir(export_dir, tmp_path)
    notes: list[str] = []
    backend = open_backend(with_engine, log=notes.append)
    assert isinstance(backend, OnnxRuntimeBackend)
    assert len(notes) == 1 and notes[0].startswith(f"note: {with_engine / 'engine.plan'} cannot run here (")
    assert notes[0].endswith(f"using {with_engine / 'model.onnx'} with ONNX Runtime")
    with pytest.raises(BackendError, match="model.onnx with ONNX Runtime instead"):  # named explicitly: not swapped
        open_backend(with_engine / "engine.plan")


# ---------------------------------------------------------------------------
# File formats


def test_input_formats_load_as_float32_batches(tmp_path):
    from safetensors.torch import save_file

    latent = torch.randn(16, 3, 2)
    np.save(tmp_path / "one.npy", latent.numpy().astype(np.float16))
    np.savez(tmp_path / "two.npz", lq_latent=latent[None].numpy(), y=np.zeros((1, 5, 40), np.float32))
    save_file({"latents": latent[None].to(torch.bfloat16)}, str(tmp_path / "three.safetensors"))
    for name in ("one.npy", "two.npz", "three.safetensors"):
        loaded = load_latents(tmp_path / name)
        assert loaded.dtype == torch.float32 and loaded.shape == (1, 16, 3, 2)
        assert torch.allclose(loaded[0], latent, atol=2e-2)  # float16 / bfloat16 rounding
    assert load_caption(tmp_path / "two.npz").shape == (1, 5, 40)  # picks 'y' among several arrays
    np.save(tmp_path / "ints.npy", np.zeros((1, 16, 3, 2), np.int32))
    with pytest.raises(InputError, match="int32, expected float16 or float32"):
        load_latents(tmp_path / "ints.npy")


def _independent_png16_read(path: Path) -> np.ndarray:
    """Decode a non-interlaced 16-bit RGB PNG whose rows use filter None or Up, with zlib alone
    (the format, not our writer)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0] == zlib.crc32(kind + body)
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    assert (depth, colour, interlace) == (16, 2, 0)
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(height, 1 + width * 6)
    filters, rows = raw[:, 0], raw[:, 1:].copy()
    assert set(filters.tolist()) <= {0, 2}, f"filter types {set(filters.tolist())}"
    for r in range(1, height):  # Up: add the (decoded) byte above, modulo 256
        if filters[r] == 2:
            rows[r] += rows[r - 1]
    return rows.view(">u2").reshape(height, width, 3).astype(np.uint16)


def test_png_outputs_are_the_rounded_image(tmp_path):
    sample = torch.linspace(-1, 1, 2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    image = ((sample + 1) / 2).permute(0, 2, 3, 1).numpy()  # [B,H,W,3] in [0,1]
    written = write_output(sample, tmp_path / "out.png")
    assert written == [tmp_path / "out_0.png", tmp_path / "out_1.png"]
    for i, path in enumerate(written):
        with Image.open(path) as png:
            assert png.mode == "RGB" and png.size == (5, 4)
            assert np.array_equal(np.asarray(png), np.round(image[i] * 255).astype(np.uint8))
    [single] = write_output(sample[:1], tmp_path / "deep.png", bit_depth=16)
    assert single == tmp_path / "deep.png"
    assert np.array_equal(_independent_png16_read(single), np.round(image[0] * 65535).astype(np.uint16))
    [npy] = write_output(sample, tmp_path / "raw.npy")
    assert np.array_equal(np.load(npy), sample.numpy())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep.png", "out_0.png", "out_1.png", "raw.npy"]


def test_a_failed_write_leaves_nothing(tmp_path):
    (tmp_path / "out_1.png").mkdir()  # the second item's name is taken by a directory
    with pytest.raises(OSError):
        write_output(torch.zeros(2, 3, 4, 4), tmp_path / "out.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out_1.png"]
    assert not any((tmp_path / "out_1.png").iterdir())
