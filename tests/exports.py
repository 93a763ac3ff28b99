"""Golden-network exports made once per test run (and kept between runs), shared by every test.

The API (what a test needs; everything else here is how):

    shared_export(case, precision="fp32", static_shape=None) -> Path
        The export directory (model.onnx + data + pid_export.json) of golden case `case`
        (shared/golden/CASE.json + CASE.pth) exported by `export_onnx` at `precision`,
        dynamic shapes unless `static_shape=(batch, H, W)`. READ ONLY: every test of the
        run (and every xdist worker) gets the same directory.
    private_export(case, dest, precision="fp32", static_shape=None) -> Path
        A copy of that export at `dest` (made from the shared one: copying is cheap, exporting
        is not), for a test that writes into its export (an engine beside it, a caption, ...).
    export_cases(cases, root=None, precision="fp32") -> {case: Path}
        Several cases at once, the missing ones exported POOL_SIZE at a time (older API, kept).
    Fixtures: `export_root` (sets the cache up; request it, or `golden_exports`, before calling
    the functions above) and `golden_exports` (every golden case at fp32).

One export per (network config, checkpoint bytes, precision, options, exporter sources): the
entry `<cache>/<sources key>/<label>-<entry digest>/` is keyed by the modules that decide what an
export contains (SOURCE_FILES), the library versions, the case's JSON and checkpoint bytes, the
precision and the options. Changing any of them gives a new entry instead of a stale one (entries
of older sources are deleted). The cache lives in pytest's cache dir (.pytest_cache/d/pid_golden_onnx),
so a second run reuses it; CI's two pytest commands share it too.

pytest-xdist: each entry has its own file lock, so two workers export two different graphs at
the same time and a worker that wants a graph another one is exporting waits for it and reuses it.
export_onnx writes into a staging directory and moves it into place, so a complete entry is never
half-written.

Tests about the exporting step itself (its failures, staging, CLI) still export on their own;
tests that only need a graph use these. Use the smallest golden case that covers the path.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import multiprocessing
import shutil
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import torch

from conftest import GOLDEN, GOLDEN_CASES, REPO, golden_net, golden_tensors  # noqa: F401 (re-exported)

CASES = tuple(GOLDEN_CASES)
POOL_SIZE = 2

# The modules that decide what an export contains (the rest of pid_export does not): the exporter,
# the network and its config, the declaration of its inputs, the precision policy, the lint whose
# report the export records, the release table (backbone, variant sides) and the metadata file format.
SOURCE_FILES = ("pid_export/onnx_export.py", "pid_export/network.py", "pid_export/config.py", "runtime/signature.py",
                "pid_export/releases.py", "pid_export/precision.py", "pid_export/onnx_lint.py", "runtime/metadata.py")

_cache_root: Path | None = None
# Entries this process handed out, with their files as they were: checked when the session ends.
_handed_out: dict[Path, dict[str, tuple[int, int]]] = {}


@dataclass(frozen=True)
class ExportRequest:
    """What determines one export: the golden case (its config and checkpoint), precision, options."""

    case: str
    precision: str = "fp32"
    static_shape: tuple[int, int, int] | None = None

    @property
    def label(self) -> str:
        precision = "" if self.precision == "fp32" else f"-{self.precision}"
        static = "" if self.static_shape is None else "-static" + "x".join(map(str, self.static_shape))
        return f"{self.case}{precision}{static}"

    def digest(self) -> str:
        """Hash of the case's network config and checkpoint bytes, the precision and the options."""
        digest = hashlib.sha256()
        for suffix in (".json", ".pth"):
            digest.update((GOLDEN / f"{self.case}{suffix}").read_bytes())
        digest.update(json.dumps([self.precision, self.static_shape]).encode())
        return digest.hexdigest()[:12]


def cache_key() -> str:
    """Hash of the exporter sources and library versions (the part shared by every entry)."""
    import onnx
    import onnxscript

    digest = hashlib.sha256()
    for name in SOURCE_FILES:
        digest.update(name.encode() + (REPO / name).read_bytes())
    digest.update(f"{torch.__version__} {onnx.__version__} {onnxscript.__version__}".encode())
    return digest.hexdigest()[:16]


def _snapshot(export_dir: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in export_dir.iterdir()}


def _is_complete(export_dir: Path) -> bool:
    return (export_dir / "pid_export.json").is_file() and (export_dir / "model.onnx").is_file()


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _entry_dir(root: Path, key: str, request: ExportRequest) -> Path:
    return root / key / f"{request.label}-{request.digest()}"


def _ensure(root: str, key: str, request: ExportRequest) -> str:
    """Export `request` into its entry unless it is there; the entry's lock makes it once per run."""
    from pid_export.onnx_export import export_onnx

    entry = _entry_dir(Path(root), key, request)
    with _locked(entry.with_name(entry.name + ".lock")):
        if not _is_complete(entry):
            export_onnx(golden_net(request.case), entry, precision=request.precision,
                        static_shape=request.static_shape)
    return str(entry)


def _ensure_in_worker(root: str, key: str, request: ExportRequest) -> str:
    """Pool worker: one thread each, the pool is the parallelism (the CPU is small and shared)."""
    torch.set_num_threads(1)
    return _ensure(root, key, request)


def _prepared_root(root: Path | None) -> tuple[Path, str]:
    """The cache root and the current sources key; entries of older sources are removed."""
    root = root or _cache_root
    if root is None:
        raise RuntimeError("export cache not set up: request the export_root (or golden_exports) fixture")
    key = cache_key()
    with _locked(root / ".lock"):
        for stale in root.iterdir():  # exports of older sources: never used again
            if stale.is_dir() and stale.name != key:
                shutil.rmtree(stale, ignore_errors=True)
        (root / key).mkdir(parents=True, exist_ok=True)
    return root, key


def export_many(requests: list[ExportRequest], root: Path | None = None) -> dict[ExportRequest, Path]:
    """Entry directories of `requests`, the missing ones exported POOL_SIZE at a time."""
    root, key = _prepared_root(root)
    wanted = {request: _entry_dir(root, key, request) for request in requests}
    missing = [request for request, path in wanted.items() if not _is_complete(path)]
    if len(missing) == 1:
        _ensure(str(root), key, missing[0])
    elif missing:
        # spawn: a forked child would inherit torch's thread pools mid-state.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=POOL_SIZE, mp_context=context) as pool:
            list(pool.map(_ensure_in_worker, [str(root)] * len(missing), [key] * len(missing), missing))
    for request, path in wanted.items():
        assert _is_complete(path), f"export of {request.label} is incomplete"
        _handed_out.setdefault(path, _snapshot(path))
    return wanted


def shared_export(case: str, precision: str = "fp32", static_shape: tuple[int, int, int] | None = None,
                  root: Path | None = None) -> Path:
    """The shared export directory of golden `case` (read only: see private_export)."""
    request = ExportRequest(case, precision, static_shape)
    return export_many([request], root)[request]


def private_export(case: str, dest: Path, precision: str = "fp32",
                   static_shape: tuple[int, int, int] | None = None, root: Path | None = None) -> Path:
    """A copy of the shared export at `dest` (which must not exist), for a test that writes into it."""
    shutil.copytree(shared_export(case, precision, static_shape, root), dest)
    return dest


def export_cases(cases: list[str] | tuple[str, ...], root: Path | None = None,
                 precision: str = "fp32") -> dict[str, Path]:
    """Shared export directories of `cases` at `precision` (dynamic shapes), keyed by case."""
    requests = [ExportRequest(case, precision) for case in cases]
    exported = export_many(requests, root)
    return {request.case: exported[request] for request in requests}


@pytest.fixture(scope="session")
def export_root(request: pytest.FixtureRequest) -> Iterator[Path]:
    """Persistent cache directory of the golden exports (pytest's cache dir); at the end of the
    session, checks that no test wrote into a shared export."""
    global _cache_root
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    if cache is not None:
        _cache_root = Path(cache.mkdir("pid_golden_onnx"))
    else:
        _cache_root = request.getfixturevalue("tmp_path_factory").mktemp("pid_golden_onnx")
    yield _cache_root
    # A test that wrote into a shared export would change what every later test (and run) sees:
    # fail the session and drop the entry, so the next run exports it afresh.
    changed = [path for path, files in _handed_out.items() if not path.is_dir() or _snapshot(path) != files]
    for path in changed:
        shutil.rmtree(path, ignore_errors=True)
    assert not changed, f"tests wrote into shared exports (use private_export): {[p.name for p in changed]}"


@pytest.fixture(scope="session")
def golden_exports(export_root: Path) -> dict[str, Path]:
    """Every golden case exported (fp32 ONNX + metadata), keyed by case name."""
    return export_cases(CASES, export_root)
