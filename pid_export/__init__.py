"""pid-export: ONNX / TensorRT export of NVIDIA's PiD pixel diffusion decoders."""

from .config import ConfigError, PidConfig
from .network import PidNet

__all__ = ["PidNet", "PidConfig", "ConfigError"]
