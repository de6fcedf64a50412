"""Linear probes on a frozen GPT: how linearly separable are the classes in each layer's features?

As DiGIT's probe (shared/reference/digit-official.md section 5): the frozen model runs on ``[start; tokens]``, each
layer's hidden states are mean-pooled over all positions, and one linear classifier per layer is trained with SGD
(momentum 0.9, lr 0.4 at batch 1024, cosine to 0, no weight decay). Unlike the official code, which stops at
inner_states[n-1], every layer is probed, the last included (it is marked: the official numbers never use it).

Features are extracted once (optionally cached on disk as .npy) and all classifiers train together as one batched
matmul [L, B, D] x [L, D, C]; per-layer standardisation with training statistics stands in for the non-affine
BatchNorm MAE puts before its linear head, so one learning rate suits every layer.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from digit.errors import DigitError


def layer_names(n_states: int) -> list[str]:
    """hidden_states index -> name: 0 is the embedding output, i the output of block i."""
    return ["embedding"] + [f"block {i}" for i in range(1, n_states)]


def probe_condition(model: Any, batch: int, device: Any):
    """The condition to probe with: none, or the null class for class-conditional models (the label must not leak)."""
    import torch

    cfg = model.config
    if cfg.cond == "none":
        return None
    if cfg.cond == "class":
        return torch.full((batch,), cfg.num_classes, dtype=torch.long, device=device)
    raise DigitError(f"probing a {cfg.cond!r}-conditioned model is not supported (it needs its condition tokens)")


def extract_gpt_features(
    model: Any,
    tokens: np.ndarray,
    layers: list[int],
    *,
    batch_size: int = 64,
    device: Any = "cpu",
    out: np.ndarray | None = None,
    desc: str = "features",
) -> np.ndarray:
    """tokens [N, h, w] -> mean-pooled hidden states [len(layers), N, dim] float32 (written into ``out`` if given)."""
    import torch
    from tqdm import tqdm

    n = len(tokens)
    if out is None:
        out = np.empty((len(layers), n, model.config.dim), dtype=np.float32)
    with torch.inference_mode():
        for i in tqdm(range(0, n, batch_size), desc=desc, unit="batch", leave=False):
            t = torch.from_numpy(np.asarray(tokens[i : i + batch_size], dtype=np.int64)).to(device)
            t = t.reshape(len(t), -1)  # [B, h*w] raster order
            states = model.hidden_states(t, probe_condition(model, len(t), device))  # n_layers+1 x [B, C+T, dim]
            for j, layer in enumerate(layers):
                out[j, i : i + len(t)] = states[layer].float().mean(dim=1).cpu().numpy()
    return out


# what the cached features are (mean over positions of each layer's hidden states, fp32): bump it when that changes
FEATURES_VERSION = 1


def feature_cache_key(weights_sha256: str, tokens: np.ndarray, layers: list[int]) -> dict:
    """What cached features depend on: the weights, the very token grids (their bytes, shape and dtype: a token
    directory rewritten in place, or another subset of it, is a miss), the layers, and how features are computed."""
    import hashlib

    grids = np.ascontiguousarray(tokens)
    return {
        "weights_sha256": weights_sha256,
        "tokens_sha256": hashlib.sha256(grids.tobytes()).hexdigest(),
        "tokens_shape": list(grids.shape),
        "tokens_dtype": str(grids.dtype),
        "layers": list(layers),
        "features_version": FEATURES_VERSION,
    }


def _cached_key(path: Path) -> Any:
    from digit.utils.io import read_json

    try:
        return read_json(path)
    except DigitError:  # damaged key file: a cache miss
        return None


def cached_gpt_features(
    model: Any,
    tokens: np.ndarray,
    layers: list[int],
    *,
    cache_dir: str | os.PathLike | None,
    name: str,
    key: dict[str, Any],
    batch_size: int = 64,
    device: Any = "cpu",
) -> np.ndarray:
    """``extract_gpt_features``, kept in ``cache_dir`` as ``{name}_features.npy`` (a memmap, so features larger than
    memory work) and reused while ``{name}_features.json`` equals ``key``. Without ``cache_dir``: extracted in memory.

    The key file is removed before and written after the features: a run killed half-way never leaves a cache that
    matches, and the features are staged in a temporary file renamed into place."""
    from digit.utils.io import atomic_write_json

    shape = (len(layers), len(tokens), model.config.dim)
    if cache_dir is None:
        return extract_gpt_features(model, tokens, layers, batch_size=batch_size, device=device, desc=name)
    cache = Path(cache_dir)
    f, k = cache / f"{name}_features.npy", cache / f"{name}_features.json"
    if f.is_file() and k.is_file() and _cached_key(k) == key:
        try:
            feats = np.load(f, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError):  # a damaged cache is a miss: extract again
            feats = None
        if feats is not None and feats.shape == shape and feats.dtype == np.float32:
            return feats
    cache.mkdir(parents=True, exist_ok=True)
    k.unlink(missing_ok=True)
    tmp = cache / f".{name}_features.npy.tmp"
    mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
    extract_gpt_features(model, tokens, layers, batch_size=batch_size, device=device, out=mm, desc=name)
    mm.flush()
    del mm
    os.replace(tmp, f)
    atomic_write_json(k, key)
    return np.load(f, mmap_mode="r")


def _standardize_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-layer feature mean/std over the training set, [L, D] each (chunked: features may be a large memmap)."""
    L, N, D = feats.shape
    chunk = max(256, (1 << 25) // (L * D))  # ~256 MB of float64 per chunk
    s, s2 = np.zeros((L, D)), np.zeros((L, D))
    for i in range(0, N, chunk):
        x = np.asarray(feats[:, i : i + chunk], dtype=np.float64)
        s += x.sum(1)
        s2 += (x**2).sum(1)
    mean = s / N
    std = np.sqrt(np.maximum(s2 / N - mean**2, 0.0)) + 1e-6
    return mean.astype(np.float32), std.astype(np.float32)


def train_linear_probes(
    train_feats: np.ndarray,
    train_labels: np.ndarray,
    val_feats: np.ndarray,
    val_labels: np.ndarray,
    num_classes: int,
    *,
    epochs: int = 10,
    lr: float = 0.4,
    batch_size: int = 1024,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: Any = "cpu",
) -> dict[str, Any]:
    """One linear classifier per layer, trained together. Features [L, N, D]; labels [N] in [0, num_classes).

    Returns {"val_top1": [L], "train_top1": [L], "train_loss": [L] (last epoch mean)}.
    """
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    L, N, D = train_feats.shape
    if val_feats.shape[0] != L or val_feats.shape[2] != D:
        raise DigitError(f"train features {train_feats.shape} and val features {val_feats.shape} do not match")
    if len(train_labels) != N or len(val_labels) != val_feats.shape[1]:
        raise DigitError("labels and features differ in length")
    for name, y in (("train", train_labels), ("val", val_labels)):
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise DigitError(f"{name} labels must lie in [0, {num_classes}) (unlabeled rows cannot be probed)")
    mean_np, std_np = _standardize_stats(train_feats)
    mean, std = torch.from_numpy(mean_np).to(device)[:, None], torch.from_numpy(std_np).to(device)[:, None]

    def batch_x(feats: np.ndarray, idx: np.ndarray) -> torch.Tensor:  # [L, B, D] standardised
        x = torch.from_numpy(np.asarray(feats[:, idx], dtype=np.float32)).to(device)
        return (x - mean) / std

    gen = torch.Generator().manual_seed(seed)
    w = torch.zeros(L, D, num_classes, device=device, requires_grad=True)  # [L, D, C]; zero init: the problem is convex
    b = torch.zeros(L, 1, num_classes, device=device, requires_grad=True)
    opt = torch.optim.SGD([w, b], lr=lr, momentum=momentum, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(N / batch_size)
    total = max(1, epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    y_all = torch.from_numpy(np.asarray(train_labels, dtype=np.int64))
    loss_sum = torch.zeros(L)
    for _ in tqdm(range(epochs), desc="probe", unit="epoch", leave=False):
        perm = torch.randperm(N, generator=gen).numpy()
        loss_sum.zero_()
        for s in range(steps_per_epoch):
            idx = np.sort(perm[s * batch_size : (s + 1) * batch_size])  # sorted: contiguous-ish reads from a memmap
            x, y = batch_x(train_feats, idx), y_all[idx].to(device)
            logits = torch.baddbmm(b, x, w)  # [L, B, C]
            loss_l = F.cross_entropy(logits.transpose(1, 2), y[None].expand(L, -1), reduction="none").mean(1)  # [L]
            opt.zero_grad(set_to_none=True)
            loss_l.sum().backward()  # disjoint parameters: the sum trains every layer's probe independently
            opt.step()
            sched.step()
            loss_sum += loss_l.detach().cpu() * len(idx)

    def top1(feats: np.ndarray, labels: np.ndarray) -> list[float]:
        correct = torch.zeros(L)
        with torch.no_grad():
            for i in range(0, feats.shape[1], batch_size):
                idx = np.arange(i, min(i + batch_size, feats.shape[1]))
                pred = torch.baddbmm(b, batch_x(feats, idx), w).argmax(-1).cpu()  # [L, B]
                correct += (pred == torch.from_numpy(np.asarray(labels[idx], dtype=np.int64))[None]).sum(1)
        return (correct / max(1, feats.shape[1])).tolist()

    return {
        "val_top1": top1(val_feats, val_labels),
        "train_top1": top1(train_feats, train_labels),
        "train_loss": (loss_sum / max(1, N)).tolist(),
    }


def summarize(layers: list[int], n_states: int, result: dict[str, Any]) -> dict[str, Any]:
    """Per-layer table, best layer, and which layers the official protocol would have probed."""
    names = layer_names(n_states)
    rows = []
    for j, layer in enumerate(layers):
        rows.append(
            {
                "layer": layer,
                "name": names[layer],
                "top1": result["val_top1"][j],
                "train_top1": result["train_top1"][j],
                "train_loss": result["train_loss"][j],
                "is_last": layer == n_states - 1,
                "official_probed": layer < n_states - 1,
            }
        )
    best = max(rows, key=lambda r: r["top1"])
    out = {"layers": rows, "best_layer": best["layer"], "best_name": best["name"], "best_top1": best["top1"]}
    official = [r for r in rows if r["official_probed"]]
    if official:
        ob = max(official, key=lambda r: r["top1"])
        out["best_official_layer"], out["best_official_top1"] = ob["layer"], ob["top1"]
    return out
