"""MaskGIT decoding: the cosine re-mask schedule, the clamp, confidence ordering, determinism."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from digit.sampling.maskgit import gumbel_noise, mask_schedule, maskgit_decode, remask_count


def test_schedule_reproduces_the_reference_counts() -> None:
    assert mask_schedule(256, 8) == [251, 236, 212, 181, 142, 97, 49, 0]
    for t, steps in [(16, 4), (64, 10), (1, 1)]:
        expect = [math.floor(t * math.cos(math.pi / 2 * (i + 1) / steps)) for i in range(steps - 1)] + [0]
        assert mask_schedule(t, steps) == expect
    with pytest.raises(ValueError):
        mask_schedule(0, 8)


def test_remask_count_is_clamped() -> None:
    assert remask_count(251, 256, last=False) == 251
    assert remask_count(0, 10, last=False) == 1  # every non-final step leaves something to do
    assert remask_count(9, 5, last=False) == 4  # and fixes at least one token
    assert remask_count(5, 5, last=True) == 0


class Recorder(nn.Module):
    """A fake NAR model: fixed logits per position (optionally random), recording every input it sees."""

    def __init__(self, logits: torch.Tensor, grid: tuple[int, int]) -> None:
        super().__init__()
        self.config = SimpleNamespace(causal=False, grid=grid)
        self.mask_token_id = logits.shape[-1]
        self.logits = nn.Parameter(logits, requires_grad=False)
        self.inputs: list[torch.Tensor] = []

    def forward(self, tokens: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        self.inputs.append(tokens.clone())
        return self.logits.expand(tokens.shape[0], -1, -1)


def test_decoding_follows_the_schedule_and_never_changes_fixed_tokens() -> None:
    torch.manual_seed(0)
    T, V, steps = 16, 5, 8
    model = Recorder(torch.randn(1, T, V), (4, 4))
    out = maskgit_decode(model, None, n=3, nar_steps=steps, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 4, 4) and out.dtype == torch.long
    assert int(out.max()) < V  # nothing left masked
    assert len(model.inputs) == steps
    sched = mask_schedule(T, steps)
    masked_in = [int((x == V).sum(1)[0]) for x in model.inputs]
    expect, n = [T], T
    for t in range(steps - 1):
        n = remask_count(sched[t], n, last=False)
        expect.append(n)
    assert masked_in == expect
    for a, b in zip(model.inputs, model.inputs[1:] + [out.view(3, -1)]):
        fixed = a != V
        assert torch.equal(a[fixed], b[fixed])  # a token once kept is never re-masked or resampled


def test_least_confident_are_remasked() -> None:
    # position i puts probability p_i on token 0; without Gumbel noise the first step keeps the most confident
    # (confidence is the model's own probability, not the top-k filtered one)
    T, V = 8, 2
    p = torch.linspace(0.55, 0.99, T)
    logits = torch.log(torch.stack([p, 1 - p], -1))[None]
    model = Recorder(logits, (2, 4))
    maskgit_decode(model, None, n=1, nar_steps=4, nar_temperature=0.0, top_k=1)  # top-1: every position picks 0
    kept_after_first = model.inputs[1][0] != V
    n_kept = int(kept_after_first.sum())
    assert n_kept == T - remask_count(mask_schedule(T, 4)[0], T, last=False)
    assert kept_after_first[-n_kept:].all()  # the most confident positions (largest p) stay


def test_seeded_and_filtered() -> None:
    model = Recorder(torch.zeros(1, 9, 6), (3, 3))
    a = maskgit_decode(model, None, n=4, generator=torch.Generator().manual_seed(1))
    b = maskgit_decode(model, None, n=4, generator=torch.Generator().manual_seed(1))
    c = maskgit_decode(model, None, n=4, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    peaked = torch.zeros(1, 9, 6)
    peaked[..., 3] = 1.0
    out = maskgit_decode(Recorder(peaked, (3, 3)), None, n=2, top_k=1)
    assert (out == 3).all()
    g = gumbel_noise((20000,), torch.Generator().manual_seed(0), "cpu")
    assert float(g.mean()) == pytest.approx(0.5772, abs=0.03)  # Euler-Mascheroni: the Gumbel mean


def test_refuses_a_causal_model() -> None:
    model = Recorder(torch.zeros(1, 4, 3), (2, 2))
    model.config.causal = True
    with pytest.raises(ValueError, match="causal=False"):
        maskgit_decode(model, None, n=1)
