"""pid-serve end to end: the real CLI in a subprocess (local Ray, 2 CPU replicas x 1 thread) on a
tiny golden export through ONNX Runtime, on 127.0.0.1, with a bearer token.

Bounded: every request has a timeout, every load is a fixed count, and the service is
stopped with SIGTERM (then SIGKILL of its process group) by the fixture's finalizer.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import io
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from safetensors.numpy import save

from exports import export_cases, export_root  # noqa: F401 (fixture)
from pid_runtime.serve import Client, ServeError

CASE = "tiny_v1_16ch_sr4"  # 16-ch latents at 1/8, x4: an h x w latent -> 32h x 32w px; captions [1, L, 40]
TOKEN = "s3cret-test-token"
BODY_LIMIT_MB = 0.05  # 52428 bytes: a tiny latent is ~300 bytes
START_TIMEOUT_S = 240


def _script(name: str, module: str) -> list[str]:
    script = Path(sys.executable).parent / name
    return [str(script)] if script.exists() else [sys.executable, "-m", module]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Service:
    def __init__(self, proc: subprocess.Popen, url: str, line: str):
        self.proc, self.url, self.line = proc, url, line

    def tree(self) -> list[psutil.Process]:
        root = psutil.Process(self.proc.pid)
        return [root] + root.children(recursive=True)

    def replicas(self) -> list[psutil.Process]:
        found = []
        for process in self.tree():
            try:
                if "ServeReplica" in " ".join(process.cmdline()) or "ServeReplica" in process.name():
                    found.append(process)
            except psutil.Error:
                pass
        return found


@pytest.fixture(scope="module")
def service(export_root, tmp_path_factory):  # noqa: F811
    export = export_cases([CASE])[CASE]
    work = tmp_path_factory.mktemp("serve")
    token_file = work / "token"
    token_file.write_text(TOKEN + "\n")
    port = _free_port()
    proc = subprocess.Popen(_script("pid-serve", "pid_runtime.serve.cli") + [
        str(export), "--port", str(port), "--replicas", "2", "--threads", "1", "--max-batch", "4",
        "--batch-wait-ms", "30", "--max-queued", "3", "--body-limit-mb", str(BODY_LIMIT_MB),
        "--token-file", str(token_file)], stdout=subprocess.PIPE, stderr=open(work / "stderr", "w"),
        text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        line = ""
        while time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
            if "serving" in line:
                break
        assert "serving" in line, f"pid-serve did not start: {(work / 'stderr').read_text()[-2000:]}"
        yield Service(proc, f"http://127.0.0.1:{port}", line)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def _inputs(shape: tuple[int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    gen = np.random.default_rng(seed)
    return (gen.standard_normal((1, 16, *shape)).astype(np.float32),
            gen.standard_normal((1, 5, 40)).astype(np.float32))


def _pid_run(export: Path, latents: np.ndarray, caption: np.ndarray, seed: int, work: Path) -> np.ndarray:
    np.save(work / "L.npy", latents)
    np.save(work / "C.npy", caption)
    subprocess.run(_script("pid-run", "pid_runtime.cli") + [str(export), str(work / "L.npy"), "--seed", str(seed),
                   "--caption-embeds", str(work / "C.npy"), "--out", str(work / "O.npy")],
                   check=True, capture_output=True, timeout=120)
    return np.load(work / "O.npy")


def _raw(service: Service, body: bytes, query: str = "seed=1", headers: dict | None = None,
         path: str = "/v1/decode") -> tuple[int, dict, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", int(service.url.rsplit(":", 1)[1]), timeout=60)
    try:
        all_headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/octet-stream"}
        all_headers.update(headers or {})
        connection.request("POST", f"{path}?{query}", body=body, headers=all_headers)
        reply = connection.getresponse()
        return reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read()
    finally:
        connection.close()


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is IPv4 loopback
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def test_host_beyond_loopback_needs_a_token(export_root, tmp_path):  # noqa: F811
    export = export_cases([CASE])[CASE]
    proc = subprocess.run(_script("pid-serve", "pid_runtime.serve.cli") + [str(export), "--host", "0.0.0.0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--token-file" in proc.stderr


def test_write_config_gives_a_valid_serve_config_and_rayservice(export_root, tmp_path):  # noqa: F811
    import yaml
    from ray.serve.schema import ServeDeploySchema

    export = export_cases([CASE])[CASE]
    (tmp_path / "token").write_text(TOKEN)
    proc = subprocess.run(_script("pid-serve", "pid_runtime.serve.cli") + [
        str(export), "--replicas", "2", "--max-replicas", "4", "--token-file", str(tmp_path / "token"),
        "--write-config", str(tmp_path / "deploy")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    config = ServeDeploySchema(**yaml.safe_load((tmp_path / "deploy" / "serve_config.yaml").read_text()))
    app = config.applications[0]
    assert app.import_path == "pid_runtime.serve.app:build_app" and app.args["export"] == str(export.resolve())
    assert config.http_options.host == "127.0.0.1"
    manifest = yaml.safe_load((tmp_path / "deploy" / "rayservice.yaml").read_text())
    assert manifest["kind"] == "RayService"
    inner = ServeDeploySchema(**yaml.safe_load(manifest["spec"]["serveConfigV2"]))
    assert inner.applications[0].args["token_file"] == str((tmp_path / "token").resolve())


def test_prints_url_and_listens_on_loopback_only(service):
    assert service.line.strip().endswith(")") and service.url in service.line
    listening = []
    for process in service.tree():
        try:
            listening += [(process.name(), c.laddr) for c in process.net_connections(kind="inet")
                          if c.status == psutil.CONN_LISTEN]
        except psutil.Error:
            pass
    assert listening, "found no listening sockets of the service"
    beyond = [(name, addr) for name, addr in listening if not _loopback(addr.ip)]
    assert not beyond, f"listening beyond loopback: {beyond}"


def test_served_images_equal_pid_run_alone_and_in_mixed_batches(service, tmp_path):
    export = export_cases([CASE])[CASE]
    client = Client(service.url, token=TOKEN, retries=3)
    cases = [((2, 2), 11), ((2, 3), 12), ((1, 2), 13), ((2, 2), 14), ((2, 3), 15), ((2, 2), 16)]
    expected = [_pid_run(export, *_inputs(shape, seed), seed, tmp_path) for shape, seed in cases]
    for (shape, seed), want in list(zip(cases, expected))[:2]:  # alone
        got = client.decode(*_inputs(shape, seed)[:1], seed=seed, caption=_inputs(shape, seed)[1])
        assert got.dtype == np.float32 and np.array_equal(got, want)
    batches = []

    def one(index: int) -> np.ndarray:
        (shape, seed) = cases[index % len(cases)]
        latents, caption = _inputs(shape, seed)
        for _ in range(10):  # the service sheds beyond 3 waiting per replica: retry those (bounded)
            status, headers, body = _raw(service, save({"latents": latents, "caption": caption}),
                                         f"seed={seed}&output=npy")
            if status != 503:
                break
            time.sleep(int(headers["retry-after"]))
        assert status == 200, body
        batches.append(int(headers["x-pid-batch"]))
        return np.load(io.BytesIO(body))

    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        results = list(pool.map(one, range(12)))
    for index, got in enumerate(results):
        assert np.array_equal(got, expected[index % len(cases)]), f"request {index} differs from pid-run"
    assert max(batches) > 1, f"no request shared a batch: {batches}"
    png_status, png_headers, png = _raw(service, np.save(buffer := io.BytesIO(), _inputs((2, 2), 1)[0]) or
                                        buffer.getvalue(), "seed=1&output=png")
    assert png_status in (200, 422)  # no unconditional caption in the golden export: 422 says so


def _error(status: int, body: bytes) -> str:
    assert body.count(b"\n") == 1 and body.endswith(b"\n"), body
    payload = json.loads(body)
    assert payload["status"] == status and "Traceback" not in payload["error"]
    return payload["error"]


def test_every_error_status_has_one_json_line(service):
    latents, caption = _inputs((2, 2), 1)
    good = save({"latents": latents, "caption": caption})
    cases = [
        (400, b"definitely not an array", "seed=1", {}, "not a .npy"),
        (415, good, "seed=1", {"Content-Type": "application/json"}, "Content-Type"),
        (422, good, "sigma=0.1", {}, "seed is required"),
        (422, save({"latents": latents[:, :15], "caption": caption}), "seed=1", {}, "15 channels"),
        (422, good, "seed=1&size=50x64", {}, "multiple of 16"),
        (422, np.save(b := io.BytesIO(), latents) or b.getvalue(), "seed=1", {}, "caption"),
        (401, good, "seed=1", {"Authorization": "Bearer wrong"}, "token"),
        (401, good, "seed=1", {"Authorization": ""}, "token"),
        (413, b"\x93NUMPY" + b"0" * 60000, "seed=1", {}, "limit"),
    ]
    for status, body, query, headers, words in cases:
        got, reply_headers, reply = _raw(service, body, query, headers)
        assert got == status, (status, reply)
        assert words in _error(status, reply), (status, reply)
        if status == 401:
            assert reply_headers.get("www-authenticate") == "Bearer"


def test_body_cap_holds_for_a_streamed_body_without_length(service):
    connection = http.client.HTTPConnection("127.0.0.1", int(service.url.rsplit(":", 1)[1]), timeout=60)
    chunks = (b"\x93NUMPY" + b"0" * 8192 for _ in range(20))  # 160 KiB, chunked: no Content-Length
    connection.request("POST", "/v1/decode?seed=1", body=chunks, encode_chunked=True,
                       headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/octet-stream"})
    reply = connection.getresponse()
    assert reply.status == 413 and "limit" in _error(413, reply.read())
    connection.close()


def test_overload_is_shed_with_503_and_retry_after(service):
    latents, caption = _inputs((4, 4), 2)  # 128x128 px: slow enough to pile up
    body = save({"latents": latents, "caption": caption})
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        replies = list(pool.map(lambda i: _raw(service, body, f"seed={i}&output=npy"), range(24)))
    statuses = [status for status, _, _ in replies]
    assert set(statuses) <= {200, 503}, statuses
    shed = [(headers, body) for status, headers, body in replies if status == 503]
    assert shed and statuses.count(200) >= 2, statuses
    for headers, reply in shed:
        assert int(headers["retry-after"]) >= 1
        if reply.startswith(b"{"):  # the app's own answer (Ray's queue in front may shed too)
            assert "busy" in _error(503, reply)


def test_info_and_health(service):
    with pytest.raises(ServeError) as refused:
        Client(service.url).info()
    assert refused.value.status == 401 and "token" in refused.value.message
    info = Client(service.url, token=TOKEN).info()
    assert info["backend"] == "onnxruntime" and info["device"] == "cpu" and info["max_batch"] == 4
    import urllib.request

    with urllib.request.urlopen(f"{service.url}/healthz", timeout=10) as reply:
        assert reply.status == 200


@pytest.mark.heavy  # waits for Ray to restart the replica (~30-60 s here)
def test_killed_replica_loses_no_request_with_client_retries(service):
    before = {p.pid for p in service.replicas()}
    assert len(before) == 2, before
    client = Client(service.url, token=TOKEN, retries=12, backoff_s=0.5, timeout_s=60)
    inputs = [_inputs((2, 2), 100 + i) for i in range(20)]
    reference = client.decode(inputs[0][0], seed=100, caption=inputs[0][1])
    killed = []

    def one(index: int) -> np.ndarray:
        if index == 6:
            victim = sorted(before)[0]
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)
        latents, caption = inputs[index]
        return client.decode(latents, seed=100 + index, caption=caption)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(20)))
    assert killed and len(results) == 20 and all(r.shape == (1, 3, 64, 64) for r in results)
    assert np.array_equal(results[0], reference)  # a retried decode gives the same image
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        now = {p.pid for p in service.replicas()}
        if len(now) == 2 and killed[0] not in now:
            break
        time.sleep(2)
    assert len(now) == 2 and killed[0] not in now, f"replica not restarted: {now}"
