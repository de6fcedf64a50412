"""Text condition (LlamaGen t2i design): caption MLP prefix, null caption, padded-caption attention mask, KV cache,
classifier-free guidance on the null caption, LlamaGen key names."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from digit.convert.keys import from_llamagen, to_llamagen
from digit.errors import DigitError
from digit.models.conditions import Caption, left_pad_captions
from digit.models.gpt import ARCHS, GPT, GPTConfig
from digit.sampling.generate import sample
from digit.sampling.params import SamplingParams

L, DT, GRID, V = 6, 10, (3, 3), 17


def tiny(arch="llama", seed=0, **kw):
    torch.manual_seed(seed)
    base = dict(vocab_size=V, grid=GRID, dim=32, n_layers=2, n_heads=4, multiple_of=16, cond="text", caption_len=L,
                caption_dim=DT)  # fmt: skip
    cfg = GPTConfig(**{**base, **ARCHS[arch], **kw})
    model = GPT(cfg)
    nn.init.normal_(model.head.weight, std=0.5)  # LlamaGen zero-initialises the head: logits would all be 0
    return model.eval()


def caption(B=3, seed=1, valid=(2, 6, 4)):
    """Left-padded captions (LlamaGen's sampler layout): row b has its valid[b] real positions at the end."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(B, L, DT, generator=g)
    mask = torch.arange(L)[None] >= (L - torch.tensor(valid[:B]))[:, None]
    return Caption(feats * mask[..., None], mask)


def tokens(B=3, seed=2):
    return torch.randint(0, V, (B, GRID[0] * GRID[1]), generator=torch.Generator().manual_seed(seed))


def test_shapes_and_config():
    m = tiny()
    assert m.config.cond_len == L and m.config.n_positions == L + 9
    out = m(tokens(), caption())
    assert out.shape == (3, 9, V) and out.dtype == torch.float32 and out.abs().sum() > 0
    assert m.condition.null_caption.shape == (L, DT) and m.condition.null_caption.requires_grad
    # LlamaGen's init of the null caption: N(0, 1/D_t)
    assert 0.1 < m.condition.null_caption.std().item() < 0.6
    with pytest.raises(DigitError, match="Caption"):
        m(tokens(), caption().features)
    with pytest.raises(DigitError, match="Caption"):
        m(tokens(), Caption(caption().features, caption().mask.long()))
    with pytest.raises(DigitError, match="causal"):
        GPTConfig(vocab_size=V, grid=GRID, cond="text", causal=False)


@pytest.mark.parametrize("arch", ["llama", "fairseq"])
def test_padded_positions_do_not_affect_logits(arch):
    m = tiny(arch)
    cap, toks = caption(), tokens()
    ref = m(toks, cap)
    noisy = cap.features + 100 * torch.randn(cap.features.shape) * (~cap.mask)[..., None]
    assert torch.equal(m(toks, Caption(noisy, cap.mask)), ref)
    # the same change with every position marked valid does change the logits (the mask is what hides them)
    everything = torch.ones_like(cap.mask)
    assert not torch.allclose(m(toks, Caption(noisy, everything)), m(toks, Caption(cap.features, everything)))
    # and a change at a valid position changes them too
    f = cap.features.clone()
    f[:, -1] += 1.0
    assert (m(toks, Caption(f, cap.mask)) - ref).abs().amax(dim=(1, 2)).min() > 1e-4


def test_mask_matches_explicit_attention_formula():
    """The model's attention mask against the mask written out: causal, padded caption keys removed for every query,
    each query's own position kept (LlamaGen's causal_mask * emb_mask, then + identity)."""
    m = tiny(n_layers=1)
    cap = caption()
    S = L + 8
    kv = m._key_valid(cap, S)
    mask = m._key_mask(kv, torch.arange(S), S)[:, 0]
    want = torch.ones(S, S, dtype=torch.bool).tril()[None].clone().repeat(3, 1, 1)
    for b, valid in enumerate((2, 6, 4)):
        want[b, :, : L - valid] = False
        want[b].diagonal().fill_(True)
    assert torch.equal(mask, want)


def test_caption_dropout_rate_one_is_the_null_caption():
    m = tiny()
    cap, toks = caption(), tokens()
    null_out = m(toks, m.condition.null(cap))
    m.train()
    m.condition.dropout_prob = 1.0
    assert torch.equal(m(toks, cap), null_out)
    m.condition.dropout_prob = 0.0
    assert not torch.allclose(m(toks, cap), null_out)
    m.eval()  # eval never drops
    m.condition.dropout_prob = 1.0
    assert not torch.allclose(m(toks, cap), null_out)
    # the null caption is trained through dropped rows
    m.train()
    m(toks, cap).sum().backward()
    assert m.condition.null_caption.grad is not None and m.condition.null_caption.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ["llama", "fairseq"])
def test_kv_cache_decode_equals_full_forward(arch):
    m = tiny(arch)
    cap, toks = caption(), tokens()
    full = m(toks, cap)  # [B, 9, V]; logits[:, t] predicts token t
    T = toks.shape[1]
    with torch.no_grad():
        m.setup_cache(3)
        steps = [m.prefill(cap, 3)]
        for i in range(T - 1):
            steps.append(m.decode_step(toks[:, i : i + 1], torch.tensor([L + i])))
        torch.testing.assert_close(torch.stack(steps, 1), full, rtol=0, atol=1e-5)
        # the whole static cache through the mask (the compiled / accelerator path)
        m.prefill(cap, 3)
        for i in range(T - 1):
            last = m.decode_step(toks[:, i : i + 1], torch.tensor([L + i]), kv_len=m.cache_len)
        torch.testing.assert_close(last, full[:, -1], rtol=0, atol=1e-5)
        # a block of tokens after the prefill (speculative verification)
        m.prefill(cap, 3)
        block = m.decode_block(toks[:, :-1], torch.arange(L, L + T - 1))
        torch.testing.assert_close(block, full[:, 1:], rtol=0, atol=1e-5)
        # per-row positions (continuous batching)
        m.prefill(cap, 3)
        for i in range(T - 1):
            last = m.decode_step(toks[:, i : i + 1], torch.full((3, 1), L + i))
        torch.testing.assert_close(last, full[:, -1], rtol=0, atol=1e-5)


def _greedy_rollout(m, cap, scale=None):
    """Greedy tokens by full forwards only (no cache): token t = argmax of (guided) logits at t."""
    B, T = len(cap), GRID[0] * GRID[1]
    toks = torch.zeros(B, T, dtype=torch.long)
    for t in range(T):
        logits = m(toks, cap)[:, t]
        if scale is not None:
            u = m(toks, m.condition.null(cap))[:, t]
            logits = u + scale * (logits - u)
        toks[:, t] = logits.argmax(-1)
    return toks


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_greedy_sampling_deterministic_and_equal_to_full_forward(scale):
    m = tiny()
    cap = caption()
    params = SamplingParams(top_k=1, cfg_scale=scale)
    a = sample(m, cap, params=params, generator=torch.Generator().manual_seed(0)).tokens
    b = sample(m, cap, params=params, generator=torch.Generator().manual_seed(5)).tokens
    assert a.shape == (3, *GRID) and torch.equal(a, b)
    want = _greedy_rollout(m, cap, None if scale == 1.0 else scale)
    assert torch.equal(a.view(3, -1), want)


def test_jacobi_greedy_equals_standard():
    from digit.sampling.jacobi import jacobi_generate

    m = tiny()
    cap = caption()
    params = SamplingParams(top_k=1, cfg_scale=2.0)
    ar = sample(m, cap, params=params, generator=torch.Generator().manual_seed(0)).tokens
    jac = jacobi_generate(m, cap, 3, params, torch.Generator().manual_seed(0))
    assert torch.equal(jac[0].view(3, -1), ar.view(3, -1))


def test_llamagen_key_names_round_trip():
    m = tiny()
    sd = m.state_dict()
    theirs = to_llamagen(sd)
    assert {"cls_embedding.cap_proj.fc1.weight", "cls_embedding.cap_proj.fc2.weight",
            "cls_embedding.uncond_embedding"} <= set(theirs)  # fmt: skip
    assert theirs["cls_embedding.cap_proj.fc1.weight"].shape == (32, DT)
    assert not any(k.startswith("condition.") for k in theirs)
    back = from_llamagen(theirs)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    m2 = tiny(seed=9)
    m2.load_state_dict(back)
    torch.testing.assert_close(m2(tokens(), caption()), m(tokens(), caption()), rtol=0, atol=0)


def test_left_pad_captions():
    feats = torch.arange(2 * 4 * 1, dtype=torch.float32).view(2, 4, 1) + 1  # rows [1,2,3,4], [5,6,7,8]
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)  # T5 right padding
    out = left_pad_captions(feats, mask)
    assert out.features[..., 0].tolist() == [[0, 0, 1, 2], [5, 6, 7, 8]]
    assert out.mask.tolist() == [[False, False, True, True], [True, True, True, True]]


# ---- LlamaGen's t2i GPT written out from its public formulas (weights in LlamaGen's names)
FFN = 48


def _llamagen_t2i_state(seed=3) -> dict:
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=0.2):
        return torch.randn(*shape, generator=g) * std

    s = {"tok_embeddings.weight": r(V, 32), "cls_embedding.cap_proj.fc1.weight": r(32, DT),
         "cls_embedding.cap_proj.fc2.weight": r(32, 32), "cls_embedding.uncond_embedding": r(L, DT),
         "norm.weight": 1 + r(32), "output.weight": r(V, 32)}  # fmt: skip
    for i in range(2):
        p = f"layers.{i}."
        s.update({p + "attention.wqkv.weight": r(96, 32), p + "attention.wo.weight": r(32, 32),
                  p + "feed_forward.w1.weight": r(FFN, 32), p + "feed_forward.w3.weight": r(FFN, 32),
                  p + "feed_forward.w2.weight": r(32, FFN), p + "attention_norm.weight": 1 + r(32),
                  p + "ffn_norm.weight": 1 + r(32)})  # fmt: skip
    return s


def _llamagen_t2i_logits(s: dict, ids: torch.Tensor, feats: torch.Tensor, emb_mask: torch.Tensor) -> torch.Tensor:
    """Training forward of LlamaGen's t2i Transformer: cap_proj (fc1, tanh-GELU, fc2) over the caption, then the
    image tokens; 2D RoPE with an all-zero table (cos 0, sin 0) at the caption positions; attention mask
    tril * caption mask on the caption columns, then the identity added; logits from position cls_token_num - 1."""
    B, T = ids.shape
    cap = F.gelu(feats @ s["cls_embedding.cap_proj.fc1.weight"].t(), approximate="tanh")
    h = torch.cat([cap @ s["cls_embedding.cap_proj.fc2.weight"].t(), s["tok_embeddings.weight"][ids[:, :-1]]], 1)
    S, hd, H = h.shape[1], 8, 4
    half = hd // 2
    freqs = 1.0 / 10000.0 ** (torch.arange(0, half, 2).float() / half)
    f = torch.outer(torch.arange(GRID[0]).float(), freqs)
    ang = torch.cat([f[:, None].expand(*GRID, -1), f[None].expand(*GRID, -1)], -1).reshape(-1, half)
    table = torch.cat([torch.zeros(L, half, 2), torch.stack([ang.cos(), ang.sin()], -1)])[:S]

    def rot(x):  # adjacent pairs rotate together
        xp = x.reshape(*x.shape[:-1], -1, 2)
        c, sn = table[None, :, None, :, 0], table[None, :, None, :, 1]
        return torch.stack([xp[..., 0] * c - xp[..., 1] * sn, xp[..., 1] * c + xp[..., 0] * sn], -1).flatten(3)

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    allowed = torch.ones(S, S).tril()[None].repeat(B, 1, 1)
    allowed[:, :, :L] *= emb_mask[:, None].float()
    eye = torch.eye(S)
    allowed = (allowed * (1 - eye) + eye).bool()[:, None]
    for i in range(2):
        p = f"layers.{i}."
        q, k, v = (rms(h, s[p + "attention_norm.weight"]) @ s[p + "attention.wqkv.weight"].t()).split(32, -1)
        q, k, v = rot(q.view(B, S, H, hd)), rot(k.view(B, S, H, hd)), v.view(B, S, H, hd)
        w = (q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2)) / hd**0.5
        a = (w.masked_fill(~allowed, float("-inf")).softmax(-1) @ v.transpose(1, 2)).transpose(1, 2).reshape(B, S, 32)
        h = h + a @ s[p + "attention.wo.weight"].t()
        x = rms(h, s[p + "ffn_norm.weight"])
        h = (
            h
            + (F.silu(x @ s[p + "feed_forward.w1.weight"].t()) * (x @ s[p + "feed_forward.w3.weight"].t()))
            @ s[p + "feed_forward.w2.weight"].t()
        )
    return (rms(h, s["norm.weight"]) @ s["output.weight"].t())[:, L - 1 :]


def test_logits_equal_llamagen_t2i_formulas():
    s = _llamagen_t2i_state()
    m = tiny(ffn_dim=FFN)
    m.load_state_dict(from_llamagen(s), strict=True)
    cap, toks = caption(), tokens()
    ref = _llamagen_t2i_logits(s, toks, cap.features, cap.mask)
    torch.testing.assert_close(m(toks, cap), ref, rtol=0, atol=1e-4)
    # the null caption under the prompt's mask (LlamaGen's CFG branch)
    null = s["cls_embedding.uncond_embedding"].expand(3, -1, -1)
    torch.testing.assert_close(m(toks, m.condition.null(cap)), _llamagen_t2i_logits(s, toks, null, cap.mask),
                               rtol=0, atol=1e-4)  # fmt: skip


def test_convert_llamagen_t2i_checkpoint(tmp_path):
    import argparse

    from digit.convert.llamagen import convert_llamagen, convert_llamagen_gpt
    from digit.models import load_gpt_run

    s = _llamagen_t2i_state()
    args = argparse.Namespace(image_size=48, downsample_size=16, cls_token_num=L, class_dropout_prob=0.1)
    torch.save({"model": {f"module.{k}": v.to(torch.bfloat16) for k, v in s.items()}, "args": args}, tmp_path / "t.pt")
    s = {k: v.to(torch.bfloat16).float() for k, v in s.items()}  # what the converter reads
    model, _ = convert_llamagen_gpt(tmp_path / "t.pt", n_heads=4)
    c = model.config
    assert (c.cond, c.caption_len, c.caption_dim, c.grid, c.ffn_dim) == ("text", L, DT, GRID, FFN)
    cap, toks = caption(), tokens()
    ref = _llamagen_t2i_logits(s, toks, cap.features, cap.mask)
    torch.testing.assert_close(model(toks, cap), ref, rtol=0, atol=1e-4)
    written = convert_llamagen(tmp_path / "out", gpt=str(tmp_path / "t.pt"), n_heads=4)
    run, config = load_gpt_run(written["gpt"])
    assert config["model"]["cond"] == "text"
    torch.testing.assert_close(run(toks, cap), ref, rtol=0, atol=1e-4)
    args.cls_token_num = L + 1
    torch.save({"model": s, "args": args}, tmp_path / "bad.pt")
    with pytest.raises(DigitError, match="cls_token_num"):
        convert_llamagen_gpt(tmp_path / "bad.pt", n_heads=4)
