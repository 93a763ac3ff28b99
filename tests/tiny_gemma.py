"""A seeded tiny Gemma-2 and an offline-built tokenizer, saved like the hub caption model.

Real weights and the real tokenizer cannot be downloaded here, so tests save a 2-layer
Gemma-2 (as a Gemma2ForCausalLM checkpoint, like the hub model) and a word-level
tokenizer that adds BOS like Gemma's to a directory, and the encoder loads that
directory (or a fake hub serving it) the way it loads the real model.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from pid_runtime.caption import prompt_prefix

WORD_PATTERN = r"\w+|[^\w\s]+"  # what the `Whitespace` pre-tokenizer splits on
CAPTIONS = ["a red cat on a mat", "", "a cat"]
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]  # Gemma's ids: pad 0, eos 1, bos 2, unk 3
PAD_ID, BOS_ID = 0, 2
HIDDEN = 40  # the golden networks' text dim, so the tiny encoder can drive them


def build_tokenizer(words: list[str]):
    import tokenizers
    import transformers

    vocab = {token: index for index, token in enumerate(SPECIALS + sorted(set(words)))}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.post_processor = tokenizers.processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", BOS_ID)]
    )
    # Left padding like Gemma's tokenizer config, so the encoder must switch it to right.
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
    )


def save_tiny_gemma(directory: Path):
    """(tokenizer, Gemma2ForCausalLM) of a seeded tiny Gemma-2, saved into `directory`."""
    import transformers

    words = re.findall(WORD_PATTERN, prompt_prefix() + " " + " ".join(CAPTIONS) + " dog")
    tokenizer = build_tokenizer(words)
    config = transformers.Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=1024,
        pad_token_id=PAD_ID,
        eos_token_id=1,
        bos_token_id=BOS_ID,
    )
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(config).eval()
    with torch.no_grad():  # the norm weights start at zero; make every path carry a random value
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return tokenizer, model


def direct_embeddings(tokenizer, model, captions: list[str]) -> torch.Tensor:
    """Captions through transformers directly: right-padded to n_prefix + 298, positions [0] + last 299."""
    n_prefix = 1 + len(re.findall(WORD_PATTERN, prompt_prefix()))  # BOS + one token per word
    batch = tokenizer(
        [prompt_prefix() + caption for caption in captions],
        max_length=n_prefix + 298,
        padding="max_length",
        padding_side="right",
        truncation=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return torch.cat([hidden[:, :1], hidden[:, -299:]], dim=1)
