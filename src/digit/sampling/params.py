"""One set of sampling parameters, validated once, shared by `digit sample`, `digit generate`, the pipeline, the engine
and the benchmarks.

Every value is checked in ``SamplingParams.__post_init__`` against one rule table (:data:`RULES`); the CLI checks the
same rules with the flag's name (``--temperature must be a finite number >= 0, got nan``), the Python API with the
field's name (``temperature must be ...``). ``add_arguments(parser, prefix="decoder-")`` registers the stage-2
decoder's copy (``--decoder-temperature`` ...); ``to_dict`` / ``from_dict`` are the provenance form in ``meta.json``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from digit.errors import DigitError

SCHEDULES = ("constant", "linear")
# DiGIT's NAR decoding steps: its released inference script (scripts/infer_stage2_nar.sh) runs fairseq-generate with
# `--iter-decode-max-iter 8 --iter-decode-force-max-iter`, i.e. exactly 8 iterations; fairseq's own default for that
# option (GenerationConfig.iter_decode_max_iter) and the fallback in DiGIT's stage-2 task.py are 10, which apply only
# when the flag is omitted. 8 is the setting DiGIT's code pairs with its published +MaskGIT numbers (its evaluation
# output file is named "..._step10_...", a leftover the script does not act on).
DIGIT_NAR_STEPS = 8
# "ar": one token per forward; "jacobi": speculative Jacobi decoding (digit.sampling.jacobi), same distribution
DECODE_MODES = ("ar", "jacobi")


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# field -> (accepts(value), what a valid value is)
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "temperature": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "top_k": (lambda v: _int(v) and v >= 0, "an integer >= 0 (0 = off)"),
    "top_p": (lambda v: _finite(v) and 0 < v <= 1, "a number in (0, 1] (1 = off)"),
    "cfg_scale": (lambda v: _finite(v) and v >= 0, "a finite number >= 0 (1 = off)"),
    "cfg_interval": (lambda v: _int(v) and v >= -1, "an integer >= -1 (-1 = guide every token)"),
    "cfg_schedule": (lambda v: v in SCHEDULES, "one of " + ", ".join(SCHEDULES)),
    "decode": (lambda v: v in DECODE_MODES, "one of " + ", ".join(DECODE_MODES)),
    "nar_steps": (lambda v: _int(v) and v >= 1, "an integer >= 1"),
    "nar_temperature": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
}

HELP = {
    "temperature": "softmax temperature (0 = greedy)",
    "top_k": "keep the k most likely tokens (0 = off)",
    "top_p": "nucleus sampling mass in (0, 1] (1 = off)",
    "cfg_scale": "classifier-free guidance scale (1 = off)",
    "cfg_interval": "no guidance after this token index (-1 = always)",
    "cfg_schedule": "guidance schedule over the tokens",
    "decode": "autoregressive decoding: ar (one token per forward) or jacobi (speculative Jacobi decoding)",
    "nar_steps": "MaskGIT decoding steps (bidirectional models)",
    "nar_temperature": "MaskGIT confidence noise scale (choice temperature)",
}


def check_value(name: str, value: Any, label: str | None = None) -> None:
    """Raise DigitError unless ``value`` is valid for field ``name``; the message names ``label`` (default: the field)."""
    accepts, what = RULES[name]
    if not accepts(value):
        raise DigitError(f"{label or name} must be {what}, got {value!r}")


def flag(name: str, prefix: str = "") -> str:
    return f"--{prefix}{name.replace('_', '-')}"


def _dest(name: str, prefix: str) -> str:
    return f"{prefix.replace('-', '_')}{name}"


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How one model turns logits into tokens. Semantics of each filter: `digit.sampling.filters`."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    cfg_scale: float = 1.0
    cfg_interval: int = -1
    cfg_schedule: str = "constant"
    decode: str = "ar"
    nar_steps: int = DIGIT_NAR_STEPS
    nar_temperature: float = 4.5  # MaskGIT / DiGIT default Gumbel noise scale on the confidence

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "float" and _int(value):  # an int where a float is meant (temperature=1) is fine
                object.__setattr__(self, f.name, float(value))
            check_value(f.name, getattr(self, f.name))

    @property
    def guided(self) -> bool:
        return self.cfg_scale != 1.0

    def replace(self, **changes: Any) -> SamplingParams:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplingParams:
        if not isinstance(d, dict):
            raise DigitError(f"sampling parameters must be a JSON object, got {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise DigitError(f"unknown sampling parameters: {', '.join(unknown)}")
        return cls(**d)

    # ---- argparse
    @classmethod
    def add_arguments(
        cls,
        parser: argparse.ArgumentParser | argparse._ArgumentGroup,
        prefix: str = "",
        only: Iterable[str] | None = None,
        defaults: SamplingParams | None = None,
        aliases: dict[str, str] | None = None,
    ) -> None:
        """Register ``--{prefix}{field}`` flags for the fields in ``only`` (default: all). Flags default to None
        (not given), so `from_args` can tell a given value from a default; ``defaults`` only shapes the help."""
        shown = defaults or cls()
        names = list(only) if only is not None else [f.name for f in fields(cls)]
        types = {f.name: f.type for f in fields(cls)}
        for name in names:
            opts = [flag(name, prefix)] + ([aliases[name]] if aliases and name in aliases else [])
            kw: dict[str, Any] = {"dest": _dest(name, prefix), "default": None}
            if name == "cfg_schedule":
                kw["choices"] = SCHEDULES
            elif name == "decode":
                kw["choices"] = DECODE_MODES
            else:
                kw["type"] = int if types[name] == "int" else float
            parser.add_argument(*opts, help=f"{HELP[name]} (default {getattr(shown, name)})", **kw)

    @classmethod
    def from_args(
        cls, args: argparse.Namespace, prefix: str = "", base: SamplingParams | None = None
    ) -> SamplingParams:
        """The parameters given on the command line under ``prefix``, the rest from ``base`` (default: the class
        defaults). Each given value is checked with its flag's name in the message."""
        base = base or cls()
        given = {}
        for f in fields(cls):
            value = getattr(args, _dest(f.name, prefix), None)
            if value is not None:
                check_value(f.name, value, flag(f.name, prefix))
                given[f.name] = value
        return replace(base, **given)
