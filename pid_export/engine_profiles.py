"""Engine optimization profiles: the shape ranges an engine accepts (pure; no TensorRT).

One `EngineProfile` per optimization profile, from the export's metadata and the user's
--min/--opt/--max/--profiles; `profile_shapes` gives each network input's (min, opt, max).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any, Callable, Sequence

from pid_runtime import sizes
from pid_runtime.metadata import ModelMetadata
from pid_runtime.signature import INPUT_NAMES, input_shapes

from .config import PidConfig
from .engine_errors import EngineError, MissingSizeRange
from .releases import VARIANT_2KTO4K, Release

Shape = tuple[int, ...]
HW = tuple[int, int]

# ---------------------------------------------------------------------------
# Optimization profile (pure; no TensorRT needed)


def parse_hw(text: str) -> HW:
    """'2048x1536' (height x width) -> (2048, 1536): the runtime's one parser, as an EngineError."""
    try:
        return sizes.parse_hw(text)
    except ValueError as exc:
        raise EngineError(f"size {exc}") from None


def _hw(value: Sequence[int]) -> HW:
    if len(value) != 2:
        raise EngineError(f"a size is [height, width], got {list(value)}")
    return int(value[0]), int(value[1])


@dataclass(frozen=True)
class EngineProfile:
    """The shape range one engine accepts.

    Sizes are output pixels (H, W), multiples of the patch size. The output size is
    free of the latent's (the network aligns the latent), so the latent range is the
    outputs' range in latent cells, rounded outward: floor(min / pixel_scale) to
    ceil(max / pixel_scale).
    Caption length: any from `min_text_length` (default 1) to the model's max, tuned
    (opt) at the max, which is what the runtime's own caption encoder produces (it pads to
    it); `--caption-embeds` with fewer tokens fit too. None fixes it at the max (static
    exports, traced at one length).
    """

    latent_channels: int
    pixel_scale: int
    txt_dim: int
    min_hw: HW
    opt_hw: HW
    max_hw: HW
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 1
    text_length: int = 300
    min_text_length: int | None = 1
    patch_size: int = 16

    @classmethod
    def for_config(cls, cfg: PidConfig, min_hw: HW, opt_hw: HW, max_hw: HW, *, max_batch: int = 1,
                   opt_batch: int = 1, min_text_length: int | None = 1) -> "EngineProfile":
        profile = cls(latent_channels=cfg.lq_latent_channels, pixel_scale=cfg.pixel_scale,
                      txt_dim=cfg.txt_embed_dim, min_hw=_hw(min_hw), opt_hw=_hw(opt_hw),
                      max_hw=_hw(max_hw), max_batch=max_batch, opt_batch=opt_batch,
                      text_length=cfg.txt_max_length, min_text_length=min_text_length, patch_size=cfg.patch_size)
        profile.validate()
        return profile

    @classmethod
    def for_metadata(cls, meta: ModelMetadata, min_hw: HW | None = None, opt_hw: HW | None = None,
                     max_hw: HW | None = None, *, max_batch: int = 1, opt_batch: int = 1) -> "EngineProfile":
        """The export's size range (trained sizes), with the user's overrides.

        Defaults: min/max from the metadata's range, opt = its first trained size.
        """
        low = min_hw or (_hw(meta.min_size) if meta.min_size else None)
        high = max_hw or (_hw(meta.max_size) if meta.max_size else None)
        if low is None or high is None:
            raise MissingSizeRange("the export has no trained size range; give --min and --max HxW")
        opt = opt_hw or (_hw(meta.trained_sizes[0]) if meta.trained_sizes else high)
        profile = cls(latent_channels=meta.latent_channels, pixel_scale=meta.pixel_scale,
                      txt_dim=meta.txt_embed_dim, min_hw=_hw(low), opt_hw=_hw(opt), max_hw=_hw(high),
                      max_batch=max_batch, opt_batch=opt_batch, text_length=meta.txt_max_length,
                      patch_size=int(meta.network.get("patch_size", 16)))
        profile.validate()
        return profile

    def validate(self) -> None:
        for label, (height, width) in (("min", self.min_hw), ("opt", self.opt_hw), ("max", self.max_hw)):
            for name, value in (("height", height), ("width", width)):
                if value <= 0 or value % self.patch_size:
                    raise EngineError(f"{label} {name} {value} is not a positive multiple of {self.patch_size} "
                                      f"(the patch size)")
        for axis, name in ((0, "height"), (1, "width")):
            if not self.min_hw[axis] <= self.opt_hw[axis] <= self.max_hw[axis]:
                raise EngineError(f"profile {name}s must satisfy min <= opt <= max, got "
                                  f"{self.min_hw[axis]}, {self.opt_hw[axis]}, {self.max_hw[axis]}")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise EngineError(f"batch sizes must satisfy 1 <= min <= opt <= max, got "
                              f"{self.min_batch}, {self.opt_batch}, {self.max_batch}")
        low_text = self.text_length if self.min_text_length is None else self.min_text_length
        if not 1 <= low_text <= self.text_length:
            raise EngineError(f"caption length range {low_text}..{self.text_length} is empty")

    @cached_property
    def shapes(self) -> dict[str, tuple[Shape, Shape, Shape]]:
        """Per network input: its (min, opt, max) shape (`profile_shapes`), computed once."""
        return profile_shapes(self)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["shapes"] = {name: {"min": list(lo), "opt": list(opt), "max": list(hi)}
                          for name, (lo, opt, hi) in profile_shapes(self).items()}
        return data


def profile_shapes(profile: EngineProfile) -> dict[str, tuple[Shape, Shape, Shape]]:
    """Per network input (`signature.INPUTS`): its (min, opt, max) shape under `profile`."""
    def at(batch: int, hw: HW, text: int, latent_cells: Callable[[int], int]) -> dict[str, Shape]:
        height, width = hw
        return input_shapes(dict(batch=batch, height=height, width=width, text_len=text, txt_dim=profile.txt_dim,
                                 latent_channels=profile.latent_channels, latent_h=latent_cells(height),
                                 latent_w=latent_cells(width)))

    scale = profile.pixel_scale
    low_text = profile.text_length if profile.min_text_length is None else profile.min_text_length
    low = at(profile.min_batch, profile.min_hw, low_text, lambda px: max(px // scale, 1))
    opt = at(profile.opt_batch, profile.opt_hw, profile.text_length, lambda px: max(px // scale, 1))
    high = at(profile.max_batch, profile.max_hw, profile.text_length, lambda px: -(-px // scale))
    return {name: (low[name], opt[name], high[name]) for name in INPUT_NAMES}


# ---------------------------------------------------------------------------
# Several profiles (pure)

# 2kto4k releases get two profiles: kernels tuned at 2048x2048 for the 2K class (up to
# 2688x2688, the largest 2K training bucket side) and at 3840x3840 over the whole range.
PROFILE_2K_CLASS_OPT, PROFILE_2K_CLASS_MAX = (2048, 2048), (2688, 2688)
PROFILE_4K_CLASS_OPT = (3840, 3840)


@dataclass(frozen=True)
class ProfileSpec:
    """One profile as asked for: its opt size, and min/max when they differ from the export's range."""

    opt: HW
    min: HW | None = None
    max: HW | None = None


def parse_profiles(text: str) -> list[ProfileSpec]:
    """'--profiles' value: comma-separated profiles, each OPT or MIN:OPT:MAX (HxW), e.g.
    '2048x2048,3840x3840' or '1536x1536:2048x2048:2688x2688,1536x1536:3840x3840:4096x4096'."""
    specs = []
    for entry in text.split(","):
        parts = [parse_hw(p) for p in entry.split(":")]
        if len(parts) == 1:
            specs.append(ProfileSpec(parts[0]))
        elif len(parts) == 3:
            specs.append(ProfileSpec(parts[1], parts[0], parts[2]))
        else:
            raise EngineError(f"profile {entry.strip()!r} is not OPT or MIN:OPT:MAX (each HxW)")
    return specs


def default_profile_specs(release: Release | None) -> list[ProfileSpec] | None:
    """The profiles a release gets when the user names none; None means one profile over
    its trained range tuned at its main size."""
    if release is None or not release.variant.startswith(VARIANT_2KTO4K):
        return None
    return [ProfileSpec(PROFILE_2K_CLASS_OPT, max=PROFILE_2K_CLASS_MAX), ProfileSpec(PROFILE_4K_CLASS_OPT)]


def engine_profiles(meta: ModelMetadata, specs: Sequence[ProfileSpec] | None, min_hw: HW | None = None,
                    opt_hw: HW | None = None, max_hw: HW | None = None, *, max_batch: int = 1) -> list[EngineProfile]:
    """The engine's profiles: one per spec (a spec's own min/max win over --min/--max), or
    one from --min/--opt/--max and the export's range when there are no specs."""
    if not specs:
        return [EngineProfile.for_metadata(meta, min_hw, opt_hw, max_hw, max_batch=max_batch)]
    if opt_hw is not None:
        raise EngineError("give either --opt or --profiles (each profile names its opt size), not both")
    return [EngineProfile.for_metadata(meta, spec.min or min_hw, spec.opt, spec.max or max_hw, max_batch=max_batch)
            for spec in specs]
