"""pid-export: ONNX / TensorRT export of NVIDIA's PiD pixel diffusion decoders."""

__version__ = "0.1.0"

from .config import ConfigError, PidConfig
from .network import PidNet
from .checkpoints import CheckpointError, load_checkpoint, resolve_checkpoint, verify_checkpoint
from .releases import Release, UnknownReleaseError, all_releases, get_release, release_by_name

__all__ = ["PidNet", "PidConfig", "ConfigError",
           "load_checkpoint", "verify_checkpoint", "resolve_checkpoint", "CheckpointError",
           "Release", "UnknownReleaseError", "get_release", "release_by_name", "all_releases"]
