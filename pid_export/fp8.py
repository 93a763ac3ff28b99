"""FP8 (E4M3) quantisation of an exported PiD graph: which layers, and the Q/DQ rewrite.

Per-tensor FP8 of the transformer blocks' matmuls (weights and their input
activations), written into the ONNX graph as TensorRT expects it:

    x (bf16) -> QuantizeLinear(s_x, fp8 zero) -> DequantizeLinear(s_x) --\
                                                                          MatMul -> bf16
    W (fp8 initializer) -> DequantizeLinear(s_w) ------------------------/

TensorRT fuses each DQ -> MatMul <- DQ into an FP8 GEMM; ONNX Runtime (with
`session.disable_quant_qdq`) and onnx.reference run the same graph as fake
quantisation, which is how the accuracy guard measures it.

The rewrite works on the finished base-precision (bf16 / fp16) export, after the
exporter's constant folding, so nothing folds the Q/DQ away. Each MatMul is
matched to its PidNet module through the exporter's per-node `name_scopes`
metadata; activation scales come from calibration (`calibration.py`), weight
scales from the weights.

Which layers: the patch blocks' attention projections (qkv, proj) and SwiGLU
MLPs (w1, w2, w3), for image and text tokens: 58% of the parameters and all of
the patch blocks' linear FLOPs (SPEC sec. 8). Kept in the base precision, by
measurement (`python -m pid_export.fp8_sensitivity`: each group quantised
alone, 4-step decodes vs float32), because each costs more accuracy than it
saves: the pixel blocks (their layers were the most sensitive of the block
layers, ~37 dB alone vs 46-53 dB for a patch group, for ~8% of the FLOPs at
2K and 2% of the weights), the adaLN modulation (34.6 dB alone: its output
scales and gates the whole residual stream), the embedders and final layer
(35 dB; tiny FLOPs next to the boundary), the LQ branch and its gates (26.5 dB)
and all norms. Attention itself stays in the base precision unless
`attention=True` (experimental: Q/DQ on its Q, K, V).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FP8_MAX = 448.0  # largest finite float8 e4m3fn value
# Activation scales cover 2x the calibrated amax. A calibration set never sees the true
# max (on the tiny golden net, amax calibrated at 512 px was 0.77..1.69x the 1024 px
# value per layer), clipping at +-448 is the costly failure, and a larger scale is
# nearly free in E4M3: values move down a binade and stay normal (even 1000x larger
# scales cost 0.6 dB of PSNR on the tiny golden net, tests/test_fp8.py).
ACTIVATION_HEADROOM = 2.0
FP8_DTYPE = ml_dtypes.float8_e4m3fn
BASE_PRECISIONS = ("bf16", "fp16")
NAME_SCOPES = "pkg.torch.onnx.name_scopes"

# Module-name patterns (PidNet naming) of the layers quantised to FP8.
QUANTIZED_LAYERS = (
    r"patch_blocks\.\d+\.attn\.(qkv_x|qkv_y|proj_x|proj_y)",
    r"patch_blocks\.\d+\.mlp_(x|y)\.(w1|w2|w3)",
)
ATTENTION_MODULES = (r"patch_blocks\.\d+\.attn", r"pixel_blocks\.\d+\.attn")
_LAYER_RE = re.compile("|".join(f"(?:{p})" for p in QUANTIZED_LAYERS))
_ATTENTION_RE = re.compile("|".join(f"(?:{p})" for p in ATTENTION_MODULES))


class QuantizationError(RuntimeError):
    """The graph cannot be quantised as designed (one line for the user)."""


def is_quantized_layer(module_name: str) -> bool:
    return _LAYER_RE.fullmatch(module_name) is not None


def is_attention_module(module_name: str) -> bool:
    return _ATTENTION_RE.fullmatch(module_name) is not None


def quantized_layer_names(net: Any) -> list[str]:
    """Names of `net`'s Linear modules that the policy quantises."""
    from torch import nn

    return [name for name, module in net.named_modules() if isinstance(module, nn.Linear) and is_quantized_layer(name)]


def attention_module_names(net: Any) -> list[str]:
    return [name for name, _ in net.named_modules() if is_attention_module(name)]


def fp8_scale(amax: float) -> float:
    """Per-tensor scale mapping [-amax, amax] onto FP8's [-448, 448]."""
    if not np.isfinite(amax):
        raise QuantizationError(f"calibration produced a non-finite amax ({amax}); check the calibration inputs")
    return max(float(amax), 1e-12) / FP8_MAX


def to_fp8(values: np.ndarray, scale: float) -> np.ndarray:
    """values / scale rounded to FP8 E4M3 (saturating at +-448, like QuantizeLinear)."""
    return np.clip(values.astype(np.float32) / np.float32(scale), -FP8_MAX, FP8_MAX).astype(FP8_DTYPE)


# ---------------------------------------------------------------------------
# The ONNX rewrite


@dataclass
class QuantizationSummary:
    """What `quantize_onnx` did; stored in pid_export.json under `quantization`."""

    base_precision: str
    layers: list[str] = field(default_factory=list)  # module names quantised
    attention: list[str] = field(default_factory=list)  # attention modules with FP8 Q/K/V
    quantize_nodes: int = 0
    dequantize_nodes: int = 0
    fp8_weight_bytes: int = 0
    calibration: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "fp8_e4m3 per-tensor, Q/DQ (QuantizeLinear/DequantizeLinear, float8e4m3fn zero point)",
            "base_precision": self.base_precision,
            "quantized_layers": len(self.layers),
            "layers": self.layers,
            "fp8_attention": self.attention,
            "quantize_nodes": self.quantize_nodes,
            "dequantize_nodes": self.dequantize_nodes,
            "fp8_weight_bytes": self.fp8_weight_bytes,
            "calibration": self.calibration,
        }


def node_module(node: onnx.NodeProto) -> str | None:
    """The PidNet module a node was traced from (the exporter's name_scopes metadata)."""
    for prop in node.metadata_props:
        if prop.key == NAME_SCOPES:
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return None
            # [..., module, aten-op instance]: the module is the scope before the op's own name.
            return scopes[-2] if isinstance(scopes, list) and len(scopes) >= 2 else None
    return None


class _GraphEditor:
    def __init__(self, model: onnx.ModelProto):
        self.graph = model.graph
        self.inits = {init.name: init for init in self.graph.initializer}
        self.users: dict[str, int] = {}
        for node in self.graph.node:
            for name in node.input:
                self.users[name] = self.users.get(name, 0) + 1
        self.new_inits: list[TensorProto] = []
        self.zero_point_name: str | None = None
        self.scales: dict[tuple[float, int], str] = {}
        self.qdq_outputs: dict[tuple[str, str], str] = {}
        self.before: dict[int, list[onnx.NodeProto]] = {}  # node index -> nodes to insert before it
        self.quantize_nodes = 0
        self.dequantize_nodes = 0

    def zero_point(self) -> str:
        """The one float8e4m3fn zero (its type makes QuantizeLinear produce FP8)."""
        if self.zero_point_name is None:
            self.zero_point_name = "fp8_zero_point"
            self.new_inits.append(numpy_helper.from_array(np.zeros((), FP8_DTYPE), self.zero_point_name))
        return self.zero_point_name

    def scale(self, value: float, dtype: int, prefix: str) -> tuple[str, float]:
        """A scalar scale initializer in `dtype`; returns (name, the value as stored)."""
        np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
        stored = np.array(value, dtype=np.float32).astype(np_dtype)
        if not np.isfinite(stored.astype(np.float32)) or float(stored.astype(np.float32)) <= 0:
            # fp16 cannot hold very small / large scales: the tensor is out of its range anyway.
            raise QuantizationError(f"FP8 scale {value:.3g} of {prefix} does not fit {np_dtype}")
        key = (float(stored.astype(np.float32)), dtype)
        if key not in self.scales:
            name = f"{prefix}.fp8_scale"
            self.new_inits.append(numpy_helper.from_array(stored, name))
            self.scales[key] = name
        return self.scales[key], key[0]

    def fake_quantize(self, index: int, tensor: str, amax: float, dtype: int, prefix: str) -> str:
        """Q -> DQ of `tensor` before node `index`; shared by consumers with the same scale."""
        scale, _ = self.scale(fp8_scale(amax), dtype, prefix)
        key = (tensor, scale)
        if key not in self.qdq_outputs:
            quantized, dequantized = f"{prefix}.input_fp8", f"{prefix}.input_qdq"
            self.before.setdefault(index, []).extend([
                helper.make_node("QuantizeLinear", [tensor, scale, self.zero_point()], [quantized],
                                 name=f"{prefix}.input_quantize", saturate=1),
                helper.make_node("DequantizeLinear", [quantized, scale, self.zero_point()], [dequantized],
                                 name=f"{prefix}.input_dequantize"),
            ])
            self.quantize_nodes += 1
            self.dequantize_nodes += 1
            self.qdq_outputs[key] = dequantized
        return self.qdq_outputs[key]

    def fp8_weight(self, index: int, weight_name: str, prefix: str) -> tuple[str, int]:
        """Replace a float weight initializer by FP8 weights + DequantizeLinear; returns (DQ output, bytes)."""
        init = self.inits[weight_name]
        values = numpy_helper.to_array(init).astype(np.float32)
        scale, stored_scale = self.scale(fp8_scale(float(np.abs(values).max(initial=0.0))), init.data_type,
                                         f"{prefix}.weight")
        quantized = to_fp8(values, stored_scale)
        fp8_name = f"{prefix}.weight_fp8"
        self.new_inits.append(numpy_helper.from_array(quantized, fp8_name))
        output = f"{prefix}.weight_dq"
        self.before.setdefault(index, []).append(
            helper.make_node("DequantizeLinear", [fp8_name, scale, self.zero_point()], [output],
                             name=f"{prefix}.weight_dequantize"))
        self.dequantize_nodes += 1
        self.users[weight_name] -= 1
        return output, quantized.nbytes

    def finish(self) -> None:
        nodes = []
        for index, node in enumerate(self.graph.node):
            nodes.extend(self.before.get(index, []))
            nodes.append(node)
        del self.graph.node[:]
        self.graph.node.extend(nodes)
        unused = {name for name, count in self.users.items() if count <= 0 and name in self.inits}
        kept = [init for init in self.graph.initializer if init.name not in unused]
        del self.graph.initializer[:]
        self.graph.initializer.extend(kept + self.new_inits)


def quantize_model(model: onnx.ModelProto, layer_amax: Mapping[str, float], base_precision: str,
                   attention_amax: Mapping[str, Mapping[str, float]] | None = None) -> QuantizationSummary:
    """Insert FP8 Q/DQ into `model` (in place, weights loaded) for every MatMul of a quantised layer.

    `layer_amax[module]` is the calibrated max |input| of that layer;
    `attention_amax[module] = {"q": .., "k": .., "v": ..}` enables FP8 attention there.
    """
    edit = _GraphEditor(model)
    summary = QuantizationSummary(base_precision)
    missing = []
    for index, node in enumerate(list(model.graph.node)):
        module = node_module(node)
        if module is None:
            continue
        if node.op_type == "Attention" and attention_amax and module in attention_amax:
            amax = attention_amax[module]
            dtype = _float_type(model, node.input[0], edit)
            for slot, key in enumerate("qkv"):
                node.input[slot] = edit.fake_quantize(index, node.input[slot], ACTIVATION_HEADROOM * amax[key], dtype,
                                                      f"{module}.{key}")
            summary.attention.append(module)
            continue
        if not is_quantized_layer(module) or node.op_type not in ("MatMul", "Gemm"):
            continue
        weight = node.input[1]
        if weight not in edit.inits or len(edit.inits[weight].dims) != 2:
            raise QuantizationError(f"{module}: expected a constant 2-D weight on {node.op_type} {node.name}")
        if node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
            raise QuantizationError(f"{module}: transposed Gemm weights are not supported")
        if module not in layer_amax:
            missing.append(module)
            continue
        dtype = edit.inits[weight].data_type
        node.input[0] = edit.fake_quantize(index, node.input[0], ACTIVATION_HEADROOM * layer_amax[module], dtype,
                                           module)
        node.input[1], nbytes = edit.fp8_weight(index, weight, module)
        summary.layers.append(module)
        summary.fp8_weight_bytes += nbytes
    if missing:
        raise QuantizationError(f"no calibration data for {len(missing)} layer(s), e.g. {missing[0]}")
    if not summary.layers:
        raise QuantizationError("no layer of the graph matched the FP8 policy (is this a PiD export?)")
    if attention_amax and len(summary.attention) != len(attention_amax):
        raise QuantizationError(f"FP8 attention: calibrated {len(attention_amax)} attention modules, "
                                f"found {len(summary.attention)} in the graph")
    edit.finish()
    summary.quantize_nodes, summary.dequantize_nodes = edit.quantize_nodes, edit.dequantize_nodes
    return summary


def _float_type(model: onnx.ModelProto, tensor: str, edit: _GraphEditor) -> int:
    for value in list(model.graph.value_info) + list(model.graph.input):
        if value.name == tensor:
            return value.type.tensor_type.elem_type
    raise QuantizationError(f"the exported graph has no type for {tensor} (shape inference missing)")


def quantize_onnx(src: Path, dst: Path, layer_amax: Mapping[str, float], base_precision: str,
                  attention_amax: Mapping[str, Mapping[str, float]] | None = None) -> QuantizationSummary:
    """Read the base-precision export `src` (model.onnx + data), write the FP8 graph to `dst`."""
    model = onnx.load(str(src))  # with external data: the weights are rewritten
    summary = quantize_model(model, layer_amax, base_precision, attention_amax)
    save_model(model, dst)
    return summary


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Save with the weights in `<name>.data` beside it (any size; TensorRT parses it by path)."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)  # external data is appended to an existing file
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)


def qdq_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Q/DQ placement of a graph: how many of each, and how many MatMuls read an FP8 weight / activation."""
    producers = {out: node for node in model.graph.node for out in node.output}
    fp8_inits = {i.name for i in model.graph.initializer if i.data_type == TensorProto.FLOAT8E4M3FN and i.dims}
    counts = {"QuantizeLinear": 0, "DequantizeLinear": 0, "fp8_weights": len(fp8_inits),
              "matmul_fp8_weight": 0, "matmul_fp8_input": 0, "attention_fp8_inputs": 0}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            counts[node.op_type] += 1

        def from_dq(name: str) -> onnx.NodeProto | None:
            producer = producers.get(name)
            return producer if producer is not None and producer.op_type == "DequantizeLinear" else None

        if node.op_type == "MatMul":
            weight_dq, input_dq = from_dq(node.input[1]), from_dq(node.input[0])
            counts["matmul_fp8_weight"] += int(weight_dq is not None and weight_dq.input[0] in fp8_inits)
            input_q = producers.get(input_dq.input[0]) if input_dq is not None else None
            counts["matmul_fp8_input"] += int(input_q is not None and input_q.op_type == "QuantizeLinear")
        if node.op_type == "Attention":
            counts["attention_fp8_inputs"] += sum(from_dq(name) is not None for name in node.input[:3])
    return counts


def fp8_targets_problem(capabilities: Iterable[str]) -> str | None:
    """Why an FP8 engine cannot be built for these compute capabilities ('8.9', 'SM120', ...), or None."""
    from pid_runtime.precision import precision_problem

    for capability in capabilities:
        problem = precision_problem("fp8", capability, where="the build target",
                                    advice="build FP8 engines for 8.9 / 12.0, or export --precision bf16 for it")
        if problem is not None:
            return problem
    return None


FP8_DEFAULT_TARGETS = ("8.9", "12.0")  # TensorRT-RTX: Ada and Blackwell RTX (no Hopper in RTX)


def graph_layers(model: onnx.ModelProto) -> Iterable[tuple[str, onnx.NodeProto]]:
    """(module, node) of every MatMul/Gemm/Conv, for placement checks."""
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm", "Conv"):
            module = node_module(node)
            if module is not None:
                yield module, node
