"""Writing benchmark results: JSON (the record list), a markdown table and a PNG plot.

Every file is written under a temporary name and renamed, so an interrupted run
never leaves a half-written result; the harness rewrites all three after each
output size, so a run cut short still leaves what it measured.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from pid_runtime.io import atomic_write
from torch import Tensor


def percentile(values: Iterable[float], q: float) -> float:
    return float(np.percentile(np.asarray(list(values), dtype=np.float64), q))


def accuracy(output: Tensor, reference: Tensor) -> dict[str, float | None]:
    """Max relative error (max |a - b| over max |b|) and PSNR of the images (x+1)/2 in [0, 1]."""
    a, b = output.double(), reference.double()
    max_err = float((a - b).abs().max())
    scale = float(b.abs().max())
    mse = float((((a + 1) / 2 - (b + 1) / 2) ** 2).mean())
    return {
        "max_abs_err": max_err,
        "max_rel_err": max_err / scale if scale > 0 else None,
        # identical outputs have no finite PSNR; JSON has no infinity, so None means "identical"
        "psnr_db": 10 * math.log10(1.0 / mse) if mse > 0 else None,
    }


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda temp: temp.write_bytes(data))


def write_json(path: Path, document: dict[str, Any]) -> None:
    _write_atomic(path, (json.dumps(document, indent=1) + "\n").encode())


# ---------------------------------------------------------------------------
# Markdown


def _fmt(value: Any, digits: int = 1) -> str:
    """Fixed point with `digits` decimals; 3 significant digits for values too small for that."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if value != 0 and abs(value) < 10 ** -digits:
            return f"{value:.3g}"
        return f"{value:.{digits}f}"
    return str(value)


COLUMNS = (
    ("backend", lambda r: r["backend"]),
    ("precision", lambda r: r["precision"]),
    ("B", lambda r: r["batch"]),
    ("output", lambda r: r["output_size"]),
    ("steps", lambda r: r["steps"]),
    ("setup s", lambda r: f"{r['setup_s']:.1f}" if r.get("setup_s") is not None else "n/a"),
    ("first decode s", lambda r: _fmt(_div(r.get("first_call_ms"), 1e3), 2)),
    ("median ms", lambda r: _fmt(r.get("latency_ms_median"))),
    ("p90 ms", lambda r: _fmt(r.get("latency_ms_p90"))),
    ("per image ms", lambda r: _fmt(r.get("per_image_ms_median"))),
    ("per call ms", lambda r: _fmt(r.get("per_call_ms_median"))),
    ("TFLOP/s", lambda r: _fmt(r.get("achieved_tflops"), 2)),
    ("% peak", lambda r: _fmt(r.get("pct_of_peak"))),
    ("peak mem GB", lambda r: _fmt(r.get("peak_device_memory_gb") or r.get("peak_host_rss_gb"), 2)),
    ("GPU used GB", lambda r: _fmt(r.get("peak_device_used_gb"), 2)),
    ("runtime overhead ms", lambda r: _fmt(r.get("overhead_ms_median"))),
    ("max rel err", lambda r: _fmt(r.get("max_rel_err"), 4)),
    ("PSNR dB", lambda r: "identical" if r.get("max_abs_err") == 0 else _fmt(r.get("psnr_db"))),
)


def _div(value: float | None, by: float) -> float | None:
    return None if value is None else value / by


def markdown(document: dict[str, Any]) -> str:
    records = document["records"]
    env = document.get("environment", {"device": "?", "device_name": "?", "torch": "?"})
    settings = document.get("settings", {})
    lines = [
        f"# PiD decode latency: {document.get('model', '?')} on {env['device_name']}",
        "",
        f"Weights: {document.get('weights', '?')}. Caption length {settings.get('text_len')}, seed "
        f"{settings.get('seed')}; {settings.get('warmup')} warm-up decode(s) after the first, "
        f"then {settings.get('repeat')} timed decodes. torch {env['torch']}"
        + (f", onnxruntime {env['onnxruntime']}" if env.get("onnxruntime") else "") + "."
        + (f" torch CPU threads: {settings['torch_threads']} (ONNX Runtime: its default pool)."
           if "torch_threads" in settings else ""),
        "",
        "Latency = one whole decode (all steps, the whole batch); per image = that / B; per call = one "
        "network call. '% peak' uses " + (records[0]["peak_source"] if records else "n/a") + ". Peak memory: "
        + ("torch's device allocator; GPU used: the whole GPU (NVML or cudaMemGetInfo, sampled)."
           if env["device"].startswith("cuda") else "host RSS (CPU run)."),
        "Accuracy: the clamped decode against float32 eager PyTorch on the same inputs and noise "
        "(max relative error = max |a-b| / max |ref|; PSNR on images in [0, 1]).",
        "",
        "| " + " | ".join(name for name, _ in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    skipped = []
    for record in records:
        if record["status"] != "ok":
            skipped.append(f"- {record['backend']} {record['output_size']}: {record['status']}: {record['reason']}")
            continue
        lines.append("| " + " | ".join(str(cell(record)) for _, cell in COLUMNS) + " |")
    if document.get("machine_load"):
        from .hardware import load_text

        lines += ["", f"Machine during the run: {load_text(document['machine_load'])}."]
    if skipped:
        lines += ["", "Not measured:", *skipped]
    if document.get("overhead"):
        lines += ["", *overhead_markdown(document["overhead"])]
    if document.get("cut_short"):
        lines += ["", f"The run was cut short by its time budget after {document.get('wall_s', 0):.0f} s."]
    return "\n".join(lines) + "\n"


def overhead_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """The runtime's own cost around a stand-in network (benchmarks.overhead rows of gpu.py)."""
    lines = ["## Runtime overhead (stand-in network: velocity = x / 2)", "",
             "Growth of peak memory above the start of each stage, in image-sizes (one image = float32 "
             "[3, H, W]); device = torch's allocator.", "",
             "| output | decode s | decode device + | decode host + | PNG write s | PNG host + | "
             "CUDA noise check | CUDA graph = eager | graph replay device + |", "|" + "---|" * 9]
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"| {row['output_size']} | {row['status']}: {row.get('reason')} |")
            continue
        decode, png = row["stages"]["decode"], row["stages"].get("write_png", {})
        graph = row.get("cuda_graph", {})
        cells = [row["output_size"], _fmt(decode.get("seconds_median"), 3),
                 _fmt(decode.get("device_peak_growth_images"), 2), _fmt(decode.get("host_peak_growth_images"), 2),
                 _fmt(png.get("seconds_median"), 3), _fmt(png.get("host_peak_growth_images"), 2),
                 row.get("cuda_noise_check", "n/a"), str(graph.get("equal_to_eager", "n/a")),
                 _fmt(graph.get("replay_device_peak_growth_images"), 2)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines


def write_markdown(path: Path, document: dict[str, Any]) -> None:
    _write_atomic(path, markdown(document).encode())


# ---------------------------------------------------------------------------
# Plot


def write_plot(path: Path, document: dict[str, Any]) -> str | None:
    """Median decode latency per image vs output megapixels, one line per backend.

    Returns None on success, else why no plot was written (matplotlib missing, nothing measured).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        return "matplotlib is not installed (pip install 'pid-export[bench]')"
    measured = [r for r in document["records"] if r["status"] == "ok" and r.get("per_image_ms_median") is not None]
    if not measured:
        return "no backend produced a measurement"

    sizes = sorted({(r["megapixels"], r["output_size"]) for r in measured})
    low, high = sizes[0][0], sizes[-1][0]
    pad = 0.12 * (high - low) if high > low else 0.3 * high
    backends = list(dict.fromkeys(r["backend"] for r in measured))
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for i, backend in enumerate(backends):
        rows = sorted((r for r in measured if r["backend"] == backend), key=lambda r: r["megapixels"])
        # Dodge the backends sideways a little so their median..p90 bars do not hide each other.
        xs = [r["megapixels"] + (i - (len(backends) - 1) / 2) * 0.08 * pad for r in rows]
        ys = [r["per_image_ms_median"] for r in rows]
        line, = ax.plot(xs, ys, marker="o", label=f"{backend} ({rows[0]['precision']})")
        ax.vlines(xs, ys, [r["per_image_ms_p90"] for r in rows], color=line.get_color(), alpha=0.6, lw=2)
        for x, y in zip(xs, ys):
            left = i % 2 == 0  # alternate sides so neighbouring labels do not collide
            ax.annotate(f"{y:.0f} ms", (x, y), textcoords="offset points", xytext=(-6 if left else 6, 4),
                        ha="right" if left else "left", fontsize=7, color=line.get_color())
    ax.set_xticks([mp for mp, _ in sizes], [f"{name}\n{mp:.3g} MP" for mp, name in sizes], fontsize=7)
    ax.set_xlim(low - pad, high + pad)
    all_ms = [r["per_image_ms_p90"] for r in measured] + [r["per_image_ms_median"] for r in measured]
    if max(all_ms) / max(min(all_ms), 1e-9) > 20:
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=0, top=1.1 * max(all_ms))
    ax.set_xlabel("output size")
    ax.set_ylabel(f"decode latency per image (ms, {measured[0]['steps']} steps)")
    ax.set_title(f"{document['model']}\non {document['environment']['device_name']}", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, title="dot: median, bar: up to p90", title_fontsize=7)
    fig.tight_layout()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, fig.savefig)
    finally:
        plt.close(fig)
    return None


def write_results(document: dict[str, Any], paths: dict[str, Path], final: bool) -> str | None:
    """JSON and markdown every time; the plot only when `final` (matplotlib is slow to load).

    Returns why no plot was written, or None.
    """
    write_json(paths["json"], document)
    write_markdown(paths["md"], document)
    return write_plot(paths["png"], document) if final else None
