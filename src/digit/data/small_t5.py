"""The offline text encoder: a tokenizer trained on the captions + a small T5 encoder built from a config, NOT pretrained.

No T5 weights can be downloaded where digit is developed, so `digit text-encoder build` makes the stand-in: a BPE
tokenizer trained (``tokenizers``) on a captioned dataset's captions, and a ``transformers`` T5EncoderModel with
seeded random weights. It is saved in the Hugging Face layout (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, special_tokens_map.json), so ``--text-encoder DIR`` loads it through the same
:class:`digit.data.text_features.T5TextEncoder` path as FLAN-T5. Its features distinguish words and their order,
but carry no language knowledge: a GPT conditioned on them learns the caption grammar from its own data only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from digit.errors import DigitError

NOTE = "a small T5 encoder built from a config with seeded random weights, not pretrained; tokenizer trained on the captions"
SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # T5's ids: pad 0, eos 1, unk 2


@dataclass(frozen=True)
class SmallT5Config:
    vocab_size: int = 1000  # the BPE tokenizer's target; the model's table is the trained vocabulary's size
    d_model: int = 64
    layers: int = 2
    heads: int = 4
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def train_caption_tokenizer(texts: Sequence[str], vocab_size: int):
    """A lower-casing BPE tokenizer (sentencepiece-style word boundaries) over ``texts``; appends ``</s>`` as T5 does."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    tok.train_from_iterator(list(texts), trainer, length=len(texts))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return tok


def build_small_t5(
    texts: Sequence[str], out: str | os.PathLike, cfg: SmallT5Config, source: str = ""
) -> dict[str, Any]:
    """Train the tokenizer on ``texts``, build the seeded T5 encoder, save both into the (staging) folder ``out``."""
    try:
        import torch
        from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel
    except ImportError as e:
        raise DigitError("building the text encoder needs transformers and tokenizers: pip install transformers") from e
    if not texts:
        raise DigitError("no captions to train the tokenizer on")
    if cfg.d_model % cfg.heads:
        raise DigitError(f"--d-model {cfg.d_model} must be a multiple of --heads {cfg.heads}")
    if cfg.vocab_size < len(SPECIAL_TOKENS) + 1:
        raise DigitError(f"--vocab-size {cfg.vocab_size} is too small")
    out = Path(out)
    tok = train_caption_tokenizer(texts, cfg.vocab_size)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )
    fast.save_pretrained(out)
    if [tok.token_to_id(t) for t in SPECIAL_TOKENS] != [0, 1, 2]:
        raise DigitError("tokenizer special tokens did not get T5's ids 0, 1, 2")  # a tokenizers change: never silent
    t5 = T5Config(
        vocab_size=tok.get_vocab_size(), d_model=cfg.d_model, d_kv=cfg.d_model // cfg.heads, d_ff=2 * cfg.d_model,
        num_layers=cfg.layers, num_heads=cfg.heads, feed_forward_proj="gated-gelu", dropout_rate=0.0,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    t5.digit_text_encoder = {"note": NOTE, **cfg.to_dict(), "captions": len(texts), "source": source}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = T5EncoderModel(t5).eval()
    model.save_pretrained(out)
    record = {"note": NOTE, "config": cfg.to_dict(), "vocab": tok.get_vocab_size(), "captions": len(texts)}
    (out / "README.md").write_text(
        "# Offline text encoder (digit text-encoder build)\n\n"
        f"This is {NOTE}.\nIts features tell words and word order apart but hold no language knowledge. "
        "For real prompts, point --text-encoder at a pretrained T5 (LlamaGen uses FLAN-T5-XL).\n\n"
        f"```json\n{json.dumps(record, indent=2)}\n```\n",
        encoding="utf-8",
    )
    return record
