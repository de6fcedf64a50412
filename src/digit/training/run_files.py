"""What a run directory holds beyond checkpoints: the config a resume must match, and the metrics log a resume
rewinds to its checkpoint's step."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from digit.utils.io import atomic_write_bytes

# Keys of the "train" config that may change between a run and its resume. ``parallel``: checkpoints hold full
# (gathered) state dicts and each rank's RNG state, so a run may resume under another layout (and runs of
# `encoder pretrain` from before its default became "none", like the others', still resume).
MUTABLE_KEYS = {
    "parallel",
    "steps",
    "epochs",
    "save_every",
    "eval_every",
    "log_every",
    "num_workers",
    "compile",
    "progress",
    "resume",
}


def compare_configs(stored: dict, new: dict) -> list[str]:
    """Keys (dotted) whose values differ, ignoring the mutable train keys."""
    diffs = []

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                if path == "train" and k in MUTABLE_KEYS:
                    continue
                walk(a.get(k), b.get(k), f"{path}.{k}" if path else k)
        elif a != b:
            diffs.append(path)

    walk(json.loads(json.dumps(stored)), json.loads(json.dumps(new)), "")
    return diffs


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the log lines of ``path`` (metrics.jsonl) written after ``step``, the checkpoint a run resumes from: they
    will be written again."""
    if not path.exists():
        return
    keep = []
    for ln in path.read_text().splitlines():
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if rec.get("step", 0) <= step:
            keep.append(ln)
    atomic_write_bytes(path, "".join(ln + "\n" for ln in keep).encode())
