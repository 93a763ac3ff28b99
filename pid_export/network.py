"""The PiD decoder network (SPEC sec. 3), written for export.

Read top to bottom: building blocks, the LQ (latent) branch, the patch blocks,
the pixel blocks, then `PidNet`. Module names match the released checkpoint keys.

Export rules followed throughout:
- static control flow; every shape-dependent table (RoPE, pixel positions, NTK
  factors, the latent's resize to the patch grid) is computed from the input's
  runtime shape, never at trace time; shortcuts for particular sizes are taken only
  for concrete sizes (`static_sizes`), never inside a dynamic-shape graph;
- patchify / unpatchify are reshapes and transposes (no unfold/fold);
- mixed precision by parameter dtype: a layer casts its input to its own weight
  dtype, so casting a submodule's parameters to fp16/bf16 (see `precision.py`)
  gives a strongly typed graph. Numerically sensitive math (norm statistics,
  RoPE, the timestep embedding, the gate's sigma term) always runs in float32.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import PidConfig

# ---------------------------------------------------------------------------
# Building blocks


class Linear(nn.Linear):
    """nn.Linear that runs in its weight's dtype (the input is cast to it)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias)


class Conv2d(nn.Conv2d):
    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.to(self.weight.dtype))


class GroupNorm(nn.GroupNorm):
    """GroupNorm with float32 statistics whatever the parameter dtype."""

    def forward(self, x: Tensor) -> Tensor:
        out = F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps)
        return out.to(x.dtype)


class RMSNorm(nn.Module):
    """w * x / sqrt(mean(x^2) + eps); statistics in float32, weight applied in x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight.to(x.dtype)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Softmax attention, [B, heads, S, D] -> [B, heads, S, D], one fusable op."""
    return F.scaled_dot_product_attention(q, k, v)


# ---------------------------------------------------------------------------
# Rotary position embedding (SPEC sec. 3.6), float32, from runtime shapes


def index_range(n: int, device: torch.device) -> Tensor:
    """float32 0..n-1, made as an integer Range then cast (TensorRT's Range wants int bounds)."""
    return torch.arange(n, device=device).to(torch.float32)


def normalised_positions(n: int, device: torch.device) -> Tensor:
    """linspace(0, 16, n) written as arange * step so it traces with a symbolic n."""
    step = 16.0 / max(n - 1, 1)
    return index_range(n, device) * step


def rope_2d_angles(gh: int, gw: int, head_dim: int, ref_h: int, ref_w: int, device: torch.device) -> Tensor:
    """NTK-aware 2D RoPE angles for a (gh, gw) token grid: [gh*gw, head_dim/2]."""
    a = head_dim / 2
    exponent = a / (a - 2)
    j = torch.arange(head_dim // 4, device=device, dtype=torch.float32)
    # theta^(-4j/d) = exp(-(4j/d) * (ln 10000 + exponent * ln(g / R)))
    log_theta_h = math.log(10000.0) + exponent * torch.log(torch.tensor(gh / ref_h, device=device))
    log_theta_w = math.log(10000.0) + exponent * torch.log(torch.tensor(gw / ref_w, device=device))
    fh = torch.exp(-(4.0 / head_dim) * j * log_theta_h)
    fw = torch.exp(-(4.0 / head_dim) * j * log_theta_w)
    py = normalised_positions(gh, device)[:, None, None] * fh  # [gh, 1, d/4]
    px = normalised_positions(gw, device)[None, :, None] * fw  # [1, gw, d/4]
    py, px = torch.broadcast_tensors(py, px)
    # Interleave per token: [px*fw_0, py*fh_0, px*fw_1, py*fh_1, ...]
    return torch.stack([px, py], dim=-1).reshape(gh * gw, head_dim // 2)


def rope_1d_angles(length: int, head_dim: int, theta: float, device: torch.device) -> Tensor:
    """Text RoPE angles [length, head_dim/2]: pos * theta^(-2j/d)."""
    j = torch.arange(head_dim // 2, device=device, dtype=torch.float32)
    freqs = torch.exp(j * (-2.0 * math.log(theta) / head_dim))
    pos = index_range(length, device)
    return pos[:, None] * freqs[None, :]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate consecutive pairs of x [B, heads, S, D] by angles given as cos/sin [S, D/2]."""
    x32 = x.float().unflatten(-1, (-1, 2))
    a, b = x32[..., 0], x32[..., 1]
    rotated = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1)
    return rotated.flatten(-2).to(x.dtype)


# ---------------------------------------------------------------------------
# Embedders


class TimestepEmbedder(nn.Module):
    """128 cos/sin frequencies with max period 10 (SPEC 3.4), then an MLP."""

    def __init__(self, hidden: int, freq_dim: int = 256, max_period: float = 10.0):
        super().__init__()
        self.freq_dim = freq_dim
        self.max_period = max_period
        self.mlp = nn.Sequential(Linear(freq_dim, hidden), nn.SiLU(), Linear(hidden, hidden))

    def forward(self, t: Tensor) -> Tensor:
        half = self.freq_dim // 2
        k = torch.arange(half, device=t.device, dtype=torch.float32)
        freqs = torch.exp(k * (-math.log(self.max_period) / half))
        args = t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class Projection(nn.Module):
    """A lone Linear under the name `proj` (checkpoint layout)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.proj = Linear(d_in, d_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class CaptionEmbedder(nn.Module):
    def __init__(self, d_in: int, hidden: int):
        super().__init__()
        self.proj = Linear(d_in, hidden)
        self.norm = RMSNorm(hidden)

    def forward(self, y: Tensor) -> Tensor:
        return self.norm(self.proj(y))


# ---------------------------------------------------------------------------
# LQ branch (SPEC 3.1, 3.2): latent -> per-injection features, and the gates.
# The output size is free (multiples of the patch size): the latent is aligned to
# the patch grid of x, not x to the latent.


class ResBlock(nn.Module):
    def __init__(self, ch: int, padding_mode: Any):
        super().__init__()
        self.block = nn.Sequential(
            GroupNorm(4, ch, eps=1e-5), nn.SiLU(), Conv2d(ch, ch, 3, padding=1, padding_mode=padding_mode),
            GroupNorm(4, ch, eps=1e-5), nn.SiLU(), Conv2d(ch, ch, 3, padding=1, padding_mode=padding_mode),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


def static_sizes(*sizes: int) -> bool:
    """True when every size is a plain int: eager runs and static-shape exports.

    A dynamic-shape export sees symbolic sizes (torch.SymInt). Branching on them
    would make torch.export either specialise the graph to the traced case or
    fail, so size-dependent shortcuts are taken only when this is True and the
    general path (correct for every size) is what a dynamic graph holds.
    """
    return all(isinstance(size, int) for size in sizes)


def nearest_source_index(size_in: int, size_out: int, device: torch.device) -> Tensor:
    """Source row of each output row of F.interpolate(mode="nearest"), as torch computes it.

    floor(dst * s) with s = float32(size_in / size_out) and the product in float32,
    clamped to size_in - 1 (torch's nearest_neighbor_compute_source_index). This is
    not always the exact floor(dst * size_in / size_out): size_in 2, size_out 82 maps
    row 41 to 0, not 1, because s rounds down. The reference uses F.interpolate, so
    this follows its float32 arithmetic.
    """
    scale = torch.full((), size_in, dtype=torch.float32, device=device) / size_out
    source = torch.floor(index_range(size_out, device) * scale).to(torch.int64)
    return source.clamp(max=size_in - 1)


def resize_nearest(z: Tensor, height: int, width: int) -> Tensor:
    """F.interpolate(z, (height, width), mode="nearest") as two Gathers (exact on every backend)."""
    z = z.index_select(2, nearest_source_index(z.shape[2], height, z.device))
    return z.index_select(3, nearest_source_index(z.shape[3], width, z.device))


def resize_bilinear(z: Tensor, height: int, width: int) -> Tensor:
    """Bilinear, align_corners=False (an ONNX Resize); skipped when the size is known to match."""
    if static_sizes(*z.shape[2:], height, width) and tuple(z.shape[2:]) == (height, width):
        return z
    return F.interpolate(z, size=(height, width), mode="bilinear", align_corners=False)


class LatentProjector(nn.Module):
    """`lq_proj`: latent aligned to the patch grid -> conv stack -> one token feature per injection."""

    def __init__(self, cfg: PidConfig):
        super().__init__()
        self.unpatchify = cfg.lq_latent_unpatchify_factor
        self.align_ratio = cfg.lq_align_ratio
        self.fold = cfg.lq_fold_factor
        hid, pad = cfg.lq_hidden_dim, cast(Any, cfg.lq_conv_padding_mode)  # "zeros" | "replicate"
        self.latent_proj = nn.Sequential(
            Conv2d(cfg.lq_conv_in_channels, hid, 3, padding=1, padding_mode=pad), nn.SiLU(),
            Conv2d(hid, hid, 3, padding=1, padding_mode=pad),
            *[ResBlock(hid, pad) for _ in range(cfg.lq_num_res_blocks)],
        )
        self.output_heads = nn.ModuleList(Linear(hid, cfg.hidden_size) for _ in range(cfg.num_injections))
        self.pit_head = Linear(hid, cfg.hidden_size) if cfg.pit_lq_inject else None
        self.gate_modules = nn.ModuleList(
            SigmaAwareGate(cfg.hidden_size, cfg.lq_gate_type) for _ in range(cfg.num_injections)
        )

    def align(self, lq_latent: Tensor, gh: int, gw: int) -> Tensor:
        """[B, C, h, w] latent -> [B, C', gh, gw] on the patch grid (SPEC 3.1 steps 1-2), any gh, gw."""
        z = lq_latent
        f = self.unpatchify
        if f > 1:  # channel c*f*f + i*f + j -> pixel (f*row + i, f*col + j)
            b, c, h, w = z.shape
            z = z.reshape(b, c // (f * f), f, f, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // (f * f), h * f, w * f)
        r = self.align_ratio
        if r > 1:  # latent coarser than the patch grid: nearest upsampling
            b, c, h, w = z.shape
            k = int(r)
            if static_sizes(h, w, gh, gw) and (gh, gw) == (h * k, w * k):  # native size: each cell repeated k x k
                return z[:, :, :, None, :, None].expand(b, c, h, k, w, k).reshape(b, c, gh, gw)
            return resize_nearest(z, gh, gw)
        if r == 1:
            return resize_bilinear(z, gh, gw)
        k = self.fold  # latent finer than the patch grid: fold k x k cells into channels
        z = resize_bilinear(z, gh * k, gw * k)
        b, c = z.shape[:2]
        return z.reshape(b, c, gh, k, gw, k).permute(0, 1, 3, 5, 2, 4).reshape(b, c * k * k, gh, gw)

    def tokens(self, lq_latent: Tensor, gh: int, gw: int) -> Tensor:
        """[B, C, h, w] latent -> [B, gh*gw, lq_hidden] tokens on the patch grid."""
        z = self.latent_proj(self.align(lq_latent, gh, gw))
        return z.flatten(2).transpose(1, 2)

    def forward(self, lq_latent: Tensor, gh: int, gw: int) -> tuple[list[Tensor], Tensor | None]:
        tokens = self.tokens(lq_latent, gh, gw)
        features = [head(tokens) for head in self.output_heads]
        pit = self.pit_head(tokens) if self.pit_head is not None else None
        return features, pit


class SigmaAwareGate(nn.Module):
    """s + sigmoid(content_proj([s, f]) - exp(log_alpha) * sigma) * f."""

    def __init__(self, hidden: int, gate_type: str):
        super().__init__()
        out = hidden if gate_type == "sigma_aware_per_token_per_dim" else 1
        self.content_proj = Linear(2 * hidden, out)
        self.log_alpha = nn.Parameter(torch.zeros(()))

    def forward(self, s: Tensor, feature: Tensor, sigma: Tensor) -> Tensor:
        content = self.content_proj(torch.cat([s, feature.to(s.dtype)], dim=-1)).float()
        damping = torch.exp(self.log_alpha.float()) * sigma.float()[:, None, None]
        gate = torch.sigmoid(content - damping).to(s.dtype)
        return s + gate * feature.to(s.dtype)


# ---------------------------------------------------------------------------
# Patch blocks (SPEC 3.7): joint text/image attention with adaLN modulation


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = Linear(dim, hidden, bias=False)
        self.w2 = Linear(hidden, dim, bias=False)
        self.w3 = Linear(dim, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class JointAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        head_dim = dim // heads
        self.qkv_x = Linear(dim, 3 * dim, bias=False)
        self.qkv_y = Linear(dim, 3 * dim, bias=False)
        self.q_norm_x, self.k_norm_x = RMSNorm(head_dim), RMSNorm(head_dim)
        self.q_norm_y, self.k_norm_y = RMSNorm(head_dim), RMSNorm(head_dim)
        self.proj_x = Linear(dim, dim)
        self.proj_y = Linear(dim, dim)

    def _qkv(self, qkv: Tensor, q_norm: RMSNorm, k_norm: RMSNorm, rope: tuple[Tensor, Tensor] | None):
        q, k, v = qkv.unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)  # 3 x [B, heads, S, D]
        q, k = q_norm(q), k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k, v

    def forward(self, s: Tensor, u: Tensor, rope_img: tuple[Tensor, Tensor],
                rope_txt: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
        qs, ks, vs = self._qkv(self.qkv_x(s), self.q_norm_x, self.k_norm_x, rope_img)
        qu, ku, vu = self._qkv(self.qkv_y(u), self.q_norm_y, self.k_norm_y, rope_txt)
        out = attention(torch.cat([qu, qs], 2), torch.cat([ku, ks], 2), torch.cat([vu, vs], 2))
        out = out.transpose(1, 2).flatten(2)  # [B, Lt + L, dim]
        text_len = u.shape[1]
        return self.proj_x(out[:, text_len:]), self.proj_y(out[:, :text_len])


class PatchBlock(nn.Module):
    def __init__(self, dim: int, heads: int, is_last: bool):
        super().__init__()
        self.is_last = is_last  # the last block's text output is never used
        self.norm_x1, self.norm_y1 = RMSNorm(dim), RMSNorm(dim)
        self.attn = JointAttention(dim, heads)
        self.norm_x2, self.norm_y2 = RMSNorm(dim), RMSNorm(dim)
        mlp_hidden = int(2 * (4 * dim) / 3)
        self.mlp_x = SwiGLU(dim, mlp_hidden)
        self.mlp_y = SwiGLU(dim, mlp_hidden)
        self.adaLN_modulation_img = nn.Sequential(Linear(dim, 6 * dim))
        self.adaLN_modulation_txt = nn.Sequential(Linear(dim, 6 * dim))

    def forward(self, s: Tensor, u: Tensor, c: Tensor, rope_img, rope_txt) -> tuple[Tensor, Tensor]:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation_img(c).chunk(6, dim=-1)
        tshift1, tscale1, tgate1, tshift2, tscale2, tgate2 = self.adaLN_modulation_txt(c).chunk(6, dim=-1)
        attn_s, attn_u = self.attn(modulate(self.norm_x1(s), shift1, scale1),
                                   modulate(self.norm_y1(u), tshift1, tscale1), rope_img, rope_txt)
        s = s + gate1 * attn_s
        s = s + gate2 * self.mlp_x(modulate(self.norm_x2(s), shift2, scale2))
        if self.is_last:
            return s, u
        u = u + tgate1 * attn_u
        u = u + tgate2 * self.mlp_y(modulate(self.norm_y2(u), tshift2, tscale2))
        return s, u


# ---------------------------------------------------------------------------
# Pixel blocks (SPEC 3.11): per-pixel MLP stream, attention over patches


class PixelAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = Linear(dim, 3 * dim, bias=False)
        self.q_norm, self.k_norm = RMSNorm(dim // heads), RMSNorm(dim // heads)
        self.proj = Linear(dim, dim)

    def forward(self, z: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        q, k, v = self.qkv(z).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(self.q_norm(q), *rope), apply_rope(self.k_norm(k), *rope)
        return self.proj(attention(q, k, v).transpose(1, 2).flatten(2))


class PixelMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class PixelBlock(nn.Module):
    def __init__(self, cfg: PidConfig):
        super().__init__()
        dim, patch_pixels = cfg.pixel_hidden_size, cfg.patch_size**2
        self.norm1 = RMSNorm(dim)
        self.compress_to_attn = Linear(patch_pixels * dim, cfg.pixel_attn_hidden_size)
        self.attn = PixelAttention(cfg.pixel_attn_hidden_size, cfg.pixel_num_groups)
        self.expand_from_attn = Linear(cfg.pixel_attn_hidden_size, patch_pixels * dim)
        self.norm2 = RMSNorm(dim)
        self.mlp = PixelMlp(dim, 4 * dim)
        self.adaLN_modulation = nn.Sequential(Linear(cfg.hidden_size, patch_pixels * 6 * dim))

    def forward(self, x: Tensor, s: Tensor, batch: int, rope: tuple[Tensor, Tensor]) -> Tensor:
        """x [B*L, P*P, dim] pixel tokens, s [B*L, hidden] their patch's condition."""
        n, pixels, dim = x.shape
        mod = self.adaLN_modulation(s).view(n, pixels, 6 * dim)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)
        z = modulate(self.norm1(x), shift1, scale1).reshape(batch, n // batch, pixels * dim)
        z = self.expand_from_attn(self.attn(self.compress_to_attn(z), rope))
        x = x + gate1 * z.reshape(n, pixels, dim)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.linear = Linear(dim, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.norm(x))


def pixel_position_table(height: int, width: int, dim: int, device: torch.device) -> Tensor:
    """Fixed sin-cos table [H, W, dim]: [sin(col w), cos(col w), sin(row w), cos(row w)]."""
    quarter = dim // 4
    w = torch.exp(torch.arange(quarter, device=device, dtype=torch.float32) * (-math.log(10000.0) / quarter))
    col = index_range(width, device)[:, None] * w  # [W, q]
    row = index_range(height, device)[:, None] * w  # [H, q]
    col_emb = torch.cat([torch.sin(col), torch.cos(col)], dim=-1)[None, :, :].expand(height, width, 2 * quarter)
    row_emb = torch.cat([torch.sin(row), torch.cos(row)], dim=-1)[:, None, :].expand(height, width, 2 * quarter)
    return torch.cat([col_emb, row_emb], dim=-1)


# ---------------------------------------------------------------------------
# The network


class PidNet(nn.Module):
    """PiD decoder: velocity = net(x, t, y, lq_latent, degrade_sigma)."""

    def __init__(self, cfg: PidConfig):
        super().__init__()
        self.cfg = cfg
        hidden, p = cfg.hidden_size, cfg.patch_size
        self.y_pos_embedding = nn.Parameter(torch.zeros(1, cfg.txt_max_length, hidden))
        self.pixel_embedder = Projection(cfg.in_channels, cfg.pixel_hidden_size)
        self.s_embedder = Projection(cfg.in_channels * p * p, hidden)
        self.t_embedder = TimestepEmbedder(hidden)
        self.y_embedder = CaptionEmbedder(cfg.txt_embed_dim, hidden)
        self.patch_blocks = nn.ModuleList(
            PatchBlock(hidden, cfg.num_groups, is_last=i == cfg.patch_depth - 1) for i in range(cfg.patch_depth)
        )
        self.pixel_blocks = nn.ModuleList(PixelBlock(cfg) for _ in range(cfg.pixel_depth))
        self.final_layer = FinalLayer(cfg.pixel_hidden_size, cfg.in_channels)
        self.lq_proj = LatentProjector(cfg)
        # The reference builds the PiT gate with the same gate type as the patch-block gates.
        self.pit_lq_gate = SigmaAwareGate(hidden, cfg.lq_gate_type) if cfg.pit_lq_inject else None
        # dtype of the residual streams (patch, text, pixel); None: the weights' dtype.
        # float32 with 16-bit weights is the reference's autocast: 16-bit matmuls, float32 adds.
        self.residual_dtype: torch.dtype | None = None

    @classmethod
    def from_config(cls, config: Any) -> "PidNet":
        """Build from a `network` dict (reference naming), a PidConfig, or a registry entry."""
        if isinstance(config, PidConfig):
            return cls(config)
        if isinstance(config, Mapping):
            return cls(PidConfig.from_dict(config))
        network = getattr(config, "network", None)
        if isinstance(network, PidConfig):
            return cls(network)
        raise TypeError(f"cannot build PidNet from {type(config).__name__}")

    def _rope(self, gh: int, gw: int, head_dim: int, device: torch.device) -> tuple[Tensor, Tensor]:
        cfg = self.cfg  # reference grid in patches: rope_ref_{h,w} px / patch size
        angles = rope_2d_angles(gh, gw, head_dim, cfg.rope_ref_h // cfg.patch_size, cfg.rope_ref_w // cfg.patch_size,
                                device)
        return torch.cos(angles), torch.sin(angles)

    def forward(self, x: Tensor, t: Tensor, y: Tensor, lq_latent: Tensor, degrade_sigma: Tensor,
                return_lq_feature: bool = False):
        cfg = self.cfg
        p = cfg.patch_size
        b, _, height, width = x.shape
        gh, gw = height // p, width // p
        device = x.device

        lq_features, pit_feature = self.lq_proj(lq_latent, gh, gw)

        # Patch tokens: [B,3,H,W] -> [B, L, 3*P*P] with channel index c*P*P + ky*P + kx.
        patches = x.reshape(b, 3, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, 3 * p * p)
        s = self.s_embedder(patches)
        stream = self.residual_dtype or s.dtype
        s = s.to(stream)
        t_emb = self.t_embedder(t)[:, None, :]  # [B, 1, hidden]
        c = F.silu(t_emb)

        y = y[:, : cfg.txt_max_length]
        text_len = y.shape[1]
        # The caption projection may run in fp32 (fp16 exports: Gemma outliers); the stream in `stream`.
        u = self.y_embedder(y).to(stream) + self.y_pos_embedding[:, :text_len].to(stream)

        rope_img = self._rope(gh, gw, cfg.hidden_size // cfg.num_groups, device)
        rope_txt = None
        if cfg.use_text_rope:
            angles = rope_1d_angles(text_len, cfg.hidden_size // cfg.num_groups, cfg.text_rope_theta, device)
            rope_txt = (torch.cos(angles), torch.sin(angles))

        for i, block in enumerate(self.patch_blocks):
            if i % cfg.lq_interval == 0:
                k = i // cfg.lq_interval
                s = self.lq_proj.gate_modules[k](s, lq_features[k], degrade_sigma)
            s, u = block(s, u, c, rope_img, rope_txt)

        s = F.silu(t_emb.to(s.dtype) + s)
        if self.pit_lq_gate is not None:
            s = self.pit_lq_gate(s, pit_feature, degrade_sigma)

        # Pixel tokens: per-pixel embedding + fixed positions, cut into patches [B*L, P*P, dim].
        dim = cfg.pixel_hidden_size
        pix = self.pixel_embedder(x.permute(0, 2, 3, 1)).to(stream)
        pix = pix + pixel_position_table(height, width, dim, device).to(stream)
        pix = pix.reshape(b, gh, p, gw, p, dim).permute(0, 1, 3, 2, 4, 5).reshape(b * gh * gw, p * p, dim)

        cond = s.reshape(b * gh * gw, cfg.hidden_size)
        rope_pix = self._rope(gh, gw, cfg.pixel_attn_hidden_size // cfg.pixel_num_groups, device)
        for block in self.pixel_blocks:
            pix = block(pix, cond, b, rope_pix)

        out = self.final_layer(pix)  # [B*L, P*P, 3]
        out = out.reshape(b, gh, gw, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(b, 3, height, width)
        velocity = out.float()
        if return_lq_feature:
            return velocity, lq_features[0]
        return velocity
