"""How well a VQ tokenizer reconstructs images: PSNR, SSIM and codebook usage over an image source (`digit vq reconstruct`).

Each image is resized and centre-cropped to the tokenizer's size (the evaluation transform), encoded to codes and
decoded back; PSNR and SSIM compare the two in [0, 1] per image and are averaged over images. Undecodable files are
skipped and counted, never scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(kw_only=True)
class Reconstruction:
    """``metrics`` (JSON-ready) and the first (original, reconstruction) pairs as uint8 [k, S, S, 3] arrays."""

    metrics: dict[str, Any]
    originals: np.ndarray
    reconstructions: np.ndarray
    skipped: Any = None  # the SkipReport (its summary is printed like every image-reading command's)

    def side_by_side(self, pairs_per_row: int = 4) -> np.ndarray:
        """One uint8 grid image: original | reconstruction, pair after pair, ``pairs_per_row`` pairs per row."""
        from digit.utils.images import image_grid

        pairs = np.stack([self.originals, self.reconstructions], axis=1).reshape(-1, *self.originals.shape[1:])
        return image_grid(pairs, ncols=2 * max(1, min(pairs_per_row, len(self.originals))))


@torch.no_grad()
def reconstruct(
    vq: Any, source: Any, *, batch_size: int = 32, limit: int | None = None, keep: int = 16, progress: bool = True
) -> Reconstruction:
    """Reconstruct ``source`` (an image source) through ``vq`` (a ``VQModel``); keep the first ``keep`` pairs.

    Metrics: ``n_images`` scored, ``psnr`` (dB) and ``ssim`` (means over images), ``codebook_perplexity`` (exp of the
    code histogram's entropy), ``codebook_usage`` (fraction of codes used), ``codes_used``, ``codebook_size`` and
    ``skipped`` (undecodable files)."""
    from tqdm import tqdm

    from digit.data.datasets import ImageDataset, SkipReport, image_loader, spread_indices
    from digit.tokenizers.vq_train import codebook_stats, psnr, ssim
    from digit.utils.images import to_uint8

    ds = ImageDataset(source, vq.image_size, train=False)
    if limit is not None and limit < len(ds):
        ds = torch.utils.data.Subset(ds, spread_indices(len(ds), limit))
    psnrs, ssims, ids, pairs = [], [], [], []
    skipped = SkipReport(source)
    for batch in tqdm(image_loader(ds, batch_size), desc="reconstruct", unit="batch", disable=not progress):
        skipped.add(batch["failures"])
        if not len(batch["images"]):
            continue
        x = vq.normalize(batch["images"])
        q = vq.quantize_latents(x.to(vq.quantize.embedding.weight.dtype))
        rec = vq.to_unit(vq.decode_latents(q.z_q))
        orig = vq.to_unit(x)
        psnrs.append(psnr(orig, rec).cpu())
        ssims.append(ssim(orig, rec).cpu())
        ids.append(q.ids.reshape(-1).cpu())
        if sum(len(p[0]) for p in pairs) < keep:
            pairs.append((to_uint8(orig), to_uint8(rec)))
    skipped.require_usable(len(psnrs))
    all_ids = torch.cat(ids)
    stats = codebook_stats(all_ids, vq.vocab_size)
    metrics = {
        "n_images": int(sum(len(p) for p in psnrs)),
        "psnr": float(torch.cat(psnrs).mean()),
        "ssim": float(torch.cat(ssims).mean()),
        "codebook_perplexity": stats["perplexity"],
        "codebook_usage": stats["usage"],
        "codes_used": int((torch.bincount(all_ids, minlength=vq.vocab_size) > 0).sum()),
        "codebook_size": vq.vocab_size,
        "skipped": len(skipped),
    }
    return Reconstruction(
        metrics=metrics,
        originals=np.concatenate([p[0] for p in pairs])[:keep],
        reconstructions=np.concatenate([p[1] for p in pairs])[:keep],
        skipped=skipped,
    )
