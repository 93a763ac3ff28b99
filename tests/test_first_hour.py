"""Issue 22: the first hour of a new user, run as that user would (real CLI subprocesses).

* README's first command (`pid-export --demo`), then README's pid-run line on the demo's export,
  as typed, writes an image equal to the demo's own demo.png.
* With the hub unreachable and HF_HUB_OFFLINE unset, `pid-run --prompt` and the release export
  end in under 10 s with at most 2 lines (the hub is a 127.0.0.1 listener that accepts and never
  answers, or a closed 127.0.0.1 port; HF_HOME is an empty cache).
* The examples' --help works, and an offline run ends in one line without a traceback.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from exports import REPO, export_cases, export_root, golden_tensors  # noqa: F401 (fixture)
from PIL import Image

CASE = "tiny_v1_16ch_sr4_b2"  # golden network with a 40-d caption (the tiny Gemma's width)
FAST_S = 10.0
README = (REPO / "README.md").read_text()


def hub_env(tmp_path: Path, endpoint: str) -> dict[str, str]:
    """A new user's environment: no offline switch, an empty Hugging Face cache, the hub at `endpoint`."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "PID_CAPTION_MODEL", "HF_HUB_CACHE")}
    env["HF_HOME"] = str(tmp_path / "hf-home")
    env["HF_ENDPOINT"] = endpoint
    return env


@pytest.fixture(params=["silent", "closed"])
def dead_hub(request):
    """The hub endpoint of an offline machine: a loopback listener that never answers, or a closed port."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    port = server.getsockname()[1]
    if request.param == "silent":
        server.listen(64)  # the kernel completes the handshakes; nothing ever reads or answers
    else:
        server.close()
    yield f"http://127.0.0.1:{port}"
    server.close()


def run(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    proc = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    return proc, time.perf_counter() - start


def lines_of(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]


def tool(name: str) -> str:
    return str(Path(sys.executable).parent / name)


@pytest.fixture(scope="module")
def export_dir(export_root: Path) -> Path:  # noqa: F811
    return export_cases([CASE])[CASE]


@pytest.fixture
def latents(tmp_path: Path) -> Path:
    path = tmp_path / "lat.npy"
    np.save(path, golden_tensors(CASE)["lq_latent"].numpy())
    return path


# ---------------------------------------------------------------------------
# Offline: fast, short, and naming the ways out


def test_release_export_with_an_unreachable_hub_fails_fast(dead_hub, tmp_path):
    proc, seconds = run([tool("pid-export"), "--backbone", "sd3", "--variant", "2kto4k"], hub_env(tmp_path, dead_hub),
                        tmp_path)
    lines = lines_of(proc)
    assert proc.returncode != 0
    assert seconds < FAST_S, f"took {seconds:.1f} s"
    assert len(lines) <= 2, "\n".join(lines)
    assert "HF_HUB_OFFLINE=1" in lines[-1] and "--checkpoint PATH" in lines[-1] and "unreachable" in lines[-1]
    assert "Traceback" not in proc.stderr and "Retrying" not in proc.stderr
    assert not (tmp_path / "engines").exists()


def test_prompt_with_an_unreachable_hub_fails_fast(dead_hub, tmp_path, export_dir, latents):
    proc, seconds = run([tool("pid-run"), str(export_dir), str(latents), "--prompt", "a red fox"],
                        hub_env(tmp_path, dead_hub), tmp_path)
    lines = lines_of(proc)
    assert proc.returncode == 1
    assert seconds < FAST_S, f"took {seconds:.1f} s"
    assert len(lines) <= 2, "\n".join(lines)
    assert lines[-1].startswith("pid-run: error: ")
    assert "HF_HUB_OFFLINE=1" in lines[-1] and "--caption-model DIR" in lines[-1]
    assert "Retrying" not in proc.stderr and not latents.with_suffix(".png").exists()


def test_export_caption_step_with_an_unreachable_hub_is_one_quick_line(dead_hub, tmp_path):
    """The release export's caption step (reached when the checkpoint is cached): one note, no retries."""
    out = tmp_path / "export"
    out.mkdir()
    code = ("import sys; from pid_export.caption_export import store_empty_caption; "
            f"store_empty_caption({str(out)!r}, download=True, notify=print, txt_embed_dim=2304)")
    proc, seconds = run([sys.executable, "-c", code], hub_env(tmp_path, dead_hub), tmp_path)
    lines = lines_of(proc)
    assert proc.returncode == 0, proc.stderr
    assert seconds < FAST_S, f"took {seconds:.1f} s"
    assert len(lines) == 1, "\n".join(lines)
    assert "--caption-model DIR" in lines[0] and "HF_HUB_OFFLINE=1" in lines[0] and "unreachable" in lines[0]
    assert not (out / "empty_caption.npy").exists()


def test_caption_model_flag_decodes_offline_without_the_hub(tmp_path, export_dir, latents):
    """--caption-model DIR: the local encoder is used and the (unreachable) hub is never waited for."""
    from tiny_gemma import save_tiny_gemma

    encoder = tmp_path / "tiny-gemma"
    save_tiny_gemma(encoder)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    try:
        env = hub_env(tmp_path, f"http://127.0.0.1:{server.getsockname()[1]}")
        out = tmp_path / "fox.npy"
        proc, seconds = run([tool("pid-run"), str(export_dir), str(latents), "--prompt", "a red cat",
                             "--caption-model", str(encoder), "--out", str(out)], env, tmp_path)
    finally:
        server.close()
    assert proc.returncode == 0, proc.stderr
    assert "Retrying" not in proc.stderr
    assert np.isfinite(np.load(out)).all()


def test_caption_model_needs_prompt_and_a_missing_directory_is_named(tmp_path, export_dir, latents):
    env = hub_env(tmp_path, "http://127.0.0.1:9")
    proc, _ = run([tool("pid-run"), str(export_dir), str(latents), "--caption-model", "./nowhere"], env, tmp_path)
    assert proc.returncode == 1 and "add --prompt" in proc.stderr
    proc, _ = run([tool("pid-run"), str(export_dir), str(latents), "--prompt", "x", "--caption-model", "./nowhere"],
                  env, tmp_path)
    assert proc.returncode == 1 and "./nowhere does not exist" in proc.stderr


# ---------------------------------------------------------------------------
# examples/


@pytest.mark.parametrize("example", ["flux", "flux2", "sd3"])
def test_example_help_and_offline_run_are_one_line(example, tmp_path, export_dir):
    script = str(REPO / "examples" / f"{example}.py")
    env = hub_env(tmp_path, "http://127.0.0.1:9")  # a closed loopback port: the hub is unreachable
    proc, _ = run([sys.executable, script, "--help"], env, tmp_path)
    assert proc.returncode == 0 and "--device" in proc.stdout and "CUDA GPU" in proc.stdout
    assert "pid-export[diffusers,caption]" in " ".join(proc.stdout.split())
    for args, expected in ((["--pid", str(tmp_path / "missing")], "does not exist"),
                           (["--pid", str(export_dir), "--device", "cpu"], "unreachable")):
        proc, seconds = run([sys.executable, script, "a fox", *args], env, tmp_path)
        assert proc.returncode == 1
        assert proc.stdout == "" and len(proc.stderr.splitlines()) == 1, proc.stderr
        assert proc.stderr.startswith(f"{example}.py: error: ") and expected in proc.stderr
        assert "Traceback" not in proc.stderr and seconds < FAST_S


# ---------------------------------------------------------------------------
# Small CLI items


def test_h_is_help_everywhere_and_embed_help_cites_nothing_missing(tmp_path):
    env = hub_env(tmp_path, "http://127.0.0.1:9")
    for args in (["pid-export", "-h"], ["pid-run", "-h"], ["pid-run", "embed", "-h"]):
        proc, _ = run([tool(args[0]), *args[1:]], env, tmp_path)
        assert proc.returncode == 0 and proc.stdout.startswith("Usage:"), (args, proc.stderr)
        assert "SPEC sec" not in proc.stdout  # SPEC.md is not part of the repository
    proc, _ = run([tool("pid-run"), "-h"], env, tmp_path)
    assert "--caption-model" in proc.stdout


def test_backbone_without_variant_lists_its_variants(tmp_path):
    from pid_export.releases import variants_of

    proc, _ = run([tool("pid-export"), "--backbone", "sd3"], hub_env(tmp_path, "http://127.0.0.1:9"), tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1
    assert f"its releases are {', '.join(variants_of('sd3'))}" in proc.stderr
    assert set(variants_of("sd3")) == {"2k", "2kto4k"}  # the registry, as README's release table says


def test_readme_installs_cpu_torch_from_pytorchs_index_and_ci_runs_readmes_line():
    cpu_torch = "pip install --retries 1 torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
    setup = [line.strip() for line in README.splitlines() if line.strip().startswith("pip install")]
    assert len(setup) >= 2 and all(line.startswith(cpu_torch + " && ") for line in setup[:2]), setup[:2]
    ci = (REPO / ".ci" / "run").read_text()
    test_line = next(line for line in setup if "pytest" in line)
    assert test_line in ci.splitlines(), "the CI script must run README's test command verbatim"


# ---------------------------------------------------------------------------
# The demo leads somewhere: README's first command, then README's pid-run line, as typed


def readme_command(prefix: str) -> str:
    """The README line that starts with `prefix` (after indentation and an optional `$ `)."""
    for line in README.splitlines():
        text = line.strip().removeprefix("$ ")
        if text.startswith(prefix):
            return text.split("  #")[0].strip()
    raise AssertionError(f"README has no line starting with {prefix!r}")


@pytest.mark.heavy
def test_demo_then_readmes_pid_run_line_writes_the_demos_image(tmp_path):
    env = hub_env(tmp_path, "http://127.0.0.1:9")
    first = readme_command("pip install")
    assert first.endswith("&& pid-export --demo"), first  # README's first command ends with the demo
    proc, seconds = run([tool("pid-export"), "--demo"], env, tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "random caption" in out and "not in the local Hugging Face cache" in out
    assert ("engine step will be skipped" in out) or ("engine.plan" in out)
    assert "export ready: engines/demo-builtin-fp32" in out
    # The ONNX step says what tracing is and how long it takes, and splits its total by phase.
    assert "torch.onnx records every operation" in out
    assert re.search(r"^    tracing [\d.]+ s, folding constants [\d.]+ s, checking [\d.]+ s$", out, re.M), out
    printed = re.search(r"^next: (pid-run .*?)\s+#", out, re.M)
    assert printed, out
    readme_line = readme_command("pid-run engines/demo-builtin-fp32")
    assert readme_line == printed.group(1), (readme_line, printed.group(1))

    args = shlex.split(readme_line)
    proc2, _ = run([tool(args[0]), *args[1:]], env, tmp_path)
    assert proc2.returncode == 0, proc2.stderr
    export = tmp_path / "engines" / "demo-builtin-fp32"
    written = export / "demo_latents.png"
    assert f"wrote {written.relative_to(tmp_path)}" in proc2.stdout
    demo = np.asarray(Image.open(export / "demo.png"))
    again = np.asarray(Image.open(written))
    assert demo.shape == again.shape == (256, 384, 3)
    assert np.array_equal(demo, again), f"max difference {np.abs(demo.astype(int) - again).max()}"
    assert demo.std() > 0  # an image, not a blank


# ---------------------------------------------------------------------------
# benchmarks --quick: what the console says


def test_quick_benchmark_console_says_identical_splits_wall_time_and_reports_load(tmp_path):
    out = tmp_path / "quick.json"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.latency", "--quick", "--repeat", "2", "--warmup", "0",
                           "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    document = json.loads(out.read_text())
    records = {r["backend"]: r for r in document["records"]}
    console = proc.stdout
    assert "psnr_db=None" not in console
    if records["torch-eager"]["max_abs_err"] == 0:  # the reference row: bit-equal to the reference decode
        assert re.search(r"^torch-eager .* psnr_db=identical$", console, re.M), console
    wall = re.search(r"^wall time ([\d.]+) s: ([\d.]+) s exporting ONNX, ([\d.]+) s decoding", console, re.M)
    assert wall, console
    assert float(wall.group(2)) == pytest.approx(records["onnxruntime"]["export_s"], abs=0.1)
    assert float(wall.group(2)) + float(wall.group(3)) == pytest.approx(float(wall.group(1)), abs=0.2)
    load = document["machine_load"]
    assert len(load["load_average_end"]) == 3 and load["cpus"] == os.cpu_count()
    assert f"{load['load_average_end'][0]:.2f} (1 min) on {os.cpu_count()} CPUs" in console
    assert "Machine during the run: load average" in out.with_suffix(".md").read_text()
