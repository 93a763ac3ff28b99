r"""FLUX.2 (dev or Klein) with PiD as its decoder: prompt -> latent -> 4x super-resolved image.

    pid-export --backbone flux2 --variant 2kto4k-v1.5   # once; prints the export directory
    python examples/flux2.py "a paper boat on a puddle" \
        --pid engines/PiD_v1pt5_res2kto4k_sr4x_official_flux2_distill_4step-bf16

Flux2Pipeline returns packed normalised tokens [B,(H/16)*(W/16),128]; Flux2KleinPipeline the
raw VAE latent [B,32,H/8,W/8], which PiD takes only after the VAE's batch norm, so the
decoder is given the VAE (bn_stats=pipe.vae) to re-normalise it.

Needs: a CUDA GPU (--device, default cuda; a 4K decode on a CPU takes very long), the pipeline's
weights (black-forest-labs/FLUX.2-klein-4B or FLUX.2-dev) and PiD's Gemma-2 caption encoder
(Efficient-Large-Model/gemma-2-2b-it, or a local copy in $PID_CAPTION_MODEL) from the Hugging Face
hub or its cache, and pip install 'pid-export[diffusers,caption]'. Anything missing is said in one
line before loading.
"""

from __future__ import annotations

import argparse

import torch

from pid_runtime import PidDecoder


def generate(pipe, decoder: PidDecoder, out: str, *, prompt: str | None = None, height: int = 1024,
             width: int = 1024, seed: int = 0, caption_embeds=None, **pipe_kwargs):
    """Run the pipeline to its latent, decode that with PiD and save the first image; returns (latents, images)."""
    generator = torch.Generator("cpu").manual_seed(seed)
    latents = pipe(prompt=prompt, height=height, width=width, generator=generator, output_type="latent",
                   **pipe_kwargs).images
    images = decoder.decode(latents, prompt=None if caption_embeds is not None else prompt,
                            caption_embeds=caption_embeds, backbone="flux2", height=height, width=width,
                            bn_stats=pipe.vae, seed=seed)
    images[0].save(out)
    return latents, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt")
    parser.add_argument("--pid", required=True, help="PiD export directory, engine or .onnx (flux2 release)")
    parser.add_argument("--model", default="black-forest-labs/FLUX.2-klein-4B", help="or black-forest-labs/FLUX.2-dev")
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=4, help="4 for Klein, ~50 for dev")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="flux2_pid.png")
    parser.add_argument("--device", default="cuda", help="where the pipeline and PiD run: cuda, cuda:N or cpu")
    args = parser.parse_args()
    from _support import preflight, run_reporting_errors  # examples/_support.py (beside this script)

    preflight("flux2.py", args.pid, args.device, args.model)

    def body() -> None:
        from diffusers import DiffusionPipeline  # Flux2KleinPipeline or Flux2Pipeline, from the model's files

        pipe = DiffusionPipeline.from_pretrained(args.model, torch_dtype=torch.bfloat16).to(args.device)
        with PidDecoder.from_export(args.pid, device=args.device) as decoder:
            generate(pipe, decoder, args.out, prompt=args.prompt, height=args.height, width=args.width,
                     seed=args.seed, num_inference_steps=args.steps)
        print(f"wrote {args.out}")

    run_reporting_errors("flux2.py", body)


if __name__ == "__main__":
    main()
