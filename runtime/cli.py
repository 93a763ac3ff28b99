"""`pid-run`: decode LDM latents to images with an exported PiD decoder.

Every user-fixable problem ends as one line on stderr (`pid-run: error: ...`),
exit status 1 (2 for command-line usage), and no output file.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

import click
import torch

from .backends import BackendError, open_backend, preflight
from .decode import DecodeError, decode, format_timings
from .io import InputError, check_output_path, load_caption, load_latents, load_noise, write_output
from .metadata import EMPTY_CAPTION_NAME, MetadataError
from .sampler import MAX_STEPS, timesteps

PROG = "pid-run"
USER_ERRORS = (BackendError, DecodeError, InputError, MetadataError)
DEBUG_ENV = "PID_RUN_DEBUG"  # set to 1 to see the traceback of an unexpected error


def parse_sigma(text: str) -> list[float]:
    """`0.2` (every item) or `0,0.35` (one per item)."""
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a number or a comma-separated list of numbers",
                                 param_hint="'--sigma'") from None


def caption_for(model_file: Path, batch: int, prompts: Sequence[str], device: torch.device, say) -> torch.Tensor:
    """Caption embeddings when no --caption-embeds file was given: prompts, else the export's empty caption."""
    from .caption import CaptionError, resolve_caption

    try:
        return resolve_caption(batch, model_file, list(prompts), device=device, notify=say)
    except CaptionError as exc:
        raise InputError(str(exc)) from None


HELP = f"""Decode LDM latents with an exported PiD decoder (4-step pixel diffusion).

\b
MODEL    a TensorRT engine (.plan/.engine), an ONNX model (.onnx; ONNX Runtime,
         CUDA provider when onnxruntime-gpu and a GPU are present), or an export
         directory (its engine.plan if present, else its model.onnx). The export's
         pid_export.json must sit beside the model file.
LATENTS  .npy, .npz or .safetensors, [B,C,h,w] or [C,h,w], float16/float32: the
         LDM's normalised latent (diffusers output_type="latent", unpacked).
         The output is (h x s) by (w x s) pixels, s = latent down factor x SR factor.

\b
Output (--out): NAME.npy holds float32 [B,3,H,W] in [-1,1] (the clamped sample);
NAME.png holds image = (x+1)/2, 8 bits per channel (--bit-depth 16 for 16-bit PNG);
with B > 1 the PNGs are NAME_0.png, NAME_1.png, ... Files appear only when the
decode succeeded.

\b
Noise: --seed S draws the initial noise and then one eps per re-noise step from one
torch.Generator on the run device, for the whole batch at once (the reference
order, so a decode with seed S matches the reference PyTorch decode with seed S).
--batch-size N then decodes N items at a time from slices of that same noise:
results do not depend on N. --noise F.safetensors gives the noise explicitly
('noise' [B,3,H,W], 'eps' [steps-1,B,3,H,W]) for exact reproducibility across
backends.

\b
Also: `{PROG} embed TEXT --out F` writes caption embeddings (where this
installation provides the caption encoder). Set {DEBUG_ENV}=1 to see tracebacks
of unexpected errors.
"""


@click.command(name=PROG, help=HELP, context_settings={"help_option_names": ["-h", "--help"],
                                                      "max_content_width": 100})
@click.argument("model", metavar="MODEL")
@click.argument("latents", metavar="LATENTS")
@click.option("--out", "-o", "out", required=True, metavar="PATH",
              help="Output file: .png (8/16-bit, one per batch item when B > 1) or .npy (float32 [B,3,H,W]).")
@click.option("--caption-embeds", metavar="FILE",
              help="Caption embeddings [B or 1, tokens<=300, dim] (.npy/.npz/.safetensors). Default: --prompt, "
                   f"else the export's {EMPTY_CAPTION_NAME} (unconditional).")
@click.option("--prompt", "prompts", multiple=True, metavar="TEXT",
              help="Encode a caption with Gemma-2 instead of --caption-embeds (repeat for one per item; "
                   "needs pip install 'pid-export[caption]').")
@click.option("--sigma", default="0", show_default=True, metavar="S|S1,S2,..",
              help="degrade_sigma of the latents in [0,1]: 0 for a final clean latent; one value or one per item.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampler noise.")
@click.option("--steps", type=click.IntRange(1, MAX_STEPS), default=MAX_STEPS, show_default=True,
              help="Network calls (1..4; fewer = faster, rougher).")
@click.option("--noise", "noise_file", metavar="FILE",
              help="Fixed noise (.safetensors with 'noise' [B,3,H,W] and 'eps' [steps-1,B,3,H,W]) instead of --seed.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Decode at most N items at a time (same results as one batch; less memory).")
@click.option("--bit-depth", type=click.Choice(["8", "16"]), default="8", show_default=True,
              help="Bits per channel of .png output.")
@click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda|cuda:N",
              help="Where the decode runs (auto: CUDA when available).")
@click.option("--cuda-graph", is_flag=True, help="TensorRT only: capture the whole step loop as one CUDA graph "
                                                 "(TensorRT-RTX: its own capture of each engine launch).")
@click.option("--trt", type=click.Choice(["auto", "tensorrt", "rtx"]), default=None,
              help="TensorRT library for an engine (default: $PID_TRT, else the one that built it).")
def run_command(model: str, latents: str, out: str, caption_embeds: str | None, prompts: tuple[str, ...],
                sigma: str, seed: int, steps: int, noise_file: str | None, batch_size: int | None, bit_depth: str,
                device: str, cuda_graph: bool, trt: str | None) -> None:
    def say(message: str) -> None:
        click.echo(message)

    if caption_embeds and prompts:
        raise InputError("give either --caption-embeds or --prompt, not both")
    sigmas = parse_sigma(sigma)
    # Cheap checks first, so a typo costs no model load.
    out_path = check_output_path(out, int(bit_depth))
    model_file = preflight(model, trt, note=say)
    lq = load_latents(latents)
    caption = load_caption(caption_embeds) if caption_embeds else None
    noise = load_noise(noise_file) if noise_file else None

    backend = open_backend(model_file, device=device, cuda_graph=cuda_graph, trt=trt, log=say)
    try:
        meta = backend.meta
        say(f"model {model_file} ({backend.name} on {backend.device}; "
            f"{meta.release or 'custom network'}, {meta.precision})")
        if caption is None:
            caption = caption_for(model_file, lq.shape[0], prompts, backend.device, say)
        height, width = lq.shape[-2] * meta.pixel_scale, lq.shape[-1] * meta.pixel_scale
        source = f"noise from {noise_file}" if noise is not None else f"seed {seed}"
        say(f"decoding {lq.shape[0]} x {height}x{width} px, {steps} step(s), {source}")
        ts = timesteps(steps)

        def on_step(chunk: int, step: int, t: float, seconds: float) -> None:
            prefix = f"chunk {chunk + 1} " if batch_size is not None and batch_size < lq.shape[0] else ""
            say(f"  {prefix}step {step + 1}/{steps} (t={ts[step]:g}): {seconds * 1e3:.1f} ms")

        result = decode(backend, lq, caption, sigmas, seed=seed, steps=steps, noise=noise,
                        batch_size=batch_size, on_step=on_step)
    finally:
        backend.close()
    say(format_timings(result.timings))
    written = write_output(result.images, out_path, int(bit_depth))
    say("wrote " + ", ".join(str(p) for p in written))


def error(message: str) -> None:
    """The one line a failed run prints."""
    click.echo(f"{PROG}: error: {' '.join(message.split())}", err=True)


def invoke(command: click.Command, args: Sequence[str], prog: str = PROG) -> int:
    """Run a click command; every failure becomes one stderr line and an exit status."""
    try:
        command.main(args=list(args), prog_name=prog, standalone_mode=False)
        return 0
    except click.exceptions.Exit as exc:  # --help
        return exc.exit_code
    except click.UsageError as exc:  # unknown option, bad value, missing argument
        error(f"{exc.format_message()} (see {prog} --help)")
        return exc.exit_code
    except click.ClickException as exc:
        error(exc.format_message())
        return exc.exit_code
    except click.exceptions.Abort:
        error("aborted")
        return 130
    except KeyboardInterrupt:
        error("interrupted")
        return 130
    except USER_ERRORS as exc:
        error(str(exc))
        return 1
    except OSError as exc:  # e.g. disk full or permission denied while writing
        error(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))
        return 1
    except Exception as exc:
        if os.environ.get(DEBUG_ENV):
            raise
        error(f"unexpected {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''} "
              f"(set {DEBUG_ENV}=1 for the traceback)")
        return 1


def embed_main(args: Sequence[str]) -> int:
    """`pid-run embed ...` (the caption encoder's CLI; transformers is imported only when it runs)."""
    from .embed_cli import embed_command

    return invoke(embed_command, args, prog=f"{PROG} embed")


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point of `pid-run`: `pid-run embed ...` or `pid-run MODEL LATENTS ...`."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["embed"]:
        return embed_main(args[1:])
    return invoke(run_command, args)


if __name__ == "__main__":
    sys.exit(main())
