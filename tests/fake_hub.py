"""A local stand-in for the Hugging Face hub's HTTP API: one model repository served from a directory.

huggingface_hub talks to `HF_ENDPOINT`; pointing that at this server lets tests run the
real download code (model_info, hf_hub_download, snapshot_download) with no network.
Implemented: `GET /api/models/<repo>[/revision/<rev>]` (model info with file sizes),
`GET /api/models/<repo>/tree/<rev>` (the file list) and
`HEAD`/`GET /<repo>/resolve/<rev>/<file>` (file metadata / content). `fail_files` makes
those files answer 500, like a download that breaks; `requests` records every path asked for.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self, repo_id: str, directory: Path, fail_files: tuple[str, ...] = ()):
        self.repo_id = repo_id
        self.directory = Path(directory)
        self.fail_files = set(fail_files)
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_HEAD(self) -> None:
                hub._answer(self, with_body=False)

            def do_GET(self) -> None:
                hub._answer(self, with_body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _files(self) -> list[Path]:
        return sorted(p for p in self.directory.rglob("*") if p.is_file())

    def _answer(self, handler: BaseHTTPRequestHandler, with_body: bool) -> None:
        path = unquote(urlparse(handler.path).path)
        self.requests.append(path)
        info_prefix = f"/api/models/{self.repo_id}"
        resolve_prefix = f"/{self.repo_id}/resolve/"
        if path.startswith(info_prefix + "/tree/"):  # snapshot_download lists the files
            listing = [{"type": "file", "path": str(p.relative_to(self.directory)), "size": p.stat().st_size,
                        "oid": hashlib.sha1(p.read_bytes()).hexdigest()} for p in self._files()]
            self._send(handler, 200, json.dumps(listing).encode(), {"Content-Type": "application/json"}, with_body)
            return
        if path == info_prefix or path.startswith(info_prefix + "/revision/"):
            siblings = [{"rfilename": str(p.relative_to(self.directory)), "size": p.stat().st_size}
                        for p in self._files()]
            body = json.dumps({"id": self.repo_id, "modelId": self.repo_id, "sha": COMMIT,
                               "siblings": siblings, "private": False}).encode()
            self._send(handler, 200, body, {"Content-Type": "application/json"}, with_body)
            return
        if path.startswith(resolve_prefix):
            name = path[len(resolve_prefix):].split("/", 1)[-1]
            target = self.directory / name
            if name in self.fail_files:
                self._send(handler, 500, b"internal error", {}, with_body)
                return
            if not target.is_file():
                self._send(handler, 404, b"not found", {"X-Error-Code": "EntryNotFound"}, with_body)
                return
            data = target.read_bytes()
            headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                       "Content-Type": "application/octet-stream"}
            self._send(handler, 200, data, headers, with_body)
            return
        self._send(handler, 404, b"not found", {"X-Error-Code": "RepoNotFound"}, with_body)

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict, with_body: bool) -> None:
        handler.send_response(status)
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if with_body:
            handler.wfile.write(body)
