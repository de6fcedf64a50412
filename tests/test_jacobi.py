"""Speculative Jacobi decoding: the multi-token verify step against full forwards, greedy identity with standard
decoding, the output distribution against exact sequence probabilities (and a broken acceptance rule that the check
rejects), fewer forwards on a low-entropy model, refusals."""

import itertools
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from scipy.stats import chi2

from digit.errors import DigitError
from digit.models import GPT, build_config
from digit.sampling import jacobi
from digit.sampling.filters import cfg, cfg_scale_at, filter_logits
from digit.sampling.generate import generate
from digit.sampling.jacobi import jacobi_generate


@dataclass(frozen=True)
class Params:  # the attributes jacobi_generate reads (digit's sampling-parameters type has them too)
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    cfg_scale: float = 1.0
    cfg_interval: int = -1
    cfg_schedule: str = "constant"


def randomized(seed=0, std=0.3, **overrides) -> GPT:
    """Random weights everywhere (LlamaGen's init zeroes the head, which would make every logit tie)."""
    torch.manual_seed(seed)
    model = GPT(build_config("tiny", **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model


def class_model(seed=0, **kw) -> GPT:
    return randomized(seed, cond="class", num_classes=4, **kw)


def prefix_model(seed=0) -> GPT:
    return randomized(seed, arch="fairseq", cond="prefix", norm_first=True, prefix_vocab_size=11, prefix_grid=(2, 3))


# ---- the model's verify step


@pytest.mark.parametrize("make", [class_model, prefix_model], ids=["llama-class", "fairseq-prefix"])
def test_decode_block_equals_full_forward_also_over_stale_cache(make):
    model = make()
    mc = model.config
    B, T, C = 3, mc.seq_len, mc.cond_len
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, mc.vocab_size, (B, T), generator=g)
    cond = torch.arange(B) % 4 if mc.cond == "class" else torch.randint(0, 11, (B, mc.prefix_len), generator=g)
    with torch.no_grad():
        full = model(tokens, cond)  # full[:, t] predicts token t
        model.setup_cache(B)
        torch.testing.assert_close(model.prefill(cond, B), full[:, 0], rtol=1e-5, atol=1e-5)
        garbage = torch.randint(0, mc.vocab_size, (B, T - 1), generator=g)
        model.decode_block(garbage, torch.arange(C, C + T - 1))  # fills every cache entry with wrong tokens
        a, b = 5, 11  # the true prefix up to token a - 1 again, then a block in the middle over the stale tail
        first = model.decode_block(tokens[:, :a], torch.arange(C, C + a))
        mid = model.decode_block(tokens[:, a:b], torch.arange(C + a, C + b))
        assert first.shape == (B, a, mc.vocab_size) and mid.shape == (B, b - a, mc.vocab_size)
        torch.testing.assert_close(first, full[:, 1 : a + 1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mid, full[:, a + 1 : b + 1], rtol=1e-5, atol=1e-5)
    model.clear_cache()


# ---- greedy: exactly the tokens of standard decoding

GREEDY = {
    "top_k=1": dict(top_k=1),
    "temperature=0,cfg": dict(temperature=0.0, cfg_scale=3.0),
    "top_k=1,cfg,linear": dict(top_k=1, cfg_scale=2.5, cfg_schedule="linear"),
    "top_k=1,cfg,interval": dict(top_k=1, cfg_scale=3.0, cfg_interval=4),
}


@pytest.mark.parametrize("init", jacobi.INITS)
@pytest.mark.parametrize("window", [1, 5, 16])
@pytest.mark.parametrize("case", list(GREEDY))
def test_greedy_equals_standard_decoding(case, window, init):
    kw = GREEDY[case]
    model, labels = class_model(), torch.tensor([0, 1, 2, 3, 1, 0])
    want = generate(model, labels, generator=torch.Generator().manual_seed(0), **kw).flatten(1)
    got, n_forward = jacobi_generate(model, labels, None, Params(**kw), torch.Generator().manual_seed(1), window=window)
    assert got.shape == (6, 16) and got.dtype == torch.long
    assert torch.equal(got, want)
    assert 1 <= n_forward <= model.config.seq_len


def test_same_seeds_same_tokens_and_per_row_generators():
    model, labels = class_model(), torch.tensor([0, 1, 2, 3])
    params = Params(cfg_scale=2.0, top_k=10)
    run = lambda g: jacobi_generate(model, labels, None, params, g)  # noqa: E731
    a, b = run(torch.Generator().manual_seed(5)), run(torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert not torch.equal(a[0], run(torch.Generator().manual_seed(6))[0])
    rows = lambda: [torch.Generator().manual_seed(10 + i) for i in range(4)]  # noqa: E731
    c, d = run(rows()), run(rows())
    assert torch.equal(c[0], d[0]) and c[1] == d[1]


def test_greedy_equals_standard_decoding_prefix_model():
    model = prefix_model()
    prefix = torch.randint(0, 11, (4, 6), generator=torch.Generator().manual_seed(3))
    want = generate(model, prefix, top_k=1).flatten(1)
    for init in jacobi.INITS:
        got, _ = jacobi_generate(model, prefix, None, Params(top_k=1), torch.Generator().manual_seed(0), init=init)
        assert torch.equal(got, want)


# ---- the output distribution: chi-square against the exact sequence probabilities

V_SMALL, GRID = 3, (1, 3)  # 27 possible sequences
DISTRIBUTION = {
    "cfg,top-p": (0, 0.2, Params(cfg_scale=2.0, top_p=0.9)),
    "temperature,top-k (zero-probability cells)": (0, 0.3, Params(temperature=0.8, top_k=2)),
}


def exact_sequence_probs(model: GPT, label: int, params: Params) -> torch.Tensor:
    """P(x) for every sequence of the tiny grid: the product of the filtered, guided next-token distributions."""
    T = model.config.seq_len
    seqs = torch.tensor(list(itertools.product(range(V_SMALL), repeat=T)))
    labels = torch.full((len(seqs),), label)
    with torch.no_grad():
        c = model(seqs, labels)
        u = model(seqs, torch.full_like(labels, model.config.num_classes))  # the null class
    probs = torch.ones(len(seqs), dtype=torch.float64)
    for i in range(T):
        scale = cfg_scale_at(i, T, params.cfg_scale, params.cfg_interval, params.cfg_schedule)
        logits = cfg(c[:, i], u[:, i], scale) if scale != 1.0 else c[:, i]
        p = filter_logits(logits, params.temperature, params.top_k, params.top_p).softmax(-1).double()
        probs *= p.gather(-1, seqs[:, i : i + 1])[:, 0]
    return probs


def chi_square_pvalue(samples: torch.Tensor, probs: torch.Tensor) -> float:
    """Goodness of fit of sampled sequences to ``probs``; cells expected below 5 are pooled. Samples in a cell of
    probability zero fail outright."""
    index = (samples * V_SMALL ** torch.arange(samples.shape[1] - 1, -1, -1)).sum(-1).numpy()
    counts = np.bincount(index, minlength=len(probs))
    expected = probs.numpy() * counts.sum()
    assert counts[expected == 0].sum() == 0, "a sample of probability zero"
    big = expected >= 5
    obs, exp = list(counts[big]), list(expected[big])
    if expected[~big].sum() > 0:
        obs.append(counts[~big].sum())
        exp.append(expected[~big].sum())
    obs, exp = np.asarray(obs), np.asarray(exp)
    return float(chi2.sf(((obs - exp) ** 2 / exp).sum(), len(exp) - 1))


def jacobi_samples(model, params, n, batch, seed, per_row=False, **kw) -> torch.Tensor:
    """n samples in batches, from one generator, or (``per_row``) from one generator per sample."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.zeros(batch, dtype=torch.long)
    out = []
    for b in range(n // batch):
        gens = [torch.Generator().manual_seed(seed * 100_003 + b * batch + i) for i in range(batch)] if per_row else g
        out.append(jacobi_generate(model, labels, None, params, gens, **kw)[0])
    return torch.cat(out)


@pytest.mark.parametrize("case", list(DISTRIBUTION))
def test_distribution_equals_standard_sampling(case, monkeypatch):
    seed, std, params = DISTRIBUTION[case]
    model = randomized(seed, std, vocab_size=V_SMALL, grid=GRID, cond="class", num_classes=2, dim=32)
    probs = exact_sequence_probs(model, 0, params)
    assert probs.sum().item() == pytest.approx(1.0) and int((probs > 0.02).sum()) >= 6  # a spread-out target
    n = 6000
    # the check itself accepts the standard sampler ...
    standard = generate(
        model,
        torch.zeros(n, dtype=torch.long),
        generator=torch.Generator().manual_seed(1),
        **{k: getattr(params, k) for k in ("temperature", "top_k", "top_p", "cfg_scale")},
    ).flatten(1)
    assert chi_square_pvalue(standard, probs) > 1e-3
    # ... and Jacobi decoding, with both draft initialisations, windows 1 and 2, mixed batch sizes (rows that run
    # ahead of the window start are exercised by the large batch), one generator per batch or per sample
    for init, window, batch, per_row in (
        ("random", 2, 500, False),
        ("repeat", 2, 6000, False),
        ("random", 1, 50, True),
    ):
        samples = jacobi_samples(model, params, n, batch, seed=2, per_row=per_row, init=init, window=window)
        assert chi_square_pvalue(samples, probs) > 1e-3, (init, window, batch)
    # a deliberately broken rule (resampling from p instead of the residual max(0, p - q)) is rejected
    monkeypatch.setattr(jacobi, "residual", lambda p, q: p)
    broken = jacobi_samples(model, params, n, 500, seed=2, window=2)
    assert chi_square_pvalue(broken, probs) < 1e-6


# ---- fewer forwards where the model is confident


@pytest.mark.converge
def test_fewer_forwards_on_a_low_entropy_model():
    """A tiny model overfit to one sequence per class, trained with half its input tokens randomised so that it
    predicts from class and position rather than from the exact previous token (as image models largely do)."""
    torch.manual_seed(0)
    model = GPT(build_config("tiny", vocab_size=16, dim=32, cond="class", num_classes=4, class_dropout=0.0))
    g = torch.Generator().manual_seed(123)
    data, labels = torch.randint(0, 16, (4, 16), generator=g), torch.arange(4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        noisy = torch.where(
            torch.rand(16, 16, generator=g) < 0.5, torch.randint(0, 16, (16, 16), generator=g), data.repeat(4, 1)
        )
        loss = torch.nn.functional.cross_entropy(
            model(noisy, labels.repeat(4)).flatten(0, 1), data.repeat(4, 1).flatten()
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    T = model.config.seq_len
    for init in jacobi.INITS:
        tokens, n_forward = jacobi_generate(
            model, labels.repeat(2), None, Params(), torch.Generator().manual_seed(0), window=16, init=init
        )
        assert (tokens == data.repeat(2, 1)).float().mean() > 0.9  # the model is confident (samples ~ memorised)
        assert n_forward <= T // 2, (init, n_forward)  # standard decoding: T = 16 forwards


# ---- refusals


def test_refusals():
    model = class_model()
    labels = torch.tensor([0, 1])
    g = torch.Generator().manual_seed(0)
    with pytest.raises(DigitError, match="window"):
        jacobi_generate(model, labels, None, Params(), g, window=0)
    with pytest.raises(DigitError, match="initialisation"):
        jacobi_generate(model, labels, None, Params(), g, init="zeros")
    with pytest.raises(DigitError, match="temperature"):
        jacobi_generate(model, labels, None, Params(temperature=-1.0), g)
    with pytest.raises(DigitError, match="n = 3"):
        jacobi_generate(model, labels, 3, Params(), g)
    with pytest.raises(DigitError, match="3 generators for 2 samples"):
        jacobi_generate(model, labels, None, Params(), [g, g, g])
    unconditional = randomized()
    with pytest.raises(DigitError, match="guidance"):
        jacobi_generate(unconditional, None, 2, Params(cfg_scale=2.0), g)
    assert jacobi_generate(unconditional, None, 2, Params(), g)[0].shape == (2, 16)
    nar = randomized(causal=False)
    with pytest.raises(DigitError, match="causal"):
        jacobi_generate(nar, None, 2, Params(), g)
