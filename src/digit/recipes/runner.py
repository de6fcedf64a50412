"""Run a recipe: an ordered list of `digit` commands, each resumable, each timed, nothing lost on interruption.

A step is one `digit` command line run in its own process (so every step is exactly what a user would type, and the
recipe prints them). A step that finished leaves ``.recipe/<name>.json`` (its command and wall time); running the
recipe again skips it. A training step interrupted after a checkpoint continues with ``--resume``; any other
unfinished step is started again from scratch. A step with a ``key`` (a string naming everything its output depends
on, e.g. the reference set of FID statistics) is also redone when the key recorded in its marker differs: that is how
a cached result is reused across seeds and routes and invalidated when what it was computed from changes.
"""

from __future__ import annotations

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
    key: str | None = None  # what the output was computed from; a marker with another key means: redo the step


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


def _skipped(step: Step, rec: dict[str, Any]) -> StepResult:
    return StepResult(step.name, rec["command"], float(rec["wall_s"]), True, rec.get("info", {}))


def finished_steps(steps: list[Step], root: str | Path) -> list[StepResult]:
    """The steps of ``steps`` that have finished in ``root`` (a marker with the step's key), as `run_steps` reports
    skipped ones. Runs, removes and writes nothing: safe beside a recipe that is still running there."""
    out = []
    for step in steps:
        rec = _record(Path(root), step)
        if rec is not None and rec.get("key") == step.key:
            out.append(_skipped(step, rec))
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
    for i, step in enumerate(steps, 1):
        marker = _marker(root, step)
        head = f"[{i}/{len(steps)}] {step.name}: {step.what}"
        rec = _record(root, step)
        stale = rec is not None and rec.get("key") != step.key
        if (rec is not None and not stale) or (only is not None and step.name not in only):
            rec = rec or {"command": command_line(step), "wall_s": 0.0}
            log(f"{head} (done, skipped)")
            results.append(_skipped(step, rec))
            continue
        if stale:
            log(f"{head}: what it was computed from changed (key {rec.get('key')!r} -> {step.key!r}); redoing it")
            marker.unlink()
        log(f"{head}\n    $ {command_line(step)}")
        t0 = time.perf_counter()
        info: dict[str, Any] = {}
        if step.call is not None:
            info = step.call(root) or {}
        else:
            argv = list(step.argv)
            target = root / step.out if step.out else None
            if target is not None and target.exists():
                if step.resumable and not stale and (target / "train_state.pt").is_file():
                    argv.append("--resume")
                    log("    (continuing from its last checkpoint)")
                elif target.is_dir():
                    shutil.rmtree(target)
                else:
                    target.unlink()
            returncode = _run_child([python, "-m", "digit", *argv], root, step.name, log)
            if returncode != 0:
                raise DigitError(
                    f"step {step.name} failed (exit {returncode}); fix the cause and run the recipe again: "
                    "finished steps are kept"
                )
        wall = time.perf_counter() - t0
        rec = {"command": command_line(step), "wall_s": round(wall, 1), "info": info, "key": step.key}
        atomic_write_json(marker, rec)
        log(f"    done in {wall / 60:.1f} min")
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
