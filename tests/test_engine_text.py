"""Continuous batching of text-conditional models: each slot carries its caption, its null caption under the same
mask, and its own key mask; a text request's tokens are bitwise identical alone and mixed with other text requests."""

from __future__ import annotations

import pytest
import torch

from digit.errors import DigitError
from digit.models.conditions import Caption
from digit.sampling.engine import Engine, Request
from digit.sampling.generate import sample
from digit.sampling.params import SamplingParams
from digit.sampling.seeds import image_generators
from test_text_cond import DT, GRID, L, _greedy_rollout, caption, tiny

T = GRID[0] * GRID[1]


def rows(cap: Caption) -> list[Caption]:
    return [cap[i] for i in range(len(cap))]  # one Caption row ([L, D], [L]) per request


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_staggered_greedy_text_requests_equal_full_forward(scale):
    """Three captions of different valid lengths through two slots (so they enter at different steps and slots): each
    image is the greedy rollout of plain full forwards over its own caption (and the null caption with its mask)."""
    m = tiny(seed=4)
    cap = caption(3, seed=2, valid=(2, 6, 4))
    greedy = SamplingParams(temperature=0.0, cfg_scale=scale)
    out = Engine(m, slots=2).run(
        [Request(cond=c, n=n, params=greedy, seed=i) for i, (c, n) in enumerate(zip(rows(cap), (2, 1, 2)))]
    )
    assert [f.tokens.shape for f in out] == [(2, *GRID), (1, *GRID), (2, *GRID)]
    want = _greedy_rollout(m, cap, None if scale == 1.0 else scale)
    for i, f in enumerate(out):
        assert torch.equal(f.tokens.view(len(f.tokens), -1), want[i].expand(len(f.tokens), -1)), i


def _mixed(m, target: Request, others: list[Request], delay: int, slots: int = 3):
    engine = Engine(m, slots=slots)
    results, ids = {}, [engine.submit(r) for r in others]
    for _ in range(delay):
        results.update({f.id: f for f in engine.step()})
    tid = engine.submit(target)
    while not engine.idle:
        results.update({f.id: f for f in engine.step()})
    assert set(results) == {*ids, tid}
    return results[tid].tokens


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0, cfg_scale=2.0),
        SamplingParams(temperature=1.0, top_k=6, top_p=0.9, cfg_scale=3.0, cfg_schedule="linear"),
        SamplingParams(temperature=0.9),
    ],
)
def test_text_request_identical_alone_and_mixed(params):
    """The engine's guarantee for text requests: the same tokens alone and among other captions (other masks, other
    slots, later arrival), and the tokens `sample` gives with the same per-image generators."""
    m = tiny(seed=5)
    caps = rows(caption(3, seed=7, valid=(3, 6, 1)))
    target = Request(cond=caps[0], n=2, params=params, seed=9)
    others = [
        Request(cond=caps[1], n=2, params=SamplingParams(top_k=3, cfg_scale=4.0), seed=1),
        Request(cond=caps[2], n=1, params=SamplingParams(temperature=0.5), seed=2),
    ]
    alone = Engine(m, slots=3).run([target])[0].tokens
    assert torch.equal(alone, _mixed(m, target, others, delay=3))
    assert torch.equal(alone, _mixed(m, target, others[::-1], delay=5, slots=4))
    two = Caption(caps[0].features.expand(2, L, DT), caps[0].mask.expand(2, L))
    offline = sample(m, two, params=params, generator=image_generators(9, range(2))).tokens
    assert torch.equal(alone, offline)
    if params.temperature > 0:  # seeded sampling: another seed, another caption give other tokens
        other = Engine(m, slots=3).run([Request(cond=caps[0], n=2, params=params, seed=10)])[0].tokens
        assert not torch.equal(alone, other)
        assert not torch.equal(alone, Engine(m, slots=3).run([Request(caps[1], 2, params, 9)])[0].tokens)


def test_text_engine_refusals():
    m = tiny()
    engine = Engine(m, slots=2)
    assert engine.guided  # text models are guided by default, on the null caption
    good = caption(1)[0]
    for bad in (None, 3, torch.zeros(L, DT), Caption(torch.zeros(L + 1, DT), torch.ones(L + 1, dtype=torch.bool)),
                Caption(torch.zeros(DT, L), torch.ones(L, dtype=torch.bool)),
                Caption(good.features, good.mask.float()), Caption(good.features * float("nan"), good.mask)):  # fmt: skip
        with pytest.raises(DigitError, match="text request"):
            engine.submit(Request(cond=bad))
    assert engine.idle
    unguided = Engine(m, slots=1, guided=False)
    with pytest.raises(DigitError, match="cfg_scale must be 1"):
        unguided.submit(Request(cond=good, params=SamplingParams(cfg_scale=2.0)))
    assert unguided.run([Request(cond=good, params=SamplingParams(temperature=0.0))])[0].tokens.shape == (1, *GRID)
