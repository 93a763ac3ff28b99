"""What a pid-serve deployment is made of (`ServeSettings`), and the config files it writes.

One record travels from the command line to every replica (as the application's args), so
`pid-serve EXPORT ...`, `serve deploy serve_config.yaml` and a KubeRay RayService built from
the same settings run the same application (`pid_runtime.serve.app:build_app`).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IMPORT_PATH = "pid_runtime.serve.app:build_app"
APP_NAME = "pid"
LOOPBACK = "127.0.0.1"
RAY_VERSION = "2.60.0"


@dataclass(frozen=True)
class ServeSettings:
    export: str  # export directory, engine or .onnx (a path every replica's node can read)
    host: str = LOOPBACK
    port: int = 8000
    replicas: int = 1  # fixed count when max_replicas is None
    max_replicas: int | None = None  # autoscaling between replicas and max_replicas
    threads: int = 1  # CPU replicas: ONNX Runtime intra-op threads = the replica's num_cpus
    gpus_per_replica: float = 0.0  # 1 on GPU machines: one replica per GPU
    max_batch: int = 4  # images per network call (capped by the engine profile)
    batch_wait_s: float = 0.01  # how long a batch waits to fill
    max_queued: int = 16  # per replica: requests waiting for a decode beyond this get 503
    max_ongoing: int = 32  # per replica, Ray's admission (above max_queued so the app answers 503 itself)
    ray_max_queued: int = 64  # Ray's own queue in front of the replicas (its 503 beyond)
    body_limit: int = 64 * 1024 * 1024  # bytes
    retry_after_s: int = 1
    token_file: str | None = None  # bearer token (required off loopback)

    def as_args(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> "ServeSettings":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(f"unknown pid-serve settings: {', '.join(unknown)}")
        return cls(**args)

    def deployment_options(self) -> dict[str, Any]:
        """Ray Serve options of the decode deployment."""
        options: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing,
            "max_queued_requests": self.ray_max_queued,
            "ray_actor_options": {"num_cpus": float(self.threads) if not self.gpus_per_replica else 1.0,
                                  "num_gpus": self.gpus_per_replica},
            "health_check_period_s": 2,
            "health_check_timeout_s": 30,
        }
        if self.max_replicas is not None and self.max_replicas > self.replicas:
            options["autoscaling_config"] = {"min_replicas": self.replicas, "max_replicas": self.max_replicas,
                                             "target_ongoing_requests": self.max_batch}
        else:
            options["num_replicas"] = self.replicas
        return options


def serve_config(settings: ServeSettings) -> dict[str, Any]:
    """The Serve config file (`serve deploy`) equivalent to running pid-serve with `settings`."""
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": settings.host, "port": settings.port},
        "applications": [{
            "name": APP_NAME,
            "route_prefix": "/",
            "import_path": IMPORT_PATH,
            "args": settings.as_args(),
        }],
    }


def rayservice_manifest(settings: ServeSettings, image: str = f"rayproject/ray:{RAY_VERSION}-py311-gpu") -> dict[str, Any]:
    """A KubeRay RayService running the same application: one GPU per worker pod and replica."""
    config = serve_config(settings)
    config["http_options"] = {"host": "0.0.0.0", "port": settings.port}  # inside the pod; the Service fronts it
    container = {"name": "ray", "image": image,
                 "resources": {"limits": {"cpu": "8", "memory": "32Gi"}}}
    worker = {"name": "ray-worker", "image": image,
              "resources": {"limits": {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "1"}}}
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": "pid-serve"},
        "spec": {
            "serveConfigV2": _yaml(config),
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                "headGroupSpec": {"rayStartParams": {"num-gpus": "0"},
                                  "template": {"spec": {"containers": [container]}}},
                "workerGroupSpecs": [{"groupName": "gpu", "replicas": max(1, settings.replicas),
                                      "minReplicas": max(1, settings.replicas),
                                      "maxReplicas": max(1, settings.max_replicas or settings.replicas),
                                      "rayStartParams": {},
                                      "template": {"spec": {"containers": [worker]}}}],
            },
        },
    }


def _yaml(data: Any) -> str:
    import yaml  # a Ray dependency

    return yaml.safe_dump(data, sort_keys=False)


def _write_text(path: Path, text: str) -> None:
    path.write_text(text)


def write_configs(settings: ServeSettings, directory: str | Path) -> list[Path]:
    """Write serve_config.yaml and rayservice.yaml into `directory` (atomically); returns the paths.

    The RayService listens on its pods' interfaces, so it is written only with a token file
    (its path inside the pods, e.g. a mounted Secret)."""
    from ..io import atomic_write

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    files = [("serve_config.yaml", serve_config(settings))]
    if settings.token_file is not None:
        files.append(("rayservice.yaml", rayservice_manifest(settings)))
    for name, data in files:
        written.append(atomic_write(directory / name, functools.partial(_write_text, text=_yaml(data))))
    return written
