"""Random sweep of pid_runtime.latents against diffusers: every backbone and alias, random batch,
grid and image sizes (often not multiples of 16: diffusers rounds them down), float32/16/bf16,
plus the latents real (tiny, random) Qwen-Image, Z-Image and SDXL pipelines return.

This began as the held-out check of issue 11 (run once before it became a test)."""

from __future__ import annotations

import random

import pytest
import torch

from pid_runtime.latents import BACKBONE_NAMES, BatchNormStats, from_pipeline, layout_for, to_training_frame

pytest.importorskip("diffusers", reason="the packing reference: pip install 'pid-export[diffusers]'")
from diffusers import (AutoencoderKL, AutoencoderKLQwenImage, DDPMScheduler, EulerDiscreteScheduler,  # noqa: E402
                       FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline, FluxPipeline,
                       QwenImagePipeline, QwenImageTransformer2DModel, StableDiffusionXLPipeline,
                       UNet2DConditionModel, ZImagePipeline, ZImageTransformer2DModel)

TRIALS = 8  # per backbone name
SDXL_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
TINY_VAE = dict(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=4)


def pipeline_image_size(rng: random.Random, cells: int, unit: int) -> int:
    """An image side of `cells` whole latent units of `unit` px plus a remainder the pipelines round away."""
    return cells * unit + rng.randrange(unit)


def check_layout(rng: random.Random, name: str) -> torch.Tensor:
    """One random latent packed the way the backbone's pipeline packs it; returns the network latent."""
    layout = layout_for(name)
    batch = rng.randint(1, 4)
    dtype = rng.choice([torch.float32, torch.float16, torch.bfloat16])
    rows, cols = rng.randint(1, 24), rng.randint(1, 24)
    if layout.token_cells == 2:  # flux, zimage*, qwenimage
        height, width = pipeline_image_size(rng, rows, 16), pipeline_image_size(rng, cols, 16)
        x = torch.randn(batch, 16, 2 * rows, 2 * cols).to(dtype)
        if layout.backbone == "qwenimage":
            packed = QwenImagePipeline._pack_latents(x[:, :, None], batch, 16, 2 * rows, 2 * cols)
            reference = QwenImagePipeline._unpack_latents(packed, height, width, 8)[:, :, 0]
        else:
            packed = FluxPipeline._pack_latents(x, batch, 16, 2 * rows, 2 * cols)
            reference = FluxPipeline._unpack_latents(packed, height, width, 8)
        out = from_pipeline(packed, name, height, width)
        assert torch.equal(out, reference.float()) and torch.equal(out, x.float())
        assert torch.equal(from_pipeline(x, name, height, width), x.float())  # unpacked (Z-Image's own output)
    elif layout.backbone == "flux2":
        height, width = pipeline_image_size(rng, rows, 16), pipeline_image_size(rng, cols, 16)
        x = torch.randn(batch, 128, rows, cols).to(dtype)
        packed = Flux2Pipeline._pack_latents(x)
        reference = Flux2KleinPipeline._unpack_latents_with_ids(packed, Flux2Pipeline._prepare_latent_ids(x), rows, cols)
        reference = reference if isinstance(reference, torch.Tensor) else torch.stack(reference)
        out = from_pipeline(packed, name, height, width)
        assert torch.equal(out, reference.float()) and torch.equal(out, x.float())
        # Klein's raw latent of the same image, batch-norm statistics drawn at random
        mean, var, eps = torch.randn(128), torch.rand(128) * 3 + 0.05, rng.choice([1e-4, 1e-5, 1e-3])
        std = torch.sqrt(var.view(1, -1, 1, 1) + eps)
        raw = Flux2KleinPipeline._unpatchify_latents(x.float() * std + mean.view(1, -1, 1, 1))
        normalised = (Flux2Pipeline._patchify_latents(raw) - mean.view(1, -1, 1, 1)) / std
        out_raw = from_pipeline(raw, name, height, width, bn_stats=BatchNormStats(mean, var, eps))
        assert torch.equal(out_raw, normalised)
        torch.testing.assert_close(out_raw, x.float(), rtol=1e-4, atol=1e-4)
    else:  # sd3, sdxl, dinov2, siglip
        d = layout.down_factor
        x = torch.randn(batch, layout.channels, rows, cols).to(dtype)
        out = from_pipeline(x, name, pipeline_image_size(rng, rows, d), pipeline_image_size(rng, cols, d))
        assert torch.equal(out, x.float())
    return out


def check_frame(rng: random.Random, name: str, latents: torch.Tensor) -> None:
    batch = latents.shape[0]
    if not layout_for(name).euler_frame:
        flow = FlowMatchEulerDiscreteScheduler(shift=rng.choice([1.0, 3.0]))
        flow.set_timesteps(rng.randint(2, 50))
        k = rng.randrange(len(flow.timesteps))
        x_t = flow.scale_noise(latents, flow.timesteps[k : k + 1], torch.randn_like(latents))
        out, sigma = to_training_frame(x_t, float(flow.sigmas[k]), name)
        assert out is x_t and sigma == float(flow.sigmas[k])
        return
    # DDPM has integer timesteps only, so the Euler schedules compared are the integer ones ("leading",
    # "trailing"); "linspace" interpolates sigma between timesteps and has no DDPM twin.
    euler = EulerDiscreteScheduler(**SDXL_SCHEDULE, timestep_spacing=rng.choice(["leading", "trailing"]),
                                   steps_offset=1)
    euler.set_timesteps(rng.randint(5, 60))
    ddpm = DDPMScheduler(**SDXL_SCHEDULE)
    x0, eps = torch.randn(batch, 4, 6, 5), torch.randn(batch, 4, 6, 5)
    index = [rng.randrange(len(euler.timesteps)) for _ in range(batch)]
    t = euler.timesteps[index]
    x_eu = torch.cat([euler.add_noise(x0[i : i + 1], eps[i : i + 1], t[i : i + 1]) for i in range(batch)])
    x_vp, sigma_vp = to_training_frame(x_eu, [float(euler.sigmas[i]) for i in index], name)
    torch.testing.assert_close(x_vp, ddpm.add_noise(x0, eps, t.long()), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sigma_vp.double(), (1 - ddpm.alphas_cumprod[t.long()].double()).sqrt(), rtol=1e-5,
                               atol=0)


@pytest.mark.parametrize("name", BACKBONE_NAMES)
def test_random_layouts_and_frames_match_diffusers(name):
    rng = random.Random(f"sweep-{name}")
    torch.manual_seed(rng.randrange(1 << 30))
    for _ in range(TRIALS):
        check_frame(rng, name, check_layout(rng, name))


# ---------------------------------------------------------------------------
# What real pipelines return (tiny random ones, batch 2, an 80x48 image)

HEIGHT, WIDTH, BATCH = 80, 48, 2


def generator() -> torch.Generator:
    return torch.Generator().manual_seed(1)


def test_qwenimage_pipeline_output_and_intermediate_latents():
    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=1,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                              axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                             transformer=transformer)
    captured = []
    out = pipe(prompt_embeds=torch.randn(BATCH, 7, 32), prompt_embeds_mask=torch.ones(BATCH, 7, dtype=torch.long),
               height=HEIGHT, width=WIDTH, num_inference_steps=3, true_cfg_scale=1.0, output_type="latent",
               generator=generator(),
               callback_on_step_end=lambda p, i, t, kw: captured.append(kw["latents"].clone()) or kw).images
    for latents in (out, captured[0]):
        assert latents.shape == (BATCH, (HEIGHT // 16) * (WIDTH // 16), 64)
        reference = QwenImagePipeline._unpack_latents(latents, HEIGHT, WIDTH, pipe.vae_scale_factor)[:, :, 0]
        assert torch.equal(from_pipeline(latents, "qwenimage", HEIGHT, WIDTH), reference)


def test_zimage_pipeline_output():
    torch.manual_seed(0)
    transformer = ZImageTransformer2DModel(in_channels=16, dim=32, n_layers=1, n_refiner_layers=1, n_heads=2,
                                           n_kv_heads=2, cap_feat_dim=16, axes_dims=[4, 6, 6], axes_lens=[64, 64, 64])
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=AutoencoderKL(latent_channels=16, **TINY_VAE),
                          text_encoder=None, tokenizer=None, transformer=transformer)
    out = pipe(prompt_embeds=[torch.randn(7, 16) for _ in range(BATCH)], height=HEIGHT, width=WIDTH,
               num_inference_steps=2, guidance_scale=0.0, output_type="latent", generator=generator()).images
    assert out.shape == (BATCH, 16, HEIGHT // 8, WIDTH // 8)
    assert torch.equal(from_pipeline(out, "zimage-turbo", HEIGHT, WIDTH), out)


def test_sdxl_pipeline_intermediate_latent_in_euler_frame():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=6 * 8 + 24, cross_attention_dim=32,
                                norm_num_groups=4)
    scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULE, timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=AutoencoderKL(latent_channels=4, **TINY_VAE), text_encoder=None,
                                     text_encoder_2=None, tokenizer=None, tokenizer_2=None, unet=unet,
                                     scheduler=scheduler)
    captured = {}

    def capture(p, i, t, kwargs):
        if i == 0:  # after step i the latent sits at sigmas[step_index]
            captured.update(latents=kwargs["latents"].clone(), sigma=float(p.scheduler.sigmas[p.scheduler.step_index]))
        return kwargs

    out = pipe(prompt_embeds=torch.randn(BATCH, 7, 32), pooled_prompt_embeds=torch.randn(BATCH, 24), height=HEIGHT,
               width=WIDTH, num_inference_steps=4, guidance_scale=1.0, output_type="latent", generator=generator(),
               callback_on_step_end=capture).images
    assert torch.equal(from_pipeline(out, "sdxl", HEIGHT, WIDTH), out)
    sigma = captured["sigma"]
    assert sigma > 1  # Euler's variance-exploding sigma: outside PiD's [0, 1]
    x, sigma_vp = to_training_frame(from_pipeline(captured["latents"], "sdxl", HEIGHT, WIDTH), sigma, "sdxl")
    torch.testing.assert_close(x, captured["latents"] / (sigma ** 2 + 1) ** 0.5)
    assert 0 < sigma_vp < 1 and sigma_vp == pytest.approx(sigma / (sigma ** 2 + 1) ** 0.5)
