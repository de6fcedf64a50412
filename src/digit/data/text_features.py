"""Caption features stored beside a token directory, computed once per dataset (as LlamaGen extracts T5 features once).

    captions.jsonl      one {"text": ...} per image, in the token directory's image order
    text_features.npy   [N, L, D] float16 or float32, padded positions zero (np.load(mmap_mode="r") friendly)
    text_mask.npy       [N, L] bool, True where a caption token is
    meta.json "text"    {"encoder": the encoder's identity (kind, name, sha256, ...), "n", "length", "dim", "dtype"}

N is the number of images; with several views, token row ``r`` takes caption ``r % N``. Reading checks every file's
dtype and shape against the others and meta.json, and (when asked) the encoder identity a model was trained with.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from digit.errors import DigitError
from digit.utils.artifacts import INT, POSITIVE_INT, STR, load_npy, read_json_object
from digit.utils.io import atomic_save_numpy, atomic_write, atomic_write_bytes, atomic_write_json, file_sha256

CAPTIONS_FILE, FEATURES_FILE, MASK_FILE = "captions.jsonl", "text_features.npy", "text_mask.npy"


@runtime_checkable
class TextEncoder(Protocol):
    """Captions -> (features [N, L, D] float32, mask [N, L] bool). ``identity()`` names the weights (with a sha256)."""

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]: ...

    def identity(self) -> dict[str, Any]: ...


class RandomTextEncoder:
    """A tiny deterministic encoder for tests and offline smoke runs: UTF-8 bytes -> a seeded random embedding table
    plus a position table. Not a language model; the same (seed, dim, length) always gives the same features."""

    def __init__(self, dim: int = 16, max_length: int = 32, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.dim, self.max_length, self.seed = dim, max_length, seed
        self.table = rng.standard_normal((256, dim)).astype(np.float32)
        self.pos = rng.standard_normal((max_length, dim)).astype(np.float32) * 0.1

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        feats = np.zeros((len(texts), self.max_length, self.dim), dtype=np.float32)
        mask = np.zeros((len(texts), self.max_length), dtype=bool)
        for i, t in enumerate(texts):
            ids = np.frombuffer(t.encode("utf-8")[: self.max_length], dtype=np.uint8)
            feats[i, : len(ids)] = self.table[ids] + self.pos[: len(ids)]
            mask[i, : len(ids)] = True
        return feats, mask

    def identity(self) -> dict[str, Any]:
        h = hashlib.sha256(self.table.tobytes() + self.pos.tobytes()).hexdigest()
        return {"kind": "random-test", "name": f"random-bytes-d{self.dim}-s{self.seed}", "sha256": h,
                "max_length": self.max_length}  # fmt: skip


class T5TextEncoder:
    """``transformers``' T5EncoderModel + tokenizer from a local directory (never downloads: a hub id is made a
    directory first by `resolve_text_encoder`). Captions are padded or truncated to ``max_length`` tokens (LlamaGen
    uses 120); padded positions are zeroed and masked."""

    def __init__(self, directory: str | os.PathLike, max_length: int = 120, device: str = "cpu"):
        try:
            from transformers import AutoTokenizer, T5EncoderModel
        except ImportError as e:
            raise DigitError("the T5 text encoder needs transformers: pip install transformers sentencepiece") from e
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise DigitError(f"text encoder directory not found: {self.directory}")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.directory, local_files_only=True)
            self.model = T5EncoderModel.from_pretrained(self.directory, local_files_only=True).to(device).eval()
        except (OSError, ValueError) as e:
            raise DigitError(f"{self.directory}: not a loadable T5 encoder ({str(e).splitlines()[0]})") from e
        self.max_length, self.device = max_length, device

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        import torch

        enc = self.tokenizer(
            list(texts), max_length=self.max_length, padding="max_length", truncation=True, return_tensors="pt"
        )
        mask = enc["attention_mask"].to(self.device)
        with torch.no_grad():
            feats = self.model(input_ids=enc["input_ids"].to(self.device), attention_mask=mask).last_hidden_state
        feats = feats * mask.unsqueeze(-1)
        return feats.float().cpu().numpy(), mask.bool().cpu().numpy()

    def identity(self) -> dict[str, Any]:
        return _t5_identity(self.directory, self.max_length)


# the files a T5 encoder is loaded from; anything else in its directory (a README, generation_config.json, the .cache/
# of `hf download --local-dir`, other formats' weights in a hub snapshot) is not part of its identity
T5_FILES = ("config.json", "spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "added_tokens.json")  # fmt: skip


def t5_encoder_files(directory: str | os.PathLike) -> list[Path]:
    """The files that make a T5 encoder directory's identity, in name order: its config and tokenizer files and the
    weights ``transformers`` loads (safetensors when there are any, else the pickled ``.bin`` it would read)."""
    top = [p for p in Path(directory).iterdir() if p.is_file()]
    weights = [p for p in top if p.name.endswith((".safetensors", ".safetensors.index.json"))]
    if not weights:
        weights = [p for p in top if p.name.endswith((".bin", ".bin.index.json"))]
    return sorted([p for p in top if p.name in T5_FILES] + weights)


def _t5_identity(directory: Path, max_length: int) -> dict[str, Any]:
    # the files hashed in name order: a renamed copy of the same model, or the hub cache's snapshot of its files, is
    # the same encoder
    h = hashlib.sha256()
    for p in t5_encoder_files(directory):
        h.update(f"{p.name}\0{file_sha256(p)}\n".encode())
    return {"kind": "t5", "name": _encoder_name(directory), "sha256": h.hexdigest(), "max_length": max_length}


def _encoder_name(directory: Path) -> str:
    # a hub cache snapshot (.../models--google--flan-t5-xl/snapshots/<commit>) is named by its repository id
    snapshots = directory.resolve().parent
    if snapshots.name == "snapshots" and snapshots.parent.name.startswith("models--"):
        return snapshots.parent.name.removeprefix("models--").replace("--", "/")
    return directory.name


RANDOM_ENCODER_FILE = "text_encoder.json"  # {"kind": "random-test", "dim", "max_length", "seed"}: a test encoder dir


def _random_spec(directory: Path) -> dict[str, Any] | None:
    spec_path = directory / RANDOM_ENCODER_FILE
    if not spec_path.is_file():
        return None
    spec = read_json_object(spec_path, {"kind": STR, "dim": POSITIVE_INT, "max_length": POSITIVE_INT, "seed": INT})
    if spec["kind"] != "random-test":
        raise DigitError(f"{spec_path}: unknown text encoder kind {spec['kind']!r} (expected 'random-test')")
    return spec


def load_text_encoder(directory: str | os.PathLike, max_length: int = 120, device: str = "cpu") -> TextEncoder:
    """A text encoder from a local directory: a T5 encoder (``transformers`` format), or the random test encoder when
    the directory holds a ``text_encoder.json`` of kind ``random-test`` (for offline smoke runs and tests)."""
    directory = Path(directory)
    spec = _random_spec(directory)
    if spec is not None:
        return RandomTextEncoder(dim=spec["dim"], max_length=spec["max_length"], seed=spec["seed"])
    return T5TextEncoder(directory, max_length=max_length, device=device)


def text_encoder_identity(directory: str | os.PathLike, max_length: int = 120) -> dict[str, Any]:
    """``load_text_encoder(directory).identity()`` without loading a T5 model (its files are hashed, not read into
    memory as a model): what `digit train --text-encoder` checks stored caption features against."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DigitError(f"text encoder directory not found: {directory}")
    spec = _random_spec(directory)
    if spec is not None:
        return RandomTextEncoder(dim=spec["dim"], max_length=spec["max_length"], seed=spec["seed"]).identity()
    return _t5_identity(directory, max_length)


# what `--pretrained` fetches of a hub T5: its JSON configs and tokenizer, spiece.model and safetensors weights (never
# pickled weights)
T5_HUB_FILES = ["*.json", "spiece.model", "*.safetensors"]


def resolve_text_encoder(
    value: str | os.PathLike,
    download: bool = False,
    *,
    flag: str = "--text-encoder",
    download_flag: str = "--pretrained",
) -> Path:
    """A text encoder directory from ``value``: an existing directory as it is; a Hugging Face repository id (such as
    ``google/flan-t5-xl``, LlamaGen's) -> its snapshot in the local hub cache (`T5_HUB_FILES` only), downloaded only
    when ``download`` (otherwise a miss is a one-line error saying how to get it). ``flag`` and ``download_flag``: how
    the caller spells the value and the download switch in messages."""
    from digit.hub_remote import first_line, hub_offline, looks_like_repo_id

    if not isinstance(value, (str, os.PathLike)):
        raise DigitError(f"{flag} must be a directory or a Hugging Face repository id, got {type(value).__name__}")
    name = os.fspath(value)
    if not name.strip():
        raise DigitError(f"{flag} must name a directory or a Hugging Face repository id, got an empty string")
    local = Path(name).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise DigitError(f"{flag} {name}: a file, not a text encoder directory")
    if isinstance(value, os.PathLike) or not looks_like_repo_id(name):
        raise DigitError(
            f"{flag} {name}: no such directory, and not a Hugging Face repository id such as 'google/flan-t5-xl'"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    from digit import __version__

    offline = download and hub_offline()
    get = f"`hf download {name} {' '.join(f'--include {p!r}' for p in T5_HUB_FILES)}`"
    try:
        path = Path(
            snapshot_download(
                name,
                allow_patterns=T5_HUB_FILES,
                local_files_only=not download or offline,
                library_name="digit",
                library_version=__version__,
            )
        )
    except LocalEntryNotFoundError as e:  # also offline mode or no network: the cache was all there was
        if not download:
            why = f"or pass {download_flag} (needs internet)"
        else:
            why = "where there is internet (HF_HUB_OFFLINE is set)" if offline else "(the Hub could not be reached)"
        raise DigitError(f"{flag} {name}: not a directory, nor in the local Hugging Face cache: run {get} {why}") from e
    except GatedRepoError as e:
        raise DigitError(f"{name} is a gated repository: accept its terms on the Hub, then `hf auth login`") from e
    except RepositoryNotFoundError as e:
        raise DigitError(f"{flag} {name}: no such directory, nor model repository on the Hugging Face Hub") from e
    except HfHubHTTPError as e:
        raise DigitError(f"the Hugging Face Hub refused {name}: {first_line(e)}") from e
    if not (path / RANDOM_ENCODER_FILE).is_file() and not any(path.glob("*.safetensors")):
        raise DigitError(
            f"{flag} {name}: the cached snapshot holds no .safetensors weights (digit never takes pickled .bin weights "
            f"from the hub): run {get}, or give a directory"
        )
    return path


@dataclass
class CaptionTask:
    """What `digit tokenize --captions` adds to a token directory: ``texts[i]`` is source entry i's caption."""

    texts: list[str]
    encoder: TextEncoder
    batch_size: int = 64
    dtype: str = "float16"
    progress: bool = True

    def write(self, token_dir: Path, kept_indices: Sequence[int]) -> None:
        """Encode the captions of the images the token directory kept (source indices, in its row order)."""
        texts = [self.texts[int(i)] for i in kept_indices]
        write_caption_features(
            token_dir, texts, self.encoder, batch_size=self.batch_size, dtype=self.dtype, progress=self.progress
        )


@dataclass
class CaptionFeatures:
    texts: list[str]
    features: np.ndarray  # [N, L, D], a read-only memmap by default
    mask: np.ndarray  # [N, L] bool
    encoder: dict[str, Any]


def write_caption_features(
    token_dir: str | os.PathLike,
    texts: Sequence[str],
    encoder: TextEncoder,
    *,
    batch_size: int = 64,
    dtype: str = "float16",
    progress: bool = False,
) -> Path:
    """Encode ``texts`` (one per image of the token directory) and store them beside its tokens. Each file is written
    atomically and meta.json last, so a killed run leaves the directory readable as it was before."""
    token_dir = Path(token_dir)
    meta = read_json_object(token_dir / "meta.json")
    n_images = int(meta.get("n_images", -1))
    if n_images != len(texts):
        raise DigitError(f"{token_dir}: {len(texts)} captions for {n_images} images")
    if dtype not in ("float16", "float32"):
        raise DigitError(f"text feature dtype must be float16 or float32, got {dtype!r}")
    if not texts:
        raise DigitError(f"{token_dir}: no captions to encode")
    from tqdm import tqdm

    held: dict[str, np.ndarray] = {}  # the features go straight to disk, batch by batch; only the mask stays in RAM

    def write_features(tmp: Path) -> None:
        out = None
        for s in tqdm(range(0, len(texts), batch_size), desc="caption features", unit="batch", disable=not progress):
            batch = list(texts[s : s + batch_size])
            f, m = encoder.encode(batch)
            f, m = np.asarray(f, dtype=dtype), np.asarray(m, dtype=bool)
            if out is None:
                if f.ndim != 3:
                    raise DigitError(f"text encoder returned features of shape {list(f.shape)}, not [N, L, D]")
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(len(texts), *f.shape[1:]))
                held["mask"] = np.zeros((len(texts), f.shape[1]), dtype=bool)
            if f.shape != (len(batch), *out.shape[1:]) or m.shape != f.shape[:2]:
                raise DigitError(
                    f"text encoder returned features {list(f.shape)} and mask {list(m.shape)} for {len(batch)} "
                    f"captions; expected [{len(batch)}, {out.shape[1]}, {out.shape[2]}] and [{len(batch)}, {out.shape[1]}]"
                )
            out[s : s + len(batch)] = f
            held["mask"][s : s + len(batch)] = m
        out.flush()
        held["shape"] = np.array(out.shape)
        del out

    lines = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)
    atomic_write(token_dir / FEATURES_FILE, write_features)
    atomic_save_numpy(token_dir / MASK_FILE, held["mask"])
    atomic_write_bytes(token_dir / CAPTIONS_FILE, lines.encode("utf-8"))
    _, length, dim = (int(x) for x in held["shape"])
    meta["text"] = {
        "encoder": encoder.identity(),
        "n": len(texts),
        "length": length,
        "dim": dim,
        "dtype": dtype,
    }
    atomic_write_json(token_dir / "meta.json", meta)
    return token_dir


def _read_captions_file(path: Path, n: int) -> list[str]:
    if not path.is_file():
        raise DigitError(f"{path}: file not found")
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DigitError(f"{path}: not UTF-8 text (byte {e.start}); the file is corrupt") from e
    texts = []
    for i, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DigitError(f"{path}: line {i}: invalid JSON ({e.msg})") from e
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            raise DigitError(f"{path}: line {i}: expected an object with a 'text' string")
        texts.append(rec["text"])
    if len(texts) != n:
        raise DigitError(f"{path}: {len(texts)} captions, meta.json says {n}")
    return texts


def read_caption_features(
    token_dir: str | os.PathLike, *, mmap: bool = True, expect_encoder: dict[str, Any] | None = None
) -> CaptionFeatures:
    """Open and check the caption features of a token directory; with ``expect_encoder`` (the identity a model was
    trained with), refuse features made by another encoder."""
    token_dir = Path(token_dir)
    meta_path = token_dir / "meta.json"
    meta = read_json_object(meta_path)
    info = meta.get("text")
    if not isinstance(info, dict):
        raise DigitError(f"{token_dir}: no caption features (run `digit tokenize --captions --text-encoder DIR`)")
    enc = info.get("encoder")
    if not isinstance(enc, dict) or not isinstance(enc.get("sha256"), str):
        raise DigitError(f"{meta_path}: 'text.encoder' must be an object with a 'sha256' string")
    if not all(isinstance(info.get(k), int) for k in ("n", "length", "dim")):
        raise DigitError(f"{meta_path}: 'text' must record integer n, length and dim")
    n, length, dim = info["n"], info["length"], info["dim"]
    fpath, mpath = token_dir / FEATURES_FILE, token_dir / MASK_FILE
    features = load_npy(fpath, kinds="f", ndim=3, mmap=mmap, what="text feature array")
    if features.dtype not in (np.float16, np.float32):
        raise DigitError(f"{fpath}: text features must be float16 or float32, got {features.dtype}")
    if list(features.shape) != [n, length, dim]:
        raise DigitError(f"{fpath}: shape {list(features.shape)} differs from meta.json's [{n}, {length}, {dim}]")
    mask = load_npy(mpath, kinds="b", ndim=2, what="text mask array")
    if list(mask.shape) != [n, length]:
        raise DigitError(f"{mpath}: shape {list(mask.shape)} differs from meta.json's [{n}, {length}]")
    texts = _read_captions_file(token_dir / CAPTIONS_FILE, n)
    if expect_encoder is not None:
        check_encoder(token_dir, enc, expect_encoder)
    return CaptionFeatures(texts=texts, features=features, mask=mask, encoder=enc)


def check_encoder(token_dir: str | os.PathLike, found: dict[str, Any], expected: dict[str, Any]) -> None:
    """Refuse caption features (of ``token_dir``, made by ``found``) that another encoder than ``expected`` made."""
    if expected.get("sha256") != found.get("sha256"):
        raise DigitError(
            f"{token_dir}: caption features made by text encoder {found.get('name')!r} "
            f"({str(found.get('sha256'))[:12]}), not the {expected.get('name')!r} "
            f"({str(expected.get('sha256'))[:12]}) expected"
        )
