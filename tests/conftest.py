"""Shared test fixtures: where ../shared/golden is, and the golden cases in it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
GOLDEN = SHARED / "golden"
GOLDEN_CASES = sorted(p.stem for p in GOLDEN.glob("tiny_*.json")) if GOLDEN.is_dir() else []


def golden_case(name: str) -> dict:
    """The case's JSON plus paths of its checkpoint and tensors."""
    if not GOLDEN.is_dir():
        pytest.skip(f"golden vectors not found at {GOLDEN} (shared/ must sit next to the repo)")
    case = json.loads((GOLDEN / f"{name}.json").read_text())
    case["pth"] = GOLDEN / f"{name}.pth"
    case["tensors"] = GOLDEN / f"{name}.safetensors"
    return case


def golden_net(name: str):
    """PidNet of a golden case with its checkpoint loaded (float32, eval)."""
    import torch

    from pid_export import PidNet

    case = golden_case(name)
    net = PidNet.from_config(case["network"]).eval()
    state = torch.load(case["pth"], weights_only=True, map_location="cpu")
    net.load_state_dict({k.removeprefix("net."): v for k, v in state.items()
                         if not k.startswith("net.lq_proj.lq_aux_rgb_head.")}, strict=True)
    return net


def golden_tensors(name: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(golden_case(name)["tensors"]))


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| (float64)."""
    import torch

    a = torch.as_tensor(a).detach().cpu().double()  # engine outputs live on the GPU
    b = torch.as_tensor(b).detach().cpu().double()
    return float((a - b).norm() / b.norm())


def pytest_configure(config: pytest.Config) -> None:
    """CPU threads of each test process: the cores shared out among pytest-xdist's workers.

    PyTorch's default (one thread per core in every worker) oversubscribes the CPU under `-n 2`,
    and its spinning threads then run the small test networks several times slower than one
    thread each does. An OMP_NUM_THREADS given by the user wins; subprocesses (pid-export,
    pid-run) inherit it. The xdist controller runs no tests and leaves the environment alone."""
    worker = getattr(config, "workerinput", None)
    if worker is None and getattr(config.option, "numprocesses", None):  # the xdist controller
        return
    workers = worker["workercount"] if worker else 1
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // workers)))
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def golden_cases() -> list[str]:
    if not GOLDEN_CASES:
        pytest.skip(f"golden vectors not found at {GOLDEN}")
    return GOLDEN_CASES
