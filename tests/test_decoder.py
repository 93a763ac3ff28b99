"""PidDecoder and `pid-run --pipeline` on golden exports: same decode as pid-run on the unpacked
latent, the backend reused across calls, and one clear line for latents that fit no layout."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from exports import export_cases, export_root, golden_tensors  # noqa: F401 (fixture)

from pid_runtime import PidDecoder
from pid_runtime.caption import CaptionError
from pid_runtime.cli import main
from pid_runtime.io import pixel_rows
from pid_runtime.latents import LatentError
from pid_runtime.metadata import EMPTY_CAPTION_NAME

CASE = "tiny_v1_16ch_sr4_b2"  # 16-ch latents [2,16,3,2] at 1/8 -> 2 x 96x64 px; caption [2,9,40]
SDXL_CASE = "tiny_v1_4ch_sdxl"  # 4-ch latents [1,4,2,2] -> 64x64 px


def pack_flux(x: torch.Tensor) -> torch.Tensor:
    """FluxPipeline's 2x2 token packing (diffusers is the reference in test_latents; kept dependency-free here)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


@pytest.fixture(scope="module")
def export_dir(export_root: Path) -> Path:  # noqa: F811
    return export_cases([CASE])[CASE]


@pytest.fixture
def inputs(tmp_path: Path) -> dict:
    """A flux-style latent [2,16,4,2] (even, so it packs) and the golden captions, on disk and in memory."""
    golden = golden_tensors(CASE)
    latent = torch.randn(2, 16, 4, 2, generator=torch.Generator().manual_seed(0))
    files = {"latent": tmp_path / "latent.npy", "packed": tmp_path / "packed.npy", "y": tmp_path / "y.npy"}
    np.save(files["latent"], latent.numpy())
    np.save(files["packed"], pack_flux(latent).numpy())
    np.save(files["y"], golden["y"].numpy())
    return dict(files, latent_t=latent, y_t=golden["y"], dir=tmp_path)


def pid_run(*args, capfd=None) -> tuple[int, str]:
    code = main([str(a) for a in args])
    err = capfd.readouterr().err if capfd is not None else ""
    return code, err


def test_pid_run_pipeline_unpacks_like_the_unpacked_latent(export_dir, inputs, capfd):
    out = inputs["dir"]
    assert pid_run(export_dir, inputs["latent"], "--caption-embeds", inputs["y"], "--sigma", "0,0.3",
                   "--out", out / "plain.npy", capfd=capfd)[0] == 0
    # 4x2 latent cells of an 8x pipeline: a 32x16 px pipeline image
    code, err = pid_run(export_dir, inputs["packed"], "--pipeline", "flux", "--ldm-size", "32x16", "--caption-embeds",
                        inputs["y"], "--sigma", "0,0.3", "--out", out / "packed.npy", capfd=capfd)
    assert code == 0, err
    assert np.array_equal(np.load(out / "plain.npy"), np.load(out / "packed.npy"))
    # one item saved without its batch axis: [tokens, 64]
    np.save(out / "one.npy", pack_flux(inputs["latent_t"])[1].numpy())
    np.save(out / "y1.npy", inputs["y_t"][1:].numpy())
    code, err = pid_run(export_dir, out / "one.npy", "--pipeline", "zimage", "--ldm-size", "32x16", "--caption-embeds",
                        out / "y1.npy", "--sigma", "0.3", "--out", out / "one_out.npy", capfd=capfd)
    assert code == 0, err
    np.save(out / "one_plain.npy", inputs["latent_t"][1].numpy())  # [C,h,w]
    assert pid_run(export_dir, out / "one_plain.npy", "--caption-embeds", out / "y1.npy", "--sigma", "0.3",
                   "--out", out / "one_ref.npy", capfd=capfd)[0] == 0
    assert np.array_equal(np.load(out / "one_out.npy"), np.load(out / "one_ref.npy"))


@pytest.mark.parametrize("args,fragments", [
    (["--pipeline", "flux"], ["--ldm-size HxW"]),
    (["--pipeline", "flux", "--ldm-size", "64x16"], ["hold 2 tokens", "4x1 = 4"]),
    (["--pipeline", "sd3", "--ldm-size", "32x16"], ["[2, 2, 64] fit no sd3 layout", "accepted: [B, 16, H/8, W/8]"]),
    (["--pipeline", "flux2-klein-4b"], ["flux2-klein-4b (flux2) latents have 128 channels", "takes 16"]),
    (["--pipeline", "flux", "--ldm-size", "32"], ["HEIGHTxWIDTH"]),
    (["--ldm-size", "32x16"], ["add --pipeline"]),
    (["--pipeline", "flux", "--vae-bn-stats", "bn.safetensors"], ["flux latents need none"]),
    (["--pipeline", "flux3"], ["'flux3' is not one of", "zimage"]),
])
def test_pid_run_pipeline_errors_are_one_line(args, fragments, export_dir, inputs, capfd):
    code, err = pid_run(export_dir, inputs["packed"], *args, "--caption-embeds", inputs["y"],
                        "--out", inputs["dir"] / "x.png", capfd=capfd)
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and lines[0].startswith("pid-run: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not (inputs["dir"] / "x.png").exists()


def test_pid_run_sdxl_sigma_is_mapped_to_the_training_frame(export_root, tmp_path, capfd):  # noqa: F811
    export = export_cases([SDXL_CASE])[SDXL_CASE]
    golden = golden_tensors(SDXL_CASE)
    np.save(tmp_path / "y.npy", golden["y"].numpy())
    np.save(tmp_path / "euler.npy", golden["lq_latent"].numpy())
    np.save(tmp_path / "vp.npy", (golden["lq_latent"] / 10 ** 0.5).numpy())  # x / sqrt(3^2 + 1)
    common = ["--caption-embeds", tmp_path / "y.npy", "--seed", "3"]
    assert pid_run(export, tmp_path / "euler.npy", "--pipeline", "sdxl", "--sigma", "3", *common,
                   "--out", tmp_path / "a.npy", capfd=capfd)[0] == 0
    assert pid_run(export, tmp_path / "vp.npy", "--sigma", str(3 / 10 ** 0.5), *common,
                   "--out", tmp_path / "b.npy", capfd=capfd)[0] == 0
    np.testing.assert_allclose(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"), rtol=0, atol=1e-6)
    code, err = pid_run(export, tmp_path / "euler.npy", "--sigma", "3", *common, "--out", tmp_path / "c.npy",
                        capfd=capfd)
    assert code == 1 and "within [0, 1]" in err  # without --pipeline, sigma is PiD's own


def test_decoder_matches_pid_run_and_reuses_its_backend(export_dir, inputs, capfd):
    out = inputs["dir"]
    assert pid_run(export_dir, inputs["latent"], "--caption-embeds", inputs["y"], "--sigma", "0,0.3", "--seed", "5",
                   "--out", out / "ref.npy", capfd=capfd)[0] == 0
    reference = torch.from_numpy(np.load(out / "ref.npy"))
    with PidDecoder.from_export(export_dir, device="cpu", backbone="flux") as decoder:
        backend = decoder.backend
        session = backend.session
        packed = pack_flux(inputs["latent_t"])
        kwargs = dict(caption_embeds=inputs["y_t"], sigma=[0.0, 0.3], seed=5, height=32, width=16)
        tensor = decoder.decode(packed, output_type="pt", **kwargs)
        torch.testing.assert_close(tensor, (reference + 1) / 2, rtol=0, atol=0)
        pil = decoder.decode(packed, **kwargs)  # default: a list of PIL images, as pid-run writes them
        assert [np.asarray(im).tolist() for im in pil] == [pixel_rows(item, 8, slice(None)).tolist() for item in reference]
        array = decoder.decode(inputs["latent_t"], output_type="np", **kwargs)
        assert array.shape == (2, 128, 64, 3) and np.array_equal(array, tensor.permute(0, 2, 3, 1).numpy())
        other = decoder.decode(packed, output_type="pt", **dict(kwargs, seed=6))
        assert not torch.equal(other, tensor)
        assert pid_run(export_dir, inputs["latent"], "--caption-embeds", inputs["y"], "--sigma", "0,0.3", "--seed",
                       "5", "--size", "112x64", "--out", out / "sized.npy", capfd=capfd)[0] == 0
        sized = decoder.decode(packed, output_type="pt", size=(112, 64), **kwargs)  # pid-run --size's equal
        assert sized.shape == (2, 3, 112, 64)
        torch.testing.assert_close(sized, (torch.from_numpy(np.load(out / "sized.npy")) + 1) / 2, rtol=0, atol=0)
        assert decoder.backend is backend and backend.session is session  # one session for every decode
        assert decoder.last_timings is not None and decoder.last_timings.total > 0


def test_decoder_inputs_and_errors(export_dir, inputs, tmp_path):
    packed = pack_flux(inputs["latent_t"])
    with PidDecoder.from_export(export_dir, device="cpu") as decoder:  # custom network: no backbone known
        assert decoder.backbone is None
        with pytest.raises(LatentError, match="pass backbone="):
            decoder.decode(packed, caption_embeds=inputs["y_t"])
        plain = decoder.decode(inputs["latent_t"], caption_embeds=inputs["y_t"], output_type="pt")  # taken as is
        with pytest.raises(LatentError, match="sdxl latents have 4 channels"):
            decoder.decode(inputs["latent_t"], caption_embeds=inputs["y_t"], backbone="sdxl")
        with pytest.raises(ValueError, match="either prompt or caption_embeds"):
            decoder.decode(inputs["latent_t"], prompt="a cat", caption_embeds=inputs["y_t"])
        with pytest.raises(ValueError, match="output_type"):
            decoder.decode(inputs["latent_t"], caption_embeds=inputs["y_t"], output_type="latent")
        with pytest.raises(CaptionError, match=EMPTY_CAPTION_NAME):
            decoder.decode(inputs["latent_t"])
    # With the export's empty caption stored, no caption means that one.
    export_copy = tmp_path / "export"
    shutil.copytree(export_dir, export_copy)
    np.save(export_copy / EMPTY_CAPTION_NAME, inputs["y_t"][:1].numpy())
    with PidDecoder.from_export(export_copy, device="cpu", backbone="sd3") as decoder:
        unconditional = decoder.decode(inputs["latent_t"], output_type="pt")
        expected = decoder.decode(inputs["latent_t"], caption_embeds=inputs["y_t"][:1], output_type="pt")
        assert torch.equal(unconditional, expected) and not torch.equal(unconditional, plain)
    with pytest.raises(LatentError, match="16 channels"):
        PidDecoder.from_export(export_dir, device="cpu", backbone="dinov2")
