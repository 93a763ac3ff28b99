"""Serving throughput against direct decoding on the same cores, in the same run.

    python -m benchmarks.serving EXPORT [--requests 48] [--concurrency 8] [--replicas 2] [--threads 1]

1. Direct (before and after 2.): `--replicas` worker processes, each a PidDecoder with `--threads` ONNX Runtime
   threads, decode the same requests (`decode_many`, batches of `--max-batch`), timed
   from the first to the last image: the throughput the cores give without a server.
2. Served: `pid-serve EXPORT --replicas R --threads T` on 127.0.0.1, then a bounded load
   (exactly `--requests` POSTs, `--concurrency` at a time, each with a timeout) from a
   thread pool; throughput, latency percentiles, errors and the batch sizes the server
   reports (X-PiD-Batch) are recorded, and the ratio served / direct is the figure.
The service is stopped (SIGTERM, then SIGKILL of its process group) whatever happens.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np


def _inputs(count: int, shape: tuple[int, int], channels: int, dim: int) -> list[tuple[np.ndarray, np.ndarray, int]]:
    gen = np.random.default_rng(0)
    return [(gen.standard_normal((1, channels, *shape)).astype(np.float32),
             gen.standard_normal((1, 8, dim)).astype(np.float32), 1000 + i) for i in range(count)]


def _direct_worker(args: tuple) -> float:
    export, threads, max_batch, items = args
    import torch

    from pid_runtime.batching import DecodeRequest
    from pid_runtime.decoder import PidDecoder

    torch.set_num_threads(1)
    decoder = PidDecoder.from_export(export, device="cpu", threads=threads)
    requests = [DecodeRequest(torch.from_numpy(lat), seed=seed, caption=torch.from_numpy(cap))
                for lat, cap, seed in items]
    decoder.decode_many(requests[:1], max_batch)  # warm-up (session's first run)
    start = time.perf_counter()
    outcomes = decoder.decode_many(requests, max_batch)
    assert all(o.ok for o in outcomes)
    return time.perf_counter() - start


def direct_throughput(export: str, items: list, workers: int, threads: int, max_batch: int) -> float:
    shares = [items[i::workers] for i in range(workers)]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        seconds = pool.map(_direct_worker, [(export, threads, max_batch, share) for share in shares])
    return len(items) / max(seconds)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(port: int, body: bytes, seed: int, timeout_s: float) -> tuple[int, float, int]:
    start = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        connection.request("POST", f"/v1/decode?seed={seed}&output=npy", body=body,
                           headers={"Content-Type": "application/octet-stream"})
        reply = connection.getresponse()
        reply.read()
        return reply.status, time.perf_counter() - start, int(reply.getheader("X-PiD-Batch") or 0)
    except OSError:
        return 0, time.perf_counter() - start, 0
    finally:
        connection.close()


def served(export: str, items: list, args: argparse.Namespace) -> dict:
    from safetensors.numpy import save

    port = _free_port()
    script = Path(sys.executable).parent / "pid-serve"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "pid_runtime.serve.cli"]
    proc = subprocess.Popen(command + [export, "--port", str(port), "--replicas", str(args.replicas),
                            "--threads", str(args.threads), "--max-batch", str(args.max_batch),
                            "--batch-wait-ms", str(args.batch_wait_ms), "--max-queued", str(args.requests)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        if "serving" not in line:
            raise RuntimeError(f"pid-serve did not start: {line!r}")
        bodies = [(save({"latents": lat, "caption": cap}), seed) for lat, cap, seed in items]
        for body, seed in bodies[: args.replicas * 2]:  # warm-up: every replica's first run
            _post(port, body, seed, args.timeout)
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
            results = list(pool.map(lambda b: _post(port, b[0], b[1], args.timeout), bodies))
        wall = time.perf_counter() - start
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    latencies = sorted(seconds for status, seconds, _ in results if status == 200)
    ok = len(latencies)

    def pct(q: float) -> float:
        return latencies[min(ok - 1, int(round(q * (ok - 1))))] if ok else float("nan")

    return {"throughput": ok / wall, "ok": ok, "errors": len(results) - ok, "wall_s": wall,
            "p50_ms": pct(0.50) * 1e3, "p95_ms": pct(0.95) * 1e3, "p99_ms": pct(0.99) * 1e3,
            "mean_batch": statistics.mean(b for s, _, b in results if s == 200) if ok else 0.0,
            "batch_sizes": dict(sorted(Counter(b for s, _, b in results if s == 200).items())),
            "statuses": dict(Counter(s for s, _, _ in results))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--batch-wait-ms", type=float, default=20.0)
    parser.add_argument("--latent", default="4x4", help="latent h x w (the tiny export: x32 px)")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    from pid_runtime.metadata import ModelMetadata

    meta = ModelMetadata.load(Path(args.export) / "pid_export.json")
    shape = tuple(int(v) for v in args.latent.split("x"))
    items = _inputs(args.requests, shape, meta.latent_channels, meta.txt_embed_dim)
    load_before = os.getloadavg()
    # Direct before and after the served run: on a shared machine the load moves, so the pair
    # brackets it and their mean is the reference.
    direct_before = direct_throughput(args.export, items, args.replicas, args.threads, args.max_batch)
    serve = served(args.export, items, args)
    direct_after = direct_throughput(args.export, items, args.replicas, args.threads, args.max_batch)
    direct = (direct_before + direct_after) / 2
    report = {"requests": args.requests, "concurrency": args.concurrency, "replicas": args.replicas,
              "threads": args.threads, "max_batch": args.max_batch, "latent": args.latent,
              "direct_images_per_s": direct, "direct_before": direct_before, "direct_after": direct_after,
              "served": serve, "ratio": serve["throughput"] / direct,
              "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "cpus": os.cpu_count()}
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
