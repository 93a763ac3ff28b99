"""Caption encoder at export time: the unconditional embedding, and the encoder itself -> ONNX.

`store_empty_caption` writes empty_caption.npy into an export directory when an encoder
can be loaded (pid-run then decodes without a caption). `export_caption_encoder` writes
the encoder as ONNX, so a deployment can make caption embeddings without PyTorch models.

The graph takes input_ids / attention_mask [B, max_length] int64 (fixed token length,
dynamic batch) and returns the selected hidden states [B, 300, hidden] float32, i.e.
everything of the caption conditioning after tokenisation. Tokenisation travels as the tokenizer's
own `tokenizers` pipeline (caption_tokenizer.json) plus caption_encoder.json (prefix,
lengths, pad token); `pid_runtime.caption.OnnxCaptionEncoder` loads the directory.
Files are staged in a temporary directory and moved in with the settings file last,
so a directory with caption_encoder.json holds a complete export.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from pid_runtime.caption import (
    hub_offline,
    ONNX_ENCODER_METADATA,
    ONNX_ENCODER_NAME,
    ONNX_TOKENIZER_NAME,
    CaptionEncoder,
    CaptionError,
    OnnxCaptionEncoder,
    default_caption_model,
    load_encoder,
    save_empty_caption,
    selected_positions,
    why_caption_model_unavailable,
)
from pid_runtime.errors import first_line

OPSET = 20
MAX_BATCH = 256
# Prompts the export checks the standalone tokenizer pipeline on (it must give transformers' ids).
CHECK_PROMPTS = ("", "a red cat on a mat", " ".join(["word"] * 400))


def store_empty_caption(
    export_dir: str | os.PathLike[str],
    caption_model: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = None,
    encoder: CaptionEncoder | OnnxCaptionEncoder | None = None,
    download: bool = False,
    notify: Callable[[str], None] = lambda message: None,
    txt_embed_dim: int | None = None,
) -> Path | None:
    """empty_caption.npy in `export_dir`, or None (said through `notify` in one line) when no encoder is available.

    The encoder is a local directory, an exported encoder, or a hub model in the Hugging Face
    cache; with `download` (and HF_HUB_OFFLINE unset) a hub model that is not cached is
    fetched into the cache first (its size announced, progress shown). `txt_embed_dim`,
    when given, is the network's caption width: an encoder of another width stores nothing
    (checked on the model's config before any large download).
    """
    model = str(caption_model or default_caption_model())
    try:
        if encoder is None:
            # Not cached and no hub (one quick probe): said now, before transformers is even imported,
            # instead of after minutes of huggingface_hub's retries.
            unavailable = why_caption_model_unavailable(model)
            if unavailable is not None:
                raise CaptionError(unavailable)
            try:
                encoder = load_encoder(model, device=device, local_files_only=True)
            except CaptionError:
                if not download or hub_offline() or Path(model).expanduser().exists():
                    raise
                fetch_caption_model(model, txt_embed_dim, notify)
                encoder = load_encoder(model, device=device, local_files_only=True)
        if txt_embed_dim is not None and encoder.hidden_size != txt_embed_dim:
            raise CaptionError(f"{model} gives {encoder.hidden_size}-d embeddings, the network takes "
                               f"{txt_embed_dim}-d")
        path = save_empty_caption(encoder, export_dir)
    except CaptionError as exc:
        notify(f"no unconditional caption stored: {exc}; pid-run will need --caption-embeds FILE or "
               f"--prompt TEXT (or re-export once the caption model is available)")
        return None
    notify(f"stored the unconditional caption embedding {path}")
    return path


# What a transformers Gemma-2 checkpoint needs (the hub repo may also hold .bin / .gguf copies).
CAPTION_MODEL_FILES = ("*.json", "*.safetensors", "tokenizer.model")


def fetch_caption_model(model: str, txt_embed_dim: int | None = None,
                        notify: Callable[[str], None] = lambda message: None) -> None:
    """Download hub model `model` into the Hugging Face cache; CaptionError (one line) on any failure.

    Says the download size first, then lets huggingface_hub show its progress bars. With
    `txt_embed_dim`, the model's config.json (a few KB) is fetched first and a model of
    another width is refused before the large files are.
    """
    import fnmatch

    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    try:
        info = HfApi().model_info(model, files_metadata=True)
        wanted = [s for s in info.siblings or []
                  if any(fnmatch.fnmatch(s.rfilename, pattern) for pattern in CAPTION_MODEL_FILES)]
        if txt_embed_dim is not None:
            config = json.loads(Path(hf_hub_download(model, "config.json")).read_text())
            width = config.get("hidden_size")
            if width != txt_embed_dim:
                raise CaptionError(f"{model} gives {width}-d embeddings, the network takes {txt_embed_dim}-d "
                                   "(nothing downloaded)")
        size = sum(s.size or 0 for s in wanted)
        notify(f"downloading the caption encoder {model} ({len(wanted)} files, {_size_text(size)}) "
               "into the Hugging Face cache")
        snapshot_download(model, allow_patterns=list(CAPTION_MODEL_FILES))  # "main", as from_pretrained reads
    except CaptionError:
        raise
    except Exception as exc:  # huggingface_hub / httpx raise many types (offline, 401, 404, disk full)
        raise CaptionError(f"could not download the caption encoder {model}: {first_line(exc).rstrip('.')}") from None


def _size_text(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"


class SelectedHiddenStates(torch.nn.Module):
    """Decoder stack + the caption position selection (first + last 299), float32 out."""

    def __init__(self, decoder: torch.nn.Module, max_length: int):
        super().__init__()
        self.decoder = decoder
        self.register_buffer("keep", torch.tensor(selected_positions(max_length)), persistent=False)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return hidden.index_select(1, self.keep).float()


def standalone_tokenizer(encoder: CaptionEncoder):
    """The transformers tokenizer's `tokenizers` pipeline, without padding or truncation settings."""
    tokenizer = encoder.tokenizer.backend_tokenizer
    copy = type(tokenizer).from_str(tokenizer.to_str())
    copy.no_padding()
    copy.no_truncation()
    return copy


def check_tokenizer_matches(encoder: CaptionEncoder, tokenizer, pad_id: int) -> None:
    """Refuse to export when the standalone pipeline tokenises differently from transformers."""
    tokenizer.enable_padding(direction="right", pad_id=pad_id, length=encoder.max_length)
    tokenizer.enable_truncation(encoder.max_length, direction="right")
    expected = encoder.tokenize(list(CHECK_PROMPTS))["input_ids"].tolist()
    got = [e.ids for e in tokenizer.encode_batch([encoder.prefix + p for p in CHECK_PROMPTS])]
    tokenizer.no_padding()
    tokenizer.no_truncation()
    if got != expected:
        raise CaptionError("the tokenizer cannot be exported: its standalone pipeline gives different token ids")


def export_caption_encoder(encoder: CaptionEncoder, out_dir: str | os.PathLike[str], opset: int = OPSET) -> Path:
    """Write caption_encoder.onnx (+ .data when large), caption_tokenizer.json, caption_encoder.json."""
    if encoder.model.dtype != torch.float32:
        raise CaptionError("export the caption encoder from a float32 model (CaptionEncoder.load(..., dtype=torch.float32))")
    pad_id, pad_token = encoder.tokenizer.pad_token_id, encoder.tokenizer.pad_token
    tokenizer = standalone_tokenizer(encoder)
    check_tokenizer_matches(encoder, tokenizer, pad_id)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    module = SelectedHiddenStates(encoder.model, encoder.max_length).eval()
    sample = encoder.tokenize(["a red cat", ""])  # batch 2: torch.export would specialise a batch of 1
    sample = {name: value.to(encoder.device) for name, value in sample.items()}
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    settings = {
        "prefix": encoder.prefix,
        "n_prefix_tokens": encoder.n_prefix_tokens,
        "max_length": encoder.max_length,
        "hidden_size": encoder.hidden_size,
        "pad_id": pad_id,
        "pad_token": pad_token,
        "opset": opset,
        "source_model": str(encoder.model.config.name_or_path),
        "inputs": {"input_ids": ["batch", encoder.max_length], "attention_mask": ["batch", encoder.max_length]},
        "outputs": {"y": ["batch", 300, encoder.hidden_size]},
    }
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".caption_export-") as staging_name:
        staging = Path(staging_name)
        with torch.no_grad():
            program = torch.onnx.export(
                module,
                (sample["input_ids"], sample["attention_mask"]),
                input_names=["input_ids", "attention_mask"],
                output_names=["y"],
                dynamic_shapes={"input_ids": {0: batch}, "attention_mask": {0: batch}},
                opset_version=opset,
                dynamo=True,
                verbose=False,
            )
        if program is None:  # only a dynamo=False export returns nothing
            raise CaptionError("the ONNX exporter returned no program")
        program.save(staging / ONNX_ENCODER_NAME)  # weights go to a .data file when over 2 GB
        tokenizer.save(str(staging / ONNX_TOKENIZER_NAME))
        (staging / ONNX_ENCODER_METADATA).write_text(json.dumps(settings, indent=1) + "\n")
        (out_dir / ONNX_ENCODER_METADATA).unlink(missing_ok=True)
        for path in sorted(staging.iterdir(), key=lambda p: p.name == ONNX_ENCODER_METADATA):
            shutil.move(str(path), out_dir / path.name)
    return out_dir
