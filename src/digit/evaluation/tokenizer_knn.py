"""How discriminative is a tokenizer's latent space? Weighted kNN top-1 (``digit.ssl.knn``: k = 20, T = 0.07) on the
mean-pooled vectors the tokenizer quantises (its encoder's feature map after any ``--smooth``), a labelled bank of
training images against labelled queries. One protocol for every encoder route (a DINO ViT, a pretrained CNN, a
distilled student), so the routes' figures compare directly; the DINO monitor's CLS-token kNN is a different number.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tqdm import tqdm

from digit.ssl.knn import knn_accuracy


@torch.inference_mode()
def pooled_features(
    tokenizer, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *, total: int | None = None, desc: str = "features"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 or [0, 1] [B, 3, S, S], labels [B]) batches -> (features [N, D] fp32, labels [N])."""
    feats, labels = [], []
    with tqdm(total=total, desc=desc, unit="img") as bar:
        for images, y in batches:
            f = tokenizer.features(tokenizer.normalize(images).to(tokenizer.device))
            feats.append(f.float().mean(1).cpu())
            labels.append(y.long().cpu())
            bar.update(len(y))
    if not feats:
        return torch.zeros(0, tokenizer.dim), torch.zeros(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels)


def tokenizer_knn(
    tokenizer,
    bank: Iterable[tuple[torch.Tensor, torch.Tensor]],
    queries: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    totals: tuple[int | None, int | None] = (None, None),
) -> dict:
    bank_x, bank_y = pooled_features(tokenizer, bank, total=totals[0], desc="bank")
    query_x, query_y = pooled_features(tokenizer, queries, total=totals[1], desc="queries")
    top1 = knn_accuracy(bank_x, bank_y, query_x, query_y, num_classes=num_classes, k=k, temperature=temperature)
    return {"knn_top1": top1, "k": k, "temperature": temperature, "bank": len(bank_y), "queries": len(query_y),
            "features": "mean-pooled tokenizer features (what K-means quantises)"}  # fmt: skip
