"""LlamaGen's released class-conditional GPTs (``c2i_*.pt``), text-conditional GPTs (``t2i_*.pt``: caption MLP and
null caption, ``cond="text"`` with ``caption_len`` = the null caption's rows, 120) and VQ tokenizer (``vq_ds16_c2i.pt``)
-> a run directory and a VQ tokenizer directory.

The GPT keys are renamed by `digit.convert.keys.from_llamagen` (one to one; ``to_llamagen`` goes back) after
unwrapping: DDP checkpoints are ``{"model", "optimizer", "steps", "args"}`` with ``args`` a pickled ``argparse.Namespace``; FSDP
``consolidated.pth`` files are the bare state dict; ``module.`` / ``_orig_mod.`` prefixes (DDP / torch.compile) are
stripped (LlamaGen ``sample_c2i.py`` accepts the same variants). Head counts are not visible in the shapes: they come
from ``args.gpt_model`` or LlamaGen's size table (../shared/reference/llamagen-official.md section 1).
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Any

import torch

from digit.convert import fp32_state, load_exact, token_meta, write_run_dir
from digit.convert.keys import from_llamagen
from digit.convert.unpickler import load_checkpoint
from digit.errors import DigitError

# LlamaGen GPT_models: name -> (n_layers, n_heads, dim)
LLAMAGEN_MODELS = {"GPT-B": (12, 12, 768), "GPT-L": (24, 16, 1024), "GPT-XL": (36, 20, 1280),
                   "GPT-XXL": (48, 24, 1536), "GPT-XXXL": (48, 40, 2560), "GPT-1B": (22, 32, 2048),
                   "GPT-3B": (24, 32, 3200), "GPT-7B": (32, 32, 4096)}  # fmt: skip
_HEADS_BY_DIM = {d: h for (_, h, d) in LLAMAGEN_MODELS.values()}


def _unwrap(ck: Any, path: str) -> tuple[dict[str, torch.Tensor], argparse.Namespace | None]:
    args = ck.get("args") if isinstance(ck, dict) else None
    if isinstance(args, dict):
        args = argparse.Namespace(**args)
    sd = ck
    for key in ("model", "module", "state_dict", "ema"):
        if isinstance(ck, dict) and isinstance(ck.get(key), dict):
            sd = ck[key]
            break
    if not isinstance(sd, dict) or not any(torch.is_tensor(v) for v in sd.values()):
        raise DigitError(f"{path} holds no state dict (expected 'model', 'module', 'state_dict' or a bare state dict)")
    sd = {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in sd.items()}
    return fp32_state(sd), args if isinstance(args, argparse.Namespace) else None


def llamagen_gpt_config(
    state: dict[str, torch.Tensor],
    args: argparse.Namespace | None,
    *,
    image_size: int | None = None,
    downsample: int | None = None,
    n_heads: int | None = None,
    path: str = "checkpoint",
):
    """GPTConfig from the shapes, ``args`` (gpt_model, image_size, downsample_size, class_dropout_prob) and overrides."""
    from digit.models.gpt import ARCHS, GPTConfig

    t2i = any(k.startswith("cls_embedding.cap_proj") for k in state)
    cond_key = "cls_embedding.uncond_embedding" if t2i else "cls_embedding.embedding_table.weight"
    for k in ("tok_embeddings.weight", cond_key, "output.weight", "norm.weight"):
        if k not in state:
            raise DigitError(f"{path} is not a LlamaGen {'t2i' if t2i else 'c2i'} GPT (no {k})")
    vocab, dim = state["tok_embeddings.weight"].shape
    n_layers = len({int(k.split(".")[1]) for k in state if re.match(r"layers\.\d+\.", k)})
    a = vars(args) if args is not None else {}
    name = a.get("gpt_model")
    if n_heads is None and name in LLAMAGEN_MODELS:
        L, n_heads, d = LLAMAGEN_MODELS[name]
        if (L, d) != (n_layers, dim):
            raise DigitError(f"{path}: args.gpt_model {name} has {L} layers x {d}, the weights {n_layers} x {dim}")
    n_heads = n_heads or _HEADS_BY_DIM.get(dim)
    if not n_heads:
        raise DigitError(f"{path}: cannot tell the head count of a {dim}-wide model; pass --heads")
    image_size = image_size or a.get("image_size") or _size_from_name(path)
    downsample = downsample or a.get("downsample_size") or 16
    if not image_size:
        raise DigitError(f"{path}: the image size is not recorded; pass --image-size (256 or 384 for c2i models)")
    if t2i:
        caption_len, caption_dim = state[cond_key].shape
        if a.get("cls_token_num", caption_len) != caption_len:
            raise DigitError(f"{path}: cls_token_num {a['cls_token_num']} but a {caption_len}-row null caption")
        cond = dict(cond="text", caption_len=caption_len, caption_dim=caption_dim)
    else:
        if a.get("cls_token_num", 1) != 1:
            raise DigitError(f"{path}: cls_token_num {a['cls_token_num']} (a class-conditional c2i model has 1 token)")
        cond = dict(cond="class", num_classes=state[cond_key].shape[0] - 1)
    g = int(image_size) // int(downsample)
    return GPTConfig(
        **ARCHS["llama"], vocab_size=vocab, grid=(g, g), dim=dim, n_layers=n_layers, n_heads=int(n_heads),
        ffn_dim=state["layers.0.feed_forward.w1.weight"].shape[0], norm_eps=1e-5, rope_base=10000.0, **cond,
        class_dropout=float(a.get("class_dropout_prob", 0.1)), embed_dropout=float(a.get("token_dropout_p", 0.1)),
        resid_dropout=float(a.get("dropout_p", 0.1)), ffn_dropout=float(a.get("dropout_p", 0.1)),
    )  # fmt: skip


def _size_from_name(path: str) -> int | None:
    m = re.search(r"_(256|384|512)(?:\D|$)", Path(path).name)  # c2i_L_384.pt
    return int(m.group(1)) if m else None


def convert_llamagen_gpt(path: str | os.PathLike, **overrides: Any):
    """-> (GPT in eval mode, the source info)."""
    from digit.models.gpt import GPT

    state, args = _unwrap(load_checkpoint(path), str(path))
    state = {k: v for k, v in state.items() if k not in ("freqs_cis", "causal_mask")}  # buffers some versions keep
    cfg = llamagen_gpt_config(state, args, path=str(path), **overrides)
    model = GPT(cfg)
    try:
        ours = from_llamagen(state)
    except DigitError as e:
        raise DigitError(f"{path}: {e}") from e
    load_exact(model, ours, str(path))
    return model.eval(), {"file": str(path), "gpt_model": getattr(args, "gpt_model", None)}


def llamagen_vq_config(state: dict[str, torch.Tensor], image_size: int = 256) -> dict[str, Any]:
    """The ``llamagen-vq16`` preset's sizes read from the shapes (ch, ch_mult, blocks, z, codebook, usage buffer)."""
    try:
        ch = state["encoder.conv_in.weight"].shape[0]
        levels = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"encoder\.conv_blocks\.(\d+)\.", k)))
        n_res = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"encoder\.conv_blocks\.0\.res\.(\d+)\.", k)))
        ch_mult = [state[f"encoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0] // ch for i in range(levels)]
        n_codes, code_dim = state["quantize.embedding.weight"].shape
        z = state["encoder.conv_out.weight"].shape[0]
    except (KeyError, ValueError) as e:
        raise DigitError(f"not a LlamaGen VQ layout ({type(e).__name__}: {e})") from e
    used = state["quantize.codebook_used"].numel() if "quantize.codebook_used" in state else 0
    return dict(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=n_res, z_channels=z, codebook_size=n_codes,
                codebook_dim=code_dim, codebook_used_size=used, image_size=image_size)  # fmt: skip


def convert_llamagen_vq(path: str | os.PathLike, image_size: int = 256, norm_groups: int = 32):
    from digit.tokenizers.vq import VQModel, build_vq_config

    state, _ = _unwrap(load_checkpoint(path), str(path))
    state = {k: v for k, v in state.items() if k.startswith(("encoder.", "decoder.", "quantize.", "quant_conv.",
                                                             "post_quant_conv."))}  # fmt: skip
    model = VQModel(build_vq_config("llamagen-vq16", norm_groups=norm_groups, **llamagen_vq_config(state, image_size)))
    load_exact(model, state, str(path))
    return model.eval()


def convert_llamagen(
    out: str | os.PathLike,
    *,
    gpt: str,
    vq: str | None = None,
    image_size: int | None = None,
    vq_image_size: int | None = None,
    n_heads: int | None = None,
) -> dict[str, str]:
    """Write ``gpt/`` (a run directory) and, with ``vq``, ``vq/`` (a VQ tokenizer directory) under ``out``."""
    out = Path(out)
    written: dict[str, str] = {}
    model, source = convert_llamagen_gpt(gpt, image_size=image_size, n_heads=n_heads)
    c = model.config
    vq_cfg = None
    if vq is not None:
        # the VQ decodes the GPT's grid: 16x downsampling, so its image size follows the GPT's unless given
        vq_model = convert_llamagen_vq(vq, image_size=vq_image_size or c.grid[0] * 16)
        if vq_model.vocab_size != c.vocab_size:
            raise DigitError(f"--vq has {vq_model.vocab_size} codes, the GPT a {c.vocab_size}-token vocabulary")
        if tuple(vq_model.grid_size) != tuple(c.grid):
            raise DigitError(f"--vq decodes a {vq_model.grid_size} grid, the GPT samples {c.grid}")
        vq_model.save(out / "vq")
        vq_cfg, written["vq"] = vq_model.config(), str(out / "vq")
    write_run_dir(out / "gpt", model, meta=token_meta(c.grid, c.vocab_size, c.num_classes, vq_cfg), source=source)
    written["gpt"] = str(out / "gpt")
    return written
