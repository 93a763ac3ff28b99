"""The FP8 accuracy guard: decode held-out inputs with the FP8 graph and the float32 network.

For each held-out item (never calibrated on) the 4-step sampler runs three
times with the same noise:
  - the float32 PyTorch network (the reference),
  - the FP8 ONNX graph in ONNX Runtime with `session.disable_quant_qdq` (Q/DQ run
    as fake quantisation, exactly the rounding TensorRT's FP8 GEMMs see),
  - the base-precision (bf16 / fp16) ONNX graph the FP8 one was made from, the same way.
Reported per item and overall: PSNR of the images vs float32 (images in [-1, 1],
peak-to-peak 2) and relative L2 error. The export fails unless the FP8 PSNR is
at least `min_psnr` and the FP8 error at most `max_error_ratio` times the
base-precision error.

ONNX Runtime's CPU provider has no bf16 kernels (and few fp16 ones), so both
ONNX graphs run *widened*: every bf16/fp16 tensor becomes float32 and every op
that produced one is followed by a round trip through its original type
(Cast(bf16) -> Cast(float)). Values are exactly the low-precision values at
every op boundary, as in an engine that stores each tensor in bf16 (a fused
TensorRT kernel may keep some intermediates in float32, so this is if anything
pessimistic). Weights widen exactly; FP8 weights stay FP8.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor

from pid_runtime.metadata import INPUT_NAMES
from pid_runtime.sampler import NonFiniteError

from .calibration import CalibrationError, CalibrationItem, decode
from .fp8 import save_model

DEFAULT_MIN_PSNR = 35.0
DEFAULT_MAX_ERROR_RATIO = 4.0
LOW_PRECISION = (TensorProto.BFLOAT16, TensorProto.FLOAT16)
Log = Callable[[str], None]


class AccuracyGuardFailed(RuntimeError):
    """The FP8 graph is less accurate than the thresholds allow (one line)."""


@dataclass
class GuardThresholds:
    min_psnr: float = DEFAULT_MIN_PSNR
    max_error_ratio: float = DEFAULT_MAX_ERROR_RATIO


@dataclass
class ItemResult:
    name: str
    size: list[int]  # [H, W]
    fp8_psnr: float
    fp8_rel_error: float
    base_psnr: float
    base_rel_error: float


@dataclass
class GuardReport:
    base_precision: str
    thresholds: GuardThresholds
    items: list[ItemResult] = field(default_factory=list)
    fp8_psnr: float = 0.0
    base_psnr: float = 0.0
    fp8_rel_error: float = 0.0
    base_rel_error: float = 0.0
    accepted_loss: bool = False
    held_out: str = ""  # where the held-out inputs came from
    errors: list[str] = field(default_factory=list)  # e.g. NaN/Inf output of a graph
    method: str = ("4-step decode, same noise; float32 reference: PyTorch; FP8 and base graphs: ONNX Runtime CPU, "
                   "session.disable_quant_qdq, low-precision tensors widened to float32 with a round trip "
                   "through their type after every op")

    @property
    def error_ratio(self) -> float:
        return self.fp8_rel_error / self.base_rel_error if self.base_rel_error > 0 else math.inf

    @property
    def problems(self) -> list[str]:
        out = list(self.errors)
        if not self.fp8_psnr >= self.thresholds.min_psnr:
            out.append(f"FP8 PSNR {self.fp8_psnr:.1f} dB is below {self.thresholds.min_psnr:g} dB")
        if not self.error_ratio <= self.thresholds.max_error_ratio:
            out.append(f"FP8 error {self.fp8_rel_error:.2e} is {self.error_ratio:.1f}x the {self.base_precision} "
                       f"error {self.base_rel_error:.2e} (limit {self.thresholds.max_error_ratio:g}x)")
        return out

    @property
    def passed(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        return (f"vs float32 on {len(self.items)} held-out image(s): FP8 {self.fp8_psnr:.1f} dB PSNR, "
                f"rel. error {self.fp8_rel_error:.2e}; {self.base_precision} {self.base_psnr:.1f} dB, "
                f"{self.base_rel_error:.2e} (FP8/{self.base_precision} error {self.error_ratio:.2f}x)")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(error_ratio=self.error_ratio, passed=self.passed, problems=self.problems)
        return data


def psnr(image: np.ndarray, reference: np.ndarray, peak_to_peak: float = 2.0) -> float:
    mse = float(np.mean((image.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(peak_to_peak**2 / mse)


def rel_error(image: np.ndarray, reference: np.ndarray) -> float:
    ref = reference.astype(np.float64)
    return float(np.linalg.norm(image.astype(np.float64) - ref)) / max(float(np.linalg.norm(ref)), 1e-30)


# ---------------------------------------------------------------------------
# Running a low-precision ONNX graph in ONNX Runtime's CPU provider


def widen_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` (changed in place) in float32, rounding to bf16/fp16 wherever it stored that type.

    Needs value_info from shape inference (pid-export's graphs have it) to know each
    output's type; an op output whose type is unknown is assumed float32.
    """
    if not model.graph.value_info:
        raise ValueError("widen_model needs a shape-inferred graph (value_info)")
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.output)}
    for init in g.initializer:
        if init.data_type in LOW_PRECISION:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32), init.name))
    nodes = []
    for node in g.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type in LOW_PRECISION:
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float32), attr.t.name))
            if node.op_type == "DequantizeLinear" and attr.name == "output_dtype" and attr.i in LOW_PRECISION:
                attr.i = TensorProto.FLOAT
        nodes.append(node)
        cast_to = next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None
        for index, name in enumerate(node.output):
            low = cast_to if cast_to is not None else types.get(name)
            if low not in LOW_PRECISION or not name:
                continue
            if cast_to is not None:  # already rounds to `low`; widen its result
                node.output[index] = f"{name}__low"
                nodes.append(helper.make_node("Cast", [f"{name}__low"], [name], to=TensorProto.FLOAT))
            else:  # computed in float32 now: round through `low`, then widen
                node.output[index] = f"{name}__wide"
                nodes.append(helper.make_node("Cast", [f"{name}__wide"], [f"{name}__low"], to=low))
                nodes.append(helper.make_node("Cast", [f"{name}__low"], [name], to=TensorProto.FLOAT))
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    return model


class OnnxVelocity:
    """velocity(x, t, item) of an exported graph in ONNX Runtime (CPU), low precision widened."""

    def __init__(self, onnx_path: Path, workdir: Path):
        from pid_runtime.backends.base import BackendError
        from pid_runtime.backends.onnxruntime import create_session

        widened = workdir / f"{Path(onnx_path).parent.name}-widened.onnx"
        widened_graph = widen_model(onnx.load(str(onnx_path)))
        save_model(widened_graph, widened)
        del widened_graph
        try:  # Q/DQ as written (fake quantisation), not fused into ORT's integer/FP8 kernels
            self.session = create_session(widened, torch.device("cpu"), fuse_qdq=False, name=onnx_path)
        except BackendError as exc:
            raise CalibrationError(f"the accuracy guard cannot run {onnx_path}: {exc}") from None

    def __call__(self, x: Tensor, t: Tensor, item: CalibrationItem) -> Tensor:
        feeds = dict(zip(INPUT_NAMES, (x.cpu().numpy(), t.cpu().numpy(), item.caption.numpy(),
                                       item.latents.numpy(), np.full((1,), item.sigma, np.float32))))
        (out,) = self.session.run(["velocity"], feeds)
        return torch.from_numpy(np.asarray(out, dtype=np.float32))


# ---------------------------------------------------------------------------
# The guard


def run_guard(fp8_onnx: Path, base_onnx: Path, base_precision: str, items: Sequence[CalibrationItem],
              references: Sequence[Tensor], pixel_scale: int, thresholds: GuardThresholds, seed: int,
              held_out: str = "", log: Log = lambda message: None) -> GuardReport:
    """Decode `items` with both ONNX graphs and compare with `references` (float32 decodes, same seeds)."""
    report = GuardReport(base_precision, thresholds, held_out=held_out)
    cpu = torch.device("cpu")
    decoded: dict[str, list[np.ndarray]] = {}
    with tempfile.TemporaryDirectory(prefix="pid-fp8-guard-") as tmp:
        for label, path in (("fp8", fp8_onnx), (base_precision, base_onnx)):
            velocity = OnnxVelocity(path, Path(tmp))
            decoded[label] = []
            for index, item in enumerate(items):
                log(f"{label} decode of {item.describe(pixel_scale)} (ONNX Runtime)")
                try:
                    decoded[label].append(decode(velocity, item, pixel_scale, seed + index, cpu).numpy())
                except NonFiniteError as exc:  # counts as a failed guard, with the reason
                    report.errors.append(f"the {label} graph produced NaN/Inf on {item.name} ({exc})")
                    decoded[label].append(np.full(references[index].shape, np.nan, np.float32))
            del velocity
    sq_fp8 = sq_base = sq_ref = 0.0
    pixels = 0
    for index, item in enumerate(items):
        ref = references[index].numpy()
        fp8, base = decoded["fp8"][index], decoded[base_precision][index]
        report.items.append(ItemResult(item.name, list(ref.shape[-2:]), psnr(fp8, ref), rel_error(fp8, ref),
                                       psnr(base, ref), rel_error(base, ref)))
        sq_fp8 += float(np.sum((fp8.astype(np.float64) - ref) ** 2))
        sq_base += float(np.sum((base.astype(np.float64) - ref) ** 2))
        sq_ref += float(np.sum(ref.astype(np.float64) ** 2))
        pixels += ref.size
    report.fp8_psnr = _psnr_from_mse(sq_fp8 / pixels)
    report.base_psnr = _psnr_from_mse(sq_base / pixels)
    report.fp8_rel_error = math.sqrt(sq_fp8 / max(sq_ref, 1e-30))
    report.base_rel_error = math.sqrt(sq_base / max(sq_ref, 1e-30))
    return report


def _psnr_from_mse(mse: float) -> float:
    return math.inf if mse == 0 else 10.0 * math.log10(4.0 / mse)
