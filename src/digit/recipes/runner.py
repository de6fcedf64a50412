"""Run a recipe: an ordered list of `digit` commands, each resumable, each timed, nothing lost on interruption.

A step is one `digit` command line run in its own process (so every step is exactly what a user would type, and the
recipe prints them). A step that finished leaves ``.recipe/<name>.json`` (its command and wall time); running the
recipe again skips it. A training step interrupted after a checkpoint continues with ``--resume`` (its recorded wall
time is the sum over its runs); any other unfinished step is started again from scratch.

A finished step is redone when what it was computed from changed, as make would: its command line, its ``key`` (a
string naming anything else its output depends on, e.g. the reference set of FID statistics) or a step it depends on
(an earlier step whose output path appears among its arguments or ``inputs``) that finished again since. The marker
records a fingerprint of all three; a downstream step compares the marker of each step it depends on, byte for byte,
so redoing a step redoes everything computed from it, and nothing else. Markers written before fingerprints existed
are compared on their key alone.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from digit.errors import DigitError
from digit.utils.io import atomic_write_json, read_json
from digit.utils.outputs import mark_dir

DONE_DIR = ".recipe"


@dataclass
class Step:
    name: str
    argv: list[str]  # arguments of `digit` (no program name); paths relative to the recipe directory
    out: str | None = None  # what the step writes (removed when an unfinished non-resumable step restarts)
    resumable: bool = False  # a trainer run: continue from its checkpoint with --resume
    what: str = ""  # one line for the log and the report
    call: Callable[[Path], dict[str, Any]] | None = None  # an in-process step (no command), e.g. the data split
    key: str | None = None  # what else the output was computed from; a marker with another key means: redo the step
    inputs: tuple[str, ...] = ()  # paths it reads that are not in argv (an in-process step's inputs)


@dataclass
class StepResult:
    name: str
    command: str
    wall_s: float
    skipped: bool = False
    info: dict[str, Any] = field(default_factory=dict)


def command_line(step: Step) -> str:
    if step.call is not None:
        return f"(in process) {step.what}"
    return "digit " + shlex.join(step.argv)


def _marker(root: Path, step: Step) -> Path:
    return root / DONE_DIR / f"{step.name}.json"


def _record(root: Path, step: Step) -> dict[str, Any] | None:
    marker = _marker(root, step)
    return read_json(marker) if marker.is_file() else None


def _reads(step: Step, earlier: Step) -> bool:
    if earlier.out is None:
        return False
    out = earlier.out.rstrip("/")
    return any(a == out or a.startswith(out + "/") for a in (*step.argv, *step.inputs))


def _dependencies(steps: list[Step]) -> list[list[Step]]:
    return [[e for e in steps[:i] if _reads(step, e)] for i, step in enumerate(steps)]


def _fingerprint(root: Path, step: Step, needs: list[Step]) -> str:
    """The step's command, its key and the current markers of the steps it depends on (final at the step's turn)."""
    parts = [command_line(step), step.key]
    for d in needs:
        m = _marker(root, d)
        parts.append([d.name, hashlib.sha256(m.read_bytes()).hexdigest() if m.is_file() else None])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def _stale(step: Step, rec: dict[str, Any], fingerprint: str) -> str | None:
    """Why a finished step's marker no longer holds (None: it holds)."""
    if rec.get("key") != step.key:
        return f"what it was computed from changed (key {rec.get('key')!r} -> {step.key!r})"
    if "inputs" in rec and rec["inputs"] != fingerprint:
        return "its command, or a step it depends on, changed since it finished"
    return None


def _skipped(step: Step, rec: dict[str, Any]) -> StepResult:
    return StepResult(step.name, rec["command"], float(rec["wall_s"]), True, rec.get("info", {}))


def finished_steps(steps: list[Step], root: str | Path) -> list[StepResult]:
    """The steps of ``steps`` that have finished in ``root`` (a marker with the step's key), as `run_steps` reports
    skipped ones. Runs, removes and writes nothing: safe beside a recipe that is still running there."""
    root, out, done = Path(root), [], set()
    for step, needs in zip(steps, _dependencies(steps), strict=True):
        rec = _record(root, step)
        if (
            rec is not None
            and all(d.name in done for d in needs)  # a step that will be redone redoes what depends on it
            and _stale(step, rec, _fingerprint(root, step, needs)) is None
        ):
            out.append(_skipped(step, rec))
            done.add(step.name)
    return out


def run_steps(
    steps: list[Step],
    root: str | Path,
    *,
    python: str = sys.executable,
    log: Callable[[str], None] = print,
    only: set[str] | None = None,
) -> list[StepResult]:
    """Run ``steps`` in order inside ``root``. Returns one result per step (skipped ones carry their recorded time)."""
    root = Path(root)
    mark_dir(root, "recipe")  # the caller checked it with claim_dir: a recipe directory of ours, or new
    results = []
    dependencies = _dependencies(steps)
    for i, step in enumerate(steps, 1):
        marker = _marker(root, step)
        head = f"[{i}/{len(steps)}] {step.name}: {step.what}"
        rec = _record(root, step)
        fingerprint = _fingerprint(root, step, dependencies[i - 1])
        why = None if rec is None else _stale(step, rec, fingerprint)
        stale = why is not None
        if (rec is not None and not stale) or (only is not None and step.name not in only):
            rec = rec or {"command": command_line(step), "wall_s": 0.0}
            log(f"{head} (done, skipped)")
            results.append(_skipped(step, rec))
            continue
        if stale:
            log(f"{head}: {why}; redoing it")
            marker.unlink()
        log(f"{head}\n    $ {command_line(step)}")
        t0 = time.perf_counter()
        info: dict[str, Any] = {}
        partial = root / DONE_DIR / f"{step.name}.partial.json"
        earlier = 0.0  # wall time of the earlier runs a resumed trainer continues
        if step.call is not None:
            info = step.call(root) or {}
        else:
            argv = list(step.argv)
            target = root / step.out if step.out else None
            if target is not None and target.exists():
                if step.resumable and not stale and (target / "train_state.pt").is_file():
                    argv.append("--resume")
                    earlier = float(read_json(partial).get("wall_s", 0.0)) if partial.is_file() else 0.0
                    log("    (continuing from its last checkpoint)")
                elif target.is_dir():
                    shutil.rmtree(target)
                else:
                    target.unlink()
            try:
                returncode = _run_child([python, "-m", "digit", *argv], root, step.name, log)
            except BaseException:  # interrupted: a trainer's next run continues, and its wall time adds to this one
                if step.resumable:
                    atomic_write_json(partial, {"wall_s": round(earlier + time.perf_counter() - t0, 1)})
                raise
            if returncode != 0:
                if step.resumable:
                    atomic_write_json(partial, {"wall_s": round(earlier + time.perf_counter() - t0, 1)})
                raise DigitError(
                    f"step {step.name} failed (exit {returncode}); fix the cause and run the recipe again: "
                    "finished steps are kept"
                )
        wall = earlier + time.perf_counter() - t0
        rec = {"command": command_line(step), "wall_s": round(wall, 1), "info": info, "key": step.key,
               "inputs": fingerprint, "finished": time.time()}  # fmt: skip
        atomic_write_json(marker, rec)
        partial.unlink(missing_ok=True)
        log(f"    done in {wall / 60:.1f} min" + (f" ({earlier / 60:.1f} of them in earlier runs)" if earlier else ""))
        results.append(StepResult(step.name, rec["command"], wall, False, info))
    return results


def _run_child(argv: list[str], cwd: Path, name: str, log: Callable[[str], None]) -> int:
    """Run one step; on Ctrl-C wait for it (subprocess.run would kill it within 0.25 s). The child shares our process
    group, so it got the signal too: a trainer finishes its step and writes a checkpoint the next run resumes from. The
    trainer gives up on its checkpoint at its third signal; only a fourth makes us kill it."""
    proc = subprocess.Popen(argv, cwd=cwd)
    interrupts = 0
    while True:
        try:
            code = proc.wait()
            break
        except KeyboardInterrupt:
            interrupts += 1
            if interrupts == 1:
                log(f"    interrupted: waiting for {name} to stop (interrupt three more times to kill it)")
            if interrupts >= 4:
                proc.kill()
                proc.wait()
                raise
    if interrupts:
        raise KeyboardInterrupt
    return code
