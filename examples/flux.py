"""FLUX.1 (or Z-Image) with PiD as its decoder: prompt -> latent -> 4x super-resolved image.

    pid-export --backbone flux --variant 2kto4k     # once; prints the export directory
    python examples/flux.py "a red fox in fresh snow" --pid engines/PiD_res2kto4k_sr4x_official_flux_distill_4step-bf16

1024x1024 in, 4096x4096 out. Z-Image works too (--model Tongyi-MAI/Z-Image-Turbo --steps 9
--guidance 0): its latents are unpacked [B,16,H/8,W/8], the same latent space.

Needs: a CUDA GPU (--device, default cuda; a 4K decode on a CPU takes very long), the pipeline's
weights (black-forest-labs/FLUX.1-dev, a gated repo: accept its licence and log in) and PiD's
Gemma-2 caption encoder (Efficient-Large-Model/gemma-2-2b-it, or a local copy in $PID_CAPTION_MODEL)
from the Hugging Face hub or its cache, and pip install 'pid-export[diffusers,caption]'. Anything
missing is said in one line before loading.
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
                   **pipe_kwargs).images  # FluxPipeline: packed tokens [B, (H/16)*(W/16), 64]
    # The decoder unpacks them (hence height/width) and encodes the prompt for PiD (Gemma-2),
    # unless caption embeddings are given.
    images = decoder.decode(latents, prompt=None if caption_embeds is not None else prompt,
                            caption_embeds=caption_embeds, backbone="flux", height=height, width=width, seed=seed)
    images[0].save(out)
    return latents, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt")
    parser.add_argument("--pid", required=True, help="PiD export directory, engine or .onnx (flux release)")
    parser.add_argument("--model", default="black-forest-labs/FLUX.1-dev")
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--guidance", type=float, default=3.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="flux_pid.png")
    parser.add_argument("--device", default="cuda", help="where the pipeline and PiD run: cuda, cuda:N or cpu")
    args = parser.parse_args()
    from _support import preflight, run_reporting_errors  # examples/_support.py (beside this script)

    preflight("flux.py", args.pid, args.device, args.model)

    def body() -> None:
        from diffusers import DiffusionPipeline  # FluxPipeline or ZImagePipeline, from the model's files

        pipe = DiffusionPipeline.from_pretrained(args.model, torch_dtype=torch.bfloat16).to(args.device)
        with PidDecoder.from_export(args.pid, device=args.device) as decoder:
            generate(pipe, decoder, args.out, prompt=args.prompt, height=args.height, width=args.width,
                     seed=args.seed, num_inference_steps=args.steps, guidance_scale=args.guidance)
        print(f"wrote {args.out}")

    run_reporting_errors("flux.py", body)


if __name__ == "__main__":
    main()
