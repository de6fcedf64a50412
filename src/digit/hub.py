"""Model folders and the Hugging Face Hub behind `Pipeline.from_pretrained`, `save_pretrained` and `push_to_hub`.

A model folder has the layout `digit recipe ship` writes, so the shipped reference models load unchanged:

- ``stage1/``: the stage-1 GPT run (``config.json`` + ``model.safetensors``);
- ``stage2/``: the stage-2 decoder run (DiGIT; absent for a LlamaGen pipeline), with ``official_head.safetensors``
  when it was converted from DiGIT's release;
- ``vq/``: the VQ tokenizer (``tokenizer.json`` + ``model.safetensors``);
- ``tokenizer/`` (optional): the discriminative tokenizer, to encode images (sampling does not need it);
- ``text_encoder/`` (optional, a text-conditional stage 1): its text encoder directory. `save_pretrained` copies it
  when it is small (``text_encoder="auto"``: at most 100 MB, e.g. the offline T5 `digit text-encoder build` makes)
  and only records it otherwise (a FLAN-T5 directory is gigabytes); ``pipeline.json`` records its identity (name,
  sha256) and the directory it was loaded from, and loading takes ``text_encoder=DIR``, else ``text_encoder/``, else
  that recorded directory, each checked against the identity the stage-1 run was trained with;
- ``pipeline.json`` (`save_pretrained`) or ``models.json`` (`digit recipe ship`): what the model card says (kind,
  classes, licence, figures, provenance);
- ``README.md``: the model card, with the hub's YAML metadata (`digit.model_card`).

`huggingface_hub` is imported only when a repository id is resolved or a card / upload is written; the Hub calls
themselves (download, upload, offline mode) are in `digit.hub_remote`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from digit.errors import DigitError
from digit.hub_remote import download, looks_like_repo_id

if TYPE_CHECKING:
    from digit.pipeline import Pipeline

FORMAT = "digit.pipeline"
FORMAT_VERSION = 1
PIPELINE_FILE = "pipeline.json"
OUTPUT_KIND = "save_pretrained"  # the output marker's kind (`digit.utils.outputs`)
SHIPPED = ("cifar10",)  # names of the reference models inside the package
TEXT_ENCODER_MODES = ("auto", "copy", "reference")
TEXT_ENCODER_COPY_LIMIT = 100 * 2**20  # bytes: the offline T5 is well under a MB, a FLAN-T5 several GB
TOKENIZER_FILES = (".json", ".npy", ".safetensors")


# ----------------------------------------------------------------------------------------------- loading


def load_pretrained(
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
    folder = resolve_folder(
        path_or_repo_id, revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only
    )
    return load_folder(folder, device=device, text_encoder=text_encoder, download_text_encoder=download_text_encoder)


def resolve_folder(
    path_or_repo_id: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> Path:
    """A local folder as it is; ``"cifar10"`` -> the shipped reference models; otherwise a Hugging Face repository id,
    downloaded (or, offline, found in the cache)."""
    if not isinstance(path_or_repo_id, (str, os.PathLike)):
        raise DigitError(f"from_pretrained needs a folder or a repository id, got {type(path_or_repo_id).__name__}")
    name = os.fspath(path_or_repo_id)
    local = Path(name).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise DigitError(f"{name} is a file, not a model folder")
    if name in SHIPPED:
        from digit.demo import models_complete, shipped_models

        folder = shipped_models()
        if not models_complete(folder):
            raise DigitError(
                f"the shipped {name} models are not in {folder} (a trimmed install): reinstall digit, or run "
                "`digit recipe cifar10` + `digit recipe ship` and load that folder"
            )
        return folder
    if isinstance(path_or_repo_id, os.PathLike) or not looks_like_repo_id(name):
        raise DigitError(f"{name}: no such model folder (and not a Hugging Face repository id such as 'owner/name')")
    return download(name, revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only)


def load_folder(
    folder: str | os.PathLike,
    device: Any = "cpu",
    text_encoder: str | os.PathLike | None = None,
    download_text_encoder: bool = False,
) -> Pipeline:
    """A model folder (see the module docstring) -> the Pipeline, pieces checked against each other first."""
    from digit.pipeline import _read_run_config, load_pipeline

    folder = Path(folder)
    missing = [p for p in ("stage1", "vq") if not (folder / p).is_dir()]
    if missing:
        raise DigitError(
            f"{folder} is not a digit model folder (missing {', '.join(p + '/' for p in missing)}; "
            "save_pretrained or `digit recipe ship` writes one)"
        )
    meta = read_pipeline_meta(folder) if (folder / PIPELINE_FILE).is_file() else None
    decoder = folder / "stage2" if (folder / "stage2").is_dir() else None
    if _read_run_config(folder / "stage1")["model"].get("cond") == "text":
        text_encoder = _text_encoder_dir(folder, meta, text_encoder)
    pipe = load_pipeline(
        folder / "stage1", folder / "vq", decoder, device=device, text_encoder=text_encoder,
        text_encoder_flag="text_encoder=", download_text_encoder=download_text_encoder,
    )  # fmt: skip
    if meta is not None:
        if meta["kind"] != pipe.kind:
            raise DigitError(f"{folder / PIPELINE_FILE} says kind {meta['kind']!r}, its models make {pipe.kind!r}")
        pipe.info = dict(meta.get("info") or {})
        if meta.get("license"):
            pipe.info["license"] = meta["license"]
    elif (folder / "models.json").is_file():  # `digit recipe ship`: provenance and figures of the recipe run
        from digit.utils.artifacts import read_json_object

        shipped = read_json_object(folder / "models.json", {})
        pipe.info = {k: shipped[k] for k in ("made_by", "recipe_size", "figures", "steps") if shipped.get(k)}
    pipe.source = folder
    return pipe


def _text_encoder_dir(folder: Path, meta: dict[str, Any] | None, given: str | os.PathLike | None) -> str | os.PathLike:
    """The text encoder of a text-conditional folder: the argument (a directory or a hub id, resolved by
    `load_pipeline`), the folder's ``text_encoder/``, or the directory ``save_pretrained`` recorded (when it exists on
    this machine); else a one-line error saying what to pass."""
    from digit.prompts import describe_encoder, recorded_encoder

    if given is not None:
        return given
    if (folder / "text_encoder").is_dir():
        return folder / "text_encoder"
    recorded = ((meta or {}).get("text_encoder") or {}).get("path")
    if isinstance(recorded, str) and Path(recorded).is_dir():
        return Path(recorded)
    from digit.pipeline import _read_run_config

    want = describe_encoder(recorded_encoder(_read_run_config(folder / "stage1")))
    where = f" (recorded at {recorded}, not on this machine)" if isinstance(recorded, str) else ""
    raise DigitError(
        f"{folder} is a text-conditional model and no text encoder was found{where}: pass text_encoder=DIR "
        f"({want}) or put it in {folder / 'text_encoder'}"
    )


def read_pipeline_meta(folder: Path) -> dict[str, Any]:
    from digit.utils.artifacts import INT, OBJECT, STR, read_json_object

    path = folder / PIPELINE_FILE
    keys = {
        "format": STR,
        "format_version": INT,
        "kind": STR,
        "info?": OBJECT,
        "license?": STR,
        "text_encoder?": OBJECT,
    }
    meta = read_json_object(path, keys)
    if meta["format"] != FORMAT:
        raise DigitError(f"{path}: format {meta['format']!r}, expected {FORMAT!r}")
    if meta["format_version"] > FORMAT_VERSION:
        raise DigitError(
            f"{path}: format version {meta['format_version']} is newer than this digit reads ({FORMAT_VERSION}): upgrade digit"
        )
    return meta  # fmt: skip


# ----------------------------------------------------------------------------------------------- saving


def save_pretrained(
    pipe: Pipeline,
    save_directory: str | os.PathLike,
    *,
    overwrite: bool = False,
    license: str | None = None,
    repo_id: str | None = None,
    text_encoder: str = "auto",
) -> Path:
    """Write ``pipe`` as a model folder (module docstring), staged then renamed into place. The weights are the
    models' current state dicts in the current format (former layouts upgraded), so the folder reloads to the same
    models; ``repo_id`` only shapes the model card's usage lines. ``text_encoder``: ``"auto"`` copies a text encoder
    directory of at most 100 MB into ``text_encoder/``, ``"copy"`` copies it whatever its size, ``"reference"`` only
    records it."""
    from digit.model_card import default_license, model_card
    from digit.utils.io import atomic_write_bytes, atomic_write_json
    from digit.utils.outputs import OutputDir, is_own_output

    if text_encoder not in TEXT_ENCODER_MODES:
        raise DigitError(
            f"save_pretrained: text_encoder must be one of {', '.join(TEXT_ENCODER_MODES)}, not {text_encoder!r}"
        )
    out = Path(save_directory).expanduser()
    if out.exists() and not out.is_dir():
        raise DigitError(f"save_pretrained: {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite and not is_own_output(out, OUTPUT_KIND):
        raise DigitError(
            f"save_pretrained: {out} is not empty and was not written by save_pretrained "
            "(pass overwrite=True to replace it, or choose a new folder)"
        )
    inputs = (pipe.source,) if pipe.source is not None else ()
    target = OutputDir(out, OUTPUT_KIND, inputs, overwrite, flag="save_pretrained:")
    with target.stage() as tmp:
        _write_run(tmp / "stage1", pipe.stage1, pipe.stage1_config)
        if pipe.decoder is not None:
            specials = pipe.decoder_special_rows
            _write_run(tmp / "stage2", pipe.decoder, pipe.decoder_config or {}, specials)
        pipe.vq.save(tmp / "vq")
        has_tokenizer = _copy_tokenizer(pipe.source, tmp / "tokenizer")
        copied = _copy_text_encoder(pipe, tmp / "text_encoder", text_encoder)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": pipe.kind,
            "num_classes": pipe.num_classes,
            "class_names": pipe.class_names,
            "image_size": pipe.image_size,
            "tokenizer": has_tokenizer,
            "text_encoder": _text_encoder_record(pipe, copied),
            "license": license or pipe.info.get("license") or default_license(pipe),
            "info": {k: v for k, v in pipe.info.items() if k != "license"},
        }
        atomic_write_json(tmp / PIPELINE_FILE, meta)
        atomic_write_bytes(tmp / "README.md", model_card(pipe, meta, repo_id=repo_id).encode())
    return out


def _encoder_files(directory: Path) -> list[Path]:
    # what the encoder's identity hashes: every regular file but dotfiles (an output marker is not the model)
    return sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith("."))


def _copy_text_encoder(pipe: Pipeline, out: Path, mode: str) -> bool:
    """Copy the pipeline's text encoder directory into the folder per ``mode`` (see `save_pretrained`)."""
    src = pipe.text_encoder_dir
    if not pipe.is_text or mode == "reference" or src is None or not src.is_dir():
        return False
    files = _encoder_files(src)
    if mode == "auto" and sum(p.stat().st_size for p in files) > TEXT_ENCODER_COPY_LIMIT:
        return False
    for p in files:
        dest = out / p.relative_to(src)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, dest)
    return True


def _text_encoder_record(pipe: Pipeline, copied: bool = False) -> dict[str, Any] | None:
    """What a text-conditional folder says about its encoder: its identity, where it came from, whether the folder
    holds a copy."""
    if not pipe.is_text:
        return None
    identity = pipe.text_encoder.identity() if pipe.text_encoder is not None else None
    from digit.prompts import recorded_encoder

    identity = identity or recorded_encoder(pipe.stage1_config)
    path = str(pipe.text_encoder_dir.resolve()) if pipe.text_encoder_dir is not None else None
    return {"identity": identity, "path": path, "copied": copied}


def _write_run(out: Path, model: Any, config: dict[str, Any], specials: Any = None) -> None:
    """A run directory `load_gpt_run` opens: the run's config (provenance kept) with the model section as the model
    is now, and its weights."""
    from digit.convert import SPECIALS_FILE
    from digit.utils.io import atomic_save_safetensors, atomic_write_json

    out.mkdir(parents=True)
    atomic_save_safetensors(out / "model.safetensors", model.state_dict())
    if specials is not None:
        atomic_save_safetensors(out / SPECIALS_FILE, {"output_special.weight": specials})
    atomic_write_json(out / "config.json", {**config, "model": model.config.to_dict()})


def _copy_tokenizer(source: Path | None, out: Path) -> bool:
    """Carry the source folder's discriminative tokenizer when it is self-contained (its encoder weights inside)."""
    from digit.utils.io import read_json

    src = source / "tokenizer" if source is not None else None
    if src is None or not (src / "tokenizer.json").is_file():
        return False
    cfg = read_json(src / "tokenizer.json")
    weights = ((cfg.get("encoder") or {}).get("weights") or {}) if isinstance(cfg, dict) else {}
    if cfg.get("type") == "discriminative" and weights.get("kind") not in ("stored", "random"):
        return False  # points at weights elsewhere on the machine that made it: not portable
    out.mkdir()
    for f in sorted(src.iterdir()):
        if f.is_file() and f.suffix in TOKENIZER_FILES:
            shutil.copyfile(f, out / f.name)
    return True
