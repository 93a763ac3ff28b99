"""Real engine builds with TensorRT-RTX on this CPU-only machine (no GPU, nothing faked).

TensorRT-RTX compiles ahead of time without a GPU, so these build the golden networks'
exports into real plans and check what can be checked without running them: the plan
and its sidecar (library, version, target compute capabilities, profiles as the
builder's config holds them), fp32 attention decomposable and bf16/fp16 attention
fused, clear one-line errors, atomic writes, and `pid-export` end to end. Running an
engine needs an RTX-class GPU: that is test_tensorrt.py's `tensorrt` tests.

Default run: fp32 for every golden case (the fp32 exports are shared with the runtime
tests), bf16 with two profiles for one case, the CLI. `-m engine_matrix`: bf16 and fp16
for every golden case (16 more exports, cached in .pytest_cache; CI runs it).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest

from conftest import GOLDEN_CASES, golden_case, golden_net
from exports import export_cases, export_root  # noqa: F401 (fixture)
from pid_export.engine import EngineError, EngineProfile, build_engine, mark_fp32_attention_decomposable

try:
    import tensorrt_rtx
except (ImportError, OSError):
    tensorrt_rtx = None

pytestmark = pytest.mark.skipif(tensorrt_rtx is None or not hasattr(tensorrt_rtx, "Builder"),
                                reason="TensorRT-RTX is not installed (pip install tensorrt-rtx-cu13==1.7.1.116); "
                                       "CI installs it")

MAIN = "tiny_v1_16ch_sr4"  # 16-ch latent, 32 px per latent cell, text length 12
REDUCED = ("bf16", "fp16")


def quiet(message: str) -> None:
    pass


def tiny_profile(case: str, max_scale: int = 4) -> EngineProfile:
    """A dynamic profile with a batch range: 1..max_scale latent cells per side, batch 1..2, any caption length."""
    cfg = golden_net(case).cfg
    s = cfg.pixel_scale
    return EngineProfile.for_config(cfg, (s, s), (2 * s, 3 * s), (max_scale * s, max_scale * s), max_batch=2,
                                    min_text_length=1)


def expected_shapes(case: str, profile: EngineProfile) -> dict:
    """The profile's input shapes, worked out here from the golden config (not by the code under test)."""
    net = golden_case(case)["network"]
    scale = net["latent_spatial_down_factor"] * net["sr_scale"]
    ch, dim, text = net["lq_latent_channels"], net["txt_embed_dim"], net["txt_max_length"]

    def at(batch, hw, length):
        h, w = hw
        return {"x": [batch, 3, h, w], "t": [batch], "y": [batch, length, dim],
                "lq_latent": [batch, ch, h // scale, w // scale], "degrade_sigma": [batch]}

    low, opt, high = at(1, profile.min_hw, 1), at(1, profile.opt_hw, text), at(2, profile.max_hw, text)
    return {name: [low[name], opt[name], high[name]] for name in low}


def attention_ops(onnx_path: Path) -> int:
    model = onnx.load(str(onnx_path), load_external_data=False)
    return sum(node.op_type == "Attention" for node in model.graph.node)


def built(case: str, export_dir: Path, out: Path, profiles, **options) -> tuple[Path, dict, list[str]]:
    lines: list[str] = []
    plan = build_engine(export_dir / "model.onnx", out, profiles, log=lines.append, **options)
    return plan, json.loads((out / "engine.json").read_text()), lines


def check_engine(case: str, precision: str, export_dir: Path, plan: Path, meta: dict, profiles) -> None:
    assert plan.stat().st_size > 1 << 20  # a real plan: kernels + weights, MBs even for a tiny network
    assert sorted(p.name for p in plan.parent.iterdir()) == ["engine.json", "engine.plan"]  # no temp files
    assert (meta["library"], meta["library_name"]) == ("rtx", "TensorRT-RTX")
    assert meta["library_version"] == tensorrt_rtx.__version__
    assert meta["built_on"] == "CPU (ahead of time)"
    assert meta["precision"] == precision
    attention = attention_ops(export_dir / "model.onnx")
    assert attention == golden_case(case)["network"]["patch_depth"] + golden_case(case)["network"]["pixel_depth"]
    assert meta["attention_layers"] == attention
    # fp32 has no fused attention kernel: decomposed. bf16/fp16 keep the fused kernels.
    assert meta["decomposable_attention_layers"] == (attention if precision == "fp32" else 0)
    assert len(meta["profiles"]) == len(profiles)
    for got, profile in zip(meta["profiles"], profiles):
        assert got["as_built"] == expected_shapes(case, profile)


# ---------------------------------------------------------------------------
# Every golden case


# The default run builds one case; CI's -m engine_matrix builds the others too.
@pytest.mark.parametrize("case", [c if c == MAIN else pytest.param(c, marks=pytest.mark.engine_matrix)
                                  for c in GOLDEN_CASES])
def test_fp32_engine_builds_cpu_only(case, export_root, tmp_path):  # noqa: F811
    export_dir = export_cases([case], export_root)[case]
    profile = tiny_profile(case)
    plan, meta, lines = built(case, export_dir, tmp_path / "engine", profile)
    check_engine(case, "fp32", export_dir, plan, meta, [profile])
    assert meta["compute_capabilities"] == ["8.0", "8.6", "8.9", "12.0+"]
    assert meta["compute_capabilities_source"] == "library default"
    assert any(line.startswith("parsed in ") for line in lines) and any(line.startswith("built in ") for line in lines)


@pytest.mark.engine_matrix
@pytest.mark.parametrize("precision", REDUCED)
@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_reduced_precision_engine_builds_cpu_only(case, precision, export_root, tmp_path):  # noqa: F811
    export_dir = export_cases([case], export_root, precision=precision)[case]
    profile = tiny_profile(case)
    plan, meta, _ = built(case, export_dir, tmp_path / "engine", profile)
    check_engine(case, precision, export_dir, plan, meta, [profile])


def test_bf16_engine_with_two_profiles(export_root, tmp_path):  # noqa: F811
    """Issue 12's several-profile engine, CPU-only: both profiles reach the builder's config."""
    export_dir = export_cases([MAIN], export_root, precision="bf16")[MAIN]
    cfg = golden_net(MAIN).cfg
    small = EngineProfile.for_config(cfg, (32, 32), (64, 96), (128, 128), max_batch=2, min_text_length=1)
    large = EngineProfile.for_config(cfg, (32, 32), (192, 192), (256, 256), max_batch=2, min_text_length=1)
    plan, meta, lines = built(MAIN, export_dir, tmp_path / "engine", [small, large])
    check_engine(MAIN, "bf16", export_dir, plan, meta, [small, large])
    assert [p["opt_hw"] for p in meta["profiles"]] == [[64, 96], [192, 192]]
    assert "7 fused attention" in "\n".join(lines)


# ---------------------------------------------------------------------------
# Attention: decomposable for fp32 only


def parsed_network(onnx_path: Path):
    logger = tensorrt_rtx.Logger(tensorrt_rtx.Logger.ERROR)
    builder = tensorrt_rtx.Builder(logger)
    network = builder.create_network(0)
    parser = tensorrt_rtx.OnnxParser(network, logger)
    assert parser.parse_from_file(str(onnx_path))
    return builder, network, parser


def attention_flags(network) -> list[bool]:
    flags = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == tensorrt_rtx.LayerType.ATTENTION_OUTPUT:
            layer.__class__ = tensorrt_rtx.IAttentionOutputLayer
            flags.append(layer.attention.decomposable)
    return flags


def test_fused_attention_is_kept_for_bf16_and_only_fp32_is_decomposed(export_root):  # noqa: F811
    from pid_runtime.trt_library import load

    lib = load("rtx")
    for precision, expected in (("fp32", True), ("bf16", False)):
        export_dir = export_cases([MAIN], export_root, precision=precision)[MAIN]
        _, network, _parser = parsed_network(export_dir / "model.onnx")
        assert attention_flags(network) == [False] * 7  # as parsed: nothing decomposable
        assert mark_fp32_attention_decomposable(lib, network) == (7, 7 if expected else 0)
        assert attention_flags(network) == [expected] * 7


def test_fp32_attention_left_fused_does_not_build(export_root):  # noqa: F811
    """Why fp32 is marked: unmarked, the builder finds no fused fp32 kernel and fails
    (the bf16 build above succeeds unmarked, so its attention runs fused kernels)."""
    export_dir = export_cases([MAIN], export_root)[MAIN]
    builder, network, _parser = parsed_network(export_dir / "model.onnx")
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for name, shapes in expected_shapes(MAIN, tiny_profile(MAIN)).items():
        profile.set_shape(name, *shapes)
    config.add_optimization_profile(profile)
    assert builder.build_serialized_network(network, config) is None


# ---------------------------------------------------------------------------
# Targets, errors, files


def test_named_targets_and_failed_rebuild_keeps_the_previous_engine(export_root, tmp_path):  # noqa: F811
    """--compute-capability 8.9,12.0 (what FP8 needs) is recorded; a later build that fails
    leaves the previous plan and sidecar untouched."""
    export_dir = export_cases([MAIN], export_root)[MAIN]
    out = tmp_path / "engine"
    plan, meta, _ = built(MAIN, export_dir, out, tiny_profile(MAIN), compute_capabilities=("8.9", "12.0"))
    assert (meta["compute_capabilities"], meta["compute_capabilities_source"]) == (["8.9", "12.0"],
                                                                                   "--compute-capability")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.onnx").write_bytes((export_dir / "model.onnx").read_bytes()[:5000])  # truncated
    with pytest.raises(EngineError) as info:
        build_engine(broken / "model.onnx", out, tiny_profile(MAIN), log=quiet)
    assert str(info.value).startswith(f"TensorRT-RTX could not parse {broken / 'model.onnx'}: ")
    assert "\n" not in str(info.value)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_unknown_target_and_foreign_profile_are_one_line_errors(export_root, tmp_path):  # noqa: F811
    export_dir = export_cases([MAIN], export_root)[MAIN]
    with pytest.raises(EngineError, match=r"^TensorRT-RTX 1\.7\.1\.116 cannot build for compute capability 9\.0: "
                                          r"it offers 7\.5, 8\.0, 8\.6, 8\.9, 12\.0, 12\.1$"):
        build_engine(export_dir / "model.onnx", tmp_path, tiny_profile(MAIN), compute_capabilities=("9.0",), log=quiet)
    sdxl = tiny_profile("tiny_v1_4ch_sdxl")  # 4 latent channels: a profile for another network
    with pytest.raises(EngineError, match=r"^profile 1 gives input lq_latent shape \[1, 4, 1, 1\], but the model's "
                                          r"input is \[-1, 16, -1, -1\] \(-1 = any\): the profile is for another "
                                          r"network$"):
        build_engine(export_dir / "model.onnx", tmp_path, sdxl, log=quiet)
    assert not (tmp_path / "engine.plan").exists()


def test_missing_external_weights_is_a_parse_error_line(export_root, tmp_path):  # noqa: F811
    export_dir = export_cases([MAIN], export_root)[MAIN]
    shutil.copy(export_dir / "model.onnx", tmp_path / "model.onnx")  # without model.onnx.data
    with pytest.raises(EngineError) as info:
        build_engine(tmp_path / "model.onnx", tmp_path, tiny_profile(MAIN), log=quiet)
    assert str(info.value).startswith("TensorRT-RTX could not parse ") and "\n" not in str(info.value)


# ---------------------------------------------------------------------------
# pid-export end to end (issue 9's bar) and refusals before any slow work


def pid_export(*args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pid_export.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def network_args(tmp_path: Path, case: str = MAIN) -> list[str]:
    config = tmp_path / f"{case}.json"
    config.write_text(json.dumps(golden_case(case)["network"]))
    return ["--network-config", str(config), "--checkpoint", str(golden_case(case)["pth"])]


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("pid-export: error:"), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def held_out_network_args(tmp_path: Path) -> list[str]:
    """A network no test or tuning used: the v1.5 golden layout with other widths and depths,
    random weights written in the released checkpoint layout."""
    from pid_export import PidConfig
    from pid_export.synthetic import write_synthetic_checkpoint

    settings = dict(golden_case("tiny_v1pt5_16ch")["network"], hidden_size=96, patch_depth=3, pixel_depth=1,
                    lq_hidden_dim=24, txt_max_length=10)
    config = tmp_path / "held_out.json"
    config.write_text(json.dumps(settings))
    checkpoint = write_synthetic_checkpoint(PidConfig.from_dict(settings), tmp_path / "held_out.pth", seed=7)
    return ["--network-config", str(config), "--checkpoint", str(checkpoint)]


def run_bar(tmp_path: Path, precision: str) -> Path:
    out = tmp_path / "out"
    # --trt rtx: the CPU-only build these tests are about, also where a GPU makes auto pick TensorRT.
    proc = pid_export(*held_out_network_args(tmp_path), "--precision", precision, "--engine", "--trt", "rtx",
                      "--min", "32x32", "--opt", "64x96", "--max", "128x128", "--max-batch", "2",
                      "--no-empty-caption", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "engine.plan").stat().st_size > 0
    meta = json.loads((out / "engine.json").read_text())
    assert meta["library_name"] == "TensorRT-RTX" and meta["precision"] == precision
    assert meta["profiles"][0]["as_built"]["x"] == [[1, 3, 32, 32], [1, 3, 64, 96], [2, 3, 128, 128]]
    for progress in ("engine: TensorRT-RTX 1.7.1.116", "parsing model.onnx with TensorRT-RTX", "parsed in",
                     "built in", f"export ready: {out}"):
        assert progress in proc.stdout, proc.stdout
    assert "timing.cache" not in {p.name for p in out.iterdir()}  # TensorRT-RTX has no kernel timing to cache
    return out


def test_pid_export_builds_a_held_out_fp32_engine_cpu_only(tmp_path):
    run_bar(tmp_path, "fp32")


@pytest.mark.engine_matrix
def test_pid_export_builds_a_held_out_bf16_engine_cpu_only(tmp_path):
    run_bar(tmp_path, "bf16")


def test_pid_run_engine_plan_and_latents_alone_write_a_png(tmp_path):
    """Issue 14: `pid-run DIR/engine.plan latents.npy`, no other flag, writes latents.png beside the
    latents (caption: the unconditional one beside the plan). Needs a GPU that runs the plan.
    The export's own choice of library (auto: enterprise TensorRT first where a GPU is visible)
    builds it, so the plan is whatever a user of this machine gets."""
    import numpy as np
    import torch

    from pid_export.engine import tensorrt_status, why_engines_cannot_run_here
    from pid_runtime.trt_library import select_library

    usable, line = tensorrt_status()
    if not usable:
        pytest.skip(f"no engine can be built here: {line}")
    why = why_engines_cannot_run_here(select_library(None))
    if why is not None:
        pytest.skip(f"the plan is built here but cannot run: {why}")
    out = tmp_path / "out"
    proc = pid_export(*held_out_network_args(tmp_path), "--precision", "bf16", "--engine", "--min", "32x32",
                      "--opt", "64x96", "--max", "128x128", "--no-empty-caption", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    dim = json.loads((tmp_path / "held_out.json").read_text())["txt_embed_dim"]
    np.save(out / "empty_caption.npy", torch.randn(1, 10, dim).numpy())
    latents = tmp_path / "latents.npy"
    np.save(latents, torch.randn(1, 16, 2, 3).numpy())
    proc = subprocess.run([sys.executable, "-m", "pid_runtime.cli", str(out / "engine.plan"), str(latents)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "latents.png").stat().st_size > 0
    assert str(tmp_path / "latents.png") in proc.stdout and "unconditional caption" in proc.stdout


@pytest.mark.parametrize("extra, needles", [
    (["--strip-weights"], ["--strip-weights with TensorRT-RTX needs a CUDA GPU at build time"]),
    (["--verify"], ["--verify runs the engine, and it cannot run here: TensorRT-RTX runs engines on a CUDA GPU and "
                    "none is visible", "Build without --verify here"]),
    (["--compute-capability", "9.0"], ["cannot build for compute capability 9.0"]),
    (["--compute-capability", "volta"], ["compute capability 'volta' is not like 8.9"]),
    (["--profiles", "2048x2048", "--opt", "2048x2048"], ["give either --opt or --profiles"]),
    (["--min", "32x32", "--max", "100x100"], ["height 100 is not a positive multiple of 16"]),
    (["--trt", "tensorrt"], ["TensorRT is not installed"]),
], ids=["strip-weights", "verify", "target", "bad-target", "opt-and-profiles", "bad-profile", "enterprise"])
def test_engine_mistakes_fail_before_the_export(extra, needles, tmp_path):
    import torch

    from pid_runtime.trt_library import problem_of

    if ("--strip-weights" in extra or "--verify" in extra) and torch.cuda.is_available():
        pytest.skip("checks a machine without a GPU")
    if "tensorrt" in extra and problem_of("tensorrt") is None:
        pytest.skip("enterprise TensorRT is installed here")
    start = time.perf_counter()
    proc = pid_export(*network_args(tmp_path), "--precision", "fp32", "--engine", "--min", "32x32", "--max",
                      "128x128", *extra, "--out", str(tmp_path / "out"))
    assert_one_line_error(proc, *needles)
    assert not (tmp_path / "out").exists()
    assert "exporting ONNX" not in proc.stdout  # refused before the minutes of export
    assert time.perf_counter() - start < 120


@pytest.mark.engine_matrix
def test_demo_builds_the_builtin_models_engine(tmp_path):
    """Issue 9 item 6: `pid-export --demo` builds the built-in model's engine when a library is
    importable, says so, and still decodes (with the ONNX where the engine cannot run)."""
    import torch

    out = tmp_path / "demo"
    proc = pid_export("--demo", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "a TensorRT library is installed, TensorRT-RTX 1.7.1.116" in proc.stdout
    assert json.loads((out / "engine.json").read_text())["decomposable_attention_layers"] == 6  # fp32 demo
    assert (out / "engine.plan").stat().st_size > 0 and (out / "demo.png").stat().st_size > 0
    if not torch.cuda.is_available():
        assert "cannot run here (TensorRT-RTX runs engines on a CUDA GPU and none is visible); using" in proc.stdout
        assert "with onnxruntime on cpu" in proc.stdout
