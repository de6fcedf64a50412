"""The discriminative tokenizer: frozen SSL ViT features at an inner layer -> nearest K-means centroid."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from digit.errors import DigitError
from digit.tokenizers.encoder import ENCODER_WEIGHTS, Encoder, encoder_from_config
from digit.utils.io import atomic_save_numpy, atomic_save_safetensors, atomic_write_json, read_json

TOKENIZER_JSON = "tokenizer.json"
CENTROIDS = "centroids.npy"


def load_centroids(path: str | os.PathLike) -> np.ndarray:
    """A [K, D] codebook from .npy (our centroids.npy and DiGIT's km_8k.npy / km_16k.npy share this layout)."""
    path = Path(path)
    if not path.is_file():
        raise DigitError(f"codebook not found: {path}")
    try:
        c = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise DigitError(f"{path} is not a plain .npy array: {e}") from e
    if c.ndim != 2 or not np.issubdtype(c.dtype, np.floating):
        raise DigitError(f"{path}: expected a float [K, D] codebook, got {c.dtype} {c.shape}")
    return np.ascontiguousarray(c, dtype=np.float32)


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


class DiscriminativeTokenizer(torch.nn.Module):
    """encode(images) -> ids [B, h, w]; embed(ids) -> centroid vectors [B, h, w, D]. Has no decoder."""

    kind = "discriminative"

    def __init__(self, encoder: Encoder, centroids: np.ndarray | torch.Tensor, extra: dict[str, Any] | None = None):
        super().__init__()
        c = torch.as_tensor(np.asarray(centroids, dtype=np.float32))
        if c.ndim != 2:
            raise DigitError(f"codebook must be [K, D], got {tuple(c.shape)}")
        if c.shape[1] != encoder.embed_dim:
            raise DigitError(
                f"codebook dimension {c.shape[1]} does not match the encoder's feature dimension {encoder.embed_dim}"
            )
        self.encoder = encoder
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
        return self.encoder(x)

    @torch.inference_mode()
    def encode_normalized(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.encoder(x.to(self.device))  # [B, h*w, D]
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
            **self.extra,
        }

    def codebook_fingerprint(self) -> str:
        """A short hash of the centroids: tells two fits with identical settings apart (stage-2 pairing checks)."""
        return hashlib.sha256(self.centroids.detach().cpu().numpy().tobytes()).hexdigest()[:16]

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
        cfg = read_json(directory / TOKENIZER_JSON)
        encoder = encoder_from_config(cfg["encoder"], directory)
        extra = {
            k: v
            for k, v in cfg.items()
            if k not in {"type", "encoder", "layer", "image_size", "grid", "vocab_size", "dim", "codebook_fingerprint"}
        }
        tok = cls(encoder, load_centroids(directory / CENTROIDS), extra=extra)
        return tok.to(device).eval()
