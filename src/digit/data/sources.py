"""Image sources: a folder or a .tar / .tar.gz archive, in ImageFolder layout (``<root>/<class>/<image>``) or flat.

A source is a sorted list of entries (relative path, label) plus byte access. The same images give the same order and
labels from a folder or from an archive of it: entries are sorted by relative path within sorted class names, and a
single top-level folder is unwrapped in both (the CIFAR-10 archive holds ``train/<class>/<image>.jpg``).

Which files are images is decided by decoding, not by extension, so a stray ``README.txt`` is skipped and counted like
a truncated JPEG. Hidden files and folders (``.DS_Store``, ``__MACOSX``) are ignored outright.

Hostile layouts never mislabel and never vanish silently: what is refused is listed in ``ImageSource.rejected`` and
counted in the end-of-run skip summary.

* Folder links are followed only where they resolve inside the data root, and every real file and folder is read at
  most once: the plain (link-free) path wins, then the first link path in sorted order. A link out of the root, a
  broken link, a link to a folder already read (a loop such as ``cls/loop -> ..``) and a second path to a file
  already listed are rejected.
* Archive members that are links (symbolic or hard), devices or FIFOs, or whose name is absolute (``/tmp/x.jpg``) or
  climbs (``../x.jpg``), are rejected; they never become an entry or a class.
"""

from __future__ import annotations

import copy
import os
import tarfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from digit.errors import DigitError

LAYOUTS = ("auto", "imagefolder", "flat")


@dataclass(frozen=True)
class Entry:
    key: str  # relative POSIX path inside the source, after unwrapping
    label: int  # -1 when unlabeled


def _hidden(parts: tuple[str, ...]) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _unwrap(paths: list[PurePosixPath], keep_dirs: bool = False) -> tuple[str, list[PurePosixPath]]:
    """Strip single top-level folders ('train/...') until the root has more than one entry or holds files.

    With ``keep_dirs`` (an explicit ImageFolder layout) a lone class folder is kept: 'cat/*.png' is one class.
    """
    prefix = ""
    while paths and all(len(p.parts) > 1 for p in paths) and len({p.parts[0] for p in paths}) == 1:
        if keep_dirs and not any(len(p.parts) > 2 for p in paths):
            break
        top = paths[0].parts[0]
        prefix += top + "/"
        paths = [PurePosixPath(*p.parts[1:]) for p in paths]
    return prefix, paths


def _index(paths: list[PurePosixPath], layout: str) -> tuple[list[Entry], list[str], list[str]]:
    """-> (entries, class names, keys outside any class folder)."""
    has_dirs = any(len(p.parts) > 1 for p in paths)
    if layout == "auto":
        layout = "imagefolder" if has_dirs else "flat"
    if layout == "flat":
        return [Entry(str(p), -1) for p in sorted(paths, key=str)], [], []
    classes = sorted({p.parts[0] for p in paths if len(p.parts) > 1})
    cls_idx = {c: i for i, c in enumerate(classes)}
    loose = sorted(str(p) for p in paths if len(p.parts) == 1)
    entries = sorted(
        (Entry(str(p), cls_idx[p.parts[0]]) for p in paths if len(p.parts) > 1), key=lambda e: (e.label, e.key)
    )
    return entries, classes, loose


@dataclass
class ImageSource:
    """Entries of an image collection and access to their bytes. Subclasses implement byte access."""

    path: Path
    entries: list[Entry]
    class_names: list[str]
    loose_files: list[str] = field(default_factory=list)  # files beside class folders: reported as skipped
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): links/members refused (docstring)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def labels(self) -> np.ndarray:
        return np.array([e.label for e in self.entries], dtype=np.int64)

    @property
    def labeled(self) -> bool:
        return bool(self.class_names)

    def read_bytes(self, index: int) -> bytes:
        raise NotImplementedError

    def read_key(self, key: str) -> bytes:
        """Bytes of any file the source listed (an entry or a loose file), by its relative key (caption sidecars)."""
        raise NotImplementedError

    def read_keys(self, keys: list[str]) -> dict[str, bytes | OSError]:
        """``read_key`` for many keys; an unreadable one maps to its OSError."""
        out: dict[str, bytes | OSError] = {}
        for k in keys:
            try:
                out[k] = self.read_key(k)
            except OSError as e:
                out[k] = e
        return out

    def subset(self, keep: list[int], rejected: list[tuple[str, str]]) -> ImageSource:
        """A copy holding only entries ``keep`` (in that order), with ``rejected`` added to what is reported."""
        new = copy.copy(self)
        new.entries = [self.entries[i] for i in keep]
        new.rejected = sorted(self.rejected + rejected)
        return new

    def iter_bytes(self, select: Callable[[int], bool] = lambda i: True) -> Iterator[tuple[int, bytes | OSError]]:
        """(index, bytes) for the selected entries, in whatever order reads the storage fastest. An unreadable entry
        (broken link, permission, I/O error) comes through as (index, the OSError) so a long run can skip it."""
        for i in range(len(self.entries)):
            if select(i):
                try:
                    yield i, self.read_bytes(i)
                except OSError as e:
                    yield i, e

    def describe(self) -> str:
        kind = f"labeled, {len(self.class_names)} classes" if self.labeled else "unlabeled"
        return f"{self.path} ({len(self)} files, {kind})"


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def walk_folder(root: Path) -> tuple[list[PurePosixPath], list[tuple[str, str]]]:
    """(relative paths of the files to read, rejected (path, reason)) under the rules in the module docstring."""
    root_real = os.path.realpath(root)
    files: dict[str, PurePosixPath] = {}  # real path -> the one relative path it is read through
    rejected: list[tuple[str, str]] = []
    seen_dirs = {root_real}
    links: list[tuple[PurePosixPath, str]] = []  # (relative path of a link, its full path), resolved after plain paths

    def scan(full: str, rel: PurePosixPath, real_dir: str) -> None:
        """Plain entries of one folder tree (no link followed; ``real_dir`` is its real path); links are queued."""
        with os.scandir(full) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            if _hidden((e.name,)):
                continue
            r = PurePosixPath(*rel.parts, e.name)
            if e.is_symlink():
                links.append((r, e.path))
            elif e.is_dir(follow_symlinks=False):
                seen_dirs.add(os.path.join(real_dir, e.name))
                scan(e.path, r, os.path.join(real_dir, e.name))
            elif e.is_file(follow_symlinks=False):
                files.setdefault(os.path.join(real_dir, e.name), r)
            else:
                rejected.append((str(r), "not a regular file"))

    scan(str(root), PurePosixPath(), root_real)
    while links:  # breadth-first over link paths, in sorted order: each real folder and file once
        links.sort(key=lambda x: str(x[0]))
        rel, full = links.pop(0)
        real = os.path.realpath(full)
        if not _inside(real, root_real):
            rejected.append((str(rel), "link leads outside the data root (not followed)"))
        elif not os.path.exists(real):
            rejected.append((str(rel), "broken link"))
        elif os.path.isdir(real):
            if real in seen_dirs:
                rejected.append((str(rel), "link to a folder already read (loop or duplicate; not followed)"))
            else:
                seen_dirs.add(real)
                scan(full, rel, real)
        elif real in files:
            rejected.append((str(rel), f"same file as {files[real]} (read once)"))
        elif os.path.isfile(real):
            files[real] = rel
        else:
            rejected.append((str(rel), "not a regular file"))
    return sorted(files.values(), key=str), sorted(rejected)


class FolderSource(ImageSource):
    def __init__(self, root: Path, layout: str):
        files, rejected = walk_folder(root)
        prefix, rel_paths = _unwrap(files, keep_dirs=layout == "imagefolder")
        entries, classes, loose = _index(rel_paths, layout)
        super().__init__(Path(root), entries, classes, loose, rejected)
        self._prefix = prefix

    def read_bytes(self, index: int) -> bytes:
        return (self.path / (self._prefix + self.entries[index].key)).read_bytes()

    def read_key(self, key: str) -> bytes:
        return (self.path / (self._prefix + key)).read_bytes()


class TarSource(ImageSource):
    """Reads members in place. Plain .tar: random access by offset. .tar.gz: sequential streaming for `iter_bytes`;
    random access (``read_bytes``) loads the compressed members' bytes into memory once (fine for CIFAR-sized
    archives; use an uncompressed .tar for ImageNet-sized ones)."""

    def __init__(self, path: Path, layout: str):
        try:
            with tarfile.open(path, "r:*") as tf:
                members, rejected = _safe_members(tf.getmembers())
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DigitError(f"cannot read archive {path}: {e}") from e
        # an archive appended to (tar -r/-u) can hold a name twice: the last copy wins, as on extraction
        last = {str(PurePosixPath(m.name)): m for m in members}
        members = [m for m in members if last[str(PurePosixPath(m.name))] is m]
        prefix, rel_paths = _unwrap([PurePosixPath(m.name) for m in members], keep_dirs=layout == "imagefolder")
        entries, classes, loose = _index(rel_paths, layout)
        super().__init__(Path(path), entries, classes, loose, rejected)
        by_key = {prefix + str(p): m for p, m in zip(rel_paths, members)}
        by_key = {str(PurePosixPath(k)): v for k, v in by_key.items()}
        self._members = [by_key[str(PurePosixPath(prefix + e.key))] for e in entries]
        self._by_rel = {str(p): m for p, m in zip(rel_paths, members)}
        self._compressed = not _is_plain_tar(path)
        self._lock = threading.Lock()
        self._handle: tuple[int, object] | None = None  # (pid, file) so forked DataLoader workers reopen
        self._cache: list[bytes] | None = None

    def _file(self):
        if self._handle is None or self._handle[0] != os.getpid():
            self._handle = (os.getpid(), open(self.path, "rb"))
        return self._handle[1]

    def read_bytes(self, index: int) -> bytes:
        if self._compressed:
            if self._cache is None:
                with self._lock:
                    if self._cache is None:
                        cache: list[bytes] = [b""] * len(self.entries)
                        for i, data in self.iter_bytes():
                            cache[i] = data
                        self._cache = cache
            return self._cache[index]
        m = self._members[index]
        f = self._file()
        f.seek(m.offset_data)
        return f.read(m.size)

    def read_key(self, key: str) -> bytes:
        m = self._by_rel.get(key)
        if m is None:
            raise FileNotFoundError(key)
        if self._compressed:
            return self.read_keys([key])[key]
        f = self._file()
        f.seek(m.offset_data)
        return f.read(m.size)

    def read_keys(self, keys: list[str]) -> dict[str, bytes | OSError]:
        if not self._compressed:
            return super().read_keys(keys)
        want = {self._by_rel[k].offset: k for k in keys if k in self._by_rel}  # one sequential pass over a .tar.gz
        out: dict[str, bytes | OSError] = {k: FileNotFoundError(k) for k in keys if k not in self._by_rel}
        with tarfile.open(self.path, "r:*") as tf:
            for m in tf:
                if m.offset in want:
                    out[want[m.offset]] = tf.extractfile(m).read()
        return out

    def subset(self, keep: list[int], rejected: list[tuple[str, str]]) -> ImageSource:
        new = super().subset(keep, rejected)
        new._members = [self._members[i] for i in keep]
        new._cache = None
        new._lock = threading.Lock()
        new._handle = None
        return new

    def iter_bytes(self, select: Callable[[int], bool] = lambda i: True) -> Iterator[tuple[int, bytes]]:
        if not self._compressed:
            yield from super().iter_bytes(select)
            return
        pos = {m.offset: i for i, m in enumerate(self._members)}
        with tarfile.open(self.path, "r:*") as tf:
            for m in tf:
                i = pos.get(m.offset)
                if i is not None and select(i):
                    yield i, tf.extractfile(m).read()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handle"] = None
        state["_lock"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


def _safe_members(members: list[tarfile.TarInfo]) -> tuple[list[tarfile.TarInfo], list[tuple[str, str]]]:
    """Regular files with a relative, non-climbing, non-hidden name; the rest of the non-folder members rejected."""
    keep, rejected = [], []
    for m in members:
        if m.isdir():
            continue
        name = PurePosixPath(m.name)
        if name.is_absolute() or ".." in name.parts:
            rejected.append((m.name, "member name is absolute or climbs out with '..' (not extracted)"))
        elif _hidden(name.parts):
            continue
        elif m.issym() or m.islnk():
            rejected.append((m.name, f"link member -> {m.linkname} (not followed)"))
        elif not m.isfile():
            rejected.append((m.name, "not a regular file"))
        else:
            keep.append(m)
    return keep, rejected


def _is_plain_tar(path: Path) -> bool:
    with open(path, "rb") as f:
        magic = f.read(3)
    return magic[:2] != b"\x1f\x8b" and magic != b"BZh" and magic[:3] != b"\xfd7z"


def open_image_source(path: str | os.PathLike, layout: str = "auto") -> ImageSource:
    """Open a folder or a .tar/.tar.gz archive. An empty source is an error."""
    if layout not in LAYOUTS:
        raise DigitError(f"unknown layout {layout!r} (choose from {', '.join(LAYOUTS)})")
    p = Path(path).expanduser()
    if not p.exists():
        raise DigitError(f"data path does not exist: {p}")
    if p.is_dir():
        src: ImageSource = FolderSource(p, layout)
    elif tarfile.is_tarfile(p):
        src = TarSource(p, layout)
    else:
        raise DigitError(f"{p} is neither a folder nor a .tar/.tar.gz archive")
    if len(src) == 0:
        raise DigitError(f"no files found in {p}")
    return src
