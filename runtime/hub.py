"""Is the Hugging Face hub reachable? One quick probe per process.

Without it, an offline machine (HF_HUB_OFFLINE unset) spends 25-50 s in huggingface_hub's
retries ("Retrying in 8s [Retry 5/5]", a dozen lines) before the real message. The probe is
one HEAD request with a short timeout; any HTTP answer, even an error status, means the hub
is there. Only the standard library is used, so importing this never needs the network stack
of huggingface_hub.
"""

from __future__ import annotations

import functools
import os
import socket
import urllib.error
import urllib.request

PROBE_TIMEOUT_S = 3.0
OFFLINE_HINT = "HF_HUB_OFFLINE=1"  # how a user says "do not try the hub" (huggingface_hub's own switch)
DEFAULT_ENDPOINT = "https://huggingface.co"


def hub_endpoint() -> str:
    """The endpoint huggingface_hub talks to ($HF_ENDPOINT, else huggingface.co)."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hub_unreachable() -> str | None:
    """None when the hub answers; else why not, in a few words (probed once per endpoint)."""
    return _probe(hub_endpoint())


@functools.lru_cache(maxsize=None)
def _probe(endpoint: str) -> str | None:
    request = urllib.request.Request(endpoint + "/api/models", method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_S):
            return None
    except urllib.error.HTTPError:  # an answer (404, 401, 5xx): the hub is reachable
        return None
    except (urllib.error.URLError, socket.timeout, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        text = "no answer within {:g} s".format(PROBE_TIMEOUT_S) if isinstance(reason, (socket.timeout, TimeoutError)) \
            else str(reason).strip() or type(reason).__name__
        return f"the Hugging Face hub ({endpoint}) is unreachable: {text}"


def in_hub_cache(repo_id: str) -> bool:
    """Whether a hub model or pipeline repo is in the local Hugging Face cache (its config or model index)."""
    from huggingface_hub import try_to_load_from_cache

    for name in ("config.json", "model_index.json"):
        try:
            if isinstance(try_to_load_from_cache(repo_id, name), str):
                return True
        except Exception:  # not a repo id the cache can hold
            return False
    return False


def why_model_unavailable(model: str, what: str, local_copy: str = "a local directory") -> str | None:
    """One line when `model` (a hub id; a local path always passes) can be neither read from the cache
    nor downloaded now; None when it may load."""
    if os.path.exists(os.path.expanduser(model)) or in_hub_cache(model):
        return None
    offline = (os.environ.get("HF_HUB_OFFLINE") or "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    reason = "HF_HUB_OFFLINE is set" if offline else hub_unreachable()
    if reason is None:
        return None
    return (f"{what} '{model}' is not in the Hugging Face cache and {reason}: download it where the hub is "
            f"reachable (`hf download {model}`) or pass {local_copy}")
