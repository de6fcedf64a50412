"""Output directories: never delete or mix into what `digit` did not write.

Two kinds of output directory, one rule set (the README's "Output directories" section says the same):

* A *replaced* output (a token directory, generated images, a tokenizer, a converted model, ...) is written through
  ``output_dir``: the path is validated, the files are written into a staging sibling, a marker (``MARKER``) listing
  every file is added, and the staging directory is renamed over the old one. An existing non-empty directory is
  replaced only when it is this command's own earlier output (its marker names the same kind and it holds nothing the
  marker does not list) or with ``--overwrite``.
* A *growing* output (a training run, a recipe) is claimed with ``claim_dir``: a non-empty directory that is not ours
  is refused (there is no ``--overwrite``); one of ours continues (runs only with ``--resume``).

For both, an output equal to, inside, or containing one of the command's inputs is refused, even with
``--overwrite``, and so is the working directory or a folder above it. Staging directories and temp files left by a
killed process (their names carry its pid) are removed by the next run that writes beside them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from digit.errors import DigitError
from digit.utils.io import atomic_write_json, replace_dir, staging_dir
from digit.utils.locking import LOCK_FILE

MARKER = ".digit-output.json"
_TEMP = re.compile(r"^\..+\.pid(\d+)\..*\.tmp$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Remove temp files / staging directories in ``directory`` whose writing process is gone. -> the removed paths."""
    directory = Path(directory)
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for p in directory.iterdir():
        m = _TEMP.match(p.name)
        if m is None or _pid_alive(int(m.group(1))):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _resolve(path: str | os.PathLike) -> Path:
    return Path(os.path.abspath(Path(path).expanduser())).resolve()


def _overlaps(a: Path, b: Path) -> str | None:
    if a == b:
        return "is"
    if a.is_relative_to(b):
        return "is inside"
    if b.is_relative_to(a):
        return "contains"
    return None


def check_paths(out: Path, inputs: Iterable[str | os.PathLike | None], flag: str = "--out") -> Path:
    """Refuse an output that is, is inside or contains an input, or is the working directory or above it."""
    final = _resolve(out)
    for inp in inputs:
        if inp is None:
            continue
        how = _overlaps(final, _resolve(inp))
        if how is not None:
            raise DigitError(f"{flag} {out} {how} the input {inp}; choose an output outside the inputs")
    if Path.cwd().resolve().is_relative_to(final):
        raise DigitError(f"{flag} {out} is the working directory or contains it; choose a new folder")
    return final


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name != MARKER and not p.is_dir())


def read_marker(directory: Path) -> dict | None:
    try:
        with open(directory / MARKER) as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def is_own_output(directory: Path, kind: str) -> bool:
    """``directory`` was written by ``output_dir(kind=...)`` and holds nothing its marker does not list."""
    marker = read_marker(directory)
    if marker is None or marker.get("kind") != kind:
        return False
    return set(_listing(directory)) <= set(marker.get("files") or [])


def _restore_interrupted(final: Path) -> None:
    """A kill between replace_dir's two renames leaves the previous output as ``.NAME.old``: put it back."""
    old = final.with_name(f".{final.name}.old")
    if old.is_dir() and not final.exists():
        try:
            os.replace(old, final)
        except OSError:  # another rank of this torchrun job restored it first
            pass
    elif old.is_dir():
        shutil.rmtree(old, ignore_errors=True)


def check_output_dir(
    out: str | os.PathLike, *, kind: str, inputs: Iterable = (), overwrite: bool = False, flag: str = "--out"
) -> Path:
    """Validate a replaced output (see the module docstring) without writing anything; -> the resolved path."""
    final = check_paths(Path(out), inputs, flag)
    remove_stale_temps(final.parent)
    _restore_interrupted(final)
    if final.exists() and not final.is_dir():
        raise DigitError(f"{flag} {out} exists and is not a directory")
    if final.is_dir() and any(final.iterdir()) and not overwrite and not is_own_output(final, kind):
        raise DigitError(
            f"{flag} {out} is not empty and is not an earlier `digit {kind}` output "
            "(pass --overwrite to replace it, or choose a new folder)"
        )
    return final


@dataclass(frozen=True)
class OutputDir:
    """A replaced output directory and its rules; build it at the CLI boundary, ``check()`` it before the slow work,
    and let the writer ``stage()`` into it. Library writers also accept a plain path (``as_output``)."""

    path: Path
    kind: str
    inputs: tuple = ()
    overwrite: bool = False
    flag: str = "--out"

    def check(self) -> OutputDir:
        check_output_dir(self.path, kind=self.kind, inputs=self.inputs, overwrite=self.overwrite, flag=self.flag)
        return self

    def begin(self) -> Path:
        """Validate again (the slow work may have taken hours) -> a fresh empty staging directory to write into."""
        return staging_dir(
            check_output_dir(self.path, kind=self.kind, inputs=self.inputs, overwrite=self.overwrite, flag=self.flag)
        )

    def publish(self, tmp: Path) -> Path:
        """Mark the fully written ``tmp`` as ours (listing every file) and rename it over ``path``."""
        atomic_write_json(tmp / MARKER, {"kind": self.kind, "files": _listing(tmp)})
        replace_dir(tmp, self.path)
        return self.path

    @contextmanager
    def stage(self) -> Iterator[Path]:
        """``begin`` ... ``publish``; nothing is published if the body raises (the staging directory is removed).
        (A staging directory of a killed process is removed by the next run's check.)"""
        tmp = self.begin()
        try:
            yield tmp
            self.publish(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def output_dir(
    out: str | os.PathLike, *, kind: str, inputs: Iterable = (), overwrite: bool = False, flag: str = "--out"
) -> OutputDir:
    """The CLI's one call: validate ``out`` now (a refused path costs nothing) -> the ``OutputDir`` to write through."""
    return OutputDir(Path(out), kind, tuple(inputs), overwrite, flag).check()


def as_output(out: str | os.PathLike | OutputDir, kind: str) -> OutputDir:
    """A library writer's argument: an ``OutputDir`` from the CLI, or a plain path (own ``kind`` outputs replaced)."""
    return out if isinstance(out, OutputDir) else OutputDir(Path(out), kind)


def claim_dir(
    out: str | os.PathLike,
    *,
    kind: str,
    inputs: Iterable = (),
    is_legacy: Callable[[Path], bool] = lambda d: False,
    flag: str = "--out",
) -> Path:
    """Validate a growing output (``kind`` "run" or "recipe"): a non-empty directory must be one of ours (its marker,
    or ``is_legacy(dir)`` for ours written before markers existed). -> the resolved path. Whether an existing one may
    continue (``--resume``) is the caller's rule. Writes nothing but stale temps' removal: safe on every rank."""
    final = check_paths(Path(out), inputs, flag)
    remove_stale_temps(final.parent)
    if final.exists() and not final.is_dir():
        raise DigitError(f"{flag} {out} exists and is not a directory")
    remove_stale_temps(final)
    if final.is_dir() and any(p.name != LOCK_FILE for p in final.iterdir()):  # a killed run's lock alone: empty
        marker = read_marker(final)
        if not ((marker or {}).get("kind") == kind or (marker is None and is_legacy(final))):
            raise DigitError(f"{flag} {out} is not empty and is not a digit {kind} directory; choose a new folder")
    return final


def mark_dir(final: Path, kind: str) -> None:
    """Create ``final`` (if needed) and write its marker; call once, on the main process, after ``claim_dir``."""
    final.mkdir(parents=True, exist_ok=True)
    if read_marker(final) is None:
        atomic_write_json(final / MARKER, {"kind": kind})
