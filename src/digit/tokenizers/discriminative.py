"""The discriminative tokenizer: frozen SSL ViT features at an inner layer -> nearest K-means centroid."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from digit.errors import DigitError
from digit.tokenizers.encoder import ENCODER_WEIGHTS, Encoder, encoder_from_config
from digit.utils.artifacts import GRID, OBJECT, POSITIVE_INT, STR, Kind, load_npy, read_json_object
from digit.utils.io import atomic_save_numpy, atomic_save_safetensors, atomic_write_json

TOKENIZER_JSON = "tokenizer.json"
CENTROIDS = "centroids.npy"


def load_centroids(path: str | os.PathLike) -> np.ndarray:
    """A [K, D] codebook from .npy (our centroids.npy and DiGIT's km_8k.npy / km_16k.npy share this layout)."""
    path = Path(path)
    if not path.is_file():
        raise DigitError(f"codebook not found: {path}")
    c = load_npy(path, kinds="f", ndim=2, what="codebook")
    if c.shape[0] < 1 or c.shape[1] < 1:
        raise DigitError(f"{path}: empty codebook {list(c.shape)}")
    c = np.ascontiguousarray(c, dtype=np.float32)
    if not np.isfinite(c).all():
        raise DigitError(f"{path}: the codebook holds NaN or infinite values")
    return c


def codebook_fingerprint(centroids: np.ndarray) -> str:
    """sha256 (16 hex) of the float32 centroid bytes."""
    return hashlib.sha256(np.ascontiguousarray(centroids, dtype=np.float32).tobytes()).hexdigest()[:16]


def nearest_centroid(
    x: torch.Tensor, centroids: torch.Tensor, c_sqnorm: torch.Tensor, chunk: int = 8192
) -> torch.Tensor:
    """argmin_k ||x - c_k||^2 in fp32 via ||x||^2 - 2 x.c + ||c||^2, chunked over rows to bound memory.

    ||x||^2 is the same for every k, so it is left out of the argmin.
    """
    x = x.float()
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for s in range(0, x.shape[0], chunk):
        d = torch.addmm(c_sqnorm, x[s : s + chunk], centroids.t(), beta=1.0, alpha=-2.0)  # [n, K]
        out[s : s + chunk] = d.argmin(dim=1)
    return out


def check_smooth(kernel: Any, grid: tuple[int, int] | None = None) -> int:
    """A feature-smoothing kernel size: an odd integer >= 1 (1 = off), no larger than the token grid."""
    if isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0:
        raise DigitError(f"smooth must be an odd integer >= 1 (1 = off), got {kernel!r}")
    if grid is not None and kernel > min(grid):
        raise DigitError(f"smooth {kernel} is larger than the {grid[0]}x{grid[1]} token grid")
    return kernel


def smooth_features(feats: torch.Tensor, grid: tuple[int, int], kernel: int) -> torch.Tensor:
    """[B, h*w, D] -> [B, h*w, D]: each position's mean over the in-bounds kernel x kernel neighbourhood (stride 1,
    border windows average only the positions inside the grid), then a parameter-free layer norm over D.

    kernel 1 returns ``feats`` untouched (no layer norm), so unsmoothed tokens stay exactly as before. The layer norm
    after the average is the ``avg3+ln`` route measured in results/encoders.md (benchmarks/encoders_cifar10.py calls
    this function): averaging shrinks vectors unevenly, and the re-normalised average is what made the tokens stabler.
    """
    if kernel == 1:
        return feats
    b, hw, d = feats.shape
    fmap = feats.transpose(1, 2).reshape(b, d, *grid)
    x = F.avg_pool2d(fmap, kernel, stride=1, padding=kernel // 2, count_include_pad=False)
    x = x.flatten(2).transpose(1, 2)
    return F.layer_norm(x, x.shape[-1:])


class DiscriminativeTokenizer(torch.nn.Module):
    """encode(images) -> ids [B, h, w]; embed(ids) -> centroid vectors [B, h, w, D]. Has no decoder."""

    kind = "discriminative"

    def __init__(
        self,
        encoder: Encoder,
        centroids: np.ndarray | torch.Tensor,
        extra: dict[str, Any] | None = None,
        smooth: int = 1,
    ):
        super().__init__()
        c = torch.as_tensor(np.asarray(centroids, dtype=np.float32))
        if c.ndim != 2:
            raise DigitError(f"codebook must be [K, D], got {tuple(c.shape)}")
        if c.shape[1] != encoder.embed_dim:
            raise DigitError(
                f"codebook dimension {c.shape[1]} does not match the encoder's feature dimension {encoder.embed_dim}"
            )
        self.encoder = encoder
        self.smooth = check_smooth(smooth, encoder.grid_size)  # feature smoothing before the codebook lookup
        self.register_buffer("centroids", c, persistent=False)
        self.register_buffer("c_sqnorm", (c * c).sum(1), persistent=False)
        self.extra = dict(extra or {})

    @property
    def vocab_size(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.encoder.grid_size

    @property
    def image_size(self) -> int:
        return self.encoder.image_size

    @property
    def device(self) -> torch.device:
        return self.centroids.device

    def set_precision(self, precision: str) -> DiscriminativeTokenizer:
        """auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16: the encoder's autocast; the codebook lookup stays fp32."""
        self.encoder.set_precision(precision)
        return self

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder.normalize(images)

    @torch.inference_mode()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images -> the [B, h*w, D] vectors the codebook is fitted on and looked up with."""
        return smooth_features(self.encoder(x), self.grid_size, self.smooth)

    @torch.inference_mode()
    def encode_normalized(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.features(x.to(self.device))  # [B, h*w, D]
        b = feats.shape[0]
        ids = nearest_centroid(feats.reshape(-1, feats.shape[-1]), self.centroids, self.c_sqnorm)
        return ids.view(b, *self.grid_size)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode_normalized(self.normalize(images))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.centroids[ids.to(self.device)]

    def config(self) -> dict[str, Any]:
        return {
            "type": self.kind,
            "encoder": self.encoder.config(),
            "layer": self.encoder.layer,
            "image_size": self.image_size,
            "grid": list(self.grid_size),
            "vocab_size": self.vocab_size,
            "dim": self.dim,
            "codebook_fingerprint": self.codebook_fingerprint(),
            # written only when on: files of unsmoothed tokenizers stay as they were (absent key = 1)
            **({"smooth": self.smooth} if self.smooth != 1 else {}),
            **self.extra,
        }

    def codebook_fingerprint(self) -> str:
        """A short hash of the centroids: tells two fits with identical settings apart (stage-2 pairing checks)."""
        return codebook_fingerprint(self.centroids.detach().cpu().numpy())

    def save(self, directory: str | os.PathLike) -> Path:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        atomic_save_numpy(out / CENTROIDS, self.centroids.cpu().numpy())
        cfg = self.config()
        if cfg["encoder"]["weights"]["kind"] == "random":
            # random weights cannot be rebuilt from a name: keep them with the codebook
            atomic_save_safetensors(out / ENCODER_WEIGHTS, self.encoder.model.state_dict())
        atomic_write_json(out / TOKENIZER_JSON, cfg)
        return out

    @classmethod
    def load(cls, directory: str | os.PathLike, device: torch.device | str = "cpu") -> DiscriminativeTokenizer:
        directory = Path(directory)
        cfg_path = directory / TOKENIZER_JSON
        cfg = read_json_object(cfg_path, TOKENIZER_SCHEMA)
        weights = cfg["encoder"]["weights"]
        if weights["kind"] in ("dir", "file") and not isinstance(weights.get("path"), str):
            raise DigitError(f"{cfg_path}: 'encoder.weights.path' must be a string for kind {weights['kind']!r}")
        # the codebook first: it is cheap to check and must agree with tokenizer.json before the encoder is built
        centroids = load_centroids(directory / CENTROIDS)
        check_codebook(centroids, cfg, directory / CENTROIDS)
        try:
            encoder = encoder_from_config(cfg["encoder"], directory)
        except DigitError as e:
            raise (e if str(directory) in str(e) else DigitError(f"{cfg_path}: {e}")) from e
        extra = {
            k: v
            for k, v in cfg.items()
            if k
            not in {
                "type",
                "encoder",
                "layer",
                "image_size",
                "grid",
                "vocab_size",
                "dim",
                "codebook_fingerprint",
                "smooth",
            }
        }
        try:
            tok = cls(encoder, centroids, extra=extra, smooth=cfg.get("smooth", 1))
        except DigitError as e:
            raise DigitError(f"{cfg_path}: {e}") from e
        if "grid" in cfg and list(tok.grid_size) != list(cfg["grid"]):
            raise DigitError(f"{cfg_path}: grid {cfg['grid']} differs from the encoder's {list(tok.grid_size)}")
        return tok.to(device).eval()


TOKENIZER_SCHEMA = {
    "type": STR,
    "encoder": {
        "name": STR,
        "image_size": POSITIVE_INT,
        "layer": Kind(  # N blocks from the end (ViT), or a CNN feature map "strideS"
            "a positive integer or 'strideS'",
            lambda v: POSITIVE_INT.test(v) or (isinstance(v, str) and v[:6] == "stride"),
        ),
        "kwargs?": OBJECT,
        "weights": {"kind": STR, "path?": STR, "sha256?": STR},
    },
    "grid?": GRID,
    "vocab_size?": POSITIVE_INT,
    "dim?": POSITIVE_INT,
    "codebook_fingerprint?": STR,
    "smooth?": Kind("an odd integer >= 1", lambda v: POSITIVE_INT.test(v) and v % 2 == 1),
}


def check_codebook(centroids: np.ndarray, cfg: dict[str, Any], path: Path) -> None:
    """Refuse a centroids.npy that is not the codebook tokenizer.json describes (size, width, fingerprint)."""
    k, d = centroids.shape
    cfg_path = path.parent / TOKENIZER_JSON
    if cfg.get("vocab_size") is not None and k != cfg["vocab_size"]:
        raise DigitError(f"{path}: {k} centroids, but {cfg_path} says vocab_size {cfg['vocab_size']}")
    if cfg.get("dim") is not None and d != cfg["dim"]:
        raise DigitError(f"{path}: centroids of width {d}, but {cfg_path} says dim {cfg['dim']}")
    want = cfg.get("codebook_fingerprint")
    if want is not None and codebook_fingerprint(centroids) != want:
        raise DigitError(
            f"{path}: the centroids' fingerprint differs from the one in {cfg_path}; one of them is corrupt or was "
            "replaced"
        )
