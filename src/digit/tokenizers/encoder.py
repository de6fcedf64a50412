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
from digit.utils.artifacts import OBJECT, POSITIVE_INT, STR, read_json_object
from digit.utils.io import atomic_save_safetensors, atomic_write_json, file_sha256

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PRECISIONS = ("auto", "fp32", "bf16")
POS_EMBED_INTERPOLATIONS = ("auto", "digit", "timm")
ENCODER_JSON = "encoder.json"
ENCODER_WEIGHTS = "encoder.safetensors"

MISSING_WEIGHTS_HELP = (
    "no encoder weights: pass --encoder-weights FILE (a timm/safetensors state dict, or an original DINOv2 checkpoint "
    "such as dinov2_vitb14_reg4_pretrain.pth from the facebookresearch/dinov2 release), --encoder DIR (a directory "
    "from `digit encoder pretrain`), --pretrained to fetch the timm weights from the Hugging Face hub on a machine "
    "with internet (or a populated HF cache), or --random-init for tests and demos"
)


class FeatureEncoder(nn.Module):
    """What every tokenizer encoder shares: its input normalisation, its precision, its device."""

    def _init_normalization(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        # "auto": bf16 autocast on CUDA, exact fp32 on CPU. "bf16" on a CPU with avx512_bf16/AMX roughly doubles
        # throughput at ~0.3% feature error (DiGIT itself tokenized under fp16); ids can flip at near-ties.
        self.precision = "auto"

    def set_precision(self, precision: str) -> FeatureEncoder:
        if precision not in PRECISIONS:
            raise DigitError(f"unknown precision {precision!r} (choose from {', '.join(PRECISIONS)})")
        self.precision = precision
        return self

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 1] images [B, 3, S, S] -> normalised float32 on the encoder's device."""
        x = to_unit_float(images, self.device)
        return (x - self.mean) / self.std

    def _autocast(self, x: torch.Tensor) -> torch.autocast:
        bf16 = self.precision == "bf16" or (self.precision == "auto" and x.is_cuda)
        return torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16)


class Encoder(FeatureEncoder):
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
        self._init_normalization(IMAGENET_MEAN, IMAGENET_STD)

    @property
    def depth(self) -> int:
        return len(self.model.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images [B, 3, S, S] -> patch features [B, h*w, D] (cls and registers dropped)."""
        with self._autocast(x):
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
        from digit.utils.artifacts import load_safetensors

        return load_safetensors(path)
    from digit.utils.safe_pickle import load_weights

    sd = load_weights(path)
    for key in ("model", "state_dict", "teacher"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise DigitError(f"{path} does not hold a state dict")
    return {k.removeprefix("module.").removeprefix("backbone."): v for k, v in sd.items() if torch.is_tensor(v)}


def digit_resample_pos_embed(
    pos_embed: torch.Tensor, grid: tuple[int, int], num_prefix: int, offset: float = 0.1, antialias: bool = False
) -> torch.Tensor:
    """DiGIT's DINOv2 copy (`pretrained_enc/dino/vits.py` ``interpolate_pos_encoding``, reference section 1): the
    square patch rows of a [1, prefix + M*M, D] table resampled to ``grid`` by ``F.interpolate(scale_factor=(g +
    offset) / M, bicubic, antialias)`` in float32. A scale factor, not a size: the sampling coordinates differ from a
    size-based resize (timm's loader, the torch-hub and HF models), whose slightly different features change some
    tokens. The ``num_prefix`` leading rows (cls) are kept as they are."""
    import torch.nn.functional as F

    prefix, patch = pos_embed[:, :num_prefix].float(), pos_embed[:, num_prefix:].float()
    M, D = int(round(patch.shape[1] ** 0.5)), patch.shape[2]
    if M * M != patch.shape[1]:
        raise DigitError(f"pos_embed has {patch.shape[1]} patch rows, not a square grid")
    gh, gw = grid
    if (M, M) == (gh, gw):
        return pos_embed.float()
    scale = (float(gh + offset) / M, float(gw + offset) / M)
    x = F.interpolate(patch.reshape(1, M, M, D).permute(0, 3, 1, 2), scale_factor=scale, mode="bicubic",
                      antialias=antialias)  # fmt: skip
    if tuple(x.shape[-2:]) != (gh, gw):
        raise DigitError(f"interpolating a {M}x{M} position table by {scale} gave {tuple(x.shape[-2:])}, not {grid}")
    return torch.cat([prefix, x.permute(0, 2, 3, 1).reshape(1, gh * gw, D)], dim=1)


def is_original_dinov2(state_dict: dict[str, torch.Tensor]) -> bool:
    """The facebookresearch/dinov2 key layout (timm's own test for it: a ``mask_token``)."""
    return "mask_token" in state_dict


def resolve_pos_embed_interpolation(mode: str, name: str, state_dict: dict | None = None) -> str:
    """``auto`` -> ``digit`` for DINOv2 weights (an original DINOv2 checkpoint or a timm ``*dinov2*`` model: the
    encoder DiGIT's tokens were made with), ``timm`` otherwise."""
    if mode not in POS_EMBED_INTERPOLATIONS:
        raise DigitError(
            f"unknown position-embedding interpolation {mode!r} (choose from {', '.join(POS_EMBED_INTERPOLATIONS)})"
        )
    if mode != "auto":
        return mode
    dinov2 = "dinov2" in name.lower() or (state_dict is not None and is_original_dinov2(state_dict))
    return "digit" if dinov2 else "timm"


def load_state_dict_into(
    model: nn.Module, state_dict: dict[str, torch.Tensor], origin: str, pos_embed_interpolation: str = "timm"
) -> None:
    """Load timm-layout or original-DINOv2-layout weights; timm's filter converts DINOv2 keys. A position table of
    another grid is resampled by timm's loader (``"timm"``: antialiased size-based bicubic) or DiGIT's way
    (``"digit"``: :func:`digit_resample_pos_embed`), before timm's filter sees it."""
    from timm.models import vision_transformer

    if pos_embed_interpolation not in ("digit", "timm"):
        raise DigitError(f"unknown position-embedding interpolation {pos_embed_interpolation!r} (digit | timm)")
    if (
        pos_embed_interpolation == "digit"
        and "pos_embed" in state_dict
        and getattr(model, "pos_embed", None) is not None
    ):
        state_dict = dict(state_dict)
        if is_original_dinov2(state_dict):
            prefix = 1  # DINOv2 keeps a cls row in its table (also with registers)
        else:
            prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
        grid = tuple(int(g) for g in model.patch_embed.grid_size)
        state_dict["pos_embed"] = digit_resample_pos_embed(state_dict["pos_embed"], grid, prefix)
    if isinstance(model, vision_transformer.VisionTransformer):
        state_dict = vision_transformer.checkpoint_filter_fn(dict(state_dict), model)
    state_dict = {k: v.float() for k, v in state_dict.items() if not k.startswith(("head.", "fc_norm."))}
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:  # shape mismatches: torch lists them after a header line
        detail = [ln.strip() for ln in str(e).splitlines() if ln.strip()][-1]
        raise DigitError(f"{origin} does not fit the encoder ({detail})") from e
    missing = [k for k in missing if not k.startswith(("head.", "fc_norm."))]
    if missing or unexpected:
        raise DigitError(
            f"{origin} does not fit the encoder: missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
            f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}"
        )


def _hub_model(name: str, kwargs: dict[str, Any], image_size: int | None, interpolation: str) -> nn.Module:
    """timm hub weights at ``image_size``: timm resamples the table itself; DiGIT's way needs the native table."""
    if interpolation == "timm" or image_size is None:
        return _create_timm(name, kwargs, image_size, pretrained=True)
    native = _create_timm(name, kwargs, None, pretrained=True)
    model = _create_timm(name, kwargs, image_size)
    load_state_dict_into(model, native.state_dict(), f"timm hub weights of {name}", interpolation)
    return model


def build_encoder(
    name: str,
    kwargs: dict[str, Any] | None = None,
    *,
    weights: str | os.PathLike | None = None,
    random_init: bool = False,
    pretrained: bool = False,
    image_size: int | None = None,
    layer: int | str = 3,
    seed: int = 0,
    pos_embed_interpolation: str = "auto",
) -> Encoder:
    """Build a frozen encoder from a timm name, or from an encoder directory when ``name`` is a directory.

    ``pos_embed_interpolation`` says how loaded weights' position table is resampled to ``image_size``
    (:func:`resolve_pos_embed_interpolation`: ``auto`` is DiGIT's way for DINOv2 weights, timm's otherwise).
    timm CNN names (EfficientNet, ResNet, ...) go to ``digit.tokenizers.cnn_encoder`` (``layer`` may be ``strideS``,
    ``weights`` may be ``"auto"``: the packaged weights of ``digit.weights``)."""
    kwargs = dict(kwargs or {})
    if Path(name).is_dir():
        if weights is not None or pretrained:
            raise DigitError("an encoder directory carries its own weights; drop --encoder-weights / --pretrained")
        return load_encoder_dir(name, layer=layer, image_size=image_size)
    cnn = _cnn_encoder_or_none(name, kwargs, weights, random_init, pretrained, image_size, layer, seed)
    if cnn is not None:
        return cnn
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
        mode = resolve_pos_embed_interpolation(pos_embed_interpolation, name)
        model = _hub_model(name, kwargs, image_size, mode)
        source["weights"] = {"kind": "hub", "name": name, "pos_embed_interpolation": mode}
    else:
        model = _create_timm(name, kwargs, image_size)
        path = Path(weights).expanduser().resolve()
        state = read_state_dict(path)
        mode = resolve_pos_embed_interpolation(pos_embed_interpolation, name, state)
        load_state_dict_into(model, state, str(path), mode)
        source["weights"] = {"kind": "file", "path": str(path), "sha256": file_sha256(path),
                             "pos_embed_interpolation": mode}  # fmt: skip
    return Encoder(model, layer=layer, image_size=image_size or _model_image_size(model), source=source)


def _cnn_encoder_or_none(name, kwargs, weights, random_init, pretrained, image_size, layer, seed):
    """The CNN path (digit.tokenizers.cnn_encoder) for timm CNN names; checks the ViT-only options otherwise."""
    from digit.tokenizers.cnn_encoder import build_cnn_encoder, is_cnn_name, parse_layer

    if is_cnn_name(name):
        return build_cnn_encoder(
            name,
            kwargs,
            weights=weights,
            random_init=random_init,
            pretrained=pretrained,
            image_size=image_size,
            layer=layer,
            seed=seed,
        )
    if weights is not None and str(weights) == "auto":
        from digit.weights import encoder_entry

        encoder_entry(name)  # raises: packaged weights exist only for the CNNs the registry names
    if not isinstance(parse_layer(layer), int):
        raise DigitError(f"--layer {layer}: strideS picks a CNN feature map; for a ViT, --layer N counts blocks")
    return None


def encoder_from_config(cfg: dict[str, Any], directory: str | os.PathLike | None = None) -> Encoder:
    """Rebuild the encoder a tokenizer.json describes (weights stored beside it, a file, an encoder dir, or the hub)."""
    if cfg.get("family") == "cnn":
        from digit.tokenizers.cnn_encoder import cnn_encoder_from_config

        return cnn_encoder_from_config(cfg, directory)
    w = cfg.get("weights", {})
    kind = w.get("kind")
    image_size, layer = int(cfg["image_size"]), int(cfg["layer"])
    if kind == "dir":
        return checked_dir_encoder(load_encoder_dir(w["path"], layer=layer, image_size=image_size), w)
    # tokenizers written before the choice existed were resampled by timm's loader
    interpolation = w.get("pos_embed_interpolation", "timm")
    if kind == "hub":
        model = _hub_model(cfg["name"], cfg.get("kwargs", {}), image_size, interpolation)
    else:
        model = _create_timm(cfg["name"], cfg.get("kwargs", {}), image_size)
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
        load_state_dict_into(model, read_state_dict(path), str(path), interpolation)
    elif kind != "hub":
        raise DigitError(f"unknown encoder weights kind {kind!r}")
    source = {k: cfg[k] for k in ("name", "kwargs", "weights") if k in cfg}
    return Encoder(model, layer=layer, image_size=image_size, source=source)


def checked_dir_encoder(encoder: Any, recorded: dict[str, Any]) -> Any:
    """An encoder loaded from a directory, refused if its weights are not the ones the tokenizer was fitted on
    (``digit encoder pretrain`` rewrites them at every checkpoint); tokenizers written before the hash was recorded
    are taken as they are. Its source becomes the recorded one, so the tokenizer saves back unchanged."""
    now = encoder.source["weights"].get("sha256")
    if recorded.get("sha256") and now != recorded["sha256"]:
        raise DigitError(
            f"{recorded['path']}/{ENCODER_WEIGHTS} changed since this tokenizer was fitted (sha256 differs): its "
            "tokens would differ; refit the tokenizer or restore those weights"
        )
    encoder.source = {**encoder.source, "weights": dict(recorded)}
    return encoder


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
    cfg = read_json_object(path / ENCODER_JSON, {"name": STR, "image_size": POSITIVE_INT, "kwargs?": OBJECT})
    size = image_size or int(cfg["image_size"])
    from digit.tokenizers.cnn_encoder import is_cnn_name, load_cnn_encoder_dir

    if is_cnn_name(cfg["name"]):
        return load_cnn_encoder_dir(path, cfg, layer=layer, image_size=size)
    model = _create_timm(cfg["name"], cfg.get("kwargs", {}), size)
    load_state_dict_into(model, read_state_dict(path / ENCODER_WEIGHTS), str(path / ENCODER_WEIGHTS))
    source = {
        "name": cfg["name"],
        "kwargs": cfg.get("kwargs", {}),
        "weights": {"kind": "dir", "path": str(path.resolve()), "sha256": file_sha256(path / ENCODER_WEIGHTS)},
    }
    return Encoder(model, layer=layer, image_size=size, source=source)
