"""GPU benchmark for one lent H100 / H200: `python -m benchmarks.gpu` from the repository root.

Full-size PiD network (flux/2k configuration, 1.36e9 parameters) with synthetic
bf16-rounded weights generated on the GPU (no download, no checkpoint file), B=1,
4 steps, at 2048x2048 and 3840x3840. Rows, in the order they run (cheap and
informative first, so a short lease still gets them):

  overhead              the runtime around a network: pid_runtime.decode.decode with a
                        stand-in velocity (x / 2), device and host memory growth in
                        image-sizes, PNG writing; plus checks that the CUDA noise (chunked
                        rows = whole-batch draws) and the per-step CUDA graphs (= eager,
                        bitwise) behave
  eager-autocast        torch eager, fp32 weights under bf16 autocast (the reference's way)
  eager-bf16w           torch eager, bf16 weights (pid_export.precision's bf16 policy, no
                        autocast: what a bf16 export computes)
  runtime-decode        pid_runtime.decode.decode with the bf16-weight network as its velocity:
                        the whole pid-run path, its overhead over the network calls
  reference             fp32 eager decode (no TF32) for the accuracy columns
  compile               torch.compile (default mode) of the bf16-weight network
  compile-max-autotune  torch.compile(mode="max-autotune") of it
  onnxruntime, tensorrt, tensorrt-rtx
                        only where the library is importable (and has CUDA / an engine is
                        given with --engine / --onnx); otherwise recorded as skipped, with why

Memory: torch's allocator peak and the whole GPU's used memory (NVML, else
cudaMemGetInfo), sampled every 5 ms during the timed decodes.

Budget: before each row its expected cost is checked against what is left of
--budget-s (the row is skipped, with the reason, if it does not fit), and a
watchdog ends the run at the budget, marking the row in progress as cut short.
Results are rewritten (atomically) before and after every row, so whatever ends
the run leaves them valid: latency-<card>.json / .md (/ .png at the end) in $OUT
when set, else benchmarks/results/gpu-<card>/. Every row is wrapped: an error is
recorded in its record (status failed, the error's first line) and the next row runs.

Needs torch with CUDA (and triton for compile), numpy; nvidia-ml-py, matplotlib and
psutil are optional. Runs from a checkout without installing it. `--smoke` runs
the same code path on the CPU with a tiny network: a check of the script, not a benchmark.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from pid_runtime.sizes import parse_hw

GPU_SIZES = ((2048, 2048), (3840, 3840))
SMOKE_SIZES = ((64, 96), (96, 128))
ROW_KINDS = ("overhead", "eager-autocast", "eager-bf16w", "runtime-decode", "reference", "compile",
             "compile-max-autotune", "onnxruntime", "tensorrt", "tensorrt-rtx")
COMPILE_KINDS = ("compile", "compile-max-autotune")
# Expected seconds per row on an H100 at (2K, 4K) with the default repeat, set from the FLOP
# model (45 / 384 TFLOP per network call) at ~400 TFLOP/s eager bf16, ~50 fp32, and typical
# torch.compile times for a 1.4e9-parameter transformer. Used only to skip a row that would not
# fit in what is left of the budget; the watchdog is the hard limit.
ESTIMATES_S = {
    "overhead": (15, 30), "eager-autocast": (15, 45), "eager-bf16w": (12, 40), "runtime-decode": (12, 40),
    "reference": (15, 70), "compile": (120, 180), "compile-max-autotune": (300, 420),
    "onnxruntime": (300, 400), "tensorrt": (60, 90), "tensorrt-rtx": (60, 90),
}
SMOKE_ESTIMATE_S = {"compile": 60, "compile-max-autotune": 120}  # CPU: inductor builds C++
RECORD_NAMES = {  # the `backend` of each row's record
    "overhead": "overhead (stand-in)", "eager-autocast": "torch-eager-autocast", "eager-bf16w": "torch-eager-bf16w",
    "runtime-decode": "pid-runtime-decode-bf16w", "reference": "torch-eager-fp32-reference",
    "compile": "torch-compile-bf16w", "compile-max-autotune": "torch-compile-max-autotune-bf16w",
    "onnxruntime": "onnxruntime-cuda", "tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt-rtx",
}
BUDGET_EXIT = 3  # exit status when the watchdog ended the run


def ensure_runtime_importable() -> None:
    """Import `pid_runtime` from this checkout's runtime/ folder when the project is not installed
    (its import name differs from the folder's, so running from the repository root is not enough)."""
    try:
        import pid_runtime  # noqa: F401  (installed, or already bootstrapped)
        return
    except ModuleNotFoundError:
        pass
    folder = Path(__file__).resolve().parents[1] / "runtime"
    spec = importlib.util.spec_from_file_location("pid_runtime", folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["pid_runtime"] = module
    spec.loader.exec_module(module)


def parse_size_list(text: str) -> list[tuple[int, int]]:
    try:
        return [parse_hw(part) for part in text.split(",")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Rows: " + ", ".join(ROW_KINDS))
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run of the same code path")
    parser.add_argument("--rows", default=",".join(ROW_KINDS),
                        help="comma-separated row kinds to run, in the order listed above (default: all)")
    parser.add_argument("--sizes", type=parse_size_list, default=None,
                        help="output sizes HxW,HxW (default 2048x2048,3840x3840; smoke 64x96,96x128)")
    parser.add_argument("--repeat", type=int, default=None, help="timed decodes per row (default 5; smoke 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed decodes after the first (default 1)")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="end the run after this many seconds, results kept (default 480)")
    parser.add_argument("--engine", type=Path, default=None, help="TensorRT engine (.plan) for the tensorrt rows")
    parser.add_argument("--onnx", type=Path, default=None, help="export directory for the onnxruntime rows")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="results folder (default: $OUT, else benchmarks/results/gpu-<card>)")
    args = parser.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROW_KINDS]
    if unknown:
        parser.error(f"unknown row kind(s) {', '.join(unknown)}; choose from {', '.join(ROW_KINDS)}")
    args.rows = rows
    return args


# ---------------------------------------------------------------------------
# Results: saved atomically before and after every row, and by the watchdog


class Results:
    def __init__(self, document: dict[str, Any], paths: dict[str, Path], began: float, budget_s: float):
        self.document = document
        self.paths = paths
        self.began = began
        self.budget_s = budget_s
        self.running: dict[str, Any] | None = None  # the record of the row in progress
        self._lock = threading.Lock()
        self._watchdog = threading.Timer(max(budget_s - self.elapsed(), 0.0), self._budget_reached)
        self._watchdog.daemon = True

    def elapsed(self) -> float:
        return time.perf_counter() - self.began

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def start_watchdog(self) -> None:
        self._watchdog.start()

    def save(self, final: bool = False) -> str | None:
        from .report import write_results

        with self._lock:
            self.document["wall_s"] = self.elapsed()
            return write_results(self.document, self.paths, final=final)

    def _budget_reached(self) -> None:
        """Runs on the watchdog thread: mark the row in progress, write, leave at once."""
        running = self.running
        if running is not None:
            running.update(status="failed", reason=f"cut short: --budget-s {self.budget_s:.0f} s reached "
                                                   f"after {self.elapsed():.0f} s")
        self.document["cut_short"] = True
        for _ in range(3):  # the main thread may be mid-update of a record: retry on a clash
            try:
                self.save()
                break
            except RuntimeError:
                time.sleep(0.05)
        print(f"budget of {self.budget_s:.0f} s reached: results so far in {self.paths['json']}", flush=True)
        os._exit(BUDGET_EXIT)


@dataclass
class Row:
    kind: str
    size: tuple[int, int]
    estimate_s: float
    run: Callable[[dict[str, Any]], None]  # fills the record; raises to fail, BackendSkipped to skip


def run_row(row: Row, results: Results, record: dict[str, Any], say: Callable[[str], None]) -> None:
    from pid_runtime.errors import first_line

    from .backends import BackendSkipped

    label = f"[{record['backend']} {record['output_size']}]"
    results.document[{"overhead": "overhead", "reference": "references"}.get(row.kind, "records")].append(record)
    if results.left() < row.estimate_s:
        record.update(status="skipped", reason=f"time budget: expected ~{row.estimate_s:.0f} s, "
                                               f"{max(results.left(), 0):.0f} s left of --budget-s")
        say(f"{label} skipped: {record['reason']}")
        results.save()
        return
    record["status"] = "running"
    results.running = record
    results.save()
    say(f"{label} ... ({results.left():.0f} s of budget left)")
    start = time.perf_counter()
    try:
        row.run(record)
        record["status"] = "ok"
    except BackendSkipped as exc:
        record.update(status="skipped", reason=str(exc))
    except torch.cuda.OutOfMemoryError as exc:
        record.update(status="failed", reason=f"out of memory: {first_line(exc)}")
    except Exception as exc:  # one failing row must not lose the others
        record.update(status="failed", reason=f"{type(exc).__name__}: {first_line(exc)}")
    finally:
        results.running = None
        record["row_s"] = time.perf_counter() - start
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    say(f"{label} {record['status']}" + (f": {record['reason']}" if record.get("reason") else "")
        + f" ({record['row_s']:.1f} s)")
    results.save()


# ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    ensure_runtime_importable()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from .hardware import card_slug, device_name

    if args.smoke:
        device = torch.device("cpu")
        torch.set_num_threads(1)  # stays quick on a shared CPU
        sizes = args.sizes or list(SMOKE_SIZES)
        repeat, warmup = args.repeat or 2, 0 if args.warmup is None else args.warmup
    else:
        if not torch.cuda.is_available():
            print("error: no CUDA GPU visible to torch (use --smoke for a CPU check of the script)", file=sys.stderr)
            return 1
        device = torch.device("cuda", torch.cuda.current_device())
        sizes = args.sizes or list(GPU_SIZES)
        repeat, warmup = args.repeat or 5, 1 if args.warmup is None else args.warmup
    card = card_slug(device_name(device)) if device.type == "cuda" else "cpu-smoke"
    out_dir = args.out_dir or (Path(os.environ["OUT"]) if os.environ.get("OUT") else
                               Path("benchmarks/results") / f"gpu-{card}")
    stem = f"latency-{card}"
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md", "png": out_dir / f"{stem}.png"}
    print(f"device: {device_name(device)}; torch {torch.__version__} (CUDA {torch.version.cuda}); "
          f"budget {args.budget_s:.0f} s; results -> {out_dir}", flush=True)

    document: dict[str, Any] = {"benchmark": "pid-export GPU rows (benchmarks/gpu.py)", "records": [],
                                "overhead": [], "references": [], "mode": "gpu-smoke" if args.smoke else "gpu"}
    results = Results(document, paths, began, args.budget_s)
    results.start_watchdog()
    # Fused attention only: the unfused math kernel would need (L+Lt)^2 scores per head
    # (tens of GB at 4K); failing loudly beats running out of memory halfway.
    kernels = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    try:
        with sdpa_kernel(kernels if device.type == "cuda" else kernels + [SDPBackend.MATH]):
            rows_run(args, device, sizes, repeat, warmup, results, document)
    except Exception as exc:  # set-up failed (network build, imports): keep what there is, say why
        from pid_runtime.errors import first_line

        document["error"] = f"{type(exc).__name__}: {first_line(exc)}"
        print(f"error: {document['error']}", file=sys.stderr, flush=True)
    why_no_plot = results.save(final=True)

    for r in document["records"]:
        if r["status"] == "ok":
            mem = r.get("peak_device_used_gb") or r.get("peak_device_memory_gb") or r.get("peak_host_rss_gb")
            extra = f", overhead {r['overhead_ms_median']:.1f} ms" if r.get("overhead_ms_median") is not None else ""
            print(f"{r['backend']:<28} {r['output_size']:>10}: median {r['latency_ms_median']:.1f} ms "
                  f"(p90 {r['latency_ms_p90']:.1f}), first {r['first_call_ms'] / 1e3:.1f} s, "
                  f"{r['achieved_tflops']:.1f} TFLOP/s, mem {mem or 0:.2f} GB, max rel err {r.get('max_rel_err')}"
                  + extra)
        else:
            print(f"{r['backend']:<28} {r['output_size']:>10}: {r['status']}: {r['reason']}")
    for r in document["overhead"]:
        decode = r.get("stages", {}).get("decode", {})
        growth = decode.get("device_peak_growth_images", decode.get("host_peak_growth_images"))
        print(f"overhead {r['output_size']:>10}: {r['status']}" + (
            f", decode {decode.get('seconds_median', 0):.3f} s, +{growth:.2f} image-sizes, "
            f"noise {r.get('cuda_noise_check', 'n/a')}, graph {r.get('cuda_graph', {}).get('equal_to_eager', 'n/a')}"
            if r["status"] == "ok" and growth is not None else f": {r.get('reason')}"))
    print(f"wrote {paths['json']}, {paths['md']}" + (f" (no plot: {why_no_plot})" if why_no_plot
                                                      else f", {paths['png']}"))
    print(f"total {results.elapsed():.0f} s")
    return 0 if any(r["status"] == "ok" for r in document["records"] + document["overhead"]) else 1


def rows_run(args: argparse.Namespace, device: torch.device, sizes: list[tuple[int, int]], repeat: int,
             warmup: int, results: Results, document: dict[str, Any]) -> None:
    """Build the network, plan the rows, run them (each guarded)."""
    from .gpu_rows import onnxruntime_cuda_problem, overhead_row, runtime_decode_row
    from .harness import Settings, environment, make_inputs, new_record, reference_decode, time_backend
    from .hardware import peak_tflops
    from .models import DEFAULT_RELEASE, build_network, quick_config, release_config
    from .report import accuracy

    say: Callable[[str], None] = lambda message: print(message, flush=True)  # noqa: E731
    if args.smoke:
        cfg, model = quick_config(), "quick config (GPU-script smoke test)"
    else:
        model, cfg = release_config(DEFAULT_RELEASE)
    start = time.perf_counter()
    net, weights = build_network(cfg, device, seed=0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    env = environment(device)
    document.update(model=model, weights=weights, network=cfg.to_dict(), environment=env,
                    settings={"sizes": [f"{h}x{w}" for h, w in sizes], "rows": args.rows, "precision": "bf16",
                              "batch": 1, "steps": 4, "warmup": warmup, "repeat": repeat,
                              "text_len": cfg.txt_max_length, "seed": 0, "budget_s": args.budget_s,
                              "script": "benchmarks/gpu.py",
                              "attention_kernels": "flash / memory-efficient only (no math fallback)"},
                    network_build_s=time.perf_counter() - start)
    say(f"network built in {document['network_build_s']:.1f} s: "
        f"{sum(p.numel() for p in net.parameters()) / 1e9:.3f}e9 parameters, {weights}")
    results.save()

    settings = Settings(cfg=cfg, model=model, sizes=sizes, backends=[], device=device, precision="bf16",
                        warmup=warmup, repeat=repeat, text_len=cfg.txt_max_length, seed=0,
                        work_dir=results.paths["json"].parent / ".work", mode=document["mode"])
    peak, peak_source = peak_tflops(env["device_name"], "bf16")
    inputs_by_size: dict[tuple[int, int], Any] = {}
    outputs: dict[tuple[int, int], list[tuple[dict[str, Any], torch.Tensor]]] = {s: [] for s in sizes}
    references: dict[tuple[int, int], torch.Tensor] = {}
    bf16_net: list[Any] = []  # made on first use, shared by the bf16-weight rows

    def inputs_for(size):
        if size not in inputs_by_size:
            inputs_by_size[size] = make_inputs(cfg, size, 1, 4, cfg.txt_max_length, 0, device)
        return inputs_by_size[size]

    def bf16_weights():
        if not bf16_net:
            from pid_export.precision import apply_precision

            bf16_net.append(apply_precision(copy.deepcopy(net), "bf16"))
        return bf16_net[0]

    def compare(size, record, first) -> None:
        outputs[size].append((record, first))
        if size in references:
            record.update(accuracy(first, references[size]), accuracy_reference="torch fp32 eager")

    def timed(size, make_backend) -> Callable[[dict[str, Any]], None]:
        def run(record):
            backend = make_backend()
            try:
                first = time_backend(backend, inputs_for(size), settings, record)
            finally:
                backend.close()
            if first is not None:
                compare(size, record, first)
        return run

    def reference_run(size) -> Callable[[dict[str, Any]], None]:
        def run(record):
            references[size] = reference_decode(net, inputs_for(size), settings)
            record.update(latency_note="fp32 reference decode (accuracy baseline)")
            for earlier, first in outputs[size]:
                earlier.update(accuracy(first, references[size]), accuracy_reference="torch fp32 eager")
        return run

    def row_backend(kind):
        from .backends import BackendSkipped, OnnxRuntime, TensorRT, TorchCompile, TorchEager

        name = RECORD_NAMES[kind]
        if kind == "eager-autocast":
            return lambda: TorchEager(net, device, "bf16", name=name)
        if kind == "eager-bf16w":
            return lambda: TorchEager(bf16_weights(), device, "bf16", autocast=False, name=name)
        if kind == "compile":
            return lambda: TorchCompile(bf16_weights(), device, "bf16", autocast=False, name=name)
        if kind == "compile-max-autotune":
            return lambda: TorchCompile(bf16_weights(), device, "bf16", autocast=False, mode="max-autotune",
                                        name=name)
        if kind == "onnxruntime":
            def make_ort():
                problem = onnxruntime_cuda_problem(device)
                if problem:
                    raise BackendSkipped(problem)
                return OnnxRuntime(net, device, "bf16", args.onnx, settings.work_dir)
            return make_ort

        def make_trt():
            module = "tensorrt" if kind == "tensorrt" else "tensorrt_rtx"
            if importlib.util.find_spec(module) is None:
                raise BackendSkipped(f"{module} is not importable here")
            if args.engine is None:
                raise BackendSkipped("no engine given (--engine PLAN); building one for the full network takes "
                                     "longer than this lease")
            return TensorRT(net, device, "bf16", args.engine, library="tensorrt" if kind == "tensorrt" else "rtx")
        return make_trt

    plan: list[tuple[Row, dict[str, Any]]] = []
    phases = [("overhead",), ("eager-autocast", "eager-bf16w", "runtime-decode", "reference"),
              ("compile",), ("compile-max-autotune",), ("onnxruntime", "tensorrt", "tensorrt-rtx")]
    for phase in phases:
        for index, size in enumerate(sizes):
            for kind in phase:
                if kind not in args.rows or (args.smoke and kind in COMPILE_KINDS and index > 0):
                    continue
                estimate = ESTIMATES_S[kind][0 if size[0] * size[1] <= 2048 * 2048 else 1]
                if args.smoke:
                    estimate = SMOKE_ESTIMATE_S.get(kind, 5)
                if kind == "overhead":
                    body = overhead_row(size, device, repeat=2)
                elif kind == "runtime-decode":
                    body = runtime_decode_row(size, device, inputs_for, bf16_weights, settings, outputs, compare,
                                              compare_with=RECORD_NAMES["eager-bf16w"])
                elif kind == "reference":
                    body = reference_run(size)
                else:
                    body = timed(size, row_backend(kind))
                record = new_record(RECORD_NAMES[kind], size, settings, env, peak, peak_source)
                record["row"] = kind
                plan.append((Row(kind, size, estimate, body), record))
    document["plan"] = [f"{row.kind} {row.size[0]}x{row.size[1]}" for row, _ in plan]
    for row, record in plan:
        run_row(row, results, record, say)


if __name__ == "__main__":
    sys.exit(main())
