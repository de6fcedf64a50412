"""Fine-tuning: a new run that starts from a trained or converted model's weights (`digit train --init-from RUN`).

The init run is any directory `digit.models.load_gpt_run` opens: a `digit train` run, the output of `digit convert
llamagen|digit`, or a run written before the one module naming (its weights are renamed in memory). The new run takes

- the init run's model config: architecture flags given on the command line must agree with it (else a refusal naming
  them); regularisation may change (``--dropout``, ``--class-dropout``) and the class table may grow (below);
- the init weights, bit for bit (loaded over the seeded random init, every tensor replaced);
- its own optimizer state (fresh AdamW), schedule, step count, batch and seed;
- ``init_from`` in its config.json: the init directory, the sha256 of its weights file, the frozen groups and the class
  table change. A fine-tuning run resumes with ``--resume`` alone (the model config and the init come from its
  config.json); ``--init-from`` with ``--resume`` is refused.

Tokens must come from the init model's tokenizer: the same vocabulary size and grid, and the same tokenizer config
(`digit.data.tokens.same_tokenizer`) where both the init run and the token directory record one.

Class table (``--num-classes N`` above the init's M): ``ClassCondition.table`` has M + 1 rows, class k at row k and the
null (CFG) class at row M. The new table keeps rows 0..M-1 bit for bit, moves the null row to row N, and fills rows
M..N-1 with the mean of the old class rows plus Gaussian noise of std ``NEW_ROW_NOISE`` x the std of the old class
rows' elements, drawn from ``torch.Generator().manual_seed(seed)``: a new class starts as the "average class" and the
noise tells new classes apart.

Freezing (``--freeze GROUP[,GROUP...]``), the groups:

    embeddings   token_embed and the learned position tables (pos_embed, prefix_pos_embed)
    condition    condition.* (class table, prefix-token table, learned start vector)
    blocks       every block; blocks:I one block; blocks:I-J blocks I..J (0-based, inclusive)
    final_norm   the final norm (pre-norm models only)
    head         the output projection

Frozen tensors get ``requires_grad=False``, so the trainer leaves them out of the optimizer (no update, no weight decay,
no share of the clipped norm) and they stay bit for bit the init's.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from digit.errors import DigitError
from digit.models.gpt import GPTConfig

NEW_ROW_NOISE = 0.1  # new class rows: mean of the old rows + noise of this many times the old rows' element std
FREEZE_GROUPS = ("embeddings", "condition", "blocks", "final_norm", "head")
_GROUP_PREFIXES = {
    "embeddings": ("token_embed.", "pos_embed.", "prefix_pos_embed."),
    "condition": ("condition.",),
    "final_norm": ("final_norm.",),
    "head": ("head.",),
}
_BLOCKS = re.compile(r"^blocks(?::(\d+)(?:-(\d+))?)?$")
RECORD_KEY = "init_from"  # the config.json section of a fine-tuning run


@dataclass(kw_only=True)
class FineTuneRequest:
    """What `digit train` was asked: the init run (or the run to resume), the architecture flags as given (None / False:
    not given, the init's value is taken), and what fine-tuning may change."""

    init_from: Path | None = None
    out: Path
    resume: bool = False
    seed: int = 0
    preset: str | None = None
    dim: int | None = None
    layers: int | None = None
    heads: int | None = None
    arch: str | None = None
    vocab_size: int | None = None
    nar: bool = False
    cond: str | None = None  # "class" (--class-cond) | "prefix" (--prefix-tokens) | "text" (--text-cond) | None
    num_classes: int | None = None
    class_dropout: float | None = None
    dropout: float | None = None
    freeze: str | None = None


@dataclass(kw_only=True)
class FineTune:
    """The init of a fine-tuning run, as `GPTTask` applies it: weights (None when a resume restores a checkpoint
    instead), frozen groups, and what the tokens must match."""

    path: str
    sha256: str
    state: dict[str, torch.Tensor] | None
    init_num_classes: int  # the init model's class count (0: not class-conditional)
    freeze: tuple[str, ...]
    seed: int
    meta: dict[str, Any] | None  # the token-directory meta the weights were trained on (`data.meta`)
    prefix_meta: dict[str, Any] | None
    text_encoder: dict[str, Any] | None = (
        None  # the text encoder identity of its caption features (`data.text_encoder`)
    )

    # ---- what the run records
    def record(self, cfg: GPTConfig) -> dict[str, Any]:
        rec: dict[str, Any] = {"path": self.path, "sha256": self.sha256, "freeze": list(self.freeze)}
        if cfg.cond == "class":
            rec["classes"] = {"init": self.init_num_classes, "now": cfg.num_classes}
            if cfg.num_classes > self.init_num_classes:
                rec["classes"]["new_rows"] = f"mean of the init rows + N(0, ({NEW_ROW_NOISE} std)^2), seed {self.seed}"
        return rec

    # ---- tokens
    def check_tokens(self, cfg: GPTConfig, tokens: Any, prefix: Any = None, what: str = "tokens") -> None:
        """Refuse tokens the init model was not trained on: vocabulary size, grid, tokenizer; class ids beyond the table."""
        _check_tokenizer(tokens, self.meta, cfg.vocab_size, cfg.grid, self.path, what)
        if prefix is not None and cfg.cond == "prefix":
            _check_tokenizer(
                prefix, self.prefix_meta, cfg.prefix_vocab_size, cfg.prefix_grid, self.path, f"prefix {what}"
            )
        if cfg.cond == "class" and tokens.labeled and len(tokens.labels):
            hi = int(tokens.labels.max())
            if hi >= cfg.num_classes:
                raise DigitError(
                    f"{what} in {tokens.path} hold class {hi}, the model has {cfg.num_classes} classes: pass "
                    f"--num-classes {hi + 1} to add rows for the new ones"
                )
        old = list((self.meta or {}).get("class_names") or [])
        new = tokens.class_names
        n = min(len(old), len(new))
        if n and old[:n] != new[:n]:
            warnings.warn(
                f"{tokens.path}: class names {new[:n]} differ from the init run's {old[:n]}; "
                "class k keeps the init's row k",
                stacklevel=2,
            )

    # ---- the model
    def apply(self, model: nn.Module) -> list[str]:
        """Load the init weights (class table resized to the model's) and freeze; returns the frozen parameter names."""
        if self.state is not None:
            state = dict(self.state)
            cfg = model.config
            key = "condition.table.weight"
            if cfg.cond == "class" and key in state and state[key].shape[0] != cfg.num_classes + 1:
                state[key] = resize_class_table(state[key], cfg.num_classes, self.seed)
            _load_exactly(model, state, self.path)
        return freeze(model, self.freeze)


def _check_tokenizer(tokens: Any, meta: dict | None, vocab: int, grid: Any, origin: str, what: str) -> None:
    from digit.data.tokens import same_tokenizer

    meta = meta or {}
    want_vocab = int(meta.get("vocab_size") or vocab)
    if tokens.vocab_size != want_vocab:
        raise DigitError(
            f"{what} in {tokens.path} have a {tokens.vocab_size}-token vocabulary, the init model {origin} was trained "
            f"on {want_vocab}: tokenize with its tokenizer"
        )
    if tuple(tokens.grid) != tuple(grid):
        raise DigitError(
            f"{what} in {tokens.path} have grid {tuple(tokens.grid)}, the init model {origin} {tuple(grid)}"
        )
    trained, given = meta.get("tokenizer"), tokens.meta.get("tokenizer")
    if isinstance(trained, dict) and isinstance(given, dict) and not same_tokenizer(given, trained):
        raise DigitError(f"{what} in {tokens.path} were made by another tokenizer than the init model {origin}'s")


def _load_exactly(model: nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise DigitError(
            f"{origin}: the weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise DigitError(f"{origin}: {k} has shape {tuple(v.shape)}, the model {tuple(expected[k].shape)}")
    model.load_state_dict(state, strict=True)


# ---------------------------------------------------------------- class table
def resize_class_table(table: torch.Tensor, num_classes: int, seed: int) -> torch.Tensor:
    """[M + 1, d] (classes, then the null class) -> [num_classes + 1, d]: rows 0..M-1 kept, the null row last, new rows
    the mean of the old class rows plus seeded noise (module docstring)."""
    m = table.shape[0] - 1
    if num_classes < m:
        raise DigitError(f"--num-classes {num_classes} is below the init model's {m} classes; rows are never dropped")
    if num_classes == m:
        return table
    old = table[:m].float()
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(num_classes - m, table.shape[1], generator=g) * (NEW_ROW_NOISE * old.std(correction=0))
    new = (old.mean(0, keepdim=True) + noise).to(table.dtype)
    return torch.cat([table[:m], new, table[m:]])


# ---------------------------------------------------------------- freezing
def parse_freeze(spec: str | None) -> tuple[str, ...]:
    """``"embeddings,blocks:0-5,head"`` -> ("embeddings", "blocks:0-5", "head"), refusing unknown groups."""
    if spec is None:
        return ()
    items = tuple(s.strip() for s in spec.split(","))
    for item in items:
        m = _BLOCKS.match(item)
        if m is None and item not in _GROUP_PREFIXES:
            raise DigitError(
                f"--freeze: unknown group {item!r} (choose from {', '.join(FREEZE_GROUPS)}; blocks:I or blocks:I-J)"
            )
        if m and m.group(2) is not None and int(m.group(2)) < int(m.group(1)):
            raise DigitError(f"--freeze: {item} is an empty range (write blocks:I-J with I <= J)")
    return items


def _selects(item: str, name: str, n_layers: int) -> bool:
    m = _BLOCKS.match(item)
    if m is None:
        return name.startswith(_GROUP_PREFIXES[item])
    lo = int(m.group(1)) if m.group(1) is not None else 0
    hi = int(m.group(2)) if m.group(2) is not None else (lo if m.group(1) is not None else n_layers - 1)
    return any(name.startswith(f"blocks.{i}.") for i in range(lo, hi + 1))


def freeze(model: nn.Module, items: tuple[str, ...]) -> list[str]:
    """Set ``requires_grad=False`` on the parameters ``items`` select; returns their names. Refuses a group that selects
    nothing here (a block index past the last, ``final_norm`` of a post-norm model) and freezing everything."""
    n_layers = model.config.n_layers
    names = [n for n, _ in model.named_parameters()]
    chosen: set[str] = set()
    for item in items:
        m = _BLOCKS.match(item)
        if m and m.group(1) is not None and int(m.group(2) or m.group(1)) >= n_layers:
            raise DigitError(f"--freeze {item}: the model has blocks 0-{n_layers - 1}")
        hit = {n for n in names if _selects(item, n, n_layers)}
        if not hit:
            raise DigitError(f"--freeze {item}: selects no parameters of this model")
        chosen |= hit
    if chosen and chosen == set(names):
        raise DigitError("--freeze selects every parameter: nothing would train")
    for n, p in model.named_parameters():
        if n in chosen:
            p.requires_grad_(False)
    return [n for n in names if n in chosen]


# ---------------------------------------------------------------- the model config
def _describe(cfg: GPTConfig) -> str:
    return (
        f"{cfg.arch} dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads, "
        f"{'AR' if cfg.causal else 'NAR'}, cond {cfg.cond}, vocabulary {cfg.vocab_size}"
    )


def check_architecture(cfg: GPTConfig, req: FineTuneRequest, origin: str) -> None:
    """Refuse architecture flags that disagree with the init model (given and equal is fine)."""
    from digit.models.presets import build_config

    bad = []
    if req.preset is not None:
        p = build_config(req.preset, vocab_size=cfg.vocab_size, grid=cfg.grid, dim=req.dim, layers=req.layers,
                         heads=req.heads, arch=req.arch)  # fmt: skip
        for f in ("dim", "n_layers", "n_heads", "hidden_dim", "arch"):
            if getattr(p, f) != getattr(cfg, f):
                bad.append(f"--model {req.preset} ({f} {getattr(p, f)})")
                break
    flags = {"--dim": (req.dim, cfg.dim), "--layers": (req.layers, cfg.n_layers), "--heads": (req.heads, cfg.n_heads),
             "--arch": (req.arch, cfg.arch), "--vocab-size": (req.vocab_size, cfg.vocab_size)}  # fmt: skip
    bad += [f"{flag} {given}" for flag, (given, have) in flags.items() if given is not None and given != have]
    if req.nar and cfg.causal:
        bad.append("--nar")
    if req.cond is not None and req.cond != cfg.cond:
        bad.append({"class": "--class-cond", "prefix": "--prefix-tokens", "text": "--text-cond"}[req.cond])
    if bad:
        raise DigitError(
            f"{', '.join(bad)} conflict with the init model {origin} ({_describe(cfg)}): the architecture comes from "
            "--init-from, drop these flags"
        )


def finetune_config(cfg: GPTConfig, req: FineTuneRequest) -> GPTConfig:
    """The init's config with what fine-tuning may change: the class count (only up), dropout, class dropout."""
    changes: dict[str, Any] = {}
    if req.num_classes is not None:
        if cfg.cond != "class":
            raise DigitError(f"--num-classes resizes a class table; the init model has cond {cfg.cond}")
        if req.num_classes < cfg.num_classes:
            raise DigitError(
                f"--num-classes {req.num_classes} is below the init model's {cfg.num_classes} classes; "
                "rows are never dropped"
            )
        changes["num_classes"] = req.num_classes
    if req.class_dropout is not None:
        if cfg.cond not in ("class", "text"):
            raise DigitError(
                f"--class-dropout applies to class- or text-conditional models; the init model has cond {cfg.cond}"
            )
        changes["class_dropout"] = req.class_dropout
    if req.dropout is not None:
        changes.update(embed_dropout=req.dropout, resid_dropout=req.dropout, ffn_dropout=req.dropout)
    return dataclasses.replace(cfg, **changes)


# ---------------------------------------------------------------- planning a run
def read_init(path: str | Path) -> tuple[dict[str, Any], GPTConfig, dict[str, torch.Tensor], str]:
    """An init run's (config.json, model config, weights under the current names, sha256 of its weights file)."""
    from digit.convert.keys import upgrade_state_dict
    from digit.models import read_run_config
    from digit.utils.artifacts import load_safetensors
    from digit.utils.io import file_sha256

    run = Path(path)
    config, model_cfg = read_run_config(run)
    weights = run / "model.safetensors"
    if not weights.is_file():
        raise DigitError(f"{run} is not a GPT run directory (missing {weights.name})")
    state = upgrade_state_dict(load_safetensors(weights))  # LlamaGen / fairseq names of former runs, in memory
    return config, model_cfg, state, file_sha256(weights)


def stored_record(out: Path) -> dict[str, Any] | None:
    """The ``init_from`` section of the run in ``out`` (None: no run there, or not a fine-tuning run)."""
    from digit.utils.artifacts import read_json_object

    path = Path(out) / "config.json"
    if not path.is_file():
        return None
    rec = read_json_object(path).get(RECORD_KEY)
    if rec is not None and not (isinstance(rec, dict) and {"path", "sha256", "freeze"} <= set(rec)):
        raise DigitError(f"{path}: the {RECORD_KEY} section is damaged")
    return rec


def plan(req: FineTuneRequest) -> tuple[GPTConfig, FineTune] | None:
    """The model config and the init of a fine-tuning run: a new one (``req.init_from``) or one resumed from ``req.out``.
    None for a run that is neither (the caller builds the model from ``--model``)."""
    if req.init_from is not None and req.resume:
        raise DigitError(
            "--init-from starts a new run, --resume continues one: a fine-tuning run resumes with --resume alone"
        )
    if req.init_from is not None:
        return _new(req)
    rec = stored_record(req.out) if req.resume else None
    if rec is None:
        if req.freeze is not None:
            raise DigitError("--freeze needs --init-from (it freezes parts of a trained model)")
        return None
    return _resumed(req, rec)


def _new(req: FineTuneRequest) -> tuple[GPTConfig, FineTune]:
    config, init_cfg, state, sha = read_init(req.init_from)
    origin = str(Path(req.init_from).resolve())
    check_architecture(init_cfg, req, origin)
    cfg = finetune_config(init_cfg, req)
    items = parse_freeze(req.freeze)
    if cfg.num_classes > init_cfg.num_classes and any(i == "condition" for i in items):
        raise DigitError(
            "--freeze condition with --num-classes above the init's: the new classes' rows would never train"
        )
    data = config.get("data") or {}
    init = FineTune(path=origin, sha256=sha, state=state, init_num_classes=init_cfg.num_classes, freeze=items,
                    seed=req.seed, meta=data.get("meta"), prefix_meta=data.get("prefix_meta"),
                    text_encoder=data.get("text_encoder"))  # fmt: skip
    return cfg, init


def _resumed(req: FineTuneRequest, rec: dict[str, Any]) -> tuple[GPTConfig, FineTune]:
    """A fine-tuning run's resume: the model config from its config.json (flags may only repeat it), the init weights
    reloaded (and their sha256 checked) only when no checkpoint was written yet."""
    from digit.models import read_run_config
    from digit.training.trainer import STATE_FILE

    config, stored_cfg = read_run_config(req.out)
    check_architecture(stored_cfg, req, str(req.out))
    cfg = finetune_config(stored_cfg, req)  # a changed value is then refused by the trainer's config comparison
    items = parse_freeze(req.freeze) if req.freeze is not None else tuple(rec["freeze"])
    classes = rec.get("classes") or {}
    state = None
    if not (Path(req.out) / STATE_FILE).exists():  # killed before the first checkpoint: start again from the init
        _, _, state, sha = read_init(rec["path"])
        if sha != rec["sha256"]:
            raise DigitError(f"{rec['path']}/model.safetensors changed since this run started (sha256 differs)")
    data = config.get("data") or {}
    init = FineTune(path=rec["path"], sha256=rec["sha256"], state=state, freeze=items, seed=req.seed,
                    init_num_classes=int(classes.get("init", cfg.num_classes)), meta=data.get("meta"),
                    prefix_meta=data.get("prefix_meta"), text_encoder=data.get("text_encoder"))  # fmt: skip
    return cfg, init
