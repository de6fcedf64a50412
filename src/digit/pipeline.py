"""From a class label or a prompt to pixels: stage 1 (GPT) -> stage 2 (prefix-conditioned AR or MaskGIT decoder)
-> VQ decode.

Two paths share this module (``digit generate`` and ``benchmarks/generate.py``):

- DiGIT: stage 1 samples discriminative tokens; a decoder GPT conditioned on them as a prefix predicts VQ tokens
  (autoregressively with the KV cache, or MaskGIT-style when ``causal=False``); the VQGAN renders them.
- LlamaGen (no decoder): stage 1's tokens are VQ tokens and are decoded directly.

:func:`check_pipeline` (`digit.pairing`) compares the recorded configurations of the three pieces and refuses
mismatches (with a one-line reason) before any weights are loaded or any sampling starts.

The Python API (``from digit import Pipeline``) is the same object: ``Pipeline.from_pretrained(folder or hub id)``,
``pipe(classes=[...], num_images=..., seed=..., **sampling)`` -> PIL images (``pipe(prompts=[...])`` for a
text-conditional stage 1, with its text encoder: `digit.prompts`), ``save_pretrained`` / ``push_to_hub`` (`digit.hub`:
folder layout, model card; `digit.hub_remote`: the Hugging Face Hub). Running it over many images is `digit.generation`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from digit.errors import DigitError
from digit.generation import GenerationResult, decoder_defaults, generate_images, merge_results  # noqa: F401
from digit.pairing import _read_run_config, check_pipeline  # noqa: F401 (check_pipeline: public here too)
from digit.sampling.params import SamplingParams
from digit.utils.images import image_grid, save_png, to_uint8  # noqa: F401 (public here too, as before)

# ----------------------------------------------------------------------------------------------- the pipeline


@dataclass
class PipelineOutput:
    """What ``pipe(..., return_tokens=True)`` returns: the images and what made them."""

    images: list[Any]  # PIL.Image.Image, RGB, image_size x image_size
    labels: np.ndarray  # int64 [N], -1 unconditional
    tokens: np.ndarray  # stage-1 tokens [N, h, w] (discriminative for DiGIT, VQ for LlamaGen)
    parameters: dict[str, Any] = field(default_factory=dict)  # seed, sampling parameters of each stage
    prompts: list[str] | None = None  # image i's caption (text-conditional pipelines)


@dataclass
class Pipeline:
    """Stage 1 -> (stage-2 decoder) -> VQ decoder. Build it with `Pipeline.from_pretrained` (a model folder or a
    Hugging Face repository) or `load_pipeline` (three run directories); call it to sample images."""

    stage1: Any  # GPT
    stage1_config: dict[str, Any]
    vq: Any  # VQModel
    decoder: Any | None = None
    decoder_config: dict[str, Any] | None = None
    kind: str = "llamagen"
    decoder_special_rows: torch.Tensor | None = None  # fairseq special-symbol head rows of a converted DiGIT decoder
    info: dict[str, Any] = field(default_factory=dict)  # model-card material: figures, provenance, licence
    source: Path | None = None  # the folder it was loaded from (its discriminative tokenizer travels on save)
    text_encoder: Any | None = None  # a digit.data.text_features.TextEncoder (text-conditional stage 1)
    text_encoder_dir: Path | None = None  # where it was loaded from (recorded by save_pretrained)

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        *,
        device: Any = "cpu",
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
        text_encoder: str | os.PathLike | None = None,
        download_text_encoder: bool = False,
    ) -> Pipeline:
        """Load a model folder (``save_pretrained``'s or ``digit recipe ship``'s), ``"cifar10"`` (the reference models
        shipped inside the package), or a Hugging Face repository id (downloaded through ``huggingface_hub``; offline,
        only its cached copy). A local folder of that name wins over a repository id. A text-conditional model needs
        its text encoder: ``text_encoder=DIR`` (or a Hugging Face id of a T5, from the local hub cache; downloaded
        only with ``download_text_encoder=True``), else the folder's ``text_encoder/``, else the directory recorded by
        ``save_pretrained`` (checked against the encoder the run was trained with)."""
        from digit.hub import load_pretrained

        return load_pretrained(
            path_or_repo_id,
            device=device,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            local_files_only=local_files_only,
            text_encoder=text_encoder,
            download_text_encoder=download_text_encoder,
        )

    @classmethod
    def from_runs(
        cls,
        stage1: str | os.PathLike,
        vq: str | os.PathLike,
        decoder: str | os.PathLike | None = None,
        *,
        device: Any = "cpu",
        text_encoder: str | os.PathLike | None = None,
        download_text_encoder: bool = False,
    ) -> Pipeline:
        """The pieces as separate directories (``digit generate --stage1 --vq [--decoder] [--text-encoder]``)."""
        return load_pipeline(
            stage1, vq, decoder, device=device, text_encoder=text_encoder, download_text_encoder=download_text_encoder
        )

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        overwrite: bool = False,
        license: str | None = None,
        text_encoder: str = "auto",
    ) -> Path:
        """Write a folder `from_pretrained` loads: configs, safetensors weights, ``pipeline.json`` and a model card
        (``README.md`` with hub metadata). Atomic; refuses a non-empty folder it did not write unless ``overwrite``.
        ``text_encoder`` (a text pipeline): ``"auto"`` copies an encoder directory of at most 100 MB into the folder,
        ``"copy"`` always, ``"reference"`` never (the folder records where it was)."""
        from digit.hub import save_pretrained

        return save_pretrained(self, save_directory, overwrite=overwrite, license=license, text_encoder=text_encoder)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        commit_message: str = "Upload digit pipeline",
        create_pr: bool = False,
        license: str | None = None,
    ) -> Any:
        """``save_pretrained`` into a temporary folder, then ``HfApi.create_repo`` + ``upload_folder``. -> CommitInfo."""
        from digit.hub_remote import push_to_hub

        return push_to_hub(
            self,
            repo_id,
            private=private,
            token=token,
            revision=revision,
            commit_message=commit_message,
            create_pr=create_pr,
            license=license,
        )

    def __call__(
        self,
        classes: int | str | list[int | str] | None = None,
        num_images: int | None = None,
        *,
        prompts: str | Sequence[str] | None = None,
        seed: int = 0,
        sampling: SamplingParams | dict[str, Any] | None = None,
        decoder_sampling: SamplingParams | dict[str, Any] | None = None,
        decoder_official: bool = False,
        batch_size: int = 16,
        return_tokens: bool = False,
        progress: bool = False,
        **sampling_kwargs: Any,
    ) -> list[Any] | PipelineOutput:
        """Sample images: ``classes`` (indices or names; one image each, or cycled to ``num_images``), or
        ``num_images`` alone (class-balanced, or unconditional); a text-conditional pipeline takes ``prompts`` instead
        (one image each, or round-robin over ``num_images``; guidance is on the null caption). Stage-1 sampling
        parameters come as keyword arguments (``cfg_scale=2.0, top_k=100``) and/or ``sampling`` (a `SamplingParams`
        or dict), validated by SamplingParams;
        ``decoder_sampling`` for the stage-2 decoder (default top-p 0.8 for an AR decoder); ``decoder_official``:
        fairseq's sampling rules for a decoder converted from DiGIT (``--official-sampling``). Image ``i`` has its own
        generator seeded from (seed, i): the same call gives the same pixels as ``digit generate --seed``.
        -> a list of RGB PIL images, or with ``return_tokens=True`` a `PipelineOutput` (images, labels, tokens,
        prompts)."""
        from PIL import Image

        if not _is_int(seed):
            raise DigitError(f"seed must be an integer, got {seed!r}")
        if not _is_int(batch_size) or batch_size < 1:
            raise DigitError(f"batch_size must be a positive integer, got {batch_size!r}")
        captions = self.prompts_for(prompts, num_images, classes)
        labels = np.full(len(captions), -1, np.int64) if captions is not None else self.labels_for(classes, num_images)
        stage1 = _sampling_params(sampling, sampling_kwargs, SamplingParams(), "sampling")
        if decoder_sampling is not None and self.decoder is None:
            raise DigitError("decoder_sampling given but this pipeline has no stage-2 decoder")
        decoder = _sampling_params(decoder_sampling, {}, decoder_defaults(self.kind), "decoder_sampling")
        if decoder_official and (self.kind != "digit-ar" or self.decoder_special_rows is None):
            raise DigitError(
                "decoder_official=True needs an AR decoder converted from DiGIT (official_head.safetensors)"
            )
        if decoder.decode == "jacobi" and (self.kind != "digit-ar" or decoder_official):
            raise DigitError("decoder_sampling decode='jacobi' needs an AR decoder with the standard filters")
        res = generate_images(
            self,
            labels,
            stage1,
            decoder,
            prompts=captions,
            decoder_official=bool(decoder_official),
            batch_size=batch_size,
            seed=seed,
            progress=progress,
        )
        images = [Image.fromarray(a) for a in res.images]  # uint8 [H, W, 3] -> RGB
        if not return_tokens:
            return images
        used = {
            "seed": seed,
            "stage1": stage1.to_dict(),
            "decoder": decoder.to_dict() if self.decoder else None,
            "decoder_official": bool(decoder_official),
        }
        return PipelineOutput(images, res.labels, res.tokens, used, captions)

    def prompts_for(self, prompts: Any = None, num_images: int | None = None, classes: Any = None) -> list[str] | None:
        """Image ``i``'s caption for a text-conditional pipeline (None for the others, which refuse ``prompts``)."""
        from digit.prompts import check_prompt, spread_prompts

        if not self.is_text:
            if prompts is not None:
                raise DigitError(
                    f"prompts given but this pipeline's stage 1 is {self.stage1.config.cond!r}-conditioned"
                )
            return None
        if classes is not None:
            raise DigitError("classes given but this pipeline is text-conditional: pass prompts=[...]")
        if prompts is None:
            raise DigitError("this pipeline is text-conditional: pass prompts=[...] (one image each, or num_images)")
        prompts = (
            [prompts] if isinstance(prompts, str) else list(prompts) if isinstance(prompts, (list, tuple)) else prompts
        )
        if not isinstance(prompts, list) or not prompts:
            raise DigitError("prompts must be a string or a non-empty list of strings")
        return spread_prompts([check_prompt(p, "a prompt") for p in prompts], num_images, "num_images")

    def encode_prompts(self, prompts: Sequence[str]) -> Any:
        """Captions -> the `Caption` stage 1 reads (the pipeline's text encoder, LlamaGen's left-padded layout)."""
        from digit.prompts import describe_encoder, encode_prompts, recorded_encoder

        if self.text_encoder is None:
            raise DigitError(
                "this pipeline is text-conditional and has no text encoder: load it with text_encoder=DIR "
                f"({describe_encoder(recorded_encoder(self.stage1_config))})"
            )
        return encode_prompts(self.text_encoder, prompts, self.stage1.config)

    @property
    def is_text(self) -> bool:
        return self.stage1.config.cond == "text"

    def labels_for(self, classes: Any = None, num_images: int | None = None) -> np.ndarray:
        """The label of each image `__call__` would sample (the API's names for `resolve_labels`' rules)."""
        if num_images is not None and (not _is_int(num_images) or num_images < 1):
            raise DigitError(f"num_images must be a positive integer, got {num_images!r}")
        if isinstance(classes, (str, int, np.integer)):
            classes = [classes]
        if classes is not None:
            classes = list(classes)
            if not classes:
                raise DigitError("classes is empty")
        return _labels(self, num_images, classes, ("num_images", "classes"))

    @property
    def image_size(self) -> int:
        return int(self.vq.image_size)

    @property
    def device(self) -> torch.device:
        return next(self.stage1.parameters()).device

    @property
    def num_classes(self) -> int:
        m = self.stage1.config
        return int(m.num_classes) if m.cond == "class" else 0

    @property
    def class_names(self) -> list[str]:
        return list(((self.stage1_config.get("data") or {}).get("meta") or {}).get("class_names") or [])


def load_pipeline(
    stage1: str | os.PathLike,
    vq: str | os.PathLike,
    decoder: str | os.PathLike | None = None,
    device: Any = "cpu",
    text_encoder: str | os.PathLike | None = None,
    text_encoder_flag: str = "--text-encoder",
    download_text_encoder: bool = False,
) -> Pipeline:
    """Check the three pieces from their configs, then load them (models in eval mode). ``text_encoder``: the text
    encoder of a text-conditional stage 1 (a directory, or a hub id `resolve_text_encoder` finds in the cache or, with
    ``download_text_encoder``, downloads), checked against the one its run recorded (refused for other models;
    without it, prompts are refused when sampled)."""
    from digit.models import load_gpt_run
    from digit.tokenizers.vq import VQModel, read_vq_config

    s1_dir, vq_dir = Path(stage1), Path(vq)
    s1_cfg = _read_run_config(s1_dir)
    vq_cfg = read_vq_config(vq_dir)
    dec_cfg = _read_run_config(Path(decoder)) if decoder is not None else None
    kind = check_pipeline(s1_cfg, vq_cfg, dec_cfg)
    if text_encoder is not None and s1_cfg["model"].get("cond") != "text":
        raise DigitError(
            f"{text_encoder_flag} given but stage 1 is {s1_cfg['model'].get('cond')!r}-conditioned, not text"
        )
    s1_model, s1_cfg = load_gpt_run(s1_dir, device=device)
    vq_model = VQModel.load(vq_dir, device=device)  # also checks the codebook against tokenizer.json
    dec_model = None
    special = None
    if decoder is not None:
        dec_model, dec_cfg = load_gpt_run(decoder, device=device)
        if (Path(decoder) / "official_head.safetensors").is_file():
            from digit.sampling.official import load_special_rows

            special = load_special_rows(decoder).to(device)
    pipe = Pipeline(s1_model, s1_cfg, vq_model, dec_model, dec_cfg, kind, special)
    if text_encoder is not None:
        from digit.data.text_features import resolve_text_encoder
        from digit.prompts import load_prompt_encoder

        # the CLI resolves --text-encoder first (a directory passes through), so a hub miss here is an API caller's
        directory = resolve_text_encoder(
            text_encoder, download_text_encoder, flag=text_encoder_flag, download_flag="download_text_encoder=True"
        )
        pipe.text_encoder = load_prompt_encoder(directory, s1_model.config, s1_cfg, text_encoder_flag)
        pipe.text_encoder_dir = directory
    return pipe


def resolve_labels(pipe: Pipeline, n: int | None, classes: list[str] | None) -> np.ndarray:
    """Labels from -n N and/or --classes C ... (indices or names): -n alone cycles over every class (class-balanced),
    -n with --classes cycles over the listed ones, --classes alone gives one image per listed class."""
    return _labels(pipe, n, classes, ("-n", "--classes"))


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _labels(pipe: Pipeline, n: int | None, classes: list[Any] | None, names: tuple[str, str]) -> np.ndarray:
    """`resolve_labels` with the caller's names for n and classes in the messages (CLI flags or API arguments).
    A class is an int index, a decimal string index, or a class name."""
    n_name, classes_name = names
    k = pipe.num_classes
    if n is not None and n < 1:
        raise DigitError(f"{n_name} must be positive, got {n}")
    if classes:
        if not k:
            raise DigitError(f"{classes_name} given but the stage-1 model is unconditional")
        class_names = pipe.class_names
        out = []
        for c in classes:
            if _is_int(c):
                v = int(c)
            elif isinstance(c, str) and c.lstrip("-").isdigit():
                v = int(c)
            elif isinstance(c, str) and c in class_names:
                v = class_names.index(c)
            else:
                known = f"; names: {', '.join(class_names)}" if class_names else ""
                raise DigitError(f"unknown class {c!r} (give an index in [0, {k}) or a class name{known})")
            if not 0 <= v < k:
                raise DigitError(f"class {v} outside [0, {k})")
            out.append(v)
        chosen = np.asarray(out, dtype=np.int64)
        return chosen if n is None else chosen[np.arange(n) % len(chosen)]
    if n is None:
        raise DigitError(f"give {n_name} N or {classes_name} C ...")
    return (np.arange(n) % k).astype(np.int64) if k else np.full(n, -1, dtype=np.int64)


def _sampling_params(
    given: SamplingParams | dict[str, Any] | None, overrides: dict[str, Any], base: SamplingParams, name: str
) -> SamplingParams:
    """``given`` (an object or a dict, over ``base``) with keyword ``overrides``; every value checked by SamplingParams,
    unknown names refused with a DigitError (not the dataclass's TypeError)."""
    if isinstance(given, SamplingParams):
        params = given
    elif isinstance(given, dict):
        params = SamplingParams.from_dict({**base.to_dict(), **given})
    elif given is None:
        params = base
    else:
        raise DigitError(f"{name} must be a SamplingParams or a dict, got {type(given).__name__}")
    if overrides:
        return SamplingParams.from_dict({**params.to_dict(), **overrides})
    return params


# ----------------------------------------------------------------------------------------------- image files
