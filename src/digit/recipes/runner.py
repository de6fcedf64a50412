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


# flags that change how a step runs, not what it computes (the data loaders' item RNG is per image): a run moved to a
# machine with another core count is not redone
NOT_FINGERPRINTED = frozenset({"--workers"})


def _result_args(step: Step) -> list[str] | None:
    if step.call is not None:
        return None  # an in-process step: its key says what it computes (its log line may be reworded freely)
    args, skip = [], False
    for a in step.argv:
        if skip:
            skip = False
        elif a in NOT_FINGERPRINTED:
            skip = True
        else:
            args.append(a)
    return args


def _fingerprint(root: Path, step: Step, needs: list[Step]) -> str:
    """The step's command (less `NOT_FINGERPRINTED`), its key and the current markers of the steps it depends on
    (final at the step's turn)."""
    parts = [_result_args(step), step.key]
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
    """The steps of ``steps`` that have finished in ``root`` and would be skipped (their marker still holds, and so do
    those of the steps they read), as `run_steps` reports skipped ones. Runs, removes and writes nothing: safe beside a recipe that is still running there."""
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
) -> list[StepResult]:
    """Run ``steps`` in order inside ``root``. Returns one result per step (skipped ones carry their recorded time)."""
    root = Path(root)
    mark_dir(root, "recipe")  # the caller checked it with claim_dir: a recipe directory of ours, or new
    results, ran = [], set()
    dependencies = _dependencies(steps)
    for i, step in enumerate(steps, 1):
        marker = _marker(root, step)
        head = f"[{i}/{len(steps)}] {step.name}: {step.what}"
        rec = _record(root, step)
        needs = dependencies[i - 1]
        fingerprint = _fingerprint(root, step, needs)
        redone = [d.name for d in needs if d.name in ran]
        why = None if rec is None else _stale(step, rec, fingerprint)
        if rec is not None and why is None and redone:  # a marker from before fingerprints: judged by what ran now
            why = f"{redone[0]}, which it reads, was just redone"
        stale = why is not None
        if rec is not None and not stale:
            log(f"{head} (done, skipped)")
            results.append(_skipped(step, rec))
            continue
        ran.add(step.name)
        if stale:
            log(f"{head}: {why}; redoing it")
            marker.unlink()
        log(f"{head}\n    $ {command_line(step)}")
        t0 = time.perf_counter()
        info: dict[str, Any] = {}
        earlier = 0.0  # a resumed trainer's wall time in its earlier runs
        if step.call is not None:
            info = step.call(root) or {}
        else:
            earlier = _run_command(step, root, fingerprint, stale, python, log)
        wall = earlier + time.perf_counter() - t0
        rec = {"command": command_line(step), "wall_s": round(wall, 1), "info": info, "key": step.key,
               "inputs": fingerprint, "finished": time.time()}  # fmt: skip
        atomic_write_json(marker, rec)
        _partial(root, step).unlink(missing_ok=True)
        log(f"    done in {wall / 60:.1f} min" + (f" ({earlier / 60:.1f} of them in earlier runs)" if earlier else ""))
        results.append(StepResult(step.name, rec["command"], wall, False, info))
    return results


def _partial(root: Path, step: Step) -> Path:
    """A trainer's unfinished run: the inputs its checkpoint was made from, and the wall time spent on it so far."""
    return root / DONE_DIR / f"{step.name}.partial.json"


def _run_command(
    step: Step, root: Path, fingerprint: str, stale: bool, python: str, log: Callable[[str], None]
) -> float:
    """Run a command step: continue a trainer's checkpoint made from the same inputs, else start clean. Returns the
    wall time of the earlier runs it continued."""
    argv, earlier, t0 = list(step.argv), 0.0, time.perf_counter()
    partial = _partial(root, step)
    target = root / step.out if step.out else None
    if target is not None and target.exists():
        began = read_json(partial) if partial.is_file() else {}
        same_inputs = began.get("inputs", fingerprint) == fingerprint  # no record (an older run): as before
        if step.resumable and not stale and same_inputs and (target / "train_state.pt").is_file():
            argv.append("--resume")
            earlier = float(began.get("wall_s", 0.0))
            log("    (continuing from its last checkpoint)")
        elif target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()

    def note_partial() -> None:
        if step.resumable:
            spent = round(earlier + time.perf_counter() - t0, 1)
            atomic_write_json(partial, {"inputs": fingerprint, "wall_s": spent})

    note_partial()  # before the child starts: a run killed outright still records its inputs
    try:
        returncode = _run_child([python, "-m", "digit", *argv], root, step.name, log)
    except BaseException:  # interrupted: a trainer's next run continues, and its wall time adds to this one
        note_partial()
        raise
    if returncode != 0:
        note_partial()
        raise DigitError(
            f"step {step.name} failed (exit {returncode}); fix the cause and run the recipe again: finished steps are kept"
        )
    return earlier


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
