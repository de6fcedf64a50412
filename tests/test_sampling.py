"""Sampling: filters against brute-force definitions, CFG through the model path, reproducibility, `digit sample`."""

import json

import numpy as np
import pytest
import torch

from digit.cli import main
from digit.errors import DigitError
from digit.models import GPT, build_config
from digit.sampling import (
    apply_temperature,
    cfg,
    cfg_scale_at,
    filter_logits,
    sample_from_logits,
    top_k_filter,
    top_p_filter,
)
from digit.sampling.generate import generate
from digit.utils.io import atomic_save_safetensors

NEG = float("-inf")


def logits_batch(seed=0, B=6, V=40):
    return torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * 2


# ---- pure filters against brute force


@pytest.mark.parametrize("k", [1, 3, 17, 39, 40, 100])
def test_top_k_matches_brute_force(k):
    x = logits_batch(1)
    got = top_k_filter(x, k)
    for b in range(x.shape[0]):
        for i in range(x.shape[1]):
            n_greater = int((x[b] > x[b, i]).sum())
            keep = n_greater < k
            assert (got[b, i] == x[b, i]) if keep else (got[b, i] == NEG)
    assert torch.equal(top_k_filter(x, 0), x)
    with pytest.raises(ValueError):
        top_k_filter(x, -1)


@pytest.mark.parametrize("p", [1e-6, 0.1, 0.5, 0.9, 0.999, 1.0])
def test_top_p_matches_brute_force(p):
    x = logits_batch(2)
    got = top_p_filter(x, p)
    probs = x.double().softmax(-1)
    for b in range(x.shape[0]):
        for i in range(x.shape[1]):
            mass_before = float(probs[b][probs[b] > probs[b, i]].sum())  # tokens ranked strictly above i
            keep = mass_before < p
            assert (got[b, i] == x[b, i]) if keep else (got[b, i] == NEG), (b, i, mass_before)
        kept = probs[b][got[b] > NEG]
        assert kept.sum() >= min(p, 1.0) - 1e-6  # reaches p ...
        assert kept.sum() - kept.min() < p or len(kept) == 1  # ... and is the smallest such set
    with pytest.raises(ValueError):
        top_p_filter(x, 0.0)
    with pytest.raises(ValueError):
        top_p_filter(x, 1.5)


def test_filter_order_temperature_then_k_then_p_renormalised():
    x = logits_batch(3)
    got = filter_logits(x, temperature=0.7, top_k=10, top_p=0.8)
    want = top_p_filter(top_k_filter(x / 0.7, 10), 0.8)
    assert torch.equal(got, want)
    # top-p after top-k sees probabilities renormalised over the k survivors
    kept = (got > NEG).sum(-1)
    assert (kept <= 10).all() and (kept >= 1).all()
    torch.testing.assert_close(apply_temperature(x, 0.0), x / 1e-5)


def test_cfg_formula_and_schedule():
    c, u = logits_batch(4), logits_batch(5)
    torch.testing.assert_close(cfg(c, u, 4.0), u + 4.0 * (c - u))
    torch.testing.assert_close(cfg(c, u, 1.0), c)
    assert cfg_scale_at(5, 16, 4.0) == 4.0
    assert [cfg_scale_at(i, 4, 3.0, schedule="linear") for i in range(4)] == [1.0, 1.5, 2.0, 2.5]
    # LlamaGen's cfg_interval=3 guides tokens 0..4 (prefill + decode steps 0..3)
    assert cfg_scale_at(4, 16, 4.0, interval=3) == 4.0 and cfg_scale_at(5, 16, 4.0, interval=3) == 1.0
    with pytest.raises(ValueError):
        cfg_scale_at(0, 4, 2.0, schedule="cosine")


def test_sample_from_logits_follows_the_distribution():
    x = torch.tensor([[0.0, 1.0, 2.0, float("-inf"), -1.0]]).repeat(40000, 1)
    draws = sample_from_logits(x, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=5).double() / len(draws)
    torch.testing.assert_close(freq, x[0].double().softmax(-1), atol=0.01, rtol=0)
    assert freq[3] == 0


# ---- through the model


def class_model(seed=0, **kw) -> GPT:
    torch.manual_seed(seed)
    model = GPT(build_config("tiny", cond="class", num_classes=4, **kw)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("schedule,interval", [("constant", -1), ("linear", -1), ("constant", 6)])
def test_cfg_through_the_model(schedule, interval):
    """Near-greedy sampling: every token must be the argmax of uncond + s_i * (cond - uncond) where the two logit
    sets come from plain full forwards on the generated grid with the labels and with the null class."""
    model, s = class_model(), 3.0
    labels = torch.tensor([0, 1, 2, 3, 1])
    grids = generate(
        model,
        cond=labels,
        temperature=1e-7,
        cfg_scale=s,
        cfg_schedule=schedule,
        cfg_interval=interval,
        generator=torch.Generator().manual_seed(0),
    )
    tokens = grids.flatten(1)
    with torch.no_grad():
        cond_logits, null_logits = model(tokens, labels), model(tokens, torch.full_like(labels, 4))
    T = tokens.shape[1]
    for i in range(T):
        scale = cfg_scale_at(i, T, s, interval, schedule)
        guided = null_logits[:, i] + scale * (cond_logits[:, i] - null_logits[:, i])
        assert torch.equal(guided.argmax(-1), tokens[:, i]), i
    # guidance changes the result compared to the conditional model alone
    plain = generate(model, cond=labels, temperature=1e-7).flatten(1)
    assert not torch.equal(plain, tokens)


def test_unguided_greedy_equals_full_forward_argmax():
    model = class_model(1)
    labels = torch.tensor([3, 0])
    tokens = generate(model, cond=labels, temperature=0.0).flatten(1)
    with torch.no_grad():
        assert torch.equal(model(tokens, labels).argmax(-1), tokens)


def test_generate_reproducible_and_top_k_respected():
    model = class_model(2)
    labels = torch.tensor([0, 1, 2, 3])
    run = lambda seed, **kw: generate(model, cond=labels, generator=torch.Generator().manual_seed(seed), **kw)  # noqa: E731
    a, b, c = run(7, top_k=5), run(7, top_k=5), run(8, top_k=5)
    assert a.shape == (4, 4, 4) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    tokens = a.flatten(1)
    with torch.no_grad():
        logits = model(tokens, labels)
    rank = (logits > logits.gather(-1, tokens[..., None])).sum(-1)
    assert int(rank.max()) < 5  # every sampled token is within the top 5
    # unconditional models take n
    unc = GPT(build_config("tiny")).eval()
    assert generate(unc, n=3, generator=torch.Generator().manual_seed(0)).shape == (3, 4, 4)


def test_generate_refusals():
    model = class_model()
    labels = torch.tensor([0])
    with pytest.raises(DigitError, match=r"top_p must be a number in \(0, 1\]"):
        generate(model, labels, top_p=0.0)
    with pytest.raises(DigitError, match="top_k must be an integer >= 0"):
        generate(model, labels, top_k=-1)
    with pytest.raises(DigitError, match="class-conditional"):
        generate(GPT(build_config("tiny")), n=2, cfg_scale=2.0)
    with pytest.raises(DigitError, match="n >= 1"):
        generate(GPT(build_config("tiny")))
    # guidance against a null class that was never trained (DiGIT's converted stage 1), or for a MaskGIT-style model
    # whose decoding never reads the scale, is refused rather than silently meaningless
    with pytest.raises(DigitError, match="trained with class dropout"):
        generate(class_model(class_dropout=0.0), labels, cfg_scale=2.0)
    assert generate(class_model(class_dropout=0.0), labels, cfg_scale=1.0).shape == (1, 4, 4)
    with pytest.raises(DigitError, match="autoregressive models, not MaskGIT"):
        generate(class_model(causal=False), labels, cfg_scale=2.0)


def test_official_sampling_at_temperature_zero_is_greedy_not_nan():
    from digit.sampling.official import fairseq_log_probs

    logits = torch.tensor([[0.1, 2.0, -1.0, 0.5, 9.0], [3.0, -2.0, 0.0, 4.0, 1.0]])
    lp = fairseq_log_probs(logits, n_codes=4, temperature=0.0)
    assert torch.isfinite(lp[:, :4]).any(-1).all() and not torch.isnan(lp).any()
    assert lp[:, :4].argmax(-1).tolist() == [1, 3] and (lp[:, 4:] == NEG).all()


# ---- the CLI


def write_run(path, model: GPT, class_dropout=None):
    cfg = model.config.to_dict()
    if class_dropout is not None:
        cfg["class_dropout"] = class_dropout
    meta = {
        "grid": [4, 4],
        "vocab_size": 64,
        "num_classes": 4,
        "class_names": ["a", "b", "c", "d"],
        "tokenizer": {"type": "discriminative", "k": 64},
        "views": ["orig"],
        "n_images": 10,
    }
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model": cfg, "train": {}, "data": {"meta": meta}, "task": "gpt"}))
    atomic_save_safetensors(path / "model.safetensors", model.state_dict())
    return path


def test_cli_sample_writes_token_dir(tmp_path):
    from digit.data.tokens import read_token_dir

    run = write_run(tmp_path / "run", class_model())
    argv = [
        "sample",
        "--run",
        str(run),
        "--classes",
        "1",
        "3",
        "--per-class",
        "3",
        "--cfg-scale",
        "2",
        "--top-k",
        "8",
        "--seed",
        "5",
        "--batch-size",
        "4",
        "--device",
        "cpu",
    ]
    assert main([*argv, "--out", str(tmp_path / "s1")]) == 0
    assert main([*argv, "--out", str(tmp_path / "s2")]) == 0
    d1, d2 = read_token_dir(tmp_path / "s1"), read_token_dir(tmp_path / "s2")
    assert d1.tokens.shape == (6, 4, 4) and np.array_equal(d1.tokens, d2.tokens)  # same seed, same tokens
    assert d1.labels.tolist() == [1, 1, 1, 3, 3, 3]
    assert d1.meta["tokenizer"] == {"type": "discriminative", "k": 64} and d1.class_names == ["a", "b", "c", "d"]
    assert d1.meta["sampling"]["cfg_scale"] == 2.0 and d1.meta["sampling"]["classes"] == [1, 3]
    assert d1.meta["n_images"] == 6 and d1.vocab_size == 64
    # -n round-robins over every class
    assert main(["sample", "--run", str(run), "-n", "6", "--out", str(tmp_path / "s3")]) == 0
    assert read_token_dir(tmp_path / "s3").labels.tolist() == [0, 1, 2, 3, 0, 1]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--classes", "4", "-n", "2"], "class id 4 was not trained"),
        (["-n", "2", "--top-p", "0"], "--top-p must be a number in (0, 1]"),
        (["-n", "2", "--top-p", "1.5"], "--top-p must be a number in (0, 1]"),
        (["-n", "2", "--top-k", "-3"], "--top-k must be an integer >= 0"),
        (["-n", "0"], "-n must be positive"),
        (["-n", "2", "--cfg-scale", "3"], "class dropout"),
    ],
)
def test_cli_refusals(tmp_path, capsys, extra, message):
    run = write_run(tmp_path / "run", class_model(), class_dropout=0.0)
    assert main(["sample", "--run", str(run), *extra, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_cli_prefix_model_needs_prefix_tokens(tmp_path, capsys):
    from digit.data.tokens import read_token_dir, write_token_dir

    torch.manual_seed(0)
    model = GPT(build_config("tiny", cond="prefix", prefix_vocab_size=9, prefix_grid=(2, 2))).eval()
    run = write_run(tmp_path / "run", model)
    assert main(["sample", "--run", str(run), "-n", "2", "--out", str(tmp_path / "o")]) == 2
    assert "--prefix-tokens" in capsys.readouterr().err
    pre = write_token_dir(tmp_path / "pre", np.arange(12).reshape(3, 2, 2) % 9, np.array([0, 1, 2]), vocab_size=9)
    assert main(["sample", "--run", str(run), "--prefix-tokens", str(pre), "--out", str(tmp_path / "o")]) == 0
    out = read_token_dir(tmp_path / "o")
    assert out.tokens.shape == (3, 4, 4) and out.labels.tolist() == [0, 1, 2]
