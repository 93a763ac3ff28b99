"""The Ray Serve application: a FastAPI ingress whose replicas each hold one PidDecoder.

No `from __future__ import annotations` here: FastAPI reads the endpoint signatures'
annotations at import time, and string annotations break its parameter resolution.

A request is checked in full (token, load, parameters, type, size, body, the latent against
the model) on the event loop before it joins a batch; `@serve.batch` gathers up to the
profile's batch limit within `batch_wait_s`, and the batch decodes in a worker thread
(`decode_many`: grouped by shape, an outcome per request), so the loop keeps answering,
shedding and health-checking while the network runs. Nothing inside the batch raises: an
exception there would fail every caller of the batch.
"""

import asyncio
import hashlib
import hmac
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from fastapi import FastAPI, Request
from fastapi.responses import Response
from ray import serve
from ray.serve import metrics

from ..batching import DecodeRequest, Outcome, batch_limit, check_request
from ..decode import DecodeError
from ..decoder import PidDecoder
from ..errors import first_line
from ..latents import LatentError, to_training_frame
from ..sizes import supported_size_range
from .bodies import HttpError, check_content_type, npy_bytes, parse_body, parse_query, png_bytes
from .settings import ServeSettings

logger = logging.getLogger("pid_runtime.serve")
app = FastAPI(title="pid-serve", docs_url=None, redoc_url=None, openapi_url=None)
LATENCY_BOUNDARIES = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
BATCH_BOUNDARIES = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]


def error_response(status: int, message: str, headers: Optional[Dict[str, str]] = None) -> Response:
    body = json.dumps({"error": " ".join(message.split()), "status": status}) + "\n"
    return Response(content=body, status_code=status, media_type="application/json", headers=headers)


def keep_replica_grpc_on_loopback() -> None:
    """Ray 2.60 binds each replica's inter-deployment gRPC server to [::]:0 (every interface),
    whatever the node address. On a local, loopback-only Ray (pid_runtime.serve.cluster sets
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, inherited by the replicas) bind it to 127.0.0.1: it
    is started after the replica's constructor, which is where this runs."""
    import ray.serve._private.replica as replica_module

    original = replica_module.add_port_to_grpc_server
    if getattr(original, "pid_loopback", False):
        return

    def loopback_port(server, address):
        return original(server, address.replace("[::]", "127.0.0.1"))

    loopback_port.pid_loopback = True  # type: ignore[attr-defined]
    replica_module.add_port_to_grpc_server = loopback_port


def token_digest(token_file: Optional[str]) -> Optional[bytes]:
    if token_file is None:
        return None
    token = Path(token_file).read_text().strip()
    if not token:
        raise ValueError(f"token file {token_file} is empty")
    return hashlib.sha256(token.encode()).digest()


@serve.deployment(name="PidDecoder")
@serve.ingress(app)
class PidDecodeService:
    def __init__(self, args: Dict):
        self.settings = settings = ServeSettings.from_args(args)
        if os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0":
            keep_replica_grpc_on_loopback()
        on_gpu = settings.gpus_per_replica > 0
        self.decoder = PidDecoder.from_export(settings.export, device="cuda" if on_gpu else "cpu",
                                              threads=None if on_gpu else settings.threads,
                                              notify=logger.info)
        self.default_caption = self.decoder.unconditional_caption()
        self.limit = batch_limit(self.decoder.backend, settings.max_batch)
        self.decode_batch.set_max_batch_size(self.limit)  # type: ignore[attr-defined]  # serve.batch's setters
        self.decode_batch.set_batch_wait_timeout_s(settings.batch_wait_s)  # type: ignore[attr-defined]
        self.token = token_digest(settings.token_file)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="pid-decode")  # one batch at a time
        self.waiting = 0  # requests admitted and not yet answered (this replica)
        self.requests = metrics.Counter("pid_serve_requests", "Decode requests by HTTP status",
                                        tag_keys=("status",))
        self.latency = metrics.Histogram("pid_serve_latency_seconds", "Decode request latency",
                                         boundaries=LATENCY_BOUNDARIES)
        self.batch_sizes = metrics.Histogram("pid_serve_batch_size", "Images per served batch",
                                             boundaries=BATCH_BOUNDARIES)
        self.images = metrics.Counter("pid_serve_images", "Images decoded")
        self.images_per_second = metrics.Gauge("pid_serve_images_per_second", "Throughput of the last batch")

    # -- endpoints -------------------------------------------------------------
    @app.get("/healthz")
    async def healthz(self) -> Response:
        # A replica takes requests only after __init__ opened the model, so answering means ready.
        return Response(content=json.dumps({"status": "ok"}) + "\n", media_type="application/json")

    @app.get("/v1/info")
    async def info(self, request: Request) -> Response:
        try:
            self.authorize(request)
        except HttpError as exc:
            return error_response(exc.status, exc.message, exc.headers)
        meta = self.decoder.meta
        size_range, source = supported_size_range(self.decoder.backend)
        body = {"release": meta.release, "precision": meta.precision, "backend": self.decoder.backend.name,
                "device": str(self.decoder.device), "pixel_scale": meta.pixel_scale,
                "latent_channels": meta.latent_channels, "trained_sizes": meta.trained_sizes,
                "size_range": size_range, "size_range_source": source, "max_batch": self.limit,
                "batch_wait_s": self.settings.batch_wait_s, "max_queued": self.settings.max_queued,
                "body_limit": self.settings.body_limit, "unconditional_caption": self.default_caption is not None}
        return Response(content=json.dumps(body) + "\n", media_type="application/json")

    @app.post("/v1/decode")
    async def decode(self, request: Request) -> Response:
        start = time.perf_counter()
        try:
            response = await self.handle(request)
        except HttpError as exc:
            response = error_response(exc.status, exc.message, exc.headers)
        except Exception as exc:  # never a traceback to the client; the log has it
            logger.exception("decode request failed")
            response = error_response(500, f"internal error: {first_line(exc)}")
        self.requests.inc(tags={"status": str(response.status_code)})
        self.latency.observe(time.perf_counter() - start)
        return response

    # -- the request ---------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        if self.token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        digest = hashlib.sha256(given.strip().encode()).digest()
        if scheme.lower() != "bearer" or not hmac.compare_digest(digest, self.token):
            raise HttpError(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})

    async def read_body(self, request: Request) -> bytes:
        """The body, refused with 413 before reading it when Content-Length is over the limit,
        and while reading it when the streamed bytes pass the limit."""
        limit = self.settings.body_limit
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise HttpError(400, f"bad Content-Length {declared!r}")
            if int(declared) > limit:
                raise HttpError(413, f"body of {int(declared)} bytes is over the limit of {limit} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HttpError(413, f"body is over the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def decode_request(self, query, latents, caption) -> DecodeRequest:
        try:
            lq, backbone = self.decoder.network_latents(latents, query.pipeline, *(query.ldm_size or (None, None)))
            sigma = query.sigma
            if backbone is not None:
                lq, sigma_t = to_training_frame(lq, sigma, backbone)
                sigma = float(torch.as_tensor(sigma_t).reshape(-1)[0])
            decode_request = DecodeRequest(lq, seed=query.seed, caption=caption, sigma=sigma, steps=query.steps,
                                           size=query.size, tile=query.tile)
            check_request(self.decoder.backend, decode_request, self.default_caption)
        except (DecodeError, LatentError, ValueError) as exc:
            raise HttpError(422, first_line(exc)) from None
        return decode_request

    async def handle(self, request: Request) -> Response:
        self.authorize(request)
        if self.waiting >= self.settings.max_queued:
            raise HttpError(503, f"busy: {self.waiting} decodes waiting; retry shortly",
                            {"Retry-After": str(self.settings.retry_after_s)})
        query = parse_query(dict(request.query_params))
        check_content_type(request.headers.get("content-type"))
        self.waiting += 1
        try:
            latents, caption = parse_body(await self.read_body(request))
            outcome, batch = await self.decode_batch(self.decode_request(query, latents, caption))
        finally:
            self.waiting -= 1
        if not outcome.ok or outcome.image is None:
            raise HttpError(500 if outcome.internal else 422, outcome.error or "not decoded")
        headers = {"X-PiD-Batch": str(batch)}  # how many requests shared its batch (benchmarks report it)
        if query.output == "npy":
            return Response(content=npy_bytes(outcome.image), media_type="application/x-npy", headers=headers)
        return Response(content=await asyncio.to_thread(png_bytes, outcome.image), media_type="image/png",
                        headers=headers)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)
    async def decode_batch(self, requests: List[DecodeRequest]) -> List[Tuple[Outcome, int]]:
        start = time.perf_counter()
        try:
            loop = asyncio.get_running_loop()
            outcomes = await loop.run_in_executor(self.executor, self.decoder.decode_many, requests, self.limit)
        except Exception as exc:  # raising here would fail every caller of the batch
            logger.exception("batch decode failed")
            outcomes = [Outcome(error=f"decode failed: {first_line(exc)}", internal=True) for _ in requests]
        seconds = time.perf_counter() - start
        decoded = sum(outcome.ok for outcome in outcomes)
        self.batch_sizes.observe(len(requests))
        if decoded:
            self.images.inc(decoded)
            self.images_per_second.set(decoded / max(seconds, 1e-9))
        return [(outcome, len(requests)) for outcome in outcomes]


def build_app(args: Dict) -> serve.Application:
    """The application for `serve run` / `serve deploy` (args: ServeSettings fields)."""
    settings = ServeSettings.from_args(dict(args))
    deployment = PidDecodeService.options(**settings.deployment_options())  # type: ignore[attr-defined]
    return deployment.bind(settings.as_args())
