"""Registry of the released PiD checkpoints: one declarative entry per backbone x variant.

Like Optimum's exporter registries, everything the exporter needs to know about a
release is written here in code (the package never reads `shared/` at runtime):
where the checkpoint lives in the `nvidia/PiD` hub repo, the network settings, the
latent layout, and the output sizes the checkpoint was trained on (used for
TensorRT optimisation profiles and for warnings about untrained sizes).

Sizes are `(height, width)` in output pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from .config import PidConfig

HUB_REPO = "nvidia/PiD"
# Said once where a user decides to deploy (pid-export's closing lines, README's deploy notes).
WEIGHTS_LICENCE_NOTE = (f"licence: the PiD weights ({HUB_REPO}) are under NVIDIA's non-commercial research licence "
                        "(terms on the model card); ONNX files and engines made from them are derivatives of the "
                        "weights, under the same terms")
CHECKPOINT_FILENAME = "model_ema_bf16.pth"

VARIANT_2K = "2k"
VARIANT_2KTO4K = "2kto4k"
VARIANT_2KTO4K_V15 = "2kto4k-v1.5"
VARIANTS = (VARIANT_2K, VARIANT_2KTO4K, VARIANT_2KTO4K_V15)


class UnknownReleaseError(ValueError):
    """A backbone / variant / checkpoint name that was never released."""


# ---------------------------------------------------------------------------
# Network settings: one shared base (SPEC sec. 2, "v1"), then per-release differences.

_V1_NETWORK = dict(
    in_channels=3,
    num_groups=24,
    hidden_size=1536,
    pixel_hidden_size=16,
    pixel_attn_hidden_size=1152,
    pixel_num_groups=16,
    patch_depth=14,
    pixel_depth=2,
    patch_size=16,
    txt_embed_dim=2304,
    txt_max_length=300,
    use_text_rope=True,
    text_rope_theta=10000.0,
    lq_hidden_dim=512,
    lq_num_res_blocks=4,
    lq_latent_unpatchify_factor=1,
    lq_conv_padding_mode="zeros",
    lq_gate_type="sigma_aware_per_token_per_dim",
    lq_interval=2,
    pit_lq_inject=False,
    rope_mode="ntk_aware",
    rope_ref_h=1024,
    rope_ref_w=1024,
)

# What "v1.5" changes (SPEC sec. 2).
_V15_OVERRIDES = dict(
    lq_hidden_dim=1024,
    lq_conv_padding_mode="replicate",
    lq_gate_type="sigma_aware_per_token",
    pit_lq_inject=True,
    rope_ref_h=2048,
    rope_ref_w=2048,
)


@dataclass(frozen=True)
class Backbone:
    """The latent diffusion model whose latents a PiD release decodes."""

    name: str
    latent_channels: int
    latent_down_factor: int  # LDM pixels per latent cell
    sr_factor: int  # PiD output pixels per LDM pixel
    description: str
    v15_unpatchify: int = 1  # v1.5 only: latent unpatchify factor (Flux2's 2x2 patches)


_BACKBONES = {
    b.name: b
    for b in (
        Backbone("flux", 16, 8, 4, "FLUX.1 / Z-Image (16-ch VAE latent)"),
        Backbone("flux2", 128, 16, 4, "FLUX.2 (2x2-patchified, batch-norm-normalised 128-ch latent)",
                 v15_unpatchify=2),
        Backbone("sd3", 16, 8, 4, "Stable Diffusion 3 medium (16-ch VAE latent)"),
        Backbone("dinov2", 768, 16, 4, "DINOv2-B representation autoencoder (768-ch)"),
        Backbone("siglip", 1152, 16, 8, "SigLIP-2 Scale-RAE (1152-ch, 8x super-resolution)"),
        Backbone("sdxl", 4, 8, 4, "Stable Diffusion XL (4-ch VAE latent)"),
        Backbone("qwenimage", 16, 8, 4, "Qwen-Image (16-ch VAE latent)"),
    )
}

# Other model names whose latents share a released backbone's latent space.
ALIASES = {
    "zimage": "flux",
    "zimage-turbo": "flux",
    "flux2-klein-4b": "flux2",
    "flux2-klein-9b": "flux2",
}

# ---------------------------------------------------------------------------
# Trained output sizes.
#
# `2k`: the five 2048-class aspect ratios of SPEC sec. 2. The network takes any size
# that is a multiple of the patch size (it aligns the latent to the patch grid), so
# every bucket is reachable, including SigLIP's 1728-px sides (13.5 of its 128-px
# latent cells), which the reference trained on the same way.
#
# `2kto4k`: the 2K buckets plus 4K-class buckets. The exact training bucket list is
# not published; these are representative sizes spanning what SPEC sec. 2 states
# ("2048..3840(4096) px", e.g. 3840x3840 and 4096x3072), each a multiple of 64 so
# that every 2kto4k release (pixel scale 32 or 64) can produce them.
_SIZES_2K = ((2048, 2048), (2304, 1728), (1728, 2304), (2688, 1536), (1536, 2688))
_SIZES_4K_CLASS = ((2560, 2560), (3072, 3072), (3840, 3840), (4096, 3072), (3072, 4096))
_VARIANT_SIZES = {
    VARIANT_2K: _SIZES_2K,
    VARIANT_2KTO4K: _SIZES_2K + _SIZES_4K_CLASS,
    VARIANT_2KTO4K_V15: _SIZES_2K + _SIZES_4K_CLASS,
}
_VARIANT_OPT_SIZE = {
    VARIANT_2K: (2048, 2048),
    VARIANT_2KTO4K: (3840, 3840),
    VARIANT_2KTO4K_V15: (3840, 3840),
}


@dataclass(frozen=True)
class Release:
    """One released checkpoint: `checkpoints/<name>/model_ema_bf16.pth` in `nvidia/PiD`."""

    name: str
    backbone: str
    variant: str
    network: PidConfig
    trained_sizes: tuple[tuple[int, int], ...]
    opt_size: tuple[int, int]
    hub_repo: str = HUB_REPO

    @property
    def label(self) -> str:
        """Short user-facing name, e.g. `flux2/2kto4k-v1.5`."""
        return f"{self.backbone}/{self.variant}"

    @property
    def checkpoint_file(self) -> str:
        """Path of the checkpoint inside the hub repo."""
        return f"checkpoints/{self.name}/{CHECKPOINT_FILENAME}"

    @property
    def latent_channels(self) -> int:
        """Channels of the LDM latent the user passes in (before any unpatchify)."""
        return self.network.lq_latent_channels

    @property
    def lq_input_channels(self) -> int:
        """Channels entering the first LQ conv (after the v1.5 Flux2 unpatchify)."""
        return self.network.lq_latent_channels // self.network.lq_latent_unpatchify_factor**2

    @property
    def latent_down_factor(self) -> int:
        return self.network.latent_spatial_down_factor

    @property
    def sr_factor(self) -> int:
        return self.network.sr_scale

    @property
    def pixel_scale(self) -> int:
        """Output pixels per latent cell: output sizes are multiples of this."""
        return self.network.pixel_scale

    @property
    def is_v15(self) -> bool:
        return self.network.pit_lq_inject

    @property
    def has_aux_rgb_head(self) -> bool:
        """v1.5 files carry the training-only `lq_proj.lq_aux_rgb_head.*` weights."""
        return self.is_v15

    @property
    def min_size(self) -> tuple[int, int]:
        return (min(h for h, _ in self.trained_sizes), min(w for _, w in self.trained_sizes))

    @property
    def max_size(self) -> tuple[int, int]:
        return (max(h for h, _ in self.trained_sizes), max(w for _, w in self.trained_sizes))


def _release(backbone: str, variant: str, name: str) -> Release:
    bb = _BACKBONES[backbone]
    network = dict(_V1_NETWORK, lq_latent_channels=bb.latent_channels,
                   latent_spatial_down_factor=bb.latent_down_factor, sr_scale=bb.sr_factor)
    if variant == VARIANT_2KTO4K_V15:
        network.update(_V15_OVERRIDES, lq_latent_unpatchify_factor=bb.v15_unpatchify)
    cfg = PidConfig.from_dict(network)
    return Release(name=name, backbone=backbone, variant=variant, network=cfg,
                   trained_sizes=_VARIANT_SIZES[variant], opt_size=_VARIANT_OPT_SIZE[variant])


# Every released checkpoint (SPEC sec. 2 table). Names are the hub directory names.
_RELEASES: tuple[Release, ...] = (
    _release("flux", "2k", "PiD_res2k_sr4x_official_flux_distill_4step"),
    _release("flux", "2kto4k", "PiD_res2kto4k_sr4x_official_flux_distill_4step"),
    _release("flux", "2kto4k-v1.5", "PiD_v1pt5_res2kto4k_sr4x_official_flux_distill_4step"),
    _release("flux2", "2k", "PiD_res2k_sr4x_official_flux2_distill_4step"),
    _release("flux2", "2kto4k", "PiD_res2kto4k_sr4x_official_flux2_distill_4step"),
    _release("flux2", "2kto4k-v1.5", "PiD_v1pt5_res2kto4k_sr4x_official_flux2_distill_4step"),
    _release("sd3", "2k", "PiD_res2k_sr4x_official_sd3_distill_4step"),
    _release("sd3", "2kto4k", "PiD_res2kto4k_sr4x_official_sd3_distill_4step"),
    _release("dinov2", "2k", "PiD_res2k_sr4x_official_dinov2_distill_4step"),
    _release("siglip", "2k", "PiD_res2k_sr8x_official_siglip_distill_4step"),
    _release("sdxl", "2kto4k", "PiD_res2kto4k_sr4x_official_sdxl_distill_4step"),
    _release("qwenimage", "2kto4k-v1.5", "PiD_v1pt5_res2kto4k_sr4x_official_qwenimage_distill_4step"),
)
_BY_PAIR = {(r.backbone, r.variant): r for r in _RELEASES}
_BY_NAME = {r.name: r for r in _RELEASES}


# ---------------------------------------------------------------------------
# Lookup


def all_releases() -> tuple[Release, ...]:
    return _RELEASES


def backbone_names() -> tuple[str, ...]:
    """Released backbones, then aliases (what `--backbone` accepts)."""
    return tuple(_BACKBONES) + tuple(ALIASES)


def variant_names() -> tuple[str, ...]:
    return VARIANTS


def backbone_info(backbone: str) -> Backbone:
    return _BACKBONES[canonical_backbone(backbone)]


def canonical_backbone(backbone: str) -> str:
    """Lower-case and resolve aliases; only the listed aliases are accepted, nothing is guessed."""
    key = backbone.strip().lower()
    key = ALIASES.get(key, key)
    if key not in _BACKBONES:
        raise UnknownReleaseError(f"unknown PiD backbone {backbone!r}; {released_pairs_text()}")
    return key


def get_release(backbone: str, variant: str) -> Release:
    key = canonical_backbone(backbone)
    wanted = variant.strip().lower()
    release = _BY_PAIR.get((key, wanted))
    if release is None:
        shown = repr(backbone) if key == backbone.strip().lower() else f"{backbone!r} (alias of {key!r})"
        raise UnknownReleaseError(f"no PiD release for backbone {shown} variant {variant!r}; "
                                  f"{released_pairs_text()}")
    return release


def release_by_name(name: str) -> Release:
    """Look a release up by its checkpoint directory name."""
    release = _BY_NAME.get(name.strip().strip("/"))
    if release is None:
        raise UnknownReleaseError(f"no PiD release named {name!r}; released: {', '.join(_BY_NAME)}")
    return release


def variants_of(backbone: str) -> tuple[str, ...]:
    """The released variants of a backbone (or alias); UnknownReleaseError for an unknown one."""
    key = canonical_backbone(backbone)
    return tuple(r.variant for r in _RELEASES if r.backbone == key)


def is_released(release: Release) -> bool:
    """True for an entry of the release table (not the demo's built-in model or a custom network)."""
    return _BY_NAME.get(release.name) is release


def variant_sides(backbone: str) -> dict[str, tuple[int, int]]:
    """{variant: (shortest, longest) trained side in px} of a backbone's releases: what an export
    records so the runtime can name the release that covers a size outside its own range."""
    key = canonical_backbone(backbone)
    return {r.variant: (min(min(s) for s in r.trained_sizes), max(max(s) for s in r.trained_sizes))
            for r in _RELEASES if r.backbone == key}


def released_pairs_text() -> str:
    """`released: flux: 2k, 2kto4k, 2kto4k-v1.5; ...; aliases: zimage -> flux, ...`."""
    per_backbone = "; ".join(
        f"{b}: {', '.join(r.variant for r in _RELEASES if r.backbone == b)}" for b in _BACKBONES
    )
    aliases = ", ".join(f"{a} -> {b}" for a, b in ALIASES.items())
    return f"released: {per_backbone}; aliases: {aliases}"


# ---------------------------------------------------------------------------
# Reverse lookup by latent layout (used to say which release a checkpoint fits)


def releases_with_lq_layout(lq_input_channels: int, lq_hidden_dim: int | None = None,
                            v15: bool | None = None) -> tuple[Release, ...]:
    """Releases whose first LQ conv takes `lq_input_channels` channels (and match the other filters).

    `lq_input_channels` is what a checkpoint file shows (`lq_proj.latent_proj.0.weight`
    dim 1): the latent channels after the v1.5 Flux2 unpatchify (128 / 2**2 = 32).
    """
    return tuple(
        r for r in _RELEASES
        if r.lq_input_channels == lq_input_channels
        and (lq_hidden_dim is None or r.network.lq_hidden_dim == lq_hidden_dim)
        and (v15 is None or r.is_v15 == v15)
    )


def labels_text(releases: Iterable[Release]) -> str:
    """`flux/2k, flux/2kto4k, sd3/2k`: a readable list of release labels."""
    return ", ".join(r.label for r in releases)
