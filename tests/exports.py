"""Golden networks exported to ONNX once, cached on disk, shared by the runtime tests.

Each golden case (shared/golden/NAME.json + NAME.pth) is built with PidNet, loaded
with its checkpoint and exported with `export_onnx` (fp32, dynamic shapes) into
`<cache>/<key>/<case>/`. Exports take ~1 min each on a small CPU, so they are kept
in pytest's cache directory between runs; `key` hashes everything an export
depends on (exporter and network sources, golden files, library versions), so a
change to any of them produces fresh exports instead of stale ones.

Use the `golden_exports` fixture (all cases, exported two at a time) or
`export_cases([...])` for just the cases a test needs; `precision="bf16"` / `"fp16"`
gives the reduced-precision exports (`<case>-<precision>/`, same key), which the
engine-build tests share. A file lock serialises exporting across pytest-xdist
workers; the others wait and reuse the result.
"""

from __future__ import annotations

import fcntl
import hashlib
import multiprocessing
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import GOLDEN, GOLDEN_CASES, REPO, golden_net, golden_tensors  # noqa: F401 (re-exported)

CASES = tuple(GOLDEN_CASES)
POOL_SIZE = 2

# The modules that decide what an export contains (the rest of pid_export does not).
GRAPH_SOURCES = ("onnx_export.py", "network.py", "config.py", "precision.py")

_cache_root: Path | None = None


def cache_key() -> str:
    """Hash of everything an export depends on."""
    import onnx
    import onnxscript

    digest = hashlib.sha256()
    for path in [REPO / "pid_export" / name for name in GRAPH_SOURCES] + [REPO / "runtime" / "metadata.py"]:
        digest.update(path.name.encode() + path.read_bytes())
    for case in CASES:
        for suffix in (".json", ".pth"):
            digest.update((GOLDEN / f"{case}{suffix}").read_bytes())
    digest.update(f"{torch.__version__} {onnx.__version__} {onnxscript.__version__}".encode())
    return digest.hexdigest()[:16]


def _export_one(case: str, out_dir: str, precision: str = "fp32") -> str:
    from pid_export.onnx_export import export_onnx

    export_onnx(golden_net(case), out_dir, precision=precision)
    return case


def _export_in_worker(case: str, out_dir: str, precision: str = "fp32") -> str:
    """Pool worker: one thread each, the pool is the parallelism (the CPU is small and shared)."""
    torch.set_num_threads(1)
    return _export_one(case, out_dir, precision)


def _is_complete(export_dir: Path) -> bool:
    return (export_dir / "pid_export.json").is_file() and (export_dir / "model.onnx").is_file()


def export_cases(cases: list[str] | tuple[str, ...], root: Path | None = None,
                 precision: str = "fp32") -> dict[str, Path]:
    """Export directories of `cases` at `precision`, exporting the missing ones (POOL_SIZE at a time)."""
    root = root or _cache_root
    if root is None:
        raise RuntimeError("export cache not set up: use the golden_exports / export_root fixtures")
    key = cache_key()
    base = root / key
    suffix = "" if precision == "fp32" else f"-{precision}"
    wanted = {case: base / f"{case}{suffix}" for case in cases}
    # One exporter at a time across processes (pytest-xdist workers share the cache).
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for stale in root.iterdir():  # exports of older sources: never used again
            if stale.is_dir() and stale.name != key:
                shutil.rmtree(stale, ignore_errors=True)
        base.mkdir(parents=True, exist_ok=True)
        missing = [case for case, path in wanted.items() if not _is_complete(path)]
        if len(missing) == 1:
            _export_one(missing[0], str(wanted[missing[0]]), precision)
        elif missing:
            # spawn: a forked child would inherit torch's thread pools mid-state.
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=POOL_SIZE, mp_context=context) as pool:
                for done in pool.map(_export_in_worker, missing, [str(wanted[c]) for c in missing],
                                     [precision] * len(missing)):
                    assert _is_complete(wanted[done]), f"export of {done} is incomplete"
    return wanted


@pytest.fixture(scope="session")
def export_root(request: pytest.FixtureRequest) -> Path:
    """Persistent cache directory of the golden exports (pytest's cache dir)."""
    global _cache_root
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    if cache is not None:
        _cache_root = Path(cache.mkdir("pid_golden_onnx"))
    else:
        _cache_root = request.getfixturevalue("tmp_path_factory").mktemp("pid_golden_onnx")
    return _cache_root


@pytest.fixture(scope="session")
def golden_exports(export_root: Path) -> dict[str, Path]:
    """Every golden case exported (fp32 ONNX + metadata), keyed by case name."""
    return export_cases(CASES, export_root)
