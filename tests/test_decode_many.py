"""Per-item seeds and decode_many: an item decoded inside any batch equals the item decoded alone.

"Alone" is the reference path `decode(seed=S)` on a batch of one (what `pid-run --seed S`
runs), on a tiny golden export through ONNX Runtime on the CPU; compared bitwise.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from exports import export_cases, export_root  # noqa: F401 (fixture)
from pid_runtime.batching import DecodeRequest, PerItemNoise, check_request
from pid_runtime.decode import DecodeError, decode
from pid_runtime.decoder import PidDecoder
from pid_runtime.sampler import SeededNoise

CASE = "tiny_v1_16ch_sr4"  # 16-ch latents at 1/8, x4: an h x w latent -> 32h x 32w px; captions [*, L, 40]


@pytest.fixture(scope="module")
def decoder(export_root: Path):  # noqa: F811
    with PidDecoder.from_export(export_cases([CASE])[CASE], device="cpu", threads=1) as opened:
        yield opened


def _requests() -> list[DecodeRequest]:
    gen = torch.Generator().manual_seed(7)
    caption = torch.randn(1, 5, 40, generator=gen)
    long_caption = torch.randn(1, 9, 40, generator=gen)
    shapes = [(2, 2), (2, 3), (2, 2), (2, 2), (2, 3), (1, 2), (2, 2)]
    out = []
    for index, (h, w) in enumerate(shapes):
        out.append(DecodeRequest(torch.randn(1, 16, h, w, generator=gen), seed=1000 + index,
                                 caption=long_caption if index == 6 else caption, sigma=0.05 * index,
                                 steps=4 if index != 3 else 2))
    out.append(DecodeRequest(torch.randn(1, 16, 2, 2, generator=gen), seed=5, caption=caption, size=(96, 96)))
    return out


def _alone(decoder: PidDecoder, request: DecodeRequest) -> torch.Tensor:
    return decode(decoder.backend, request.latents, request.caption, request.sigma, seed=request.seed,
                  steps=request.steps, size=request.size).images


def test_per_item_noise_is_the_batch_of_one_draw():
    shape = (3, 3, 32, 48)
    noise = PerItemNoise(shape, [11, 12, 13], "cpu")
    whole = torch.empty(shape)
    noise.initial(whole)
    eps = torch.empty(shape)
    noise.rows(1, 3).eps(1, eps[1:3])
    for row, seed in enumerate([11, 12, 13]):
        alone = SeededNoise((1, *shape[1:]), seed, "cpu")
        first, second = torch.empty(1, *shape[1:]), torch.empty(1, *shape[1:])
        alone.initial(first)
        assert torch.equal(whole[row:row + 1], first)
        if row:
            alone.eps(1, second)
            assert torch.equal(eps[row:row + 1], second)


def test_decode_many_equals_each_alone_bitwise(decoder):
    requests = _requests()
    outcomes = decoder.decode_many(requests, max_batch=3)
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    for request, outcome in zip(requests, outcomes):
        reference = _alone(decoder, request)
        assert outcome.image is not None and outcome.image.shape == reference.shape
        assert torch.equal(outcome.image, reference), f"request with latent {list(request.latents.shape)} differs"


def test_per_item_seeds_do_not_depend_on_batch_mates(decoder):
    gen = torch.Generator().manual_seed(3)
    latents = torch.randn(4, 16, 2, 2, generator=gen)
    caption = torch.randn(1, 6, 40, generator=gen)
    together = decoder.decode(latents, caption_embeds=caption, seeds=[1, 2, 3, 4], output_type="pt")
    reordered = decoder.decode(latents[[2, 0]], caption_embeds=caption, seeds=[3, 1], output_type="pt")
    assert torch.equal(together[[2, 0]], reordered)
    # The whole-batch reference noise (pid-run --seed) is a different draw from the per-item one.
    whole = decoder.decode(latents, caption_embeds=caption, seed=1, output_type="pt")
    assert not torch.equal(whole[1], together[1])


def test_one_bad_request_never_fails_the_others(decoder):
    good = _requests()[:3]
    bad = [DecodeRequest(torch.randn(1, 15, 2, 2), seed=1, caption=good[0].caption),
           DecodeRequest(torch.full((1, 16, 2, 2), float("nan")), seed=1, caption=good[0].caption),
           DecodeRequest(good[0].latents, seed=1, caption=good[0].caption, size=(50, 64))]
    outcomes = decoder.decode_many([bad[0], good[0], bad[1], good[1], bad[2], good[2]])
    assert [o.ok for o in outcomes] == [False, True, False, True, False, True]
    assert "15 channels" in outcomes[0].error and "NaN" in outcomes[2].error and "multiple of 16" in outcomes[4].error
    for request, outcome in zip(good, outcomes[1::2]):
        assert torch.equal(outcome.image, _alone(decoder, request))


def test_check_request_is_cheap_and_refuses_before_work(decoder):
    caption = torch.zeros(1, 3, 40)
    check_request(decoder.backend, DecodeRequest(torch.zeros(1, 16, 2, 2), seed=0, caption=caption))
    for request, words in [(DecodeRequest(torch.zeros(2, 16, 2, 2), seed=0, caption=caption), "one latent"),
                           (DecodeRequest(torch.zeros(1, 16, 2, 2), seed=-1, caption=caption), "seed"),
                           (DecodeRequest(torch.zeros(1, 16, 2, 2), seed=0, caption=torch.zeros(1, 3, 8)), "dim"),
                           (DecodeRequest(torch.zeros(1, 16, 2, 2), seed=0, caption=caption, steps=9), "steps"),
                           (DecodeRequest(torch.zeros(1, 16, 2, 2), seed=0), "no caption")]:
        with pytest.raises(DecodeError, match=words):
            check_request(decoder.backend, request)


def test_a_tiled_request_is_decoded_as_decode_tiles_it(decoder):
    """The serving layer's `tile=` reaches the decode: a tiled request inside a batch of untiled ones equals
    `decode(tile=...)` of that item alone, and differs from its untiled decode (so tiling really ran)."""
    gen = torch.Generator().manual_seed(3)
    caption = torch.randn(1, 5, 40, generator=gen)
    latents = torch.randn(1, 16, 4, 4, generator=gen)  # 128x128 px
    tiled = DecodeRequest(latents, seed=21, caption=caption, tile=(64, 64, 32))
    untiled = DecodeRequest(latents, seed=21, caption=caption, tile=None)
    outcomes = decoder.decode_many([untiled, tiled, untiled])
    assert all(outcome.ok for outcome in outcomes), [outcome.error for outcome in outcomes]
    alone = decode(decoder.backend, latents, caption, 0.0, seed=21, tile=(64, 64, 32)).images
    assert torch.equal(outcomes[1].image, alone)
    assert torch.equal(outcomes[0].image, outcomes[2].image)
    assert not torch.equal(outcomes[1].image, outcomes[0].image)
