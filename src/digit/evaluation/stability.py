"""Latent stability (the DiGIT paper's token-stability table): how much do token ids move under pixel noise?

For each SNR (dB), Gaussian noise with sigma^2 = mean(x^2) / 10^(SNR/10) (per image) is added to the *normalised*
model input x, the image is re-tokenized, and we report the token change rate (fraction of positions whose id changed)
and the mean cosine similarity between the code vectors before and after. One standard-normal draw per image is reused
at every SNR (scaled by that SNR's sigma), so curves are monotone in expectation and comparable across SNRs.

``noise_space="pixel"`` instead adds the noise to the [0, 1] image u (sigma^2 = mean(u^2) / 10^(SNR/10)) and then
normalises: two tokenizers with different normalisations (a VQ's 2u - 1, an encoder's ImageNet mean / std) then see
the very same noisy images, where in the default input space each gets noise scaled to its own input's power.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from digit.tokenizers.protocol import to_unit_float

DEFAULT_SNR_DB = (30.0, 25.0, 20.0, 15.0, 10.0, 5.0)
NOISE_SPACES = ("input", "pixel")


def noise_sigma(x: torch.Tensor, snr_db: float) -> torch.Tensor:
    """Per-image noise std [B, 1, 1, 1] so that 10 log10(mean(x^2) / sigma^2) = snr_db (0 at infinite SNR)."""
    power = x.float().pow(2).flatten(1).mean(1)
    if math.isinf(snr_db) and snr_db > 0:
        return torch.zeros_like(power).view(-1, 1, 1, 1)
    return (power / 10.0 ** (snr_db / 10.0)).sqrt().view(-1, 1, 1, 1)


@torch.inference_mode()
def token_stability(
    tokenizer,
    batches: Iterable[torch.Tensor],
    snr_db: Sequence[float] = DEFAULT_SNR_DB,
    *,
    seed: int = 0,
    total: int | None = None,
    progress: bool = True,
    noise_space: str = "input",
) -> dict:
    """``batches`` yields images [B, 3, S, S] (uint8 or [0, 1]). Works for any tokenizer implementing the protocol.
    ``noise_space``: "input" (the normalised model input) or "pixel" (the [0, 1] image, then normalised)."""
    if noise_space not in NOISE_SPACES:
        raise ValueError(f"noise_space must be one of {NOISE_SPACES}, got {noise_space!r}")
    gen = torch.Generator().manual_seed(seed)
    changed = torch.zeros(len(snr_db), dtype=torch.float64)
    cosine = torch.zeros(len(snr_db), dtype=torch.float64)
    n_images = n_positions = 0
    with tqdm(total=total, desc="stability", unit="img", disable=not progress) as bar:
        for images in batches:
            u = to_unit_float(images)
            x = tokenizer.normalize(u)
            ids0 = tokenizer.encode_normalized(x)
            e0 = tokenizer.embed(ids0)
            z = torch.randn(x.shape, generator=gen, dtype=torch.float32).to(u.device)
            for j, snr in enumerate(snr_db):
                if noise_space == "pixel":
                    noisy = tokenizer.normalize(u + noise_sigma(u, snr) * z)
                else:
                    noisy = x + noise_sigma(x, snr) * z.to(x.device)
                ids = tokenizer.encode_normalized(noisy)
                changed[j] += (ids != ids0).sum().item()
                cosine[j] += F.cosine_similarity(tokenizer.embed(ids), e0, dim=-1).double().sum().item()
            n_images += x.shape[0]
            n_positions += ids0.numel()
            bar.update(x.shape[0])
    return {
        "snr_db": [float(s) for s in snr_db],
        "token_change_rate": (changed / max(n_positions, 1)).tolist(),
        "cosine_similarity": (cosine / max(n_positions, 1)).tolist(),
        "n_images": n_images,
        "seed": seed,
        "noise_space": noise_space,
    }


def format_table(result: dict) -> str:
    lines = [f"{'SNR (dB)':>9}  {'change rate':>11}  {'cosine':>8}"]
    for s, c, k in zip(result["snr_db"], result["token_change_rate"], result["cosine_similarity"]):
        lines.append(f"{s:>9.1f}  {c:>11.4f}  {k:>8.4f}")
    lines.append(f"({result['n_images']} images)")
    return "\n".join(lines)
