"""pid_runtime: the thin runtime for exported PiD decoders (never imports pid_export)."""

from .decoder import PidDecoder
from .sampler import T_LIST, draw_noise, sample, timesteps

__all__ = ["T_LIST", "PidDecoder", "draw_noise", "sample", "timesteps"]
