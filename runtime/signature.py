"""The PiD network's inputs and output, declared once.

Every place that needs the network's tensors derives them from `INPUTS` / `OUTPUTS`:
the ONNX export (trace inputs, dynamic shapes), the engine profiles (min/opt/max
shapes), the TensorRT backend's binding, `--verify`'s inputs and the runtime's
"outside the profile" messages. A dimension is named; the same name is the same size
in every tensor (all five inputs share `batch`), and `shapes(sizes)` turns one
assignment of sizes into every tensor's shape.

    x              [batch, 3, height, width]          noisy image at the output size
    t              [batch]                            timestep in [0, 1000]
    y              [batch, text_len, txt_dim]         caption embedding
    lq_latent      [batch, latent_channels, latent_h, latent_w]
    degrade_sigma  [batch]                            the latent's degradation level
    -> velocity    [batch, 3, height, width]

Dimensions named in `DYNAMIC` vary per call (they are the graph's dynamic axes and
an engine profile's ranges); the others are fixed by the network's config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

Shape = tuple[int, ...]

# Dimension name -> what a user calls it (for error messages).
DIMENSIONS: dict[str, str] = {
    "batch": "batch",
    "channels": "channels",
    "height": "height",
    "width": "width",
    "text_len": "caption length",
    "txt_dim": "caption embedding width",
    "latent_channels": "latent channels",
    "latent_h": "latent height",
    "latent_w": "latent width",
}

# The axes that are dynamic in the exported graph and ranged in an engine profile.
DYNAMIC = ("batch", "height", "width", "text_len", "latent_h", "latent_w")

IMAGE_CHANNELS = 3


@dataclass(frozen=True)
class TensorSpec:
    """One network tensor: its name in the graph and the names of its dimensions."""

    name: str
    dims: tuple[str, ...]
    dtype: str = "float32"  # at the graph's boundary, whatever the precision inside

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(DIMENSIONS[d] for d in self.dims)

    def shape(self, sizes: Mapping[str, int]) -> Shape:
        return tuple(int(sizes[d]) for d in self.dims)

    def dynamic_axes(self) -> dict[int, str]:
        """{axis: dimension name} of the axes that vary per call."""
        return {axis: d for axis, d in enumerate(self.dims) if d in DYNAMIC}


INPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("x", ("batch", "channels", "height", "width")),
    TensorSpec("t", ("batch",)),
    TensorSpec("y", ("batch", "text_len", "txt_dim")),
    TensorSpec("lq_latent", ("batch", "latent_channels", "latent_h", "latent_w")),
    TensorSpec("degrade_sigma", ("batch",)),
)
OUTPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("velocity", ("batch", "channels", "height", "width")),
)

INPUT_NAMES = tuple(spec.name for spec in INPUTS)
OUTPUT_NAMES = tuple(spec.name for spec in OUTPUTS)
BY_NAME: dict[str, TensorSpec] = {spec.name: spec for spec in (*INPUTS, *OUTPUTS)}


def input_shapes(sizes: Mapping[str, int]) -> dict[str, Shape]:
    """Every input's shape for one assignment of dimension sizes (`channels` defaults to 3)."""
    sizes = {"channels": IMAGE_CHANNELS, **sizes}
    return {spec.name: spec.shape(sizes) for spec in INPUTS}
