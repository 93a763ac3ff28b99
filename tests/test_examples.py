"""examples/: each family's script end to end on CPU, with a tiny randomly initialised diffusers
pipeline (built from configs, no download, prompt_embeds instead of a text encoder) and a tiny
exported PiD (a golden network). The saved image must equal `pid-run --pipeline` on the same
latent and seed, and `pid-run` on the latent unpacked by diffusers' own functions."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from exports import REPO, export_cases, export_root  # noqa: F401 (fixture)
from PIL import Image

from pid_runtime import PidDecoder
from pid_runtime.cli import main

diffusers = pytest.importorskip("diffusers", reason="the examples need diffusers (pip install 'pid-export[diffusers]')")
from diffusers import (AutoencoderKL, AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler,  # noqa: E402
                       Flux2KleinPipeline, Flux2Pipeline, Flux2Transformer2DModel, FluxPipeline,
                       FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline)

HEIGHT, WIDTH = 64, 96  # pipeline image: 16-ch latent 8x12, Flux2 4x6 -> PiD output 256x384
SEED = 7
TEXT_DIM = 32  # the tiny pipelines' prompt embedding width
CAPTION_SHAPE = (1, 12, 40)  # the golden PiD networks' caption: 12 tokens of 40 dims
VAE_BLOCKS = dict(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=4)


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# Tiny pipelines: the real diffusers classes with small random weights (8x VAEs, one block each).

def tiny_flux():
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TEXT_DIM,
                                         pooled_projection_dim=TEXT_DIM, axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKL(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, **VAE_BLOCKS)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    return pipe, dict(prompt_embeds=randn(1, 7, TEXT_DIM), pooled_prompt_embeds=randn(1, TEXT_DIM, seed=1))


def tiny_sd3():
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=16, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=TEXT_DIM,
                                        caption_projection_dim=16, pooled_projection_dim=TEXT_DIM, out_channels=16)
    vae = AutoencoderKL(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, **VAE_BLOCKS)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)
    return pipe, dict(prompt_embeds=randn(1, 7, TEXT_DIM), pooled_prompt_embeds=randn(1, TEXT_DIM, seed=1),
                      guidance_scale=1.0)


def tiny_flux2(pipeline_class):
    torch.manual_seed(0)
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=128, num_layers=1, num_single_layers=1,
                                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TEXT_DIM,
                                          axes_dims_rope=(4, 4, 4, 4))
    vae = AutoencoderKLFlux2(latent_channels=32, **VAE_BLOCKS)
    vae.bn.running_mean.normal_()  # non-trivial batch-norm statistics
    vae.bn.running_var.uniform_(0.5, 2.0)
    pipe = pipeline_class(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                          transformer=transformer)
    extra = dict(guidance_scale=1.0) if pipeline_class is Flux2KleinPipeline else {}
    return pipe, dict(prompt_embeds=randn(1, 7, TEXT_DIM), **extra)


# How diffusers itself turns each pipeline output into the network's [B,C,h,w] latent.

def unpack_flux(pipe, latents):
    return FluxPipeline._unpack_latents(latents, HEIGHT, WIDTH, pipe.vae_scale_factor)


def unpack_flux2(pipe, latents):
    ids = Flux2Pipeline._prepare_latent_ids(torch.zeros(latents.shape[0], 1, HEIGHT // 16, WIDTH // 16))
    unpacked = Flux2Pipeline._unpack_latents_with_ids(latents, ids)
    return unpacked if isinstance(unpacked, torch.Tensor) else torch.stack(unpacked)


def normalise_klein(pipe, latents):
    bn = pipe.vae.bn
    std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
    return (Flux2KleinPipeline._patchify_latents(latents) - bn.running_mean.view(1, -1, 1, 1)) / std


# id: (example script, backbone, golden PiD network, tiny pipeline, diffusers' reference conversion)
FAMILIES = {
    "flux": ("flux", "flux", "tiny_v1_16ch_sr4", tiny_flux, unpack_flux),
    "sd3": ("sd3", "sd3", "tiny_v1_16ch_sr4", tiny_sd3, lambda pipe, latents: latents),
    "flux2-dev": ("flux2", "flux2", "tiny_v1pt5_128ch_unpatchify2", lambda: tiny_flux2(Flux2Pipeline), unpack_flux2),
    "flux2-klein": ("flux2", "flux2-klein-4b", "tiny_v1pt5_128ch_unpatchify2",
                    lambda: tiny_flux2(Flux2KleinPipeline), normalise_klein),
}


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.mark.heavy
@pytest.mark.parametrize("family", list(FAMILIES))
def test_example_decodes_like_pid_run(family, export_root, tmp_path, capfd):  # noqa: F811
    script, backbone, case, build, reference = FAMILIES[family]
    export_dir = export_cases([case])[case]
    pipe, pipe_kwargs = build()
    caption = randn(*CAPTION_SHAPE, seed=2)
    np.save(tmp_path / "y.npy", caption.numpy())

    with PidDecoder.from_export(export_dir, device="cpu") as decoder:
        latents, images = load_example(script).generate(
            pipe, decoder, str(tmp_path / "example.png"), caption_embeds=caption, height=HEIGHT, width=WIDTH,
            seed=SEED, num_inference_steps=2, **pipe_kwargs)
    example = pixels(tmp_path / "example.png")
    assert example.shape == (HEIGHT * 4, WIDTH * 4, 3) and example.std() > 0
    assert np.array_equal(example, np.asarray(images[0]))

    # pid-run on the latent exactly as the pipeline returned it
    np.save(tmp_path / "latents.npy", latents.numpy())
    extra = []
    if backbone.startswith("flux2-klein"):
        pipe.vae.save_pretrained(tmp_path / "vae")  # the VAE's own weights file carries the batch-norm statistics
        extra = ["--vae-bn-stats", tmp_path / "vae" / "diffusion_pytorch_model.safetensors"]
    common = ["--caption-embeds", tmp_path / "y.npy", "--seed", SEED]
    code = main([str(a) for a in [export_dir, tmp_path / "latents.npy", "--pipeline", backbone, "--ldm-size",
                                  f"{HEIGHT}x{WIDTH}", *common, *extra, "--out", tmp_path / "pid_run.png"]])
    assert code == 0, capfd.readouterr().err
    assert np.array_equal(example, pixels(tmp_path / "pid_run.png"))

    # ... and on the latent converted by diffusers' own functions, without --pipeline
    np.save(tmp_path / "reference.npy", reference(pipe, latents).numpy())
    code = main([str(a) for a in [export_dir, tmp_path / "reference.npy", *common, "--out", tmp_path / "ref.png"]])
    assert code == 0, capfd.readouterr().err
    assert np.array_equal(example, pixels(tmp_path / "ref.png"))
