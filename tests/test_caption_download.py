"""pid-export fetches the caption encoder it needs for the unconditional caption (issue: pid-run works as typed).

A tiny Gemma-2 is served by a local fake hub (tests/fake_hub.py) through HF_ENDPOINT, so
huggingface_hub's real download code runs into a fresh cache (HF_HOME) with no network.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import golden_case

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from fake_hub import FakeHub  # noqa: E402
from tiny_gemma import direct_embeddings, save_tiny_gemma  # noqa: E402

CASE = "tiny_v1_16ch_sr4_b2"  # text dim 40 = the tiny Gemma's width
REPO_ID = "pid-tests/tiny-gemma2"


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hub_repo")
    tokenizer, model = save_tiny_gemma(directory)
    return directory, direct_embeddings(tokenizer, model, [""])[0]


def pid_export(tmp_path, hub: FakeHub | None, *extra: str, offline: bool = False):
    network = tmp_path / "net.json"
    network.write_text(json.dumps(golden_case(CASE)["network"]))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PID_CAPTION"))}
    env["HF_HOME"] = str(tmp_path / "hf-home")
    env["HF_HUB_DISABLE_TELEMETRY"] = "1"
    if hub is not None:
        env["HF_ENDPOINT"] = hub.endpoint
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    out = tmp_path / "export"
    args = [sys.executable, "-m", "pid_export.cli", "--network-config", str(network),
            "--checkpoint", str(golden_case(CASE)["pth"]), "--precision", "fp32", "--static", "64x96",
            "--caption-model", REPO_ID, "--out", str(out), *extra]
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=900), out


@pytest.mark.heavy
def test_export_downloads_the_caption_model_and_stores_the_empty_caption(tiny_gemma, tmp_path):
    repo, expected = tiny_gemma
    with FakeHub(REPO_ID, repo) as hub:
        proc, out = pid_export(tmp_path, hub, "--onnx-only")
    assert proc.returncode == 0, proc.stderr
    announce = [line for line in proc.stdout.splitlines() if "downloading the caption encoder" in line]
    total = sum(p.stat().st_size for p in repo.iterdir() if p.suffix in (".json", ".safetensors"))
    assert len(announce) == 1 and REPO_ID in announce[0]
    assert f"{total / 1e6:.1f} MB" in announce[0]  # the size is said before the download
    assert any(r.endswith("model.safetensors") for r in hub.requests)
    stored = torch.from_numpy(np.load(out / "empty_caption.npy"))
    assert stored.shape == (1, 300, 40)
    torch.testing.assert_close(stored[0], expected, rtol=1e-5, atol=1e-6)


def test_offline_export_does_not_try_the_hub(tiny_gemma, tmp_path, monkeypatch):
    """The export's caption step (caption_export.store_empty_caption, as run_export calls it) with HF_HUB_OFFLINE=1."""
    from pid_export import PidConfig
    from pid_export.caption_export import store_empty_caption
    from pid_export.stages import Stages

    repo, _ = tiny_gemma
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lines: list[str] = []
    with FakeHub(REPO_ID, repo) as hub:
        monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", hub.endpoint)
        stored = store_empty_caption(tmp_path, REPO_ID, notify=Stages(lines.append).detail, download=True,
                                     txt_embed_dim=PidConfig.from_dict(golden_case(CASE)["network"]).txt_embed_dim)
    assert stored is None and not [r for r in hub.requests if REPO_ID in r]  # nothing asked of the repo
    assert list(tmp_path.iterdir()) == []
    assert len(lines) == 1 and "HF_HUB_OFFLINE is set" in lines[0] and "--caption-embeds" in lines[0]


@pytest.mark.heavy
def test_failed_download_leaves_a_complete_export_and_one_line(tiny_gemma, tmp_path):
    repo, _ = tiny_gemma
    with FakeHub(REPO_ID, repo, fail_files=("model.safetensors",)) as hub:
        proc, out = pid_export(tmp_path, hub)
    assert proc.returncode == 0, proc.stderr
    assert any(r.endswith("model.safetensors") for r in hub.requests)
    lines = [line for line in proc.stdout.splitlines() if "no unconditional caption stored" in line]
    assert len(lines) == 1
    assert "could not download the caption encoder" in lines[0] and "--caption-embeds" in lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert (out / "model.onnx").is_file() and (out / "pid_export.json").is_file()
    assert not (out / "empty_caption.npy").exists()
    assert "export ready" in proc.stdout
    if importlib.util.find_spec("tensorrt_rtx") is not None:  # the engine is built all the same
        assert (out / "engine.plan").stat().st_size > 0 and (out / "engine.json").is_file()
