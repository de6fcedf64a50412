"""The GPT on tiny fp32 models: causality, KV-cache equivalence, NAR bidirectionality, hidden states, parameter
counts of the paper presets (on the meta device), state-dict names, a direct fairseq-layer formula, run loading."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from digit.errors import DigitError
from digit.models import GPT, GPTConfig, build_config, load_gpt_run
from digit.models.presets import PRESETS, register_preset
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
def test_kv_cache_matches_full_forward(arch, cond):
    model = randomized(tiny(arch, cond), seed=3)
    cfg = model.config
    B, T, C = 3, cfg.seq_len, cfg.cond_len
    tokens = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(4))
    c = make_cond(cfg, B)
    with torch.no_grad():
        full = model(tokens, c)
        model.setup_cache(B)
        # eager path (attend to the C + i filled entries) and static path (whole cache + mask, for compile)
        for sliced in (True, False):
            steps = [model.prefill(c, B)]
            for i in range(T - 1):
                kv_len = C + i + 1 if sliced else None
                steps.append(model.decode_step(tokens[:, i : i + 1], torch.tensor([C + i]), kv_len))
            torch.testing.assert_close(torch.stack(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    # the cache is non-persistent: never part of the weights
    assert not any("cache" in k for k in model.state_dict())


def test_nar_is_bidirectional_with_mask_token():
    model = randomized(tiny("llama", "class", causal=False))
    assert model.mask_token_id == V and model.tok_embeddings.weight.shape[0] == V + 1
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
    grids = model.generate(cond=labels, generator=torch.Generator().manual_seed(0))
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
    x = math.sqrt(d) * model.embed_tokens.weight[inp] + model.embed_positions.weight[2 : 2 + L]
    lay = model.layers[0]
    q = (x @ lay.self_attn.q_proj.weight.T + lay.self_attn.q_proj.bias).view(2, L, H, -1).transpose(1, 2)
    k = (x @ lay.self_attn.k_proj.weight.T + lay.self_attn.k_proj.bias).view(2, L, H, -1).transpose(1, 2)
    v = (x @ lay.self_attn.v_proj.weight.T + lay.self_attn.v_proj.bias).view(2, L, H, -1).transpose(1, 2)
    scores = (q * (d // H) ** -0.5) @ k.transpose(-1, -2)
    scores = scores.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
    a = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, L, d)
    a = a @ lay.self_attn.out_proj.weight.T + lay.self_attn.out_proj.bias
    ln = lambda y, m: F.layer_norm(y, (d,), m.weight, m.bias, 1e-5)  # noqa: E731
    x = ln(x + a, lay.self_attn_layer_norm)  # post-norm
    hid = (
        0.5
        * (x @ lay.fc1.weight.T + lay.fc1.bias)
        * (1 + torch.erf((x @ lay.fc1.weight.T + lay.fc1.bias) / math.sqrt(2)))
    )
    x = ln(x + hid @ lay.fc2.weight.T + lay.fc2.bias, lay.final_layer_norm)
    want = x @ model.output_projection.weight.T  # no final LayerNorm, bias-free head
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), want, atol=1e-4, rtol=1e-4)


def test_parameter_counts_of_paper_presets():
    with torch.device("meta"):
        digit = GPT(build_config("digit-base", vocab_size=8197, bos_id=2))
        gptb = GPT(build_config("gpt-b", vocab_size=16384, cond="class", num_classes=1000))
    assert digit.num_params() == 219_377_664
    assert digit.embed_tokens.weight.shape == (8197, 1024) and digit.embed_positions.weight.shape == (1026, 1024)
    assert gptb.num_params() == 110_888_448
    with torch.device("meta"):  # DiGIT stage 2: both fairseq position tables have max_positions + 2 rows
        stage2 = GPT(build_config("digit-base", cond="prefix", prefix_vocab_size=8192, prefix_grid=(16, 16)))
    assert stage2.embed_positions_1.weight.shape == stage2.embed_positions.weight.shape == (1026, 1024)
    assert gptb.cls_embedding.embedding_table.weight.shape == (1001, 768)
    assert gptb.layers[0].feed_forward.w1.weight.shape == (2048, 768)
    # the other LlamaGen sizes, as their README rounds them
    for name, millions in [("gpt-l", 342.9), ("gpt-xl", 774.7), ("gpt-xxl", 1411), ("gpt-3b", 3100)]:
        cfg = build_config(name, cond="class", num_classes=1000)
        with torch.device("meta"):
            n = GPT(cfg).num_params() / 1e6
        assert abs(n - millions) / millions < 0.003, (name, n)
    assert build_config("gpt-3b").head_dim == 100 and build_config("gpt-3b").hidden_dim == 8704


def test_state_dict_names():
    llama = GPT(tiny("llama", "class")).state_dict()
    for key in [
        "tok_embeddings.weight",
        "cls_embedding.embedding_table.weight",
        "layers.0.attention.wqkv.weight",
        "layers.0.attention.wo.weight",
        "layers.0.feed_forward.w1.weight",
        "layers.0.feed_forward.w2.weight",
        "layers.0.feed_forward.w3.weight",
        "layers.0.attention_norm.weight",
        "layers.0.ffn_norm.weight",
        "norm.weight",
        "output.weight",
    ]:
        assert key in llama, key
    assert not any(k.startswith(("rope", "causal_mask")) for k in llama)
    fs = GPT(tiny("fairseq", "prefix", norm_first=True)).state_dict()
    for key in [
        "embed_tokens.weight",
        "embed_positions.weight",
        "embed_positions_1.weight",
        "layers.0.self_attn.q_proj.bias",
        "layers.0.self_attn.out_proj.weight",
        "layers.0.self_attn_layer_norm.weight",
        "layers.0.fc1.weight",
        "layers.0.fc2.bias",
        "layers.0.final_layer_norm.weight",
        "layer_norm.weight",  # pre-norm (stage 2) has the final LayerNorm
        "output_projection.weight",
    ]:
        assert key in fs, key
    assert "output_projection.bias" not in fs
    assert "layer_norm.weight" not in GPT(tiny("fairseq", "none")).state_dict()  # post-norm: none


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
    assert not loaded.training and config["model"]["arch"] == "fairseq"
    tokens, labels = torch.randint(0, V, (2, 16)), torch.tensor([0, 3])
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens, labels), model(tokens, labels))
    other = tiny("fairseq", "class", dim=32)
    (tmp_path / "config.json").write_text(json.dumps({"model": other.to_dict()}))
    with pytest.raises(DigitError, match="shape"):
        load_gpt_run(tmp_path)
