"""Weighted kNN classifier on frozen features: the monitor DINO reports (Wu et al. 2018; DINO eval_knn.py).

Cosine similarity to a labelled bank, the k nearest vote for their class with weight exp(sim / T) (k = 20, T = 0.07).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_predict(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """train_feats [N, D], train_labels [N] long, test_feats [M, D] -> predicted labels [M] (long)."""
    bank = F.normalize(train_feats.float(), dim=1)
    labels = train_labels.to(bank.device).long()
    k = min(k, bank.shape[0])
    preds = []
    for start in range(0, test_feats.shape[0], chunk):
        q = F.normalize(test_feats[start : start + chunk].float().to(bank.device), dim=1)
        sim, idx = (q @ bank.t()).topk(k, dim=1)  # [m, k]
        weight = (sim / temperature).exp()
        votes = torch.zeros(q.shape[0], num_classes, device=bank.device)
        votes.scatter_add_(1, labels[idx], weight)
        preds.append(votes.argmax(1))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def knn_accuracy(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int | None = None,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Top-1 accuracy of ``knn_predict`` in [0, 1]."""
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    pred = knn_predict(train_feats, train_labels, test_feats, num_classes, k, temperature)
    return float((pred.cpu() == test_labels.cpu().long()).float().mean())


@torch.no_grad()
def extract_features(
    backbone: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    preprocess: Callable[[torch.Tensor], torch.Tensor],
    pool: str = "cls",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``backbone(x) -> (cls, patches)`` over (images, labels) batches; features = cls token or mean patch."""
    if pool not in ("cls", "patch_mean"):
        raise ValueError(f"pool must be 'cls' or 'patch_mean', got {pool!r}")
    feats, labels = [], []
    for images, y in batches:
        cls, patches = backbone(preprocess(images))
        f = cls if pool == "cls" else patches.mean(1)
        feats.append(f.float().cpu())
        labels.append(y.cpu().long())
    return torch.cat(feats), torch.cat(labels)
