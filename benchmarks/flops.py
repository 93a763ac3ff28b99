"""Analytical FLOP count of a PiD network call and of a whole decode.

Counts every matrix product the network performs (SPEC sec. 3), at 2 FLOP per
multiply-add, derived from a `PidConfig` so it holds for any configuration.
Element-wise work (norms, RoPE, softmax, activations) is left out: it is a
fraction of a percent and runs off the matrix units. The attention terms count
the two products Q.K^T and P.V: 4 * S^2 * width per layer.

The terms are grouped the way SPEC sec. 8 states the cost, so the totals can be
checked against its table:
    patch_linear     qkv / proj / SwiGLU of the patch blocks (image + text tokens)
    patch_attention  joint attention over (L + Lt) tokens
    pixel_linear     pixel-block adaLN, compress/expand, qkv/proj, per-pixel MLP
    pixel_attention  attention over the L patches inside the pixel blocks
    lq_branch        LQ conv stack, output heads and the sigma-aware gates
    conditioning     embedders, adaLN of the patch blocks, final layer (small)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from pid_export.config import PidConfig

TIMESTEP_FREQ_DIM = 256  # SPEC 3.4: 128 cos + 128 sin frequencies


@dataclass(frozen=True)
class CallFlops:
    """FLOP of one network call, by part."""

    patch_linear: float
    patch_attention: float
    pixel_linear: float
    pixel_attention: float
    lq_branch: float
    conditioning: float

    @property
    def attention(self) -> float:
        return self.patch_attention + self.pixel_attention

    @property
    def total(self) -> float:
        return (self.patch_linear + self.patch_attention + self.pixel_linear + self.pixel_attention
                + self.lq_branch + self.conditioning)

    @property
    def attention_share(self) -> float:
        return self.attention / self.total

    def to_dict(self) -> dict[str, float]:
        out = asdict(self)
        out.update(total=self.total, attention=self.attention, attention_share=self.attention_share)
        return out


def linear_flops(tokens: int, d_in: int, d_out: int) -> float:
    return 2.0 * tokens * d_in * d_out


def attention_flops(seq: int, width: int) -> float:
    """Q.K^T plus P.V over all heads: 2 * S^2 * width each."""
    return 4.0 * seq * seq * width


def swiglu_hidden(hidden: int) -> int:
    """The SwiGLU width the network uses (4096 for hidden 1536)."""
    return int(2 * (4 * hidden) / 3)


def patch_grid(cfg: PidConfig, height: int, width: int) -> tuple[int, int]:
    p = cfg.patch_size
    if height % p or width % p:
        raise ValueError(f"output size {height}x{width} is not a multiple of the patch size {p}")
    return height // p, width // p


def network_call_flops(cfg: PidConfig, height: int, width: int, batch: int = 1,
                       text_len: int | None = None) -> CallFlops:
    """FLOP of one call `net(x, t, y, lq_latent, sigma)` for output [batch, 3, height, width]."""
    gh, gw = patch_grid(cfg, height, width)
    tokens = gh * gw  # L
    text = cfg.txt_max_length if text_len is None else min(text_len, cfg.txt_max_length)  # Lt
    d, p = cfg.hidden_size, cfg.patch_size
    mlp = swiglu_hidden(d)

    # Patch blocks: image stream on L tokens, text stream on Lt tokens; the last
    # block skips the text MLP (its text output is never used).
    def stream(n: int, with_mlp: bool) -> float:
        qkv_proj = linear_flops(n, d, 3 * d) + linear_flops(n, d, d)
        return qkv_proj + (3 * linear_flops(n, d, mlp) if with_mlp else 0.0)

    patch_linear = sum(stream(tokens, True) + stream(text, i < cfg.patch_depth - 1)
                       for i in range(cfg.patch_depth))
    patch_attention = cfg.patch_depth * attention_flops(tokens + text, d)

    # Pixel blocks: one row of P*P pixels of width pixel_hidden_size per patch token.
    pix, pix_attn, pixels = cfg.pixel_hidden_size, cfg.pixel_attn_hidden_size, p * p
    per_pixel_block = (
        linear_flops(tokens, d, pixels * 6 * pix)  # adaLN_modulation
        + linear_flops(tokens, pixels * pix, pix_attn)  # compress_to_attn
        + linear_flops(tokens, pix_attn, 3 * pix_attn) + linear_flops(tokens, pix_attn, pix_attn)  # qkv, proj
        + linear_flops(tokens, pix_attn, pixels * pix)  # expand_from_attn
        + linear_flops(tokens * pixels, pix, 4 * pix) + linear_flops(tokens * pixels, 4 * pix, pix)  # mlp
    )
    pixel_linear = cfg.pixel_depth * per_pixel_block
    pixel_attention = cfg.pixel_depth * attention_flops(tokens, pix_attn)

    # LQ branch: 3x3 convs on the latent upsampled to the patch grid, heads, gates.
    hid = cfg.lq_hidden_dim
    c_in = cfg.lq_latent_channels // cfg.lq_latent_unpatchify_factor**2
    conv3x3 = lambda a, b: linear_flops(tokens, 9 * a, b)  # noqa: E731 - one 3x3 conv over the grid
    convs = conv3x3(c_in, hid) + conv3x3(hid, hid) + 2 * cfg.lq_num_res_blocks * conv3x3(hid, hid)
    heads = (cfg.num_injections + int(cfg.pit_lq_inject)) * linear_flops(tokens, hid, d)
    gate_out = d if cfg.lq_gate_type == "sigma_aware_per_token_per_dim" else 1
    gates = cfg.num_injections * linear_flops(tokens, 2 * d, gate_out)
    if cfg.pit_lq_inject:
        gates += linear_flops(tokens, 2 * d, 1)  # the PiT gate is per token
    lq_branch = convs + heads + gates

    # Conditioning and the small per-pixel layers.
    conditioning = (
        linear_flops(tokens, cfg.in_channels * pixels, d)  # s_embedder
        + linear_flops(1, TIMESTEP_FREQ_DIM, d) + linear_flops(1, d, d)  # t_embedder
        + linear_flops(text, cfg.txt_embed_dim, d)  # y_embedder
        + cfg.patch_depth * 2 * linear_flops(1, d, 6 * d)  # adaLN img + txt, once per sample
        + linear_flops(tokens * pixels, cfg.in_channels, pix)  # pixel_embedder
        + linear_flops(tokens * pixels, pix, cfg.in_channels)  # final_layer
    )

    parts = (patch_linear, patch_attention, pixel_linear, pixel_attention, lq_branch, conditioning)
    return CallFlops(*(batch * part for part in parts))


def decode_flops(cfg: PidConfig, height: int, width: int, batch: int = 1, steps: int = 4,
                 text_len: int | None = None) -> float:
    """FLOP of a whole decode: `steps` network calls (the sampler's own math is negligible)."""
    return steps * network_call_flops(cfg, height, width, batch, text_len).total
