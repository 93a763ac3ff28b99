"""Full-size release (1.36B parameters, synthetic bf16 checkpoint in the released layout) through
`pid-export` in every precision; the fp32 export runs in ONNX Runtime at 256x256.

Slow: minutes per precision and ~10-15 GB of RAM. Run with `python -m pytest -m slow`.
Each run prints the export's wall time and peak RSS (the numbers quoted in the closing notes).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import rel_err
from pid_export import get_release, load_checkpoint
from pid_export.network import PidNet
from pid_export.onnx_lint import lint_model
from pid_export.synthetic import write_synthetic_checkpoint
from pid_runtime.metadata import INPUT_NAMES

pytestmark = pytest.mark.slow

RELEASE = ("sd3", "2kto4k")

# Runs pid-export in a child and reports the child's peak RSS (ru_maxrss is in KiB on Linux).
RUNNER = """
import resource, sys
from pid_export.cli import main
try:
    main(sys.argv[1:])
finally:
    print(f"PEAK_RSS_KIB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", file=sys.stderr)
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model_ema_bf16.pth"
    write_synthetic_checkpoint(get_release(*RELEASE), path)
    return path


def run_export(checkpoint, precision, out):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", RUNNER, "--backbone", RELEASE[0], "--variant", RELEASE[1],
                           "--checkpoint", str(checkpoint), "--precision", precision, "--onnx-only",
                           "--no-empty-caption", "--out", str(out)],
                          capture_output=True, text=True, timeout=3000)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak_gib = int(proc.stderr.split("PEAK_RSS_KIB")[-1].split()[0]) / 2**20
    return seconds, peak_gib, proc.stdout


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_full_size_export(precision, checkpoint, tmp_path, capsys):
    out = tmp_path / f"sd3-{precision}"
    seconds, peak_gib, stdout = run_export(checkpoint, precision, out)
    size_gb = sum(f.stat().st_size for f in out.iterdir()) / 1e9
    with capsys.disabled():
        print(f"\nfull-size sd3/2kto4k {precision} export: {seconds:.0f} s, peak RSS {peak_gib:.1f} GiB, "
              f"{size_gb:.2f} GB on disk")
    assert peak_gib < 22, "must fit a 24 GB machine"
    meta = json.loads((out / "pid_export.json").read_text())
    assert meta["precision"] == precision and meta["release"] == "PiD_res2kto4k_sr4x_official_sd3_distill_4step"
    report = lint_model(out / "model.onnx", expected_attention=16)
    assert report.ok, report.problems

    if precision != "fp32":
        model = onnx.load(str(out / "model.onnx"), load_external_data=False)
        want = onnx.TensorProto.FLOAT16 if precision == "fp16" else onnx.TensorProto.BFLOAT16
        assert any(i.data_type == want for i in model.graph.initializer)
        return

    # fp32: ONNX Runtime at 256x256 against the PyTorch network with the same weights.
    with torch.device("meta"):
        net = PidNet(get_release(*RELEASE).network)
    net.load_state_dict({k: v.float() for k, v in load_checkpoint(checkpoint).items()}, assign=True)
    net.eval()
    gen = torch.Generator().manual_seed(0)
    inputs = (torch.randn(1, 3, 256, 256, generator=gen), torch.tensor([866.0]),
              torch.randn(1, 300, 2304, generator=gen), torch.randn(1, 16, 8, 8, generator=gen),
              torch.tensor([0.0]))
    with torch.no_grad():
        want = net(*inputs)
    del net
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {k: v.numpy() for k, v in zip(INPUT_NAMES, inputs)})[0]
    err = rel_err(got, want)
    with capsys.disabled():
        print(f"full-size fp32 export vs PyTorch at 256x256: relative error {err:.2e}")
    assert err < 1e-4
