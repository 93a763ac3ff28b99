"""pid_runtime: the thin runtime for exported PiD decoders (never imports pid_export)."""

from .sampler import T_LIST, draw_noise, sample, timesteps
from .decoder import PidDecoder  # noqa: E402 (after the sampler: decoder imports the rest of the runtime)

__all__ = ["T_LIST", "PidDecoder", "draw_noise", "sample", "timesteps"]
