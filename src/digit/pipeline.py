"""From a class label to pixels: stage 1 (GPT) -> stage 2 (prefix-conditioned AR or MaskGIT decoder) -> VQ decode.

Two paths share this module (``digit generate`` and ``benchmarks/generate.py``):

- DiGIT: stage 1 samples discriminative tokens; a decoder GPT conditioned on them as a prefix predicts VQ tokens
  (autoregressively with the KV cache, or MaskGIT-style when ``causal=False``); the VQGAN renders them.
- LlamaGen (no decoder): stage 1's tokens are VQ tokens and are decoded directly.

:func:`check_pipeline` (`digit.pairing`) compares the recorded configurations of the three pieces and refuses
mismatches (with a one-line reason) before any weights are loaded or any sampling starts.

The Python API (``from digit import Pipeline``) is the same object: ``Pipeline.from_pretrained(folder or hub id)``,
``pipe(classes=[...], num_images=..., seed=..., **sampling)`` -> PIL images, ``save_pretrained`` / ``push_to_hub``
(`digit.hub`: folder layout, model card, Hugging Face Hub).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from digit.errors import DigitError
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
    ) -> Pipeline:
        """Load a model folder (``save_pretrained``'s or ``digit recipe ship``'s), ``"cifar10"`` (the reference models
        shipped inside the package), or a Hugging Face repository id (downloaded through ``huggingface_hub``; offline,
        only its cached copy). A local folder of that name wins over a repository id."""
        from digit.hub import load_pretrained

        return load_pretrained(
            path_or_repo_id,
            device=device,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            local_files_only=local_files_only,
        )

    @classmethod
    def from_runs(
        cls,
        stage1: str | os.PathLike,
        vq: str | os.PathLike,
        decoder: str | os.PathLike | None = None,
        *,
        device: Any = "cpu",
    ) -> Pipeline:
        """The pieces as separate directories (``digit generate --stage1 --vq [--decoder]``): `load_pipeline`."""
        return load_pipeline(stage1, vq, decoder, device=device)

    def save_pretrained(
        self, save_directory: str | os.PathLike, *, overwrite: bool = False, license: str | None = None
    ) -> Path:
        """Write a folder `from_pretrained` loads: configs, safetensors weights, ``pipeline.json`` and a model card
        (``README.md`` with hub metadata). Atomic; refuses a non-empty folder it did not write unless ``overwrite``."""
        from digit.hub import save_pretrained

        return save_pretrained(self, save_directory, overwrite=overwrite, license=license)

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
        from digit.hub import push_to_hub

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
        ``num_images`` alone (class-balanced, or unconditional). Stage-1 sampling parameters come as keyword arguments
        (``cfg_scale=2.0, top_k=100``) and/or ``sampling`` (a `SamplingParams` or dict), validated by SamplingParams;
        ``decoder_sampling`` for the stage-2 decoder (default top-p 0.8 for an AR decoder); ``decoder_official``:
        fairseq's sampling rules for a decoder converted from DiGIT (``--official-sampling``). Image ``i`` has its own
        generator seeded from (seed, i): the same call gives the same pixels as ``digit generate --seed``.
        -> a list of RGB PIL images, or with ``return_tokens=True`` a `PipelineOutput` (images, labels, tokens)."""
        from PIL import Image

        if not _is_int(seed):
            raise DigitError(f"seed must be an integer, got {seed!r}")
        if not _is_int(batch_size) or batch_size < 1:
            raise DigitError(f"batch_size must be a positive integer, got {batch_size!r}")
        labels = self.labels_for(classes, num_images)
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
        return PipelineOutput(images, res.labels, res.tokens, used)

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
    stage1: str | os.PathLike, vq: str | os.PathLike, decoder: str | os.PathLike | None = None, device: Any = "cpu"
) -> Pipeline:
    """Check the three pieces from their configs, then load them (models in eval mode)."""
    from digit.models import load_gpt_run
    from digit.tokenizers.vq import VQModel, read_vq_config

    s1_dir, vq_dir = Path(stage1), Path(vq)
    s1_cfg = _read_run_config(s1_dir)
    vq_cfg = read_vq_config(vq_dir)
    dec_cfg = _read_run_config(Path(decoder)) if decoder is not None else None
    kind = check_pipeline(s1_cfg, vq_cfg, dec_cfg)
    s1_model, s1_cfg = load_gpt_run(s1_dir, device=device)
    vq_model = VQModel.load(vq_dir, device=device)  # also checks the codebook against tokenizer.json
    dec_model = None
    special = None
    if decoder is not None:
        dec_model, dec_cfg = load_gpt_run(decoder, device=device)
        if (Path(decoder) / "official_head.safetensors").is_file():
            from digit.sampling.official import load_special_rows

            special = load_special_rows(decoder).to(device)
    return Pipeline(s1_model, s1_cfg, vq_model, dec_model, dec_cfg, kind, special)


def decoder_defaults(kind: str) -> SamplingParams:
    """The stage-2 decoder's sampling defaults: top-p 0.8 for an AR decoder (DiGIT), no filter for MaskGIT."""
    return SamplingParams(top_p=0.8 if kind == "digit-ar" else 1.0)


@dataclass
class GenerationResult:
    images: np.ndarray  # uint8 [N, H, W, 3]
    labels: np.ndarray  # int64 [N], -1 unconditional
    tokens: np.ndarray  # stage-1 tokens [N, h, w]
    seconds: dict[str, float] = field(default_factory=dict)  # per stage: stage1, stage2, vq
    forward_passes: dict[str, int] = field(default_factory=dict)  # model forward passes per stage, all batches
    indices: np.ndarray | None = None  # which images of the run these are (all of them in one process)


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate_images(
    pipe: Pipeline,
    labels: np.ndarray,
    stage1: SamplingParams | None = None,
    decoder: SamplingParams | None = None,
    *,
    decoder_official: bool = False,
    batch_size: int = 16,
    seed: int = 0,
    compile: bool = False,
    progress: bool = False,
    shard: tuple[int, int] = (0, 1),
) -> GenerationResult:
    """Run the whole pipeline over ``labels`` in batches. Image ``i`` draws from its own generator seeded from
    (seed, i) through both stages (`digit.sampling.seeds`), so its pixels do not depend on the batch size.

    ``decoder``: the stage-2 decoder's parameters (default `decoder_defaults`); ``decoder_official``: fairseq's rules
    for a converted DiGIT AR decoder (`digit.sampling.official`: specials banned after normalising, top-p on
    probabilities that are not renormalised; needs the run's official_head.safetensors).
    ``shard=(rank, world_size)``: only the batches ``b`` with ``b % world_size == rank`` (torchrun); the result holds
    those images (``indices``), and `merge_results` of every rank's result is the single-process result."""
    from tqdm import tqdm

    from digit.sampling.generate import check_params, sample
    from digit.sampling.seeds import batch_ranges, image_generators

    s1 = stage1 or SamplingParams()
    dec = decoder or decoder_defaults(pipe.kind)
    check_params(pipe.stage1, s1)
    if pipe.decoder is not None:
        check_params(pipe.decoder, dec)
    if decoder_official and pipe.decoder_special_rows is None:
        raise DigitError("official sampling needs a converted DiGIT decoder (official_head.safetensors)")
    dev = pipe.device
    n = len(labels)
    images, tokens = [], []
    secs = {"stage1": 0.0, "stage2": 0.0, "vq": 0.0}
    passes = {"stage1": 0, "stage2": 0}
    mine = batch_ranges(n, batch_size, *shard)
    bar = tqdm(total=sum(e - s for s, e in mine), desc="generate", unit="img", disable=not progress)
    for start, end in mine:
        lab = labels[start:end]
        g = image_generators(seed, range(start, end), dev)
        cond = torch.as_tensor(lab, device=dev) if pipe.num_classes else None
        t0 = time.perf_counter()
        out = sample(pipe.stage1, cond, len(lab), s1, generator=g, compile=compile)
        ids = out.tokens
        passes["stage1"] += out.forward_passes
        _sync(dev)
        t1 = time.perf_counter()
        vq_ids = ids
        if pipe.decoder is not None:
            prefix = ids.reshape(len(lab), -1)
            if decoder_official:
                from digit.sampling.official import generate_official

                vq_ids = generate_official(
                    pipe.decoder,
                    pipe.decoder_special_rows,
                    cond=prefix,
                    temperature=dec.temperature,
                    top_k=dec.top_k,
                    top_p=dec.top_p,
                    generator=g,
                )
                passes["stage2"] += pipe.decoder.config.seq_len
            else:
                out = sample(pipe.decoder, prefix, None, dec, generator=g, compile=compile)
                vq_ids = out.tokens
                passes["stage2"] += out.forward_passes
        _sync(dev)
        t2 = time.perf_counter()
        images.append(to_uint8(pipe.vq.decode(vq_ids)))
        _sync(dev)
        t3 = time.perf_counter()
        secs["stage1"] += t1 - t0
        secs["stage2"] += t2 - t1
        secs["vq"] += t3 - t2
        tokens.append(ids.cpu().numpy())
        bar.update(len(lab))
    bar.close()
    for m in (pipe.stage1, pipe.decoder):
        if m is not None and hasattr(m, "clear_cache"):
            m.clear_cache()
    indices = np.concatenate([np.arange(s, e) for s, e in mine]) if mine else np.zeros(0, dtype=np.int64)
    if not mine:  # a rank with no batch (more ranks than batches)
        return GenerationResult(
            np.zeros((0, 0, 0, 3), np.uint8), labels[:0], np.zeros((0, 0, 0)), secs, passes, indices
        )
    return GenerationResult(
        np.concatenate(images),
        np.asarray(labels, dtype=np.int64)[indices],
        np.concatenate(tokens),
        secs,
        passes,
        indices,
    )


def merge_results(parts: list[GenerationResult]) -> GenerationResult:
    """Every rank's `generate_images` result -> the whole run's, in image order (seconds: the slowest rank's)."""
    parts = [p for p in parts if len(p.indices)]
    order = np.argsort(np.concatenate([p.indices for p in parts]), kind="stable")
    cat = lambda name: np.concatenate([getattr(p, name) for p in parts])[order]  # noqa: E731
    seconds = {k: max(p.seconds[k] for p in parts) for k in parts[0].seconds}
    passes = {k: sum(p.forward_passes[k] for p in parts) for k in parts[0].forward_passes}
    return GenerationResult(cat("images"), cat("labels"), cat("tokens"), seconds, passes, cat("indices"))


# ----------------------------------------------------------------------------------------------- image files
