"""The export's load step: checkpoint (path or the release's hub file) -> verified float32 PidNet."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .config import PidConfig
from .network import PidNet
from .releases import Release
from .stages import PipelineError, Stages, silent_stages


@dataclass
class LoadedNetwork:
    net: PidNet  # float32, CPU, eval mode
    checkpoint: Path | None
    sha256: str | None


def load_network(network: PidConfig, release: Release | None = None, checkpoint: Path | str | None = None,
                 stages: Stages | None = None) -> LoadedNetwork:
    """Find (local path, else the release's hub file), load and verify a checkpoint; build the network."""
    from .checkpoints import CheckpointError, file_sha256, load_checkpoint, resolve_checkpoint, verify_checkpoint

    stages = stages or silent_stages()
    try:
        with stages("locating the checkpoint"):
            path = resolve_checkpoint(release, checkpoint)
            stages.detail(f"{path} ({path.stat().st_size / 1e9:.2f} GB)")
        with stages("loading and verifying the checkpoint"):
            state = load_checkpoint(path)
            sha = file_sha256(path)
            verify_checkpoint(state, network, release.label if release is not None else None)
            count = sum(t.numel() for t in state.values())
            stages.detail(f"{len(state)} tensors, {count / 1e9:.3f} B parameters, sha256 {sha[:16]}...")
    except CheckpointError as exc:
        raise PipelineError(str(exc)) from None
    with stages("building the network"):
        with torch.device("meta"):
            net = PidNet(network)
        # Float32 on the CPU, like the reference's weights under autocast; the export step
        # applies the export precision.
        net.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
        del state
    return LoadedNetwork(net.eval(), path, sha)


def reload_float32(loaded: LoadedNetwork, network: PidConfig) -> LoadedNetwork:
    """The same checkpoint as a fresh float32 network (the exported one was cast in place)."""
    from .checkpoints import load_checkpoint

    if loaded.checkpoint is None:
        raise PipelineError("the float32 reference needs the checkpoint file the network came from")
    with torch.device("meta"):
        net = PidNet(network)
    net.load_state_dict({k: v.float() for k, v in load_checkpoint(loaded.checkpoint).items()},
                        strict=True, assign=True)
    return LoadedNetwork(net.eval(), loaded.checkpoint, loaded.sha256)
