"""One sampling-parameter set (validated once, same message everywhere), the per-row filters and the one decode step."""

from __future__ import annotations

import argparse
import inspect
import json
import math

import numpy as np
import pytest
import torch

import digit.sampling.generate as generate_module
from digit.cli import main
from digit.errors import DigitError
from digit.models import GPT
from digit.sampling import SamplingParams
from digit.sampling.filters import filter_logits, filter_logits_rows
from digit.sampling.generate import CachedDecoder, generate, sample
from digit.sampling.seeds import batch_ranges, image_seed
from test_sampling import class_model, write_run

# ---- the parameter type

BAD = [
    ("temperature", float("nan"), "temperature must be a finite number >= 0, got nan"),
    ("temperature", -1.0, "temperature must be a finite number >= 0, got -1.0"),
    ("temperature", float("inf"), "temperature must be a finite number >= 0, got inf"),
    ("cfg_scale", float("inf"), "cfg_scale must be a finite number >= 0 (1 = off), got inf"),
    ("cfg_scale", float("nan"), "cfg_scale must be a finite number >= 0 (1 = off), got nan"),
    ("cfg_scale", -2.0, "cfg_scale must be a finite number >= 0 (1 = off), got -2.0"),
    ("top_p", 0.0, "top_p must be a number in (0, 1] (1 = off), got 0.0"),
    ("top_p", float("nan"), "top_p must be a number in (0, 1] (1 = off), got nan"),
    ("top_p", 1.5, "top_p must be a number in (0, 1] (1 = off), got 1.5"),
    ("top_k", -1, "top_k must be an integer >= 0 (0 = off), got -1"),
    ("top_k", 2.5, "top_k must be an integer >= 0 (0 = off), got 2.5"),
    ("cfg_interval", -2, "cfg_interval must be an integer >= -1 (-1 = guide every token), got -2"),
    ("cfg_schedule", "cosine", "cfg_schedule must be one of constant, linear, got 'cosine'"),
    ("decode", "beam", "decode must be one of ar, jacobi, got 'beam'"),
    ("nar_steps", 0, "nar_steps must be an integer >= 1, got 0"),
    ("nar_temperature", float("-inf"), "nar_temperature must be a finite number >= 0, got -inf"),
]


@pytest.mark.parametrize("field,value,message", BAD)
def test_params_refuse_bad_values(field, value, message):
    with pytest.raises(DigitError) as e:
        SamplingParams(**{field: value})
    assert str(e.value).startswith(message)


def test_params_frozen_round_trip_and_unknown_keys():
    p = SamplingParams(temperature=0, top_k=100, top_p=0.9, cfg_scale=4, cfg_interval=10, cfg_schedule="linear")
    assert p.temperature == 0.0 and isinstance(p.temperature, float) and isinstance(p.cfg_scale, float)
    assert p.guided and not SamplingParams().guided
    d = p.to_dict()
    assert json.loads(json.dumps(d)) == d and SamplingParams.from_dict(d) == p
    with pytest.raises(DigitError, match="unknown sampling parameters: bogus"):
        SamplingParams.from_dict({**d, "bogus": 1})
    with pytest.raises(DigitError, match="temperature must be"):
        SamplingParams.from_dict({**d, "temperature": float("nan")})
    with pytest.raises(AttributeError):
        p.temperature = 2.0  # type: ignore[misc]
    assert p.replace(top_k=5).top_k == 5 and p.top_k == 100
    with pytest.raises(DigitError, match="top_k must be"):
        p.replace(top_k=-5)


def test_argparse_registration_with_prefix_and_base():
    parser = argparse.ArgumentParser()
    SamplingParams.add_arguments(parser, only=("temperature", "top_k", "cfg_scale", "cfg_schedule"))
    SamplingParams.add_arguments(parser, prefix="decoder-", only=("temperature", "top_p", "nar_steps"),
                                 aliases={"nar_steps": "--decoder-steps"})  # fmt: skip
    args = parser.parse_args(["--top-k", "7", "--cfg-schedule", "linear", "--decoder-temperature", "0.5",
                              "--decoder-steps", "3"])  # fmt: skip
    stage1 = SamplingParams.from_args(args)
    assert stage1 == SamplingParams(top_k=7, cfg_schedule="linear")
    base = SamplingParams(top_p=0.8)
    dec = SamplingParams.from_args(args, prefix="decoder-", base=base)
    assert dec == SamplingParams(top_p=0.8, temperature=0.5, nar_steps=3)  # untouched fields from base
    bad = parser.parse_args(["--decoder-temperature", "nan"])
    with pytest.raises(DigitError, match=r"^--decoder-temperature must be a finite number >= 0, got nan$"):
        SamplingParams.from_args(bad, prefix="decoder-")
    with pytest.raises(SystemExit):  # choices are enforced by argparse
        parser.parse_args(["--cfg-schedule", "cosine"])


# ---- the same refusal through every command


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--temperature", "nan", "--temperature must be a finite number >= 0, got nan"),
        ("--temperature", "-1", "--temperature must be a finite number >= 0, got -1.0"),
        ("--cfg-scale", "inf", "--cfg-scale must be a finite number >= 0 (1 = off), got inf"),
        ("--cfg-scale", "nan", "--cfg-scale must be a finite number >= 0 (1 = off), got nan"),
        ("--top-p", "nan", "--top-p must be a number in (0, 1] (1 = off), got nan"),
    ],
)
def test_sample_and_generate_refuse_with_the_same_message(tmp_path, capsys, flag, value, message):
    run = write_run(tmp_path / "run", class_model())
    assert main(["sample", "--run", str(run), "-n", "2", flag, value, "--out", str(tmp_path / "o")]) == 2
    assert _err(capsys) == f"digit sample: error: {message}"
    vq = tmp_path / "vq"
    vq.mkdir()
    assert main(["generate", "--stage1", str(run), "--vq", str(vq), "-n", "2", flag, value,
                 "--out", str(tmp_path / "g")]) == 2  # fmt: skip
    assert _err(capsys) == f"digit generate: error: {message}"
    dec_flag = flag.replace("--", "--decoder-")
    if dec_flag in ("--decoder-temperature", "--decoder-top-p"):
        assert main(["generate", "--stage1", str(run), "--vq", str(vq), "-n", "2", dec_flag, value,
                     "--out", str(tmp_path / "g")]) == 2  # fmt: skip
        assert _err(capsys) == f"digit generate: error: {message.replace('--', '--decoder-')}"
    assert not (tmp_path / "o").exists() and not (tmp_path / "g").exists()
    # the Python API: the same rule, named by the field
    field = flag[2:].replace("-", "_")
    with pytest.raises(DigitError, match=f"^{field} must be"):
        generate(class_model(), torch.tensor([0]), **{field: float(value)})


def test_generate_has_the_sample_flags():
    from digit.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    flags = {name: {o for a in sub.choices[name]._actions for o in a.option_strings} for name in ("sample", "generate")}
    shared = {"--temperature", "--top-k", "--top-p", "--cfg-scale", "--cfg-interval", "--cfg-schedule", "--decode"}
    assert shared <= flags["sample"] and shared <= flags["generate"]
    assert {"--decoder-temperature", "--decoder-top-k", "--decoder-top-p", "--decoder-steps"} <= flags["generate"]


# ---- per-row filters


def test_filter_rows_equals_the_scalar_filter_per_row():
    V = 50
    logits = torch.randn(7, V, generator=torch.Generator().manual_seed(0)) * 3
    rows = [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.6), (0.0, 3, 0.9), (2.0, V, 0.3), (1.0, 60, 1.0), (0.5, 12, 0.95)]
    temperature = torch.tensor([r[0] for r in rows])
    top_k = torch.tensor([r[1] for r in rows])
    top_p = torch.tensor([r[2] for r in rows])
    got = filter_logits_rows(logits, temperature, top_k, top_p, kmax=12, nucleus=True)
    for b, (t, k, p) in enumerate(rows):
        want = filter_logits(logits[b : b + 1], t, k, p)
        assert torch.equal(got[b : b + 1], want), b
    # no active filter: only the temperature, and no topk / sort at all
    plain = filter_logits_rows(logits, temperature, torch.zeros(7, dtype=torch.long), torch.ones(7), kmax=0,
                               nucleus=False)  # fmt: skip
    assert torch.equal(plain, logits / temperature.clamp(min=1e-5)[:, None])


# ---- the one decode step


def test_model_knows_nothing_of_the_sampler():
    import digit.models.gpt as gpt

    assert not hasattr(GPT, "generate")
    source = inspect.getsource(gpt)
    assert "from digit.sampling" not in source and "import digit.sampling" not in source


class Wrapped:
    """Only what CachedDecoder states, delegated to a GPT: the sampler must need nothing else."""

    def __init__(self, model: GPT) -> None:
        self._m, self.config, self.condition = model, model.config, model.condition

    @property
    def training(self) -> bool:
        return self._m.training

    def parameters(self, recurse: bool = True):
        return self._m.parameters(recurse)

    def train(self, mode: bool = True):
        return self._m.train(mode)

    def setup_cache(self, batch, dtype=None, device=None):
        self._m.setup_cache(batch, dtype, device)

    def clear_cache(self):
        self._m.clear_cache()

    def prefill(self, cond, batch):
        return self._m.prefill(cond, batch)

    def decode_step(self, tokens, input_pos, kv_len=None):
        return self._m.decode_step(tokens, input_pos, kv_len)


def test_sampler_needs_only_the_protocol():
    model = class_model(3)
    wrapped: CachedDecoder = Wrapped(model)
    labels = torch.tensor([0, 2, 1])
    p = SamplingParams(top_k=6, cfg_scale=2.5, cfg_schedule="linear")
    a = sample(wrapped, labels, None, p, generator=torch.Generator().manual_seed(4))
    b = sample(model, labels, None, p, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.tokens, b.tokens) and a.tokens.shape == (3, 4, 4)
    assert a.forward_passes == b.forward_passes == model.config.seq_len  # prefill + seq_len - 1 steps
    with pytest.raises(DigitError, match="n must be an int"):  # parameters passed where n goes
        sample(model, labels, p)  # type: ignore[arg-type]


def test_decode_step_compiled_once_and_equal_to_eager(monkeypatch):
    """compile=True builds the compiled step once (not per call; eager backend here: the real dynamo trace with
    fullgraph=True, without inductor's minutes of C++ compilation) and samples the same tokens as eager."""
    built = []
    real_compile = torch.compile

    def counting(fn, **kw):
        built.append(kw)
        return real_compile(fn, **{**kw, "backend": "eager", "mode": None})

    monkeypatch.setattr(torch, "compile", counting)
    generate_module.compiled_decode_step.cache_clear()
    try:
        model = class_model(5)
        labels = torch.tensor([1, 3])
        p = SamplingParams(top_k=4, top_p=0.9, cfg_scale=3.0, cfg_interval=5)
        runs = [
            sample(model, labels, None, p, generator=torch.Generator().manual_seed(s), compile=True) for s in (0, 0)
        ]
        runs.append(sample(model, torch.tensor([0, 1, 2]), None, p, compile=True))  # another batch size
        eager = sample(model, labels, None, p, generator=torch.Generator().manual_seed(0))
    finally:
        generate_module.compiled_decode_step.cache_clear()
    assert len(built) == 1 and built[0]["fullgraph"] is True
    assert torch.equal(runs[0].tokens, runs[1].tokens) and torch.equal(runs[0].tokens, eager.tokens)


# ---- per-image seeds


def test_image_seeds_and_batch_ranges():
    seeds = {image_seed(s, i) for s in (0, 1, -1, 2**40) for i in range(50)}
    assert len(seeds) == 200 and all(0 <= x < 2**63 for x in seeds)
    assert image_seed(3, 7) == image_seed(3, 7)
    assert batch_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    shards = [batch_ranges(10, 3, r, 3) for r in range(3)]
    assert shards == [[(0, 3), (9, 10)], [(3, 6)], [(6, 9)]]
    assert sorted(x for s in shards for x in s) == batch_ranges(10, 3)
    with pytest.raises(ValueError):
        batch_ranges(3, 0)


def test_sample_tokens_do_not_depend_on_the_batch_size(tmp_path):
    from digit.data.tokens import read_token_dir

    run = write_run(tmp_path / "run", class_model())
    base = ["sample", "--run", str(run), "-n", "7", "--top-k", "10", "--cfg-scale", "2", "--seed", "9"]
    assert main([*base, "--batch-size", "2", "--out", str(tmp_path / "a")]) == 0
    assert main([*base, "--batch-size", "7", "--out", str(tmp_path / "b")]) == 0
    a, b = read_token_dir(tmp_path / "a"), read_token_dir(tmp_path / "b")
    assert np.array_equal(a.tokens, b.tokens)
    T = 16
    assert a.meta["sampling"]["forward_passes"] == 4 * T and b.meta["sampling"]["forward_passes"] == T
    assert SamplingParams.from_dict({k: a.meta["sampling"][k] for k in SamplingParams().to_dict()}) == SamplingParams(
        top_k=10, cfg_scale=2.0
    )
    # --classes alone: one sample per listed class (as in `digit generate`); with -n: round-robin over them
    assert main(["sample", "--run", str(run), "--classes", "2", "0", "--out", str(tmp_path / "c")]) == 0
    assert read_token_dir(tmp_path / "c").labels.tolist() == [2, 0]
    assert main(["sample", "--run", str(run), "--classes", "2", "0", "-n", "3", "--out", str(tmp_path / "d")]) == 0
    assert read_token_dir(tmp_path / "d").labels.tolist() == [2, 0, 2]


def test_guidance_values_are_used_not_only_validated():
    model = class_model(6)
    labels = torch.tensor([0, 1, 2, 3])
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    plain = generate(model, labels, temperature=0.0, generator=g())
    guided = generate(model, labels, temperature=0.0, cfg_scale=3.0, generator=g())
    interval = generate(model, labels, temperature=0.0, cfg_scale=3.0, cfg_interval=0, generator=g())
    assert not torch.equal(plain, guided)
    # cfg_interval 0 guides tokens 0 and 1 only: those match the guided run, and the rest follow from them greedily
    assert torch.equal(interval.flatten(1)[:, :2], guided.flatten(1)[:, :2])
    assert math.isclose(SamplingParams(cfg_scale=3).cfg_scale, 3.0)


def test_decode_jacobi_through_sample_and_the_cli(tmp_path):
    """--decode jacobi: greedy Jacobi decoding gives the greedy AR tokens, with at most as many forward passes
    (recorded in meta.json for both modes)."""
    from digit.data.tokens import read_token_dir

    model = class_model(7)
    labels = torch.tensor([0, 1, 2])
    ar = sample(model, labels, None, SamplingParams(temperature=0.0))
    jac = sample(model, labels, None, SamplingParams(temperature=0.0, decode="jacobi"))
    assert torch.equal(ar.tokens, jac.tokens) and ar.forward_passes == 16 and 1 < jac.forward_passes <= 16
    run = write_run(tmp_path / "run", model)
    base = ["sample", "--run", str(run), "-n", "3", "--temperature", "0", "--batch-size", "3"]
    assert main([*base, "--out", str(tmp_path / "ar")]) == 0
    assert main([*base, "--decode", "jacobi", "--out", str(tmp_path / "jac")]) == 0
    a, j = read_token_dir(tmp_path / "ar"), read_token_dir(tmp_path / "jac")
    assert np.array_equal(a.tokens, j.tokens)
    assert j.meta["sampling"]["decode"] == "jacobi" and a.meta["sampling"]["decode"] == "ar"
    assert a.meta["sampling"]["forward_passes"] == 16 and j.meta["sampling"]["forward_passes"] == jac.forward_passes
    with pytest.raises(DigitError, match="Jacobi decoding"):
        sample(model, labels, None, SamplingParams(decode="jacobi"), compile=True)
