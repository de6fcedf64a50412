"""Image sets for evaluation and the named evaluation protocols.

An image set is a torch Dataset of uint8 [3, H, W] tensors (what torch-fidelity's extractors take) opened from
  - a ``samples.npz`` (``digit generate``: uint8 [N, H, W, 3] under ``images``/``samples``/``arr_0`` + ``labels``; ADM's
    sample batches use ``arr_0``/``arr_1``),
  - a directory holding a ``samples.npz`` (a generation output), or a folder of images (searched recursively),
  - a ``.tar``/``.tar.gz`` image archive (through the data layer, ``digit.data.sources``).
The sampling configuration of generated sets is read from ``meta.json`` next to the images (or ``<name>.json`` beside
an npz) and copied into the result's provenance.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from digit.errors import DigitError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
NPZ_IMAGE_KEYS = ("images", "samples", "arr_0")


@dataclass(frozen=True)
class Protocol:
    """A named evaluation protocol: how reference images are prepared and how many a valid result needs."""

    name: str
    description: str
    image_size: int | None  # Resize(S) + CenterCrop(S) applied to reference images; None = use as stored
    min_images: int
    reference: str  # what --ref should be


PROTOCOLS = {
    # DiGIT evaluates like MAGE: torch-fidelity FID/IS of 50k samples against the 50k ImageNet val images resized to
    # 256 (shorter side) and center-cropped to 256 (shared/reference/digit-official.md section 8).
    "digit-mage": Protocol(
        name="digit-mage",
        description="ImageNet val, Resize(256) + CenterCrop(256), 50k images (MAGE/DiGIT)",
        image_size=256,
        min_images=50000,
        reference="ImageNet val image folder (or stats computed from it with this protocol)",
    ),
    # LlamaGen/ADM: 50k samples against the statistics stored in ADM's reference batch.
    "adm-ref": Protocol(
        name="adm-ref",
        description="ADM reference batch VIRTUAL_imagenet256_labeled.npz (stored mu/sigma), 50k samples",
        image_size=None,
        min_images=50000,
        reference="VIRTUAL_imagenet256_labeled.npz",
    ),
}


def get_protocol(name: str | None) -> Protocol | None:
    if name is None:
        return None
    if name not in PROTOCOLS:
        raise DigitError(f"unknown protocol {name!r}; choose from {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


@dataclass
class ImageSet:
    """A dataset of uint8 [3, H, W] images plus where they came from."""

    path: Path
    kind: str  # "npz" | "folder" | "archive"
    dataset: Any  # torch Dataset -> uint8 tensor [3, H, W]
    resolution: tuple[int, int] | None  # (H, W) when known before reading (npz, resized sets)
    labels: np.ndarray | None = None
    sampling: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.dataset)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": str(self.path), "kind": self.kind, "count": len(self)}
        out["resolution"] = list(self.resolution) if self.resolution else None
        if self.labels is not None and len(self.labels) and (self.labels >= 0).all():
            counts = np.bincount(self.labels)
            out["class_balance"] = {
                "num_classes": int((counts > 0).sum()),
                "min": int(counts[counts > 0].min()),
                "max": int(counts.max()),
            }
        if self.sampling is not None:
            out["sampling"] = self.sampling
        if self.notes:
            out["notes"] = list(self.notes)
        return out


class _ArrayDataset:
    def __init__(self, images: np.ndarray) -> None:
        self.images = images  # [N, H, W, 3] uint8

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        import torch

        return torch.from_numpy(np.ascontiguousarray(self.images[i].transpose(2, 0, 1)))


def decode_for_eval(file: Any, image_size: int | None, name: str) -> Any:
    """One image (a path or a binary file object) -> uint8 [3, H, W], the same for folders and archives so that a
    reference set's statistics do not depend on its container: PIL's ``convert("RGB")`` as torch-fidelity reads
    images, then optionally Resize(S) + CenterCrop(S) (torchvision's default bilinear, antialiased, as MAGE's
    evaluation transforms do)."""
    import torch
    from PIL import Image

    try:
        with Image.open(file) as im:
            im = im.convert("RGB")
            if image_size is not None:
                from torchvision.transforms import functional as TF

                im = TF.center_crop(TF.resize(im, image_size), image_size)
            arr = np.asarray(im, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError) as e:
        raise DigitError(f"cannot decode image {name}: {e}") from e
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


NPZ_AS_STORED = "npz array, as stored"


def preprocess_record(image_size: int | None) -> str:
    """What ``decode_for_eval`` did, as stored in reference statistics (a mismatch is refused)."""
    base = "PIL convert('RGB')"
    return base if image_size is None else f"{base}, Resize({image_size}, bilinear, antialias) + CenterCrop"


class _FileDataset:
    """Image files -> uint8 [3, H, W] (``decode_for_eval``)."""

    def __init__(self, files: list[Path], image_size: int | None) -> None:
        self.files = files
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        return decode_for_eval(self.files[i], self.image_size, str(self.files[i]))


class _SourceDataset:
    """A data-layer source (e.g. a .tar.gz): its bytes decoded like a folder's files (``decode_for_eval``)."""

    def __init__(self, source: Any, image_size: int) -> None:
        self.source, self.image_size = source, image_size

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        import io

        name = f"{self.source.path}: image {i}"
        try:
            data = self.source.read_bytes(i)
        except OSError as e:
            raise DigitError(f"cannot read {name} ({e})") from e
        return decode_for_eval(io.BytesIO(data), self.image_size, name)


def read_sampling_meta(path: Path) -> dict[str, Any] | None:
    """The generation config stored next to a sample set: ``meta.json`` in its directory or a ``<stem>.json`` sidecar."""
    candidates = [path / "meta.json"] if path.is_dir() else [path.with_suffix(".json"), path.parent / "meta.json"]
    for c in candidates:
        if c.is_file():
            try:
                return json.loads(c.read_text())
            except json.JSONDecodeError as e:
                raise DigitError(f"{c}: not valid JSON ({e.msg})") from e
    return None


def npz_kind(path: Path) -> str:
    """'stats' when an .npz holds mu/sigma (ours or ADM's reference batch), 'images' when it holds an image array."""
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
    except (OSError, ValueError) as e:
        raise DigitError(f"cannot read {path} as .npz: {e}") from e
    if {"mu", "sigma"} <= keys:
        return "stats"
    if keys & set(NPZ_IMAGE_KEYS):
        return "images"
    raise DigitError(
        f"{path}: neither statistics (mu, sigma) nor images ({'/'.join(NPZ_IMAGE_KEYS)}); keys {sorted(keys)}"
    )


def _open_npz(path: Path, image_size: int | None) -> ImageSet:
    with np.load(path, allow_pickle=False) as z:
        key = next(k for k in NPZ_IMAGE_KEYS if k in z.files)
        images = z[key]
        labels = z["labels"] if "labels" in z.files else (z["arr_1"] if "arr_1" in z.files else None)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise DigitError(f"{path}: '{key}' must be uint8 [N, H, W, 3], got {images.dtype} {list(images.shape)}")
    if image_size is not None and images.shape[1:3] != (image_size, image_size):
        raise DigitError(f"{path}: images are {images.shape[1]}x{images.shape[2]}, protocol wants {image_size}")
    if labels is not None:
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(labels) != len(images):
            labels = None
    return ImageSet(
        path,
        "npz",
        _ArrayDataset(images),
        (int(images.shape[1]), int(images.shape[2])),
        labels,
        read_sampling_meta(path),
    )


def _open_archive(path: Path, image_size: int | None) -> ImageSet:
    if image_size is None:
        raise DigitError(f"{path}: reading an archive needs --image-size (resize + center crop to a square)")
    from digit.data.sources import open_image_source

    src = open_image_source(path)
    labels = np.asarray(src.labels, dtype=np.int64) if getattr(src, "labels", None) is not None else None
    return ImageSet(path, "archive", _SourceDataset(src, image_size), (image_size, image_size), labels, None)


def open_image_set(path: str | Path, image_size: int | None = None) -> ImageSet:
    """Open an image set; ``image_size`` applies Resize(S) + CenterCrop(S) (folders/archives) or checks the size (npz)."""
    path = Path(path)
    if not path.exists():
        raise DigitError(f"image set not found: {path}")
    name = path.name.lower()
    if path.is_file() and name.endswith(".npz"):
        if npz_kind(path) == "stats":
            raise DigitError(f"{path} holds statistics, not images")
        return _open_npz(path, image_size)
    if path.is_file() and name.endswith((".tar", ".tar.gz", ".tgz")):
        return _open_archive(path, image_size)
    if path.is_dir():
        if (path / "samples.npz").is_file():
            s = _open_npz(path / "samples.npz", image_size)
            s.sampling = s.sampling or read_sampling_meta(path)
            return s
        from digit.data.sources import walk_folder  # links: the data layer's rule (inside the root, each file once)

        found, rejected = walk_folder(path)
        files = [path / p for p in found if p.suffix.lower() in IMAGE_EXTS]
        if not files and (path / "tokens.npy").is_file():
            raise DigitError(f"{path} is a token directory: decode it to images first (`digit generate`)")
        if not files:
            raise DigitError(f"no images ({', '.join(IMAGE_EXTS)}) under {path}")
        res = (image_size, image_size) if image_size is not None else None
        s = ImageSet(path, "folder", _FileDataset(files, image_size), res, None, read_sampling_meta(path))
        if rejected:
            s.notes.append(f"skipped {len(rejected)} link(s): " + "; ".join(f"{k}: {r}" for k, r in rejected[:5]))
        if any(f.suffix.lower() in (".jpg", ".jpeg", ".webp") for f in files[:1000]):
            s.notes.append("lossy-compressed files present: this may shift the metrics")
        return s
    raise DigitError(f"not an image set (image folder, .npz or .tar[.gz]): {path}")
