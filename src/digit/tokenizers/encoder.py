"""The frozen self-supervised ViT behind the discriminative tokenizer, built with timm.

Layer semantics follow DiGIT (../shared/reference/digit-official.md, section 1): ``layer=N`` takes the output of block
``L - N`` (0-indexed; block 9 of 12 for ViT-B with N=3), applies the model's final norm, and drops the prefix tokens
(cls and registers), giving patch features [B, h*w, D] in raster order. The forward stops at that block.

Weights come from exactly one place: a local file (timm / safetensors state dict, or an original DINOv2 torch-hub
checkpoint such as ``dinov2_vitb14_reg4_pretrain.pth``), an encoder directory written by ``digit encoder pretrain``,
the timm/HF hub (only when asked), or random init (tests and demos, with a loud warning).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from digit.errors import DigitError
from digit.tokenizers.protocol import to_unit_float
from digit.utils.io import atomic_save_safetensors, atomic_write_json, file_sha256, read_json

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PRECISIONS = ("auto", "fp32", "bf16")
ENCODER_JSON = "encoder.json"
ENCODER_WEIGHTS = "encoder.safetensors"

MISSING_WEIGHTS_HELP = (
    "no encoder weights: pass --encoder-weights FILE (a timm/safetensors state dict, or an original DINOv2 checkpoint "
    "such as dinov2_vitb14_reg4_pretrain.pth from the facebookresearch/dinov2 release), --encoder DIR (a directory "
    "from `digit encoder pretrain`), --pretrained to fetch the timm weights from the Hugging Face hub on a machine "
    "with internet (or a populated HF cache), or --random-init for tests and demos"
)


class Encoder(nn.Module):
    """A timm ViT that returns patch features at one inner block (then the final norm)."""

    def __init__(self, model: nn.Module, *, layer: int = 3, image_size: int, source: dict[str, Any]):
        super().__init__()
        if not hasattr(model, "forward_intermediates") or not hasattr(model, "blocks"):
            raise DigitError(f"{type(model).__name__} is not a timm ViT with forward_intermediates")
        depth = len(model.blocks)
        if not 1 <= layer <= depth:
            raise DigitError(f"--layer {layer} is outside 1..{depth} for a {depth}-block encoder")
        self.model = model.eval().requires_grad_(False)
        self.layer = layer
        self.block_index = depth - layer
        self.image_size = image_size
        self.source = source
        patch = model.patch_embed.patch_size
        self.patch_size = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        if image_size % self.patch_size:
            raise DigitError(f"image size {image_size} is not a multiple of the patch size {self.patch_size}")
        self.grid_size = (image_size // self.patch_size, image_size // self.patch_size)
        self.embed_dim = int(model.embed_dim)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        # "auto": bf16 autocast on CUDA, exact fp32 on CPU. "bf16" on a CPU with avx512_bf16/AMX roughly doubles
        # throughput at ~0.3% feature error (DiGIT itself tokenized under fp16); ids can flip at near-ties.
        self.precision = "auto"

    def set_precision(self, precision: str) -> Encoder:
        if precision not in PRECISIONS:
            raise DigitError(f"unknown precision {precision!r} (choose from {', '.join(PRECISIONS)})")
        self.precision = precision
        return self

    @property
    def depth(self) -> int:
        return len(self.model.blocks)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 1] images [B, 3, S, S] -> ImageNet-normalised float32 on the encoder's device."""
        x = to_unit_float(images, self.device)
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images [B, 3, S, S] -> patch features [B, h*w, D] (cls and registers dropped)."""
        bf16 = self.precision == "bf16" or (self.precision == "auto" and x.is_cuda)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            (feats,) = self.model.forward_intermediates(
                x, indices=[self.block_index], norm=True, stop_early=True, output_fmt="NLC", intermediates_only=True
            )
        return feats.float()

    def config(self) -> dict[str, Any]:
        return {**self.source, "layer": self.layer, "image_size": self.image_size}


def _create_timm(name: str, kwargs: dict[str, Any], image_size: int | None, pretrained: bool = False) -> nn.Module:
    import timm

    kwargs = dict(kwargs)
    if image_size is not None:
        kwargs.setdefault("img_size", image_size)
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise DigitError(f"unknown timm model {name!r} (see timm.list_models('*vit*'))") from e
        raise
    except TypeError as e:
        raise DigitError(f"bad --encoder-kwargs for {name}: {e}") from e
    except Exception as e:  # hub / network failures when pretrained=True
        if pretrained:
            raise DigitError(
                f"could not fetch pretrained weights for {name} ({type(e).__name__}); {MISSING_WEIGHTS_HELP}"
            ) from e
        raise


def _model_image_size(model: nn.Module) -> int:
    size = model.patch_embed.img_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file (weights_only); unwraps {'model': ...} / {'state_dict': ...}."""
    path = Path(path)
    if not path.is_file():
        raise DigitError(f"encoder weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    from digit.utils.safe_pickle import load_weights

    sd = load_weights(path)
    for key in ("model", "state_dict", "teacher"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise DigitError(f"{path} does not hold a state dict")
    return {k.removeprefix("module.").removeprefix("backbone."): v for k, v in sd.items() if torch.is_tensor(v)}


def load_state_dict_into(model: nn.Module, state_dict: dict[str, torch.Tensor], origin: str) -> None:
    """Load timm-layout or original-DINOv2-layout weights; timm's filter converts DINOv2 keys and resizes pos_embed."""
    from timm.models import vision_transformer

    if isinstance(model, vision_transformer.VisionTransformer):
        state_dict = vision_transformer.checkpoint_filter_fn(dict(state_dict), model)
    state_dict = {k: v.float() for k, v in state_dict.items() if not k.startswith(("head.", "fc_norm."))}
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if not k.startswith(("head.", "fc_norm."))]
    if missing or unexpected:
        raise DigitError(
            f"{origin} does not fit the encoder: missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
            f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}"
        )


def build_encoder(
    name: str,
    kwargs: dict[str, Any] | None = None,
    *,
    weights: str | os.PathLike | None = None,
    random_init: bool = False,
    pretrained: bool = False,
    image_size: int | None = None,
    layer: int = 3,
    seed: int = 0,
) -> Encoder:
    """Build a frozen encoder from a timm name, or from an encoder directory when ``name`` is a directory."""
    kwargs = dict(kwargs or {})
    if Path(name).is_dir():
        if weights is not None or pretrained:
            raise DigitError("an encoder directory carries its own weights; drop --encoder-weights / --pretrained")
        return load_encoder_dir(name, layer=layer, image_size=image_size)
    if sum(bool(x) for x in (weights is not None, random_init, pretrained)) != 1:
        if weights is None and not random_init and not pretrained:
            raise DigitError(MISSING_WEIGHTS_HELP)
        raise DigitError("choose exactly one of --encoder-weights, --pretrained and --random-init")
    source: dict[str, Any] = {"name": name, "kwargs": kwargs}
    if random_init:
        warnings.warn(
            f"RANDOM-INIT ENCODER {name}: features carry no meaning; use this only for tests and demos",
            stacklevel=2,
        )
        torch.manual_seed(seed)
        model = _create_timm(name, kwargs, image_size)
        source["weights"] = {"kind": "random", "seed": seed}
    elif pretrained:
        model = _create_timm(name, kwargs, image_size, pretrained=True)
        source["weights"] = {"kind": "hub", "name": name}
    else:
        model = _create_timm(name, kwargs, image_size)
        path = Path(weights).expanduser().resolve()
        load_state_dict_into(model, read_state_dict(path), str(path))
        source["weights"] = {"kind": "file", "path": str(path), "sha256": file_sha256(path)}
    return Encoder(model, layer=layer, image_size=image_size or _model_image_size(model), source=source)


def encoder_from_config(cfg: dict[str, Any], directory: str | os.PathLike | None = None) -> Encoder:
    """Rebuild the encoder a tokenizer.json describes (weights stored beside it, a file, an encoder dir, or the hub)."""
    w = cfg.get("weights", {})
    kind = w.get("kind")
    image_size, layer = int(cfg["image_size"]), int(cfg["layer"])
    if kind == "dir":
        return load_encoder_dir(w["path"], layer=layer, image_size=image_size)
    model = _create_timm(cfg["name"], cfg.get("kwargs", {}), image_size, pretrained=kind == "hub")
    if kind in ("random", "stored"):
        stored = Path(directory or ".") / ENCODER_WEIGHTS
        if not stored.is_file():
            raise DigitError(f"tokenizer directory lacks {ENCODER_WEIGHTS} for its {kind} encoder")
        load_state_dict_into(model, read_state_dict(stored), str(stored))
    elif kind == "file":
        path = Path(w["path"])
        if not path.is_file():
            raise DigitError(f"the encoder weights this tokenizer was built with are missing: {path}")
        if w.get("sha256") and file_sha256(path) != w["sha256"]:
            raise DigitError(f"{path} changed since this tokenizer was built (sha256 differs): its tokens would differ")
        load_state_dict_into(model, read_state_dict(path), str(path))
    elif kind != "hub":
        raise DigitError(f"unknown encoder weights kind {kind!r}")
    source = {k: cfg[k] for k in ("name", "kwargs", "weights") if k in cfg}
    return Encoder(model, layer=layer, image_size=image_size, source=source)


def save_encoder_dir(
    encoder: nn.Module,
    out_dir: str | os.PathLike,
    *,
    name: str,
    kwargs: dict[str, Any],
    image_size: int,
    extra: dict | None = None,
) -> Path:
    """Write a reusable encoder directory: encoder.json (timm name, kwargs, input size) + encoder.safetensors."""
    model = encoder.model if isinstance(encoder, Encoder) else encoder
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(out / ENCODER_WEIGHTS, model.state_dict())
    atomic_write_json(
        out / ENCODER_JSON, {"name": name, "kwargs": kwargs, "image_size": int(image_size), **(extra or {})}
    )
    return out


def load_encoder_dir(path: str | os.PathLike, *, layer: int = 3, image_size: int | None = None) -> Encoder:
    path = Path(path)
    if not (path / ENCODER_JSON).is_file() or not (path / ENCODER_WEIGHTS).is_file():
        raise DigitError(f"{path} is not an encoder directory (needs {ENCODER_JSON} and {ENCODER_WEIGHTS})")
    cfg = read_json(path / ENCODER_JSON)
    size = image_size or int(cfg["image_size"])
    model = _create_timm(cfg["name"], cfg.get("kwargs", {}), size)
    load_state_dict_into(model, read_state_dict(path / ENCODER_WEIGHTS), str(path / ENCODER_WEIGHTS))
    source = {
        "name": cfg["name"],
        "kwargs": cfg.get("kwargs", {}),
        "weights": {"kind": "dir", "path": str(path.resolve())},
    }
    return Encoder(model, layer=layer, image_size=size, source=source)
