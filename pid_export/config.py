"""Network settings of a PiD decoder, in the reference's keyword naming.

`PidConfig.from_dict` takes the `network` dict of the golden JSON files and of
`released_checkpoints.json`. Training-only keys are accepted and ignored, so a
config copied from the reference code works unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Mapping

# Keys the reference accepts that do not change the inference network.
TRAINING_ONLY_KEYS = frozenset(
    {
        "repa_encoder_index",
        "zero_init_lq",
        "train_lq_proj_only",
        "lq_aux_rgb_head",
        "lq_aux_rgb_head_latent_block_idx",
        "lq_inject_mode",  # "controlnet" is the only released mode
        "lq_in_channels",  # 0 in every release: no LQ image branch
    }
)

GATE_TYPES = ("sigma_aware_per_token_per_dim", "sigma_aware_per_token")
PADDING_MODES = ("zeros", "replicate")


class ConfigError(ValueError):
    """A network configuration that PidNet cannot build."""


@dataclass(frozen=True)
class PidConfig:
    in_channels: int = 3
    num_groups: int = 24  # attention heads of the patch blocks
    hidden_size: int = 1536
    pixel_hidden_size: int = 16
    pixel_attn_hidden_size: int = 1152
    pixel_num_groups: int = 16  # attention heads of the pixel blocks
    patch_depth: int = 14
    pixel_depth: int = 2
    patch_size: int = 16
    txt_embed_dim: int = 2304
    txt_max_length: int = 300
    use_text_rope: bool = True
    text_rope_theta: float = 10000.0
    lq_latent_channels: int = 16
    lq_hidden_dim: int = 512
    lq_num_res_blocks: int = 4
    lq_latent_unpatchify_factor: int = 1
    lq_conv_padding_mode: str = "zeros"
    lq_gate_type: str = "sigma_aware_per_token_per_dim"
    lq_interval: int = 2
    sr_scale: int = 4
    latent_spatial_down_factor: int = 8
    pit_lq_inject: bool = False
    rope_mode: str = "ntk_aware"
    rope_ref_h: int = 1024
    rope_ref_w: int = 1024

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PidConfig":
        if not isinstance(d, Mapping):
            raise ConfigError(f"network config must be a JSON object, got {type(d).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(known) - TRAINING_ONLY_KEYS)
        if unknown:
            raise ConfigError(f"unknown network config key(s): {', '.join(unknown)}")
        kwargs: dict[str, Any] = {}
        for name, value in d.items():
            if name not in known:
                continue
            default = known[name].default
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise ConfigError(f"network config '{name}' must be true/false, got {value!r}")
            elif isinstance(default, int):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ConfigError(f"network config '{name}' must be an integer, got {value!r}")
            elif isinstance(default, float):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ConfigError(f"network config '{name}' must be a number, got {value!r}")
                value = float(value)
            elif isinstance(default, str) and not isinstance(value, str):
                raise ConfigError(f"network config '{name}' must be a string, got {value!r}")
            kwargs[name] = value
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(self.in_channels == 3, "in_channels must be 3 (RGB)")
        for name in ("num_groups", "hidden_size", "pixel_hidden_size", "pixel_attn_hidden_size",
                     "pixel_num_groups", "patch_depth", "pixel_depth", "patch_size",
                     "txt_embed_dim", "txt_max_length", "lq_latent_channels", "lq_hidden_dim",
                     "lq_interval", "sr_scale", "latent_spatial_down_factor",
                     "lq_latent_unpatchify_factor", "rope_ref_h", "rope_ref_w"):
            need(getattr(self, name) > 0, f"{name} must be positive")
        need(self.lq_num_res_blocks >= 0, "lq_num_res_blocks must be >= 0")
        need(self.hidden_size % self.num_groups == 0, "hidden_size must be divisible by num_groups")
        # 2D RoPE: d/4 frequencies per axis, NTK exponent a/(a-2) with a = d/2, so d >= 8.
        need((self.hidden_size // self.num_groups) % 4 == 0 and self.hidden_size // self.num_groups >= 8,
             "patch head dim (hidden_size / num_groups) must be a multiple of 4 and >= 8 (2D RoPE)")
        need(self.pixel_attn_hidden_size % self.pixel_num_groups == 0,
             "pixel_attn_hidden_size must be divisible by pixel_num_groups")
        pixel_head = self.pixel_attn_hidden_size // self.pixel_num_groups
        need(pixel_head % 4 == 0 and pixel_head >= 8,
             "pixel head dim (pixel_attn_hidden_size / pixel_num_groups) must be a multiple of 4 and >= 8 (2D RoPE)")
        need(self.lq_hidden_dim % 4 == 0, "lq_hidden_dim must be divisible by 4 (GroupNorm groups)")
        need(self.lq_gate_type in GATE_TYPES, f"lq_gate_type must be one of {GATE_TYPES}")
        need(self.lq_conv_padding_mode in PADDING_MODES, f"lq_conv_padding_mode must be one of {PADDING_MODES}")
        need(self.rope_mode == "ntk_aware", "rope_mode must be 'ntk_aware' (the only released mode)")
        f = self.lq_latent_unpatchify_factor
        need(self.lq_latent_channels % (f * f) == 0,
             "lq_latent_channels must be divisible by lq_latent_unpatchify_factor**2")
        need(self.latent_spatial_down_factor % f == 0,
             "latent_spatial_down_factor must be divisible by lq_latent_unpatchify_factor")
        # The reference also takes a fractional r > 1 (no release has one); here r is k or 1/k.
        r = self.lq_align_ratio
        need(r.denominator == 1 or r.numerator == 1,
             f"sr_scale * latent_spatial_down_factor / (patch_size * unpatchify factor) = {r} must be a whole "
             "number (nearest upsampling to the patch grid) or 1/k (k x k latent cells folded into channels)")

    # Derived sizes -------------------------------------------------------
    @property
    def num_injections(self) -> int:
        """LQ injection points: before every `lq_interval`-th patch block."""
        return len(range(0, self.patch_depth, self.lq_interval))

    @property
    def lq_align_ratio(self) -> Fraction:
        """r: patch-grid cells per (unpatchified) latent cell at the native size (SPEC 3.1 step 2).

        2, 4 or 8 in every release (nearest upsampling); 1: the latent is on the patch
        grid; 1/k: k x k latent cells are folded into channels.
        """
        f = self.lq_latent_unpatchify_factor
        return Fraction(self.sr_scale * (self.latent_spatial_down_factor // f), self.patch_size)

    @property
    def lq_fold_factor(self) -> int:
        """k when r = 1/k (latent finer than the patch grid), else 1."""
        r = self.lq_align_ratio
        return r.denominator if r < 1 else 1

    @property
    def lq_conv_in_channels(self) -> int:
        """Channels entering the first LQ conv: after the unpatchify and any fold."""
        return self.lq_latent_channels // self.lq_latent_unpatchify_factor**2 * self.lq_fold_factor**2

    @property
    def pixel_scale(self) -> int:
        """Output pixels per latent cell along each axis (H = h * pixel_scale)."""
        return self.sr_scale * self.latent_spatial_down_factor
