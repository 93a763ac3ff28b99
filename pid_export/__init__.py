"""pid-export: ONNX / TensorRT export of NVIDIA's PiD pixel diffusion decoders.

The public names are imported on first use (PEP 562), so `pid-export` can install its signal
handlers (pid_export.entry) before torch is imported: Ctrl-C during start-up is one line too.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "PidNet": ".network",
    "PidConfig": ".config", "ConfigError": ".config",
    "load_checkpoint": ".checkpoints", "verify_checkpoint": ".checkpoints",
    "resolve_checkpoint": ".checkpoints", "CheckpointError": ".checkpoints",
    "Release": ".releases", "UnknownReleaseError": ".releases", "get_release": ".releases",
    "release_by_name": ".releases", "all_releases": ".releases",
}

__all__ = list(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'pid_export' has no attribute {name!r}")
    value = getattr(import_module(_PUBLIC[name], __name__), name)
    globals()[name] = value  # imported once
    return value
