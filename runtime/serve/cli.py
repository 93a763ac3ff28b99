"""`pid-serve EXPORT`: the Ray Serve decode service in the foreground (see README "Serving")."""

from __future__ import annotations

import ipaddress
import signal
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Sequence

import click

from .settings import LOOPBACK, ServeSettings, write_configs

PROG = "pid-serve"
HELP = """Serve EXPORT (export directory, engine or .onnx) over HTTP with Ray Serve.

POST /v1/decode?seed=S[&sigma=X][&size=HxW][&steps=K][&output=png|npy] with a .safetensors
body ('latents' [1,C,h,w] float32, optional 'caption' [1,L,D]) or a plain .npy latent;
GET /healthz, GET /v1/info. Listens on 127.0.0.1 (Ray's own ports too) unless --host is
given, which needs --token-file. Prints one line with the URL when ready; Ctrl-C or
SIGTERM shuts Ray and everything it started down."""


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def wait_ready(url: str, timeout_s: float, alive: threading.Event) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not alive.is_set():
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2) as reply:
                if reply.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


@click.command(name=PROG, help=HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("export", metavar="EXPORT")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--host", default=LOOPBACK, show_default=True, help="Interface to listen on (off loopback needs --token-file).")
@click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True,
              help="Replicas (on GPUs: one per GPU); the minimum when --max-replicas autoscales.")
@click.option("--max-replicas", type=click.IntRange(min=1), default=None, help="Autoscale up to this many replicas.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="CPU replicas: ONNX Runtime threads (and Ray CPUs) per replica.")
@click.option("--max-batch", type=click.IntRange(min=1), default=4, show_default=True,
              help="Images per network call (an engine profile's maximum caps it).")
@click.option("--batch-wait-ms", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="How long a batch waits to fill.")
@click.option("--max-queued", type=click.IntRange(min=1), default=16, show_default=True,
              help="Requests waiting per replica before 503 + Retry-After.")
@click.option("--body-limit-mb", type=click.FloatRange(min=0.001), default=64.0, show_default=True)
@click.option("--token-file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="File holding the bearer token clients must send (Authorization: Bearer TOKEN).")
@click.option("--address", default=None, help="Join this Ray cluster (e.g. ray://head:10001 or auto) instead of a local one.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="auto: one GPU per replica when the cluster has GPUs, else CPU replicas.")
@click.option("--write-config", "config_dir", type=click.Path(file_okay=False), default=None,
              help="Write serve_config.yaml (serve deploy) and rayservice.yaml (KubeRay) to DIR and exit.")
@click.option("--ready-timeout", type=click.FloatRange(min=1), default=600.0, show_default=True)
def serve_command(export: str, port: int, host: str, replicas: int, max_replicas: int | None, threads: int,
                  max_batch: int, batch_wait_ms: float, max_queued: int, body_limit_mb: float,
                  token_file: str | None, address: str | None, device: str, config_dir: str | None,
                  ready_timeout: float) -> None:
    if not _is_loopback(host) and token_file is None:
        raise click.UsageError(f"--host {host} listens beyond this machine: give --token-file too")
    if token_file is not None and not Path(token_file).read_text().strip():
        raise click.UsageError(f"token file {token_file} is empty")
    from ..backends import preflight

    preflight(export)
    settings = ServeSettings(export=str(Path(export).resolve()), host=host, port=port, replicas=replicas,
                             max_replicas=max_replicas, threads=threads, max_batch=max_batch,
                             batch_wait_s=batch_wait_ms / 1000, max_queued=max_queued,
                             max_ongoing=2 * max_queued,
                             # Ray's queue is the backstop behind the app's own 503 + Retry-After: deep enough
                             # that a burst is shed by the replicas (which say when to retry), not by Ray.
                             ray_max_queued=max(64, 8 * max_queued * (max_replicas or replicas)),
                             body_limit=int(body_limit_mb * 1024 * 1024),
                             token_file=str(Path(token_file).resolve()) if token_file else None,
                             gpus_per_replica=1.0 if device == "cuda" else 0.0)
    if config_dir is not None:
        for path in write_configs(settings, config_dir):
            click.echo(f"{PROG}: wrote {path}")
        if settings.token_file is None:
            click.echo(f"{PROG}: no rayservice.yaml without --token-file (a RayService listens beyond loopback)")
        return
    run_service(settings, address, device, ready_timeout)


def run_service(settings: ServeSettings, address: str | None, device: str, ready_timeout: float) -> None:
    from .cluster import gpus_here, start_ray, stop_ray

    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    cpus = settings.threads * (settings.max_replicas or settings.replicas)
    try:
        start_ray(address, num_cpus=cpus if address is None else None)
        from ray import serve

        from .app import build_app

        if device == "auto" and gpus_here() > 0:
            settings = ServeSettings.from_args({**settings.as_args(), "gpus_per_replica": 1.0})
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(build_app(settings.as_args()), name="pid", route_prefix="/", blocking=False)
        url = f"http://{settings.host if settings.host != '0.0.0.0' else LOOPBACK}:{settings.port}"
        if not wait_ready(url, ready_timeout, stop):
            if not stop.is_set():
                raise click.ClickException(f"the service did not answer {url}/healthz within {ready_timeout:g} s")
        else:
            kind = "GPU" if settings.gpus_per_replica else f"CPU x {settings.threads} thread(s)"
            print(f"{PROG}: serving {settings.export} at {url} ({settings.replicas} {kind} replica(s))", flush=True)
            stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)  # a second Ctrl-C during shutdown interrupts it
        try:
            from ray import serve

            serve.shutdown()
        except Exception as exc:  # shutting down what may be half started: say so, go on
            click.echo(f"{PROG}: serve shutdown: {exc}", err=True)
        stop_ray()


def main(argv: Sequence[str] | None = None) -> int:
    from .cluster import run_click

    return run_click(serve_command, list(sys.argv[1:] if argv is None else argv), PROG)


if __name__ == "__main__":
    sys.exit(main())
