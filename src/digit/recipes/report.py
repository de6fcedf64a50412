"""Gather a finished recipe's figures into ``summary.json`` and the claims table ``summary.md``.

Each claim is judged by a stated rule (so the verdict is reproducible, not a reading of the numbers):
- stability: discriminative tokens change less than VQ tokens at every SNR measured;
- generation: the discriminative pipeline's FID-proxy is lower than the VQ pipeline's;
- understanding: the best-layer linear-probe top-1 of the GPT on discriminative tokens is higher.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from digit.recipes.runner import StepResult
from digit.utils.io import atomic_write_bytes, atomic_write_json, read_json


def _load(root: Path, name: str) -> dict[str, Any] | None:
    p = root / name
    return read_json(p) if p.is_file() else None


def _last_metric(run: Path, key: str) -> float | None:
    """The last value of ``key`` in a run's metrics.jsonl."""
    p = run / "metrics.jsonl"
    if not p.is_file():
        return None
    value = None
    for line in p.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by an interruption
        if key in rec:
            value = rec[key]
    return value


def _change_rates(stab: dict[str, Any] | None) -> dict[str, float]:
    if not stab:
        return {}
    return {f"{snr:g}": float(rate) for snr, rate in zip(stab["snr_db"], stab["token_change_rate"])}


def _usage(token_dir: Path) -> dict[str, float] | None:
    """Distinct ids and perplexity (exp of the id histogram's entropy) of a token directory: a tokenizer that uses
    few codes is trivially stable, so stability is read next to these."""
    import numpy as np

    if not (token_dir / "tokens.npy").is_file():
        return None
    ids = np.load(token_dir / "tokens.npy").ravel()
    p = np.bincount(ids) / len(ids)
    p = p[p > 0]
    return {"distinct": int(len(p)), "perplexity": float(np.exp(-(p * np.log(p)).sum()))}


def collect(root: str | Path) -> dict[str, Any]:
    root = Path(root)
    fd = {k: _load(root, f"fd-{k}.json") for k in ("digit", "vq", "train")}
    probe = {k: _load(root, f"probe-{k}.json") for k in ("digit", "vq")}
    return {
        "encoder_knn_top1": _last_metric(root / "encoder", "knn_top1"),
        "eval_encoder_knn_top1": _last_metric(root / "eval-encoder", "knn_top1"),
        "vq_psnr": _last_metric(root / "vq", "generator_psnr"),
        "val_loss": {k: _last_metric(root / k, "val_loss") for k in ("stage1", "stage2", "gpt-vq")},
        "stability_change_rate": {
            "digit": _change_rates(_load(root, "stability-digit.json")),
            "vq": _change_rates(_load(root, "stability-vq.json")),
        },
        "val_token_usage": {"digit": _usage(root / "tokens-val"), "vq": _usage(root / "vq-tokens-val")},
        "fd": {k: (v or {}).get("fd") for k, v in fd.items()},
        "probe_best_top1": {k: (v or {}).get("best_top1") for k, v in probe.items()},
        "probe_best_layer": {k: (v or {}).get("best_name") for k, v in probe.items()},
    }


def _verdict(ok: bool | None) -> str:
    return {True: "reproduced", False: "not reproduced", None: "not measured"}[ok]


def claims_table(s: dict[str, Any]) -> tuple[str, dict[str, bool | None]]:
    st = s["stability_change_rate"]
    snrs = [k for k in st["digit"] if k in st["vq"]]
    fd, pr = s["fd"], s["probe_best_top1"]
    verdicts = {
        "stability": all(st["digit"][k] < st["vq"][k] for k in snrs) if snrs else None,
        "generation": (fd["digit"] < fd["vq"]) if fd["digit"] is not None and fd["vq"] is not None else None,
        "understanding": (pr["digit"] > pr["vq"]) if pr["digit"] is not None and pr["vq"] is not None else None,
    }

    def f(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    rows = ["| claim | measure | discriminative tokens | VQ tokens | verdict |", "|---|---|---|---|---|"]
    for k in snrs:
        rows.append(
            f"| stability | token change rate at SNR {k} dB (lower is better) | {st['digit'][k]:.4f} | "
            f"{st['vq'][k]:.4f} | {_verdict(verdicts['stability'])} |"
        )
    rows.append(
        f"| generation | FID-proxy, evaluation encoder (lower is better; real train vs val: {f(fd['train'], '.3f')}) "
        f"| {f(fd['digit'], '.3f')} | {f(fd['vq'], '.3f')} | {_verdict(verdicts['generation'])} |"
    )
    use = s.get("val_token_usage") or {}
    if use.get("digit") and use.get("vq"):
        rows.append(
            f"| (context) | distinct ids / perplexity on the validation split | {use['digit']['distinct']} / "
            f"{use['digit']['perplexity']:.0f} | {use['vq']['distinct']} / {use['vq']['perplexity']:.0f} | - |"
        )
    lay = s["probe_best_layer"]
    rows.append(
        f"| understanding | linear-probe top-1 on val, best layer ({lay['digit']} / {lay['vq']}) | "
        f"{f(pr['digit'], '.2%')} | {f(pr['vq'], '.2%')} | {_verdict(verdicts['understanding'])} |"
    )
    return "\n".join(rows), verdicts


def write_summary(root: str | Path, results: list[StepResult], size: str) -> str:
    root = Path(root)
    s = collect(root)
    table, verdicts = claims_table(s)
    s["verdicts"] = verdicts
    s["size"] = size
    s["steps"] = [{"name": r.name, "command": r.command, "wall_s": round(r.wall_s, 1)} for r in results]
    s["total_wall_s"] = round(sum(r.wall_s for r in results), 1)
    atomic_write_json(root / "summary.json", s)
    lines = [
        f"# digit recipe cifar10 ({size}): {root}",
        "",
        table,
        "",
        "| step | wall time | command |",
        "|---|---|---|",
    ]
    lines += [f"| {r.name} | {r.wall_s / 60:.1f} min | `{r.command}` |" for r in results]
    lines.append(f"\nTotal: {s['total_wall_s'] / 60:.1f} min.")
    md = "\n".join(lines) + "\n"
    atomic_write_bytes(root / "summary.md", md.encode())
    return md
