"""Continuous batching: per-row positions, requests admitted as slots free up, a request's tokens independent of the
others in the batch (the guarantee stated in `digit.sampling.engine`)."""

from __future__ import annotations

import pytest
import torch

from digit.errors import DigitError
from digit.models import GPT, build_config
from digit.sampling.engine import Engine, Request
from digit.sampling.params import SamplingParams
from test_sampling import class_model

T = 16  # the tiny preset's 4x4 grid


def prefix_model(seed=0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(build_config("tiny", cond="prefix", prefix_vocab_size=9, prefix_grid=(2, 2))).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def greedy_ok(model, tokens, cond) -> bool:
    """Greedy tokens must be the argmax of a plain full forward over themselves."""
    with torch.no_grad():
        return torch.equal(model(tokens.flatten(1), cond).argmax(-1), tokens.flatten(1))


@pytest.mark.parametrize("kind", ["class", "class-cfg", "prefix", "none"])
def test_staggered_greedy_equals_full_forward(kind):
    """Requests of several sizes through 3 slots: images enter at different steps and sit in different slots; every
    one must still be the greedy continuation of its own condition (per-row positions, masks, guidance)."""
    greedy = SamplingParams(temperature=0.0)
    if kind == "prefix":
        model = prefix_model(1)
        conds = [torch.tensor([1, 2, 3, 4]), torch.tensor([8, 0, 0, 5]), torch.tensor([7, 7, 1, 2])]
    elif kind == "none":
        model = GPT(build_config("tiny")).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.3)
        conds = [None, None, None]
    else:
        model = class_model(2)
        conds = [1, 3, 0]
    engine = Engine(model, slots=3, guided=kind == "class-cfg")
    reqs = [Request(cond=c, n=n, params=greedy, seed=i) for i, (c, n) in enumerate(zip(conds, (2, 3, 1)))]
    if kind == "class-cfg":
        s = SamplingParams(temperature=0.0, cfg_scale=3.0, cfg_schedule="linear")
        reqs[1] = Request(cond=3, n=3, params=s)
    out = engine.run(reqs)
    assert [f.tokens.shape for f in out] == [(2, 4, 4), (3, 4, 4), (1, 4, 4)]
    for r, f in zip(reqs, out):
        cond = None if r.cond is None else torch.as_tensor(r.cond).expand(r.n, *torch.as_tensor(r.cond).shape)
        if r.params.guided:  # every token the argmax of uncond + s_i (cond - uncond) on full forwards
            toks = f.tokens.flatten(1)
            with torch.no_grad():
                c, u = model(toks, cond), model(toks, torch.full_like(cond, 4))
            for i in range(T):
                s = 1.0 + (3.0 - 1.0) * i / T
                want = c[:, i] if s == 1.0 else u[:, i] + s * (c[:, i] - u[:, i])
                assert torch.equal(want.argmax(-1), toks[:, i]), i
        else:
            assert greedy_ok(model, f.tokens, cond)
    # one prefill per admission wave plus one decode per step; an image takes T - 1 steps (prefill and decode at once)
    assert engine.steps == 2 * (T - 1) and engine.forward_passes == 2 * T  # T - 1 steps per wave


def _mixed_run(model, target: Request, slots=3, delay=5):
    """Serve ``target`` among other requests: it arrives after ``delay`` steps, while the slots are busy."""
    engine = Engine(model, slots=slots)
    others = [
        Request(cond=0, n=2, params=SamplingParams(top_k=3, cfg_scale=2.0), seed=11),
        Request(cond=2, n=1, params=SamplingParams(temperature=0.5, top_p=0.7), seed=12),
    ]
    results = {}
    ids = [engine.submit(r) for r in others]
    for _ in range(delay):
        results.update({f.id: f for f in engine.step()})
    tid = engine.submit(target)
    ids.append(engine.submit(Request(cond=1, n=2, params=SamplingParams(cfg_scale=4.0, cfg_interval=2), seed=13)))
    while not engine.idle:
        results.update({f.id: f for f in engine.step()})
    assert set(results) == {*ids, tid}
    return results[tid].tokens


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0),  # greedy
        SamplingParams(temperature=1.0, top_k=8, top_p=0.9, cfg_scale=3.0, cfg_schedule="linear"),  # seeded sampling
        SamplingParams(temperature=0.8, cfg_scale=2.0, cfg_interval=4),
    ],
)
def test_request_tokens_identical_alone_and_mixed(params):
    model = class_model(3)
    target = Request(cond=3, n=3, params=params, seed=7)
    alone = Engine(model, slots=3).run([target])[0].tokens
    mixed = _mixed_run(model, target)
    assert torch.equal(alone, mixed)
    again = _mixed_run(model, target, delay=9)  # other slots, other neighbours, later arrival
    assert torch.equal(alone, again)
    # the seed matters (sampling) and image i is its own stream: the images of one request differ
    if params.temperature > 0:
        other_seed = Engine(model, slots=3).run([Request(cond=3, n=3, params=params, seed=8)])[0].tokens
        assert not torch.equal(alone, other_seed)
        assert not torch.equal(alone[0], alone[1])


def test_finished_requests_leave_without_stalling():
    model = class_model(4)
    engine = Engine(model, slots=2)
    short = engine.submit(Request(cond=0, n=1))
    long = engine.submit(Request(cond=1, n=3))
    finished_at = {}
    while not engine.idle:
        for f in engine.step():
            finished_at[f.id] = engine.steps
        assert engine.busy_slots <= 2
        if engine.steps == T:  # the short request's slot was taken at once by the long one's third image
            assert engine.busy_slots == 2
    # an image takes T - 1 steps (its admission step makes two tokens: prefill and decode)
    assert finished_at == {short: T - 1, long: 2 * (T - 1)}


def test_engine_refusals():
    model = class_model()
    with pytest.raises(DigitError, match="slots"):
        Engine(model, slots=0)
    with pytest.raises(DigitError, match="class- or text-conditional"):
        Engine(GPT(build_config("tiny")), slots=2, guided=True)
    with pytest.raises(DigitError, match="MaskGIT"):
        Engine(GPT(build_config("tiny", causal=False)), slots=2)
    unguided = Engine(model, slots=2, guided=False)
    with pytest.raises(DigitError, match="cfg_scale must be 1"):
        unguided.submit(Request(cond=0, params=SamplingParams(cfg_scale=2.0)))
    # a model whose null class was never trained runs unguided by default and cannot be made to guide
    untrained_null = class_model(class_dropout=0.0)
    assert not Engine(untrained_null, slots=2).guided and Engine(model, slots=2).guided
    with pytest.raises(DigitError, match="trained with class dropout"):
        Engine(untrained_null, slots=2, guided=True)
    engine = Engine(model, slots=2)
    with pytest.raises(DigitError, match="class id"):
        engine.submit(Request(cond=4))
    with pytest.raises(DigitError, match="class id"):
        engine.submit(Request(cond=[0, 1]))
    with pytest.raises(DigitError, match="n >= 1"):
        engine.submit(Request(cond=0, n=0))
    with pytest.raises(DigitError, match="SamplingParams"):
        engine.submit(Request(cond=0, params={"temperature": 1.0}))
    with pytest.raises(DigitError, match="prefix tokens"):
        Engine(prefix_model(), slots=1).submit(Request(cond=torch.tensor([1, 2, 3])))
    with pytest.raises(DigitError, match="no condition"):
        Engine(GPT(build_config("tiny")), slots=1).submit(Request(cond=1))
    assert engine.idle  # nothing refused was queued


def test_engine_compiled_step_equals_eager(monkeypatch):
    """compile=True runs the same one-function decode step (traced by dynamo with fullgraph=True; the eager backend
    spares the test inductor's C++ compilation) with per-row positions, and gives the eager engine's tokens."""
    import digit.sampling.generate as generate_module

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, **{**kw, "backend": "eager", "mode": None}))
    generate_module.compiled_decode_step.cache_clear()
    try:
        model = class_model(8)
        reqs = [Request(cond=1, n=2, params=SamplingParams(top_k=5, cfg_scale=2.0), seed=3), Request(cond=2, seed=4)]
        compiled = Engine(model, slots=2, compile=True).run(reqs)
        eager = Engine(model, slots=2).run(reqs)
    finally:
        generate_module.compiled_decode_step.cache_clear()
    assert all(torch.equal(a.tokens, b.tokens) for a, b in zip(compiled, eager))


def test_cancel_frees_slots_and_leaves_the_others_untouched():
    """A request cancelled mid-sampling leaves its slots (and the queue) at once; the others' tokens are those they
    get without it (a serving client that went away)."""
    model = class_model(5)
    keep = Request(cond=2, n=2, params=SamplingParams(top_k=4, cfg_scale=2.0), seed=21)
    alone = Engine(model, slots=3).run([keep])[0].tokens
    engine = Engine(model, slots=3)
    gone = engine.submit(Request(cond=1, n=4, seed=22))  # 3 images in slots, 1 waiting
    for _ in range(3):
        assert engine.step() == []
    assert engine.progress(gone) == (3 * 4, 4 * T) and engine.pending_images == 4  # 3 slots x (2 + 1 + 1) tokens
    kept = engine.submit(keep)
    assert engine.cancel(gone) and not engine.cancel(gone) and not engine.cancel(12345)
    assert engine.busy_slots == 0 and engine.pending_images == 2 and engine.progress(gone) == (0, 0)
    out = []
    while not engine.idle:
        out += engine.step()
        assert engine.stepped_slots <= 2
    assert [f.id for f in out] == [kept] and torch.equal(out[0].tokens, alone)


def test_finished_generators_continue_each_images_stream():
    """Finished.generators are the images' streams after their last token: the state `sample` leaves in fresh
    per-image generators, so a next stage continues them as `digit.pipeline.generate_images` does."""
    from digit.sampling.generate import sample
    from digit.sampling.seeds import image_generators

    model = class_model(6)
    params = SamplingParams(top_k=5, cfg_scale=2.0)
    f = Engine(model, slots=2).run([Request(cond=1, n=3, params=params, seed=4)])[0]
    gens = image_generators(4, range(3))
    offline = sample(model, torch.tensor([1, 1, 1]), 3, params, generator=gens).tokens
    assert torch.equal(offline, f.tokens)
    assert len(f.generators) == 3
    assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(f.generators, gens))
    assert not torch.equal(f.generators[0].get_state(), f.generators[1].get_state())
