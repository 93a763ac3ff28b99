"""`pid-export --verify`'s decision (issue 10, fix 1) with real numbers, and the measurements
behind its per-precision tolerance.

An engine cannot run here (no GPU), so the decision is fed real outputs: the golden
reference velocity against our own network's (right), the bf16 network's (right for a bf16
engine, too coarse for an fp32 one) and plausible engine bugs (wrong). The tolerance is
justified by measuring each precision's graph error against the float32 network on the
CPU with verify's own inputs: PyTorch at the export precision and ONNX Runtime on the
exported graphs (fp32 here; fp16 with -m engine_matrix, where its exports are cached).
"""

from __future__ import annotations

import copy

import numpy as np
import onnxruntime as ort
import pytest
import torch

from conftest import golden_net, golden_tensors, rel_err
from exports import export_cases, export_root  # noqa: F401 (fixture)
from pid_export.engine import EngineError, EngineProfile
from pid_export.precision import apply_precision
from pid_export.verify import TOLERANCE, compare_with_reference, require_passed, verify_inputs, verify_sizes
from pid_runtime.metadata import INPUT_NAMES

MAIN = "tiny_v1_16ch_sr4"
MEASURED = (MAIN, "tiny_v1pt5_16ch")  # v1 and v1.5 networks; every case with -m engine_matrix
# The tolerance must leave this factor over the graph's own error for the engine's kernels.
ENGINE_MARGIN = 3


def golden_outputs(case: str = MAIN) -> tuple[np.ndarray, dict, torch.nn.Module]:
    g = golden_tensors(case)
    return g["velocity"].numpy(), g, golden_net(case)


def run(net: torch.nn.Module, inputs: dict) -> np.ndarray:
    with torch.no_grad():
        return net(*(inputs[n] for n in INPUT_NAMES)).float().numpy()


def judged(got, want, precision: str):
    return compare_with_reference(got, want, precision, reference="golden", x_shape=list(want.shape))


# ---------------------------------------------------------------------------
# The decision


def test_right_outputs_pass_for_every_precision():
    want, g, net = golden_outputs()
    ours = run(net, g)  # the float32 network against the reference implementation's output
    for precision in TOLERANCE:
        result = judged(ours, want, precision)
        assert result.passed and result.rel_error < 1e-5, result.summary()
    require_passed([judged(ours, want, "bf16")])


def test_precision_decides_how_close_is_close_enough():
    want, g, net = golden_outputs()
    bf16 = run(apply_precision(copy.deepcopy(net), "bf16"), g)
    assert judged(bf16, want, "bf16").passed  # what a healthy bf16 engine gives
    assert not judged(bf16, want, "fp32").passed  # an "fp32" engine this far off is wrong


@pytest.mark.parametrize("bug", ["channels swapped", "wrong timestep", "one NaN", "one Inf", "zeros",
                                 "half scale", "other batch item"])
def test_wrong_engine_outputs_fail_for_every_precision(bug):
    want, g, net = golden_outputs("tiny_v1_16ch_sr4_b2")  # batch 2: room for a mixed-up item
    if bug == "channels swapped":
        got = want[:, ::-1]
    elif bug == "wrong timestep":
        got = run(net, dict(g, t=torch.full_like(g["t"], 999.0)))
    elif bug in ("one NaN", "one Inf"):
        got = want.copy()
        got[0, 0, 0, 0] = np.nan if bug == "one NaN" else np.inf
    elif bug == "zeros":
        got = np.zeros_like(want)
    elif bug == "half scale":
        got = want * 0.5
    else:
        got = want[::-1]
    for precision in TOLERANCE:
        result = judged(got, want, precision)
        assert not result.passed, (bug, precision, result.summary())
        with pytest.raises(EngineError, match=r"^engine verification failed: engine vs golden at x\[2, 3, "):
            require_passed([judged(want, want, precision), result])
    if "N" in bug or "Inf" in bug:
        assert "NaN/Inf" in judged(got, want, "bf16").summary()


def test_no_check_at_all_is_a_failure():
    with pytest.raises(EngineError, match="not verified at any size"):
        require_passed([])


def test_verify_covers_min_opt_and_max_of_every_profile():
    cfg = golden_net(MAIN).cfg
    small = EngineProfile.for_config(cfg, (32, 32), (64, 96), (128, 128), max_batch=2).to_dict()
    large = EngineProfile.for_config(cfg, (32, 32), (192, 192), (256, 256), max_batch=2).to_dict()
    assert verify_sizes([small]) == [("min", 1, 32, 32, 0), ("opt", 1, 64, 96, 0), ("max", 2, 128, 128, 0)]
    # The second profile shares its min with the first: it is still run there, as its own point (issue 20).
    assert verify_sizes([small, large]) == [
        ("min of profile 1", 1, 32, 32, 0), ("opt of profile 1", 1, 64, 96, 0), ("max of profile 1", 2, 128, 128, 0),
        ("min of profile 2", 1, 32, 32, 1), ("opt of profile 2", 1, 192, 192, 1), ("max of profile 2", 2, 256, 256, 1)]
    same = EngineProfile.for_config(cfg, (64, 64), (64, 64), (128, 128)).to_dict()  # min == opt: one run
    assert verify_sizes([same]) == [("min", 1, 64, 64, 0), ("max", 1, 128, 128, 0)]


# ---------------------------------------------------------------------------
# The tolerance: each precision's graph error, measured with verify's inputs


def measured_errors(case: str, precision: str) -> list[float]:
    """Relative error of the network at `precision` vs float32, at a profile's min/opt/max sizes."""
    net = golden_net(case)
    reduced = apply_precision(copy.deepcopy(net), precision)
    prof = EngineProfile.for_config(net.cfg, *[(k * net.cfg.pixel_scale,) * 2 for k in (1, 2, 4)],
                                    max_batch=2).to_dict()
    errors = []
    for _label, batch, height, width, _profile in verify_sizes([prof]):
        inputs = verify_inputs(prof, batch, height, width)
        errors.append(rel_err(run(reduced, inputs), run(net, inputs)))
    return errors


def check_tolerance(case: str, precision: str, errors: list[float], capsys) -> None:
    with capsys.disabled():
        print(f"\n{case} {precision} graph vs fp32: " + ", ".join(f"{e:.2e}" for e in errors)
              + f" (tolerance {TOLERANCE[precision]:g})")
    assert all(np.isfinite(errors))
    assert max(errors) * ENGINE_MARGIN < TOLERANCE[precision]


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("case", MEASURED)
def test_tolerance_covers_the_reduced_precision_graph_error(case, precision, capsys):
    check_tolerance(case, precision, measured_errors(case, precision), capsys)


@pytest.mark.engine_matrix
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_tolerance_covers_every_golden_case(precision, golden_cases, capsys):
    for case in golden_cases:
        check_tolerance(case, precision, measured_errors(case, precision), capsys)


def onnxruntime_errors(case: str, export_dir) -> list[float]:
    net = golden_net(case)
    session = ort.InferenceSession(str(export_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    prof = EngineProfile.for_config(net.cfg, *[(k * net.cfg.pixel_scale,) * 2 for k in (1, 2, 4)],
                                    max_batch=2).to_dict()
    errors = []
    for _label, batch, height, width, _profile in verify_sizes([prof]):
        inputs = verify_inputs(prof, batch, height, width)
        got = session.run(None, {n: inputs[n].numpy() for n in INPUT_NAMES})[0]
        errors.append(rel_err(got, run(net, inputs)))
    return errors


def test_tolerance_covers_the_fp32_graph_in_onnxruntime(export_root, capsys):  # noqa: F811
    check_tolerance(MAIN, "fp32", onnxruntime_errors(MAIN, export_cases([MAIN], export_root)[MAIN]), capsys)


@pytest.mark.engine_matrix
def test_tolerance_covers_the_fp16_graph_in_onnxruntime(export_root, capsys):  # noqa: F811
    check_tolerance(MAIN, "fp16", onnxruntime_errors(MAIN, export_cases([MAIN], export_root, "fp16")[MAIN]), capsys)
