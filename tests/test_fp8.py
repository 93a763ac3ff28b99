"""FP8 export (issue 13): Q/DQ placement, ONNX Runtime accuracy, the accuracy guard, TensorRT-RTX builds.

Golden networks with random weights: their FP8 error says little about a trained
network's (the guard's numbers on real checkpoints are what count), but it is
real quantisation error, measured the way the export measures it.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from conftest import golden_net, golden_tensors, rel_err
from exports import export_root, shared_export  # noqa: F401 (fixture)
from pid_export.accuracy_guard import GuardThresholds, OnnxVelocity, run_guard
from pid_export.calibration import CalibrationItem, calibrate, reference_images, synthetic_items
from pid_export.cli import main as pid_export_main
from pid_export.fp8 import (
    FP8_DEFAULT_TARGETS,
    attention_module_names,
    fp8_targets_problem,
    graph_layers,
    is_quantized_layer,
    qdq_counts,
    quantize_onnx,
    quantized_layer_names,
)
from pid_export.onnx_lint import lint_model
from pid_export.precision import apply_precision
from pid_runtime.metadata import ModelMetadata
from pid_runtime.precision import precision_problem

CASE = "tiny_v1pt5_16ch"  # every v1.5 feature; the policy was measured on it
HELD_OUT_CASE = "tiny_v1_128ch_lsdf16"  # never used while choosing the policy: the bar's network
GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "golden"
STATIC_HW = (64, 96)
SEED = 1000


def run_cli(args: list[str]) -> int:
    try:
        pid_export_main(args)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def write_calibration_dir(directory: Path, cfg, count: int, latent_hw=(2, 3), seed: int = 0) -> Path:
    """pid-run-style inputs: NAME.npy latents + NAME.caption.npy captions, and one golden-style
    .safetensors file holding both arrays."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    h, w = latent_hw
    items = synthetic_items(cfg, [(h * cfg.pixel_scale, w * cfg.pixel_scale)], count, seed=seed)
    for item in items[:-1]:
        np.save(directory / f"{item.name}.npy", item.latents.numpy())
        np.save(directory / f"{item.name}.caption.npy", item.caption[0].numpy())
    last = items[-1]
    save_file({"lq_latent": last.latents, "y": last.caption}, str(directory / f"{last.name}.safetensors"))
    return directory


def widened_velocity(onnx_path: Path, tmp: Path, inputs) -> np.ndarray:
    velocity = OnnxVelocity(onnx_path, tmp)
    x, t, y, lq, sigma = inputs
    item = CalibrationItem("check", lq, y, float(sigma[0]))
    return velocity(x, t, item).numpy()


# ---------------------------------------------------------------------------
# Policy and targets (cheap)


def test_policy_quantises_block_matmuls_only():
    net = golden_net(CASE)
    names = quantized_layer_names(net)
    cfg = net.cfg
    per_patch_block = 4 + 6  # qkv_x, qkv_y, proj_x, proj_y; mlp_x/mlp_y w1..w3
    assert len(names) == cfg.patch_depth * per_patch_block
    for kept in ("adaLN_modulation", "embedder", "lq_proj", "final_layer", "pit_lq_gate", "pixel_blocks", "norm"):
        assert not any(kept in name for name in names), kept
    assert is_quantized_layer("patch_blocks.13.mlp_x.w2") and not is_quantized_layer("patch_blocks.0.adaLN_modulation_img.0")


def test_fp8_targets_and_runtime_gpu_check():
    assert fp8_targets_problem(["SM89", "SM120"]) is None and fp8_targets_problem(FP8_DEFAULT_TARGETS) is None
    problem = fp8_targets_problem(["8.9", "SM86"])
    assert problem is not None and "8.6" in problem and "Ada" in problem and "\n" not in problem
    assert precision_problem("fp8", "8.6") is not None and "bf16" in precision_problem("fp8", "8.6")
    assert precision_problem("fp8", "8.9") is None and precision_problem("fp8", "9.0") is None
    assert precision_problem("fp8", "12.0") is None and precision_problem("bf16", "7.5") is None


def test_old_metadata_without_fp8_fields_still_loads(tmp_path):
    old = {"release": None, "latent_channels": 16, "latent_down_factor": 8, "sr_factor": 4, "txt_embed_dim": 40,
           "txt_max_length": 12, "precision": "bf16"}
    (tmp_path / "pid_export.json").write_text(json.dumps(old))
    meta = ModelMetadata.load(tmp_path / "pid_export.json")
    assert meta.quantization is None and meta.accuracy_guard is None


# ---------------------------------------------------------------------------
# The guard, on a static bf16 export: good calibration vs scales off by 1000x


@pytest.fixture(scope="module")
def static_base(tmp_path_factory, export_root):  # noqa: F811
    """(network, bf16 static export, calibration amax, held-out items, float32 reference decodes)."""
    root = tmp_path_factory.mktemp("fp8_guard")
    reference = golden_net(CASE)
    cfg = reference.cfg
    calibration = synthetic_items(cfg, [STATIC_HW], 3, seed=0)
    recorder = calibrate(reference, cfg, calibration, quantized_layer_names(reference))
    text_len = cfg.txt_max_length  # a static export's caption length (onnx_export)
    held_out = [CalibrationItem(i.name, i.latents, i.caption[:, :text_len])
                for i in synthetic_items(cfg, [STATIC_HW], 2, seed=99, prefix="held-out")]
    references = reference_images(reference, cfg.pixel_scale, held_out, SEED, torch.device("cpu"))
    base = shared_export(CASE, "bf16", static_shape=(1, *STATIC_HW))  # read only: FP8 graphs go to root
    return root, base / "model.onnx", recorder.amax, held_out, references, cfg


@pytest.mark.heavy
def test_guard_passes_calibrated_and_fails_scales_off_by_1000x(static_base):
    """Scales 1000x too small (amax / 1000): activations saturate at +-448 * scale; the guard fails.
    1000x too large scales barely matter to E4M3 (values move ~10 binades down, mostly still normal):
    the reason fp8.ACTIVATION_HEADROOM is cheap."""
    root, base_onnx, amax, held_out, references, cfg = static_base
    reports = {}
    for label, factor in (("calibrated", 1.0), ("broken", 1e-3), ("too_large", 1e3)):
        fp8_onnx = root / label / "model.onnx"
        fp8_onnx.parent.mkdir(exist_ok=True)
        quantize_onnx(base_onnx, fp8_onnx, {k: v * factor for k, v in amax.items()}, "bf16")
        onnx.shape_inference.infer_shapes_path(str(fp8_onnx), str(fp8_onnx))
        reports[label] = run_guard(fp8_onnx, base_onnx, "bf16", held_out, references, cfg.pixel_scale,
                                   GuardThresholds(), SEED)
        print(f"\n{label} calibration: {reports[label].summary()}")
    good, broken = reports["calibrated"], reports["broken"]
    # Same held-out inputs, same bf16 numbers: only the FP8 scales differ.
    assert good.base_rel_error == pytest.approx(broken.base_rel_error)
    assert good.fp8_rel_error > good.base_rel_error  # FP8 is really in the graph
    assert good.passed, good.problems
    assert not broken.passed
    assert broken.fp8_psnr < good.fp8_psnr - 6
    assert any("PSNR" in p for p in broken.problems) and any("x the bf16 error" in p for p in broken.problems)
    assert abs(reports["too_large"].fp8_psnr - good.fp8_psnr) < 1.0


@pytest.mark.heavy
def test_experimental_fp8_attention_quantises_q_k_v(static_base, tmp_path):
    root, base_onnx, _, held_out, references, cfg = static_base
    net = golden_net(CASE)
    recorder = calibrate(net, cfg, synthetic_items(cfg, [STATIC_HW], 2, seed=5), quantized_layer_names(net),
                         attention_module_names(net))
    assert len(recorder.attention) == cfg.patch_depth + cfg.pixel_depth
    fp8_onnx = tmp_path / "model.onnx"
    summary = quantize_onnx(base_onnx, fp8_onnx, recorder.amax, "bf16", recorder.attention)
    assert len(summary.attention) == cfg.patch_depth + cfg.pixel_depth
    onnx.shape_inference.infer_shapes_path(str(fp8_onnx), str(fp8_onnx))
    counts = qdq_counts(onnx.load(str(fp8_onnx), load_external_data=False))
    assert counts["attention_fp8_inputs"] == 3 * (cfg.patch_depth + cfg.pixel_depth)
    report = run_guard(fp8_onnx, base_onnx, "bf16", held_out, references, cfg.pixel_scale, GuardThresholds(), SEED)
    print(f"\nFP8 attention (experimental): {report.summary()}")
    assert report.fp8_rel_error > report.base_rel_error and report.fp8_psnr > 20


@pytest.mark.heavy
def test_cli_fp8_guard_failure_writes_nothing(tmp_path, capsys):
    """An unreachable threshold: one error line, exit 2, no export directory (so no engine)."""
    out = tmp_path / "fp8"
    cfg = golden_net(CASE).cfg
    calibration = write_calibration_dir(tmp_path / "calib", cfg, 2)
    code = run_cli(["--network-config", str(GOLDEN / f"{CASE}.json"), "--checkpoint", str(GOLDEN / f"{CASE}.pth"),
                    "--precision", "fp8", "--calibration", str(calibration), "--guard-min-psnr", "200",
                    "--static", "x".join(map(str, STATIC_HW)), "--no-empty-caption", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("pid-export: error: FP8 accuracy guard failed: FP8 PSNR")
    assert "below 200 dB" in err[0]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".fp8")], "staging left behind"


# ---------------------------------------------------------------------------
# The CLI's dynamic FP8 export with a user calibration directory


RTX = importlib.util.find_spec("tensorrt_rtx") is not None
ENGINE_ARGS = ["--engine", "--min", "64x64", "--opt", "128x128", "--max", "128x192", "--max-batch", "2"]


@pytest.fixture(scope="module")
def fp8_export(tmp_path_factory):
    """The bar: a network not used while choosing the policy, exported by the CLI (dynamic shapes),
    with its FP8 engine built by the project's engine layer where TensorRT-RTX is installed."""
    root = tmp_path_factory.mktemp("fp8_cli")
    cfg = golden_net(HELD_OUT_CASE).cfg
    calibration = write_calibration_dir(root / "calib", cfg, 5)
    out = root / "export"
    code = run_cli(["--network-config", str(GOLDEN / f"{HELD_OUT_CASE}.json"),
                    "--checkpoint", str(GOLDEN / f"{HELD_OUT_CASE}.pth"),
                    "--precision", "fp8", "--calibration", str(calibration), "--no-empty-caption",
                    *(ENGINE_ARGS if RTX else ["--onnx-only"]), "--out", str(out)])
    assert code == 0
    return out


@pytest.mark.heavy
def test_fp8_export_graph_placement_dynamic_shapes_lint(fp8_export):
    model = onnx.load(str(fp8_export / "model.onnx"), load_external_data=False)
    net = golden_net(HELD_OUT_CASE)
    cfg = net.cfg
    in_graph = [m for m in quantized_layer_names(net)
                if m != f"patch_blocks.{cfg.patch_depth - 1}.attn.proj_y"  # the last block's text output is unused
                and not m.startswith(f"patch_blocks.{cfg.patch_depth - 1}.mlp_y")]
    counts = qdq_counts(model)
    assert counts["matmul_fp8_weight"] == counts["matmul_fp8_input"] == counts["fp8_weights"] == len(in_graph)
    assert counts["DequantizeLinear"] == counts["fp8_weights"] + counts["QuantizeLinear"]
    assert counts["attention_fp8_inputs"] == 0  # attention stays bf16 by default
    # Shared inputs get one Q/DQ (w1/w3 of a SwiGLU read the same tensor).
    assert counts["QuantizeLinear"] < len(in_graph)

    producers = {out: node for node in model.graph.node for out in node.output}
    for module, node in graph_layers(model):
        weight_dq = producers.get(node.input[1]) if node.op_type != "Conv" else None
        quantised = weight_dq is not None and weight_dq.op_type == "DequantizeLinear"
        assert quantised == is_quantized_layer(module), f"{module}: FP8 {quantised}"

    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.input}
    assert all(isinstance(d, str) for d in (dims["x"][0], dims["x"][2], dims["x"][3], dims["y"][1]))
    report = lint_model(model, expected_attention=cfg.patch_depth + cfg.pixel_depth)
    assert report.ok, report.problems

    meta = ModelMetadata.load(fp8_export / "pid_export.json")
    assert meta.precision == "fp8" and meta.quantization["base_precision"] == "bf16"
    assert meta.quantization["quantized_layers"] == len(in_graph)
    assert meta.quantization["calibration"]["items"] and "4 of" not in meta.accuracy_guard["held_out"]
    guard = meta.accuracy_guard
    assert guard["passed"] and not guard["accepted_loss"]
    assert guard["held_out"].startswith("1 of the 5 items")  # the user's data, not the synthetic set
    assert guard["fp8_psnr"] >= 35.0 and guard["error_ratio"] <= 4.0


@pytest.mark.heavy
def test_fp8_onnx_in_onnxruntime_at_other_shapes(fp8_export, tmp_path):
    """Velocity of the FP8 graph (ORT, disable_quant_qdq) vs float32 PyTorch on the golden inputs and at
    shapes unlike the calibration's: above the fp16 floor (quantisation is active), far from garbage."""
    from test_onnx_export import INPUT_NAMES, random_inputs

    reference = golden_net(HELD_OUT_CASE)
    fp16 = apply_precision(golden_net(HELD_OUT_CASE), "fp16")
    golden = golden_tensors(HELD_OUT_CASE)
    cases = {"golden": tuple(golden[name] for name in INPUT_NAMES)}
    for shape in [(1, 3, 2, 12), (2, 2, 4, 7)]:
        cases[str(shape)] = random_inputs(reference.cfg, *shape, seed=sum(shape), caption_outliers=True)
    for label, inputs in cases.items():
        with torch.no_grad():
            want = reference(*inputs)
            floor = rel_err(fp16(*inputs), want)
        got = np.concatenate([widened_velocity(fp8_export / "model.onnx", tmp_path,
                                               tuple(t[i:i + 1] for t in inputs)) for i in range(len(inputs[0]))])
        assert got.shape == tuple(want.shape) and np.isfinite(got).all()
        err = rel_err(got, want)
        print(f"\nFP8 velocity, {label} inputs: rel. error {err:.2e} (fp16 floor {floor:.2e})")
        assert floor < err < 0.1


# ---------------------------------------------------------------------------
# TensorRT-RTX: FP8 builds CPU-only for Ada + Blackwell, refused for Ampere


@pytest.mark.heavy
def test_tensorrt_rtx_builds_fp8_for_ada_and_blackwell_not_ampere(fp8_export, tmp_path, capsys):
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX (tensorrt-rtx-cu13) is not installed")
    engine = json.loads((fp8_export / "engine.json").read_text())
    assert (fp8_export / "engine.plan").stat().st_size > 0
    assert engine["library_name"] == "TensorRT-RTX" and engine["precision"] == "fp8"
    assert engine["compute_capabilities"] == ["8.9", "12.0"]  # FP8's default targets, not the library's
    assert engine["profiles"][0]["min_hw"] == [64, 64] and engine["profiles"][0]["max_hw"] == [128, 192]

    # An Ampere target is refused in one line before the export (no ONNX, nothing written).
    capsys.readouterr()
    code = run_cli(["--network-config", str(GOLDEN / f"{HELD_OUT_CASE}.json"),
                    "--checkpoint", str(GOLDEN / f"{HELD_OUT_CASE}.pth"), "--precision", "fp8",
                    *ENGINE_ARGS, "--compute-capability", "8.9,8.6", "--out", str(tmp_path / "ampere")])
    captured = capsys.readouterr()
    err_lines = captured.err.strip().splitlines()
    assert code != 0 and len(err_lines) == 1, captured.err
    assert "8.6" in err_lines[0] and "Ada" in err_lines[0]
    assert "exporting" not in captured.out.lower() and not (tmp_path / "ampere").exists()
