"""`digit convert digit`: tiny checkpoints in DiGIT's fairseq layout (digit-official.md sections 1, 2, 4, 9) against a
direct implementation of the original forward over the ORIGINAL tensors, vocabulary ids and positions."""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from digit.convert.digit import convert_digit, read_fairseq
from digit.convert.dinov2 import digit_pos_embed
from digit.convert.keys import to_fairseq
from digit.errors import DigitError

NS, EOS, UNK = 5, 2, 3
DIM, HEADS, LAYERS, FFN = 32, 4, 2, 64
K, V, C = 12, 10, 3  # clusters, VQ codes, classes
GRID = (2, 2)
SEQ = 4
POS_ROWS = 10  # max_positions 8 + 2


# ----------------------------------------------------------------------------------------------- original layout
def _decoder_state(g: torch.Generator, rows: int, head_rows: int, pre_ln: bool, second_table: bool) -> dict:
    def r(*shape, std=0.2):
        return (torch.randn(*shape, generator=g) * std).half()  # released checkpoints are fp16

    s = {"decoder.version": torch.tensor([3.0]), "decoder.embed_tokens.weight": r(rows, DIM),
         "decoder.embed_positions.weight": r(POS_ROWS, DIM), "decoder.output_projection.weight": r(head_rows, DIM)}  # fmt: skip
    if second_table:
        s["decoder.embed_positions_1.weight"] = r(POS_ROWS, DIM)
    for i in range(LAYERS):
        p = f"decoder.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            s[p + f"self_attn.{n}.weight"], s[p + f"self_attn.{n}.bias"] = r(DIM, DIM), r(DIM)
        for n in ("self_attn_layer_norm", "final_layer_norm"):
            s[p + f"{n}.weight"], s[p + f"{n}.bias"] = (1 + r(DIM)).half(), r(DIM)
        s[p + "fc1.weight"], s[p + "fc1.bias"] = r(FFN, DIM), r(FFN)
        s[p + "fc2.weight"], s[p + "fc2.bias"] = r(DIM, FFN), r(DIM)
    if pre_ln:
        s["decoder.layer_norm.weight"], s["decoder.layer_norm.bias"] = (1 + r(DIM)).half(), r(DIM)
    return s


def fairseq_ckpt(name: str, *, classes: int = 0, seed: int = 0, extra: dict | None = None) -> dict:
    g = torch.Generator().manual_seed(seed)
    stage2 = name in ("st2vtlm", "st2vtlm_nar")
    if name == "stlm":
        rows, head, task = NS + K + classes, NS + K, {"target_vocab_size": K, "source_vocab_size": -1}
    elif stage2:
        rows, head, task = (NS + V) + (NS + K), NS + V, {"target_vocab_size": V, "source_vocab_size": K}
    else:
        rows, head, task = NS + V, NS + V, {"target_vocab_size": V, "source_vocab_size": K}
    pre_ln = name != "stlm"
    state = _decoder_state(g, rows, head, pre_ln, stage2)
    state.update(extra or {})
    model_cfg = {"_name": name, "decoder_embed_dim": DIM, "decoder_layers": LAYERS, "decoder_attention_heads": HEADS,
                 "decoder_ffn_embed_dim": FFN, "decoder_normalize_before": pre_ln, "class_conditional": classes > 0,
                 "dropout": 0.1, "attention_dropout": 0.0, "activation_fn": "gelu", "decoder_learned_pos": True,
                 "pretrained_enc_config": {"pretrained_enc_arch": "dinov2_vitb14_reg", "layer": 2}}  # fmt: skip
    return {
        "args": None,
        "cfg": {
            "_name": None,
            "model": model_cfg,
            "task": {"_name": "image_generation", **task},
            "optimization": {"lr": [3e-4], "max_update": 125000},
        },  # fmt: skip
        "model": state,
        "optimizer_history": [
            {
                "criterion_name": "CE",
                "optimizer_name": "FairseqAdam",
                "num_updates": 7,
                "lr_scheduler_state": {"best": 1.5},
            }
        ],  # fmt: skip
        "task_state": {},
        "extra_state": {"epoch": 2, "metrics": OrderedDict(train=OrderedDict(loss=[1.0, 2.0]))},
    }


def fairseq_logits(s: dict, tokens: torch.Tensor, *, pre_ln: bool, prefix: int = 0, causal: bool = True):
    """fairseq TransformerDecoder (+ DiGIT's TransformerDecoder2pos) forward over fairseq ids -> [B, L, head rows]."""
    s = {k: v.float() for k, v in s.items()}
    B, L = tokens.shape
    x = math.sqrt(DIM) * s["decoder.embed_tokens.weight"][tokens]
    # positions start at padding_idx + 1 = 2; the prefix uses the second table, the rest restarts at 2
    pos = s["decoder.embed_positions.weight"][2 : 2 + L - prefix]
    if prefix:
        pos = torch.cat([s["decoder.embed_positions_1.weight"][2 : 2 + prefix], pos])
    x = x + pos
    hd = DIM // HEADS
    for i in range(LAYERS):
        p = f"decoder.layers.{i}."

        def lin(z, n, p=p):
            return z @ s[p + n + ".weight"].t() + s[p + n + ".bias"]

        def ln(z, n, p=p):
            return F.layer_norm(z, (DIM,), s[p + n + ".weight"], s[p + n + ".bias"], 1e-5)

        def attn(z):
            q = lin(z, "self_attn.q_proj") * hd**-0.5
            k, v = lin(z, "self_attn.k_proj"), lin(z, "self_attn.v_proj")
            q, k, v = (t.view(B, L, HEADS, hd).transpose(1, 2) for t in (q, k, v))
            w = q @ k.transpose(-1, -2)
            if causal:
                w = w.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
            o = (w.softmax(-1) @ v).transpose(1, 2).reshape(B, L, DIM)
            return lin(o, "self_attn.out_proj")

        def ffn(z):
            return lin(F.gelu(lin(z, "fc1")), "fc2")

        if pre_ln:
            x = x + attn(ln(x, "self_attn_layer_norm"))
            x = x + ffn(ln(x, "final_layer_norm"))
        else:
            x = ln(x + attn(x), "self_attn_layer_norm")
            x = ln(x + ffn(x), "final_layer_norm")
    if pre_ln:
        x = F.layer_norm(x, (DIM,), s["decoder.layer_norm.weight"], s["decoder.layer_norm.bias"], 1e-5)
    return x @ s["decoder.output_projection.weight"].t()


def _save(tmp_path, name: str, obj) -> str:
    path = tmp_path / name
    torch.save(obj, path)
    return str(path)


def _close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- decoders
@pytest.mark.parametrize("classes", [0, C])
def test_stage1_logits_match_fairseq(tmp_path, classes):
    from digit.models import load_gpt_run

    ck = fairseq_ckpt("stlm", classes=classes)
    out = tmp_path / "out"
    written = convert_digit(out, stage1=_save(tmp_path, "s1.pt", ck), grid=GRID)
    assert set(written) == {"stage1"}  # no encoder / centroids given or stored: no tokenizer
    model, cfg = load_gpt_run(out / "stage1")
    assert cfg["model"]["vocab_size"] == K and cfg["model"]["num_classes"] == classes  # classes from the rows
    assert cfg["model"]["norm_first"] is False and cfg["official"]["eos"] == EOS
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, K, (3, SEQ), generator=g)
    labels = torch.tensor([0, 2, 1]) if classes else None
    first = (NS + K + labels)[:, None] if classes else torch.full((3, 1), EOS)  # class token replaces the BOS
    ref = fairseq_logits(ck["model"], torch.cat([first, ids[:, :-1] + NS], 1), pre_ln=False)
    with torch.no_grad():
        ours = model(ids, labels)
    assert ours.shape == (3, SEQ, K) and ours.dtype == torch.float32
    _close(ours, ref[..., NS:])


@pytest.mark.parametrize("name", ["st2vtlm", "st2vtlm_nar"])
def test_stage2_logits_match_fairseq(tmp_path, name):
    from digit.models import load_gpt_run

    ck1, ck2 = fairseq_ckpt("stlm", seed=3), fairseq_ckpt(name, seed=4)
    out = tmp_path / "out"
    convert_digit(out, stage1=_save(tmp_path, "s1.pt", ck1), stage2=_save(tmp_path, "s2.pt", ck2), grid=GRID)
    model, cfg = load_gpt_run(out / "stage2")
    assert cfg["model"]["cond"] == "prefix" and cfg["model"]["prefix_vocab_size"] == K
    assert cfg["model"]["causal"] is (name == "st2vtlm")
    g = torch.Generator().manual_seed(2)
    sem = torch.randint(0, K, (2, SEQ), generator=g)
    vq = torch.randint(0, V, (2, SEQ), generator=g)
    sem_fs = sem + (NS + V) + NS  # DiGIT prepare_semantic: cluster + len(target dict) + nspecial
    if name == "st2vtlm":
        fs_in = torch.cat([sem_fs, torch.full((2, 1), EOS), vq[:, :-1] + NS], 1)
        ref = fairseq_logits(ck2["model"], fs_in, pre_ln=True, prefix=SEQ)[:, SEQ : SEQ + SEQ, NS : NS + V]
        with torch.no_grad():
            ours = model(vq, sem)
    else:
        masked = torch.tensor([[True, False, True, True], [False, False, True, False]])
        fs_in = torch.cat([sem_fs, torch.full((2, 1), EOS), torch.where(masked, UNK, vq + NS)], 1)
        ref = fairseq_logits(ck2["model"], fs_in, pre_ln=True, prefix=SEQ, causal=False)[:, SEQ + 1 :, NS : NS + V]
        with torch.no_grad():
            ours = model(torch.where(masked, model.mask_token_id, vq), sem)
    _close(ours, ref)
    # exported under fairseq's names, the transformer weights are the checkpoint's own (q/k/v split back out of qkv)
    exported = to_fairseq(model.state_dict(), prefix="decoder.")
    same = [k for k in ck2["model"] if k.startswith(("decoder.layers.", "decoder.layer_norm.", "decoder.embed_pos"))]
    assert len(same) == 2 + LAYERS * 16 + 2 and set(same) <= set(exported)
    assert all(torch.equal(exported[k], ck2["model"][k].float()) for k in same)


def test_vq_baseline_logits_match_fairseq(tmp_path):
    from digit.models import load_gpt_run

    ck = fairseq_ckpt("st2vtlm_vq", seed=5)
    convert_digit(tmp_path / "out", stage1=_save(tmp_path, "vq.pt", ck), grid=GRID)
    model, cfg = load_gpt_run(tmp_path / "out" / "stage1")
    assert cfg["model"]["cond"] == "none" and cfg["model"]["norm_first"] is True
    vq = torch.randint(0, V, (2, SEQ), generator=torch.Generator().manual_seed(6))
    ref = fairseq_logits(ck["model"], torch.cat([torch.full((2, 1), EOS), vq[:, :-1] + NS], 1), pre_ln=True)
    with torch.no_grad():
        _close(model(vq), ref[..., NS : NS + V])


def test_fp16_became_fp32_and_special_rows_kept(tmp_path):
    from safetensors.torch import load_file

    ck = fairseq_ckpt("stlm")
    convert_digit(tmp_path / "o", stage1=_save(tmp_path, "s1.pt", ck), grid=GRID)
    sd = load_file(str(tmp_path / "o" / "stage1" / "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in sd.values())
    special = load_file(str(tmp_path / "o" / "stage1" / "official_head.safetensors"))["output_special.weight"]
    torch.testing.assert_close(special, ck["model"]["decoder.output_projection.weight"][:NS].float(), atol=0, rtol=0)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda ck: ck["cfg"]["model"].update(decoder_layers=3), "decoder_layers"),
        (lambda ck: ck["cfg"]["model"].update(decoder_embed_dim=64), "decoder_embed_dim"),
        (lambda ck: ck["cfg"]["model"].update(decoder_normalize_before=True), "normalize_before"),
        (lambda ck: ck["cfg"]["task"].update(target_vocab_size=K + 1), "output head"),
        (lambda ck: ck["cfg"]["model"].update(class_conditional=True), "class_conditional"),
        (lambda ck: ck["cfg"]["model"].update(_name="transformer_lm"), "not a DiGIT model"),
    ],
)
def test_config_is_checked_against_shapes(tmp_path, edit, match):
    ck = fairseq_ckpt("stlm")
    edit(ck)
    with pytest.raises(DigitError, match=match):
        convert_digit(tmp_path / "o", stage1=_save(tmp_path, "s1.pt", ck), grid=GRID)


def test_stage_roles_are_checked(tmp_path):
    s2 = _save(tmp_path, "s2.pt", fairseq_ckpt("st2vtlm"))
    with pytest.raises(DigitError, match="pass it as --stage2"):
        convert_digit(tmp_path / "o", stage1=s2, grid=GRID)


# ----------------------------------------------------------------------------------------------- tokenizer
ENC_D, ENC_DEPTH, REGS, M = 32, 3, 4, 5  # tiny DINOv2: 5x5 original position grid, 28 px input -> 2x2 patches


def dinov2_state(seed: int = 7) -> dict:
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=0.1):
        return torch.randn(*shape, generator=g) * std

    s = {"cls_token": r(1, 1, ENC_D), "pos_embed": r(1, 1 + M * M, ENC_D), "register_tokens": r(1, REGS, ENC_D),
         "mask_token": r(1, ENC_D), "patch_embed.proj.weight": r(ENC_D, 3, 14, 14), "patch_embed.proj.bias": r(ENC_D),
         "norm.weight": 1 + r(ENC_D), "norm.bias": r(ENC_D)}  # fmt: skip
    for i in range(ENC_DEPTH):
        p = f"blocks.{i}."
        s.update({p + "norm1.weight": 1 + r(ENC_D), p + "norm1.bias": r(ENC_D), p + "attn.qkv.weight": r(3 * ENC_D, ENC_D),
                  p + "attn.qkv.bias": r(3 * ENC_D), p + "attn.proj.weight": r(ENC_D, ENC_D), p + "attn.proj.bias": r(ENC_D),
                  p + "ls1.gamma": 1 + r(ENC_D), p + "norm2.weight": 1 + r(ENC_D), p + "norm2.bias": r(ENC_D),
                  p + "mlp.fc1.weight": r(4 * ENC_D, ENC_D), p + "mlp.fc1.bias": r(4 * ENC_D),
                  p + "mlp.fc2.weight": r(ENC_D, 4 * ENC_D), p + "mlp.fc2.bias": r(ENC_D), p + "ls2.gamma": 1 + r(ENC_D)})  # fmt: skip
    return s


def dinov2_digit_features(s: dict, x: torch.Tensor, layer: int) -> torch.Tensor:
    """DiGIT's DINOv2 copy: tokens [cls, registers, patches], pos table resampled by scale factor (16.1/37 at
    full size) without antialias, output of block depth - layer, final norm, prefix dropped."""
    B = x.shape[0]
    p = F.conv2d(x, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=14).flatten(2).transpose(1, 2)
    grid = x.shape[-1] // 14
    patch_pos = s["pos_embed"][:, 1:].reshape(1, M, M, ENC_D).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos, scale_factor=((grid + 0.1) / M,) * 2, mode="bicubic", antialias=False)
    pos = torch.cat([s["pos_embed"][:, :1], patch_pos.permute(0, 2, 3, 1).reshape(1, -1, ENC_D)], 1)
    h = torch.cat([s["cls_token"].expand(B, -1, -1), p], 1) + pos
    h = torch.cat([h[:, :1], s["register_tokens"].expand(B, -1, -1), h[:, 1:]], 1)
    for i in range(ENC_DEPTH - layer + 1):
        q = f"blocks.{i}."

        def ln(z, n, q=q):
            return F.layer_norm(z, (ENC_D,), s[q + n + ".weight"], s[q + n + ".bias"], 1e-6)

        qkv = F.linear(ln(h, "norm1"), s[q + "attn.qkv.weight"], s[q + "attn.qkv.bias"]).view(B, -1, 3, ENC_D)
        a = (qkv[:, :, 0] @ qkv[:, :, 1].transpose(1, 2) * ENC_D**-0.5).softmax(-1) @ qkv[:, :, 2]  # one head
        h = h + s[q + "ls1.gamma"] * F.linear(a, s[q + "attn.proj.weight"], s[q + "attn.proj.bias"])
        m = F.linear(F.gelu(F.linear(ln(h, "norm2"), s[q + "mlp.fc1.weight"], s[q + "mlp.fc1.bias"])),
                     s[q + "mlp.fc2.weight"], s[q + "mlp.fc2.bias"])  # fmt: skip
        h = h + s[q + "ls2.gamma"] * m
    h = F.layer_norm(h, (ENC_D,), s["norm.weight"], s["norm.bias"], 1e-6)
    return h[:, 1 + REGS :]


@pytest.mark.parametrize("source", ["flags", "checkpoint"])
def test_tokenizer_matches_digit_dinov2_and_kmeans(tmp_path, source):
    from digit.tokenizers import load_tokenizer

    enc = dinov2_state()
    cents = torch.randn(K, ENC_D, generator=torch.Generator().manual_seed(8))
    extra = {}
    kw = {}
    if source == "checkpoint":  # DiGIT stores the frozen encoder (fp16) and centroids [D, K] in the model dict
        extra = {f"pretrained_encoder.{k}": v.half() for k, v in enc.items()}
        extra |= {"centroids": cents.t().contiguous().half(), "centroid_norm": (cents**2).sum(1)[None].half()}
        enc = {k: v.half().float() for k, v in enc.items()}
        cents = cents.half().float()
    else:
        np.save(tmp_path / "km.npy", cents.numpy())
        torch.save(enc, tmp_path / "dinov2.pth")
        kw = {"kmeans": str(tmp_path / "km.npy"), "dinov2": str(tmp_path / "dinov2.pth")}
    s1 = _save(tmp_path, "s1.pt", fairseq_ckpt("stlm", extra=extra))
    written = convert_digit(tmp_path / "o", stage1=s1, grid=GRID, image_size=28, encoder_heads=1, **kw)
    assert "tokenizer" in written
    tok = load_tokenizer(tmp_path / "o" / "tokenizer")
    assert tok.vocab_size == K and tok.grid_size == GRID
    x = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(9))
    ref = dinov2_digit_features(enc, x, layer=2)
    feats = tok.encoder(x)
    _close(feats, ref)
    ref_ids = torch.cdist(ref.reshape(-1, ENC_D), cents).argmin(1).view(3, *GRID)
    assert torch.equal(tok.encode_normalized(x), ref_ids)
    # the stage-1 run records the tokenizer it was trained on (used by generate / probe to refuse mismatches)
    from digit.utils.io import read_json

    assert read_json(tmp_path / "o" / "stage1" / "config.json")["data"]["meta"]["tokenizer"] == tok.config()


def test_digit_pos_embed_differs_from_size_resize():
    pos = torch.randn(1, 1 + 37 * 37, 8, generator=torch.Generator().manual_seed(0))
    ours = digit_pos_embed(pos, 16)
    assert ours.shape == (1, 257, 8) and torch.equal(ours[:, 0], pos[:, 0])
    by_size = F.interpolate(pos[:, 1:].reshape(1, 37, 37, 8).permute(0, 3, 1, 2), size=(16, 16), mode="bicubic")
    assert not torch.allclose(ours[:, 1:], by_size.permute(0, 2, 3, 1).reshape(1, 256, 8), atol=1e-4)


def test_dinov2_heads_are_read_or_required_never_guessed(tmp_path, capsys):
    from digit.cli import main
    from digit.convert.dinov2 import dinov2_heads

    # DINOv2's own sizes are known; DiGIT's config names its encoder (dino_vit_base / dino_vit_large)
    assert dinov2_heads(768, 12, "x") == 12 and dinov2_heads(1024, 24, "x", arch="dino_vit_large") == 16
    assert dinov2_heads(384, 12, "x") == 6 and dinov2_heads(1536, 40, "x") == 24
    assert dinov2_heads(32, 3, "x", heads=2) == 2
    for kwargs, msg in (
        ({}, "--dinov2-heads"),
        ({"heads": 3}, "do not divide"),
        ({"arch": "dino_vit_base"}, "names dino_vit_base"),
    ):
        with pytest.raises(DigitError, match=msg):
            dinov2_heads(32, 3, "x", **kwargs)
    with pytest.raises(DigitError, match="has 12 heads, not 8"):
        dinov2_heads(768, 12, "x", heads=8)
    # D // 64 would have guessed (0, clamped to 1) for this 32-wide encoder: the converter refuses and takes the flag
    enc = {k: v for k, v in dinov2_state().items()}
    np.save(tmp_path / "km.npy", torch.randn(K, ENC_D).numpy())
    torch.save(enc, tmp_path / "dinov2.pth")
    s1 = _save(tmp_path, "s1.pt", fairseq_ckpt("stlm"))
    argv = ["convert", "digit", "--stage1", s1, "--kmeans", str(tmp_path / "km.npy"), "--dinov2", str(tmp_path / "dinov2.pth"),
            "--grid", "2", "2", "--image-size", "28"]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "a")]) == 2
    assert "pass --dinov2-heads N" in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert main([*argv, "--dinov2-heads", "2", "--out", str(tmp_path / "b")]) == 0
    from digit.tokenizers import load_tokenizer

    assert load_tokenizer(tmp_path / "b" / "tokenizer").encoder.model.blocks[0].attn.num_heads == 2
    # a num_heads in the checkpoint's encoder config is read
    ck = fairseq_ckpt("stlm")
    ck["cfg"]["model"]["pretrained_enc_config"]["num_heads"] = 4
    convert_digit(tmp_path / "c", stage1=_save(tmp_path, "s1h.pt", ck), kmeans=str(tmp_path / "km.npy"),
                  dinov2=str(tmp_path / "dinov2.pth"), grid=GRID, image_size=28)  # fmt: skip
    assert load_tokenizer(tmp_path / "c" / "tokenizer").encoder.model.blocks[0].attn.num_heads == 4


TINY_DINOV2 = ["--encoder", "vit_base_patch14_reg4_dinov2", "--encoder-kwargs",
               f'{{"embed_dim": {ENC_D}, "depth": {ENC_DEPTH}, "num_heads": 1}}', "--image-size", "28", "--layer", "2"]  # fmt: skip


@pytest.mark.parametrize("route", ["from-centroids", "fit"])
def test_tokenizer_routes_reproduce_convert_digit_features(tmp_path, route, image_folder):
    """`tokenizer fit` / `from-centroids` on an original DINOv2 file resample its position table DiGIT's way by
    default, exactly as `convert digit` does: same table, same features, same tokens; `timm` stays available."""
    from digit.cli import main
    from digit.tokenizers import load_tokenizer

    enc = dinov2_state()
    torch.save(enc, tmp_path / "dinov2.pth")
    np.save(tmp_path / "km.npy", torch.randn(K, ENC_D, generator=torch.Generator().manual_seed(8)).numpy())
    convert_digit(tmp_path / "conv", stage1=_save(tmp_path, "s1.pt", fairseq_ckpt("stlm")), kmeans=str(tmp_path / "km.npy"),
                  dinov2=str(tmp_path / "dinov2.pth"), grid=GRID, image_size=28, encoder_heads=1)  # fmt: skip
    conv = load_tokenizer(tmp_path / "conv" / "tokenizer")
    if route == "fit":
        head = ["tokenizer", "fit", "--data", str(image_folder), "--clusters", "2", "--workers", "0"]
    else:
        head = ["tokenizer", "from-centroids", "--centroids", str(tmp_path / "km.npy")]
    argv = [*head, *TINY_DINOV2, "--encoder-weights", str(tmp_path / "dinov2.pth")]
    assert main([*argv, "--out", str(tmp_path / "auto")]) == 0
    assert main([*argv, "--pos-embed-interpolation", "timm", "--out", str(tmp_path / "timm")]) == 0
    tok, tok_timm = load_tokenizer(tmp_path / "auto"), load_tokenizer(tmp_path / "timm")  # rebuilt from tokenizer.json
    assert tok.config()["encoder"]["weights"]["pos_embed_interpolation"] == "digit"
    torch.testing.assert_close(tok.encoder.model.pos_embed, conv.encoder.model.pos_embed, atol=0, rtol=0)
    assert not torch.allclose(tok_timm.encoder.model.pos_embed, conv.encoder.model.pos_embed, atol=1e-3)
    x = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(9))
    ref = dinov2_digit_features(enc, x, layer=2)
    _close(tok.encoder(x), ref)
    _close(tok.encoder(x), conv.encoder(x))
    assert not torch.allclose(tok_timm.encoder(x), ref, atol=1e-3)
    if route == "from-centroids":
        assert torch.equal(tok.encode_normalized(x), conv.encode_normalized(x))


def test_hub_dinov2_weights_get_digit_interpolation(tmp_path, monkeypatch):
    """--pretrained timm DINOv2 weights: the native table is resampled DiGIT's way (auto), not by timm's loader."""
    import digit.tokenizers.encoder as encoder_mod

    enc = dinov2_state()
    create = encoder_mod._create_timm

    def fake_hub(name, kwargs, image_size, pretrained=False):  # the hub: the same weights at their native 70 px
        if not pretrained:
            return create(name, kwargs, image_size)
        model = create(name, kwargs, image_size or 14 * M)
        encoder_mod.load_state_dict_into(model, dict(enc), "hub")
        return model

    monkeypatch.setattr(encoder_mod, "_create_timm", fake_hub)
    kw = {"embed_dim": ENC_D, "depth": ENC_DEPTH, "num_heads": 1}
    name = "vit_base_patch14_reg4_dinov2"
    digit = encoder_mod.build_encoder(name, kw, pretrained=True, image_size=28, layer=2)
    timm_way = encoder_mod.build_encoder(
        name, kw, pretrained=True, image_size=28, layer=2, pos_embed_interpolation="timm"
    )
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(9))
    _close(digit(x), dinov2_digit_features(enc, x, layer=2))
    assert not torch.allclose(timm_way(x), digit(x), atol=1e-3)
    assert digit.config()["weights"]["pos_embed_interpolation"] == "digit"
    # a tokenizer.json written before the choice existed keeps timm's resampling (its tokens were made that way)
    cfg = {**timm_way.config(), "weights": {"kind": "hub", "name": name}}
    _close(encoder_mod.encoder_from_config(cfg)(x), timm_way(x))
    with pytest.raises(DigitError, match="unknown position-embedding interpolation"):
        encoder_mod.build_encoder(name, kw, pretrained=True, image_size=28, pos_embed_interpolation="nearest")


def test_read_fairseq_reports_architecture(tmp_path):
    ck = read_fairseq(_save(tmp_path, "s1.pt", fairseq_ckpt("stlm", classes=C)))
    assert ck.name == "stlm" and ck.task_cfg["target_vocab_size"] == K
    assert all(v.dtype == torch.float32 for v in ck.state.values() if v.is_floating_point())


# ----------------------------------------------------------------------------------------------- MAGE VQGAN
MCH, MULT, NRES, ZC, NCODE = 32, (1, 1, 2), 2, 32, V  # 3 levels: 8 px -> 2x2 codes


def mage_state(seed: int = 11) -> dict:
    """MAGE's taming-layout keys (digit-official.md section 4): bias-free res convs / shortcut / encoder conv_in."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=0.15):
        return torch.randn(*shape, generator=g) * std

    s = {}

    def norm(n, c):
        s[n + ".weight"], s[n + ".bias"] = 1 + r(c), r(c)

    def res(p, cin, cout):
        norm(p + "norm1", cin), norm(p + "norm2", cout)
        s[p + "conv1.weight"], s[p + "conv2.weight"] = r(cout, cin, 3, 3), r(cout, cout, 3, 3)
        if cin != cout:
            s[p + "nin_shortcut.weight"] = r(cout, cout, 1, 1)  # applied to h: [out, out]

    s["encoder.conv_in.weight"] = r(MCH, 3, 3, 3)
    cin = MCH
    for i, m in enumerate(MULT):
        for j in range(NRES):
            res(f"encoder.down.{i}.block.{j}.", cin, MCH * m)
            cin = MCH * m
    res("encoder.mid.block_1.", cin, cin), res("encoder.mid.block_2.", cin, cin)
    norm("encoder.norm_out", cin)
    s["encoder.conv_out.weight"], s["encoder.conv_out.bias"] = r(ZC, cin, 1, 1), r(ZC)
    s["decoder.conv_in.weight"], s["decoder.conv_in.bias"] = r(cin, ZC, 3, 3), r(cin)
    res("decoder.mid.block_1.", cin, cin), res("decoder.mid.block_2.", cin, cin)
    for i in reversed(range(len(MULT))):
        for j in range(NRES):
            res(f"decoder.up.{i}.block.{j}.", cin, MCH * MULT[i])
            cin = MCH * MULT[i]
        if i:
            s[f"decoder.up.{i}.upsample.conv.weight"], s[f"decoder.up.{i}.upsample.conv.bias"] = (
                r(cin, cin, 3, 3),
                r(cin),
            )
    norm("decoder.norm_out", cin)
    s["decoder.conv_out.weight"], s["decoder.conv_out.bias"] = r(3, cin, 3, 3), r(3)
    s["quantize.embedding.weight"] = r(NCODE, ZC, std=1.0)
    return s


def mage_reference(s: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MAGE's VQGAN forward (DiGIT `taming/modules/diffusionmodules/model.py` + VectorQuantizer2) -> (ids, recon)."""

    def gn(h, n):
        return F.silu(F.group_norm(h, 32, s[n + ".weight"], s[n + ".bias"], 1e-6))

    def res(h, p):
        y = F.conv2d(gn(h, p + "norm1"), s[p + "conv1.weight"], padding=1)
        y = F.conv2d(gn(y, p + "norm2"), s[p + "conv2.weight"], padding=1)
        return (F.conv2d(y, s[p + "nin_shortcut.weight"]) if p + "nin_shortcut.weight" in s else h) + y

    h = F.conv2d(x, s["encoder.conv_in.weight"], padding=1)
    for i in range(len(MULT)):
        for j in range(NRES):
            h = res(h, f"encoder.down.{i}.block.{j}.")
        if i != len(MULT) - 1:
            h = F.avg_pool2d(h, 2)
    h = res(res(h, "encoder.mid.block_1."), "encoder.mid.block_2.")
    z = F.conv2d(gn(h, "encoder.norm_out"), s["encoder.conv_out.weight"], s["encoder.conv_out.bias"])
    e = s["quantize.embedding.weight"]
    flat = z.permute(0, 2, 3, 1).reshape(-1, ZC)
    ids = ((flat**2).sum(1, keepdim=True) + (e**2).sum(1) - 2 * flat @ e.t()).argmin(1)
    h = e[ids].view(z.shape[0], z.shape[2], z.shape[3], ZC).permute(0, 3, 1, 2)
    h = F.conv2d(h, s["decoder.conv_in.weight"], s["decoder.conv_in.bias"], padding=1)
    h = res(res(h, "decoder.mid.block_1."), "decoder.mid.block_2.")
    for i in reversed(range(len(MULT))):
        for j in range(NRES):
            h = res(h, f"decoder.up.{i}.block.{j}.")
        if i:
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            h = F.conv2d(
                h, s[f"decoder.up.{i}.upsample.conv.weight"], s[f"decoder.up.{i}.upsample.conv.bias"], padding=1
            )
    out = F.conv2d(gn(h, "decoder.norm_out"), s["decoder.conv_out.weight"], s["decoder.conv_out.bias"], padding=1)
    return ids.view(x.shape[0], *GRID), out


def test_mage_vqgan_matches_reference(tmp_path):
    from digit.tokenizers import load_tokenizer

    s = mage_state()
    torch.save({"state_dict": s}, tmp_path / "vqgan.ckpt")
    s1 = _save(tmp_path, "s1.pt", fairseq_ckpt("stlm"))
    convert_digit(tmp_path / "o", stage1=s1, vqgan=str(tmp_path / "vqgan.ckpt"), grid=GRID)
    vq = load_tokenizer(tmp_path / "o" / "vqgan")
    assert vq.cfg.family == "mage" and vq.image_size == 8 and vq.vocab_size == NCODE
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(12))  # MAGE's VQGAN works on [0, 1]
    ids, recon = mage_reference(s, x)
    assert torch.equal(vq.encode(x), ids)
    _close(vq.decode(ids), recon.clamp(0, 1))
    # without --vqgan: the frozen copy a stage-2 checkpoint carries under vqgan.* (fp16) is used
    s2 = _save(tmp_path, "s2.pt", fairseq_ckpt("st2vtlm", extra={f"vqgan.{k}": v.half() for k, v in s.items()}))
    with pytest.warns(UserWarning, match="VQGAN copy inside"):
        written = convert_digit(tmp_path / "o2", stage1=s1, stage2=s2, grid=GRID)
    assert "vqgan" in written
    s16 = {k: v.half().float() for k, v in s.items()}
    torch.testing.assert_close(
        load_tokenizer(tmp_path / "o2" / "vqgan").decode(ids), mage_reference(s16, x)[1].clamp(0, 1)
    )


# ----------------------------------------------------------------------------------------------- official sampling
def test_fairseq_top_p_uses_unrenormalised_mass():
    from digit.sampling.filters import top_p_filter
    from digit.sampling.official import fairseq_filter

    # code probabilities 0.35, 0.2, 0.05; the banned special rows hold 0.4 of the mass
    logits = torch.tensor([[0.35, 0.2, 0.05, 0.4]]).log()
    keep = lambda f: torch.isfinite(f[0, :3]).nonzero().flatten().tolist()  # noqa: E731
    assert keep(fairseq_filter(logits, n_codes=3, top_p=0.5)) == [0, 1]  # 0.35 < 0.5, then 0.55 reaches it
    assert keep(top_p_filter(logits[:, :3], 0.5)) == [0]  # renormalised: 0.5 already reaches 0.5
    assert keep(fairseq_filter(logits, n_codes=3, top_p=0.8)) == [0, 1, 2]  # total code mass 0.6 < 0.8
    assert keep(top_p_filter(logits[:, :3], 0.8)) == [0, 1]
    assert keep(fairseq_filter(logits, n_codes=3, top_k=2)) == [0, 1]
    f = fairseq_filter(logits, n_codes=3, top_p=0.5)
    assert torch.isinf(f[0, 3]) and torch.allclose(f[0, :2].exp(), torch.tensor([0.35, 0.2]))  # not renormalised


def test_generate_official_on_converted_stage2(tmp_path):
    from digit.models import load_gpt_run
    from digit.sampling.official import generate_official, load_special_rows

    ck1, ck2 = fairseq_ckpt("stlm", seed=13), fairseq_ckpt("st2vtlm", seed=14)
    convert_digit(tmp_path / "o", stage1=_save(tmp_path, "a.pt", ck1), stage2=_save(tmp_path, "b.pt", ck2), grid=GRID)
    model, _ = load_gpt_run(tmp_path / "o" / "stage2")
    special = load_special_rows(tmp_path / "o" / "stage2")
    prefix = torch.randint(0, K, (3, SEQ), generator=torch.Generator().manual_seed(15))
    head = model.head

    def run(**kw):
        return generate_official(model, special, prefix, generator=torch.Generator().manual_seed(16), **kw)

    a, b = run(top_p=0.8), run(top_p=0.8)
    assert a.shape == (3, *GRID) and torch.equal(a, b) and 0 <= int(a.min()) and int(a.max()) < V
    assert model.head is head  # the appended rows are gone again
    assert not torch.equal(run(top_p=0.8), run(top_p=0.3))  # the nucleus matters
    # top-k only: slicing the specials away is exact, so the plain filters give the same distribution
    from digit.sampling.filters import filter_logits
    from digit.sampling.official import fairseq_filter

    codes, specials = torch.randn(4, V) * 3, torch.randn(4, NS) * 3
    full = fairseq_filter(torch.cat([codes, specials], 1), n_codes=V, top_k=3, temperature=0.7)
    torch.testing.assert_close(full.softmax(-1)[:, :V], filter_logits(codes, 0.7, top_k=3).softmax(-1))


# ----------------------------------------------------------------------------------------------- CLI + pipeline
def test_cli_writes_directories_the_pipeline_accepts(tmp_path, capsys):
    from digit.cli import main
    from digit.pipeline import load_pipeline
    from digit.utils.outputs import MARKER  # the output directory's "written by digit" marker

    torch.save(mage_state(), tmp_path / "vqgan.ckpt")
    np.save(tmp_path / "km.npy", torch.randn(K, ENC_D).numpy())
    torch.save(dinov2_state(), tmp_path / "dinov2.pth")
    s1, s2 = (
        _save(tmp_path, "s1.pt", fairseq_ckpt("stlm", classes=C)),
        _save(tmp_path, "s2.pt", fairseq_ckpt("st2vtlm_nar")),
    )
    out = tmp_path / "out"
    argv = ["convert", "digit", "--stage1", s1, "--stage2", s2, "--kmeans", str(tmp_path / "km.npy"), "--dinov2",
            str(tmp_path / "dinov2.pth"), "--vqgan", str(tmp_path / "vqgan.ckpt"), "--grid", "2", "2",
            "--image-size", "28", "--dinov2-heads", "1", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir() if p.name != MARKER) == ["stage1", "stage2", "tokenizer", "vqgan"]
    pipe = load_pipeline(out / "stage1", out / "vqgan", out / "stage2")
    assert pipe.kind == "digit-nar" and pipe.num_classes == C
    assert main(argv) == 0  # its own earlier output is replaced; a folder holding anything else needs --overwrite
    (out / "stage1" / "notes.txt").write_text("mine")
    assert main(argv) == 2 and "is not empty and is not an earlier `digit convert digit`" in capsys.readouterr().err
    assert main(["convert", "digit", "--stage1", str(tmp_path / "km.npy"), "--out", str(tmp_path / "x")]) == 2


def test_generate_official_sampling_flag(tmp_path, capsys):
    from digit.cli import main

    torch.save(mage_state(), tmp_path / "vqgan.ckpt")
    s1 = _save(tmp_path, "s1.pt", fairseq_ckpt("stlm", classes=C))
    s2 = _save(tmp_path, "s2.pt", fairseq_ckpt("st2vtlm"))
    s2n = _save(tmp_path, "s2n.pt", fairseq_ckpt("st2vtlm_nar"))
    for name, stage2 in (("ar", s2), ("nar", s2n)):
        argv = ["convert", "digit", "--stage1", s1, "--stage2", stage2, "--vqgan", str(tmp_path / "vqgan.ckpt"),
                "--grid", "2", "2", "--image-size", "28", "--out", str(tmp_path / name)]  # fmt: skip
        assert main(argv) == 0
    gen = ["generate", "--stage1", str(tmp_path / "ar" / "stage1"), "--vq", str(tmp_path / "ar" / "vqgan"),
           "-n", "3", "--top-k", "3", "--decoder-top-p", "0.8", "--official-sampling", "--seed", "1"]  # fmt: skip
    assert main([*gen, "--decoder", str(tmp_path / "ar" / "stage2"), "--out", str(tmp_path / "g")]) == 0
    with np.load(tmp_path / "g" / "samples.npz") as z:
        assert z[z.files[0]].shape[0] == 3
    capsys.readouterr()
    assert main([*gen, "--decoder", str(tmp_path / "nar" / "stage2"), "--out", str(tmp_path / "g2")]) == 2
    assert "--official-sampling needs an AR --decoder" in capsys.readouterr().err
