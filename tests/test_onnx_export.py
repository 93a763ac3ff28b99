"""ONNX export: golden parity in ONNX Runtime, other shapes, TensorRT lint, reduced precision."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import GOLDEN_CASES, golden_net, golden_tensors, rel_err
from exports import export_root, golden_exports, shared_export  # noqa: F401  (fixtures)
from pid_export.onnx_lint import lint_model
from pid_runtime.metadata import INPUT_NAMES, ModelMetadata

ONNX_TOL = 1e-4


def run_onnx(session: ort.InferenceSession, inputs: tuple[torch.Tensor, ...]) -> np.ndarray:
    return session.run(None, {name: t.numpy() for name, t in zip(INPUT_NAMES, inputs)})[0]


def shapes_unlike_trace(cfg, golden_shape) -> list[tuple[int, int, int, int, tuple[int, int] | None]]:
    """(batch, latent_h, latent_w, text_len, output size or None for the native one): shapes that
    differ from the golden and trace shapes in batch, height, width and aspect ratio, the last
    two at output sizes other than the latent's native size (not multiples of it either)."""
    batch, h, w = golden_shape
    return [(batch + 2, w + 1, h, max(1, cfg.txt_max_length - 3), None),  # tall where golden is wide
            (1 if batch > 1 else 3, h + 2, w + 3, cfg.txt_max_length, None),
            (2, 1, 5, 2, (48, 160)),  # the example for an /8 x4 latent
            (1, h + 1, w, 4, (16 * (2 * h + 1), 16 * max(w - 1, 1)))]


def random_inputs(cfg, batch, lat_h, lat_w, text_len, seed=0, caption_outliers=False, size=None):
    gen = torch.Generator().manual_seed(seed)
    height, width = size or (lat_h * cfg.pixel_scale, lat_w * cfg.pixel_scale)
    y = torch.randn(batch, text_len, cfg.txt_embed_dim, generator=gen)
    if caption_outliers:  # Gemma-2 hidden states: a few channels of magnitude ~1e3
        y[..., :3] *= 1000.0
    return (torch.randn(batch, 3, height, width, generator=gen),
            torch.rand(batch, generator=gen) * 1000,
            y,
            torch.randn(batch, cfg.lq_latent_channels, lat_h, lat_w, generator=gen),
            torch.rand(batch, generator=gen) * 0.5)


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_fp32_export_matches_golden_and_pytorch_at_other_shapes(case, golden_exports):  # noqa: F811
    export_dir = golden_exports[case]
    session = ort.InferenceSession(str(export_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    g = golden_tensors(case)
    assert rel_err(run_onnx(session, tuple(g[k] for k in INPUT_NAMES)), g["velocity"]) < ONNX_TOL

    net = golden_net(case)
    batch, _, lat_h, lat_w = g["lq_latent"].shape
    for *shape, size in shapes_unlike_trace(net.cfg, (batch, lat_h, lat_w)):
        inputs = random_inputs(net.cfg, *shape, seed=sum(shape), size=size)
        with torch.no_grad():
            want = net(*inputs)
        got = run_onnx(session, inputs)
        assert got.shape == tuple(want.shape)
        assert rel_err(got, want) < ONNX_TOL, f"shape {shape}, size {size}"


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_export_interface_metadata_and_lint(case, golden_exports):  # noqa: F811
    export_dir = golden_exports[case]
    model = onnx.load(str(export_dir / "model.onnx"), load_external_data=False)
    net = golden_net(case)
    cfg = net.cfg

    names = [i.name for i in model.graph.input]
    assert names == list(INPUT_NAMES)
    assert [o.name for o in model.graph.output] == ["velocity"]
    for value in list(model.graph.input) + list(model.graph.output):
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT, value.name
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.input}
    assert isinstance(dims["x"][0], str) and isinstance(dims["x"][2], str) and isinstance(dims["x"][3], str)
    # The output size is free: x's H, W are their own symbols, not expressions of the latent's h, w.
    latent_dims = dims["lq_latent"][2:]
    assert all(isinstance(d, str) for d in latent_dims)
    assert not any(lat in side for lat in latent_dims for side in dims["x"][2:]), dims
    assert isinstance(dims["y"][1], str), "text length must be dynamic"
    assert dims["lq_latent"][1] == cfg.lq_latent_channels

    report = lint_model(model, expected_attention=cfg.patch_depth + cfg.pixel_depth)
    assert report.ok, report.problems
    assert report.op_counts["Attention"] == cfg.patch_depth + cfg.pixel_depth
    assert "Col2Im" not in report.op_counts and "Im2Col" not in report.op_counts

    meta = ModelMetadata.load(export_dir / "pid_export.json")
    assert meta.latent_channels == cfg.lq_latent_channels
    assert meta.pixel_scale == cfg.pixel_scale
    assert meta.precision == "fp32" and meta.opset == 23
    assert meta.any_output_size
    assert meta.network == cfg.to_dict()


def test_lint_catches_what_tensorrt_cannot_run():
    """The lint is not vacuous: an unfused attention, an unsupported op and float64 are reported."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.DOUBLE, [2, 4])
    nodes = [helper.make_node("Softmax", ["x"], ["s"]),
             helper.make_node("Col2Im", ["s", "shape", "block"], ["c"]),
             helper.make_node("Cast", ["s"], ["y"], to=TensorProto.DOUBLE)]
    model = helper.make_model(helper.make_graph(nodes, "bad", [x], [y]))
    report = lint_model(model, expected_attention=1)
    text = " | ".join(report.problems)
    assert "Col2Im" in text and "Softmax" in text and "float64" in text and "expected 1 Attention" in text


REDUCED_CASE = "tiny_v1pt5_128ch_unpatchify2"  # v1.5: every feature (PiT, per-token gates, unpatchify)


@pytest.mark.heavy
@pytest.mark.parametrize("precision, bound", [("fp16", 1e-2), ("bf16", 5e-2)])
def test_reduced_precision_export_against_fp32(precision, bound, export_root, capsys):  # noqa: F811
    """fp16 runs in ONNX Runtime's CPU provider; bf16 (no CPU kernels in ORT) in onnx's
    reference evaluator. Both against the fp32 PyTorch network, with ~1e3 caption outliers.
    The export is the shared one (export_onnx at `precision`) that the engine matrix builds too."""
    reference = golden_net(REDUCED_CASE)
    onnx_path = shared_export(REDUCED_CASE, precision) / "model.onnx"
    cfg = reference.cfg
    lint = lint_model(onnx.load(str(onnx_path), load_external_data=False),
                      expected_attention=cfg.patch_depth + cfg.pixel_depth)  # what export_onnx checks
    assert lint.ok, lint.problems
    model = onnx.load(str(onnx_path))
    float_types = {init.data_type for init in model.graph.initializer if init.dims and len(init.dims) >= 2}
    want_type = onnx.TensorProto.FLOAT16 if precision == "fp16" else onnx.TensorProto.BFLOAT16
    assert want_type in float_types, "matmul weights must be stored in the reduced precision"

    errors = []
    for shape in [(2, 1, 1, 12), (1, 2, 3, 7)]:
        inputs = random_inputs(reference.cfg, *shape, seed=7, caption_outliers=True)
        with torch.no_grad():
            want = reference(*inputs)
        if precision == "fp16":
            session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
            got = run_onnx(session, inputs)
        else:
            from onnx.reference import ReferenceEvaluator

            got = ReferenceEvaluator(model).run(None, {n: t.numpy() for n, t in zip(INPUT_NAMES, inputs)})[0]
        assert got.dtype == np.float32 and np.isfinite(got).all()
        errors.append(rel_err(got, want))
    with capsys.disabled():
        print(f"\n{precision} export vs fp32 PyTorch (caption outliers 1e3): relative errors "
              + ", ".join(f"{e:.2e}" for e in errors))
    assert max(errors) < bound
