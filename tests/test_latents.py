"""pid_runtime.latents against diffusers' own packing, the release registry and the SDXL frame change."""

from __future__ import annotations

import json

import pytest
import torch

from pid_export import releases
from pid_runtime.latents import (ALIASES, BACKBONE_NAMES, LAYOUTS, BatchNormStats, LatentError, check_backbone_fits,
                                 from_pipeline, layout_for, parse_image_size, to_training_frame)

diffusers = pytest.importorskip("diffusers", reason="the packing reference: pip install 'pid-export[diffusers]'")
from diffusers import (AutoencoderKLFlux2, DDPMScheduler, EulerDiscreteScheduler,  # noqa: E402
                       FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline, FluxPipeline,
                       QwenImagePipeline)

# (batch, latent h, latent w) of the network latent: batch > 1 and non-square included.
SHAPES = [(1, 4, 4), (2, 6, 10), (3, 12, 8)]


def network_latent(channels: int, batch: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, channels, h, w, generator=torch.Generator().manual_seed(seed))


def tiny_flux2_vae(seed: int = 0) -> AutoencoderKLFlux2:
    """A real diffusers FLUX.2 VAE (tiny) with non-trivial batch-norm statistics."""
    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                             batch_norm_eps=3e-4)
    vae.bn.running_mean.normal_()
    vae.bn.running_var.uniform_(0.2, 3.0)
    return vae


# ---------------------------------------------------------------------------
# The runtime's table agrees with the registry


def test_layout_table_agrees_with_the_release_registry():
    assert set(BACKBONE_NAMES) == set(releases.backbone_names())
    assert ALIASES == releases.ALIASES
    for name in releases.backbone_names():
        info = releases.backbone_info(name)
        layout = layout_for(name)
        assert layout.backbone == releases.canonical_backbone(name)
        assert (layout.channels, layout.down_factor) == (info.latent_channels, info.latent_down_factor), name
    for release in releases.all_releases():
        assert release.latent_channels == LAYOUTS[release.backbone].channels


def export_metadata(release):
    """pid_export.json as the exporter writes it for `release` (a registry entry, a custom network's
    registry-like description, or None), from the real network built on the meta device (no weights)."""
    from pid_export.network import PidNet
    from pid_export.onnx_export import _metadata

    network = release.network if isinstance(release, releases.Release) else releases.get_release("sd3", "2k").network
    with torch.device("meta"):
        net = PidNet(network)
    return _metadata(net, release, "bf16", 23, None, None, [], [])


def test_every_release_export_names_its_backbone_and_the_runtime_holds_latents_to_it():
    """The runtime knows an export's backbone from its metadata (written from the registry), not from its name."""
    for release in releases.all_releases():
        meta = export_metadata(release)
        assert (meta.backbone, meta.variant) == (release.backbone, release.variant)
        assert check_backbone_fits(meta, release.backbone).backbone == release.backbone
        same_layout = [b for b, layout in LAYOUTS.items() if b != release.backbone
                       and (layout.channels, layout.down_factor) == (meta.latent_channels, meta.latent_down_factor)]
        for other in same_layout:  # e.g. sd3 latents for the flux release: same shape, another latent space
            with pytest.raises(LatentError, match=f"decodes {release.backbone} latents, not {other}"):
                check_backbone_fits(meta, other)


def test_a_custom_network_export_names_no_backbone():
    class CustomRelease:  # registry-like, as the demo's built-in model: a name and sizes, no backbone
        name = "my_custom_net"
        trained_sizes = ((256, 256),)
        min_size = max_size = (256, 256)

    for release in (None, CustomRelease()):
        meta = export_metadata(release)
        assert meta.backbone is None and meta.variant is None and meta.variant_sides == {}
        assert check_backbone_fits(meta, "sd3").backbone == "sd3"  # only the latent layout is checked


# ---------------------------------------------------------------------------
# Packed layouts come back bit-exactly


@pytest.mark.parametrize("batch,h,w", SHAPES)
def test_flux_packed_tokens(batch, h, w):
    x = network_latent(16, batch, h, w)
    packed = FluxPipeline._pack_latents(x, batch, 16, h, w)  # what FluxPipeline returns for a (8h)x(8w) image
    assert torch.equal(from_pipeline(packed, "flux", height=8 * h, width=8 * w), x)
    # diffusers rounds the image size down to whole tokens, and so does from_pipeline
    odd = (8 * h + 15, 8 * w + 9)
    assert torch.equal(from_pipeline(packed, "flux", *odd), FluxPipeline._unpack_latents(packed, *odd, 8))


@pytest.mark.parametrize("batch,h,w", SHAPES)
def test_qwenimage_packed_tokens_of_a_video_latent(batch, h, w):
    x = network_latent(16, batch, h, w, seed=1)
    packed = QwenImagePipeline._pack_latents(x[:, :, None], batch, 16, h, w)
    out = from_pipeline(packed, "qwenimage", height=8 * h, width=8 * w)
    assert torch.equal(out, x)
    assert torch.equal(out, QwenImagePipeline._unpack_latents(packed, 8 * h, 8 * w, 8)[:, :, 0])
    assert torch.equal(from_pipeline(x[:, :, None], "qwenimage"), x)  # the 5-D VAE latent itself


@pytest.mark.parametrize("batch,h,w", SHAPES)
def test_flux2_tokens_in_position_id_order(batch, h, w):
    x = network_latent(128, batch, h, w, seed=2)
    packed = Flux2Pipeline._pack_latents(x)  # [B, h*w, 128]
    out = from_pipeline(packed, "flux2", height=16 * h, width=16 * w)
    assert torch.equal(out, x)
    by_ids = Flux2Pipeline._unpack_latents_with_ids(packed, Flux2Pipeline._prepare_latent_ids(x))
    by_ids = by_ids if isinstance(by_ids, torch.Tensor) else torch.stack(by_ids)  # a list in some versions
    assert torch.equal(out, by_ids)


@pytest.mark.parametrize("batch,h,w", SHAPES)
def test_flux2_klein_raw_latent_is_patchified_and_normalised_as_diffusers_does(batch, h, w):
    vae = tiny_flux2_vae()
    normalised = network_latent(128, batch, h, w, seed=3)
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    raw = Flux2KleinPipeline._unpatchify_latents(normalised * std + mean)  # what Flux2KleinPipeline returns
    assert raw.shape == (batch, 32, 2 * h, 2 * w)
    reference = (Flux2KleinPipeline._patchify_latents(raw) - mean) / std  # diffusers' own normalisation
    for stats in (vae, BatchNormStats.from_vae(vae)):
        out = from_pipeline(raw, "flux2-klein-4b", height=16 * h, width=16 * w, bn_stats=stats)
        assert torch.equal(out, reference)
    torch.testing.assert_close(out, normalised, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backbone", ["zimage", "sd3", "sdxl", "dinov2"])
def test_unpacked_layouts_are_taken_as_they_are(backbone):
    layout = layout_for(backbone)
    x = network_latent(layout.channels, 2, 6, 4)
    assert torch.equal(from_pipeline(x, backbone, height=6 * layout.down_factor, width=4 * layout.down_factor), x)
    half = from_pipeline(x.to(torch.bfloat16), backbone)
    assert half.dtype == torch.float32 and torch.equal(half, x.to(torch.bfloat16).float())


# ---------------------------------------------------------------------------
# Latents that fit no layout: one line naming the accepted ones


@pytest.mark.parametrize("backbone,shape,size,fragments", [
    ("flux", (1, 24, 32), (64, 96), ["fit no flux layout", "[B, (H/16)*(W/16), 64]", "[B, 16, H/8, W/8]"]),
    ("flux", (1, 24, 64), None, ["--ldm-size", "image size"]),
    ("flux", (1, 25, 64), (64, 96), ["25 tokens", "4x6 = 24"]),
    ("flux", (1, 16, 8, 8), (64, 96), ["8x8 cells", "8x12"]),
    ("zimage-turbo", (1, 4, 8, 8), None, ["zimage-turbo (flux)", "[B, 16, H/8, W/8]"]),
    ("flux2-klein-9b", (1, 32, 8, 12), None, ["batch-norm statistics", "--vae-bn-stats"]),
    ("flux2", (1, 32, 7, 12), None, ["even height and width"]),
    ("flux2", (1, 24, 64), (64, 96), ["fit no flux2 layout", "[B, 32, H/8, W/8]", "[B, 128, H/16, W/16]"]),
    ("qwenimage", (1, 16, 2, 8, 8), None, ["[B, 16, 1, H/8, W/8]"]),
    ("sdxl", (4, 8, 8), None, ["fit no sdxl layout", "[B, 4, H/8, W/8]"]),
])
def test_latents_that_fit_no_layout(backbone, shape, size, fragments):
    with pytest.raises(LatentError) as caught:
        from_pipeline(torch.zeros(shape), backbone, *(size or (None, None)))
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_unknown_backbone_and_bad_sizes():
    with pytest.raises(LatentError, match="unknown backbone 'flux3'.*flux2-klein-9b"):
        layout_for("flux3")
    with pytest.raises(LatentError, match="both"):
        from_pipeline(torch.zeros(1, 16, 8, 8), "sd3", height=64)
    assert parse_image_size("1024x768") == (1024, 768)
    with pytest.raises(LatentError, match="HEIGHTxWIDTH"):
        parse_image_size("1024")


# ---------------------------------------------------------------------------
# Batch-norm statistics files


def test_bn_stats_read_from_the_vaes_own_weights_file(tmp_path):
    vae = tiny_flux2_vae(seed=4)
    vae.save_pretrained(tmp_path / "vae")  # diffusion_pytorch_model.safetensors + config.json, as on the hub
    loaded = BatchNormStats.load(tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
    expected = BatchNormStats.from_vae(vae)
    assert loaded.eps == expected.eps == 3e-4  # from config.json beside the weights
    assert torch.equal(loaded.running_mean, expected.running_mean)
    assert torch.equal(loaded.running_var, expected.running_var)
    saved = BatchNormStats.load(expected.save(tmp_path / "bn.safetensors"))  # the compact file round-trips
    assert saved.eps == pytest.approx(3e-4) and torch.equal(saved.running_var, expected.running_var)


def test_bn_stats_file_problems(tmp_path):
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(LatentError, match="running_mean"):
        BatchNormStats.load(tmp_path / "other.safetensors")
    with pytest.raises(LatentError, match="does not exist"):
        BatchNormStats.load(tmp_path / "missing.safetensors")
    short = BatchNormStats(torch.zeros(64), torch.ones(64))
    with pytest.raises(LatentError, match=r"shape \[64\], expected \[128\]"):
        from_pipeline(torch.zeros(1, 32, 4, 4), "flux2", bn_stats=short)
    (tmp_path / "config.json").write_text(json.dumps({"batch_norm_eps": 1e-3}))
    save_file({"bn.running_mean": torch.zeros(128), "bn.running_var": torch.ones(128)},
              str(tmp_path / "vae.safetensors"))
    assert BatchNormStats.load(tmp_path / "vae.safetensors").eps == 1e-3


# ---------------------------------------------------------------------------
# Sampling frames


SDXL_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def test_sdxl_euler_latent_becomes_the_variance_preserving_one():
    """Euler's x0 + s*eps, mapped, equals DDPM's sqrt(a)*x0 + sqrt(1-a)*eps at the same timestep."""
    euler = EulerDiscreteScheduler(**SDXL_SCHEDULE, timestep_spacing="leading", steps_offset=1)
    euler.set_timesteps(30)
    ddpm = DDPMScheduler(**SDXL_SCHEDULE)
    gen = torch.Generator().manual_seed(5)
    x0, eps = torch.randn(1, 4, 8, 12, generator=gen), torch.randn(1, 4, 8, 12, generator=gen)
    for index in (0, 7, 29):
        t = euler.timesteps[index : index + 1]
        sigma = float(euler.sigmas[index])
        x_eu = euler.add_noise(x0, eps, t)
        x_vp, sigma_vp = to_training_frame(x_eu, sigma, "sdxl")
        alpha_bar = ddpm.alphas_cumprod[t.long()].double()
        torch.testing.assert_close(x_vp, ddpm.add_noise(x0, eps, t.long()), rtol=1e-5, atol=1e-5)
        assert isinstance(sigma_vp, float) and sigma_vp == pytest.approx(float((1 - alpha_bar).sqrt()), rel=1e-5)
    same, zero = to_training_frame(x0, 0.0, "sdxl")
    assert torch.equal(same, x0) and zero == 0.0


def test_sdxl_per_item_sigma_and_bad_sigma():
    x = torch.randn(2, 4, 8, 8)
    out, sigma = to_training_frame(x, [0.0, 3.0], "sdxl")
    assert torch.equal(out[0], x[0]) and torch.allclose(out[1], x[1] / 10 ** 0.5)
    assert torch.allclose(sigma, torch.tensor([0.0, 3 / 10 ** 0.5]))
    with pytest.raises(LatentError, match=">= 0"):
        to_training_frame(x, -1.0, "sdxl")
    with pytest.raises(LatentError, match="give 1 or 2"):
        to_training_frame(x, [1.0, 2.0, 3.0], "sdxl")


@pytest.mark.parametrize("backbone", ["flux", "flux2", "sd3", "qwenimage", "dinov2"])
def test_flow_matching_frames_are_unchanged(backbone):
    """Flow-matching schedulers already hold x_t = (1-s) x0 + s eps, PiD's frame."""
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(10)
    x0, eps = torch.randn(1, 16, 4, 4), torch.randn(1, 16, 4, 4)
    x_t = scheduler.scale_noise(x0, scheduler.timesteps[3:4], eps)
    sigma = float(scheduler.sigmas[3])
    torch.testing.assert_close(x_t, (1 - sigma) * x0 + sigma * eps)
    out, out_sigma = to_training_frame(x_t, sigma, backbone)
    assert out is x_t and out_sigma == sigma
