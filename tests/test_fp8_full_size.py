"""Full-size sd3/2kto4k (1.36B parameters, synthetic bf16 checkpoint) through `pid-export --precision fp8`
(calibration + export + accuracy guard) and TensorRT-RTX FP8 / bf16 builds on this CPU machine.

Slow (tens of minutes, ~15 GB RAM): run alone, `flock /tmp/pid-bigjob.lock python -m pytest -m slow
tests/test_fp8_full_size.py -s`. Prints wall time and peak RSS of each step, the guard's numbers and
the plan sizes (the numbers quoted in the FP8 notes). The weights are random: the guard's PSNR
says little about a trained checkpoint, so the export keeps the result either way
(--accept-accuracy-loss) and the test records whether the guard passed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest

from pid_export.fp8 import qdq_counts
from pid_export.onnx_lint import lint_model
from test_full_size_export import RELEASE, RUNNER, checkpoint  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow
RTX_TARGETS = ("8.9", "12.0")  # both plans for the same targets, so their sizes compare
# pid-export's engine step (the release's default profiles) on a finished export.
BUILD = """
import resource, sys
from pathlib import Path
from pid_export import get_release
from pid_export.pipeline import EngineOptions, ExportRequest, Stages, build_and_verify, plan_engine
release = get_release("sd3", "2kto4k")
plan = plan_engine(ExportRequest(release.network, Path(sys.argv[1]), release, precision=sys.argv[2],
                                 engine=EngineOptions(library="rtx", compute_capabilities=%r)), print)
build_and_verify(Path(sys.argv[1]), plan, stages=Stages(print))
print(f"PEAK_RSS_KIB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}")
""" % (RTX_TARGETS,)


def _child(args: list[str]) -> tuple[float, float, str]:
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, timeout=5400)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    text = proc.stdout + proc.stderr
    return seconds, int(text.split("PEAK_RSS_KIB")[-1].split()[0]) / 2**20, proc.stdout


def export(checkpoint, precision: str, out: Path, *extra: str) -> tuple[float, float, str]:  # noqa: F811
    return _child([sys.executable, "-c", RUNNER, "--backbone", RELEASE[0], "--variant", RELEASE[1],
                   "--checkpoint", str(checkpoint), "--precision", precision, "--onnx-only",
                   "--no-empty-caption", "--out", str(out), *extra])


def test_full_size_fp8_export_guard_and_rtx_build(checkpoint, tmp_path, capsys):  # noqa: F811
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX (tensorrt-rtx-cu13) is not installed")
    lines = []
    results = {}
    for precision, extra in (("fp8", ("--accept-accuracy-loss",)), ("bf16", ())):
        out = tmp_path / precision
        seconds, peak, stdout = export(checkpoint, precision, out, *extra)
        lines.append(f"{precision} export: {seconds:.0f} s, peak RSS {peak:.1f} GiB")
        build_s, build_peak, _ = _child([sys.executable, "-c", BUILD, str(out), precision])
        plan = out / "engine.plan"
        engine = json.loads((out / "engine.json").read_text())
        assert engine["compute_capabilities"] == list(RTX_TARGETS) and engine["precision"] == precision
        lines.append(f"{precision} TensorRT-RTX build ({', '.join(RTX_TARGETS)}, {len(engine['profiles'])} "
                     f"profiles): {build_s:.0f} s, peak RSS {build_peak:.1f} GiB, plan {plan.stat().st_size / 1e9:.2f} GB")
        results[precision] = (out, plan, stdout, max(peak, build_peak))

    fp8_dir, fp8_plan, fp8_stdout, fp8_peak = results["fp8"]
    bf16_plan = results["bf16"][1]
    meta = json.loads((fp8_dir / "pid_export.json").read_text())
    guard = meta["accuracy_guard"]
    ratio = fp8_plan.stat().st_size / bf16_plan.stat().st_size
    lines.append(f"FP8 plan / bf16 plan: {ratio:.2f}")
    lines.append(f"guard ({'passed' if guard['passed'] else 'FAILED: ' + '; '.join(guard['problems'])}): "
                 f"FP8 {guard['fp8_psnr']:.1f} dB / {guard['fp8_rel_error']:.2e}, bf16 {guard['base_psnr']:.1f} dB / "
                 f"{guard['base_rel_error']:.2e}, ratio {guard['error_ratio']:.2f}")
    lines.append("stages: " + " | ".join(line.strip() for line in fp8_stdout.splitlines()
                                         if line.startswith("[") or "done in" in line))
    with capsys.disabled():
        print("\n" + "\n".join(lines))

    model = onnx.load(str(fp8_dir / "model.onnx"), load_external_data=False)
    counts = qdq_counts(model)
    assert counts["matmul_fp8_weight"] == meta["quantization"]["quantized_layers"] == 14 * 10 - 4
    assert lint_model(model, expected_attention=16).ok
    assert fp8_peak < 22, "must fit a 24 GB machine"
    assert ratio < 0.8, "FP8 weights must shrink the plan"
