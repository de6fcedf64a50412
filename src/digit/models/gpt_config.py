"""The image GPT's configuration: one dataclass whose fields choose the layout (LlamaGen's Llama or DiGIT's fairseq,
`ARCHS`), the condition and the sizes; it validates itself and derives the sequence lengths the model needs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from digit.errors import DigitError
from digit.models.conditions import CONDITIONS
from digit.models.layers import swiglu_hidden

CONDS = CONDITIONS
FAIRSEQ_POS_OFFSET = 2  # fairseq LearnedPositionalEmbedding: padding_idx 1, first real position is row 2
# The two released layouts as behaviour switches (`digit train --arch`, `build_config(arch=...)`); DiGIT's stage 2 is
# the fairseq layout with norm_first=True.
ARCHS: dict[str, dict[str, Any]] = {
    "llama": {"norm": "rms", "mlp": "swiglu", "positions": "rope2d", "norm_first": True, "bias": False,
              "scale_embeddings": False, "init": "llamagen"},
    "fairseq": {"norm": "layer", "mlp": "gelu", "positions": "learned", "norm_first": False, "bias": True,
                "scale_embeddings": True, "init": "fairseq"},
}  # fmt: skip
_CHOICES = {"norm": ("rms", "layer"), "mlp": ("swiglu", "gelu"), "positions": ("rope2d", "learned"),
            "init": ("llamagen", "fairseq")}  # fmt: skip


@dataclass(kw_only=True)
class GPTConfig:
    """Everything needed to rebuild a GPT; saved as ``config.json["model"]``."""

    vocab_size: int  # image-token vocabulary (output head rows)
    grid: tuple[int, int]  # (h, w) token grid, raster order
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    ffn_dim: int | None = None  # None: swiglu int(8d/3) rounded up to multiple_of; gelu 4d
    multiple_of: int = 256
    norm_eps: float = 1e-5
    # ---- behaviour switches (defaults: LlamaGen; ARCHS["fairseq"] gives DiGIT's fairseq decoder)
    norm: str = "rms"  # "rms" (RMSNorm, no bias) | "layer" (LayerNorm)
    mlp: str = "swiglu"  # "swiglu" (gate/up/down) | "gelu" (up/down, exact GELU)
    positions: str = "rope2d"  # "rope2d" (LlamaGen 2D RoPE, zero at the condition) | "learned" (fairseq tables)
    norm_first: bool = True  # pre-norm with a final norm; False: post-norm, no final norm (DiGIT stage 1)
    bias: bool = False  # biases on the attention and MLP projections (fairseq)
    scale_embeddings: bool = False  # multiply embeddings by sqrt(dim) (fairseq)
    init: str = "llamagen"  # "llamagen" (N(0, 0.02), zero head) | "fairseq" (xavier, N(0, dim^-0.5))
    rope_base: float = 10000.0  # rope2d only
    max_positions: int | None = None  # learned only: table rows = max_positions + 2; None = just enough
    bos_id: int | None = None  # start token = this vocabulary row (fairseq's </s> = 2) instead of a learned vector
    cond: str = "none"  # "none" | "class" | "prefix" | "text"
    num_classes: int = 0
    class_dropout: float = 0.1  # label -> null class (caption -> null caption) with this probability in training (CFG)
    caption_len: int = 120  # text: caption positions (LlamaGen cls_token_num for t2i)
    caption_dim: int = 2048  # text: caption feature size (FLAN-T5-XL's 2048)
    prefix_vocab_size: int = 0
    prefix_grid: tuple[int, int] | None = None
    causal: bool = True  # False: MaskGIT-style bidirectional model with a mask token
    embed_dropout: float = 0.0  # on [cond; tokens] embeddings (LlamaGen token_dropout, fairseq dropout)
    resid_dropout: float = 0.0  # on the attention branch output
    ffn_dropout: float = 0.0  # on the MLP branch output
    attn_dropout: float = 0.0  # on attention probabilities

    def __post_init__(self) -> None:
        self.grid = tuple(int(g) for g in self.grid)
        if self.prefix_grid is not None:
            self.prefix_grid = tuple(int(g) for g in self.prefix_grid)
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise DigitError(f"unknown {name} {getattr(self, name)!r} (choose from {', '.join(choices)})")
        if self.cond not in CONDS:
            raise DigitError(f"unknown condition {self.cond!r} (choose from {', '.join(CONDS)})")
        if len(self.grid) != 2 or min(self.grid) < 1:
            raise DigitError(f"grid must be two positive sizes, got {self.grid}")
        if self.vocab_size < 2:
            raise DigitError(f"vocab_size must be >= 2, got {self.vocab_size}")
        if self.dim % self.n_heads:
            raise DigitError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.positions == "rope2d" and self.head_dim % 2:
            raise DigitError(f"2D RoPE needs an even head_dim, got {self.head_dim}")
        if self.cond == "class" and self.num_classes < 1:
            raise DigitError("a class-conditional model needs num_classes >= 1")
        if self.cond == "prefix" and (self.prefix_vocab_size < 1 or not self.prefix_grid or min(self.prefix_grid) < 1):
            raise DigitError("a prefix-conditioned model needs prefix_vocab_size and prefix_grid")
        if self.cond == "text" and (self.caption_len < 1 or self.caption_dim < 1):
            raise DigitError(
                f"a text model needs caption_len, caption_dim >= 1, got {self.caption_len}, {self.caption_dim}"
            )
        if self.cond == "text" and not self.causal:
            raise DigitError("text conditioning is implemented for autoregressive (causal) models only")
        if self.bos_id is not None and not 0 <= self.bos_id < self.vocab_size:
            raise DigitError(f"bos_id {self.bos_id} outside the vocabulary [0, {self.vocab_size})")
        if not 0.0 <= self.class_dropout < 1.0:
            raise DigitError(f"class_dropout must be in [0, 1), got {self.class_dropout}")
        need = max(self.main_positions, self.prefix_len)
        if self.positions == "learned" and self.max_positions is not None and self.max_positions < need:
            raise DigitError(f"max_positions {self.max_positions} < the {need} positions the model needs")

    # ---- derived sizes
    @property
    def arch(self) -> str:
        """The released layout these switches reproduce ("llama" | "fairseq"), or "custom" (for messages)."""
        for name, switches in ARCHS.items():
            if all(getattr(self, k) == v for k, v in switches.items() if k != "norm_first" or name == "llama"):
                return name
        return "custom"

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def seq_len(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def prefix_len(self) -> int:
        return self.prefix_grid[0] * self.prefix_grid[1] if self.cond == "prefix" else 0

    @property
    def cond_len(self) -> int:
        if self.cond == "text":
            return self.caption_len  # no start token: the last caption position predicts the first image token
        return self.prefix_len + 1  # prefix tokens (if any) then one start / class position

    @property
    def n_positions(self) -> int:
        return self.cond_len + self.seq_len  # covers both the causal and the NAR layout

    @property
    def main_positions(self) -> int:
        # start / class token (or the caption) then the image tokens (fairseq table without the prefix)
        return self.cond_len - self.prefix_len + self.seq_len

    @property
    def hidden_dim(self) -> int:
        if self.ffn_dim:
            return self.ffn_dim
        return swiglu_hidden(self.dim, self.multiple_of) if self.mlp == "swiglu" else 4 * self.dim

    @property
    def position_rows(self) -> int:
        return (self.max_positions or self.main_positions) + FAIRSEQ_POS_OFFSET

    @property
    def prefix_position_rows(self) -> int:
        """Rows of the prefix's own table (fairseq's ``embed_positions_1``): as many as the first when max_positions
        is set."""
        return (self.max_positions or self.prefix_len) + FAIRSEQ_POS_OFFSET

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["grid"] = list(self.grid)
        d["prefix_grid"] = list(self.prefix_grid) if self.prefix_grid else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        """From ``to_dict()`` output; configs written before the behaviour switches (with ``arch``) are upgraded."""
        if "arch" in d:
            from digit.convert.keys import upgrade_config

            d = upgrade_config(d)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise DigitError(f"unknown GPT config keys: {', '.join(unknown)}")
        return cls(**d)
