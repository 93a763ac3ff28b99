"""`pid-export` end to end (custom network path) and its bad-input handling."""

from __future__ import annotations

import json
import subprocess
import sys

import onnxruntime as ort
import pytest
import torch

from conftest import golden_case, golden_net, golden_tensors, rel_err
from exports import export_root, shared_export  # noqa: F401 (fixture)
from pid_export.onnx_export import export_onnx
from pid_runtime.metadata import INPUT_NAMES, ModelMetadata


def pid_export(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pid_export.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("pid-export: error:"), lines[0]
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def write_config(tmp_path, case: str):
    path = tmp_path / f"{case}.json"
    path.write_text(json.dumps(golden_case(case)["network"]))
    return path


def test_help_lists_releases_and_options():
    proc = pid_export("--help")
    assert proc.returncode == 0
    for text in ("--backbone", "--variant", "--precision", "--onnx-only", "sd3: 2k, 2kto4k", "zimage -> flux"):
        assert text in proc.stdout


def test_network_config_export_runs_in_onnxruntime(tmp_path):
    """The held-out path: --network-config + --checkpoint, fp32, then ONNX Runtime at two shapes."""
    case = "tiny_v1_4ch_sdxl"
    out = tmp_path / "export"
    proc = pid_export("--network-config", str(write_config(tmp_path, case)),
                      "--checkpoint", str(golden_case(case)["pth"]),
                      "--precision", "fp32", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "engine step will be skipped" in proc.stdout or "engine.plan" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", f"{case}.json"], "no staging leftovers"

    meta = ModelMetadata.load(out / "pid_export.json")
    assert meta.checkpoint_sha256 and meta.latent_channels == 4 and meta.precision == "fp32"
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    g = golden_tensors(case)
    got = session.run(None, {k: g[k].numpy() for k in INPUT_NAMES})[0]
    assert rel_err(got, g["velocity"]) < 1e-4

    net = golden_net(case)
    gen = torch.Generator().manual_seed(3)
    scale = net.cfg.pixel_scale
    inputs = (torch.randn(2, 3, 3 * scale, 1 * scale, generator=gen), torch.tensor([999.0, 342.0]),
              torch.randn(2, 5, net.cfg.txt_embed_dim, generator=gen), torch.randn(2, 4, 3, 1, generator=gen),
              torch.tensor([0.0, 0.3]))
    with torch.no_grad():
        want = net(*inputs)
    got = session.run(None, {k: v.numpy() for k, v in zip(INPUT_NAMES, inputs)})[0]
    assert rel_err(got, want) < 1e-4


def test_unknown_release_pair_lists_valid_pairs(tmp_path):
    proc = pid_export("--backbone", "sd3", "--variant", "2kto4k-v1.5", "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, "sd3", "flux: 2k, 2kto4k, 2kto4k-v1.5")
    proc = pid_export("--backbone", "sd5", "--variant", "2k", "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, "sd5")
    assert not (tmp_path / "o").exists()


def test_checkpoint_that_does_not_fit_is_refused(tmp_path):
    # a v1 16-channel network given the v1.5 128-channel golden checkpoint
    proc = pid_export("--network-config", str(write_config(tmp_path, "tiny_v1_16ch_sr4")),
                      "--checkpoint", str(golden_case("tiny_v1pt5_128ch_unpatchify2")["pth"]),
                      "--precision", "fp32", "--onnx-only", "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, "does not fit")
    assert not (tmp_path / "o").exists()


def test_invalid_network_config(tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{ not json")
    ckpt = str(golden_case("tiny_v1_16ch_sr4")["pth"])
    assert_one_line_error(pid_export("--network-config", str(bad_json), "--checkpoint", ckpt, "--onnx-only",
                                     "--out", str(tmp_path / "o")), "not valid JSON")
    unknown_key = tmp_path / "unknown.json"
    unknown_key.write_text(json.dumps({**golden_case("tiny_v1_16ch_sr4")["network"], "hidden_sise": 8}))
    assert_one_line_error(pid_export("--network-config", str(unknown_key), "--checkpoint", ckpt, "--onnx-only",
                                     "--out", str(tmp_path / "o")), "hidden_sise")
    assert_one_line_error(pid_export("--network-config", str(unknown_key), "--onnx-only"), "--checkpoint")
    assert not (tmp_path / "o").exists()


def test_unwritable_output_fails_before_any_work(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    case = "tiny_v1_16ch_sr4"
    proc = pid_export("--network-config", str(write_config(tmp_path, case)),
                      "--checkpoint", str(golden_case(case)["pth"]), "--onnx-only", "--out", str(blocker / "out"))
    assert_one_line_error(proc, "cannot write the export")


def test_engine_demanded_without_tensorrt_fails_fast(tmp_path):
    from pid_export.engine import tensorrt_status

    if tensorrt_status()[0]:
        pytest.skip("TensorRT is usable here: the engine would be built")
    case = "tiny_v1_16ch_sr4"
    proc = pid_export("--network-config", str(write_config(tmp_path, case)),
                      "--checkpoint", str(golden_case(case)["pth"]), "--engine", "--out", str(tmp_path / "o"),
                      timeout=120)
    assert_one_line_error(proc, "TensorRT")
    assert not (tmp_path / "o").exists()


def test_failed_export_leaves_nothing_behind(tmp_path):
    """A network that fails while being traced: neither the export nor its staging dir remains."""
    net = golden_net("tiny_v1_16ch_sr4")

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure inside the traced forward")

    net.pixel_blocks[0].forward = broken
    with pytest.raises(Exception, match="simulated failure"):
        export_onnx(net, tmp_path / "out", "fp32", static_shape=(1, 64, 96))
    assert list(tmp_path.iterdir()) == []


def test_failed_reexport_keeps_the_previous_export(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"previous export")
    net = golden_net("tiny_v1_16ch_sr4")
    net.final_layer.forward = lambda *a: (_ for _ in ()).throw(RuntimeError("simulated failure"))
    with pytest.raises(Exception):
        export_onnx(net, out, "fp32", static_shape=(1, 64, 96))
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (out / "model.onnx").read_bytes() == b"previous export"


def test_a_static_export_decodes_full_length_captions(export_root):  # noqa: F811
    """A --static export takes the captions pid-run gives (txt_max_length tokens: files, the
    unconditional caption, the encoder's padded output), and matches the network there.
    (The shared static export: export_onnx(..., "fp32", static_shape=(1, 64, 96)).)"""
    case = "tiny_v1_16ch_sr4"
    net, g = golden_net(case), golden_tensors(case)
    assert g["y"].shape[1] == net.cfg.txt_max_length
    export_dir = shared_export(case, "fp32", static_shape=(1, 64, 96))
    session = ort.InferenceSession(str(export_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {i.name: g[i.name].numpy() for i in session.get_inputs()}
    (velocity,) = session.run(["velocity"], feeds)
    assert rel_err(velocity, g["velocity"]) < 1e-4
