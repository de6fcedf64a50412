"""`digit convert llamagen`: tiny checkpoints in LlamaGen's key layout and file formats (llamagen-official.md sections
1, 3, 4) against a direct implementation of LlamaGen's c2i forward written here."""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F

from digit.convert.keys import to_llamagen
from digit.convert.llamagen import convert_llamagen, convert_llamagen_gpt
from digit.errors import DigitError
from digit.sampling.generate import generate

DIM, HEADS, LAYERS, VOCAB, CLASSES, FFN = 64, 4, 2, 32, 5, 192
IMAGE, GRID = 48, 3  # 48 px / 16 -> 3x3 tokens


def llamagen_state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=0.1):
        return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)  # bf16 training

    s = {"tok_embeddings.weight": r(VOCAB, DIM), "cls_embedding.embedding_table.weight": r(CLASSES + 1, DIM),
         "norm.weight": 1 + r(DIM), "output.weight": r(VOCAB, DIM)}  # fmt: skip
    for i in range(LAYERS):
        p = f"layers.{i}."
        s.update({p + "attention.wqkv.weight": r(3 * DIM, DIM), p + "attention.wo.weight": r(DIM, DIM),
                  p + "feed_forward.w1.weight": r(FFN, DIM), p + "feed_forward.w3.weight": r(FFN, DIM),
                  p + "feed_forward.w2.weight": r(DIM, FFN), p + "attention_norm.weight": 1 + r(DIM),
                  p + "ffn_norm.weight": 1 + r(DIM)})  # fmt: skip
    return s


def rope_2d(grid: int, head_dim: int, n_cond: int, base: float = 10000.0) -> torch.Tensor:
    """[n_cond + grid^2, head_dim/2, 2] (cos, sin): head_dim/4 frequencies per axis, rows then columns, and an
    all-zero table (cos 0 AND sin 0) at the condition positions."""
    half = head_dim // 2
    freqs = 1.0 / base ** (torch.arange(0, half, 2).float() / half)  # [head_dim/4]
    t = torch.arange(grid).float()
    f = torch.outer(t, freqs)
    ang = torch.cat([f[:, None].expand(grid, grid, -1), f[None].expand(grid, grid, -1)], -1).reshape(grid * grid, half)
    table = torch.stack([ang.cos(), ang.sin()], -1)
    return torch.cat([torch.zeros(n_cond, half, 2), table])


def rotate(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    # x [B, L, H, D]; adjacent pairs (x[2m], x[2m+1]) rotate together (Meta Llama), in float32
    xp = x.float().reshape(*x.shape[:-1], -1, 2)
    c, s = table[None, :, None, :, 0], table[None, :, None, :, 1]
    return torch.stack([xp[..., 0] * c - xp[..., 1] * s, xp[..., 1] * c + xp[..., 0] * s], -1).flatten(3)


def llamagen_logits(s: dict, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """LlamaGen c2i training forward: [class embedding; tokens[:-1]] -> logits for every image token."""
    s = {k: v.float() for k, v in s.items()}
    B, T = ids.shape

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    h = torch.cat(
        [s["cls_embedding.embedding_table.weight"][labels][:, None], s["tok_embeddings.weight"][ids[:, :-1]]], 1
    )
    L, hd = h.shape[1], DIM // HEADS
    table = rope_2d(GRID, hd, 1)[:L]
    for i in range(LAYERS):
        p = f"layers.{i}."
        q, k, v = (rms(h, s[p + "attention_norm.weight"]) @ s[p + "attention.wqkv.weight"].t()).split(DIM, -1)
        q, k = rotate(q.view(B, L, HEADS, hd), table), rotate(k.view(B, L, HEADS, hd), table)
        v = v.view(B, L, HEADS, hd)
        w = (q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2)) / hd**0.5
        w = w.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
        a = (w.softmax(-1) @ v.transpose(1, 2)).transpose(1, 2).reshape(B, L, DIM)
        h = h + a @ s[p + "attention.wo.weight"].t()
        x = rms(h, s[p + "ffn_norm.weight"])
        ffn = F.silu(x @ s[p + "feed_forward.w1.weight"].t()) * (x @ s[p + "feed_forward.w3.weight"].t())
        h = h + ffn @ s[p + "feed_forward.w2.weight"].t()
    return rms(h, s["norm.weight"]) @ s["output.weight"].t()


def _args(**kw) -> argparse.Namespace:
    base = dict(gpt_model="GPT-tiny", image_size=IMAGE, downsample_size=16, cls_token_num=1, class_dropout_prob=0.1,
                dropout_p=0.1, token_dropout_p=0.1, num_classes=CLASSES)  # fmt: skip
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.parametrize("fmt", ["ddp", "fsdp", "compiled"])
def test_gpt_logits_match_llamagen(tmp_path, fmt):
    from digit.models import load_gpt_run

    s = llamagen_state()
    path = tmp_path / f"c2i_T_{IMAGE}.pt"
    if fmt == "ddp":  # train_c2i.py: {"model", "optimizer", "steps", "args"}
        torch.save({"model": s, "optimizer": {"state": {}}, "steps": 10, "args": _args()}, path)
    elif fmt == "fsdp":  # consolidated.pth: the bare state dict, no args
        torch.save(s, path)
    else:  # torch.compile + DDP prefixes
        torch.save({"model": {f"module._orig_mod.{k}": v for k, v in s.items()}, "args": _args()}, path)
    convert_llamagen(tmp_path / "o", gpt=str(path), image_size=None if fmt != "fsdp" else IMAGE, n_heads=HEADS)
    model, cfg = load_gpt_run(tmp_path / "o" / "gpt")
    assert cfg["model"]["grid"] == [GRID, GRID] and cfg["model"]["num_classes"] == CLASSES
    g = torch.Generator().manual_seed(1)
    ids, labels = torch.randint(0, VOCAB, (2, GRID * GRID), generator=g), torch.tensor([4, 0])
    with torch.no_grad():
        ours = model(ids, labels)
    torch.testing.assert_close(ours, llamagen_logits(s, ids, labels), atol=1e-5, rtol=1e-5)
    # exporting goes back to LlamaGen's exact state dict (names and fp32 values), which gives the same logits
    exported = to_llamagen(model.state_dict())
    assert exported.keys() == s.keys()
    assert all(torch.equal(exported[k], s[k].float()) for k in s)
    torch.testing.assert_close(llamagen_logits(exported, ids, labels), ours, atol=1e-5, rtol=1e-5)


def test_heads_come_from_args_or_size_table(tmp_path):
    s = llamagen_state()
    torch.save({"model": s, "args": _args()}, tmp_path / "a.pt")
    with pytest.raises(DigitError, match="--heads"):
        convert_llamagen_gpt(tmp_path / "a.pt")
    torch.save({"model": s, "args": _args(gpt_model="GPT-B")}, tmp_path / "b.pt")
    with pytest.raises(DigitError, match="GPT-B has 12 layers x 768"):
        convert_llamagen_gpt(tmp_path / "b.pt")
    torch.save(s, tmp_path / "nosize.pt")
    with pytest.raises(DigitError, match="--image-size"):
        convert_llamagen_gpt(tmp_path / "nosize.pt", n_heads=HEADS)


def test_incomplete_t2i_and_foreign_files_are_refused(tmp_path):
    s = llamagen_state()  # a caption MLP but no null caption (t2i conversion itself: tests/test_text_cond.py)
    s["cls_embedding.cap_proj.fc1.weight"] = torch.zeros(DIM, 8)
    torch.save({"model": s, "args": _args()}, tmp_path / "t2i.pt")
    with pytest.raises(DigitError, match="t2i GPT .no cls_embedding.uncond_embedding"):
        convert_llamagen_gpt(tmp_path / "t2i.pt", n_heads=HEADS)
    torch.save({"model": {"w": torch.zeros(2)}}, tmp_path / "x.pt")
    with pytest.raises(DigitError, match="not a LlamaGen c2i GPT"):
        convert_llamagen_gpt(tmp_path / "x.pt", n_heads=HEADS)


def _tiny_llamagen_vq():
    from digit.tokenizers.vq import VQConfig, VQModel

    torch.manual_seed(3)
    cfg = VQConfig(family="llamagen", layout="llamagen", image_size=IMAGE, ch=32, ch_mult=(1, 1, 1, 1, 2),
                   num_res_blocks=1, z_channels=32, codebook_size=VOCAB, codebook_dim=8, codebook_used_size=128)  # fmt: skip
    return VQModel(cfg).eval()


def test_vq_and_cli_end_to_end(tmp_path):
    from digit.cli import main
    from digit.pipeline import load_pipeline
    from digit.tokenizers import load_tokenizer

    src = _tiny_llamagen_vq()
    sd = src.state_dict()
    sd["quantize.codebook_used"] = torch.arange(128.0)  # a trained buffer: kept as is
    torch.save(
        {"model": sd, "optimizer": {}, "steps": 3, "args": argparse.Namespace(vq_model="VQ-16")}, tmp_path / "vq.pt"
    )
    torch.save({"model": llamagen_state(), "args": _args()}, tmp_path / "gpt.pt")
    out = tmp_path / "o"
    argv = ["convert", "llamagen", "--gpt", str(tmp_path / "gpt.pt"), "--vq", str(tmp_path / "vq.pt"), "--heads",
            str(HEADS), "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    vq = load_tokenizer(out / "vq")
    assert vq.grid_size == (GRID, GRID) and torch.equal(vq.quantize.codebook_used, torch.arange(128.0))
    src.load_state_dict(sd)
    x = torch.rand(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(4))
    ids = vq.encode(x)
    assert torch.equal(ids, src.encode(x))
    torch.testing.assert_close(vq.decode(ids), src.decode(ids), atol=0, rtol=0)
    pipe = load_pipeline(out / "gpt", out / "vq")
    assert pipe.kind == "llamagen" and pipe.num_classes == CLASSES
    tokens = generate(pipe.stage1, cond=torch.tensor([1, 2]), cfg_scale=2.0, generator=torch.Generator().manual_seed(5))
    assert tokens.shape == (2, GRID, GRID) and int(tokens.max()) < VOCAB
