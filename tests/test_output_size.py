"""Any output size (issue 10): the latent is aligned to the patch grid as the reference does.

The reference (SPEC 3.1 step 2) resizes the latent to the patch grid [H/16, W/16] with
F.interpolate: nearest when the latent is coarser than the grid (ratio r > 1, every
release), bilinear when r == 1 and the sizes differ, and for r < 1 bilinear to
[H/16 * k, W/16 * k] then a fold of each k x k block into channels. `reference_align`
below writes that down plainly with F.interpolate; a "twin" network with the same
weights whose latent already sits on the patch grid (r == 1, native size, so its own
alignment does nothing) then runs the rest of the golden-checked network on it. PidNet
at a non-native size must equal twin(reference_align(latent)) end to end.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from exports import export_cases, export_root  # noqa: F401 (fixture)
from safetensors.torch import save_file

from conftest import GOLDEN_CASES, golden_case, golden_net, golden_tensors, rel_err
from pid_export import PidNet
from pid_export.network import resize_bilinear, resize_nearest
from pid_runtime.cli import main as pid_run
from pid_runtime.decode import DecodeError, check_inputs
from pid_runtime.sizes import aspect_ratio_range, parse_hw
from pid_runtime.metadata import INPUT_NAMES, MODEL_METADATA, ModelMetadata
from pid_runtime.sampler import sample

PATCH = 16
NET_TOL = 1e-5  # PidNet vs the reference: the same float32 math, so float32 rounding at most
ONNX_TOL = 1e-4


# ---------------------------------------------------------------------------
# The reference, written from SPEC 3.1 (the reference code's F.interpolate calls)


def reference_align(network: dict, lq_latent: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    f = network.get("lq_latent_unpatchify_factor", 1)
    z = lq_latent
    if f > 1:  # channel c*f*f + i*f + j -> pixel (f*row + i, f*col + j)
        b, c, h, w = z.shape
        z = z.reshape(b, c // (f * f), f, f, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // (f * f), h * f, w * f)
    r = network["sr_scale"] * (network["latent_spatial_down_factor"] // f) / network["patch_size"]
    if r > 1:
        return F.interpolate(z, size=(gh, gw), mode="nearest")
    if r == 1:
        if tuple(z.shape[-2:]) != (gh, gw):
            z = F.interpolate(z, size=(gh, gw), mode="bilinear", align_corners=False)
        return z
    k = int(1 / r)
    if tuple(z.shape[-2:]) != (gh * k, gw * k):
        z = F.interpolate(z, size=(gh * k, gw * k), mode="bilinear", align_corners=False)
    b, c = z.shape[:2]
    return z.reshape(b, c, gh, k, gw, k).permute(0, 1, 3, 5, 2, 4).reshape(b, c * k * k, gh, gw)


def twin_of(net: PidNet, network: dict) -> PidNet:
    """The same weights, taking a latent that already lies on the patch grid (r == 1)."""
    twin_network = dict(network, lq_latent_channels=net.cfg.lq_conv_in_channels, lq_latent_unpatchify_factor=1,
                        sr_scale=1, latent_spatial_down_factor=network["patch_size"])
    twin = PidNet.from_config(twin_network).eval()
    twin.load_state_dict(net.state_dict(), strict=True)
    return twin


def inputs_at(net: PidNet, batch: int, size: tuple[int, int], latent_hw: tuple[int, int], text_len: int = 5,
              seed: int = 0) -> tuple[torch.Tensor, ...]:
    cfg = net.cfg
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 3, *size, generator=gen),
            torch.rand(batch, generator=gen) * 1000,
            torch.randn(batch, text_len, cfg.txt_embed_dim, generator=gen),
            torch.randn(batch, cfg.lq_latent_channels, *latent_hw, generator=gen),
            torch.rand(batch, generator=gen) * 0.5)


def held_out(case: str, **changes) -> tuple[PidNet, dict]:
    """The golden network of `case` with config changes; weights golden, except a first LQ conv whose
    input width changed (fold), which gets seeded random weights."""
    network = dict(golden_case(case)["network"], **changes)
    net = PidNet.from_config(network).eval()
    state = golden_net(case).state_dict()
    gen = torch.Generator().manual_seed(11)
    for name, tensor in net.state_dict().items():
        if state[name].shape != tensor.shape:
            state[name] = torch.randn(tensor.shape, generator=gen) * state[name].std()
    net.load_state_dict(state, strict=True)
    return net, network


def assert_matches_reference(net: PidNet, network: dict, inputs: tuple[torch.Tensor, ...]) -> None:
    x, t, y, lq_latent, sigma = inputs
    gh, gw = x.shape[2] // PATCH, x.shape[3] // PATCH
    with torch.no_grad():
        got, got_feature = net(*inputs, return_lq_feature=True)
        want, want_feature = twin_of(net, network)(x, t, y, reference_align(network, lq_latent, gh, gw), sigma,
                                                   return_lq_feature=True)
    assert got.shape == x.shape
    assert rel_err(got_feature, want_feature) < NET_TOL
    assert rel_err(got, want) < NET_TOL


# ---------------------------------------------------------------------------
# Nearest resize: exactly F.interpolate's (float32) source rows


# (latent side, patch-grid side) pairs where F.interpolate's float32 source row differs
# from the exact floor(dst * n_in / n_out): an integer-only formula would fail on these.
FLOAT_ROUNDING_PAIRS = [(2, 82), (14, 46), (6, 74), (9, 111), (3, 123)]
UHD_PAIRS = [(68, 135), (120, 240), (13, 108), (14, 108), (67, 135), (128, 240)]


def test_nearest_resize_is_f_interpolate_bit_for_bit():
    pairs = [(a, b) for a in range(1, 10) for b in range(1, 41)] + FLOAT_ROUNDING_PAIRS + UHD_PAIRS
    gen = torch.Generator().manual_seed(0)
    for n_in, n_out in pairs:
        z = torch.randn(1, 2, n_in, 3, generator=gen)
        want = F.interpolate(z, size=(n_out, 3), mode="nearest")
        assert torch.equal(resize_nearest(z, n_out, 3), want), (n_in, n_out)
        zt = z.transpose(2, 3).contiguous()
        assert torch.equal(resize_nearest(zt, 3, n_out), F.interpolate(zt, size=(3, n_out), mode="nearest"))
    differs = [(n_in, n_out) for n_in, n_out in FLOAT_ROUNDING_PAIRS
               if not torch.equal(F.interpolate(torch.arange(n_in, dtype=torch.float32).view(1, 1, 1, -1),
                                                size=(1, n_out), mode="nearest").view(-1).long(),
                                  torch.arange(n_out) * n_in // n_out)]
    assert differs == FLOAT_ROUNDING_PAIRS


class AlignOnly(torch.nn.Module):
    """The two resizes alone, taking the target size from a second input's shape (as PidNet does)."""

    def forward(self, z: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return resize_nearest(z, grid.shape[2], grid.shape[3]), resize_bilinear(z, grid.shape[2], grid.shape[3])


def test_onnx_resizes_match_f_interpolate(tmp_path):
    """In ONNX Runtime, with every size dynamic: nearest bit for bit (the float32 rounding cases
    included), bilinear (an ONNX Resize) to float32 rounding."""
    dim = torch.export.Dim
    shapes = {"z": {2: dim("h", min=1, max=256), 3: dim("w", min=1, max=256)},
              "grid": {2: dim("gh", min=1, max=256), 3: dim("gw", min=1, max=256)}}
    program = torch.onnx.export(AlignOnly().eval(), (torch.randn(1, 2, 3, 4), torch.zeros(1, 1, 5, 7)), None,
                                input_names=["z", "grid"], dynamic_shapes=shapes, opset_version=23, dynamo=True)
    program.save(str(tmp_path / "align.onnx"))
    session = ort.InferenceSession(str(tmp_path / "align.onnx"), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(0)
    pairs = FLOAT_ROUNDING_PAIRS + UHD_PAIRS + [(3, 3), (2, 4), (5, 3), (1, 7), (7, 1)]
    for (h, gh), (w, gw) in zip(pairs, pairs[3:] + pairs[:3]):
        z = torch.randn(1, 2, h, w, generator=gen)
        nearest, bilinear = session.run(None, {"z": z.numpy(), "grid": np.zeros((1, 1, gh, gw), np.float32)})
        assert np.array_equal(nearest, F.interpolate(z, size=(gh, gw), mode="nearest").numpy()), (h, w, gh, gw)
        want = F.interpolate(z, size=(gh, gw), mode="bilinear", align_corners=False)
        assert rel_err(bilinear, want) < 1e-5, (h, w, gh, gw)


def test_native_size_fast_path_equals_the_general_resize():
    net = golden_net("tiny_v1_128ch_lsdf16")  # r = 4
    z = torch.randn(2, 128, 3, 5)
    with torch.no_grad():
        fast = net.lq_proj.align(z, 12, 20)
    assert torch.equal(fast, resize_nearest(z, 12, 20))
    assert torch.equal(fast, F.interpolate(z, size=(12, 20), mode="nearest"))


# ---------------------------------------------------------------------------
# PidNet vs the reference at non-native sizes


def test_issue_example_1x5_latent_to_48x160():
    """The issue's case: a 1x5 16-channel latent (lsdf 8, sr 4: native 32x160) decoded at 48x160."""
    case = "tiny_v1_16ch_sr4"
    net, network = golden_net(case), golden_case(case)["network"]
    assert (network["latent_spatial_down_factor"], network["sr_scale"], network["lq_latent_channels"]) == (8, 4, 16)
    inputs = inputs_at(net, 1, (48, 160), (1, 5), seed=1)
    assert_matches_reference(net, network, inputs)


# Output patch grids other than the latent's native one (which the golden vectors cover):
# non-integer ratios, a grid smaller than native (downscale), a changed aspect ratio.
def grids_for(latent_hw: tuple[int, int], ratio: float) -> list[tuple[int, int]]:
    h, w = latent_hw
    native = (max(int(h * ratio), 1), max(int(w * ratio), 1))
    return [(native[0] + 1, native[1] + 3), (max(native[0] - 1, 1), native[1] + 1), (native[0] * 2 + 1, 3)]


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_nearest_case_matches_reference_at_other_sizes(case):
    net, g = golden_net(case), golden_tensors(case)
    network = golden_case(case)["network"]
    batch, _, h, w = g["lq_latent"].shape
    ratio = float(net.cfg.lq_align_ratio) * net.cfg.lq_latent_unpatchify_factor  # patches per input latent cell
    assert ratio > 1
    for i, (gh, gw) in enumerate(grids_for((h, w), ratio)):
        inputs = inputs_at(net, batch, (gh * PATCH, gw * PATCH), (h, w), seed=i)
        assert_matches_reference(net, network, inputs)


BILINEAR = dict(sr_scale=2)  # 16-ch latent at /8, x2: r == 1
FOLD = dict(sr_scale=1)  # r == 1/2: 2x2 latent cells per patch
FOLD_UNPATCHIFIED = dict(sr_scale=1)  # on the v1.5 Flux2 case: unpatchify 2, then r == 1/2


@pytest.mark.parametrize("case, changes, latent_grids", [
    ("tiny_v1_16ch_sr4", BILINEAR, [((3, 5), (3, 5)), ((3, 5), (4, 6)), ((2, 7), (5, 2)), ((1, 1), (2, 3))]),
    ("tiny_v1_16ch_sr4", FOLD, [((6, 10), (3, 5)), ((5, 7), (3, 5)), ((1, 3), (2, 4)), ((9, 4), (4, 2))]),
    ("tiny_v1pt5_128ch_unpatchify2", FOLD_UNPATCHIFIED, [((3, 5), (3, 5)), ((2, 3), (3, 5)), ((4, 4), (3, 2))]),
], ids=["bilinear", "fold", "fold-unpatchify"])
def test_bilinear_and_fold_cases_match_reference(case, changes, latent_grids):
    net, network = held_out(case, **changes)
    for i, (latent_hw, (gh, gw)) in enumerate(latent_grids):
        assert_matches_reference(net, network, inputs_at(net, 2, (gh * PATCH, gw * PATCH), latent_hw, seed=i))


def test_config_ratios_the_reference_accepts():
    base = golden_case("tiny_v1_16ch_sr4")["network"]
    assert PidNet.from_config(dict(base, sr_scale=1)).cfg.lq_conv_in_channels == 64  # 16 ch x 2x2 fold
    with pytest.raises(ValueError, match="whole number"):
        PidNet.from_config(dict(base, sr_scale=3))  # r = 3/2


# ---------------------------------------------------------------------------
# ONNX Runtime at sizes unlike the trace's, and pid-run --size, on the held-out networks
# (the golden exports at such sizes: tests/test_onnx_export.py)


def run_onnx(session: ort.InferenceSession, inputs: tuple[torch.Tensor, ...]) -> np.ndarray:
    return session.run(None, {name: t.numpy() for name, t in zip(INPUT_NAMES, inputs)})[0]


@pytest.fixture(scope="module")
def held_out_exports(tmp_path_factory) -> dict[str, tuple[PidNet, Path]]:
    """The bilinear and fold networks through `pid-export --network-config ... --onnx-only` (fp32)."""
    root = tmp_path_factory.mktemp("held_out")
    made = {}
    for name, case, changes in (("bilinear", "tiny_v1_16ch_sr4", BILINEAR), ("fold", "tiny_v1_16ch_sr4", FOLD)):
        net, network = held_out(case, **changes)
        (root / f"{name}.json").write_text(json.dumps(network))
        save_file(net.state_dict(), str(root / f"{name}.safetensors"))
        proc = subprocess.run([sys.executable, "-m", "pid_export.cli", "--network-config", str(root / f"{name}.json"),
                               "--checkpoint", str(root / f"{name}.safetensors"), "--precision", "fp32",
                               "--onnx-only", "--out", str(root / name)], capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr
        made[name] = (net, root / name)
    return made


# (batch, latent h, latent w, output H, output W): none is the trace shape (latent 2x3, 80x112)
ORT_SHAPES = [(1, 3, 5, 48, 80), (3, 4, 6, 64, 112), (2, 7, 3, 32, 48), (1, 1, 5, 48, 160)]


@pytest.mark.heavy
@pytest.mark.parametrize("name", ["bilinear", "fold"])
def test_held_out_export_matches_pidnet_at_other_sizes(name, held_out_exports):
    net, export = held_out_exports[name]
    meta = ModelMetadata.load(export / MODEL_METADATA)
    assert meta.any_output_size
    session = ort.InferenceSession(str(export / "model.onnx"), providers=["CPUExecutionProvider"])
    for i, (batch, h, w, height, width) in enumerate(ORT_SHAPES):
        inputs = inputs_at(net, batch, (height, width), (h, w), text_len=3 + i, seed=i)
        with torch.no_grad():
            want = net(*inputs)
        got = run_onnx(session, inputs)
        assert got.shape == tuple(want.shape)
        assert rel_err(got, want) < ONNX_TOL, (batch, h, w, height, width)


def direct_decode(net: PidNet, latents, caption, sigma, noise, eps) -> torch.Tensor:
    """The 4-step sampler on PidNet itself (no runtime, no export)."""
    with torch.no_grad():
        return sample(lambda x, t: net(x, t, caption, latents, sigma), noise, list(eps), steps=4)


def pid_run_size(model: Path, tmp_path: Path, latents, caption, sigma: float, noise, eps, size: str, capfd):
    np.save(tmp_path / "L.npy", latents.numpy())
    np.save(tmp_path / "Y.npy", caption.numpy())
    save_file({"noise": noise, "eps": eps}, str(tmp_path / "N.safetensors"))
    out = tmp_path / "O.npy"
    code = pid_run([str(model), str(tmp_path / "L.npy"), "--caption-embeds", str(tmp_path / "Y.npy"),
                    "--sigma", repr(sigma), "--noise", str(tmp_path / "N.safetensors"), "--size", size,
                    "--out", str(out)])
    captured = capfd.readouterr()
    assert code == 0, captured.err
    return np.load(out), captured.out


def fixed_noise(batch: int, height: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, height, width, generator=gen), torch.randn(3, batch, 3, height, width, generator=gen)


def test_pid_run_size_end_to_end_nearest(export_root, tmp_path, capfd):  # noqa: F811
    """pid-run --size 48x160 on the golden 16-channel export with a 1x5 latent (the issue's example)."""
    case = "tiny_v1_16ch_sr4"
    export = export_cases([case])[case]
    net = golden_net(case)
    gen = torch.Generator().manual_seed(5)
    latents, caption = torch.randn(2, 16, 1, 5, generator=gen), torch.randn(1, 9, net.cfg.txt_embed_dim, generator=gen)
    noise, eps = fixed_noise(2, 48, 160, seed=6)
    image, stdout = pid_run_size(export / "model.onnx", tmp_path, latents, caption, 0.25, noise, eps, "48x160", capfd)
    want = direct_decode(net, latents, caption.expand(2, -1, -1), torch.full((2,), 0.25), noise, eps)
    assert image.shape == (2, 3, 48, 160)
    assert rel_err(image, want) < ONNX_TOL
    assert "2 x 48x160 px (latent 1x5, native 32x160)" in stdout


@pytest.mark.heavy
@pytest.mark.parametrize("name, latent_hw, size", [("fold", (5, 7), "48x80"), ("bilinear", (3, 5), "64x96")])
def test_pid_run_size_end_to_end_held_out(name, latent_hw, size, held_out_exports, tmp_path, capfd):
    net, export = held_out_exports[name]
    height, width = map(int, size.split("x"))
    gen = torch.Generator().manual_seed(8)
    latents, caption = torch.randn(1, 16, *latent_hw, generator=gen), torch.randn(1, 4, 40, generator=gen)
    noise, eps = fixed_noise(1, height, width, seed=9)
    image, _ = pid_run_size(export / "model.onnx", tmp_path, latents, caption, 0.0, noise, eps, size, capfd)
    want = direct_decode(net, latents, caption, torch.zeros(1), noise, eps)
    assert image.shape == (1, 3, height, width)
    assert rel_err(image, want) < ONNX_TOL


# ---------------------------------------------------------------------------
# Size checks: one clear error line


def _meta(any_output_size: bool = True, **changes) -> ModelMetadata:
    fields = dict(release=None, latent_channels=16, latent_down_factor=8, sr_factor=4, txt_embed_dim=40,
                  txt_max_length=12, precision="fp32", network={"patch_size": 16}, any_output_size=any_output_size)
    return ModelMetadata(**{**fields, **changes})


def _check(meta: ModelMetadata, latent_hw: tuple[int, int], size: tuple[int, int] | None, **kwargs):
    return check_inputs(meta, torch.zeros(1, 16, *latent_hw), torch.zeros(1, 3, 40), 0.0, size=size, **kwargs)


def test_size_checks_accept_uhd_from_its_rounded_latent():
    # 3840x2160 is 960x540 at the LDM scale; pipelines round 540 to 544: a 68x120 latent (native 2176x3840).
    inputs = _check(_meta(), (68, 120), (2160, 3840))
    assert (inputs.height, inputs.width) == (2160, 3840)
    assert (_check(_meta(), (68, 120), None).height, _check(_meta(), (68, 120), None).width) == (2176, 3840)


@pytest.mark.parametrize("latent_hw, size, fragments", [
    ((68, 120), (2150, 3840), ["output height 2150 is not a multiple of 16", "2144 or 2160"]),
    ((68, 120), (2160, 3850), ["output width 3850", "3840 or 3856"]),
    ((68, 120), (2048, 2048), ["2048x2048", "68x120 latent", "stretched"]),
    ((68, 120), (2304, 3840), ["2304x3840", "too far"]),  # 72 cells of height for a 68-cell latent
])
def test_size_checks_reject(latent_hw, size, fragments):
    with pytest.raises(DecodeError) as info:
        _check(_meta(), latent_hw, size)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_aspect_ratio_range_is_two_latent_cells_per_side():
    low, high = aspect_ratio_range(68, 120)
    assert low == pytest.approx(66 / 122) and high == pytest.approx(70 / 118)
    assert aspect_ratio_range(1, 5) == (0.0, 1.0)  # the issue's 1x5 latent: 48x160 (0.3) is allowed
    assert aspect_ratio_range(3, 2)[1] == float("inf")


def test_size_range_applies_to_the_requested_size():
    size_range = ((1536, 1536), (4096, 4096))
    _check(_meta(), (68, 120), (2160, 3840), size_range=size_range)
    with pytest.raises(DecodeError, match="output size 1152x2048 is outside"):
        _check(_meta(), (36, 64), (1152, 2048), size_range=size_range)


def test_a_size_outside_the_range_names_the_release_that_covers_it_from_the_export_metadata():
    """The hint comes from the backbone's variants the export recorded, not from a table in the runtime."""
    from pid_export.releases import variant_sides

    def recorded(backbone: str, variant: str) -> ModelMetadata:
        sides = {v: list(s) for v, s in variant_sides(backbone).items()}
        return _meta(backbone=backbone, variant=variant, variant_sides=sides)

    two_k = ((1536, 1536), (2688, 2688))
    with pytest.raises(DecodeError, match=r"2688x2688, the 2k variant\); the 2kto4k release of this backbone"):
        _check(recorded("sd3", "2k"), (120, 120), (3840, 3840), size_range=two_k)
    # SDXL has only a 2kto4k release: a 2kto4k-engine range too narrow names no "2k release".
    with pytest.raises(DecodeError, match="re-export .* with a range that includes it") as info:
        _check(recorded("sdxl", "2kto4k"), (120, 120), (3840, 3840), size_range=two_k)
    assert "2k release" not in str(info.value)
    with pytest.raises(DecodeError, match=r"no PiD release of this backbone was trained for it \(2k: 1536..2688 px\)"):
        _check(recorded("dinov2", "2k"), (120, 120), (3840, 3840), size_range=two_k)
    # An export made before these were recorded (or a custom network): the way out is a wider range.
    with pytest.raises(DecodeError, match="re-export .* with a range that includes it"):
        _check(_meta(release="PiD_res2k_sr4x_official_sd3_distill_4step"), (120, 120), (3840, 3840),
               size_range=two_k)


def test_export_without_free_sizes_refuses_other_sizes():
    old = _meta(any_output_size=False)
    _check(old, (2, 3), (64, 96))  # its native size is fine
    with pytest.raises(DecodeError, match="decodes only at the latent's native size 64x96.*re-export"):
        _check(old, (2, 3), (80, 112))


def test_one_hxw_parser():
    """pid-run --size / --ldm-size / --tile, pid-serve's size= and the benchmarks all read HxW here."""
    assert parse_hw("2160x3840") == (2160, 3840) and parse_hw(" 3840X2160 ") == (3840, 2160)
    for bad in ("2048", "2048x", "x2048", "2048*2048", "-32x32", "0x96", "64by96", "64x96x2", "1.5x2"):
        with pytest.raises(ValueError, match="is not HEIGHTxWIDTH in pixels, e.g.") as info:
            parse_hw(bad)
        assert "\n" not in str(info.value)


def test_pid_run_size_errors_are_one_line(export_root, tmp_path, capfd):  # noqa: F811
    case = "tiny_v1_16ch_sr4"
    export = export_cases([case])[case]
    np.save(tmp_path / "L.npy", np.zeros((1, 16, 8, 12), np.float32))  # big enough that 2 cells of slack cannot cover 64x304
    np.save(tmp_path / "Y.npy", np.zeros((1, 4, 40), np.float32))
    for size, fragment, status in (("2150x96", "not a multiple of 16", 1), ("64x304", "stretched", 1),
                                   ("64by96", "is not HEIGHTxWIDTH", 2), ("0x96", "is not HEIGHTxWIDTH", 2)):
        code = pid_run([str(export), str(tmp_path / "L.npy"), "--caption-embeds", str(tmp_path / "Y.npy"),
                        "--size", size, "--out", str(tmp_path / "O.npy")])
        err = capfd.readouterr().err
        assert code == status, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("pid-run: error:") and fragment in lines[0], err
        assert not (tmp_path / "O.npy").exists()


# ---------------------------------------------------------------------------
# Engine profiles cover the latent and the image dims


def test_engine_profile_latent_range_rounds_outward():
    from pid_export.engine import EngineError, EngineProfile, profile_shapes
    from pid_export.releases import get_release

    cfg = get_release("sd3", "2kto4k").network  # 32 px per latent cell
    profile = EngineProfile.for_config(cfg, (1536, 1536), (2160, 3840), (2160, 4096))
    shapes = profile_shapes(profile)
    assert shapes["x"] == ((1, 3, 1536, 1536), (1, 3, 2160, 3840), (1, 3, 2160, 4096))
    # 2160 px = 67.5 cells: the 68-cell latent of a 16:9 UHD frame fits at the max
    assert [s[2:] for s in shapes["lq_latent"]] == [(48, 48), (67, 120), (68, 128)]
    with pytest.raises(EngineError, match="max height 2150 is not a positive multiple of 16"):
        EngineProfile.for_config(cfg, (1536, 1536), (2048, 2048), (2150, 4096))
