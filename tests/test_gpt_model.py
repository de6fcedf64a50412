"""The GPT on tiny fp32 models: causality, KV-cache equivalence, NAR bidirectionality, hidden states, parameter
counts of the paper presets (on the meta device), state-dict names, a direct fairseq-layer formula, run loading."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from digit.errors import DigitError
from digit.models import GPT, GPTConfig, build_config, layers, load_gpt_run
from digit.models.presets import PRESETS, register_preset
from digit.sampling.generate import generate
from digit.utils.io import atomic_save_safetensors

ARCHS = ["llama", "fairseq"]
CONDS = ["none", "class", "prefix"]
V, NC, PV = 64, 5, 11  # tiny vocab, classes, prefix vocab


def tiny(arch="llama", cond="none", **kw):
    extra = {"class": {"num_classes": NC}, "prefix": {"prefix_vocab_size": PV, "prefix_grid": (2, 3)}}.get(cond, {})
    return build_config("tiny", arch=arch, cond=cond, **extra, **kw)


def randomized(cfg: GPTConfig, seed: int = 0) -> GPT:
    """Random weights everywhere (the LlamaGen init zeroes the head, which would make equalities trivial)."""
    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def make_cond(cfg: GPTConfig, B: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    if cfg.cond == "class":
        return torch.randint(0, cfg.num_classes, (B,), generator=g)
    if cfg.cond == "prefix":
        return torch.randint(0, cfg.prefix_vocab_size, (B, cfg.prefix_len), generator=g)
    return None


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("cond", CONDS)
def test_causality(arch, cond):
    model = randomized(tiny(arch, cond))
    B, T = 2, model.config.seq_len
    tokens = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(2))
    c = make_cond(model.config, B)
    with torch.no_grad():
        base = model(tokens, c)
        assert base.shape == (B, T, V) and base.dtype == torch.float32
        for t in range(T):
            changed = tokens.clone()
            changed[:, t] = (changed[:, t] + 1) % V
            out = model(changed, c)
            torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], atol=0, rtol=0)  # positions <= t untouched
            if t < T - 1:
                assert (out[:, t + 1 :] - base[:, t + 1 :]).abs().max() > 1e-4  # and the change is seen later


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("cond", CONDS)
def test_kv_cache_matches_full_forward(arch, cond, monkeypatch):
    model = randomized(tiny(arch, cond), seed=3)
    cfg = model.config
    B, T, C = 3, cfg.seq_len, cfg.cond_len
    tokens = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(4))
    c = make_cond(cfg, B)

    def decode_all(kv_len_given: bool) -> torch.Tensor:
        steps = [model.prefill(c, B)]
        for i in range(T - 1):
            kv_len = C + i + 1 if kv_len_given else None
            steps.append(model.decode_step(tokens[:, i : i + 1], torch.tensor([C + i]), kv_len))
        return torch.stack(steps, dim=1)

    with torch.no_grad():
        full = model(tokens, c)
        model.setup_cache(B)
        given = decode_all(True)  # the caller says how many entries are filled
        read = decode_all(False)  # positions on the CPU: the model reads the filled length itself
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        static = decode_all(False)  # as under torch.compile: the whole static cache through the mask
    torch.testing.assert_close(given, full, atol=1e-5, rtol=1e-5)
    assert torch.equal(read, given)  # the same computation
    torch.testing.assert_close(static, given, atol=1e-6, rtol=1e-6)
    # the cache is non-persistent: never part of the weights
    assert not any("cache" in k for k in model.state_dict())


def test_decode_reads_only_the_filled_cache_entries(monkeypatch):
    """Entries past the position are never read: garbage there changes nothing on the sliced path (and nothing on
    the masked path either, where the mask removes it)."""
    model = randomized(tiny("llama", "class"), seed=5)
    C = model.config.cond_len
    tokens = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(6))
    labels = torch.tensor([1, 3])
    seen = []
    orig = F.scaled_dot_product_attention

    orig_decode = layers.decode_attention  # one query per row on the CPU: two matmuls instead of SDPA

    def spy(q, k, v, **kw):
        seen.append((k.shape[2], kw.get("attn_mask") is not None))
        return orig(q, k, v, **kw)

    def spy_decode(q, k, v):
        seen.append((k.shape[2], False))
        return orig_decode(q, k, v)

    with torch.no_grad():
        full = model(tokens, labels)
        model.setup_cache(2)
        model.prefill(labels, 2)
        for i in range(5):
            model.decode_step(tokens[:, i : i + 1], torch.tensor([C + i]))
        for blk in model.blocks:  # poison everything after position C + 4
            blk.attn.kv_cache.k_cache[:, :, C + 5 :] = float("nan")
        monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
        monkeypatch.setattr(layers, "decode_attention", spy_decode)
        out = model.decode_step(tokens[:, 5:6], torch.tensor([C + 5]))
        assert seen == [(C + 6, False)] * model.config.n_layers  # C + 6 entries read, no mask
        torch.testing.assert_close(out, full[:, 6], atol=1e-5, rtol=1e-5)
        # a chunk of three tokens re-fed at positions C + 3.. C + 5 reads C + 6 entries under the causal mask
        seen.clear()
        out = model.decode_step(tokens[:, 3:6], torch.arange(C + 3, C + 6))
        assert seen == [(C + 6, True)] * model.config.n_layers
        torch.testing.assert_close(out, full[:, 6], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("cond", CONDS)
def test_per_row_positions_match_full_forward(arch, cond):
    """decode_step with positions [B, 1]: rows at different steps (continuous batching) each see only their own
    filled cache entries; rows not decoding write junk at a position they overwrite before they ever read it."""
    model = randomized(tiny(arch, cond), seed=6)
    cfg = model.config
    B, T, C = 3, cfg.seq_len, cfg.cond_len
    tokens = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(7))
    c = make_cond(cfg, B)
    delay = [0, 2, 5]
    with torch.no_grad():
        full = model(tokens, c)
        model.setup_cache(B)
        first = model.prefill(c, B)
        got = [[first[b]] for b in range(B)]
        for step in range(T - 1 + max(delay)):
            index = [step - d for d in delay]
            live = [0 <= i < T - 1 for i in index]
            fed = torch.tensor([[int(tokens[b, i]) if live[b] else 5] for b, i in enumerate(index)])
            pos = torch.tensor([[C + i if live[b] else C + T - 2] for b, i in enumerate(index)])
            logits = model.decode_step(fed, pos)
            for b in range(B):
                if live[b]:
                    got[b].append(logits[b])
    torch.testing.assert_close(torch.stack([torch.stack(g) for g in got]), full, atol=1e-5, rtol=1e-5)


def test_nar_is_bidirectional_with_mask_token():
    model = randomized(tiny("llama", "class", causal=False))
    assert model.mask_token_id == V and model.token_embed.weight.shape[0] == V + 1
    tokens = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(5))
    tokens[:, 8:] = model.mask_token_id
    labels = torch.tensor([0, 1])
    with torch.no_grad():
        base = model(tokens, labels)
        changed = tokens.clone()
        changed[:, 12] = 3  # a later position changes earlier logits
        assert (model(changed, labels)[:, :12] - base[:, :12]).abs().max() > 1e-4
    with pytest.raises(DigitError):
        model.setup_cache(2)
    grids = generate(model, cond=labels, generator=torch.Generator().manual_seed(0))
    assert grids.shape == (2, 4, 4) and int(grids.max()) < V  # every mask resolved


@pytest.mark.parametrize("arch", ARCHS)
def test_hidden_states(arch):
    model = randomized(tiny(arch, "class"))
    cfg = model.config
    tokens = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(6))
    labels = torch.tensor([1, 4])
    with torch.no_grad():
        states = model.hidden_states(tokens, labels)
        logits = model(tokens, labels)
    assert len(states) == cfg.n_layers + 1
    assert all(s.shape == (2, cfg.cond_len + 16, cfg.dim) for s in states)
    C = cfg.cond_len
    torch.testing.assert_close(model.head(states[-1])[:, C - 1 : C - 1 + 16].float(), logits, atol=1e-5, rtol=1e-5)


def test_fairseq_layer_matches_direct_formula():
    cfg = tiny("fairseq", "none", n_layers=1, bos_id=2)
    model = randomized(cfg, seed=7)
    d, H = cfg.dim, cfg.n_heads
    tokens = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(8))
    inp = torch.cat([torch.full((2, 1), 2), tokens[:, :-1]], 1)  # </s> is the start token
    L = inp.shape[1]
    x = math.sqrt(d) * model.token_embed.weight[inp] + model.pos_embed.weight[2 : 2 + L]
    lay = model.blocks[0]
    (wq, wk, wv), (bq, bk, bv) = lay.attn.qkv.weight.chunk(3), lay.attn.qkv.bias.chunk(3)
    q = (x @ wq.T + bq).view(2, L, H, -1).transpose(1, 2)
    k = (x @ wk.T + bk).view(2, L, H, -1).transpose(1, 2)
    v = (x @ wv.T + bv).view(2, L, H, -1).transpose(1, 2)
    scores = (q * (d // H) ** -0.5) @ k.transpose(-1, -2)
    scores = scores.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
    a = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, L, d)
    a = a @ lay.attn.proj.weight.T + lay.attn.proj.bias
    ln = lambda y, m: F.layer_norm(y, (d,), m.weight, m.bias, 1e-5)  # noqa: E731
    x = ln(x + a, lay.attn_norm)  # post-norm
    hid = (
        0.5
        * (x @ lay.mlp.up.weight.T + lay.mlp.up.bias)
        * (1 + torch.erf((x @ lay.mlp.up.weight.T + lay.mlp.up.bias) / math.sqrt(2)))
    )
    x = ln(x + hid @ lay.mlp.down.weight.T + lay.mlp.down.bias, lay.mlp_norm)
    want = x @ model.head.weight.T  # no final LayerNorm, bias-free head
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), want, atol=1e-4, rtol=1e-4)


def test_parameter_counts_of_paper_presets():
    with torch.device("meta"):
        digit = GPT(build_config("digit-base", vocab_size=8197, bos_id=2))
        gptb = GPT(build_config("gpt-b", vocab_size=16384, cond="class", num_classes=1000))
    assert digit.num_params() == 219_377_664
    assert digit.token_embed.weight.shape == (8197, 1024) and digit.pos_embed.weight.shape == (1026, 1024)
    assert gptb.num_params() == 110_888_448
    with torch.device("meta"):  # DiGIT stage 2: both fairseq position tables have max_positions + 2 rows
        stage2 = GPT(build_config("digit-base", cond="prefix", prefix_vocab_size=8192, prefix_grid=(16, 16)))
    assert stage2.prefix_pos_embed.weight.shape == stage2.pos_embed.weight.shape == (1026, 1024)
    assert gptb.condition.table.weight.shape == (1001, 768)
    assert gptb.blocks[0].mlp.gate.weight.shape == (2048, 768)
    # the other LlamaGen sizes, as their README rounds them
    for name, millions in [("gpt-l", 342.9), ("gpt-xl", 774.7), ("gpt-xxl", 1411), ("gpt-3b", 3100)]:
        cfg = build_config(name, cond="class", num_classes=1000)
        with torch.device("meta"):
            n = GPT(cfg).num_params() / 1e6
        assert abs(n - millions) / millions < 0.003, (name, n)
    assert build_config("gpt-3b").head_dim == 100 and build_config("gpt-3b").hidden_dim == 8704


def test_state_dict_names():
    """One naming whatever the layout; only behaviour switches change which tensors exist."""
    llama = GPT(tiny("llama", "class")).state_dict()
    assert set(llama) == {
        "token_embed.weight",
        "condition.table.weight",
        "final_norm.weight",
        "head.weight",
        *(f"blocks.{i}.{n}.weight" for i in range(2) for n in
          ("attn_norm", "attn.qkv", "attn.proj", "mlp_norm", "mlp.gate", "mlp.up", "mlp.down")),
    }  # fmt: skip
    fs = GPT(tiny("fairseq", "prefix", norm_first=True)).state_dict()
    block = [f"blocks.0.{n}.{w}" for n in ("attn_norm", "attn.qkv", "attn.proj", "mlp_norm", "mlp.up", "mlp.down")
             for w in ("weight", "bias")]  # fmt: skip
    for key in ["token_embed.weight", "pos_embed.weight", "prefix_pos_embed.weight", "condition.start",
                "condition.table.weight", "final_norm.weight", "final_norm.bias", "head.weight", *block]:  # fmt: skip
        assert key in fs, key
    assert "head.bias" not in fs and "blocks.0.mlp.gate.weight" not in fs
    assert not any(k.startswith(("rope", "causal_mask")) for k in llama)
    assert "final_norm.weight" not in GPT(tiny("fairseq", "none")).state_dict()  # post-norm: no final norm
    assert GPT(tiny("llama", "none")).state_dict().keys() >= {"condition.start"}


def test_class_dropout_only_in_training():
    model = randomized(tiny("llama", "class", class_dropout=0.5))
    tokens = torch.randint(0, V, (64, 16), generator=torch.Generator().manual_seed(9))
    labels = torch.zeros(64, dtype=torch.long)
    with torch.no_grad():
        cond_logits = model(tokens, labels)
        null_logits = model(tokens, torch.full((64,), NC))
        model.train()  # the tiny preset has no other dropout
        torch.manual_seed(0)
        train_logits = model(tokens, labels)
    dropped = (train_logits - null_logits).abs().amax(dim=(1, 2)) < 1e-5
    kept = (train_logits - cond_logits).abs().amax(dim=(1, 2)) < 1e-5
    assert bool((dropped | kept).all()) and 10 < int(dropped.sum()) < 54


def test_config_round_trip_and_errors():
    cfg = tiny("fairseq", "prefix")
    again = GPTConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.grid == (4, 4) and again.prefix_grid == (2, 3)
    with pytest.raises(DigitError, match="unknown GPT config keys"):
        GPTConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(DigitError, match="unknown model preset"):
        build_config("gpt-zz")
    register_preset("test-mini", arch="fairseq", vocab_size=32, grid=(2, 2), dim=32, n_layers=1, n_heads=2)
    try:
        assert build_config("test-mini").hidden_dim == 128
        with pytest.raises(DigitError, match="already exists"):
            register_preset("test-mini", vocab_size=32, grid=(2, 2))
    finally:
        PRESETS.pop("test-mini")
    with pytest.raises(DigitError, match="divisible"):
        build_config("tiny", heads=5)
    c = build_config("gpt-b", dim=256, layers=2, heads=4)
    assert (c.dim, c.n_layers, c.n_heads, c.hidden_dim) == (256, 2, 4, 768)
    assert build_config("digit-base", dim=512).hidden_dim == 2048
    with pytest.raises(DigitError, match="class-conditional model needs labels"):
        GPT(tiny("llama", "class"))(torch.zeros(1, 16, dtype=torch.long))


def test_load_gpt_run(tmp_path):
    model = randomized(tiny("fairseq", "class"))
    (tmp_path / "config.json").write_text(json.dumps({"model": model.config.to_dict(), "train": {}, "data": {}}))
    with pytest.raises(DigitError, match="missing model.safetensors"):
        load_gpt_run(tmp_path)
    atomic_save_safetensors(tmp_path / "model.safetensors", model.state_dict())
    loaded, config = load_gpt_run(tmp_path)
    assert not loaded.training and loaded.config.arch == "fairseq" and config["model"]["norm"] == "layer"
    tokens, labels = torch.randint(0, V, (2, 16)), torch.tensor([0, 3])
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens, labels), model(tokens, labels))
    other = tiny("fairseq", "class", dim=32)
    (tmp_path / "config.json").write_text(json.dumps({"model": other.to_dict()}))
    with pytest.raises(DigitError, match="shape"):
        load_gpt_run(tmp_path)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_decode_attention_equals_sdpa(dtype, tol):
    """The single-query attention of the CPU decode step is SDPA's: against the direct formula in float64."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, n, 16, generator=g) for n in (1, 37, 37))
    want = ((q.double() @ k.double().transpose(-1, -2)) / 4.0).softmax(-1) @ v.double()
    got = layers.decode_attention(q.to(dtype), k.to(dtype), v.to(dtype))
    assert got.shape == (3, 4, 1, 16) and got.dtype is dtype
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v).double(), want, atol=1e-6, rtol=1e-6)
