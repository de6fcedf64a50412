"""VQGAN training as a ``Task`` of the one trainer: losses, the PatchGAN discriminator, optional LPIPS, codebook usage.

Loss (LlamaGen ``vq_loss.py`` / taming ``vqperceptual.py``): reconstruction (L1 or L2) + LPIPS (only with local
VGG16 + LPIPS weights) + codebook + commitment (beta 0.25) + optional entropy + ``disc_weight`` x hinge generator loss
from ``disc_start``. The discriminator is pix2pix's ``NLayerDiscriminator`` (ndf 64, 3 layers, BatchNorm) trained
with the hinge loss in its own optimizer phase.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from digit.data.datasets import SkipReport
from digit.errors import DigitError
from digit.tokenizers.vq import VQModel
from digit.training.task import OptimizerSpec, TaskBase

# ---------------------------------------------------------------------------------------------------------- losses


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of images in [0, 1]: [B, 3, H, W] x 2 -> [B]."""
    mse = ((a.float() - b.float()) ** 2).flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))


def codebook_stats(ids: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """Perplexity exp(H(p)) of the code histogram and the fraction of the codebook used by ``ids``."""
    counts = torch.bincount(ids.reshape(-1).long(), minlength=codebook_size).float()
    p = counts / counts.sum().clamp_min(1.0)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
    return {"perplexity": float(entropy.exp()), "usage": float((counts > 0).float().mean())}


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix; taming / LlamaGen ``discriminator_patchgan.py``; keys ``main.N``)."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False),
                nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():  # pix2pix init
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


# VGG16 ``features`` indices whose ReLU outputs LPIPS compares (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3)
_LPIPS_TAPS = (3, 8, 15, 22, 29)
_LPIPS_CHANNELS = (64, 128, 256, 512, 512)


class LPIPS(nn.Module):
    """LPIPS-VGG16 (Zhang et al., 2018) from local weights only.

    The weights file (safetensors or a plain torch state dict) holds torchvision ``vgg16`` keys ``features.N.*`` and
    the LPIPS linear heads ``lin{0..4}.model.1.weight`` (from LPIPS' ``weights/v0.1/vgg.pth``): merge the two
    state dicts into one file. Inputs are images in [-1, 1].
    """

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers

        # torchvision's vgg16 ``features`` without building (and initialising) its 120M-parameter classifier
        self.features = make_layers(cfgs["D"])[: _LPIPS_TAPS[-1] + 1]
        for i, c in enumerate(_LPIPS_CHANNELS):
            lin = nn.Module()
            lin.model = nn.Sequential(nn.Dropout(), nn.Conv2d(c, 1, 1, bias=False))
            setattr(self, f"lin{i}", lin)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> LPIPS:
        from digit.utils.safe_pickle import load_weights

        path = Path(path)
        if not path.is_file():
            raise DigitError(f"LPIPS weights not found: {path}")
        if path.suffix == ".safetensors":
            from digit.utils.artifacts import load_safetensors

            state = load_safetensors(path)
        else:
            state = load_weights(path)
        model = cls()
        wanted = set(model.state_dict())
        state = {k: v for k, v in state.items() if k in wanted}  # a full vgg16 file also has classifier.*
        missing = wanted - set(state)
        if missing:
            raise DigitError(f"{path}: not VGG16 + LPIPS weights (missing {sorted(missing)[:3]})")
        model.load_state_dict(state)
        return model

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # frozen: dropout stays off

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] x 2 in [-1, 1] -> [B] perceptual distance."""
        x = torch.cat([a, b]).float()
        h = (x - self.shift) / self.scale
        total = 0.0
        tap = 0
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i == _LPIPS_TAPS[tap]:
                fa, fb = h.chunk(2)
                fa = fa / (fa.norm(dim=1, keepdim=True) + 1e-10)
                fb = fb / (fb.norm(dim=1, keepdim=True) + 1e-10)
                total = total + getattr(self, f"lin{tap}").model((fa - fb) ** 2).mean(dim=(1, 2, 3))
                tap += 1
        return total


# ------------------------------------------------------------------------------------------------------------ task


@dataclass(kw_only=True)
class VQLossConfig:
    recon: str = "l2"  # "l1" | "l2"  (LlamaGen: l2; MaskGIT: l1)
    recon_weight: float = 1.0
    codebook_weight: float = 1.0
    perceptual_weight: float = 1.0  # used only when LPIPS weights are given
    disc_weight: float = 0.5
    disc_start: int = 20000
    disc_ndf: int = 64
    disc_layers: int = 3
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    clip: float | None = 1.0
    dead_window: int = 1000  # a code unused for this many steps counts as dead

    def __post_init__(self) -> None:
        if self.recon not in ("l1", "l2"):
            raise DigitError(f"recon loss must be 'l1' or 'l2', not {self.recon!r}")
        self.betas = tuple(self.betas)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d


class VQTask(TaskBase):
    """VQGAN generator + PatchGAN discriminator as two optimizer phases of the one trainer."""

    name = "vqgan"
    unit = "images"
    ema_modules = ["generator"]  # the trainer keeps an EMA (when on) of the exported weights only

    def __init__(
        self,
        vq: VQModel,
        dataset: Any,
        loss: VQLossConfig | None = None,
        *,
        lpips: LPIPS | None = None,
        data_config: dict[str, Any] | None = None,
        eval_images: torch.Tensor | None = None,
    ) -> None:
        self.vq = vq
        self.dataset = dataset
        self.loss = loss or VQLossConfig()
        self.lpips = lpips
        self.use_disc = self.loss.disc_weight > 0
        self.disc = (
            NLayerDiscriminator(ndf=self.loss.disc_ndf, n_layers=self.loss.disc_layers) if self.use_disc else None
        )
        self.data_config = data_config or {}
        self.eval_images = eval_images  # uint8 [N, 3, S, S], a fixed held-out set for PSNR at evaluate()
        source = getattr(dataset, "source", None)  # files this process skipped, for the end-of-run summary
        self.skipped = SkipReport(source) if source is not None else None
        k = vq.cfg.codebook_size
        self.last_used = torch.full((k,), -1, dtype=torch.long)  # last step each code was chosen
        self._fakes: list[tuple[int, torch.Tensor]] = []  # detached reconstructions for the discriminator phase

    # ------------------------------------------------------------------ protocol
    def modules(self) -> dict[str, nn.Module]:
        mods: dict[str, nn.Module] = {"generator": self.vq}
        if self.disc is not None:
            mods["discriminator"] = self.disc
        return mods

    def optimizers(self) -> list[OptimizerSpec]:
        lc = self.loss
        common = dict(lr=lc.lr, betas=lc.betas, weight_decay=lc.weight_decay, clip=lc.clip)
        specs = [OptimizerSpec(name="generator", modules=["generator"], **common)]
        if self.disc is not None:
            start = lc.disc_start
            specs.append(
                OptimizerSpec(name="discriminator", modules=["discriminator"], active=lambda s: s >= start, **common)
            )
        return specs

    def collate(self, samples: list) -> dict[str, Any]:
        from digit.data.datasets import collate_skip

        b = collate_skip(samples)
        return {"images": b["images"], "skipped": torch.tensor(len(b["failures"])), "failures": b["failures"]}

    def count(self, batch: Any) -> int:
        return int(batch["images"].shape[0])

    def disc_on(self, step: int) -> bool:
        return self.disc is not None and step >= self.loss.disc_start

    def compute_loss(self, batch: Any, step: int, phase: str) -> tuple[torch.Tensor, dict[str, Any]]:
        if self.skipped is not None:
            self.skipped.add(batch.get("failures", []))
        if not len(batch["images"]):  # every file of this micro-batch failed to decode: a zero step
            module = self.disc if phase == "discriminator" else self.vq
            return sum(p.sum() for p in module.parameters()) * 0.0, {}
        x = self.vq.normalize(batch["images"])
        if phase == "discriminator":
            return self._disc_loss(x, step)
        return self._gen_loss(x, step)

    def _gen_loss(self, x: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        lc = self.loss
        recon, q = self.vq(x)
        recon = recon.float()
        diff = recon - x.float()
        rec = diff.abs().mean() if lc.recon == "l1" else (diff**2).mean()
        total = lc.recon_weight * rec + lc.codebook_weight * (q.codebook_loss + q.commit_loss + q.entropy_loss)
        metrics: dict[str, Any] = {
            "rec_loss": rec.detach(),
            "codebook_loss": q.codebook_loss.detach(),
            "commit_loss": q.commit_loss.detach(),
        }
        if self.vq.cfg.entropy_loss_ratio > 0:
            metrics["entropy_loss"] = q.entropy_loss.detach()
        if self.lpips is not None and lc.perceptual_weight > 0:
            self.lpips.to(x.device)
            to_sym = (lambda t: t * 2 - 1) if self.vq.cfg.pixel_range == "unit" else (lambda t: t)
            p = self.lpips(to_sym(recon), to_sym(x.float())).mean()
            total = total + lc.perceptual_weight * p
            metrics["lpips"] = p.detach()
        if self.disc_on(step):
            g = hinge_g_loss(self.disc(recon))
            total = total + lc.disc_weight * g
            metrics["g_loss"] = g.detach()
            self._fakes.append((step, recon.detach()))
        with torch.no_grad():
            metrics["psnr"] = psnr(self.vq.to_unit(recon), self.vq.to_unit(x)).mean()
            metrics.update(codebook_stats(q.ids, self.vq.cfg.codebook_size))
            used = torch.unique(q.ids).cpu()
            self.last_used[used] = step
            metrics["dead_codes"] = float((step - self.last_used > lc.dead_window).sum())
        return total, metrics

    def _disc_loss(self, x: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        fake = None
        if self._fakes:
            s, cached = self._fakes.pop(0)
            if s == step and cached.shape == x.shape:
                fake = cached
        if fake is None:  # no cached generator output for this micro-batch: recompute it
            self._fakes.clear()
            with torch.no_grad():
                fake = self.vq(x)[0].float()
        # one discriminator forward per backward (DDP): real and fake together
        logits = self.disc(torch.cat([x.float(), fake]))
        real_logits, fake_logits = logits.chunk(2)
        d = hinge_d_loss(real_logits, fake_logits)
        return d, {
            "d_loss": d.detach(),
            "logits_real": real_logits.mean().detach(),
            "logits_fake": fake_logits.mean().detach(),
        }

    def before_step(self, step: int) -> None:
        self._fakes.clear()

    def evaluate(self, step: int) -> dict[str, float]:
        if self.eval_images is None or not len(self.eval_images):
            return {}
        dev = self.vq.device
        out: list[torch.Tensor] = []
        ids: list[torch.Tensor] = []
        for i in range(0, len(self.eval_images), 32):
            x = self.vq.normalize(self.eval_images[i : i + 32].to(dev))
            recon, q = self.vq(x)
            out.append(psnr(self.vq.to_unit(recon), self.vq.to_unit(x)).cpu())
            ids.append(q.ids.cpu())
        stats = codebook_stats(torch.cat([t.reshape(-1) for t in ids]), self.vq.cfg.codebook_size)
        return {
            "val_psnr": float(torch.cat(out).mean()),
            "val_perplexity": stats["perplexity"],
            "val_usage": stats["usage"],
        }

    def state_dict(self) -> dict[str, Any]:
        return {"last_used": self.last_used.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "last_used" in state:
            self.last_used = state["last_used"].clone().long()

    def config(self) -> dict[str, Any]:
        return {"model": self.vq.cfg.to_dict(), "loss": self.loss.to_dict(), "data": self.data_config}

    def export(self, run_dir: Path, weights: dict[str, dict[str, torch.Tensor]]) -> None:
        """Write the run directory as a VQ tokenizer directory too: ``model.safetensors`` + ``tokenizer.json``."""
        export_tokenizer_dir(run_dir, self.vq, weights["generator"])


def export_tokenizer_dir(directory: str | os.PathLike, vq: VQModel, state: dict[str, torch.Tensor]) -> None:
    """Save ``state`` (weights for ``vq``'s config, e.g. the EMA ones) as a tokenizer directory."""
    out = VQModel(vq.cfg)
    out.load_state_dict({k: v.detach().float().cpu() for k, v in state.items()})
    out.save(directory)


def lpips_or_warn(path: str | os.PathLike | None) -> LPIPS | None:
    """LPIPS from a local file, or None with a warning: the perceptual loss is never downloaded."""
    if path is None:
        warnings.warn(
            "LPIPS perceptual loss is off: pass --lpips-weights FILE (VGG16 + LPIPS weights) to enable it",
            stacklevel=2,
        )
        return None
    return LPIPS.from_file(path)


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al., 2004; Gaussian window 11 / 1.5, channel mean) of images in [0, 1] -> [B]."""
    a, b = a.float(), b.float()
    c = a.shape[1]
    window = min(window, a.shape[-1], a.shape[-2])
    coords = torch.arange(window, dtype=torch.float32, device=a.device) - (window - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(c, 1, window, window).contiguous()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)


__all__ = [
    "LPIPS",
    "NLayerDiscriminator",
    "VQLossConfig",
    "VQTask",
    "codebook_stats",
    "export_tokenizer_dir",
    "hinge_d_loss",
    "hinge_g_loss",
    "lpips_or_warn",
    "psnr",
    "ssim",
]
