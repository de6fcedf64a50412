"""Captions of an image source, in the source's order, from the three layouts captioned datasets ship in:

* a sidecar ``.txt`` beside each image with the same stem (``cat/001.jpg`` + ``cat/001.txt``), in a folder or archive;
* a ``metadata.jsonl`` with one ``{"file_name": ..., "text": ...}`` per line, ``file_name`` relative to the folder
  holding the metadata file (the Hugging Face imagefolder convention; one per folder is allowed);
* a tar archive of ``name.jpg`` + ``name.txt`` pairs (the WebDataset layout: the key is the name up to its first dot).

Caption files are never image entries: :func:`with_captions` removes them from the source. An image whose caption is
missing, empty or unreadable is removed too and listed in the source's ``rejected``, so the end-of-run skip summary
(:class:`digit.data.datasets.SkipReport`) counts it beside undecodable images; a caption file without an image is
listed the same way. Links and hostile archive members never reach this module (``digit.data.sources`` refuses them),
so a caption behind a refused link counts as missing. A malformed ``metadata.jsonl`` is an error naming the file and
line; a source without any caption is a one-line error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import PurePosixPath

from digit.data.sources import ImageSource
from digit.errors import DigitError

METADATA = "metadata.jsonl"
CAPTION_SUFFIX = ".txt"
MAX_CAPTION_BYTES = 1 << 16  # a "caption" larger than this is a mistake (a document, a log), not a caption


@dataclass
class Captions:
    """``texts[i]`` is entry i's caption (None when it has none); ``problems`` are (image key, reason)."""

    texts: list[str | None]
    problems: list[tuple[str, str]]
    caption_files: set[str]  # keys of the sidecar / metadata files (not images)
    orphans: list[str]  # sidecars no image claims


def _is_caption_file(key: str) -> bool:
    p = PurePosixPath(key)
    return p.suffix.lower() == CAPTION_SUFFIX or p.name == METADATA


def _sidecar_candidates(key: str) -> list[str]:
    """``a/x.v2.jpg`` -> ``a/x.v2.txt`` (same stem), then ``a/x.txt`` (WebDataset: the key ends at the first dot)."""
    p = PurePosixPath(key)
    out = [str(p.with_suffix(CAPTION_SUFFIX))]
    first = p.name.split(".", 1)[0]
    if first:
        out.append(str(p.with_name(first + CAPTION_SUFFIX)))
    return list(dict.fromkeys(out))


def _decode_text(data: bytes) -> str:
    if len(data) > MAX_CAPTION_BYTES:
        raise ValueError(f"caption file larger than {MAX_CAPTION_BYTES} bytes")
    try:
        return data.decode("utf-8-sig").strip()
    except UnicodeDecodeError as e:
        raise ValueError(f"caption is not UTF-8 text (byte {e.start})") from e


def _parse_metadata(source: ImageSource, key: str, data: bytes) -> dict[str, str]:
    """image key -> caption text, from one metadata.jsonl; any malformed line is an error naming the file and line."""
    where = f"{source.path}: {key}"
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DigitError(f"{where}: not UTF-8 text (byte {e.start}); the file is corrupt") from e
    base = PurePosixPath(key).parent
    out: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DigitError(f"{where}: line {lineno}: invalid JSON ({e.msg})") from e
        if not isinstance(rec, dict) or not isinstance(rec.get("file_name"), str):
            raise DigitError(f"{where}: line {lineno}: expected an object with a 'file_name' string")
        caption = rec.get("text")
        if caption is not None and not isinstance(caption, str):
            raise DigitError(f"{where}: line {lineno}: 'text' must be a string, got {json.dumps(caption)[:40]}")
        name = PurePosixPath(rec["file_name"])
        if name.is_absolute() or ".." in name.parts or not name.parts:
            raise DigitError(f"{where}: line {lineno}: file_name {rec['file_name']!r} is absolute or climbs out")
        out[str(base / name)] = (caption or "").strip()
    return out


def read_captions(source: ImageSource) -> Captions:
    """The caption of each entry of ``source`` in its order (see the module docstring for the layouts and rules)."""
    keys = [e.key for e in source.entries]
    listed = set(keys) | set(source.loose_files)
    caption_files = {k for k in listed if _is_caption_file(k)}
    blobs = source.read_keys(sorted(caption_files))
    from_metadata: dict[str, str] = {}
    for k in sorted(k for k in caption_files if PurePosixPath(k).name == METADATA):
        data = blobs[k]
        if isinstance(data, OSError):
            raise DigitError(f"{source.path}: {k}: cannot read ({data})")
        from_metadata.update(_parse_metadata(source, k, data))
    texts: list[str | None] = []
    problems: list[tuple[str, str]] = []
    claimed: set[str] = set()
    for key in keys:
        if key in caption_files:
            texts.append(None)
            continue
        if key in from_metadata:
            text, why = from_metadata[key], f"empty caption in {METADATA}"
        else:
            side = next((c for c in _sidecar_candidates(key) if c in caption_files), None)
            if side is None:
                texts.append(None)
                problems.append((key, f"no caption (no sidecar .txt and not in any {METADATA})"))
                continue
            claimed.add(side)
            data, why = blobs[side], f"empty caption ({side})"
            if isinstance(data, OSError):
                texts.append(None)
                problems.append((key, f"caption unreadable ({side}: {data})"))
                continue
            try:
                text = _decode_text(data)
            except ValueError as e:
                texts.append(None)
                problems.append((key, f"{e} ({side})"))
                continue
        texts.append(text or None)
        if not text:
            problems.append((key, why))
    orphans = sorted(k for k in caption_files if PurePosixPath(k).name != METADATA and k not in claimed)
    return Captions(texts, problems, caption_files, orphans)


def with_captions(source: ImageSource) -> tuple[ImageSource, list[str]]:
    """(the source narrowed to images that have a caption, their captions in its order).

    Caption files leave the entries; images without a usable caption and caption files without an image go to the
    source's ``rejected`` and so into the run's skip summary. No caption at all is a DigitError."""
    caps = read_captions(source)
    if not caps.caption_files:
        raise DigitError(
            f"no captions in {source.path}: expected a .txt beside each image, a {METADATA} with file_name and text, "
            "or name.jpg + name.txt pairs in a tar"
        )
    keep = [i for i, t in enumerate(caps.texts) if t is not None]
    if not keep:
        detail = "; ".join(f"{k}: {r}" for k, r in caps.problems[:3]) or "every listed file is a caption file"
        raise DigitError(f"no captioned image in {source.path} ({len(caps.problems)} without a caption: {detail})")
    rejected = list(caps.problems) + [(k, "caption file without an image") for k in caps.orphans]
    narrowed = source.subset(keep, rejected)
    # metadata files beside class folders are not stray images
    narrowed.loose_files = [k for k in source.loose_files if k not in caps.caption_files]
    return narrowed, [caps.texts[i] for i in keep]
