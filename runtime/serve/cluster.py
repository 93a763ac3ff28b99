"""Starting or joining Ray for pid-serve and pid-batch, on loopback unless told otherwise.

A local Ray started by `ray.init()` on Linux takes the machine's address as its node
address and binds its own ports (GCS, raylet, object manager, metrics and dashboard
agents) there. `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` makes Ray treat the node as a
single-machine cluster, with 127.0.0.1 as the node address (its setting for laptops),
and it must be in the environment before `ray` is imported, since Ray reads it at
import time and the processes it starts inherit it. `--address` joins an existing
cluster instead, whose own configuration decides its interfaces.
"""

from __future__ import annotations

import os
import sys

from .settings import LOOPBACK

LOCAL_ONLY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def start_ray(address: str | None, num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Join `address`, else start a local single-node Ray bound to 127.0.0.1 (no dashboard)."""
    if address is None:
        if "ray" in sys.modules and os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0":
            raise RuntimeError("ray was imported before pid_runtime could keep it on loopback; "
                               "set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before importing ray")
        os.environ.update(LOCAL_ONLY_ENV)
    import ray

    if address is not None:
        ray.init(address=address, log_to_driver=False)
        return
    ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, _node_ip_address=LOOPBACK,
             dashboard_host=LOOPBACK, log_to_driver=False, configure_logging=False)


def stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def gpus_here() -> int:
    """GPUs of the Ray cluster this process is connected to (0 on a CPU machine)."""
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def run_click(command, args: list[str], prog: str) -> int:
    """Run a click command; every failure becomes one `prog: error: ...` line and an exit status."""
    import click

    from ..cli import USER_ERRORS
    from ..errors import first_line

    def say(message: str) -> None:
        click.echo(f"{prog}: error: {' '.join(message.split())}", err=True)

    try:
        result = command.main(args=args, prog_name=prog, standalone_mode=False)
        return result if isinstance(result, int) else 0
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.UsageError as exc:
        say(f"{exc.format_message()} (see {prog} --help)")
        return exc.exit_code
    except click.ClickException as exc:
        say(exc.format_message())
        return exc.exit_code
    except (click.exceptions.Abort, KeyboardInterrupt):
        say("interrupted")
        return 130
    except USER_ERRORS as exc:
        say(str(exc))
        return 1
    except Exception as exc:
        say(f"{type(exc).__name__}: {first_line(exc)}")
        return 1
