"""DINO self-distillation (Caron et al. 2021) with the DINOv2 patch-level extras (iBOT masked-patch loss, KoLeo).

The pieces, top to bottom:
  ViTBackbone   a timm VisionTransformer run at any multiple of its patch size, with an optional learned mask token
                (iBOT); returns the class token and the patch tokens after the final norm.
  DINOHead      MLP -> bottleneck -> L2-normalised prototypes (weight norm with g fixed to 1).
  DINOLoss      cross-entropy between the sharpened, centred teacher and the student over all crop pairs; the centre
                is an EMA of the teacher's batch mean, kept as a buffer so it is checkpointed with the model.
  iBOTPatchLoss the same for masked patch tokens (own centre).
  koleo_loss    Kozachenko-Leonenko entropy estimator on the student's class tokens (DINOv2).
  DINOStudent   backbone + head in one forward (the teacher is an EMA copy of it, updated by the task).
  DINOCriterion the losses and both centres, as one checkpointed module.
  schedules     cosine / linear warm-up schedules for lr, weight decay, teacher momentum and temperature.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from digit.errors import DigitError


@dataclass(kw_only=True)
class DINOConfig:
    out_dim: int = 65536  # prototype count (DINO's default)
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    head_layers: int = 3
    student_temp: float = 0.1
    teacher_temp: float = 0.04  # start of the warm-up ...
    teacher_temp_final: float = 0.07  # ... and its end (DINO: 0.04 -> 0.07 over 30 of 100+ epochs)
    center_momentum: float = 0.9
    ibot_weight: float = 0.0  # DINOv2 uses 1.0; 0 turns the masked-patch loss (and masking) off
    mask_ratio: tuple[float, float] = (0.1, 0.5)  # iBOT: per-image ratio ~ U(0.1, 0.5) ...
    mask_prob: float = 0.5  # ... for half of the global crops
    koleo_weight: float = 0.0  # DINOv2 uses 0.1
    centering: str = "ema"  # "ema" (DINO: subtract an EMA of the batch mean) or "sinkhorn" (DINOv2: Sinkhorn-Knopp)

    def __post_init__(self) -> None:
        if self.centering not in ("ema", "sinkhorn"):
            raise DigitError(f"centering must be 'ema' or 'sinkhorn', got {self.centering!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["centering"] == "ema":
            del d["centering"]  # the default is left out so configs of runs made before the option still resume
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DINOConfig:
        d = dict(d)
        if "mask_ratio" in d:
            d["mask_ratio"] = tuple(d["mask_ratio"])
        return cls(**d)


# ---------------------------------------------------------------- backbone


class ViTBackbone(nn.Module):
    """A timm VisionTransformer with a forward that accepts any input size (positions resampled) and a patch mask."""

    def __init__(self, vit: nn.Module, mask_token: bool = False) -> None:
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        if not isinstance(vit, VisionTransformer):
            raise DigitError(f"DINO pretraining needs a timm VisionTransformer, got {type(vit).__name__}")
        self.vit = vit
        self.embed_dim: int = vit.embed_dim
        self.patch_size: int = vit.patch_embed.patch_size[0]
        # iBOT replaces masked patch embeddings by one learned vector (zeros at init, as DINOv2's mask_token). Only
        # created when used: data parallelism refuses parameters that receive no gradient.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, vit.embed_dim)) if mask_token else None

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, h, w, D] -> [B, prefix + h*w, D] with (resampled) positions; mirrors timm's _pos_embed."""
        from timm.layers import resample_abs_pos_embed

        vit = self.vit
        B, h, w, D = x.shape
        x = x.reshape(B, h * w, D)
        prefix = []
        if vit.cls_token is not None:
            prefix.append(vit.cls_token.expand(B, -1, -1))
        if vit.reg_token is not None:
            prefix.append(vit.reg_token.expand(B, -1, -1))
        if vit.pos_embed is None:
            return torch.cat([*prefix, x], dim=1)
        n_pos_prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
        pos = resample_abs_pos_embed(
            vit.pos_embed, new_size=(h, w), old_size=vit.patch_embed.grid_size, num_prefix_tokens=n_pos_prefix
        )
        if vit.no_embed_class:
            x = torch.cat([*prefix, x + pos], dim=1)
        else:
            x = torch.cat([*prefix, x], dim=1) + pos
        return vit.pos_drop(x)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, H, W] (normalised; H, W multiples of the patch size), mask [B, h*w] bool or None.

        Returns (cls [B, D], patches [B, h*w, D]) after the final norm. Without a class token, cls = mean of patches.
        """
        vit = self.vit
        pe = vit.patch_embed
        x = pe.proj(images).permute(0, 2, 3, 1)  # [B, h, w, D]
        x = pe.norm(x)
        if mask is not None:
            if self.mask_token is None:
                raise ValueError("this backbone was built without a mask token (iBOT off)")
            B, h, w, D = x.shape
            x = torch.where(mask.view(B, h, w, 1), self.mask_token.to(x.dtype).view(1, 1, 1, D), x)
        x = self._pos_embed(x)
        x = vit.norm_pre(x)
        x = vit.blocks(x)
        x = vit.norm(x)
        patches = x[:, vit.num_prefix_tokens :]
        cls = x[:, 0] if vit.cls_token is not None else patches.mean(1)
        return cls, patches


# ---------------------------------------------------------------- head and losses


class DINOHead(nn.Module):
    """MLP (GELU) -> bottleneck -> cosine against ``out_dim`` prototypes.

    DINO's last layer is ``weight_norm(Linear)`` with the norm g frozen at 1; that is exactly a matmul of the
    L2-normalised bottleneck with L2-normalised prototype rows, written here directly.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256, nlayers: int = 3):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, x: torch.Tensor, freeze_prototypes: bool = False) -> torch.Tensor:
        z = F.normalize(self.mlp(x), dim=-1)  # [..., bottleneck]
        w = self.prototypes
        if freeze_prototypes:
            # zero gradient rather than none: the tensor still takes part in data-parallel gradient reduction
            w = w.detach() + 0.0 * w
        return z @ F.normalize(w, dim=-1).t()  # [..., out_dim]


def _all_reduce(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In place over the ranks of a running process group; a no-op in a single process."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return x


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temp: float, iters: int = 3) -> torch.Tensor:
    """[N, K] teacher logits -> [N, K] targets whose rows sum to 1 and whose columns each sum to N / K: the batch
    (all ranks together) is spread evenly over the prototypes, so it cannot collapse onto a few of them (DINOv2's
    teacher centring, 3 alternating normalisations)."""
    x = logits.float()
    # a rank may hold no row (no masked patch this step) and must still join every reduction
    top = x.max() if x.numel() else x.new_tensor(float("-inf"))
    q = torch.exp((x - _all_reduce(top, "max")) / temp).T  # [K, N]
    # ranks may hold different counts (iBOT's masked patches, dropped undecodable images): N is their sum
    k, n = q.shape[0], _all_reduce(torch.tensor(float(q.shape[1]), device=q.device))
    tiny = torch.finfo(q.dtype).tiny  # a prototype or sample whose exp underflowed everywhere stays 0, not NaN
    q /= _all_reduce(q.sum())
    for _ in range(iters):
        q /= _all_reduce(q.sum(dim=1, keepdim=True)).clamp_min(tiny) * k  # each prototype gets 1/K of the mass
        q /= q.sum(dim=0, keepdim=True).clamp_min(tiny) * n  # each sample gets 1/N (rows are local: no reduction)
    return (q * n).T


class _CenteredTargets(nn.Module):
    """Teacher centring (EMA of the batch mean, synchronised across ranks; or Sinkhorn-Knopp) and sharpening
    (softmax at a low temperature)."""

    def __init__(self, out_dim: int, momentum: float, centering: str = "ema") -> None:
        super().__init__()
        self.momentum = momentum
        self.centering = centering
        self.register_buffer("center", torch.zeros(1, out_dim))

    def targets(self, teacher_logits: torch.Tensor, temp: float) -> torch.Tensor:
        if self.centering == "sinkhorn":
            k = teacher_logits.shape[-1]
            return sinkhorn_knopp(teacher_logits.reshape(-1, k), temp).reshape(teacher_logits.shape)
        return F.softmax((teacher_logits.float() - self.center) / temp, dim=-1)

    @torch.no_grad()
    def update(self, teacher_logits: torch.Tensor) -> None:
        """center <- m * center + (1 - m) * mean(teacher_logits) over the global batch (unused by Sinkhorn-Knopp,
        kept up to date so a run's checkpoints look the same either way)."""
        flat = teacher_logits.float().reshape(-1, teacher_logits.shape[-1])
        total = _all_reduce(flat.sum(0, keepdim=True))
        count = _all_reduce(torch.tensor(float(flat.shape[0]), device=flat.device))
        if count.item() > 0:  # the same on every rank (reduced): no rank skips a collective the others make
            self.center.mul_(self.momentum).add_(total / count, alpha=1.0 - self.momentum)


class DINOLoss(_CenteredTargets):
    """Cross-entropy H(teacher_g, student_v) averaged over every (global g, crop v != g) pair (DINO Alg. 1)."""

    def __init__(
        self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9, centering: str = "ema"
    ) -> None:
        super().__init__(out_dim, center_momentum, centering)
        self.student_temp = student_temp
        self.last_target_entropy = self.last_batch_entropy = torch.zeros(())

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """student_logits [V, B, K] (the first 2 views are the global crops), teacher_logits [G, B, K]."""
        G, V = teacher_logits.shape[0], student_logits.shape[0]
        q = self.targets(teacher_logits, teacher_temp)  # [G, B, K]
        logp = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)  # [V, B, K]
        ce = -torch.einsum("gbk,vbk->gv", q, logp) / q.shape[1]  # [G, V]: mean over the batch
        keep = ~torch.eye(G, V, dtype=torch.bool, device=ce.device)  # a view is never its own target
        with torch.no_grad():
            # collapse monitor (DINO Sec. 5.3): target entropy -> 0 is one-prototype collapse, -> log K is uniform
            self.last_target_entropy = -(q * torch.log(q.clamp_min(1e-12))).sum(-1).mean()
            q_mean = q.mean(dim=(0, 1))  # entropy of the batch's mean target: low = every image on the same prototypes
            self.last_batch_entropy = -(q_mean * torch.log(q_mean.clamp_min(1e-12))).sum()
        return ce[keep].mean()


class iBOTPatchLoss(_CenteredTargets):  # noqa: N801 - the method's name
    """Masked-patch distillation (iBOT; DINOv2's ibot loss): predict the teacher's prototype distribution of the
    unmasked patch from the masked student input; per image, averaged over its masked patches."""

    def __init__(
        self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9, centering: str = "ema"
    ) -> None:
        super().__init__(out_dim, center_momentum, centering)
        self.student_temp = student_temp

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        image_index: torch.Tensor,
        n_images: int,
        temp: float,
    ) -> torch.Tensor:
        """student/teacher_logits [M, K] for the M masked patches; image_index [M] (which image each came from)."""
        q = self.targets(teacher_logits, temp)
        ce = -(q * F.log_softmax(student_logits.float() / self.student_temp, dim=-1)).sum(-1)  # [M]
        per_image = torch.zeros(n_images, device=ce.device).index_add_(0, image_index, ce)
        counts = torch.zeros(n_images, device=ce.device).index_add_(0, image_index, torch.ones_like(ce))
        has = counts > 0
        if not has.any():  # no masked patch on this rank: 0, still in the graph (DDP expects every parameter)
            return student_logits.sum() * 0.0
        return (per_image[has] / counts[has]).mean()


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo regulariser (Sablayrolles et al. 2019, used in DINOv2): -mean log of each point's nearest-neighbour
    distance after L2 normalisation; spreads the features uniformly over the batch."""
    x = F.normalize(x.float(), dim=-1, eps=eps)
    sim = x @ x.t()
    sim.fill_diagonal_(-2.0)
    nn_idx = sim.argmax(dim=1)
    dists = (x - x[nn_idx]).norm(dim=-1)
    return -torch.log(dists + eps).mean()


# ---------------------------------------------------------------- student / teacher


def random_patch_mask(
    n: int, n_patches: int, ratio: tuple[float, float], prob: float, generator: torch.Generator
) -> torch.Tensor:
    """Bool [n, n_patches]: a fraction ``prob`` of the images get ratio ~ U(ratio) of their patches masked (iBOT's
    random masking; the block-wise variant is not needed at 8x8 grids). Drawn on CPU from ``generator``."""
    chosen = torch.rand(n, generator=generator) < prob
    r = torch.empty(n).uniform_(ratio[0], ratio[1], generator=generator)
    k = (r * n_patches).round().long().clamp(min=1)
    rank = torch.rand(n, n_patches, generator=generator).argsort(dim=1).argsort(dim=1)  # a random permutation's ranks
    return (rank < k[:, None]) & chosen[:, None]


class DINOStudent(nn.Module):
    """Backbone + head; the teacher is a second instance (an EMA copy). One forward per step, as data parallelism needs.

    ``forward(global_crops [G*B, 3, S, S], local_crops [L*B, 3, s, s] | None, mask [G*B, N] | None, select ...)``
    returns {"cls": global-crop class tokens [G*B, D], "logits": head outputs for the global then the local crops
    [(G+L)*B, K], "patch_logits": head outputs of the patches where ``select`` is true [M, K] (iBOT)}.
    ``mask`` replaces those patches' embeddings by the mask token (the student's input); the teacher selects the same
    patches from its unmasked input.
    """

    def __init__(self, vit: nn.Module, cfg: DINOConfig) -> None:
        super().__init__()
        from digit.ssl.cnn_backbone import make_backbone

        self.backbone = make_backbone(vit, mask_token=cfg.ibot_weight > 0)  # a ViT, or a timm CNN
        self.head = DINOHead(self.backbone.embed_dim, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.head_layers)
        self.freeze_prototypes = False  # DINO keeps the last layer fixed during the first epoch

    def forward(
        self,
        global_crops: torch.Tensor,
        local_crops: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        select: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        cls, patches = self.backbone(global_crops, mask=mask)
        tokens = [cls]
        if local_crops is not None and local_crops.shape[0] > 0:
            tokens.append(self.backbone(local_crops)[0])
        n_img = sum(t.shape[0] for t in tokens)
        if select is not None:
            tokens.append(patches[select])  # [M, D]
        # one head call for every token: the MLP and the prototype matmul run once
        logits = self.head(torch.cat(tokens), self.freeze_prototypes)
        out = {"cls": cls, "logits": logits[:n_img]}
        if select is not None:
            out["patch_logits"] = logits[n_img:]
        return out


class DINOCriterion(nn.Module):
    """All the losses and both centres (checkpointed buffers). In training mode, centres update after the loss."""

    def __init__(self, cfg: DINOConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.dino = DINOLoss(cfg.out_dim, cfg.student_temp, cfg.center_momentum, cfg.centering)
        self.ibot = iBOTPatchLoss(cfg.out_dim, cfg.student_temp, cfg.center_momentum, cfg.centering)

    def forward(
        self,
        student: dict[str, torch.Tensor],
        teacher: dict[str, torch.Tensor],
        *,
        n_global: int,
        teacher_temp: float,
        mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """student/teacher: DINOStudent outputs (teacher under no_grad). Returns {"loss", "dino", "ibot", "koleo"}."""
        t_logits = teacher["logits"].detach()
        B = t_logits.shape[0] // n_global
        dino = self.dino(student["logits"].unflatten(0, (-1, B)), t_logits.unflatten(0, (n_global, B)), teacher_temp)
        zero = torch.zeros((), device=dino.device)
        ibot, koleo, loss = zero, zero, dino
        # not conditioned on mask.any(): a rank without masked patches must still make iBOT's collectives
        if self.cfg.ibot_weight > 0 and mask is not None and "patch_logits" in student:
            img_idx = mask.nonzero(as_tuple=True)[0]
            t_patch = teacher["patch_logits"].detach()
            ibot = self.ibot(student["patch_logits"], t_patch, img_idx, mask.shape[0], teacher_temp)
            loss = loss + self.cfg.ibot_weight * ibot
            if self.training:
                self.ibot.update(t_patch)
        if self.cfg.koleo_weight > 0:
            koleo = sum(koleo_loss(c) for c in student["cls"].unflatten(0, (n_global, B))) / n_global
            loss = loss + self.cfg.koleo_weight * koleo
        if self.training:
            self.dino.update(t_logits)
        return {
            "loss": loss,
            "dino": dino.detach(),
            "ibot": ibot.detach(),
            "koleo": koleo.detach(),
            "target_entropy": self.dino.last_target_entropy,
            "batch_entropy": self.dino.last_batch_entropy,
        }


# ---------------------------------------------------------------- schedules


def cosine_schedule(step: int, total: int, base: float, final: float, warmup: int = 0, start: float = 0.0) -> float:
    """Linear warm-up from ``start`` to ``base`` over ``warmup`` steps, then cosine from ``base`` to ``final``."""
    if step < warmup:
        return start + (base - start) * step / warmup
    rest = max(1, total - warmup)
    t = min(1.0, (step - warmup) / rest)
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * t))


def linear_warmup(step: int, warmup: int, start: float, end: float) -> float:
    """``start`` -> ``end`` linearly over ``warmup`` steps, then ``end`` (DINO's teacher-temperature warm-up)."""
    if warmup <= 0 or step >= warmup:
        return end
    return start + (end - start) * step / warmup
