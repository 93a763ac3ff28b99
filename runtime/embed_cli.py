"""`pid-run embed TEXT... --out F`: caption embeddings for later `--caption-embeds` use."""

from __future__ import annotations

import click

from .caption import CAPTION_MODEL_ENV, DEFAULT_MODEL, CaptionError, embed_to_file
from .io import InputError


@click.command(name="embed", help="Encode prompts (Gemma-2-2b-it's last hidden state for the PiD instruction "
                                  "prefix + prompt, 300 token positions) into a caption embedding file "
                                  "[B,300,2304] float32 for pid-run --caption-embeds.",
               context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("prompts", nargs=-1, required=True, metavar="TEXT...")
@click.option("--out", "-o", required=True, metavar="FILE", help=".npy, .npz or .safetensors (array 'y').")
@click.option("--caption-model", default=None, metavar="ID|DIR",
              help=f"Hub id, local model dir or exported encoder dir (default ${CAPTION_MODEL_ENV}, "
                   f"else {DEFAULT_MODEL}).")
@click.option("--device", default=None, metavar="cpu|cuda|cuda:N")
def embed_command(prompts, out, caption_model, device):
    try:
        path = embed_to_file(prompts, out, caption_model=caption_model, device=device)
    except CaptionError as exc:
        raise InputError(str(exc)) from None
    click.echo(f"wrote {path} ({len(prompts)} caption(s))")
