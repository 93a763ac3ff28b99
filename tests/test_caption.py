"""Caption encoder (SPEC sec. 6) against a tiny random Gemma-2 and an offline-built tokenizer.

Real weights and the real tokenizer cannot be downloaded here, so the fixture saves a
seeded 2-layer Gemma-2 (as a Gemma2ForCausalLM checkpoint, like the hub model) and a
word-level tokenizer that adds BOS like Gemma's to a directory, and the encoder loads
that directory the way it loads a real model. Expected values come from transformers
called directly, with the tokenisation and selection rules written out here.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from exports import export_cases, export_root, golden_tensors  # noqa: F401 (fixtures)

from pid_runtime.caption import (
    CAPTION_LENGTH,
    CAPTION_MODEL_ENV,
    CaptionEncoder,
    CaptionError,
    OnnxCaptionEncoder,
    check_prompts,
    embed_to_file,
    find_empty_caption,
    load_encoder,
    prompt_prefix,
    resolve_caption,
    save_empty_caption,
    selected_positions,
    write_embeddings,
)
from pid_runtime.io import load_caption
from pid_runtime.metadata import EMPTY_CAPTION_NAME
from tiny_gemma import BOS_ID, CAPTIONS, HIDDEN, PAD_ID, WORD_PATTERN, save_tiny_gemma
from tiny_gemma import direct_embeddings as tiny_gemma_embeddings

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

GOLDEN_PREFIX = Path(__file__).resolve().parents[2] / "shared" / "golden" / "chi_prompt.txt"
CLI_CASE = "tiny_v1_16ch_sr4_b2"  # golden network with batch 2 and text dim 40 (= HIDDEN)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """(directory, tokenizer, Gemma2ForCausalLM) of a seeded tiny Gemma-2 saved like a hub model."""
    directory = tmp_path_factory.mktemp("tiny_gemma2")
    tokenizer, model = save_tiny_gemma(directory)
    return directory, tokenizer, model


@pytest.fixture(scope="module")
def encoder(tiny_model):
    return CaptionEncoder.load(tiny_model[0], device="cpu")


def expected_n_prefix() -> int:
    return 1 + len(re.findall(WORD_PATTERN, prompt_prefix()))  # BOS + one token per word


def test_prefix_is_the_spec_prefix():
    prefix = prompt_prefix()
    lines = prefix.split("\n")
    assert len(lines) == 8
    assert lines[0].startswith("Given a user prompt")
    assert prefix.endswith("User Prompt: ")
    if GOLDEN_PREFIX.is_file():
        assert prefix.encode("utf-8") == GOLDEN_PREFIX.read_bytes()


def test_prefix_token_count_and_max_length(encoder):
    assert encoder.n_prefix_tokens == expected_n_prefix()
    assert encoder.max_length == expected_n_prefix() + 300 - 2


def test_loads_decoder_stack_in_float32_on_cpu(encoder):
    assert type(encoder.model).__name__ == "Gemma2Model"  # not the LM head model
    assert encoder.model.dtype == torch.float32
    assert encoder.device.type == "cpu"
    assert encoder.hidden_size == HIDDEN


def test_tokenize_pads_on_the_right(encoder):
    tokens = encoder.tokenize(["a cat"])
    ids, mask = tokens["input_ids"][0], tokens["attention_mask"][0]
    real = expected_n_prefix() + 2
    assert ids.shape == (encoder.max_length,)
    assert ids[0] == BOS_ID
    assert mask[:real].tolist() == [1] * real
    assert mask[real:].sum() == 0
    assert (ids[real:] == PAD_ID).all()


def test_long_caption_is_truncated_at_the_end(encoder):
    caption = " ".join(["cat", "dog"] * 200)  # 400 words, room for 298
    tokens = encoder.tokenize([caption])
    assert tokens["input_ids"].shape == (1, encoder.max_length)
    assert tokens["attention_mask"].all()
    vocab = encoder.tokenizer.get_vocab()
    # The caption's first 298 words survive: word 298 (index 297) is "dog".
    assert tokens["input_ids"][0, -1] == vocab["dog"]
    assert tokens["input_ids"][0, expected_n_prefix()] == vocab["cat"]


def test_selected_positions_are_first_and_last_299():
    length = 500
    kept = torch.arange(length)[selected_positions(length)].tolist()
    assert len(kept) == CAPTION_LENGTH
    assert kept[0] == 0
    assert kept[1:] == list(range(length - 299, length))


@pytest.fixture(scope="module")
def direct_embeddings(tiny_model):
    _, tokenizer, model = tiny_model
    return tiny_gemma_embeddings(tokenizer, model, CAPTIONS)


def test_encode_matches_direct_transformers_call(encoder, direct_embeddings):
    embeddings = encoder.encode(CAPTIONS)
    assert embeddings.shape == (len(CAPTIONS), 300, HIDDEN)
    assert embeddings.dtype == torch.float32
    torch.testing.assert_close(embeddings, direct_embeddings, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(embeddings[0], embeddings[1])  # the caption matters


def test_repeated_prompts_give_identical_rows(encoder, direct_embeddings):
    embeddings = encoder.encode(["a cat", "a red cat on a mat", "a cat"])
    assert torch.equal(embeddings[0], embeddings[2])
    torch.testing.assert_close(embeddings[[0, 1]], direct_embeddings[[2, 0]], rtol=1e-5, atol=1e-6)


def test_bfloat16_encoder_still_returns_float32(tiny_model, direct_embeddings):
    bf16 = CaptionEncoder.load(tiny_model[0], device="cpu", dtype=torch.bfloat16)
    assert bf16.model.dtype == torch.bfloat16
    embeddings = bf16.encode(["a cat"])
    assert embeddings.dtype == torch.float32
    torch.testing.assert_close(embeddings[0], direct_embeddings[2], rtol=0.1, atol=0.1)


def test_encode_needs_a_prompt(encoder):
    with pytest.raises(CaptionError, match="no prompts"):
        encoder.encode([])


def test_missing_model_while_offline_is_a_caption_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CaptionError, match="not in the Hugging Face cache and HF_HUB_OFFLINE is set") as info:
        CaptionEncoder.load("pid-export-tests/no-such-model", device="cpu")
    assert "hf download pid-export-tests/no-such-model" in str(info.value)
    assert "--caption-model DIR" in str(info.value)  # the local-directory way out, by its flag


def test_directory_without_a_model_is_a_caption_error(tmp_path):
    with pytest.raises(CaptionError, match="cannot load the caption model from directory"):
        CaptionEncoder.load(tmp_path, device="cpu")


def test_missing_transformers_is_a_caption_error(monkeypatch, tiny_model):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    with pytest.raises(CaptionError, match=r"pip install 'pid-export\[caption\]'"):
        CaptionEncoder.load(tiny_model[0], device="cpu")


def test_check_prompts_broadcasts_one_or_takes_one_per_item():
    assert check_prompts(["a cat"], 3) == ["a cat"] * 3
    assert check_prompts(["a", "b"], 2) == ["a", "b"]
    with pytest.raises(CaptionError, match="got 3 prompts for a batch of 2"):
        check_prompts(["a", "b", "c"], 2)
    with pytest.raises(CaptionError, match="got 0 prompts"):
        check_prompts([], 2)


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".safetensors"])
def test_write_embeddings_round_trip(tmp_path, suffix):
    embeddings = torch.randn(2, 300, 8, dtype=torch.bfloat16)
    target = tmp_path / f"emb{suffix}"
    target.write_bytes(b"old")  # replaced, not appended to
    write_embeddings(embeddings, target)
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # no temp file left behind
    loaded = load_caption(target)  # what pid-run --caption-embeds reads
    assert loaded.dtype == torch.float32
    assert torch.equal(loaded, embeddings.float())
    if suffix == ".npy":
        assert np.load(target).shape == (2, 300, 8)


def test_write_embeddings_rejects_unknown_suffix(tmp_path):
    with pytest.raises(CaptionError, match="must end in"):
        write_embeddings(torch.zeros(1, 300, 8), tmp_path / "emb.pt")
    assert list(tmp_path.iterdir()) == []


def test_empty_caption_is_stored_found_and_used(tmp_path, encoder, direct_embeddings):
    (tmp_path / "model.onnx").write_bytes(b"")
    path = save_empty_caption(encoder, tmp_path)
    assert path == tmp_path / EMPTY_CAPTION_NAME
    assert find_empty_caption(tmp_path) == path
    assert find_empty_caption(tmp_path / "model.onnx") == path

    unconditional = direct_embeddings[CAPTIONS.index("")]
    assert np.load(path).shape == (1, 300, HIDDEN)
    messages: list[str] = []
    embeddings = resolve_caption(3, tmp_path, notify=messages.append)
    assert embeddings.shape == (3, 300, HIDDEN)
    for row in embeddings:
        torch.testing.assert_close(row, unconditional, rtol=1e-5, atol=1e-6)
    assert len(messages) == 1 and str(path) in messages[0]


def test_no_caption_anywhere_names_the_three_ways(tmp_path):
    assert find_empty_caption(tmp_path) is None
    with pytest.raises(CaptionError) as info:
        resolve_caption(1, tmp_path)
    message = str(info.value)
    for way in ("--caption-embeds FILE", "--prompt TEXT", "pid-export[caption]", EMPTY_CAPTION_NAME):
        assert way in message


def test_resolve_caption_encodes_prompts(encoder, direct_embeddings, tmp_path):
    embeddings = resolve_caption(2, tmp_path, ["a cat"], encoder=encoder)
    assert embeddings.shape == (2, 300, HIDDEN)
    torch.testing.assert_close(embeddings, direct_embeddings[[2, 2]], rtol=1e-5, atol=1e-6)
    with pytest.raises(CaptionError, match="got 2 prompts for a batch of 3"):
        resolve_caption(3, tmp_path, ["a", "b"], encoder=encoder)


def test_load_encoder_picks_transformers_for_a_model_directory(tiny_model):
    assert isinstance(load_encoder(tiny_model[0], device="cpu"), CaptionEncoder)


def test_onnx_encoder_without_an_export_is_a_caption_error(tmp_path):
    with pytest.raises(CaptionError, match="cannot read the caption encoder settings"):
        OnnxCaptionEncoder.load(tmp_path)


def test_export_needs_a_float32_encoder(tiny_model, tmp_path):
    from pid_export.caption_export import export_caption_encoder

    bf16 = CaptionEncoder.load(tiny_model[0], device="cpu", dtype=torch.bfloat16)
    with pytest.raises(CaptionError, match="float32"):
        export_caption_encoder(bf16, tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # the dynamo ONNX export of even the tiny model takes ~20 s of CPU
def test_onnx_export_matches_the_transformers_encoder(encoder, direct_embeddings, tmp_path):
    from pid_export.caption_export import export_caption_encoder

    export_caption_encoder(encoder, tmp_path)
    exported = load_encoder(tmp_path)
    assert isinstance(exported, OnnxCaptionEncoder)
    assert (exported.n_prefix_tokens, exported.max_length) == (encoder.n_prefix_tokens, encoder.max_length)
    prompts = CAPTIONS + [" ".join(["cat"] * 400)]  # includes the unconditional and a truncated caption
    for name, value in exported.tokenize(prompts).items():
        assert torch.equal(value, encoder.tokenize(prompts)[name]), name
    embeddings = exported.encode(CAPTIONS + ["a cat"])
    assert embeddings.shape == (len(CAPTIONS) + 1, 300, HIDDEN) and embeddings.dtype == torch.float32
    torch.testing.assert_close(embeddings[:-1], direct_embeddings, rtol=1e-5, atol=1e-5)
    assert torch.equal(embeddings[-1], embeddings[CAPTIONS.index("a cat")])


def test_embed_to_file_writes_what_the_encoder_makes(encoder, direct_embeddings, tmp_path):
    out = embed_to_file(["a red cat on a mat", "a cat"], tmp_path / "emb.safetensors", encoder=encoder)
    torch.testing.assert_close(load_caption(out), direct_embeddings[[0, 2]], rtol=1e-5, atol=1e-6)
    with pytest.raises(CaptionError, match="does not exist"):
        embed_to_file(["a cat"], tmp_path / "missing" / "emb.npy", encoder=encoder)


def test_pid_run_embed_subcommand_writes_the_embeddings(tiny_model, direct_embeddings, tmp_path, capsys):
    from pid_runtime.cli import main

    out = tmp_path / "emb.npy"
    args = ["embed", "a red cat on a mat", "a cat", "--caption-model", str(tiny_model[0]), "--device", "cpu"]
    assert main(args + ["--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    torch.testing.assert_close(load_caption(out), direct_embeddings[[0, 2]], rtol=1e-5, atol=1e-6)

    missing = tmp_path / "nowhere" / "emb.npy"
    assert main(args + ["--out", str(missing)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pid-run") and not missing.parent.exists()


def test_store_empty_caption_at_export_time(tiny_model, direct_embeddings, tmp_path, monkeypatch):
    from pid_export.caption_export import store_empty_caption

    messages: list[str] = []
    monkeypatch.setenv(CAPTION_MODEL_ENV, str(tiny_model[0]))
    path = store_empty_caption(tmp_path, device="cpu", notify=messages.append)
    assert path == tmp_path / EMPTY_CAPTION_NAME and str(path) in messages[-1]
    torch.testing.assert_close(load_caption(path)[0], direct_embeddings[CAPTIONS.index("")], rtol=1e-5, atol=1e-6)

    # An encoder of another width than the network's captions: nothing stored, a reason.
    narrow = tmp_path / "narrow"
    narrow.mkdir()
    assert store_empty_caption(narrow, device="cpu", notify=messages.append, txt_embed_dim=2304) is None
    assert list(narrow.iterdir()) == [] and "2304-d" in messages[-1]

    # A hub model that is not in the cache: no download, no file, a reason.
    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    assert store_empty_caption(elsewhere, "pid-export-tests/no-such-model", notify=messages.append) is None
    assert list(elsewhere.iterdir()) == []
    assert "not in the Hugging Face cache" in messages[-1]


@pytest.fixture()
def cli_export(export_root, tmp_path):
    """A private copy of a golden export directory (tests add empty_caption.npy to it)."""
    target = tmp_path / "export"
    shutil.copytree(export_cases([CLI_CASE])[CLI_CASE], target)
    latents = tmp_path / "latents.npy"
    np.save(latents, golden_tensors(CLI_CASE)["lq_latent"].numpy())
    return target, latents


def decode_directly(export_dir, caption):
    from pid_runtime.backends import open_backend
    from pid_runtime.decode import decode

    backend = open_backend(export_dir, device="cpu")
    try:
        return decode(backend, golden_tensors(CLI_CASE)["lq_latent"], caption, 0.0, seed=0, steps=2).images
    finally:
        backend.close()


def test_pid_run_with_prompts(cli_export, tiny_model, direct_embeddings, tmp_path, monkeypatch, capsys):
    from pid_runtime.cli import main

    export_dir, latents = cli_export
    monkeypatch.setenv(CAPTION_MODEL_ENV, str(tiny_model[0]))
    run = [str(export_dir), str(latents), "--device", "cpu", "--steps", "2"]
    out = tmp_path / "out.npy"
    assert main(run + ["--prompt", "a red cat on a mat", "--prompt", "a cat", "--out", str(out)]) == 0
    expected = decode_directly(export_dir, direct_embeddings[[0, 2]])
    torch.testing.assert_close(torch.from_numpy(np.load(out)), expected, rtol=1e-4, atol=1e-4)

    capsys.readouterr()
    wrong = tmp_path / "wrong.npy"
    assert main(run + ["--prompt", "a", "--prompt", "b", "--prompt", "c", "--out", str(wrong)]) == 1
    error_lines = capsys.readouterr().err.strip().splitlines()
    assert len(error_lines) == 1 and "got 3 prompts for a batch of 2" in error_lines[0]
    assert not wrong.exists()


def test_pid_run_without_caption_uses_the_stored_empty_caption(cli_export, encoder, direct_embeddings, tmp_path, capsys):
    from pid_runtime.cli import main

    export_dir, latents = cli_export
    out = tmp_path / "out.npy"
    run = [str(export_dir), str(latents), "--device", "cpu", "--steps", "2", "--out", str(out)]
    assert main(run) == 1
    error_lines = capsys.readouterr().err.strip().splitlines()
    assert len(error_lines) == 1
    for way in ("--caption-embeds FILE", "--prompt TEXT", EMPTY_CAPTION_NAME):
        assert way in error_lines[0]
    assert not out.exists()

    save_empty_caption(encoder, export_dir)
    assert main(run) == 0
    assert "unconditional" in capsys.readouterr().out
    unconditional = direct_embeddings[[CAPTIONS.index("")]]
    torch.testing.assert_close(torch.from_numpy(np.load(out)), decode_directly(export_dir, unconditional),
                               rtol=1e-4, atol=1e-4)
