"""Random PiD checkpoints in the released file layout, for tests, demos and benchmarks.

The released files are unavailable offline (and 2.7 GB each); a synthetic file has
the same keys, shapes and dtype (`net.<name>` bfloat16, plus v1.5's training-only
`lq_proj.lq_aux_rgb_head.*`), so it exercises exactly the loading path of a real one.
Weights are small random values (normal * 0.02, norm weights near 1, gate
`log_alpha` 0) so that a forward pass stays finite; the images they make are noise.

Tensors are generated one at a time, directly in the target dtype, so making the full-size
model (1.36e9 parameters) needs its bf16 size (~2.7 GB) plus one tensor.
"""

from __future__ import annotations

import math
import os
import zlib
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor, nn

from pid_runtime.io import atomic_write

from .checkpoints import NETWORK_PREFIX
from .config import PidConfig
from .network import GroupNorm, PidNet, RMSNorm
from .releases import Release

WEIGHT_STD = 0.02
# Released v1.5 files carry `lq_proj.lq_aux_rgb_head.{0,1,3}`: a norm and two linears,
# the last one with 48 outputs in every release (tiny golden configs included).
AUX_HEAD_PREFIX = "lq_proj.lq_aux_rgb_head."
AUX_HEAD_OUTPUTS = 48
_NORM_TYPES = (RMSNorm, GroupNorm, nn.GroupNorm, nn.LayerNorm)


def _config_of(release_or_cfg: Release | PidConfig) -> PidConfig:
    return release_or_cfg.network if isinstance(release_or_cfg, Release) else release_or_cfg


def released_layout(cfg: PidConfig, with_aux_head: bool | None = None) -> list[tuple[str, tuple[int, ...], bool]]:
    """(name without `net.`, shape, is_norm_parameter) for every tensor of a released file.

    Order: `PidNet.state_dict()` order, with the aux head where the released files have
    it (key order does not matter to loading; keys and shapes are exactly the released ones).

    `with_aux_head` defaults to what the releases do: v1.5 (PiT injection) files have it.
    """
    if with_aux_head is None:
        with_aux_head = cfg.pit_lq_inject
    with torch.device("meta"):
        net = PidNet(cfg)
    norm_modules = {name for name, module in net.named_modules() if isinstance(module, _NORM_TYPES)}
    layout = []
    for name, tensor in net.state_dict().items():
        owner = name.rpartition(".")[0]
        layout.append((name, tuple(tensor.shape), owner in norm_modules))
    if with_aux_head:
        hid = cfg.lq_hidden_dim
        aux = [("0.weight", (hid,), True), ("0.bias", (hid,), True), ("1.weight", (hid, hid), False),
               ("1.bias", (hid,), False), ("3.weight", (AUX_HEAD_OUTPUTS, hid), False),
               ("3.bias", (AUX_HEAD_OUTPUTS,), False)]
        # The released files list the aux head right after the LQ output / PiT heads.
        heads = [i for i, (name, _, _) in enumerate(layout)
                 if name.startswith(("lq_proj.output_heads.", "lq_proj.pit_head."))]
        at = heads[-1] + 1 if heads else len(layout)
        layout[at:at] = [(AUX_HEAD_PREFIX + n, s, is_norm) for n, s, is_norm in aux]
    return layout


def synthetic_tensors(cfg: PidConfig | Release, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                      with_aux_head: bool | None = None, device: str | torch.device = "cpu",
                      ) -> Iterator[tuple[str, Tensor]]:
    """Yield (name without `net.`, random tensor) for every tensor of a released file, one at a time.

    `device="meta"` gives shape-only tensors (instant, no memory) with the same keys.
    """
    generator = torch.Generator().manual_seed(seed)
    layout = released_layout(_config_of(cfg), with_aux_head)
    if torch.device(device).type == "meta":
        for name, shape, _ in layout:
            yield name, torch.empty(shape, dtype=dtype, device="meta")
        return
    cycle = _random_cycle(max(math.prod(shape) for _, shape, _ in layout), dtype, generator)
    for name, shape, is_norm in layout:
        if name.endswith("log_alpha"):
            value = torch.zeros(shape, dtype=dtype)  # gate damping exp(0) = 1, as at initialisation
        else:
            # The offset depends on the name only, so a tensor's values do not depend on
            # which other tensors are generated (with or without the aux head, for example).
            start = zlib.crc32(f"{seed}/{name}".encode()) % POOL_SIZE
            value = cycle[start:start + math.prod(shape)].clone().reshape(shape)
            if is_norm and name.endswith("weight"):
                value += 1.0
        yield name, value.to(device)


# Drawing 1.4e9 normal numbers takes ~20 s on a small CPU; instead every tensor is a
# window of one cyclic sequence of POOL_SIZE normal numbers, at an offset hashed from
# its name. Tensors still differ from each other (a swapped key is caught), and the
# full model takes a few seconds.
POOL_SIZE = 1 << 24


def _random_cycle(longest: int, dtype: torch.dtype, generator: torch.Generator) -> Tensor:
    """POOL_SIZE random values repeated so that any window [start < POOL_SIZE, + longest) fits."""
    pool = (torch.randn(POOL_SIZE, generator=generator) * WEIGHT_STD).to(dtype)
    return pool.repeat(-(-(POOL_SIZE + longest) // POOL_SIZE))


def synthetic_state_dict(cfg: PidConfig | Release, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                         with_aux_head: bool | None = None, prefix: str = NETWORK_PREFIX,
                         device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """A whole random checkpoint dict in the released layout (`net.`-prefixed by default)."""
    return {prefix + name: t for name, t in
            synthetic_tensors(_config_of(cfg), dtype, seed, with_aux_head, device)}


def write_synthetic_checkpoint(release_or_cfg: Release | PidConfig, path: str | os.PathLike[str],
                               dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                               with_aux_head: bool | None = None, prefix: str = NETWORK_PREFIX) -> Path:
    """Write a random checkpoint: torch format, or safetensors if `path` ends in `.safetensors`.

    Written under a temporary name and renamed, so a crash leaves no half-written file.
    """
    path = Path(path)
    state = synthetic_state_dict(_config_of(release_or_cfg), dtype, seed, with_aux_head, prefix)

    def write(temp: Path) -> None:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, str(temp), metadata={"format": "pt", "synthetic": "random weights"})
        else:
            torch.save(state, temp)

    return atomic_write(path, write)
