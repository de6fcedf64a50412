"""The one tokenizer protocol: images in, a grid of ids out (and back, where the tokenizer can decode).

Images cross the protocol as float tensors [B, 3, S, S] in [0, 1] (or uint8 [B, 3, S, S], converted on the tokenizer's
device), already resized and cropped to ``image_size`` by the data layer. Each tokenizer owns its own normalisation
(``normalize``), so analyses that perturb the model-space input (the stability analysis adds noise to the *normalised*
pixels) call ``encode_normalized`` directly.

A tokenizer directory holds ``tokenizer.json`` with a ``"type"`` field; ``digit.tokenizers.load_tokenizer`` dispatches on it.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int
    grid_size: tuple[int, int]
    image_size: int

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] in [0, 1] (or uint8) -> the model's input space (float32, on the tokenizer's device)."""
        ...

    def encode_normalized(self, x: torch.Tensor) -> torch.Tensor:
        """Model-space input [B, 3, S, S] -> LongTensor ids [B, h, w]."""
        ...

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] in [0, 1] (or uint8) -> LongTensor ids [B, h, w]. Equals encode_normalized(normalize(images))."""
        ...

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, h, w] -> code vectors [B, h, w, D] (float32)."""
        ...

    def config(self) -> dict:
        """Everything ``tokenizer.json`` holds (JSON-serialisable), including ``"type"``."""
        ...

    def save(self, directory) -> None: ...


@runtime_checkable
class DecodingTokenizer(Tokenizer, Protocol):
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, h, w] -> images [B, 3, S, S] float in [0, 1]."""
        ...


def to_unit_float(images: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 or float images -> float32 in [0, 1] on ``device``."""
    if device is not None:
        images = images.to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()
