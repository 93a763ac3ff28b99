"""`pid-batch EXPORT INPUTS OUT`: decode many latents with Ray Data, resumably.

INPUTS is a directory (every .npy / .npz / .safetensors in it, except NAME.caption.npy
files) or a text file listing one latent path per line. Each latent [1,C,h,w] (or
[C,h,w]) named NAME decodes to OUT/NAME.png, with the caption embeddings of
NAME.caption.npy beside it when that file exists, else the export's unconditional caption.

Seeds: item NAME gets seed = first 8 bytes of sha256(f"{S}:{NAME}") as a big-endian
integer, top bit cleared (S = --seed), so an item's image depends only on S, its name and
its inputs: not on the other inputs, their order, the batching or the number of actors;
and `pid-run EXPORT NAME.npy --seed <that seed>` gives the same image on the same device.

Ray Data runs an actor pool (--actors, one PidDecoder each; one GPU per actor on GPU
machines, --threads ONNX Runtime threads per actor otherwise). Actors read their own
inputs and write their own images (atomically: a temporary file renamed), and return one
manifest row per input, image or error: nothing they meet raises, so a bad input never
drops a good one. Rows are appended to a journal (OUT/.manifest.journal.jsonl) as they
arrive, and at the end OUT/manifest.jsonl is rewritten (atomically, only when it changed)
with one row per input, in input order, and the journal removed; an interrupted run's
journal is read back by the next run. A rerun skips every input whose image exists: an interrupted run resumes.
Exit status 0 when every input has its image, 1 when some failed (the manifest lists them).
"""

from __future__ import annotations

import hashlib
import json
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import click

PROG = "pid-batch"
MANIFEST = "manifest.jsonl"
JOURNAL = ".manifest.journal.jsonl"
CAPTION_SUFFIX = ".caption.npy"
LATENT_SUFFIXES = (".npy", ".npz", ".safetensors")


def item_seed(seed: int, name: str) -> int:
    """The seed of input NAME under --seed `seed` (see the module docstring)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "big") >> 1


@dataclass(frozen=True)
class Item:
    name: str
    latent: str
    caption: str | None
    seed: int


@dataclass(frozen=True)
class Row:
    """One manifest line."""

    name: str
    input: str
    seed: int
    status: str  # "ok" | "error"
    image: str | None = None
    error: str | None = None

    def line(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def list_inputs(inputs: Path, seed: int) -> list[Item]:
    """The items of a directory or a list file (see the module docstring), in name order."""
    if inputs.is_dir():
        paths = sorted(p for p in inputs.iterdir()
                       if p.is_file() and p.suffix.lower() in LATENT_SUFFIXES and not p.name.endswith(CAPTION_SUFFIX))
    elif inputs.is_file():
        base = inputs.parent
        paths = [Path(line.strip()) if Path(line.strip()).is_absolute() else base / line.strip()
                 for line in inputs.read_text().splitlines() if line.strip() and not line.startswith("#")]
    else:
        raise click.UsageError(f"INPUTS {inputs} is neither a directory nor a list file")
    items, seen = [], set()
    for path in paths:
        name = path.name[: -len(path.suffix)]
        if name in seen:
            raise click.UsageError(f"two inputs are named {name} (their images would collide): rename one")
        seen.add(name)
        caption = path.with_name(name + CAPTION_SUFFIX)
        items.append(Item(name, str(path), str(caption) if caption.is_file() else None, item_seed(seed, name)))
    return items


class DecodeActor:
    """A Ray Data actor: one PidDecoder, a batch of items in, their manifest rows out."""

    def __init__(self, export: str, out: str, device: str, threads: int | None, max_batch: int):
        from .decoder import PidDecoder

        self.decoder = PidDecoder.from_export(export, device=device, threads=threads)
        self.out, self.max_batch = Path(out), max_batch

    def _request(self, item: Item):
        from .batching import DecodeRequest
        from .io import load_caption, load_latents

        latents = load_latents(item.latent)
        if latents.shape[0] != 1:
            raise ValueError(f"{item.latent} holds {latents.shape[0]} latents; pid-batch takes one per file")
        caption = load_caption(item.caption) if item.caption else None
        return DecodeRequest(latents, seed=item.seed, caption=caption)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        from .errors import first_line
        from .io import write_output

        items = [Item(str(n), str(lat), str(cap) or None, int(s))
                 for n, lat, cap, s in zip(batch["name"], batch["latent"], batch["caption"], batch["seed"])]
        rows: list[Row | None] = [None] * len(items)
        requests, where = [], []
        for index, item in enumerate(items):
            try:
                requests.append(self._request(item))
                where.append(index)
            except Exception as exc:  # an unreadable file is this item's error only
                rows[index] = Row(item.name, item.latent, item.seed, "error", error=first_line(exc))
        try:
            outcomes = self.decoder.decode_many(requests, self.max_batch)
        except Exception as exc:
            outcomes = None
            failure = first_line(exc)
        for position, index in enumerate(where):
            item = items[index]
            outcome = outcomes[position] if outcomes is not None else None
            if outcome is None or not outcome.ok or outcome.image is None:
                reason = outcome.error if outcome is not None else failure
                rows[index] = Row(item.name, item.latent, item.seed, "error", error=reason)
                continue
            try:
                written = write_output(outcome.image, self.out / f"{item.name}.png")[0]
                rows[index] = Row(item.name, item.latent, item.seed, "ok", image=str(written))
            except Exception as exc:  # e.g. a full disk: nothing half-written is left (write_output)
                rows[index] = Row(item.name, item.latent, item.seed, "error", error=first_line(exc))
        return {"row": [row.line() for row in rows if row is not None]}


def _read_manifest(path: Path) -> dict[str, str]:
    rows: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows[json.loads(line)["name"]] = line
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by an interruption
    return rows


def _compact_manifest(path: Path, items: list[Item], rows: dict[str, str]) -> None:
    from .io import atomic_write

    text = "".join(rows[item.name] + "\n" for item in items if item.name in rows)
    if not path.is_file() or path.read_text() != text:
        atomic_write(path, lambda tmp: tmp.write_text(text))


def run_batch(export: str, inputs: Path, out: Path, seed: int, actors: int, threads: int, max_batch: int,
              address: str | None, device: str) -> int:
    from .backends import preflight

    preflight(export)
    items = list_inputs(inputs, seed)
    if not items:
        raise click.UsageError(f"no latents (.npy, .npz, .safetensors) in {inputs}")
    out.mkdir(parents=True, exist_ok=True)
    manifest, journal = out / MANIFEST, out / JOURNAL
    rows = {**_read_manifest(manifest), **_read_manifest(journal)}
    pending = [item for item in items if not (out / f"{item.name}.png").is_file()]
    done = len(items) - len(pending)
    for item in items:  # an image there without its row (an interrupted run): record it
        if item not in pending and json.loads(rows.get(item.name, '{"status": ""}')).get("status") != "ok":
            rows[item.name] = Row(item.name, item.latent, item.seed, "ok", image=str(out / f"{item.name}.png")).line()
    click.echo(f"{PROG}: {len(items)} inputs, {done} already decoded, {len(pending)} to decode", err=True)
    if pending:
        _decode_pending(export, out, pending, rows, journal, actors, threads, max_batch, address, device)
    _compact_manifest(manifest, items, rows)
    journal.unlink(missing_ok=True)
    failed = [item.name for item in items if json.loads(rows[item.name])["status"] != "ok"]
    click.echo(f"{PROG}: {len(items) - len(failed)} of {len(items)} decoded into {out}"
               + (f"; {len(failed)} failed (see {manifest}): {', '.join(failed[:10])}" if failed else ""), err=True)
    return 1 if failed else 0


def _decode_pending(export: str, out: Path, pending: list[Item], rows: dict[str, str], journal: Path,
                    actors: int, threads: int, max_batch: int, address: str | None, device: str) -> None:
    from .serve.cluster import gpus_here, start_ray, stop_ray

    try:
        start_ray(address, num_cpus=actors * threads + 1 if address is None else None)
        import ray

        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # our own one-line progress below
        on_gpu = device == "cuda" or (device == "auto" and gpus_here() > 0)
        records = [{"name": i.name, "latent": i.latent, "caption": i.caption or "", "seed": i.seed} for i in pending]
        dataset = ray.data.from_items(records).map_batches(
            DecodeActor, batch_size=max_batch, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
            fn_constructor_kwargs={"export": export, "out": str(out), "device": "cuda" if on_gpu else "cpu",
                                   "threads": None if on_gpu else threads, "max_batch": max_batch},
            num_gpus=1 if on_gpu else 0, num_cpus=0 if on_gpu else threads)
        start, count, failed = time.monotonic(), 0, 0
        with journal.open("a") as log:
            for record in dataset.iter_rows():
                line = str(record["row"])
                row = json.loads(line)
                rows[row["name"]] = line
                log.write(line + "\n")
                log.flush()
                count += 1
                failed += row["status"] != "ok"
                rate = count / max(time.monotonic() - start, 1e-9)
                click.echo(f"{PROG}: {count}/{len(pending)} ({failed} failed, {rate:.2f} images/s) {row['name']}",
                           err=True)
    finally:
        stop_ray()


@click.command(name=PROG, help=__doc__.split("\n\n")[1] + "\n\nSee pid_runtime.batch for seeds and resuming.",
               context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("export", metavar="EXPORT")
@click.argument("inputs", metavar="INPUTS", type=click.Path(exists=True, path_type=Path))
@click.argument("out", metavar="OUT", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True, help="Base seed (each item's seed derives from it and its name).")
@click.option("--actors", type=click.IntRange(min=1), default=1, show_default=True, help="Decoder actors (one PidDecoder each).")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True, help="CPU actors: ONNX Runtime threads each.")
@click.option("--max-batch", type=click.IntRange(min=1), default=4, show_default=True, help="Items per network call.")
@click.option("--address", default=None, help="Join this Ray cluster instead of starting a local one (127.0.0.1).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
def batch_command(export: str, inputs: Path, out: Path, seed: int, actors: int, threads: int, max_batch: int,
                  address: str | None, device: str) -> int:
    return run_batch(export, inputs, out, seed, actors, threads, max_batch, address, device)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # unwinds through run_batch's finally: Ray is shut down, rows so far kept


def main(argv: Sequence[str] | None = None) -> int:
    from .serve.cluster import run_click

    signal.signal(signal.SIGTERM, _interrupt)
    return run_click(batch_command, list(sys.argv[1:] if argv is None else argv), PROG)


if __name__ == "__main__":
    sys.exit(main())
