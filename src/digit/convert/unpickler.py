"""A restricted unpickler for released checkpoints that ``torch.load(weights_only=True)`` refuses.

fairseq checkpoints carry their configuration as pickled objects (omegaconf ``DictConfig`` / ``ListConfig`` or fairseq
dataclasses and enums); LlamaGen's carry an ``argparse.Namespace``. This module rebuilds exactly these, and nothing
that could run code:

- tensors through torch's own rebuild functions and storages (``torch.load`` does the storage part: this module is
  passed to it as ``pickle_module``, so every global the pickle names goes through :meth:`RestrictedUnpickler.find_class`);
- plain containers and scalars (``dict``, ``list``, ``tuple``, ``set``, ``collections.OrderedDict``, numpy scalars and
  arrays of plain dtypes), ``argparse.Namespace``, ``torch.Size`` / dtypes / devices;
- config objects from ``omegaconf``, ``fairseq``, ``fairseq_user``, ``typing`` and ``pathlib``: never imported, each
  name becomes an inert record class that only stores what the pickle hands it, and :func:`plain` turns those records
  into plain dicts / lists / values afterwards (omegaconf's containers by their ``_content``, value nodes by ``_val``).

Any other global (``os.system``, ``builtins.eval``, ``subprocess.Popen``, ``torch.storage._load_from_bytes``, ...) is
refused with a :class:`~digit.errors.DigitError` that names it, before anything is called.
"""

from __future__ import annotations

import os
import pickle
import types
from collections import OrderedDict
from typing import Any

from digit.errors import DigitError

# (module, name) pairs rebuilt by the real object; all of them are data constructors that call nothing they were given
_ALLOWED: dict[str, set[str]] = {
    "torch._utils": {
        "_rebuild_tensor",
        "_rebuild_tensor_v2",
        "_rebuild_tensor_v3",
        "_rebuild_parameter",
        "_rebuild_parameter_with_state",
    },
    "torch": {"Size", "device", "Tensor"} | {f"{t}" for t in ("float16", "float32", "float64", "bfloat16", "half",
                                                            "float", "double", "int8", "uint8", "int16", "int32",
                                                            "int64", "long", "int", "bool", "complex64")},
    "torch.nn.parameter": {"Parameter"},
    "torch._tensor": {"_rebuild_from_type_v2"},
    "collections": {"OrderedDict", "defaultdict"},
    "argparse": {"Namespace"},
    "builtins": {"dict", "list", "tuple", "set", "frozenset", "int", "float", "str", "bool", "bytes", "bytearray",
                 "complex", "slice", "object"},
    "_codecs": {"encode"},  # numpy's protocol-2 byte strings: _codecs.encode(str, "latin1")
    "numpy": {"dtype", "ndarray"},
    "numpy.core.multiarray": {"scalar", "_reconstruct"},
    "numpy._core.multiarray": {"scalar", "_reconstruct"},
    "numpy.dtypes": {"Float64DType", "Float32DType", "Int64DType", "Int32DType", "BoolDType"},
}  # fmt: skip
# modules whose globals become inert records (configuration objects; never imported)
_RECORDED = ("omegaconf", "fairseq", "fairseq_user", "typing", "pathlib", "enum")


def _py3_name(module: str, name: str) -> tuple[str, str]:
    """Protocol <= 2 pickles name Python 2 modules; map them as pickle's fix_imports does (``__builtin__.eval``)."""
    import _compat_pickle

    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


class Record:
    """Stand-in for a config class of a module we never import. Calling it or building it only stores arguments.

    Objects pickled with NEWOBJ are created without ``__init__``, hence the class-level defaults."""

    qualname = "?"
    args: tuple = ()
    state: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        if kwargs:
            self.items().update(kwargs)

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def items(self) -> dict:
        return self.__dict__.setdefault("_items", {})

    # dict / list subclasses are filled with SETITEMS / APPENDS
    def __setitem__(self, key: Any, value: Any) -> None:
        self.items()[key] = value

    def append(self, value: Any) -> None:
        self.args = (*self.args, value)

    def extend(self, values: Any) -> None:
        self.args = (*self.args, *values)

    def __repr__(self) -> str:
        return f"<record {self.qualname}>"


_RECORD_TYPES: dict[str, type] = {}


def _record_type(module: str, name: str) -> type:
    key = f"{module}.{name}"
    if key not in _RECORD_TYPES:
        _RECORD_TYPES[key] = type(name, (Record,), {"qualname": key, "__module__": __name__})
    return _RECORD_TYPES[key]


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` only returns allow-listed globals or inert config records."""

    def find_class(self, module: str, name: str) -> Any:
        module, name = _py3_name(module, name)
        if name in _ALLOWED.get(module, ()):
            if module == "numpy" and name == "dtype":
                return _safe_dtype
            return super().find_class(module, name)
        root = module.split(".", 1)[0]
        if root in _RECORDED:
            return _record_type(module, name)
        raise DigitError(
            f"refusing to unpickle global {module}.{name}: the checkpoint asks to call something that is neither a "
            "tensor, a plain container nor a config object (a malicious or unsupported file)"
        )


def _safe_dtype(*args: Any, **kwargs: Any) -> Any:
    import numpy as np

    dt = np.dtype(*args, **kwargs)
    if dt.hasobject:  # object arrays would unpickle arbitrary payloads through their own state
        raise DigitError("refusing to unpickle a numpy object array")
    return dt


def _load(file: Any, **kwargs: Any) -> Any:
    return RestrictedUnpickler(file, **kwargs).load()


# ``torch.load(pickle_module=...)`` needs a module-like object with ``Unpickler`` and ``load``
restricted_pickle = types.ModuleType("digit_restricted_pickle")
restricted_pickle.Unpickler = RestrictedUnpickler  # type: ignore[attr-defined]
restricted_pickle.load = _load  # type: ignore[attr-defined]
restricted_pickle.__name__ = "digit_restricted_pickle"


def restricted_load(path: str | os.PathLike) -> Any:
    """Load a torch checkpoint through :class:`RestrictedUnpickler` (tensors on CPU), then :func:`plain` it."""
    import torch

    if not os.path.isfile(path):
        raise DigitError(f"file not found: {path}")
    try:
        # weights_only=False is required to pass a pickle_module; the restriction lives in that module's find_class
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=restricted_pickle)
    except DigitError as e:
        raise DigitError(f"{path}: {e}") from None
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, TypeError, AttributeError, KeyError) as e:
        from digit.utils.safe_pickle import torch_load_reason

        raise DigitError(f"{path} is not a readable torch checkpoint ({torch_load_reason(e)})") from e
    return plain(obj)


def load_checkpoint(path: str | os.PathLike) -> Any:
    """``torch.load(weights_only=True)`` (with ``argparse.Namespace`` allowed) first; the restricted unpickler only
    when that refuses the file. Config records come back as plain dicts / lists."""
    from digit.utils.safe_pickle import load_weights

    if not os.path.isfile(path):
        raise DigitError(f"file not found: {path}")
    try:
        return plain(load_weights(path))
    except DigitError:
        return restricted_load(path)


_CONTAINERS = ("omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig")


def plain(obj: Any) -> Any:
    """Replace config records by plain values, recursively (tensors and arrays are returned as they are)."""
    import argparse

    if isinstance(obj, Record):
        return _plain_record(obj)
    if isinstance(obj, argparse.Namespace):
        return argparse.Namespace(**{k: plain(v) for k, v in vars(obj).items()})
    if isinstance(obj, OrderedDict):
        return OrderedDict((k, plain(v)) for k, v in obj.items())
    if isinstance(obj, dict):  # dict, defaultdict: plain dicts
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [plain(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(plain(v) for v in obj)
    if isinstance(obj, type) and issubclass(obj, Record):
        return obj.qualname  # a class reference (omegaconf ref_type / object_type metadata)
    return obj


def _plain_record(r: Record) -> Any:
    state = r.state if isinstance(r.state, dict) else {}
    if r.qualname == _CONTAINERS[0] or (
        r.qualname.startswith("omegaconf") and "_content" in state and isinstance(state.get("_content"), dict)
    ):
        content = state.get("_content")
        return {plain(k): plain(v) for k, v in content.items()} if isinstance(content, dict) else _missing(content)
    if r.qualname == _CONTAINERS[1] or (r.qualname.startswith("omegaconf") and isinstance(state.get("_content"), list)):
        content = state.get("_content")
        return [plain(v) for v in content] if isinstance(content, list) else _missing(content)
    if r.qualname.startswith("omegaconf") and "_val" in state:
        return plain(state["_val"])
    items = r.items()
    if r.args and not state and not items:
        return plain(r.args[0]) if len(r.args) == 1 else [plain(a) for a in r.args]  # enums: their value
    out = {k: plain(v) for k, v in state.items() if not k.startswith("_")}
    out.update({str(k): plain(v) for k, v in items.items()})
    return out


def _missing(content: Any) -> Any:
    # omegaconf stores None, "???" (missing) or an interpolation string in place of an unset container
    return None if content in (None, "???") else content
