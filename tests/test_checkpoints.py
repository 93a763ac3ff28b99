"""Checkpoint loading, verification and resolution, on golden files and synthetic released-layout files."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pid_export import PidConfig, PidNet, load_checkpoint
from pid_export.checkpoints import CheckpointError, file_sha256, resolve_checkpoint, verify_checkpoint
from pid_export.releases import all_releases, get_release
from pid_export.synthetic import synthetic_state_dict, synthetic_tensors, write_synthetic_checkpoint

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
GOLDEN = SHARED / "golden"
GOLDEN_CASES = sorted(p.stem for p in GOLDEN.glob("tiny_*.pth")) if GOLDEN.is_dir() else []
NEEDS_GOLDEN = pytest.mark.skipif(not GOLDEN_CASES, reason=f"golden files not found in {GOLDEN}")
AUX_HEAD = "lq_proj.lq_aux_rgb_head."
V15_CASE = "tiny_v1pt5_16ch"  # has the aux RGB head


def golden_network(case: str) -> dict:
    return json.loads((GOLDEN / f"{case}.json").read_text())["network"]


def golden_raw(case: str) -> dict[str, torch.Tensor]:
    """The golden file as stored: `net.`-prefixed float32, aux head included."""
    return torch.load(GOLDEN / f"{case}.pth", weights_only=True, map_location="cpu")


def network_view(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What load_checkpoint should return for `raw`: prefix stripped, aux head dropped."""
    return {k.removeprefix("net."): v for k, v in raw.items() if not k.startswith("net." + AUX_HEAD)}


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key


# ---------------------------------------------------------------------------
# Golden files and the layouts users may have


@NEEDS_GOLDEN
@pytest.mark.parametrize("case", GOLDEN_CASES or ["none"])
def test_golden_checkpoint_loads_strictly(case):
    state = load_checkpoint(GOLDEN / f"{case}.pth")
    assert not any(k.startswith("net.") or k.startswith(AUX_HEAD) for k in state)
    assert_same_tensors(state, network_view(golden_raw(case)))
    net = PidNet.from_config(golden_network(case))
    net.load_state_dict(state, strict=True)
    verify_checkpoint(state, PidConfig.from_dict(golden_network(case)))


@NEEDS_GOLDEN
def test_golden_v15_file_really_has_the_aux_head_that_is_dropped():
    raw = golden_raw(V15_CASE)
    assert any(k.startswith("net." + AUX_HEAD) for k in raw)
    assert not any(k.startswith(AUX_HEAD) for k in load_checkpoint(GOLDEN / f"{V15_CASE}.pth"))


def _layouts(raw: dict[str, torch.Tensor]) -> dict[str, object]:
    bare = {k.removeprefix("net."): v for k, v in raw.items()}
    training = {
        **raw,
        **{"net_ema." + k: v + 1 for k, v in bare.items() if k.startswith("final_layer.")},
        "fake_score.patch_blocks.0.norm_x1.weight": torch.ones(3),
        "discriminator.head.weight": torch.ones(2, 2),
    }
    return {
        "state_dict_wrapper": {"state_dict": raw, "epoch": 7},
        "net_wrapper_unprefixed": {"net": bare, "optimizer": {"lr": 1e-4}},
        "unprefixed": bare,
        "training_keys_in_model_wrapper": {"model": training, "iteration": 1000},
    }


@NEEDS_GOLDEN
@pytest.mark.parametrize("layout", list(_layouts({})))
def test_wrapped_unprefixed_and_training_layouts(tmp_path, layout):
    raw = golden_raw(V15_CASE)
    path = tmp_path / f"{layout}.pth"
    torch.save(_layouts(raw)[layout], path)
    state = load_checkpoint(path)
    assert_same_tensors(state, network_view(raw))
    PidNet.from_config(golden_network(V15_CASE)).load_state_dict(state, strict=True)


@NEEDS_GOLDEN
@pytest.mark.parametrize("name, prefix", [("model.safetensors", ""), ("model.safetensors", "net."),
                                          ("safetensors_named.bin", "")])
def test_safetensors(tmp_path, name, prefix):
    raw = golden_raw(V15_CASE)
    path = tmp_path / name
    save_file({prefix + k.removeprefix("net."): v.contiguous() for k, v in raw.items()}, str(path))
    state = load_checkpoint(path)  # recognised by content, whatever the suffix
    assert_same_tensors(state, network_view(raw))
    PidNet.from_config(golden_network(V15_CASE)).load_state_dict(state, strict=True)


@NEEDS_GOLDEN
def test_legacy_torch_format(tmp_path):
    raw = golden_raw("tiny_v1_4ch_sdxl")
    path = tmp_path / "legacy.pt"
    torch.save(raw, path, _use_new_zipfile_serialization=False)  # cannot be memory-mapped
    assert_same_tensors(load_checkpoint(path), network_view(raw))


# ---------------------------------------------------------------------------
# Files that are not (whole) PiD checkpoints: one clear CheckpointError each


class _OpensAFile:
    """Unpickling this would create a file: proof that nothing arbitrary was unpickled."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def _bad_file(kind: str, tmp_path: Path) -> Path:
    path = tmp_path / f"{kind}.pth"
    if kind == "truncated":
        data = (GOLDEN / f"{V15_CASE}.pth").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "truncated_safetensors":
        path = tmp_path / "half.safetensors"
        data = (GOLDEN / f"{V15_CASE}.safetensors").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "random_bytes":
        path.write_bytes(random.Random(0).randbytes(10_000))
    elif kind == "json_text":
        path.write_text(json.dumps({"net.patch_blocks.0.norm_x1.weight": [1.0, 2.0]}))
    elif kind == "json_named_safetensors":
        path = tmp_path / "model.safetensors"
        path.write_text(json.dumps({"hello": "world"}))
    elif kind == "object_pickle":
        torch.save({"net.patch_blocks.0.x": _OpensAFile(tmp_path / "UNPICKLED")}, path)
    elif kind == "non_tensor_dict":
        torch.save({"patch_blocks": "not weights", "epoch": 3}, path)
    elif kind == "other_model":
        torch.save({"encoder.conv.weight": torch.zeros(4, 3, 3, 3)}, path)
    elif kind == "bare_tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "golden_inputs_safetensors":
        path = GOLDEN / f"{V15_CASE}.safetensors"  # a valid safetensors file of network inputs
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "missing":
        path = tmp_path / "nope" / "model_ema_bf16.pth"
    return path


@NEEDS_GOLDEN
@pytest.mark.parametrize("kind, says", [
    ("truncated", "truncated or corrupt"),
    ("truncated_safetensors", "not a valid safetensors file"),
    ("random_bytes", "not a PyTorch or safetensors checkpoint"),
    ("json_text", "not a PyTorch or safetensors checkpoint"),
    ("json_named_safetensors", "not a valid safetensors file"),
    ("object_pickle", "Python objects other than tensors"),
    ("non_tensor_dict", "is not a PiD checkpoint"),
    ("other_model", "is not a PiD checkpoint"),
    ("bare_tensor", "is not a PiD checkpoint"),
    ("golden_inputs_safetensors", "is not a PiD checkpoint"),
    ("empty", "is empty"),
    ("missing", "not found"),
])
def test_bad_files_give_one_clear_error(tmp_path, kind, says):
    path = _bad_file(kind, tmp_path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert says in message
    assert str(path) in message
    assert "\n" not in message and len(message) < 400
    assert not (tmp_path / "UNPICKLED").exists()


# ---------------------------------------------------------------------------
# Verification against a release


# Releases whose files have identical keys and shapes (they differ only in training data).
SAME_LAYOUT = [
    {"flux/2k", "flux/2kto4k", "sd3/2k", "sd3/2kto4k"},
    {"flux2/2k", "flux2/2kto4k"},
    {"flux/2kto4k-v1.5", "qwenimage/2kto4k-v1.5"},
    {"flux2/2kto4k-v1.5"}, {"dinov2/2k"}, {"siglip/2k"}, {"sdxl/2kto4k"},
]


def _group(label: str) -> set[str]:
    return next(g for g in SAME_LAYOUT if label in g)


@functools.cache
def _meta_file_view(label: str) -> dict[str, torch.Tensor]:
    backbone, variant = label.split("/")
    return dict(synthetic_tensors(get_release(backbone, variant).network, device="meta", with_aux_head=False))


def _released_file_view(release) -> dict[str, torch.Tensor]:
    """Shape-only tensors keyed as load_checkpoint returns a file of `release`."""
    return dict(_meta_file_view(release.label))


@pytest.mark.parametrize("requested", all_releases(), ids=lambda r: r.label)
def test_every_release_file_is_accepted_or_refused_naming_where_it_fits(requested):
    for actual in all_releases():
        state = _released_file_view(actual)
        if actual.label in _group(requested.label):
            verify_checkpoint(state, requested)
            continue
        with pytest.raises(CheckpointError) as err:
            verify_checkpoint(state, requested)
        message = str(err.value)
        assert message.startswith(f"checkpoint does not fit release {requested.label}: ")
        assert "it looks like a" in message
        for label in _group(actual.label):  # every release the file does fit is named
            assert label in message.rsplit("it looks like", 1)[1]


def test_mismatch_message_names_keys_and_shapes():
    state = _released_file_view(get_release("flux2", "2k"))
    with pytest.raises(CheckpointError) as err:
        verify_checkpoint(state, get_release("sd3", "2k").network, "sd3/2k")
    assert str(err.value) == (
        "checkpoint does not fit release sd3/2k: 1 key(s) with other shapes "
        "(lq_proj.latent_proj.0.weight is [512, 128, 3, 3], expected [512, 16, 3, 3]); "
        "it looks like a v1 128-channel checkpoint (flux2/2k, flux2/2kto4k)")


def test_missing_and_unexpected_keys_are_named():
    state = _released_file_view(get_release("sdxl", "2kto4k"))
    del state["final_layer.linear.weight"]
    state["patch_blocks.99.extra"] = torch.empty(1, device="meta")
    with pytest.raises(CheckpointError) as err:
        verify_checkpoint(state, get_release("sdxl", "2kto4k"))
    message = str(err.value)
    assert "1 missing key(s) (final_layer.linear.weight)" in message
    assert "1 unexpected key(s) (patch_blocks.99.extra)" in message
    assert "it looks like a v1 4-channel checkpoint (sdxl/2kto4k)" in message


@NEEDS_GOLDEN
def test_file_fitting_no_release_says_so():
    state = load_checkpoint(GOLDEN / "tiny_v1_16ch_sr4.pth")
    with pytest.raises(CheckpointError, match="matches no PiD release"):
        verify_checkpoint(state, get_release("flux", "2k"))


# ---------------------------------------------------------------------------
# Synthetic checkpoints and the full-size user path


@pytest.mark.skipif(not (GOLDEN / "released_checkpoints.json").is_file(), reason="released_checkpoints.json absent")
@pytest.mark.parametrize("release", all_releases(), ids=lambda r: r.label)
def test_synthetic_layout_is_exactly_the_released_file_layout(release):
    released = json.loads((GOLDEN / "released_checkpoints.json").read_text())[release.name]
    state = synthetic_state_dict(release, device="meta")
    assert {k: list(v.shape) for k, v in state.items()} == released["keys"]
    assert sum(v.numel() for v in state.values()) == released["parameters"]
    assert all(v.dtype == torch.bfloat16 for v in state.values())


@NEEDS_GOLDEN
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_small_synthetic_checkpoint_round_trip(tmp_path, suffix):
    cfg = PidConfig.from_dict(golden_network(V15_CASE))
    path = write_synthetic_checkpoint(cfg, tmp_path / f"synthetic{suffix}", seed=3)
    assert os.listdir(tmp_path) == [path.name]  # no temporary file left behind
    state = load_checkpoint(path)
    assert_same_tensors(state, synthetic_state_dict(cfg, seed=3, prefix="", with_aux_head=False))
    net = PidNet(cfg)
    net.load_state_dict(state, strict=True)
    b, h, w = 1, 64, 96
    lq = torch.randn(b, cfg.lq_latent_channels, h // cfg.pixel_scale, w // cfg.pixel_scale)
    with torch.no_grad():
        v = net(torch.randn(b, 3, h, w), torch.tensor([500.0]), torch.randn(b, 5, cfg.txt_embed_dim), lq,
                torch.zeros(b))
    assert v.shape == (b, 3, h, w) and bool(v.isfinite().all())


FULL = get_release("flux2", "2kto4k-v1.5")  # the most complex layout: unpatchify, PiT, aux head
# 1,401,447,619 parameters in the released file (released_checkpoints.json) minus the aux
# RGB head: 1024 + 1024 + 1024*1024 + 1024 + 48*1024 + 48 = 1,100,848.
FULL_NETWORK_PARAMETERS = 1_401_447_619 - 1_100_848


@pytest.fixture(scope="module")
def full_size_file(tmp_path_factory):
    path = write_synthetic_checkpoint(FULL, tmp_path_factory.mktemp("full") / "model_ema_bf16.pth", seed=1)
    yield path
    path.unlink()  # 2.8 GB: do not leave it in pytest's kept temp directories


@pytest.fixture(scope="module")
def full_size_state(full_size_file) -> dict[str, torch.Tensor]:
    return load_checkpoint(resolve_checkpoint(FULL, full_size_file))


def test_full_size_synthetic_file_has_the_released_layout(full_size_file):
    raw = torch.load(full_size_file, weights_only=True, mmap=True, map_location="cpu")
    assert all(k.startswith("net.") and v.dtype == torch.bfloat16 for k, v in raw.items())
    assert any(k.startswith("net." + AUX_HEAD) for k in raw)
    assert full_size_file.stat().st_size > 2 * FULL_NETWORK_PARAMETERS


def test_full_size_synthetic_checkpoint_loads_strictly_through_the_user_path(full_size_file, record_property):
    start = time.perf_counter()
    path = resolve_checkpoint(FULL, full_size_file.parent)  # a directory holding model_ema_bf16.pth
    state = load_checkpoint(path)
    verify_checkpoint(state, FULL)
    with torch.device("meta"):
        net = PidNet.from_config(FULL)
    net.load_state_dict(state, strict=True, assign=True)
    record_property("load_verify_assign_s", round(time.perf_counter() - start, 2))
    assert path == full_size_file
    assert sum(p.numel() for p in net.parameters()) == FULL_NETWORK_PARAMETERS
    loaded = net.state_dict()
    for name, expected in synthetic_tensors(FULL.network, seed=1, with_aux_head=False):
        assert torch.equal(loaded[name], expected), name


def test_full_size_wrong_backbone_is_refused_naming_the_fitting_release(full_size_state):
    with pytest.raises(CheckpointError) as err:
        verify_checkpoint(full_size_state, get_release("sd3", "2kto4k"))
    message = str(err.value)
    assert message.startswith("checkpoint does not fit release sd3/2kto4k: ")
    assert "lq_proj.latent_proj.0.weight is [1024, 32, 3, 3], expected [512, 16, 3, 3]" in message
    assert message.endswith("it looks like a v1.5 128-channel (unpatchified to 32) checkpoint (flux2/2kto4k-v1.5)")


@pytest.mark.slow
def test_full_size_synthetic_weights_give_a_finite_forward(full_size_state):
    with torch.device("meta"):
        net = PidNet.from_config(FULL)
    net.load_state_dict(full_size_state, strict=True, assign=True)  # bfloat16 weights
    lq = torch.randn(1, 128, 1, 1)  # one latent cell = 64x64 output pixels
    with torch.no_grad():
        v = net(torch.randn(1, 3, 64, 64), torch.tensor([999.0]), torch.randn(1, 4, 2304), lq, torch.zeros(1))
    assert v.shape == (1, 3, 64, 64) and bool(v.isfinite().all())


# ---------------------------------------------------------------------------
# Resolution and hashing


def test_resolve_explicit_paths(tmp_path):
    release = get_release("sd3", "2k")
    with pytest.raises(CheckpointError, match="checkpoint file not found"):
        resolve_checkpoint(release, tmp_path / "absent.pth")
    with pytest.raises(CheckpointError, match="holds no model_ema_bf16.pth"):
        resolve_checkpoint(release, tmp_path)
    # A local copy of the hub repo: checkpoints/<name>/model_ema_bf16.pth.
    hub_copy = tmp_path / release.checkpoint_file
    hub_copy.parent.mkdir(parents=True)
    hub_copy.write_bytes(b"x")
    assert resolve_checkpoint(release, tmp_path) == hub_copy
    assert resolve_checkpoint(release, str(hub_copy)) == hub_copy


_HUB_SCRIPT = """
import json, sys
from pid_export.checkpoints import CheckpointError, resolve_checkpoint
from pid_export.releases import get_release
out = {"cached": str(resolve_checkpoint(get_release("sd3", "2k")))}
try:
    resolve_checkpoint(get_release("flux", "2k"))
except CheckpointError as exc:
    out["error"] = str(exc)
print(json.dumps(out))
"""


@NEEDS_GOLDEN
def test_hub_cache_is_used_offline_and_a_missing_file_says_how_to_pass_it(tmp_path):
    # A Hugging Face cache holding only the sd3/2k file, as hf_hub_download leaves it.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--nvidia--PiD"
    cached = repo / "snapshots" / commit / get_release("sd3", "2k").checkpoint_file
    cached.parent.mkdir(parents=True)
    cached.write_bytes((GOLDEN / "tiny_v1_16ch_sr4.pth").read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    proc = subprocess.run([sys.executable, "-c", _HUB_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert Path(out["cached"]) == cached
    assert out["error"] == (
        "cannot get the flux/2k checkpoint (nvidia/PiD/checkpoints/PiD_res2k_sr4x_official_flux_distill_4step/"
        "model_ema_bf16.pth): it is not in the Hugging Face cache and offline mode (HF_HUB_OFFLINE) is on: "
        "download it by other means and pass --checkpoint PATH")


@NEEDS_GOLDEN
def test_file_sha256_streams_the_whole_file():
    path = GOLDEN / f"{V15_CASE}.pth"
    want = hashlib.sha256(path.read_bytes()).hexdigest()
    assert file_sha256(path) == want
    assert file_sha256(path, chunk_bytes=4096) == want  # many chunks
