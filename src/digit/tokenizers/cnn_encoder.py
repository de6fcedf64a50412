"""Frozen timm CNN backbones (EfficientNet, ResNet, ConvNeXt, MobileNetV3, ...) as tokenizer encoders.

A CNN has no patch tokens; its "patches" are the positions of one stage's feature map. ``--layer`` picks that map:
``strideS`` takes the feature map of reduction S (``stride16``, ``stride32``), and an integer N the N-th feature map
from the end (1 = the last stage), mirroring the ViT meaning of ``--layer`` (N blocks from the end). The maps are timm's
``feature_info`` entries (the same ones ``features_only=True`` returns); ``forward_intermediates`` stops at the chosen
stage, so later stages cost nothing. The grid is ``image_size / stride`` per side, the feature vector is the stage
output as is, [B, h*w, C] in raster order (no extra norm: the stage ends in a batch norm). The input normalisation is
the one the weights were trained with (timm's ``pretrained_cfg`` mean/std; mean = std = 0.5 for the TF EfficientNets).
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch
from torch import nn

from digit.errors import DigitError
from digit.tokenizers.encoder import FeatureEncoder

# timm model modules whose models are convolutional backbones with feature_info + forward_intermediates
CNN_MODULES = frozenset(
    {"efficientnet", "resnet", "resnetv2", "convnext", "mobilenetv3", "regnet", "rexnet", "ghostnet", "byobnet"}
)
_STRIDE = re.compile(r"^stride(\d+)$")


def is_cnn_name(name: str) -> bool:
    """True for a timm model name from one of the CNN families (decided by the module that defines it, no build)."""
    import timm.models

    if not timm.models.is_model(name):
        return False
    return timm.models.model_entrypoint(name).__module__.rsplit(".", 1)[-1] in CNN_MODULES


def parse_layer(value: str | int) -> int | str:
    """``--layer``: a positive int, or ``strideS`` for CNN feature maps."""
    if isinstance(value, int):
        if value < 1:
            raise DigitError(f"--layer must be >= 1, got {value}")
        return value
    text = str(value).strip().lower()
    if text.isdigit() and int(text) >= 1:
        return int(text)
    if _STRIDE.match(text):
        return text
    raise DigitError(f"--layer must be a positive integer or strideS (e.g. stride16), got {value!r}")


def select_feature(feature_info: list[dict[str, Any]], layer: int | str) -> int:
    """Index into ``feature_info`` for ``layer`` (N-th map from the end, or the last map of reduction S)."""
    reductions = [int(f["reduction"]) for f in feature_info]
    if isinstance(layer, int):
        if not 1 <= layer <= len(reductions):
            raise DigitError(f"--layer {layer} is outside 1..{len(reductions)} (feature maps at strides {reductions})")
        return len(reductions) - layer
    m = _STRIDE.match(layer)
    stride = int(m.group(1)) if m else -1
    matches = [i for i, r in enumerate(reductions) if r == stride]
    if not matches:
        raise DigitError(f"--layer {layer}: this encoder has feature maps at strides {reductions}")
    return matches[-1]


class CNNEncoder(FeatureEncoder):
    """A timm CNN returning one stage's feature map as patch features [B, h*w, C]."""

    family = "cnn"

    def __init__(
        self,
        model: nn.Module,
        *,
        layer: int | str,
        image_size: int,
        source: dict[str, Any],
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ):
        super().__init__()
        if not hasattr(model, "forward_intermediates") or not hasattr(model, "feature_info"):
            raise DigitError(f"{type(model).__name__} has no timm feature_info / forward_intermediates")
        info = [dict(f) for f in model.feature_info]
        self.model = model.eval().requires_grad_(False)
        self.layer = parse_layer(layer)
        self.feature_index = select_feature(info, self.layer)
        self.stride = int(info[self.feature_index]["reduction"])
        self.embed_dim = int(info[self.feature_index]["num_chs"])
        self.n_features = len(info)
        self.image_size = int(image_size)
        if self.image_size % self.stride:
            raise DigitError(f"image size {image_size} is not a multiple of the feature stride {self.stride}")
        self.patch_size = self.stride  # one token per feature-map position: the ViT patch-size counterpart
        self.grid_size = (self.image_size // self.stride, self.image_size // self.stride)
        self.source = source
        self.mean_std = (tuple(float(v) for v in mean), tuple(float(v) for v in std))
        self._init_normalization(*self.mean_std)

    @property
    def depth(self) -> int:
        return self.n_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self._autocast(x):
            (fmap,) = self.model.forward_intermediates(
                x, indices=[self.feature_index], stop_early=True, intermediates_only=True
            )
        return fmap.float().flatten(2).transpose(1, 2)  # [B, C, h, w] -> [B, h*w, C]

    def config(self) -> dict[str, Any]:
        return {
            **self.source,
            "family": self.family,
            "layer": self.layer,
            "stride": self.stride,
            "image_size": self.image_size,
            "mean": list(self.mean_std[0]),
            "std": list(self.mean_std[1]),
        }


def create_cnn(name: str, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as e:
        raise DigitError(f"bad --encoder-kwargs for {name}: {e}") from e


def _norm_of(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    from digit.tokenizers.encoder import IMAGENET_MEAN, IMAGENET_STD

    return tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))


def build_cnn_encoder(
    name: str,
    kwargs: dict[str, Any] | None = None,
    *,
    weights: str | Any | None = None,
    random_init: bool = False,
    pretrained: bool = False,
    image_size: int | None = None,
    layer: int | str = "stride16",
    seed: int = 0,
) -> CNNEncoder:
    """A frozen CNN encoder: packaged weights (``weights="auto"``), a local state-dict file, or random init."""
    from digit import weights as packaged
    from digit.tokenizers.encoder import MISSING_WEIGHTS_HELP, read_state_dict
    from digit.utils.io import file_sha256

    kwargs = dict(kwargs or {})
    if pretrained:
        raise DigitError("--pretrained (hub download) is for ViTs; CNN encoders take --encoder-weights auto or FILE")
    if (weights is not None) + bool(random_init) != 1:
        raise DigitError(MISSING_WEIGHTS_HELP if weights is None else "choose one of --encoder-weights, --random-init")
    source: dict[str, Any] = {"name": name, "kwargs": kwargs}
    if random_init:
        warnings.warn(f"RANDOM-INIT ENCODER {name}: features carry no meaning; tests and demos only", stacklevel=2)
        torch.manual_seed(seed)
        model = create_cnn(name, kwargs)
        source["weights"] = {"kind": "random", "seed": seed}
    elif str(weights) == "auto":
        entry = packaged.encoder_entry(name)
        model = create_cnn(name, kwargs)
        packaged.load_encoder_weights(entry, model)
        source["weights"] = packaged.provenance(entry, packaged.resolve(entry))
    else:
        from pathlib import Path

        path = Path(weights).expanduser().resolve()
        model = create_cnn(name, kwargs)
        load_cnn_state_dict(model, read_state_dict(path), str(path))
        source["weights"] = {"kind": "file", "path": str(path), "sha256": file_sha256(path)}
    mean, std = _norm_of(model)
    size = image_size or int((getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))[-1])
    return CNNEncoder(model, layer=layer, image_size=size, source=source, mean=mean, std=std)


def load_cnn_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], origin: str) -> None:
    """timm-layout weights, strictly: every tensor with its shape (a classifier of another size may be left out)."""
    target = model.state_dict()
    head = getattr(model, "pretrained_cfg", {}).get("classifier", "classifier")
    sd = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    for k in [k for k in sd if k.startswith(f"{head}.") and (k not in target or sd[k].shape != target[k].shape)]:
        sd.pop(k)
    for k in [k for k in target if k.startswith(f"{head}.") and k not in sd]:
        sd[k] = target[k]
    from digit.convert.efficientnet_lite import check_covers

    try:
        check_covers(sd, target)
    except DigitError as e:
        raise DigitError(f"{origin}: {e}") from None
    model.load_state_dict(sd, strict=True)


def cnn_encoder_from_config(cfg: dict[str, Any], directory: Any = None) -> CNNEncoder:
    """Rebuild the CNN encoder a tokenizer.json describes (packaged weights re-verified, stored or file weights)."""
    from pathlib import Path

    from digit import weights as packaged
    from digit.tokenizers.encoder import ENCODER_WEIGHTS, read_state_dict
    from digit.utils.io import file_sha256

    w = cfg.get("weights", {})
    kind = w.get("kind")
    if kind == "dir":  # an encoder directory from `digit encoder pretrain`
        from digit.tokenizers.encoder import checked_dir_encoder, load_encoder_dir

        return checked_dir_encoder(
            load_encoder_dir(w["path"], layer=cfg["layer"], image_size=int(cfg["image_size"])), w
        )
    model = create_cnn(cfg["name"], cfg.get("kwargs", {}))
    if kind == "package":
        entry = packaged.encoder_entry(cfg["name"])
        if entry.sha256 != w.get("sha256"):
            raise DigitError(f"this tokenizer was built with other {entry.package} weights (sha256 differs)")
        packaged.load_encoder_weights(entry, model)
    elif kind in ("random", "stored"):
        stored = Path(directory or ".") / ENCODER_WEIGHTS
        if not stored.is_file():
            raise DigitError(f"tokenizer directory lacks {ENCODER_WEIGHTS} for its {kind} encoder")
        load_cnn_state_dict(model, read_state_dict(stored), str(stored))
    elif kind == "file":
        path = Path(w["path"])
        if not path.is_file():
            raise DigitError(f"the encoder weights this tokenizer was built with are missing: {path}")
        if w.get("sha256") and file_sha256(path) != w["sha256"]:
            raise DigitError(f"{path} changed since this tokenizer was built (sha256 differs): its tokens would differ")
        load_cnn_state_dict(model, read_state_dict(path), str(path))
    else:
        raise DigitError(f"unknown CNN encoder weights kind {kind!r}")
    source = {k: cfg[k] for k in ("name", "kwargs", "weights") if k in cfg}
    return CNNEncoder(
        model,
        layer=cfg["layer"],
        image_size=int(cfg["image_size"]),
        source=source,
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
    )


def load_cnn_encoder_dir(path: Any, cfg: dict[str, Any], *, layer: int | str, image_size: int) -> CNNEncoder:
    """A CNN encoder directory (``digit encoder pretrain`` output): its weights, the normalisation it trained with."""
    from pathlib import Path

    from digit.tokenizers.encoder import ENCODER_WEIGHTS, read_state_dict
    from digit.utils.io import file_sha256

    path = Path(path)
    model = create_cnn(cfg["name"], cfg.get("kwargs", {}))
    load_cnn_state_dict(model, read_state_dict(path / ENCODER_WEIGHTS), str(path / ENCODER_WEIGHTS))
    mean, std = _norm_of(model)  # DINO trains a CNN with these (digit.ssl.task)
    source = {
        "name": cfg["name"],
        "kwargs": cfg.get("kwargs", {}),
        "weights": {"kind": "dir", "path": str(path.resolve()), "sha256": file_sha256(path / ENCODER_WEIGHTS)},
    }
    return CNNEncoder(model, layer=layer, image_size=image_size, source=source, mean=mean, std=std)
