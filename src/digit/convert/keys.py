"""State-dict adapters between this project's GPT names and the released layouts (torchtitan's pattern: the model has
one naming, each foreign layout is a pair of pure functions at the boundary).

- ``from_llamagen`` / ``to_llamagen``: LlamaGen's ``Transformer`` names (``tok_embeddings``, ``layers.{i}.attention.wqkv``,
  ``attention.wo``, ``feed_forward.w1/w3/w2``, ``attention_norm``, ``ffn_norm``, ``norm``, ``output``,
  ``cls_embedding.embedding_table``; t2i: ``cls_embedding.cap_proj.{fc1,fc2}``, ``cls_embedding.uncond_embedding``).
  A c2i or t2i state dict maps one to one, so ``to_llamagen(model.state_dict())`` loads
  into LlamaGen's ``Transformer`` with ``strict=True``.
- ``from_fairseq`` / ``to_fairseq``: fairseq's ``TransformerDecoder`` names (``embed_tokens``, ``embed_positions``,
  ``embed_positions_1``, ``layers.{i}.self_attn.{q,k,v,out}_proj``, ``self_attn_layer_norm``, ``fc1``, ``fc2``,
  ``final_layer_norm``, ``layer_norm``, ``output_projection``), optionally under a ``decoder.`` prefix; q, k and v are
  concatenated into our fused ``attn.qkv`` and split back. Names only: the vocabulary re-layout of DiGIT's checkpoints
  (special symbols, BOS and class rows) is `digit.convert.digit`'s job.
- Conditions, which neither layout names the same way, use the names this project's run directories had before the
  one naming (``start_embedding.start``, ``cls_embedding.embedding_table``, ``prefix_embedding.{start,embedding_table}``).

``upgrade_state_dict`` / ``upgrade_config`` read run directories written before the one naming (their weights are in
one of the two layouts above, their config has ``arch``); `digit.models.load_gpt_run` applies them in memory, and
``upgrade_run_dir`` (``digit convert upgrade RUN``) rewrites such a directory once.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from digit.errors import DigitError

StateDict = dict[str, torch.Tensor]

# our block suffix -> LlamaGen's
_LLAMAGEN_BLOCK = {
    "attn_norm.weight": "attention_norm.weight",
    "attn.qkv.weight": "attention.wqkv.weight",
    "attn.proj.weight": "attention.wo.weight",
    "mlp_norm.weight": "ffn_norm.weight",
    "mlp.gate.weight": "feed_forward.w1.weight",
    "mlp.up.weight": "feed_forward.w3.weight",
    "mlp.down.weight": "feed_forward.w2.weight",
}
_LLAMAGEN_TOP = {"token_embed.weight": "tok_embeddings.weight", "final_norm.weight": "norm.weight",
                 "head.weight": "output.weight"}  # fmt: skip
# our block suffix -> fairseq's (q/k/v handled apart)
_FAIRSEQ_BLOCK = {
    "attn.proj.weight": "self_attn.out_proj.weight",
    "attn.proj.bias": "self_attn.out_proj.bias",
    "attn_norm.weight": "self_attn_layer_norm.weight",
    "attn_norm.bias": "self_attn_layer_norm.bias",
    "mlp.up.weight": "fc1.weight",
    "mlp.up.bias": "fc1.bias",
    "mlp.down.weight": "fc2.weight",
    "mlp.down.bias": "fc2.bias",
    "mlp_norm.weight": "final_layer_norm.weight",
    "mlp_norm.bias": "final_layer_norm.bias",
}
_FAIRSEQ_TOP = {"token_embed.weight": "embed_tokens.weight", "pos_embed.weight": "embed_positions.weight",
                "prefix_pos_embed.weight": "embed_positions_1.weight", "final_norm.weight": "layer_norm.weight",
                "final_norm.bias": "layer_norm.bias", "head.weight": "output_projection.weight"}  # fmt: skip
_CONDITION_NAMES = ("start_embedding.", "cls_embedding.", "prefix_embedding.")
# text condition suffix (ours) -> LlamaGen's CaptionEmbedder suffix, under cls_embedding.
_CAPTION = {"mlp.up.weight": "cap_proj.fc1.weight", "mlp.down.weight": "cap_proj.fc2.weight",
            "null_caption": "uncond_embedding"}  # fmt: skip
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


def _invert(d: dict[str, str]) -> dict[str, str]:
    return {v: k for k, v in d.items()}


def _unknown(keys: list[str], layout: str) -> DigitError:
    more = "..." if len(keys) > 3 else ""
    return DigitError(f"keys not in the {layout} layout: {', '.join(keys[:3])}{more}")


# ---------------------------------------------------------------- conditions
def _condition_to_foreign(sd: StateDict) -> StateDict:
    """condition.* -> the kind's own prefix, told apart by which tensors exist (start only / table only / both)."""
    cond = {k.removeprefix("condition."): v for k, v in sd.items() if k.startswith("condition.")}
    if not cond:
        return {}
    if "null_caption" in cond:  # text: LlamaGen's CaptionEmbedder names
        return {f"cls_embedding.{_CAPTION.get(k, k)}": v for k, v in cond.items()}
    kind = "prefix_embedding" if {"start", "table.weight"} <= set(cond) else None
    kind = kind or ("cls_embedding" if "table.weight" in cond else "start_embedding")
    return {f"{kind}.{k.replace('table.', 'embedding_table.')}": v for k, v in cond.items()}


def _condition_from_foreign(key: str) -> str | None:
    if key.startswith("condition."):  # already ours (converters build the condition themselves)
        return key
    if not key.startswith(_CONDITION_NAMES):
        return None
    rest = key.split(".", 1)[1]
    if key.startswith("cls_embedding.") and rest in (caption := _invert(_CAPTION)):
        return "condition." + caption[rest]
    return "condition." + rest.replace("embedding_table.", "table.")


# ---------------------------------------------------------------- LlamaGen
def to_llamagen(sd: StateDict) -> StateDict:
    """Our names -> LlamaGen's ``Transformer`` names (same tensors, no copies)."""
    out, unknown = _condition_to_foreign(sd), []
    for k, v in sd.items():
        if k.startswith("condition."):
            continue
        if k in _LLAMAGEN_TOP:
            out[_LLAMAGEN_TOP[k]] = v
        elif (m := _BLOCK.match(k)) and m.group(2) in _LLAMAGEN_BLOCK:
            out[f"layers.{m.group(1)}.{_LLAMAGEN_BLOCK[m.group(2)]}"] = v
        else:
            unknown.append(k)
    if unknown:
        raise _unknown(unknown, "LlamaGen")
    return out


def from_llamagen(sd: StateDict) -> StateDict:
    """LlamaGen's ``Transformer`` names -> ours (same tensors, no copies)."""
    top, block = _invert(_LLAMAGEN_TOP), _invert(_LLAMAGEN_BLOCK)
    out, unknown = {}, []
    for k, v in sd.items():
        if (c := _condition_from_foreign(k)) is not None:
            out[c] = v
        elif k in top:
            out[top[k]] = v
        elif (m := _LAYER.match(k)) and m.group(2) in block:
            out[f"blocks.{m.group(1)}.{block[m.group(2)]}"] = v
        else:
            unknown.append(k)
    if unknown:
        raise _unknown(unknown, "LlamaGen")
    return out


# ---------------------------------------------------------------- fairseq
def to_fairseq(sd: StateDict, prefix: str = "") -> StateDict:
    """Our names -> fairseq ``TransformerDecoder`` names under ``prefix`` (``"decoder."`` for a whole checkpoint);
    the fused ``attn.qkv`` is split into ``q_proj`` / ``k_proj`` / ``v_proj`` (views)."""
    out = {prefix + k: v for k, v in _condition_to_foreign(sd).items()}
    unknown = []
    for k, v in sd.items():
        if k.startswith("condition."):
            continue
        if k in _FAIRSEQ_TOP:
            out[prefix + _FAIRSEQ_TOP[k]] = v
        elif m := _BLOCK.match(k):
            i, rest = m.groups()
            if rest in ("attn.qkv.weight", "attn.qkv.bias"):
                for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3), strict=True):
                    out[f"{prefix}layers.{i}.self_attn.{name}.{rest.rsplit('.', 1)[1]}"] = part
            elif rest in _FAIRSEQ_BLOCK:
                out[f"{prefix}layers.{i}.{_FAIRSEQ_BLOCK[rest]}"] = v
            else:
                unknown.append(k)
        else:
            unknown.append(k)
    if unknown:
        raise _unknown(unknown, "fairseq")
    return out


def from_fairseq(sd: StateDict, prefix: str = "") -> StateDict:
    """fairseq ``TransformerDecoder`` names (under ``prefix``) -> ours; ``q/k/v_proj`` are concatenated into
    ``attn.qkv`` (a new tensor), everything else is passed through."""
    top, block = _invert(_FAIRSEQ_TOP), _invert(_FAIRSEQ_BLOCK)
    out: StateDict = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, v in sd.items():
        if not key.startswith(prefix):
            unknown.append(key)
            continue
        k = key.removeprefix(prefix)
        if (c := _condition_from_foreign(k)) is not None:
            out[c] = v
        elif k in top:
            out[top[k]] = v
        elif (m := _LAYER.match(k)) and (p := re.match(r"^self_attn\.([qkv])_proj\.(weight|bias)$", m.group(2))):
            qkv.setdefault((m.group(1), p.group(2)), {})[p.group(1)] = v
        elif m and m.group(2) in block:
            out[f"blocks.{m.group(1)}.{block[m.group(2)]}"] = v
        elif k != "version":  # fairseq's bookkeeping tensor (decoder.version)
            unknown.append(key)
    for (i, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise DigitError(f"layer {i}: self_attn has {sorted(parts)} projections' {kind}, expected q, k and v")
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    if unknown:
        raise _unknown(unknown, "fairseq")
    return out


# ---------------------------------------------------------------- run directories written before the one naming
def state_dict_layout(sd: StateDict) -> str:
    """ "digit" (current names) | "llamagen" | "fairseq" (former run directories of arch "llama" / "fairseq")."""
    if "token_embed.weight" in sd:
        return "digit"
    if "tok_embeddings.weight" in sd:
        return "llamagen"
    if "embed_tokens.weight" in sd:
        return "fairseq"
    raise DigitError("not a GPT state dict (no token embedding under any known name)")


def upgrade_state_dict(sd: StateDict) -> StateDict:
    """A GPT state dict in any known layout -> current names (unchanged when already current)."""
    layout = state_dict_layout(sd)
    if layout == "llamagen":
        return from_llamagen(sd)
    if layout == "fairseq":
        return from_fairseq(sd)
    return sd


def upgrade_config(d: dict[str, Any]) -> dict[str, Any]:
    """A ``config.json["model"]`` with ``arch`` (before the behaviour switches) -> the current GPTConfig fields."""
    from digit.models.gpt import ARCHS

    d = dict(d)
    arch = d.pop("arch")
    if arch not in ARCHS:
        raise DigitError(f"unknown arch {arch!r} in a model config (choose from {', '.join(ARCHS)})")
    norm_first = True if arch == "llama" else bool(d.get("norm_first"))  # fairseq: None meant post-norm
    return {**d, **ARCHS[arch], "norm_first": norm_first}


def upgrade_run_dir(run: str | os.PathLike) -> bool:
    """Rewrite a former run directory's ``config.json`` and ``model.safetensors`` in the current format (each file
    atomically; other files untouched). Returns False when there was nothing to do. The model is rebuilt from the
    result and checked against it before anything is written."""
    from digit.convert import load_exact
    from digit.models import GPT, read_run_config
    from digit.utils.artifacts import load_safetensors
    from digit.utils.io import atomic_save_safetensors, atomic_write_json

    run = Path(run)
    cfg_path, weights = run / "config.json", run / "model.safetensors"
    for p in (cfg_path, weights):
        if not p.is_file():
            raise DigitError(f"{run} is not a GPT run directory (missing {p.name})")
    config, model_cfg = read_run_config(run)  # validated; model_cfg is the upgraded model section
    if (run / "train_state.pt").exists():  # its module and optimizer state are keyed by the former names
        raise DigitError(f"{run} holds train_state.pt, which would no longer resume after the rewrite; the run loads "
                         "as it is (converted in memory), or upgrade a copy of config.json + model.safetensors")  # fmt: skip
    state = load_safetensors(weights)
    old_config, old_weights = "arch" in config["model"], state_dict_layout(state) != "digit"
    if not (old_config or old_weights):
        return False
    new_state = upgrade_state_dict(state)
    load_exact(GPT(model_cfg), new_state, str(weights))  # refuse to write a pair that does not load
    if old_weights:
        atomic_save_safetensors(weights, new_state)
    if old_config:
        atomic_write_json(cfg_path, {**config, "model": model_cfg.to_dict()})
    return True
