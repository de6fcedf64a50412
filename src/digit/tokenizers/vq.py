"""The VQGAN tokenizer family: taming f16, MAGE/MaskGIT (DiGIT's stage-2 VQGAN) and LlamaGen VQ-16, one configurable model.

``VQModel`` is an ``nn.Module`` whose ``state_dict`` keys are those of the originals (``encoder.*``, ``decoder.*``,
``quantize.embedding.weight``, ``quant_conv`` / ``post_quant_conv`` when present, LlamaGen's ``quantize.codebook_used``
buffer), and it implements the tokenizer protocol (``digit.tokenizers.protocol.DecodingTokenizer``).

A tokenizer directory holds ``tokenizer.json`` (``"type": "vq"``, the config, a fingerprint of the codebook) and
``model.safetensors``; ``digit vq train`` writes one as its run directory.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from digit.errors import DigitError
from digit.tokenizers.protocol import to_unit_float
from digit.tokenizers.vq_blocks import Decoder, Encoder

TOKENIZER_TYPE = "vq"
FORMAT_VERSION = 1


@dataclass(kw_only=True)
class VQConfig:
    """Every switch needed to express the three originals (see ``vq_blocks`` for what each changes)."""

    family: str = "llamagen"  # label only: "taming" | "mage" | "llamagen" | "tiny"
    layout: str = "llamagen"  # module naming: "taming" (down/up/mid.block_1) | "llamagen" (conv_blocks/res/mid.N)
    image_size: int = 256
    in_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    decoder_extra_blocks: int = 1  # taming/LlamaGen decode with num_res_blocks + 1 blocks per level, MAGE with + 0
    z_channels: int = 256
    attention: bool = True  # attention blocks at the lowest resolution and in the middle
    conv_bias: bool = True  # False: MAGE's bias-free res-block convs and encoder conv_in
    shortcut_on_residual: bool = False  # MAGE quirk: nin_shortcut(h) + h
    downsample: str = "conv"  # "conv" (pad + stride-2 conv) | "avgpool" (MAGE)
    encoder_out_kernel: int = 3  # MAGE: 1
    quant_conv: bool = True  # 1x1 quant_conv z_channels -> codebook_dim and post_quant_conv back
    codebook_size: int = 16384
    codebook_dim: int = 8
    l2_norm: bool = True  # LlamaGen: l2-normalised codes and latents (cosine lookup)
    codebook_used_size: int = 65536  # LlamaGen's rolling buffer of recent ids (part of its state_dict); 0 = none
    beta: float = 0.25
    entropy_loss_ratio: float = 0.0
    norm_groups: int = 32
    dropout: float = 0.0
    pixel_range: str = "symmetric"  # model-space pixels: "symmetric" [-1, 1] | "unit" [0, 1] (MAGE)

    def __post_init__(self) -> None:
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        checks = [
            (self.layout in ("taming", "llamagen"), f"layout must be 'taming' or 'llamagen', not {self.layout!r}"),
            (
                self.downsample in ("conv", "avgpool"),
                f"downsample must be 'conv' or 'avgpool', not {self.downsample!r}",
            ),
            (self.pixel_range in ("symmetric", "unit"), "pixel_range must be 'symmetric' or 'unit'"),
            (self.encoder_out_kernel in (1, 3), "encoder_out_kernel must be 1 or 3"),
            (len(self.ch_mult) >= 1 and self.num_res_blocks >= 1, "need at least one level and one res block"),
            (self.codebook_size >= 2 and self.codebook_dim >= 1, "codebook needs >= 2 entries of dim >= 1"),
            (self.quant_conv or self.codebook_dim == self.z_channels, "without quant_conv codebook_dim == z_channels"),
            (
                self.image_size % self.downsample_factor == 0,
                f"image_size must be a multiple of {self.downsample_factor}",
            ),
        ]
        widths = {self.ch * m for m in self.ch_mult} | {self.ch}
        checks.append(
            (all(w % self.norm_groups == 0 for w in widths), f"channel widths must divide by {self.norm_groups}")
        )
        for ok, msg in checks:
            if not ok:
                raise DigitError(f"bad VQ config: {msg}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid_size(self) -> tuple[int, int]:
        g = self.image_size // self.downsample_factor
        return (g, g)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VQConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise DigitError(f"unknown VQ config fields: {', '.join(sorted(unknown))}")
        return cls(**d)


PRESETS: dict[str, VQConfig] = {
    # taming-transformers configs/imagenet_vqgan.yaml (VQGAN f16, 1024 codes)
    "taming-f16": VQConfig(
        family="taming", layout="taming", codebook_size=1024, codebook_dim=256, l2_norm=False,
        codebook_used_size=0,
    ),
    # MAGE config/vqgan.yaml + its port of the JAX MaskGIT VQGAN (DiGIT reference section 4)
    "mage": VQConfig(
        family="mage", layout="taming", decoder_extra_blocks=0, attention=False, conv_bias=False,
        shortcut_on_residual=True, downsample="avgpool", encoder_out_kernel=1, quant_conv=False,
        codebook_size=1024, codebook_dim=256, l2_norm=False, codebook_used_size=0, pixel_range="unit",
    ),
    # LlamaGen tokenizer/tokenizer_image/vq_model.py VQ_16
    "llamagen-vq16": VQConfig(family="llamagen", layout="llamagen"),
    # CPU-sized: 32x32 images -> 8x8 tokens, LlamaGen-style quantizer
    "tiny": VQConfig(
        family="tiny", layout="llamagen", image_size=32, ch=16, ch_mult=(1, 2, 4), num_res_blocks=1, z_channels=32,
        codebook_size=256, codebook_dim=8, codebook_used_size=4096, norm_groups=8,
    ),
}  # fmt: skip


def build_vq_config(preset: str, **overrides: Any) -> VQConfig:
    if preset not in PRESETS:
        raise DigitError(f"unknown VQ preset {preset!r} (choose from {', '.join(PRESETS)})")
    return replace(PRESETS[preset], **overrides)


class QuantizeOutput(NamedTuple):
    z_q: torch.Tensor  # [B, D, h, w] straight-through codes (gradients flow to the encoder)
    ids: torch.Tensor  # [B, h, w] long
    codebook_loss: torch.Tensor  # ||sg[z] - e||^2 (moves the codes)
    commit_loss: torch.Tensor  # beta * ||z - sg[e]||^2 (moves the encoder)
    entropy_loss: torch.Tensor  # entropy_loss_ratio * (sample entropy - batch entropy), 0 when off or not training


def entropy_loss(affinity: torch.Tensor, temperature: float = 0.01) -> torch.Tensor:
    """Per-sample entropy minus batch-average entropy of softmax(affinity / T) (MaskGIT/LlamaGen code-usage loss)."""
    flat = affinity.reshape(-1, affinity.shape[-1]).float() / temperature
    probs = flat.softmax(-1)
    log_probs = F.log_softmax(flat + 1e-5, dim=-1)
    avg_probs = probs.mean(0)
    avg_entropy = -(avg_probs * torch.log(avg_probs + 1e-5)).sum()
    sample_entropy = -(probs * log_probs).sum(-1).mean()
    return sample_entropy - avg_entropy


class VectorQuantizer(nn.Module):
    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        self.n_e, self.e_dim = cfg.codebook_size, cfg.codebook_dim
        self.beta, self.l2_norm, self.entropy_ratio = cfg.beta, cfg.l2_norm, cfg.entropy_loss_ratio
        self.embedding = nn.Embedding(self.n_e, self.e_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / self.n_e, 1.0 / self.n_e)
        if self.l2_norm:
            with torch.no_grad():
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        if cfg.codebook_used_size:
            # LlamaGen keeps a float buffer of the most recent ids; it is in their state_dict, so strict loading needs it
            self.register_buffer("codebook_used", torch.zeros(cfg.codebook_used_size))

    def codebook(self) -> torch.Tensor:
        """[K, D] the vectors codes are looked up in (l2-normalised for LlamaGen)."""
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.l2_norm else w

    def distances(self, z_flat: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        """Squared L2 distances [N, K] = ||z||^2 + ||e||^2 - 2 z.e (on unit vectors: 2 - 2 cos)."""
        return (z_flat**2).sum(1, keepdim=True) + (codebook**2).sum(1) - 2.0 * z_flat @ codebook.t()

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [...] -> code vectors [..., D]."""
        return F.embedding(ids, self.codebook())

    def forward(self, z: torch.Tensor) -> QuantizeOutput:
        b, d, h, w = z.shape
        z = z.permute(0, 2, 3, 1).contiguous()  # (B, h, w, D)
        codebook = self.codebook()
        if self.l2_norm:
            z = F.normalize(z, dim=-1)
        z_flat = z.reshape(-1, d)
        dist = self.distances(z_flat.float(), codebook.float())  # (B*h*w, K)
        ids = dist.argmin(1)
        z_q = codebook[ids].view_as(z)
        if self.training and hasattr(self, "codebook_used"):
            with torch.no_grad():
                n = min(ids.numel(), self.codebook_used.numel())
                self.codebook_used.copy_(torch.cat([self.codebook_used[n:], ids[-n:].to(self.codebook_used.dtype)]))
        codebook_loss = torch.mean((z_q - z.detach()) ** 2)
        commit_loss = self.beta * torch.mean((z_q.detach() - z) ** 2)
        if self.entropy_ratio > 0 and self.training:  # eval / encode: skip its [N, K] softmaxes (GiBs at K = 16384)
            ent = self.entropy_ratio * entropy_loss(-dist)
        else:
            ent = z.new_zeros(())
        z_q = z + (z_q - z).detach()  # straight-through estimator
        return QuantizeOutput(z_q.permute(0, 3, 1, 2).contiguous(), ids.view(b, h, w), codebook_loss, commit_loss, ent)


class VQModel(nn.Module):
    """VQGAN encoder / quantizer / decoder; also the ``vq`` tokenizer (protocol: normalize / encode / embed / decode)."""

    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg)
        if cfg.quant_conv:
            self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_dim, 1)
            self.post_quant_conv = nn.Conv2d(cfg.codebook_dim, cfg.z_channels, 1)

    # ------------------------------------------------------------------ tokenizer protocol attributes
    @property
    def vocab_size(self) -> int:
        return self.cfg.codebook_size

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.cfg.grid_size

    @property
    def image_size(self) -> int:
        return self.cfg.image_size

    @property
    def device(self) -> torch.device:
        return self.quantize.embedding.weight.device

    # ------------------------------------------------------------------ model-space forward (training)
    def quantize_latents(self, x: torch.Tensor) -> QuantizeOutput:
        """Model-space images [B, 3, S, S] -> quantizer output on the (projected) latents."""
        h = self.encoder(x)
        if self.cfg.quant_conv:
            h = self.quant_conv(h)
        return self.quantize(h)

    def decode_latents(self, z_q: torch.Tensor) -> torch.Tensor:
        """Codes [B, D, h, w] -> model-space images [B, 3, S, S]."""
        if self.cfg.quant_conv:
            z_q = self.post_quant_conv(z_q)
        return self.decoder(z_q)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, QuantizeOutput]:
        q = self.quantize_latents(x)
        return self.decode_latents(q.z_q), q

    # ------------------------------------------------------------------ pixels <-> model space
    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        x = to_unit_float(images, self.device)
        return x if self.cfg.pixel_range == "unit" else x * 2.0 - 1.0

    def to_unit(self, x: torch.Tensor) -> torch.Tensor:
        """Model-space images -> float32 [0, 1] (clamped)."""
        x = x.float()
        if self.cfg.pixel_range == "symmetric":
            x = (x + 1.0) / 2.0
        return x.clamp(0.0, 1.0)

    # ------------------------------------------------------------------ tokenizer protocol
    @torch.no_grad()
    def encode_normalized(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.quantize.embedding.weight.dtype
        return self.quantize_latents(x.to(self.device, dtype)).ids

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode_normalized(self.normalize(images))

    @torch.no_grad()
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.quantize.lookup(ids.to(self.device).long()).float()

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(self.device).long()
        if ids.ndim != 3 or tuple(ids.shape[1:]) != self.grid_size:
            raise DigitError(
                f"VQ decode expects ids [B, {self.grid_size[0]}, {self.grid_size[1]}], got {list(ids.shape)}"
            )
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise DigitError(f"VQ ids outside [0, {self.vocab_size})")
        z_q = self.quantize.lookup(ids).permute(0, 3, 1, 2)  # (B, D, h, w)
        return self.to_unit(self.decode_latents(z_q))

    # ------------------------------------------------------------------ directory format
    def codebook_fingerprint(self) -> str:
        """sha256 (16 hex) of the codebook: tells two trainings of the same architecture apart."""
        w = self.quantize.embedding.weight.detach().float().cpu().contiguous()
        return hashlib.sha256(w.numpy().tobytes()).hexdigest()[:16]

    def config(self) -> dict[str, Any]:
        return {
            "type": TOKENIZER_TYPE,
            "format_version": FORMAT_VERSION,
            "family": self.cfg.family,
            "vocab_size": self.vocab_size,
            "grid": list(self.grid_size),
            "image_size": self.image_size,
            "codebook_fingerprint": self.codebook_fingerprint(),
            "model": self.cfg.to_dict(),
        }

    def save(self, directory: str | os.PathLike) -> None:
        """Write ``tokenizer.json`` + ``model.safetensors`` into ``directory`` (each file atomically)."""
        from digit.utils.io import atomic_save_safetensors, atomic_write_json

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors(directory / "model.safetensors", self.state_dict())
        atomic_write_json(directory / "tokenizer.json", self.config())

    @classmethod
    def load(cls, directory: str | os.PathLike, device: torch.device | str | None = None) -> VQModel:
        from digit.utils.artifacts import config_from_dict, load_safetensors

        directory = Path(directory)
        meta_path, weights = directory / "tokenizer.json", directory / "model.safetensors"
        meta = read_vq_config(directory)
        if not weights.is_file():
            raise DigitError(f"{directory}: model.safetensors is missing")
        model = cls(config_from_dict(VQConfig, meta["model"], meta_path, "model"))
        state = load_safetensors(weights)
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shape mismatches
            raise DigitError(f"{weights}: weights do not fit the config ({str(e).splitlines()[-1].strip()})") from e
        if missing or unexpected:
            raise DigitError(
                f"{weights}: weights do not fit the config (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
            )
        want = meta.get("codebook_fingerprint")
        if want is not None and model.codebook_fingerprint() != want:
            raise DigitError(f"{weights}: its codebook does not match {meta_path} (codebook fingerprint differs)")
        model.eval()
        return model.to(device) if device is not None else model

    @classmethod
    def from_preset(cls, preset: str, **overrides: Any) -> VQModel:
        return cls(build_vq_config(preset, **overrides))


def read_vq_config(directory: str | os.PathLike) -> dict[str, Any]:
    """A VQ tokenizer directory's validated ``tokenizer.json`` (no weights loaded)."""
    from digit.utils.artifacts import GRID, OBJECT, POSITIVE_INT, STR, check_schema, config_from_dict, read_json_object

    directory = Path(directory)
    meta_path = directory / "tokenizer.json"
    if not meta_path.is_file():
        raise DigitError(f"{directory} is not a tokenizer directory (no tokenizer.json)")
    meta = read_json_object(meta_path, {"type": STR})
    if meta["type"] != TOKENIZER_TYPE:
        raise DigitError(f"{directory} holds a {meta['type']!r} tokenizer, not a VQ tokenizer")
    check_schema(
        meta, {"model": OBJECT, "vocab_size": POSITIVE_INT, "grid": GRID, "codebook_fingerprint?": STR}, meta_path
    )
    cfg = config_from_dict(VQConfig, meta["model"], meta_path, "model")
    if cfg.codebook_size != meta["vocab_size"] or list(cfg.grid_size) != list(meta["grid"]):
        raise DigitError(
            f"{meta_path}: vocab_size {meta['vocab_size']} / grid {meta['grid']} disagree with its model section "
            f"({cfg.codebook_size} codes, grid {list(cfg.grid_size)})"
        )
    return meta


# Names the tokenizer registry may use.
VQTokenizer = VQModel


def load_vq_tokenizer(directory: str | os.PathLike, device: torch.device | str | None = None) -> VQModel:
    return VQModel.load(directory, device=device)


load_vq = load_vq_tokenizer
