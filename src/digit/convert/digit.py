"""DiGIT's released fairseq checkpoints -> run / tokenizer / VQ directories (no fairseq needed).

Vocabulary layout of the originals (../shared/reference/digit-official.md sections 2, 4, 9; DiGIT `fairseq_user/`):
fairseq dictionaries start with 5 specials ``<s>`` 0, ``<pad>`` 1, ``</s>`` 2 (BOS = EOS), ``<unk>`` 3, ``<n>`` 4.

- stage 1 (``stlm``): embedding rows ``[5 specials | K clusters | C classes]`` (cluster c -> c + 5, class k -> 5 + K + k,
  replacing the BOS at position 0), output head ``[5 + K]``. Post-LN, no final LayerNorm.
- stage 2 (``st2vtlm`` AR, ``st2vtlm_nar`` MaskGIT): rows ``[5 | V VQ codes | 5 | K clusters]`` (code v -> v + 5,
  cluster c -> c + V + 10), head ``[5 + V]``; input ``[s_1..s_K', </s>, v_1..]`` with the prefix on ``embed_positions_1``
  and ``[</s>, v..]`` on ``embed_positions``, both starting at row 2. Pre-LN with a final LayerNorm. NAR masks with ``<unk>``.
- VQ baseline (``st2vtlm_vq``): rows ``[5 | V]``, unconditional pre-LN decoder over ``[</s>, v..]``.

In this project's layout (`digit.models.gpt` with the fairseq switches, names through `digit.convert.keys.from_fairseq`)
ids are the codebook ids themselves: the converter slices
the cluster / code rows out of the embedding and the head, moves the BOS row into the condition's start vector (or the
class table), the ``<unk>`` row into the NAR mask row, and keeps the 5 special output rows in ``official_head.safetensors``
for `digit.sampling.official` (fairseq normalises over the whole dictionary before banning specials).
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from digit.convert import SPECIALS_FILE, fp32_state, load_exact, token_meta, write_run_dir
from digit.convert.dinov2 import dinov2_encoder, write_tokenizer_dir
from digit.convert.keys import from_fairseq
from digit.convert.unpickler import load_checkpoint
from digit.errors import DigitError
from digit.sampling.maskgit import DIGIT_NAR_STEPS

NSPECIAL = 5
BOS = EOS = 2
PAD, UNK = 1, 3
SPECIAL_SYMBOLS = ["<s>", "<pad>", "</s>", "<unk>", "<n>"]
POS_OFFSET = 2  # fairseq LearnedPositionalEmbedding: padding_idx + 1
KINDS = ("stlm", "st2vtlm", "st2vtlm_nar", "st2vtlm_vq")


@dataclass
class FairseqCheckpoint:
    path: str
    name: str  # cfg['model']['_name']
    model_cfg: dict[str, Any]
    task_cfg: dict[str, Any]
    state: dict[str, torch.Tensor]  # float32


def read_fairseq(path: str | os.PathLike) -> FairseqCheckpoint:
    """Load a fairseq checkpoint (restricted unpickling) and pull out the model / task config and the fp32 weights."""
    ck = load_checkpoint(path)
    if not isinstance(ck, dict) or not isinstance(ck.get("model"), dict):
        raise DigitError(f"{path} is not a fairseq checkpoint (no 'model' state dict)")
    cfg = ck.get("cfg")
    if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict):
        model_cfg, task_cfg = cfg["model"], cfg.get("task") or {}
    elif ck.get("args") is not None:  # fairseq < 0.10 stored an argparse.Namespace
        model_cfg = task_cfg = dict(vars(ck["args"]))
        model_cfg.setdefault("_name", model_cfg.get("arch"))
    else:
        raise DigitError(f"{path} has neither cfg['model'] nor args: cannot tell the architecture")
    name = model_cfg.get("_name")
    if name not in KINDS:
        raise DigitError(f"{path}: model {name!r} is not a DiGIT model (expected one of {', '.join(KINDS)})")
    return FairseqCheckpoint(str(path), name, dict(model_cfg), dict(task_cfg), fp32_state(ck["model"]))


def _cfg(c: dict[str, Any], *names: str, default: Any = None) -> Any:
    for n in names:
        if c.get(n) is not None:
            return c[n]
    return default


def _check(ok: bool, ck: FairseqCheckpoint, msg: str) -> None:
    if not ok:
        raise DigitError(f"{ck.path}: {msg}")


def gpt_config_from_fairseq(ck: FairseqCheckpoint, grid: tuple[int, int]):
    """Read the architecture from cfg['model'] / cfg['task'], cross-checked against the tensor shapes.
    Returns (GPTConfig, vocab sizes dict)."""
    from digit.models.gpt import ARCHS, GPTConfig

    s, m = ck.state, ck.model_cfg
    for key in ("decoder.embed_tokens.weight", "decoder.embed_positions.weight"):
        _check(key in s, ck, f"missing {key}")
    _check("decoder.layernorm_embedding.weight" not in s, ck, "layernorm_embedding is not supported")
    _check(not m.get("no_scale_embedding"), ck, "no_scale_embedding=True is not supported")
    _check("decoder.output_projection.weight" in s, ck, "tied input/output embeddings are not supported")
    emb, head = s["decoder.embed_tokens.weight"], s["decoder.output_projection.weight"]
    rows, dim = emb.shape
    n_layers = len({int(k.split(".")[2]) for k in s if re.match(r"decoder\.layers\.\d+\.", k)})
    _check(n_layers > 0 and "decoder.layers.0.fc1.weight" in s, ck, "no decoder layers")
    heads = int(_cfg(m, "decoder_attention_heads", default=0))
    _check(int(_cfg(m, "decoder_embed_dim", default=dim)) == dim, ck, f"decoder_embed_dim disagrees with {dim}")
    _check(int(_cfg(m, "decoder_layers", default=n_layers)) == n_layers, ck, f"decoder_layers != {n_layers} layers")
    _check(heads > 0 and dim % heads == 0, ck, f"decoder_attention_heads {heads} does not divide {dim}")
    ffn = s["decoder.layers.0.fc1.weight"].shape[0]
    _check(int(_cfg(m, "decoder_ffn_embed_dim", default=ffn)) == ffn, ck, f"decoder_ffn_embed_dim != {ffn}")
    pre_ln = bool(_cfg(m, "decoder_normalize_before", "normalize_before", default=ck.name != "stlm"))
    _check(pre_ln == ("decoder.layer_norm.weight" in s), ck, "normalize_before disagrees with the final LayerNorm")
    act = _cfg(m, "activation_fn", default="gelu")
    _check(act == "gelu", ck, f"activation {act!r} is not supported (DiGIT uses gelu)")

    t = ck.task_cfg
    tvs = t.get("target_vocab_size")
    n_target = NSPECIAL + int(tvs) if tvs is not None and int(tvs) > 0 else head.shape[0]
    _check(head.shape[0] == n_target, ck, f"output head has {head.shape[0]} rows, the target dictionary {n_target}")
    seq = grid[0] * grid[1]
    kw: dict[str, Any] = {**ARCHS["fairseq"]}
    kw.update(
        vocab_size=n_target - NSPECIAL, grid=grid, dim=dim, n_layers=n_layers, n_heads=heads,
        ffn_dim=ffn, norm_eps=1e-5, norm_first=bool(pre_ln),
        max_positions=s["decoder.embed_positions.weight"].shape[0] - POS_OFFSET, class_dropout=0.0,
        embed_dropout=float(m.get("dropout", 0.0) or 0.0), resid_dropout=float(m.get("dropout", 0.0) or 0.0),
        ffn_dropout=float(m.get("dropout", 0.0) or 0.0), attn_dropout=float(m.get("attention_dropout", 0.0) or 0.0),
    )  # fmt: skip
    sizes = {"target_dict": n_target, "embed_rows": rows}
    if ck.name == "stlm":
        classes = rows - n_target
        cc = bool(_cfg(m, "class_conditional", default=classes > 0))
        _check(classes >= 0 and cc == (classes > 0), ck,
               f"class_conditional={cc} but the embedding has {classes} rows beyond the dictionary")  # fmt: skip
        if cc:
            kw.update(cond="class", num_classes=classes)
        sizes["classes"] = classes
    elif ck.name in ("st2vtlm", "st2vtlm_nar"):
        n_source = NSPECIAL + int(_cfg(t, "source_vocab_size", default=rows - n_target - NSPECIAL))
        _check(rows == n_target + n_source, ck, f"embedding has {rows} rows, expected {n_target} + {n_source}")
        _check("decoder.embed_positions_1.weight" in s, ck, "a stage-2 decoder needs decoder.embed_positions_1")
        p1 = s["decoder.embed_positions_1.weight"].shape[0] - POS_OFFSET
        _check(p1 >= seq, ck, f"embed_positions_1 covers {p1} prefix positions, the prefix has {seq}")
        kw.update(cond="prefix", prefix_vocab_size=n_source - NSPECIAL, prefix_grid=grid, causal=ck.name == "st2vtlm")
        sizes["source_dict"] = n_source
    else:
        _check(rows == n_target, ck, f"embedding has {rows} rows, the dictionary {n_target}")
    _check(kw["max_positions"] >= seq + 1, ck, f"embed_positions covers {kw['max_positions']} < {seq + 1} positions")
    return GPTConfig(**kw), sizes


def convert_fairseq_decoder(ck: FairseqCheckpoint, grid: tuple[int, int] = (16, 16)):
    """-> (GPT with the converted weights, {"output_special.weight": [5, dim]}, vocab sizes)."""
    from digit.models.gpt import GPT

    cfg, sizes = gpt_config_from_fairseq(ck, grid)
    s = ck.state
    emb, head = s["decoder.embed_tokens.weight"], s["decoder.output_projection.weight"]
    T = sizes["target_dict"]  # fairseq target dictionary: 5 specials + the codes
    # fairseq names (without "decoder.") with the vocabulary re-laid out, then renamed by from_fairseq
    out: dict[str, torch.Tensor] = {}
    for k, v in s.items():
        if k.startswith("decoder.layers.") or k.startswith("decoder.layer_norm."):
            out[k.removeprefix("decoder.")] = v
    codes = emb[NSPECIAL:T]  # our id i <-> fairseq row i + 5
    out["embed_tokens.weight"] = codes if cfg.causal else torch.cat([codes, emb[UNK : UNK + 1]])  # NAR mask = <unk>
    out["embed_positions.weight"] = s["decoder.embed_positions.weight"]
    out["output_projection.weight"] = head[NSPECIAL:T]
    bos = emb[BOS].view(1, 1, -1)
    if cfg.cond == "class":
        # class k is fairseq row T + k; the null row (used only by CFG, which DiGIT never trained) is the BOS row
        out["condition.table.weight"] = torch.cat([emb[T : T + cfg.num_classes], emb[BOS : BOS + 1]])
    else:
        out["condition.start"] = bos
    model = GPT(cfg)
    if cfg.cond == "prefix":
        first = T + NSPECIAL  # cluster c <-> row T + 5 + c
        out["condition.table.weight"] = emb[first : first + cfg.prefix_vocab_size]
        # as many rows as the model keeps (the whole table when max_positions is set)
        rows = model.prefix_pos_embed.num_embeddings
        out["embed_positions_1.weight"] = s["decoder.embed_positions_1.weight"][:rows]
    try:
        ours = from_fairseq(out)
    except DigitError as e:
        raise DigitError(f"{ck.path}: {e}") from e
    load_exact(model, ours, ck.path)
    return model.eval(), {"output_special.weight": head[:NSPECIAL].clone()}, sizes


def official_info(ck: FairseqCheckpoint) -> dict[str, Any]:
    """What `digit.sampling.official` needs to reproduce fairseq's sampler for this model."""
    return {
        "sampler": "fairseq",
        "model": ck.name,
        "special_symbols": SPECIAL_SYMBOLS,
        "eos": EOS,
        "specials_file": SPECIALS_FILE,
        # DiGIT's scripts: stage 1 top-k 200 (300 class-conditional, 400 large); stage 2 AR top-p 0.8; NAR 8 steps
        "published_sampling": {"stlm": {"top_k": 200}, "st2vtlm": {"top_p": 0.8}, "st2vtlm_nar": {"steps": DIGIT_NAR_STEPS},
                               "st2vtlm_vq": {"top_p": 1.0}}[ck.name],
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------ DINOv2 encoder


def _centroids(kmeans: str | None, ck: FairseqCheckpoint | None) -> torch.Tensor | None:
    from digit.tokenizers.discriminative import load_centroids

    if kmeans is not None:
        return torch.from_numpy(load_centroids(kmeans))  # km_8k.npy: [K, D]
    if ck is not None and "centroids" in ck.state:
        return ck.state["centroids"].t().contiguous()  # stored [D, K] (DiGIT build_centroids transposes)
    return None


def _encoder_state(dinov2: str | None, ck: FairseqCheckpoint | None) -> tuple[dict | None, str]:
    from digit.tokenizers.encoder import read_state_dict

    if dinov2 is not None:
        return read_state_dict(dinov2), str(dinov2)
    if ck is not None and any(k.startswith("pretrained_encoder.") for k in ck.state):
        warnings.warn("using the DINOv2 copy inside the checkpoint (stored in fp16); pass --dinov2 for the fp32 "
                      "original", stacklevel=3)  # fmt: skip
        sd = {
            k.removeprefix("pretrained_encoder."): v for k, v in ck.state.items() if k.startswith("pretrained_encoder.")
        }
        return sd, f"{ck.path}:pretrained_encoder"
    return None, ""


def _check_vq(vq_cfg: dict | None, vocab: int, path: str) -> None:
    if vq_cfg is not None and int(vq_cfg["vocab_size"]) != vocab:
        raise DigitError(f"--vqgan has {vq_cfg['vocab_size']} codes, {path} predicts {vocab}")


def convert_digit(
    out: str | os.PathLike,
    *,
    stage1: str,
    stage2: str | None = None,
    kmeans: str | None = None,
    dinov2: str | None = None,
    vqgan: str | None = None,
    grid: tuple[int, int] = (16, 16),
    image_size: int = 224,
    interpolation: str = "digit",
    encoder_heads: int | None = None,
) -> dict[str, str]:
    """Write ``stage1/`` (and ``stage2/``) run directories, ``tokenizer/`` and ``vqgan/`` under ``out`` (a directory
    that is created or must be empty). ``encoder_heads``: the DINOv2's attention heads when it is none of DINOv2's
    sizes (:func:`dinov2_heads`). Returns {piece: path}."""
    from digit.convert.mage import convert_mage_vqgan, mage_vqgan_from_state

    out = Path(out)
    written: dict[str, str] = {}
    ck1 = read_fairseq(stage1)
    ck2 = read_fairseq(stage2) if stage2 is not None else None
    if ck2 is not None and ck2.name not in ("st2vtlm", "st2vtlm_nar"):
        raise DigitError(f"--stage2 {stage2} is a {ck2.name!r} model, not a stage-2 decoder (st2vtlm / st2vtlm_nar)")
    if ck1.name in ("st2vtlm", "st2vtlm_nar"):
        raise DigitError(f"--stage1 {stage1} is a stage-2 decoder ({ck1.name}); pass it as --stage2")

    vq_cfg = None
    vq_holder = ck2 if ck2 is not None else (ck1 if ck1.name == "st2vtlm_vq" else None)
    vq = None
    if vqgan is not None:
        vq = convert_mage_vqgan(vqgan, grid=grid[0])
    elif vq_holder is not None and "vqgan.quantize.embedding.weight" in vq_holder.state:
        # DiGIT's stage-2 models carry the frozen VQGAN under ``vqgan.*`` (stored in fp16)
        warnings.warn("using the VQGAN copy inside the checkpoint (fp16); pass --vqgan for the original", stacklevel=2)
        inner = {k.removeprefix("vqgan."): v for k, v in vq_holder.state.items() if k.startswith("vqgan.")}
        vq = mage_vqgan_from_state(inner, f"{vq_holder.path}:vqgan", grid=grid[0])
    if vq is not None:
        vq.save(out / "vqgan")
        vq_cfg, written["vqgan"] = vq.config(), str(out / "vqgan")

    tok_cfg = None
    # stage 1 and stage 2 both carry the frozen encoder and centroids: the first that has them is used
    holders = [c for c in (ck1, ck2) if c is not None]
    cents = _centroids(kmeans, next((c for c in holders if "centroids" in c.state), None))
    has_enc = next((c for c in holders if any(k.startswith("pretrained_encoder.") for k in c.state)), None)
    enc_sd, enc_origin = _encoder_state(dinov2, has_enc)
    if cents is not None and enc_sd is not None:
        enc_cfg = ck1.model_cfg.get("pretrained_enc_config") or {}
        layer = int(enc_cfg.get("layer") or 3)
        encoder = dinov2_encoder(enc_sd, origin=enc_origin, image_size=image_size, layer=layer,
                                 interpolation=interpolation, heads=encoder_heads or enc_cfg.get("num_heads"),
                                 arch=enc_cfg.get("pretrained_enc_arch"))  # fmt: skip
        tok_cfg = write_tokenizer_dir(out / "tokenizer", encoder, cents)
        written["tokenizer"] = str(out / "tokenizer")

    model1, specials1, sizes1 = convert_fairseq_decoder(ck1, grid)
    c1 = model1.config
    if cents is not None and ck1.name == "stlm" and cents.shape[0] != c1.vocab_size:
        raise DigitError(f"the codebook has {cents.shape[0]} centroids, stage 1 a {c1.vocab_size}-token vocabulary")
    s1_tok = vq_cfg if ck1.name == "st2vtlm_vq" else tok_cfg
    if ck1.name == "st2vtlm_vq":
        _check_vq(vq_cfg, c1.vocab_size, stage1)
    write_run_dir(out / "stage1", model1, meta=token_meta(c1.grid, c1.vocab_size, c1.num_classes, s1_tok),
                  source={"file": str(stage1), "model": ck1.name, **sizes1}, official=official_info(ck1),
                  specials=specials1)  # fmt: skip
    written["stage1"] = str(out / "stage1")
    if ck2 is not None:
        model2, specials2, sizes2 = convert_fairseq_decoder(ck2, grid)
        c2 = model2.config
        _check_vq(vq_cfg, c2.vocab_size, stage2)
        if ck1.name == "stlm" and (c2.prefix_vocab_size != c1.vocab_size):
            raise DigitError(f"--stage2 is conditioned on {c2.prefix_vocab_size} ids, stage 1 samples {c1.vocab_size}")
        write_run_dir(out / "stage2", model2, meta=token_meta(c2.grid, c2.vocab_size, 0, vq_cfg),
                      prefix_meta=token_meta(c2.prefix_grid, c2.prefix_vocab_size, 0, tok_cfg),
                      source={"file": str(stage2), "model": ck2.name, **sizes2}, official=official_info(ck2),
                      specials=specials2)  # fmt: skip
        written["stage2"] = str(out / "stage2")
    return written
