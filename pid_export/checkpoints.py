"""Find, load and verify PiD checkpoints.

- `resolve_checkpoint`: an explicit local path, else the release's file from the
  `nvidia/PiD` hub repo via huggingface_hub (its normal cache; HF_HUB_OFFLINE honoured).
- `load_checkpoint`: `.pth`/`.pt` (torch, `weights_only=True`, memory-mapped) or
  `.safetensors`, returned keyed like `PidNet.state_dict()`.
- `verify_checkpoint`: keys and shapes against the network of the requested release,
  with an error that says which release the file does fit.

Every failure is a `CheckpointError` with one readable sentence; errors raised inside
torch / safetensors / huggingface_hub are caught and rephrased.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import re
import struct
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from pid_runtime.errors import first_line

from .config import PidConfig
from .network import PidNet
from .releases import CHECKPOINT_FILENAME, Release, labels_text, releases_with_lq_layout

# Parameters of the training-time model that are not part of the inference network.
TRAINING_ONLY_PREFIXES = ("net_ema.", "fake_score.", "discriminator.")
UNUSED_AT_INFERENCE_PREFIXES = ("lq_proj.lq_aux_rgb_head.",)
NETWORK_PREFIX = "net."
# Wrapper keys under which training scripts nest the state dict.
WRAPPER_KEYS = ("state_dict", "net", "model")
# Every PiD network has these; a tensor dict without them is some other model.
_PID_MARKER_PREFIXES = ("patch_blocks.", "lq_proj.latent_proj.")
_LQ_CONV_KEY = "lq_proj.latent_proj.0.weight"
_ZIP_MAGIC = b"PK\x03\x04"


class CheckpointError(ValueError):
    """A checkpoint that cannot be found, read, or used for the requested release."""


# ---------------------------------------------------------------------------
# Locating


def resolve_checkpoint(release: Release | None, checkpoint: str | os.PathLike[str] | None = None) -> Path:
    """Path of the checkpoint to load: `checkpoint` if given, else the hub file of `release`.

    A directory is accepted if it holds `model_ema_bf16.pth` or is a local copy of the hub
    repo (`checkpoints/<name>/model_ema_bf16.pth`).
    """
    if checkpoint is not None:
        return _local_checkpoint(Path(checkpoint).expanduser(), release)
    if release is None:
        raise CheckpointError("no checkpoint given: pass --checkpoint PATH or choose a release")
    return _download(release)


def _local_checkpoint(path: Path, release: Release | None) -> Path:
    if path.is_dir():
        candidates = [path / CHECKPOINT_FILENAME]
        if release is not None:
            candidates.insert(0, path / release.checkpoint_file)
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        raise CheckpointError(f"checkpoint directory {path} holds no {CHECKPOINT_FILENAME}"
                              + (f" (looked for {release.checkpoint_file})" if release else ""))
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    return path


def why_checkpoint_unavailable(release: Release) -> str | None:
    """Checked before any slow work: one line saying why the release's hub file cannot be had, or None.

    None when the file is in the Hugging Face cache or the hub answers one quick probe; so an
    offline machine is told in seconds instead of after huggingface_hub's retries (~25 s).
    """
    from huggingface_hub import constants, try_to_load_from_cache

    from pid_runtime.hub import OFFLINE_HINT, hub_unreachable

    try:
        if isinstance(try_to_load_from_cache(release.hub_repo, release.checkpoint_file), str):
            return None
    except Exception:  # a broken cache is no cache
        pass
    reason = "offline mode (HF_HUB_OFFLINE) is on" if constants.HF_HUB_OFFLINE else hub_unreachable()
    if reason is None:
        return None
    where = f"{release.hub_repo}/{release.checkpoint_file}"
    skip = "" if constants.HF_HUB_OFFLINE else f"; {OFFLINE_HINT} makes pid-export skip the hub without trying"
    return (f"cannot get the {release.label} checkpoint ({where}): it is not in the Hugging Face cache and "
            f"{reason}: download it by other means and pass --checkpoint PATH{skip}")


def _download(release: Release) -> Path:
    # Imported here so that loading a local file never needs huggingface_hub.
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    where = f"{release.hub_repo}/{release.checkpoint_file}"
    advice = "download it by other means and pass --checkpoint PATH"
    unavailable = why_checkpoint_unavailable(release)
    if unavailable is not None:
        raise CheckpointError(unavailable)
    try:
        return Path(hf_hub_download(repo_id=release.hub_repo, filename=release.checkpoint_file))
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            reason = "offline mode (HF_HUB_OFFLINE) is on and the file is not in the Hugging Face cache"
        else:
            reason = "the Hugging Face hub is unreachable and the file is not in the local cache"
    except Exception as exc:  # hub HTTP errors, gated repo, disk full, bad token, ...
        reason = _first_line(exc)
    raise CheckpointError(f"cannot get the {release.label} checkpoint ({where}): {reason}; {advice}")


def file_sha256(path: str | os.PathLike[str], chunk_bytes: int = 8 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (checkpoints are ~2.7 GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------
# Loading


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Load a PiD checkpoint, keyed like `PidNet.state_dict()` (no `net.` prefix, no aux head).

    Tensors keep the file's dtype; `.pth` tensors are memory-mapped from the file, so
    `net.load_state_dict(sd, assign=True)` on a meta-device net costs no extra copy.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint file {path} is empty")
    raw = _read_safetensors(path) if _looks_like_safetensors(path) else _read_torch(path)
    return _network_state_dict(raw, path)


def _looks_like_safetensors(path: Path) -> bool:
    """safetensors files start with a little-endian u64 header size, then a JSON object."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head.startswith(_ZIP_MAGIC):
        return False  # a torch file, whatever its name
    if len(head) < 9 or head[8:9] != b"{":
        return path.suffix == ".safetensors"  # let the safetensors reader explain what is wrong
    (header_size,) = struct.unpack("<Q", head[:8])
    return header_size <= path.stat().st_size - 8


def _read_safetensors(path: Path) -> Any:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # SafetensorError, OSError, ...
        raise CheckpointError(f"cannot read checkpoint {path}: not a valid safetensors file, "
                              f"it may be truncated or corrupt ({_first_line(exc)})") from None


def _read_torch(path: Path) -> Any:
    with open(path, "rb") as f:
        is_zip = f.read(4) == _ZIP_MAGIC
    try:
        with warnings.catch_warnings():
            # Raised for any foreign pickle just before the error we rephrase below.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            # mmap needs torch's zip format; the legacy format is read into memory.
            return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except MemoryError:
        raise
    except pickle.UnpicklingError as exc:
        forbidden = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if forbidden:
            raise CheckpointError(f"cannot read checkpoint {path}: it contains Python objects other than "
                                  f"tensors ({forbidden.group(1)}), which are never unpickled") from None
        raise CheckpointError(f"cannot read checkpoint {path}: not a PyTorch or safetensors checkpoint "
                              "(its bytes are not a tensor pickle)") from None
    except Exception as exc:  # RuntimeError from the zip reader, EOFError, ...
        kind = "truncated or corrupt" if is_zip else "not a PyTorch or safetensors checkpoint"
        raise CheckpointError(f"cannot read checkpoint {path}: the file is {kind} "
                              f"({_first_line(exc)})") from None


def _network_state_dict(raw: Any, path: Path) -> dict[str, Tensor]:
    """Unwrap, drop training-only entries, strip the `net.` prefix, check it is a PiD net."""
    tensors = _unwrap(raw)
    if tensors is None:
        raise CheckpointError(f"{path} is not a PiD checkpoint: it holds a {type(raw).__name__}, "
                              "not a dictionary of tensors")
    result: dict[str, Tensor] = {}
    for key, value in tensors.items():
        # Non-tensor entries (an epoch counter, a config) are bookkeeping, not weights.
        if not isinstance(key, str) or not isinstance(value, Tensor) or key.startswith(TRAINING_ONLY_PREFIXES):
            continue
        name = key[len(NETWORK_PREFIX):] if key.startswith(NETWORK_PREFIX) else key
        if not name.startswith(UNUSED_AT_INFERENCE_PREFIXES):
            result[name] = value
    if not any(name.startswith(_PID_MARKER_PREFIXES) for name in result):
        sample = ", ".join(list(result)[:3]) or "none"
        raise CheckpointError(f"{path} is not a PiD checkpoint: no PiD network parameters "
                              f"(patch_blocks.*, lq_proj.*) among its {len(result)} tensors (first: {sample})")
    return result


def _unwrap(obj: Any, depth: int = 0) -> Mapping[str, Any] | None:
    """The tensor dict inside `{"state_dict": ...}` / `{"net": ...}` / `{"model": ...}` wrappers."""
    if not isinstance(obj, Mapping):
        return None
    if any(isinstance(v, Tensor) for v in obj.values()) or depth >= 3:
        return obj
    for key in WRAPPER_KEYS:
        inner = _unwrap(obj.get(key), depth + 1)
        if inner is not None:
            return inner
    return obj


# ---------------------------------------------------------------------------
# Verifying


@functools.lru_cache(maxsize=32)
def expected_shapes(network: PidConfig) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of `PidNet(network)`, built on the meta device (no memory)."""
    with torch.device("meta"):
        net = PidNet(network)
    return {name: tuple(t.shape) for name, t in net.state_dict().items()}


def verify_checkpoint(state_dict: Mapping[str, Tensor], network: PidConfig | Release,
                      release_name: str | None = None) -> None:
    """Refuse a state dict whose keys or shapes do not fit `network`.

    `release_name` (e.g. "sd3/2kto4k") only words the error; a `Release` may be passed
    as `network`, which supplies both.
    """
    if isinstance(network, Release):
        release_name = release_name or network.label
        network = network.network
    expected = expected_shapes(network)
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshaped = [(k, tuple(state_dict[k].shape), shape) for k, shape in expected.items()
                 if k in state_dict and tuple(state_dict[k].shape) != shape]
    if not (missing or unexpected or misshaped):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s) ({_few(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) ({_few(unexpected)})")
    if misshaped:
        shown = [f"{k} is {list(got)}, expected {list(want)}" for k, got, want in misshaped]
        problems.append(f"{len(misshaped)} key(s) with other shapes ({_few(shown)})")
    target = f"release {release_name}" if release_name else "the requested network"
    message = f"checkpoint does not fit {target}: {'; '.join(problems)}"
    guess = describe_checkpoint_layout(state_dict)
    if guess:
        message += f"; {guess}"
    raise CheckpointError(message)


def describe_checkpoint_layout(state_dict: Mapping[str, Tensor]) -> str:
    """`it looks like a v1 16-channel checkpoint (flux/2k, ...)`, or "" if it cannot tell."""
    conv = state_dict.get(_LQ_CONV_KEY)
    if conv is None or conv.dim() != 4:
        return ""
    lq_hidden, in_channels = int(conv.shape[0]), int(conv.shape[1])
    v15 = any(k.startswith(("pit_lq_gate.", "lq_proj.pit_head.")) for k in state_dict)
    version = "v1.5" if v15 else "v1"
    fitting = releases_with_lq_layout(in_channels, lq_hidden, v15)
    if fitting:
        unpatchify = fitting[0].network.lq_latent_unpatchify_factor
        channels = fitting[0].latent_channels
        layout = f"{channels}-channel" + (f" (unpatchified to {in_channels})" if unpatchify > 1 else "")
        return f"it looks like a {version} {layout} checkpoint ({labels_text(fitting)})"
    return (f"it looks like a {version} checkpoint with {in_channels} latent channels and LQ hidden size "
            f"{lq_hidden}, which matches no PiD release")


def _few(items: list[str], limit: int = 3) -> str:
    more = len(items) - limit
    return ", ".join(items[:limit]) + (f", ... {more} more" if more > 0 else "")


def _first_line(exc: BaseException, limit: int = 160) -> str:
    """The first sentence of a library's error message (they can run to many lines)."""
    return first_line(exc, limit).split(". ")[0].rstrip(".")
