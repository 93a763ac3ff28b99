"""`PidDecoder.decode` checks its arguments as pid-run does: DecodeError, one line, before any torch work."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from exports import export_cases, export_root, golden_tensors  # noqa: F401 (fixtures)
from PIL import Image

from pid_runtime.decode import DecodeError
from pid_runtime.decoder import PidDecoder

CASE = "tiny_v1_16ch_sr4_b2"  # 16-ch latents [2,16,3,2], text dim 40, txt_max_length 12


@pytest.fixture(scope="module")
def decoder(export_root):  # noqa: F811
    notes: list[str] = []
    with PidDecoder.from_export(export_cases([CASE])[CASE], device="cpu", notify=notes.append) as opened:
        opened.notes = notes
        yield opened


@pytest.fixture(scope="module")
def good():
    golden = golden_tensors(CASE)
    return golden["lq_latent"][:1].float(), golden["y"][:1].float()


BAD = {
    "int tensor": (dict(latents=torch.zeros(1, 16, 3, 2, dtype=torch.int64)), "int64"),
    "bool tensor": (dict(latents=torch.zeros(1, 16, 3, 2, dtype=torch.bool)), "bool"),
    "int numpy": (dict(latents=np.zeros((1, 16, 3, 2), np.int32)), "int32"),
    "PIL image": (dict(latents=Image.new("RGB", (4, 4))), "PIL.Image"),
    "string latents": (dict(latents="lat.npy"), "got str"),
    "zero-height latent": (dict(latents=torch.zeros(1, 16, 0, 2)), "at least 1"),
    "size as text": (dict(size="64x96"), "'64x96'"),  # was read as ('6', '4')
    "size of floats": (dict(size=(64.0, 96.0)), "whole numbers"),
    "size of three": (dict(size=(64, 96, 3)), "(height, width)"),
    "int caption": (dict(caption_embeds=torch.zeros(1, 4, 40, dtype=torch.int32)), "caption_embeds are int32"),
    "prompt not text": (dict(prompt=3), "prompt must be a string"),
    "sigma as text": (dict(sigma="0.2"), "sigma must be a number"),
    "seed beyond 64 bits": (dict(seed=2 ** 64), "out of range"),
    "seed as text": (dict(seed="1"), "whole number"),
    "steps 0": (dict(steps=0), "steps must be"),
    "steps float": (dict(steps=2.0), "steps must be"),
    "batch_size 0": (dict(batch_size=0), "batch_size"),
    "output_type": (dict(output_type="jpg"), "output_type"),
    "size beyond the graph": (dict(size=(32768, 32768)), "beyond what this export"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_arguments_raise_decode_error_with_one_line(case, decoder, good):
    changes, fragment = BAD[case]
    latents, caption = good
    kwargs = {"latents": latents, "caption_embeds": caption, **changes}
    with pytest.raises(DecodeError) as info:
        decoder.decode(**kwargs)
    message = str(info.value)
    assert fragment in message and "\n" not in message, message


def test_good_arguments_still_decode(decoder, good):
    latents, caption = good
    images = decoder.decode(latents, caption_embeds=caption, seed=np.int64(3), size=[96, 64], output_type="pt")
    assert images.shape == (1, 3, 96, 64)


def test_a_caption_longer_than_the_model_reads_gets_a_note(decoder, good):
    latents, caption = good
    long = torch.cat([caption, torch.randn(1, 20 - caption.shape[1], 40)], dim=1) if caption.shape[1] < 20 \
        else caption[:, :20]
    decoder.notes.clear()
    cut = decoder.decode(latents, caption_embeds=long, output_type="pt")
    notes = [n for n in decoder.notes if "are cut" in n]
    assert len(notes) == 1 and "20 tokens" in notes[0] and "first 12" in notes[0]
    same = decoder.decode(latents, caption_embeds=long[:, :12], output_type="pt")
    assert torch.equal(cut, same)
