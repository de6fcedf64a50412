"""Validated readers for every file digit reads back: JSON configs, .npy arrays, safetensors, training states.

A corrupt, truncated or mismatched file becomes one ``DigitError`` that names the file and says what is wrong, never a
traceback from json, numpy, safetensors or torch. The loaders (`digit.models`, `digit.tokenizers`, `digit.data.tokens`,
`digit.training.checkpoint`) go through these functions; nothing in ``cli/`` catches library exceptions itself.

Integrity: every safetensors file written by :func:`digit.utils.io.atomic_save_safetensors` carries, in its own header,
the sha256 of its tensors (names, dtypes, shapes and bytes; :func:`tensors_sha256`), and every ``train_state.pt`` the
sha256 of its contents. The digest travels inside the file, so it is replaced atomically with the weights (a manifest
beside the file would disagree with it after a kill between the two renames) and survives copying the file alone.
Older files without a digest still load; a shipped model folder's files are checked against its ``models.json``.
``DIGIT_VERIFY_WEIGHTS=0`` (or ``digit --no-verify-weights``) skips the check, for very large files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from digit.errors import DigitError

DIGEST_KEY = "digit.tensors_sha256"  # safetensors header metadata key
VERIFY_ENV = "DIGIT_VERIFY_WEIGHTS"
SHIPPED_MANIFEST = "models.json"  # `digit recipe ship`: {"sha256": {relative path: file sha256}}


def verify_enabled() -> bool:
    return os.environ.get(VERIFY_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise DigitError(f"{path}: file not found")


# ----------------------------------------------------------------------------------------------- JSON


@dataclass(frozen=True)
class Kind:
    """What a JSON value must be: a description for the message and a test."""

    name: str
    test: Callable[[Any], bool]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


INT = Kind("an integer", _is_int)
POSITIVE_INT = Kind("a positive integer", lambda v: _is_int(v) and v > 0)
NUMBER = Kind("a finite number", _is_number)
STR = Kind("a string", lambda v: isinstance(v, str))
BOOL = Kind("true or false", lambda v: isinstance(v, bool))
LIST = Kind("a list", lambda v: isinstance(v, list))
OBJECT = Kind("an object", lambda v: isinstance(v, dict))
GRID = Kind("[h, w], two positive integers", lambda v: isinstance(v, list) and len(v) == 2 and all(map(_is_int, v)))
STR_LIST = Kind("a list of strings", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v))


def optional(kind: Kind) -> Kind:
    return Kind(f"{kind.name} or null", lambda v: v is None or kind.test(v))


def int_list(length: int | None = None) -> Kind:
    n = "" if length is None else f"{length} "
    return Kind(
        f"a list of {n}integers",
        lambda v: isinstance(v, list) and (length is None or len(v) == length) and all(map(_is_int, v)),
    )


# A schema maps a key to a Kind or to a nested schema (the value must then be an object). A key ending in "?" may be
# absent (or null); every other key is required.
Schema = Mapping[str, Union[Kind, "Schema"]]


def check_schema(obj: Mapping[str, Any], schema: Schema, path: str | os.PathLike, where: str = "") -> None:
    for raw_key, spec in schema.items():
        key = raw_key.rstrip("?")
        name = f"{where}.{key}" if where else key
        if key not in obj or (raw_key.endswith("?") and obj[key] is None):
            if raw_key.endswith("?"):
                continue
            raise DigitError(f"{path}: missing key '{name}'")
        value = obj[key]
        if isinstance(spec, Kind):
            if not spec.test(value):
                raise DigitError(f"{path}: '{name}' must be {spec.name}, got {json.dumps(value)[:60]}")
        else:
            if not isinstance(value, dict):
                raise DigitError(f"{path}: '{name}' must be an object, got {json.dumps(value)[:60]}")
            check_schema(value, spec, path, name)


def read_json_file(path: str | os.PathLike) -> Any:
    """Parse a JSON file; a missing, unreadable or malformed file is a DigitError naming it."""
    path = Path(path)
    _require_file(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DigitError(f"{path}: not a UTF-8 text file (byte {e.start}); the file is corrupt") from e
    except OSError as e:
        raise DigitError(f"{path}: cannot read ({_first_line(e)})") from e
    if not text.strip():
        raise DigitError(f"{path}: empty file (expected JSON)")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DigitError(f"{path}: invalid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from e


def read_json_object(path: str | os.PathLike, schema: Schema | None = None) -> dict[str, Any]:
    """A JSON object with the keys (and value kinds) ``schema`` requires."""
    obj = read_json_file(path)
    if not isinstance(obj, dict):
        raise DigitError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    if schema:
        check_schema(obj, schema, path)
    return obj


def _kind_for(annotation: Any) -> Kind | None:
    """The JSON kind of a config dataclass field's type (None: not checked here)."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Union or type(annotation).__name__ == "UnionType":
        inner = [a for a in args if a is not type(None)]
        k = _kind_for(inner[0]) if len(inner) == 1 else None
        return optional(k) if k is not None and len(args) > len(inner) else k
    if annotation is bool:
        return BOOL
    if annotation is int:
        return INT
    if annotation is float:
        return NUMBER
    if annotation is str:
        return STR
    if origin in (tuple, list) and args and all(a in (int, Ellipsis) for a in args):
        return int_list(None if Ellipsis in args or origin is list else len(args))
    if annotation is dict or origin is dict:
        return OBJECT
    return None


def config_from_dict(
    cls: type, data: Any, path: str | os.PathLike, section: str, upgrade: Callable[[dict], dict] | None = None
) -> Any:
    """Build the config dataclass ``cls`` from ``data`` (the ``section`` of file ``path``), checking every field's type
    first, so a wrong-typed or missing value is a one-line error naming the file instead of a failure deep inside the
    model's constructor. ``upgrade`` turns an older layout of the section into the current one first."""
    if not is_dataclass(cls):
        raise TypeError(f"{cls} is not a dataclass")
    if not isinstance(data, dict):
        raise DigitError(f"{path}: '{section}' must be an object")
    if upgrade is not None:
        try:
            data = upgrade(data)
        except (DigitError, KeyError, ValueError, TypeError) as e:
            raise DigitError(f"{path}: invalid '{section}': {_first_line(e)}") from e
    hints = get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise DigitError(f"{path}: unknown key '{section}.{unknown[0]}'")
    for name, f in known.items():
        if name not in data:
            if f.default is MISSING and f.default_factory is MISSING:
                raise DigitError(f"{path}: missing key '{section}.{name}'")
            continue
        kind = _kind_for(hints.get(name))
        if kind is not None and not kind.test(data[name]):
            raise DigitError(f"{path}: '{section}.{name}' must be {kind.name}, got {json.dumps(data[name])[:60]}")
    try:
        return cls.from_dict(data) if hasattr(cls, "from_dict") else cls(**data)
    except (DigitError, ValueError, TypeError, ArithmeticError) as e:  # the config's own range checks
        raise DigitError(f"{path}: invalid '{section}': {_first_line(e)}") from e


# ----------------------------------------------------------------------------------------------- .npy


def load_npy(
    path: str | os.PathLike,
    *,
    kinds: str,
    ndim: int | None = None,
    mmap: bool = False,
    what: str = "array",
) -> Any:
    """A plain .npy array whose dtype kind is one of ``kinds`` (numpy's codes: "u" unsigned, "i" signed, "f" float)
    and with ``ndim`` dimensions. Pickled (object) arrays are refused without being unpickled."""
    import numpy as np

    path = Path(path)
    _require_file(path)
    names = {"u": "unsigned integer", "i": "integer", "f": "float", "b": "boolean"}
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError, UnicodeDecodeError, SyntaxError) as e:
        # truncated or empty files, object dtypes (pickles), garbage headers
        raise DigitError(f"{path}: not a readable .npy {what} ({_first_line(e)})") from e
    if not isinstance(arr, np.ndarray):
        raise DigitError(f"{path}: not a single .npy array")
    if arr.dtype.kind not in kinds:
        want = " or ".join(names.get(k, k) for k in kinds)
        raise DigitError(f"{path}: {what} must have an {want} dtype, got {arr.dtype}")
    if ndim is not None and arr.ndim != ndim:
        raise DigitError(f"{path}: {what} must have {ndim} dimensions, got shape {list(arr.shape)}")
    return arr


def int_range(arr: Any, chunk_rows: int = 65536) -> tuple[int, int]:
    """(min, max) of an integer array (a memmap is read in chunks of rows); (0, -1) when empty."""
    if arr.size == 0:
        return 0, -1
    lo, hi = None, None
    for s in range(0, len(arr), chunk_rows):
        block = arr[s : s + chunk_rows]
        bl, bh = int(block.min()), int(block.max())
        lo, hi = bl if lo is None else min(lo, bl), bh if hi is None else max(hi, bh)
    return lo, hi


# ----------------------------------------------------------------------------------------------- weights


def tensors_sha256(state: Mapping[str, Any]) -> str:
    """sha256 over the tensors of a state dict in name order: each name, dtype, shape and raw bytes."""
    import torch

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _shipped_digest(path: Path) -> str | None:
    """The sha256 a shipped model folder's manifest records for ``path`` (it sits one or two levels up)."""
    for root in (path.parent, path.parent.parent):
        manifest = root / SHIPPED_MANIFEST
        if manifest.is_file():
            try:
                sums = json.loads(manifest.read_text()).get("sha256") or {}
            except (ValueError, OSError, AttributeError):
                return None
            return sums.get(path.resolve().relative_to(root.resolve()).as_posix())
    return None


def verify_shipped(path: str | os.PathLike) -> None:
    """Check a file against a shipped folder's manifest, when it is listed in one and checks are on."""
    from digit.utils.io import file_sha256

    path = Path(path)
    if not verify_enabled():
        return
    want = _shipped_digest(path)
    if want is not None and file_sha256(path) != want:
        raise DigitError(
            f"{path}: sha256 differs from the one recorded in {SHIPPED_MANIFEST}; the file is corrupt or was modified"
        )


def load_safetensors(path: str | os.PathLike, device: Any = "cpu", *, verify: bool | None = None) -> dict[str, Any]:
    """Read a safetensors file (on the CPU, then moved to ``device``) and verify its recorded digest."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    _require_file(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a Mapping)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise DigitError(f"{path}: not a readable safetensors file ({_first_line(e)}); the file is corrupt") from e
    if verify if verify is not None else verify_enabled():
        want = metadata.get(DIGEST_KEY)
        if want is not None:
            if tensors_sha256(state) != want:
                raise DigitError(
                    f"{path}: the weights' sha256 differs from the one recorded when the file was written; the file "
                    f"is corrupt (set {VERIFY_ENV}=0 to skip this check)"
                )
        else:
            verify_shipped(path)
    if str(device) != "cpu":
        state = {k: v.to(device) for k, v in state.items()}
    return state


def _feed(h: Any, obj: Any) -> None:
    import torch

    if torch.is_tensor(obj):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{list(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for k, v in obj.items():
            _feed(h, k)
            _feed(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for v in obj:
            _feed(h, v)
    else:
        h.update(f"S{obj!r}".encode())


def object_sha256(obj: Any) -> str:
    """sha256 of a nested structure of dicts / lists / tensors / plain values (insertion order, as pickled)."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()
