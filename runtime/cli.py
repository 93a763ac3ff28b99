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

from .backends import BackendError, load_model_metadata, open_backend, preflight
from .decode import DecodeError, check_inputs, decode, format_timings, profile_batch_range
from .io import InputError, check_output_path, load_caption, load_latents, load_noise, write_output
from .latents import BACKBONE_NAMES, LatentError, pipeline_latents_for_cli
from .metadata import EMPTY_CAPTION_NAME, MetadataError
from .outputs import OutputClaim, claim_default_output, explicit_output
from .preflight import (LatentPlan, check_caption_header, check_latents_header, check_noise_header,
                        check_pipeline_latents_header, check_seed, export_size_range)
from .sampler import MAX_STEPS, timesteps
from .signals import Signalled, signals_as_exception
from .sizes import output_size, parse_hw
from .tiling import TileSetting, TilingError, canvas_size_range, parse_tile

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


def parse_size(text: str | None) -> tuple[int, int] | None:
    """`2160x3840` (height x width, pixels) -> (2160, 3840); None stays None."""
    if text is None:
        return None
    try:
        return parse_hw(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--size'") from None


def caption_for(model_file: Path, batch: int, prompts: Sequence[str], device: torch.device, say,
                caption_model: str | None = None) -> torch.Tensor:
    """Caption embeddings when no --caption-embeds file was given: prompts, else the export's empty caption."""
    from .caption import CaptionError, resolve_caption

    try:
        return resolve_caption(batch, model_file, list(prompts), caption_model=caption_model, device=device,
                               notify=say)
    except CaptionError as exc:
        raise InputError(str(exc)) from None


HELP = f"""Decode LDM latents with an exported PiD decoder (4-step pixel diffusion).

\b
MODEL    a TensorRT engine (.plan/.engine), an ONNX model (.onnx; ONNX Runtime,
         CUDA provider when onnxruntime-gpu and a GPU are present), or an export
         directory (its engine.plan if present and runnable here, else its
         model.onnx, with a note saying why). The export's pid_export.json must
         sit beside the model file.
LATENTS  .npy, .npz or .safetensors, [B,C,h,w] or [C,h,w], float16/float32: the
         LDM's normalised latent (diffusers output_type="latent", unpacked; with
         --pipeline BACKBONE as the pipeline returned it, packed or not).
         The output is (h x s) by (w x s) pixels, s = latent down factor x SR factor,
         unless --size asks for another size.

\b
Output: by default LATENTS' name with .png, beside it (latents.npy -> latents.png);
an existing file is never overwritten by the default: the first free name of
latents-2.png, latents-3.png, ... is used, and the path is printed. --out PATH
writes exactly there (replacing a file of that name): NAME.npy holds float32
[B,3,H,W] in [-1,1] (the clamped sample); NAME.png holds image = (x+1)/2, 8 bits
per channel (--bit-depth 16 for 16-bit PNG). With B > 1 the PNGs are NAME_0.png,
NAME_1.png, ... Files appear only when the decode succeeded: the default name is
claimed (an empty file) when the run starts, so concurrent runs never share one, and
a failed or interrupted run (Ctrl-C: exit 130, SIGTERM: 143) removes it and its temp files.

\b
Noise: --seed S draws the initial noise and then one eps per re-noise step from one
torch.Generator on the run device, each for the whole batch (the reference order,
so a decode with seed S matches the reference PyTorch decode with seed S on the
same device). Each draw is made when the sampler needs it. --batch-size N (or an
engine whose profile takes fewer items) decodes N items at a time with their rows
of that same noise: results do not depend on N. The same seed gives the same
noise on the same kind of device, whatever the backend: CPU draws are the same
on every CPU, CUDA draws differ from CPU draws and between GPU models (torch
sizes its random kernels by the GPU's multiprocessor count). --noise
F.safetensors gives the noise explicitly ('noise' [B,3,H,W], 'eps'
[steps-1,B,3,H,W]) for the exact same decode across devices.

\b
Also: `{PROG} embed TEXT --out F` writes caption embeddings (where this
installation provides the caption encoder). Set {DEBUG_ENV}=1 to see tracebacks
of unexpected errors.
"""


@click.command(name=PROG, help=HELP, context_settings={"help_option_names": ["-h", "--help"],
                                                      "max_content_width": 100})
@click.argument("model", metavar="MODEL")
@click.argument("latents", metavar="LATENTS")
@click.option("--out", "-o", "out", metavar="PATH",
              help="Output file: .png (8/16-bit, one per batch item when B > 1) or .npy (float32 [B,3,H,W]). "
                   "Default: LATENTS' name with .png beside it, never overwriting a file (see above).")
@click.option("--caption-embeds", metavar="FILE",
              help="Caption embeddings [B or 1, tokens<=300, dim] (.npy/.npz/.safetensors). Default: --prompt, "
                   f"else the export's {EMPTY_CAPTION_NAME} (unconditional).")
@click.option("--prompt", "prompts", multiple=True, metavar="TEXT",
              help="Encode a caption with Gemma-2 instead of --caption-embeds (repeat for one per item; "
                   "needs pip install 'pid-export[caption]').")
@click.option("--caption-model", metavar="DIR|REPO", default=None,
              help="The Gemma-2 caption encoder --prompt uses: a local model directory, an exported encoder "
                   "directory or a hub id (default: $PID_CAPTION_MODEL, else Efficient-Large-Model/gemma-2-2b-it). "
                   "Offline, a hub id must be in the Hugging Face cache.")
@click.option("--sigma", default="0", show_default=True, metavar="S|S1,S2,..",
              help="degrade_sigma of the latents in [0,1]: 0 for a final clean latent; one value or one per item.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampler noise (64 bits).")
@click.option("--size", "size_text", metavar="HxW",
              help="Output size in pixels, height x width (e.g. 2160x3840): multiples of 16, with the latent's "
                   "aspect ratio to within 2 latent cells per side. Default: the latent's native size.")
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
@click.option("--cuda-graph", is_flag=True, help="TensorRT only: replay each step as a CUDA graph (same noise, "
              "same memory; TensorRT-RTX: its own capture of each engine launch).")
@click.option("--trt", type=click.Choice(["auto", "tensorrt", "rtx"]), default=None,
              help="TensorRT library for an engine (default: $PID_TRT, else the one that built it).")
@click.option("--pipeline", type=click.Choice(BACKBONE_NAMES, case_sensitive=False), default=None,
              help="LATENTS are a diffusers pipeline's output_type=\"latent\" output for this backbone (packed "
                   "Flux/Flux2/Qwen-Image tokens, Flux2-Klein's raw latent, ...): unpack them, and take --sigma "
                   "as the scheduler's sigma (SDXL's Euler sigma is mapped to PiD's frame).")
@click.option("--ldm-size", metavar="HxW", default=None,
              help="With --pipeline: the pipeline's image size in pixels (needed to unpack packed tokens).")
@click.option("--vae-bn-stats", metavar="FILE", default=None,
              help="With --pipeline flux2*: the FLUX.2 VAE's batch-norm statistics for raw 32-channel latents "
                   "(.safetensors with running_mean/running_var, e.g. the VAE's diffusion_pytorch_model.safetensors).")
@click.option("--tile", "tile_text", default="auto", show_default=True, metavar="auto|off|HxW[:OVERLAP]",
              help="Per-step tiling: the network runs on overlapping tiles at each step (sampler and noise stay "
                   "whole). auto: only when the size exceeds what the model takes or the memory estimate exceeds "
                   "the budget; off: never (a decode that would not fit is refused).")
@click.option("--max-memory", type=click.FloatRange(min=0, min_open=True), default=None, metavar="GB",
              help="Memory budget in GiB for the whole run (RAM on CPU, device memory on GPU). Default: what is free.")
def run_command(model: str, latents: str, out: str | None, caption_embeds: str | None, prompts: tuple[str, ...],
                caption_model: str | None, sigma: str, seed: int, size_text: str | None, steps: int, noise_file: str | None,
                batch_size: int | None, bit_depth: str,
                device: str, cuda_graph: bool, pipeline: str | None, ldm_size: str | None,
                vae_bn_stats: str | None, trt: str | None, tile_text: str = "auto",
                max_memory: float | None = None) -> None:
    def say(message: str) -> None:
        click.echo(message)

    # Every check that needs no model comes first, from cheapest to costliest, so a typo or a
    # file that cannot work costs no model load and no read of a large array.
    if caption_embeds and prompts:
        raise InputError("give either --caption-embeds or --prompt, not both")
    sigmas = parse_sigma(sigma)
    size = parse_size(size_text)
    check_seed(seed)
    try:
        tile = parse_tile(tile_text)
    except TilingError as exc:
        raise click.BadParameter(str(exc), param_hint="'--tile'") from None
    if pipeline is None and (ldm_size or vae_bn_stats):
        raise InputError("--ldm-size and --vae-bn-stats apply to pipeline latents: add --pipeline BACKBONE")
    out_path = check_output_path(out, int(bit_depth)) if out is not None else None
    model_file = preflight(model, trt, note=say, device=device)
    meta = load_model_metadata(model_file)
    if pipeline is None:
        plan = check_latents_header(meta, model_file, latents, size, tile)  # shape from the header: nothing read yet
        lq = None
    else:
        check_pipeline_latents_header(meta, latents)
        try:
            lq, sigmas = pipeline_latents_for_cli(latents, pipeline, model_file, ldm_size, vae_bn_stats, sigmas)
        except LatentError as exc:
            raise InputError(str(exc)) from None
        lat_h, lat_w = lq.shape[-2:]
        height, width = size or (lat_h * meta.pixel_scale, lat_w * meta.pixel_scale)
        plan = LatentPlan(lq.shape[0], (lat_h, lat_w), height, width)
    if caption_embeds:
        check_caption_header(meta, caption_embeds, plan.batch, say)
    if noise_file:
        check_noise_header(noise_file, plan.batch, plan.height, plan.width, steps)
    claim = (explicit_output(out_path, plan.batch) if out_path is not None
             else claim_default_output(Path(latents), plan.batch, int(bit_depth)))
    try:
        run_decode(model, model_file, meta, latents, lq, claim, caption_embeds, prompts, caption_model, sigmas, seed,
                   size, steps, noise_file, batch_size, int(bit_depth), device, cuda_graph, trt, tile, max_memory, say)
    finally:
        claim.release()  # a failed or interrupted run takes back the names it claimed (no-op after success)


def run_decode(model: str, model_file: Path, meta, latents: str, lq: torch.Tensor | None, claim: OutputClaim,
               caption_embeds: str | None, prompts: Sequence[str], caption_model: str | None, sigmas: list[float],
               seed: int, size: tuple[int, int] | None, steps: int, noise_file: str | None, batch_size: int | None,
               bit_depth: int, device: str, cuda_graph: bool, trt: str | None, tile: TileSetting,
               max_memory: float | None, say) -> None:
    """Read the inputs, check them in full, then open the model, decode and write."""
    if lq is None:
        lq = load_latents(latents)
    caption = load_caption(caption_embeds) if caption_embeds else None
    if caption_model and not prompts:
        raise InputError("--caption-model is the encoder of --prompt: add --prompt TEXT")
    if prompts:
        from .caption import default_caption_model, why_caption_model_unavailable

        unavailable = why_caption_model_unavailable(caption_model or default_caption_model())
        if unavailable is not None:  # said now, not after the model is opened and the hub retried for a minute
            raise InputError(unavailable)
    noise = load_noise(noise_file) if noise_file else None
    if caption is None and not prompts:  # the export's empty caption needs no model either
        caption = caption_for(model_file, lq.shape[0], (), torch.device("cpu"), say)
    # The whole of check_inputs before the model opens; a prompt's caption is encoded later, so a
    # one-token stand-in of the right width takes its place here.
    stand_in = caption if caption is not None else torch.zeros(1, 1, meta.txt_embed_dim)
    check_inputs(meta, lq, stand_in, sigmas, steps, *(noise or (None, None)),
                 size_range=canvas_size_range(export_size_range(meta, model_file), tile), size=size)

    backend = open_backend(model_file, device=device, cuda_graph=cuda_graph, trt=trt, log=say)
    try:
        meta = backend.meta
        say(f"model {model_file} ({backend.name} on {backend.device}; "
            f"{meta.release or 'custom network'}, {meta.precision})")
        if caption is None:
            caption = caption_for(model_file, lq.shape[0], prompts, backend.device, say, caption_model)
        height, width = output_size(meta, lq, size)
        native = output_size(meta, lq)
        resized = ("" if (height, width) == native
                   else f" (latent {lq.shape[-2]}x{lq.shape[-1]}, native {native[0]}x{native[1]})")
        source = f"noise from {noise_file}" if noise is not None else f"seed {seed}"
        say(f"decoding {lq.shape[0]} x {height}x{width} px{resized}, {steps} step(s), {source}")
        ts = timesteps(steps)

        profile = profile_batch_range(backend)  # an engine decodes at most its profile's max batch at a time
        chunk_size = min(batch_size or lq.shape[0], profile[1] if profile else lq.shape[0])

        def on_step(chunk: int, step: int, t: float, seconds: float) -> None:
            prefix = f"chunk {chunk + 1} " if chunk_size < lq.shape[0] else ""
            say(f"  {prefix}step {step + 1}/{steps} (t={ts[step]:g}): {seconds * 1e3:.1f} ms")
            steps_done[0] = (step + 1) % steps

        steps_done = [0]  # steps finished in the current chunk (for the tile lines)

        def on_tile(index: int, count: int) -> None:
            if count > 1:
                say(f"    step {steps_done[0] + 1}/{steps} tile {index + 1}/{count}")

        result = decode(backend, lq, caption, sigmas, seed=seed, steps=steps, noise=noise,
                        batch_size=batch_size, on_step=on_step, size=size, tile=tile, max_memory=max_memory,
                        on_tile=on_tile, on_plan=lambda plan: say(plan.describe()))
    finally:
        backend.close()
    say(format_timings(result.timings))
    written = write_output(result.images, claim.path, bit_depth)
    claim.written()
    say("wrote " + ", ".join(str(p) for p in written))


def error(message: str) -> None:
    """The one line a failed run prints."""
    click.echo(f"{PROG}: error: {' '.join(message.split())}", err=True)


def invoke(command: click.Command, args: Sequence[str], prog: str = PROG) -> int:
    """Run a click command; every failure becomes one stderr line and an exit status."""
    try:
        with signals_as_exception():  # SIGINT / SIGTERM unwind: temp files and placeholders go
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
    except Signalled as exc:
        error(exc.what)
        return exc.exit_code
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
