"""Benchmarks of PiD decoding: FLOP model, latency harness, GPU script (see README.md).

The runtime package is `pid_runtime`, which the project's install maps onto the
`runtime/` folder. On a machine where the project is not installed (a bare GPU
box running the GPU script from a checkout), the folder is registered under that
name here so `import pid_runtime` still works.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def _ensure_pid_runtime() -> None:
    if "pid_runtime" in sys.modules or importlib.util.find_spec("pid_runtime") is not None:
        return
    runtime_dir = Path(__file__).resolve().parent.parent / "runtime"
    spec = importlib.util.spec_from_file_location("pid_runtime", runtime_dir / "__init__.py",
                                                  submodule_search_locations=[str(runtime_dir)])
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["pid_runtime"] = module
    spec.loader.exec_module(module)


_ensure_pid_runtime()
