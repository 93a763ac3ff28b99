r"""Stable Diffusion 3 with PiD as its decoder: prompt -> latent -> 4x super-resolved image.

    pid-export --backbone sd3 --variant 2kto4k      # once; prints the export directory
    python examples/sd3.py "a lighthouse at dusk, oil painting" \
        --pid engines/PiD_res2kto4k_sr4x_official_sd3_distill_4step-bf16

Needs pip install 'pid-export[diffusers,caption]' and access to the SD3 weights on the hub.
SD3 returns its latent unpacked, [B,16,H/8,W/8], already in the space PiD was trained on.
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
                   **pipe_kwargs).images  # [B, 16, H/8, W/8]
    images = decoder.decode(latents, prompt=None if caption_embeds is not None else prompt,
                            caption_embeds=caption_embeds, backbone="sd3", seed=seed)
    images[0].save(out)
    return latents, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt")
    parser.add_argument("--pid", required=True, help="PiD export directory, engine or .onnx (sd3 release)")
    parser.add_argument("--model", default="stabilityai/stable-diffusion-3-medium-diffusers")
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="sd3_pid.png")
    args = parser.parse_args()

    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(args.model, torch_dtype=torch.float16).to("cuda")
    with PidDecoder.from_export(args.pid, device="cuda") as decoder:
        generate(pipe, decoder, args.out, prompt=args.prompt, height=args.height, width=args.width, seed=args.seed)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
