"""Benchmarks: the FLOP model against SPEC sec. 8 and torch's own FLOP counter, the
peak table lookup, the accuracy metrics, and the quick mode end to end (real export,
real ONNX Runtime, real plot)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import golden_net, golden_tensors, rel_err

from benchmarks.backends import DecodeInputs
from benchmarks.flops import network_call_flops
from benchmarks.harness import Settings, reference_decode
from benchmarks.hardware import peak_tflops
from benchmarks.report import accuracy
from pid_export.config import PidConfig
from pid_export.network import PidNet
from pid_export.releases import get_release

REPO = Path(__file__).resolve().parents[1]

# SPEC sec. 8 table (stated there, not computed here): output -> (L, TFLOP per step,
# TFLOP per 4-step image, attention share), for the v1 network with Lt = 300.
SPEC_COST_TABLE = {
    (2048, 2048): (16384, 45, 180, 0.59),
    (2688, 1536): (16128, 44, 176, 0.58),
    (3840, 3840): (57600, 384, 1536, 0.83),
    (4096, 3072): (49152, 288, 1153, 0.81),
    (4096, 4096): (65536, 486, 1945, 0.85),
}


@pytest.mark.parametrize("size", sorted(SPEC_COST_TABLE), ids=lambda s: f"{s[0]}x{s[1]}")
def test_flop_model_matches_spec_cost_table(size):
    tokens, per_step, per_image, attention_share = SPEC_COST_TABLE[size]
    cfg = get_release("flux", "2k").network
    assert (size[0] // 16) * (size[1] // 16) == tokens
    call = network_call_flops(cfg, *size, batch=1, text_len=300)
    assert call.total / 1e12 == pytest.approx(per_step, rel=0.05)
    assert 4 * call.total / 1e12 == pytest.approx(per_image, rel=0.05)
    assert call.attention_share == pytest.approx(attention_share, abs=0.015)


def test_flop_model_parts_match_spec_formulas():
    """SPEC 8 states the big terms as formulas of L and Lt: check each part, not only the sum."""
    cfg = get_release("sd3", "2k").network
    tokens, text = 16384, 300
    call = network_call_flops(cfg, 2048, 2048, text_len=text)
    assert call.patch_linear == pytest.approx(0.79e9 * (tokens + text), rel=0.01)
    assert call.patch_attention == pytest.approx(4 * 14 * (tokens + text) ** 2 * 1536, rel=1e-9)
    assert call.pixel_linear == pytest.approx(2.1e8 * tokens, rel=0.02)
    assert call.pixel_attention == pytest.approx(8 * tokens**2 * 1152, rel=1e-9)
    # "~5% more in the LQ branch and gates"
    assert 0.03 < (call.lq_branch + call.conditioning) / call.total < 0.06


FLOP_COUNTER_CASES = [
    # (release or None for a custom config, output size, batch, text length)
    (("flux", "2k"), (2048, 2048), 1, 300),
    (("flux2", "2kto4k-v1.5"), (1024, 1536), 2, 77),  # v1.5: per-token gates, PiT, unpatchify 2
    (("siglip", "2k"), (1024, 768), 1, 300),  # sr 8, 1152-ch latent
    (None, (128, 192), 3, 5),  # tiny config, text shorter than its maximum
]


@pytest.mark.parametrize("release,size,batch,text_len", FLOP_COUNTER_CASES,
                         ids=["flux-2k", "flux2-v1.5", "siglip", "tiny"])
def test_flop_model_equals_torch_flop_counter(release, size, batch, text_len):
    """Every matmul / conv / attention product the network really runs, counted by torch on meta tensors."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    if release is None:
        cfg = PidConfig(hidden_size=64, num_groups=4, patch_depth=5, pixel_hidden_size=8, pixel_attn_hidden_size=48,
                        pixel_num_groups=4, txt_embed_dim=40, txt_max_length=12, lq_hidden_dim=32,
                        lq_num_res_blocks=2)
    else:
        cfg = get_release(*release).network
    height, width = size
    scale = cfg.pixel_scale
    with torch.device("meta"):
        net = PidNet(cfg)
        args = (torch.empty(batch, 3, height, width), torch.empty(batch), torch.empty(batch, text_len, cfg.txt_embed_dim),
                torch.empty(batch, cfg.lq_latent_channels, height // scale, width // scale), torch.empty(batch))
        # The math attention kernel is made of bmm's, which the counter sees.
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            net(*args)
    model = network_call_flops(cfg, height, width, batch=batch, text_len=text_len)
    assert model.total == pytest.approx(counter.get_total_flops(), rel=1e-9)


def test_peak_table_picks_the_right_card():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16")[0] == 989.4  # SXM5
    assert peak_tflops("NVIDIA H100 PCIe", "bf16")[0] == 756.5
    assert peak_tflops("NVIDIA H100 NVL", "fp16")[0] == 835.5
    assert peak_tflops("NVIDIA H200", "bf16")[0] == 989.4
    assert peak_tflops("NVIDIA H200 NVL", "bf16")[0] == 835.5
    assert peak_tflops("NVIDIA H100 80GB HBM3", "fp32")[0] == 66.9
    assert peak_tflops("NVIDIA GeForce RTX 4090", "bf16")[0] == 165.2
    assert peak_tflops("NVIDIA GeForce RTX 5090", "fp32")[0] == 104.8
    value, source = peak_tflops("AMD EPYC (2 threads, torch uses 2)", "fp32")
    assert value is None and source.startswith("n/a")
    assert peak_tflops("AMD EPYC", "fp32", override=1.5) == (1.5, "--peak-tflops")


def test_accuracy_metrics():
    reference = torch.zeros(1, 3, 4, 4)
    same = accuracy(reference.clone() + 0.5, reference + 0.5)
    assert same["max_abs_err"] == 0 and same["psnr_db"] is None
    # +0.2 everywhere in [-1, 1] is +0.1 in [0, 1] image space: MSE 0.01, PSNR 20 dB.
    offset = accuracy(reference + 0.2, reference - 0.3)
    assert offset["max_abs_err"] == pytest.approx(0.5)
    assert offset["max_rel_err"] == pytest.approx(0.5 / 0.3)
    spike = reference.clone()
    spike[0, 1, 2, 3] = 0.4
    result = accuracy(reference + 0.2, spike)
    assert result["max_abs_err"] == pytest.approx(0.2)
    assert result["max_rel_err"] == pytest.approx(0.2 / 0.4)
    assert accuracy(reference + 0.2, reference)["psnr_db"] == pytest.approx(20.0)


def test_accuracy_reference_reproduces_the_golden_sampler():
    """The benchmarks' accuracy reference is the golden 4-step decode (same noise, same network)."""
    case = "tiny_v1_16ch_sr4_b2"
    net, g = golden_net(case), golden_tensors(case)
    height, width = g["x"].shape[2:]
    inputs = DecodeInputs(latents=g["lq_latent"], caption=g["y"], sigma=g["degrade_sigma"], height=height,
                          width=width, noise=g["sampler_noise"], eps=g["sampler_eps"])
    settings = Settings(cfg=net.cfg, model="golden", sizes=[tuple(g["x"].shape[2:])], backends=[],
                        device=torch.device("cpu"), precision="fp32")
    assert rel_err(reference_decode(net, inputs, settings), g["sampled_image"]) < 1e-5


def _run_latency(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "benchmarks.latency", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_quick_mode_end_to_end(tmp_path):
    """`--quick --out FILE.json`: torch-eager and onnxruntime records, the table and the plot."""
    from PIL import Image

    out = tmp_path / "quick.json"
    run = _run_latency("--quick", "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    document = json.loads(out.read_text())
    records = {r["backend"]: r for r in document["records"]}
    assert set(records) == {"torch-eager", "onnxruntime"}
    for record in records.values():
        assert record["status"] == "ok", record["reason"]
        assert record["runs"] >= 10
        assert 0 < record["latency_ms_min"] <= record["latency_ms_median"] <= record["latency_ms_p90"]
        assert record["per_call_ms_median"] < record["latency_ms_median"]
        assert record["achieved_tflops"] > 0 and record["peak_host_rss_gb"] > 0
    # Both against the harness's reference decode (PidNet called by the sampler directly, itself
    # checked against the golden sampler output below), not against the torch-eager record.
    assert records["torch-eager"]["accuracy_reference"] == "torch fp32 eager"
    assert records["torch-eager"]["max_rel_err"] < 1e-6
    assert records["onnxruntime"]["max_rel_err"] < 1e-4
    assert records["onnxruntime"]["psnr_db"] > 80
    assert records["onnxruntime"]["export_s"] > 0

    table = out.with_suffix(".md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| torch-eager") or line.startswith("| onnxruntime")]
    assert len(rows) == 2
    assert f"{records['onnxruntime']['latency_ms_median']:.1f}" in table

    with Image.open(out.with_suffix(".png")) as image:
        assert image.format == "PNG" and image.width >= 600 and image.height >= 400
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 20  # drawn, not a blank canvas
    assert not list(tmp_path.glob(".quick-work*")), "the per-size ONNX export must be cleaned up"


def test_cli_rejects_a_bad_size_in_one_line(tmp_path):
    out = tmp_path / "bad.json"
    run = _run_latency("--quick", "--sizes", "100x100", "--out", str(out), timeout=120)
    assert run.returncode != 0
    assert "Traceback" not in run.stderr
    assert "not multiples of this network's pixel scale 32" in run.stderr
    assert not out.exists()
