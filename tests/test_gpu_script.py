"""benchmarks/gpu.py on the CPU (--smoke): its rows, its records, and that --budget-s is a hard
limit that still leaves valid results. No GPU here: the CUDA-only checks (noise on a CUDA
generator, CUDA graphs) run only on a lent GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = "latency-cpu-smoke.json"


def run_gpu_script(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--smoke", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_smoke_rows_record_latency_memory_and_accuracy(tmp_path):
    run = run_gpu_script("--rows", "overhead,eager-autocast,eager-bf16w,runtime-decode,reference,tensorrt",
                         "--sizes", "64x96", "--repeat", "1", "--out-dir", str(tmp_path))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    document = json.loads((tmp_path / RESULTS).read_text())
    records = {r["backend"]: r for r in document["records"]}
    assert set(records) == {"torch-eager-autocast", "torch-eager-bf16w", "pid-runtime-decode-bf16w", "tensorrt"}
    for name in ("torch-eager-autocast", "torch-eager-bf16w", "pid-runtime-decode-bf16w"):
        record = records[name]
        assert record["status"] == "ok", record["reason"]
        assert record["latency_ms_median"] > 0 and record["peak_host_rss_gb"] > 0
        assert 1e-5 < record["max_rel_err"] < 0.05  # bf16 against the fp32 reference (computed after them)
    # The runtime's decode path (its noise source, sampler, result buffer) computes exactly what the
    # harness's direct sampler call computes with the same network and noise.
    runtime = records["pid-runtime-decode-bf16w"]
    assert runtime["max_abs_diff_vs_torch_eager_bf16w"] == 0
    assert runtime["network_ms_median"] < runtime["latency_ms_median"]
    assert runtime["overhead_ms_median"] == pytest.approx(runtime["latency_ms_median"] - runtime["network_ms_median"],
                                                          rel=0.5)
    assert records["tensorrt"]["status"] == "skipped" and records["tensorrt"]["reason"]
    [overhead] = document["overhead"]
    assert overhead["status"] == "ok"
    assert overhead["stages"]["decode"]["host_peak_growth_images"] is not None  # too small an image to bound
    [reference] = document["references"]
    assert reference["status"] == "ok"
    table = (tmp_path / RESULTS.replace(".json", ".md")).read_text()
    assert "| pid-runtime-decode-bf16w |" in table and "Runtime overhead" in table
    assert "tensorrt 64x96: skipped" in table


def test_budget_ends_the_run_and_leaves_valid_results(tmp_path):
    """A row far longer than the budget is cut by the watchdog: exit 3, the row marked, JSON valid."""
    budget = 20
    start = time.monotonic()
    run = run_gpu_script("--rows", "eager-autocast", "--sizes", "64x96", "--repeat", "100000",
                         "--budget-s", str(budget), "--out-dir", str(tmp_path), timeout=budget + 120)
    elapsed = time.monotonic() - start
    assert run.returncode == 3, run.stdout[-3000:] + run.stderr[-3000:]
    assert elapsed < budget + 30  # interpreter start-up comes on top of the budget
    document = json.loads((tmp_path / RESULTS).read_text())
    assert document["cut_short"] is True
    if document["records"]:  # under a heavy load the budget can run out before the network is built
        [record] = document["records"]
        assert record["status"] == "failed" and "cut short" in record["reason"]
    assert "cut short by its time budget" in (tmp_path / RESULTS.replace(".json", ".md")).read_text()


def test_rows_that_do_not_fit_the_budget_are_skipped_with_the_reason(tmp_path):
    run = run_gpu_script("--rows", "compile-max-autotune", "--sizes", "64x96", "--budget-s", "60",
                         "--out-dir", str(tmp_path))
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]  # nothing measured
    [record] = json.loads((tmp_path / RESULTS).read_text())["records"]
    assert record["status"] == "skipped" and "time budget: expected ~120 s" in record["reason"]


@pytest.mark.slow
def test_gpu_script_smoke_on_cpu_with_compile(tmp_path):
    """Every row kind of the GPU script at a tiny size on the CPU, torch.compile's two modes
    included. Minutes: torch.compile builds C++."""
    run = run_gpu_script("--out-dir", str(tmp_path), "--budget-s", "1500", timeout=1800)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    document = json.loads((tmp_path / RESULTS).read_text())
    got = {(r["backend"], r["output_size"]): r for r in document["records"]}
    for name in ("torch-eager-autocast", "torch-eager-bf16w", "pid-runtime-decode-bf16w"):
        for size in ("64x96", "96x128"):
            assert got[(name, size)]["status"] == "ok", got[(name, size)]["reason"]
    for name in ("torch-compile-bf16w", "torch-compile-max-autotune-bf16w"):
        record = got[(name, "64x96")]
        assert record["status"] == "ok", record["reason"]
        assert 1e-5 < record["max_rel_err"] < 0.05
    for name in ("onnxruntime-cuda", "tensorrt", "tensorrt-rtx"):
        assert got[(name, "64x96")]["status"] == "skipped"
    assert (tmp_path / "latency-cpu-smoke.png").is_file()
