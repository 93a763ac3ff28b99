"""Checks an exported graph against what TensorRT can import and run well.

The operator list is onnx-tensorrt's docs/operators.md (TensorRT 10.0 table,
ops marked "Y"), plus the opset-23 ops TensorRT added later
(`Attention` in 10.14; `RMSNormalization`, `RotaryEmbedding` in 10.15; see
../shared/TRT_NOTES.md). We target TensorRT >= 10.14, so the 10.15 ops are
reported as problems.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from pathlib import Path

import onnx

TRT_10_0_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike
Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace
DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements
GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
GroupNormalization GRU HardSigmoid HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf
IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool
MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not
OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean
ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round
ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice
Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK
Transpose Trilu Unsqueeze Upsample Where Xor
""".split())
TRT_ADDED_OPS = {"Attention": "10.14", "RMSNormalization": "10.15", "RotaryEmbedding": "10.15"}
MIN_TRT = "10.14"


def supported_ops(trt_version: str = MIN_TRT) -> frozenset[str]:
    def key(v: str) -> tuple[int, ...]:
        return tuple(int(p) for p in v.split("."))

    added = {op for op, since in TRT_ADDED_OPS.items() if key(since) <= key(trt_version)}
    return TRT_10_0_OPS | added


@dataclass
class LintReport:
    op_counts: dict[str, int]
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def histogram(self) -> str:
        return ", ".join(f"{op} {n}" for op, n in sorted(self.op_counts.items(), key=lambda kv: -kv[1]))


def lint_model(model: onnx.ModelProto | str | Path, expected_attention: int | None = None,
               trt_version: str = MIN_TRT) -> LintReport:
    """Op histogram plus problems: unsupported ops, unfused attention, float64 tensors."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    graph = model.graph
    counts = collections.Counter(node.op_type for node in graph.node)
    report = LintReport(dict(counts))
    allowed = supported_ops(trt_version)
    for op in sorted(counts):
        if op not in allowed:
            since = TRT_ADDED_OPS.get(op)
            why = f"needs TensorRT >= {since}" if since else "not imported by TensorRT"
            report.problems.append(f"op {op} x{counts[op]}: {why}")
    # Attention must be one fused unit per layer: the opset-23 Attention op, never a loose Softmax.
    if counts.get("Softmax"):
        report.problems.append(f"{counts['Softmax']} loose Softmax op(s): attention is not a single fused op")
    if expected_attention is not None and counts.get("Attention", 0) != expected_attention:
        report.problems.append(f"expected {expected_attention} Attention ops, found {counts.get('Attention', 0)}")
    double = onnx.TensorProto.DOUBLE
    for init in graph.initializer:
        if init.data_type == double:
            report.problems.append(f"float64 initializer {init.name}")
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == double:
                report.problems.append(f"Cast to float64 at {node.name}")
            if attr.name == "value" and attr.t.data_type == double:
                report.problems.append(f"float64 constant at {node.name}")
    for vi in list(graph.value_info) + list(graph.input) + list(graph.output):
        if vi.type.tensor_type.elem_type == double:
            report.problems.append(f"float64 tensor {vi.name}")
    return report
