"""Registered model sizes: build a GPTConfig by name plus overrides (timm's ``create_model(name, **kw)`` pattern).

A preset may name a layout (``"arch": "llama" | "fairseq"``): shorthand for that layout's behaviour switches
(`digit.models.gpt_config.ARCHS`); switches given explicitly win.

LlamaGen sizes (c2i, ../shared/reference/llamagen-official.md section 1) and DiGIT sizes (digit-official.md section 2).
digit-large's head count is not in the released configs: 24 heads keeps base's head_dim 64 (it does not change the
parameter count).
"""

from __future__ import annotations

from typing import Any

from digit.errors import DigitError
from digit.models.gpt import ARCHS, GPTConfig

_LLAMAGEN_DROPOUT = {"embed_dropout": 0.1, "resid_dropout": 0.1, "ffn_dropout": 0.1, "attn_dropout": 0.0}
_FAIRSEQ_DROPOUT = {"embed_dropout": 0.1, "resid_dropout": 0.1, "ffn_dropout": 0.1, "attn_dropout": 0.0}
_LLAMAGEN = {"arch": "llama", "vocab_size": 16384, "grid": (16, 16), **_LLAMAGEN_DROPOUT}
_DIGIT = {"arch": "fairseq", "vocab_size": 8192, "grid": (16, 16), "max_positions": 1024, **_FAIRSEQ_DROPOUT}

PRESETS: dict[str, dict[str, Any]] = {
    "gpt-b": {**_LLAMAGEN, "dim": 768, "n_layers": 12, "n_heads": 12},
    "gpt-l": {**_LLAMAGEN, "dim": 1024, "n_layers": 24, "n_heads": 16},
    "gpt-xl": {**_LLAMAGEN, "dim": 1280, "n_layers": 36, "n_heads": 20},
    "gpt-xxl": {**_LLAMAGEN, "dim": 1536, "n_layers": 48, "n_heads": 24},
    "gpt-3b": {**_LLAMAGEN, "dim": 3200, "n_layers": 24, "n_heads": 32},  # head_dim 100
    "digit-base": {**_DIGIT, "dim": 1024, "n_layers": 16, "n_heads": 16, "ffn_dim": 4096},
    "digit-large": {**_DIGIT, "dim": 1536, "n_layers": 24, "n_heads": 24, "ffn_dim": 6144},
    # CPU work: tests, smoke runs, overfitting checks (no dropout so tiny runs converge)
    "tiny": {
        "arch": "llama",
        "vocab_size": 64,
        "grid": (4, 4),
        "dim": 64,
        "n_layers": 2,
        "n_heads": 4,
        "multiple_of": 32,
    },
    "small": {
        "arch": "llama",
        "vocab_size": 1024,
        "grid": (16, 16),
        "dim": 256,
        "n_layers": 4,
        "n_heads": 8,
        "multiple_of": 64,
    },
}


def register_preset(name: str, **fields: Any) -> None:
    """Add a named size (e.g. from a later issue); fields are GPTConfig keyword arguments."""
    if name in PRESETS:
        raise DigitError(f"model preset {name!r} already exists")
    PRESETS[name] = dict(fields)


# CLI-style short names accepted as overrides
_ALIASES = {"layers": "n_layers", "heads": "n_heads"}


def build_config(name: str, **overrides: Any) -> GPTConfig:
    """``build_config("gpt-b", vocab_size=..., grid=(16, 16), cond="class", num_classes=1000, dim=..., layers=...)``.

    Overrides set to None are ignored (so CLI flags can be passed straight through). Changing ``dim`` keeps
    ``ffn_dim`` automatic unless the preset fixed it and ``ffn_dim`` is not overridden.
    """
    if name not in PRESETS:
        raise DigitError(f"unknown model preset {name!r} (choose from {', '.join(PRESETS)})")
    kw = dict(PRESETS[name])
    given = {_ALIASES.get(k, k): v for k, v in overrides.items() if v is not None}
    if "dim" in given and "ffn_dim" not in given and kw.get("ffn_dim"):
        kw["ffn_dim"] = 4 * given["dim"]  # fairseq presets fix ffn = 4 * dim; keep the ratio
    arch = given.pop("arch", None)
    if arch is not None:
        if arch not in ARCHS:
            raise DigitError(f"unknown arch {arch!r} (choose from {', '.join(ARCHS)})")
        if arch == "llama" and kw.get("arch") == "fairseq":
            kw.pop("ffn_dim", None)
            kw.pop("max_positions", None)
        kw["arch"] = arch
    kw = {**ARCHS[kw.pop("arch", "llama")], **kw}
    kw.update(given)
    try:
        return GPTConfig(**kw)
    except TypeError as e:
        raise DigitError(f"bad override for preset {name!r}: {e}") from e
