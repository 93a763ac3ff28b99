"""The release registry against the released checkpoint list (shared/golden/released_checkpoints.json)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pid_export import PidConfig, PidNet
from pid_export.releases import (
    UnknownReleaseError,
    all_releases,
    backbone_names,
    get_release,
    release_by_name,
    releases_with_lq_layout,
    variant_names,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
RELEASED_JSON = SHARED / "golden" / "released_checkpoints.json"
RELEASED = json.loads(RELEASED_JSON.read_text()) if RELEASED_JSON.is_file() else {}
AUX_HEAD = "net.lq_proj.lq_aux_rgb_head."
NEEDS_JSON = pytest.mark.skipif(not RELEASED, reason=f"{RELEASED_JSON} not found (shared/ sits next to the repo)")

# SPEC sec. 2: every (backbone, variant) that was released.
EXPECTED_PAIRS = {
    ("flux", "2k"), ("flux", "2kto4k"), ("flux", "2kto4k-v1.5"),
    ("flux2", "2k"), ("flux2", "2kto4k"), ("flux2", "2kto4k-v1.5"),
    ("sd3", "2k"), ("sd3", "2kto4k"),
    ("dinov2", "2k"), ("siglip", "2k"), ("sdxl", "2kto4k"), ("qwenimage", "2kto4k-v1.5"),
}


def meta_shapes(config) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        net = PidNet.from_config(config)
    return {name: tuple(t.shape) for name, t in net.state_dict().items()}


def released_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """Keys of a released file as the network names them: no `net.` prefix, no aux RGB head."""
    return {key.removeprefix("net."): tuple(shape) for key, shape in RELEASED[name]["keys"].items()
            if not key.startswith(AUX_HEAD)}


@NEEDS_JSON
@pytest.mark.parametrize("name", sorted(RELEASED) or ["none"])
def test_released_network_and_registry_entry_build_the_released_keys(name):
    entry = RELEASED[name]
    want = released_shapes(name)
    assert meta_shapes(entry["network"]) == want

    release = release_by_name(name)
    assert release.network == PidConfig.from_dict(entry["network"])
    assert meta_shapes(release) == want
    assert release.checkpoint_file == f"checkpoints/{name}/model_ema_bf16.pth"
    assert release.hub_repo == "nvidia/PiD"
    # The latent layout the entry advertises is the one the network was built with.
    assert release.latent_channels == entry["network"]["lq_latent_channels"]
    assert release.latent_down_factor == entry["network"]["latent_spatial_down_factor"]
    assert release.sr_factor == entry["network"]["sr_scale"]
    assert release.has_aux_rgb_head == any(k.startswith(AUX_HEAD) for k in entry["keys"])


@NEEDS_JSON
def test_registry_and_released_directories_correspond_one_to_one():
    names = [r.name for r in all_releases()]
    assert len(names) == len(set(names))
    assert set(names) == set(RELEASED)


def test_registry_holds_exactly_the_released_pairs():
    pairs = [(r.backbone, r.variant) for r in all_releases()]
    assert len(pairs) == len(set(pairs))
    assert set(pairs) == EXPECTED_PAIRS
    for backbone, variant in EXPECTED_PAIRS:
        release = get_release(backbone, variant)
        assert (release.backbone, release.variant) == (backbone, variant)
        assert release.label == f"{backbone}/{variant}"


@pytest.mark.parametrize("release", all_releases(), ids=lambda r: r.label)
def test_directory_name_agrees_with_backbone_and_variant(release):
    name = release.name
    assert f"_official_{release.backbone}_distill_4step" in name
    assert f"_sr{release.sr_factor}x_" in name
    assert ("v1pt5" in name) == (release.variant == "2kto4k-v1.5")
    assert ("res2kto4k" in name) == release.variant.startswith("2kto4k")


FIVE_2K = {(2048, 2048), (2304, 1728), (1728, 2304), (2688, 1536), (1536, 2688)}


@pytest.mark.parametrize("release", all_releases(), ids=lambda r: r.label)
def test_trained_sizes(release):
    sizes = set(release.trained_sizes)
    assert all(h % 16 == 0 and w % 16 == 0 for h, w in sizes)  # whole patches (any latent can make them)
    assert release.min_size == (min(h for h, _ in sizes), min(w for _, w in sizes))
    assert release.max_size == (max(h for h, _ in sizes), max(w for _, w in sizes))
    if release.variant == "2k":
        assert release.opt_size == (2048, 2048)
        assert sizes == FIVE_2K  # SigLIP's too: 1728 px is 13.5 of its 128-px latent cells, aligned by the network
        assert (release.min_size, release.max_size) == ((1536, 1536), (2688, 2688))
    else:
        assert release.opt_size == (3840, 3840)
        assert FIVE_2K | {(3840, 3840), (4096, 3072), (3072, 4096)} <= sizes
        assert (release.min_size, release.max_size) == ((1536, 1536), (4096, 4096))
    assert release.opt_size in sizes


@pytest.mark.parametrize("alias, backbone", [
    ("zimage", "flux"), ("zimage-turbo", "flux"), ("ZImage-Turbo", "flux"),
    ("flux2-klein-4b", "flux2"), ("FLUX2-Klein-9B", "flux2"), (" SD3 ", "sd3"),
])
def test_aliases_and_case_resolve(alias, backbone):
    assert get_release(alias, "2k") is get_release(backbone, "2k")
    assert get_release(alias, "2K").backbone == backbone


def test_names_for_help():
    assert variant_names() == ("2k", "2kto4k", "2kto4k-v1.5")
    assert set(backbone_names()) == {"flux", "flux2", "sd3", "dinov2", "siglip", "sdxl", "qwenimage",
                                     "zimage", "zimage-turbo", "flux2-klein-4b", "flux2-klein-9b"}


VALID_PAIRS_TEXT = ("flux: 2k, 2kto4k, 2kto4k-v1.5; flux2: 2k, 2kto4k, 2kto4k-v1.5; sd3: 2k, 2kto4k; "
                    "dinov2: 2k; siglip: 2k; sdxl: 2kto4k; qwenimage: 2kto4k-v1.5")


@pytest.mark.parametrize("backbone, variant, names", [
    ("sd3", "2kto4k-v1.5", "backbone 'sd3' variant '2kto4k-v1.5'"),
    ("siglip", "2kto4k", "backbone 'siglip' variant '2kto4k'"),
    ("zimage", "4k", "backbone 'zimage' (alias of 'flux') variant '4k'"),
    ("sd35", "2k", "backbone 'sd35'"),
])
def test_unreleased_pair_lists_the_valid_pairs(backbone, variant, names):
    with pytest.raises(UnknownReleaseError) as err:
        get_release(backbone, variant)
    message = str(err.value)
    assert names in message
    assert VALID_PAIRS_TEXT in message
    assert "zimage -> flux" in message and "flux2-klein-9b -> flux2" in message
    assert isinstance(err.value, ValueError)


def test_unknown_directory_name():
    with pytest.raises(UnknownReleaseError, match="PiD_res2k_sr4x_official_flux_distill_4step"):
        release_by_name("PiD_res4k_sr4x_official_flux_distill_4step")


def test_reverse_lookup_by_lq_layout():
    labels = lambda rs: {r.label for r in rs}  # noqa: E731
    assert labels(releases_with_lq_layout(16, 512, False)) == {"flux/2k", "flux/2kto4k", "sd3/2k", "sd3/2kto4k"}
    assert labels(releases_with_lq_layout(16, 1024, True)) == {"flux/2kto4k-v1.5", "qwenimage/2kto4k-v1.5"}
    # v1.5 Flux2 unpatchifies its 128-channel latent: its first conv sees 32 channels.
    assert labels(releases_with_lq_layout(32)) == {"flux2/2kto4k-v1.5"}
    assert labels(releases_with_lq_layout(128)) == {"flux2/2k", "flux2/2kto4k"}
    assert labels(releases_with_lq_layout(4)) == {"sdxl/2kto4k"}
    assert releases_with_lq_layout(16, 32) == ()


@pytest.mark.parametrize("gate_type, out_features", [("sigma_aware_per_token", 1),
                                                     ("sigma_aware_per_token_per_dim", 64)])
def test_pit_gate_follows_the_configured_gate_type(gate_type, out_features):
    """The reference builds the PiT gate with `lq_gate_type` (released v1.5: per token); not hard-coded."""
    cfg = PidConfig.from_dict(dict(hidden_size=64, num_groups=4, patch_depth=2, pixel_attn_hidden_size=48,
                                   pixel_num_groups=4, pixel_hidden_size=8, txt_embed_dim=40, txt_max_length=12,
                                   lq_hidden_dim=32, lq_num_res_blocks=1, pit_lq_inject=True,
                                   lq_gate_type=gate_type))
    with torch.device("meta"):
        net = PidNet(cfg)
    assert net.pit_lq_gate.content_proj.weight.shape == (out_features, 128)
    assert net.lq_proj.gate_modules[0].content_proj.weight.shape == (out_features, 128)
