"""FLUX.1 (or Z-Image) with PiD as its decoder: prompt -> latent -> 4x super-resolved image.

    pid-export --backbone flux --variant 2kto4k     # once; prints the export directory
    python examples/flux.py "a red fox in fresh snow" --pid engines/PiD_res2kto4k_sr4x_official_flux_distill_4step-bf16

1024x1024 in, 4096x4096 out. Needs pip install 'pid-export[diffusers,caption]' and access to
the pipeline's weights on the Hugging Face hub. Z-Image works too (--model Tongyi-MAI/Z-Image-Turbo
--steps 9 --guidance 0): its latents are unpacked [B,16,H/8,W/8], the same latent space.
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
    args = parser.parse_args()

    from diffusers import DiffusionPipeline  # FluxPipeline or ZImagePipeline, from the model's files

    pipe = DiffusionPipeline.from_pretrained(args.model, torch_dtype=torch.bfloat16).to("cuda")
    with PidDecoder.from_export(args.pid, device="cuda") as decoder:
        generate(pipe, decoder, args.out, prompt=args.prompt, height=args.height, width=args.width, seed=args.seed,
                 num_inference_steps=args.steps, guidance_scale=args.guidance)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
