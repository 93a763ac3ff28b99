"""`Client`: a small HTTP client of pid-serve that retries what a retry can fix.

Decodes are seeded, so a request sent twice gives the same image: a decode that failed
on the server's side (connection refused or reset, a replica that died mid-request: 500,
502, 504) or was shed (503, whose Retry-After it honours) is sent again after a backoff
(exponential, with jitter), up to `retries` times. A refused request (400, 401, 413, 415,
422) is not retried: `ServeError` carries its status and the server's one-line reason.
"""

from __future__ import annotations

import io
import json
import random
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

import numpy as np

RETRIED_STATUSES = (500, 502, 503, 504)


class ServeError(RuntimeError):
    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message = status, message


def _message(body: bytes) -> str:
    """The server's one-line reason (its JSON "error"), else the start of whatever came back."""
    text = body.decode(errors="replace")
    try:
        return str(json.loads(text)["error"])
    except (ValueError, KeyError, TypeError):
        return " ".join(text.split())[:300]


@dataclass
class Client:
    url: str = "http://127.0.0.1:8000"
    token: str | None = None
    retries: int = 8
    backoff_s: float = 0.25  # first wait; doubles each retry, capped at max_backoff_s
    max_backoff_s: float = 5.0
    timeout_s: float = 120.0
    attempts: int = 0  # requests sent, retries included (for callers and tests)

    def _headers(self, content_type: str | None = None) -> dict[str, str]:
        headers = {} if content_type is None else {"Content-Type": content_type}
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def info(self) -> dict:
        request = urllib.request.Request(f"{self.url}/v1/info", headers=self._headers())
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as reply:
                return json.loads(reply.read())
        except urllib.error.HTTPError as exc:
            raise ServeError(exc.code, _message(exc.read())) from None

    def decode(self, latents: np.ndarray, seed: int, caption: np.ndarray | None = None, sigma: float = 0.0,
               size: tuple[int, int] | None = None, steps: int = 4, output: str = "npy") -> np.ndarray | bytes:
        """The image: float32 [1,3,H,W] in [-1,1] for output="npy", the PNG's bytes for "png"."""
        from safetensors.numpy import save

        arrays = {"latents": np.ascontiguousarray(latents, dtype=np.float32)}
        if caption is not None:
            arrays["caption"] = np.ascontiguousarray(caption, dtype=np.float32)
        params: dict[str, str] = {"seed": str(seed), "sigma": repr(float(sigma)), "steps": str(steps), "output": output}
        if size is not None:
            params["size"] = f"{size[0]}x{size[1]}"
        body = self.post(params, save(arrays))
        return np.load(io.BytesIO(body), allow_pickle=False) if output == "npy" else body

    def post(self, params: dict[str, str], body: bytes, content_type: str = "application/octet-stream") -> bytes:
        """POST /v1/decode with retries (see the module docstring); the answer's bytes."""
        url = f"{self.url}/v1/decode?{urllib.parse.urlencode(params)}"
        wait = self.backoff_s
        for attempt in range(self.retries + 1):
            self.attempts += 1
            request = urllib.request.Request(url, data=body, method="POST", headers=self._headers(content_type))
            retry_after: float | None = None
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as reply:
                    return reply.read()
            except urllib.error.HTTPError as exc:
                message = _message(exc.read())
                if exc.code not in RETRIED_STATUSES or attempt == self.retries:
                    raise ServeError(exc.code, message) from None
                header = exc.headers.get("Retry-After")
                retry_after = float(header) if header and header.isdigit() else None
            except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
                if attempt == self.retries:
                    raise ServeError(0, f"no answer from {self.url}: {exc}") from None
            time.sleep(max(retry_after or 0.0, wait * random.uniform(0.5, 1.0)))
            wait = min(wait * 2, self.max_backoff_s)
        raise AssertionError("unreachable")
