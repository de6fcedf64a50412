"""Gather a recipe directory's figures into ``summary.json`` and the claims tables ``summary.md``.

Per route and seed, :func:`collect_run` reads one complete comparison (the old single-run figures); over seeds,
:func:`aggregate` gives mean, sample standard deviation (n - 1) and min / max of every figure. The verdicts follow
rules fixed before the multi-seed run (results/cifar10.md, "Decision rules for the multi-seed re-run"):
- generation (Inception FID; the FD in EfficientNet-Lite1 is reported beside it by the same rule): reproduced if the
  discriminative pipeline's mean is lower and the two seed ranges [min, max] do not overlap; not reproduced if the VQ
  pipeline's mean is lower and the ranges do not overlap; inconclusive when they overlap; the generation claim as a
  whole takes the two feature spaces' common verdict, and is disputed between feature spaces when they differ;
- understanding (best-layer linear probe top-1): the same rule with higher = better;
- stability (token change rate at 30 / 20 / 10 dB; the tokenizers have no GPT seed): reproduced if the discriminative
  tokens change less at every SNR, not reproduced otherwise;
- with fewer than 3 seeds a seeded verdict is marked provisional.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path
from typing import Any

from digit.recipes.runner import StepResult
from digit.utils.io import atomic_write_bytes, atomic_write_json, read_json

MIN_SEEDS = 3
SNRS = ("30", "20", "10")


def _load(root: Path, name: str) -> dict[str, Any] | None:
    p = root / name
    return read_json(p) if p.is_file() else None


def _get(root: Path, name: str, key: str) -> float | None:
    return (_load(root, name) or {}).get(key)


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


def _embedding_top1(probe: dict[str, Any] | None) -> float | None:
    rows = [r for r in (probe or {}).get("layers", []) if r.get("layer") == 0]
    return rows[0]["top1"] if rows else None


def collect_run(root: str | Path, route: str, seed: int) -> dict[str, Any]:
    """One route and seed: the discriminative pipeline against the VQ pipeline of the same GPT seed."""
    root = Path(root)
    rs, v = f"{route}/seed{seed}", f"seed{seed}"
    probe = {"digit": _load(root, f"{rs}/probe.json"), "vq": _load(root, f"{v}/probe-vq.json")}
    return {
        "route": route,
        "seed": seed,
        "encoder_knn_top1": _last_metric(root / route / "encoder", "knn_top1"),
        "tokenizer_knn_top1": _get(root, f"{route}/knn.json", "knn_top1"),
        "vq_psnr": _last_metric(root / "vq", "generator_psnr"),
        "val_loss": {
            "stage1": _last_metric(root / rs / "stage1", "val_loss"),
            "stage2": _last_metric(root / rs / "stage2", "val_loss"),
            "gpt-vq": _last_metric(root / v / "gpt-vq", "val_loss"),
        },
        "stability_change_rate": {
            "digit": _change_rates(_load(root, f"{route}/stability.json")),
            "vq": _change_rates(_load(root, "stability-vq.json")),
        },
        "val_token_usage": {"digit": _usage(root / route / "tokens-val"), "vq": _usage(root / "vq-tokens-val")},
        "fid": {"digit": _get(root, f"{rs}/fid-digit.json", "fid"), "vq": _get(root, f"{v}/fid-vq.json", "fid"),
                "floor": _get(root, "fid/fid-floor.json", "fid")},
        "fd": {"digit": _get(root, f"{rs}/fd-digit.json", "fd"), "vq": _get(root, f"{v}/fd-vq.json", "fd"),
               "floor": _get(root, "fid/fd-floor.json", "fd")},
        "fd_space": "tf_efficientnet_lite1",
        "probe_best_top1": {k: (p or {}).get("best_top1") for k, p in probe.items()},
        "probe_best_layer": {k: (p or {}).get("best_name") for k, p in probe.items()},
        "probe_embedding_top1": {k: _embedding_top1(p) for k, p in probe.items()},
    }  # fmt: skip


# figures aggregated over seeds: (label, path into a run, format, lower is better)
SEEDED = (
    ("FID (Inception), discriminative", ("fid", "digit"), ".2f"),
    ("FID (Inception), VQ", ("fid", "vq"), ".2f"),
    ("FD (EfficientNet-Lite1), discriminative", ("fd", "digit"), ".3f"),
    ("FD (EfficientNet-Lite1), VQ", ("fd", "vq"), ".3f"),
    ("val loss stage 1", ("val_loss", "stage1"), ".4f"),
    ("val loss stage 2", ("val_loss", "stage2"), ".4f"),
    ("val loss VQ-token GPT", ("val_loss", "gpt-vq"), ".4f"),
    ("probe best layer, discriminative", ("probe_best_top1", "digit"), ".2%"),
    ("probe best layer, VQ", ("probe_best_top1", "vq"), ".2%"),
    ("probe embedding layer, discriminative", ("probe_embedding_top1", "digit"), ".2%"),
    ("probe embedding layer, VQ", ("probe_embedding_top1", "vq"), ".2%"),
)


def spread(values: list[float | None]) -> dict[str, Any] | None:
    """Mean, sample std (n - 1; 0 for one value), min, max and n of the measured values (None when none are)."""
    xs = [float(x) for x in values if x is not None]
    if not xs:
        return None
    std = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return {"mean": statistics.fmean(xs), "std": std, "min": min(xs), "max": max(xs), "n": len(xs)}


def aggregate(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any] | None]:
    return {".".join(path): spread([r[path[0]][path[1]] for r in runs]) for _, path, _ in SEEDED}


def seeded_verdict(ours: dict | None, theirs: dict | None, lower_is_better: bool) -> str:
    """The stated rule: better mean and non-overlapping seed ranges, either way; overlap is inconclusive."""
    if not ours or not theirs:
        return "not measured"
    if ours["max"] < theirs["min"] or theirs["max"] < ours["min"]:
        ours_better = (ours["mean"] < theirs["mean"]) == lower_is_better
        verdict = "reproduced" if ours_better else "not reproduced"
    else:
        verdict = "inconclusive (seed ranges overlap)"
    if min(ours["n"], theirs["n"]) < MIN_SEEDS:
        verdict += f" (provisional: {min(ours['n'], theirs['n'])} seed(s))"
    return verdict


def generation_verdict(fid: str, fd: str) -> str:
    """Rule 2's last clause: the Inception FID decides and the FD, where measured, must agree, else the claim is
    disputed between feature spaces. Without an FID there is no verdict (never reproduced on the FD alone).
    Provisional with the fewer seeds of the two."""
    if fid == "not measured" or fd == "not measured":
        return fid
    bare_fid, seeds_fid = _split_provisional(fid)
    bare_fd, seeds_fd = _split_provisional(fd)
    seeds = [n for n in (seeds_fid, seeds_fd) if n is not None]
    suffix = f" (provisional: {min(seeds)} seed(s))" if seeds else ""
    if bare_fid == bare_fd:
        return bare_fid + suffix
    return f"disputed between feature spaces (FID: {bare_fid}; FD: {bare_fd}){suffix}"


def _split_provisional(verdict: str) -> tuple[str, int | None]:
    m = re.fullmatch(r"(.*) \(provisional: (\d+) seed\(s\)\)", verdict)
    return (m[1], int(m[2])) if m else (verdict, None)


def stability_verdict(run: dict[str, Any]) -> str:
    st = run["stability_change_rate"]
    snrs = [k for k in st["digit"] if k in st["vq"]]
    if not snrs:
        return "not measured"
    return "reproduced" if all(st["digit"][k] < st["vq"][k] for k in snrs) else "not reproduced"


def route_verdicts(agg: dict[str, Any], run: dict[str, Any]) -> dict[str, str]:
    fid = seeded_verdict(agg["fid.digit"], agg["fid.vq"], lower_is_better=True)
    fd = seeded_verdict(agg["fd.digit"], agg["fd.vq"], lower_is_better=True)
    return {
        "stability": stability_verdict(run),
        "generation (FID)": fid,
        "generation (FD, Lite1)": fd,
        "generation": generation_verdict(fid, fd),
        "understanding": seeded_verdict(agg["probe_best_top1.digit"], agg["probe_best_top1.vq"], False),
    }


def fmt_spread(sp: dict[str, Any] | None, fmt: str, of: int | None = None) -> str:
    """mean ± std [min, max]; ``of``: the seeds in the table, so a figure measured on fewer says over how many."""
    if sp is None:
        return "-"
    out = format(sp["mean"], fmt) if sp["n"] == 1 else (
        f"{sp['mean']:{fmt}} ± {sp['std']:{fmt}} [{sp['min']:{fmt}}, {sp['max']:{fmt}}]")  # fmt: skip
    return out if of is None or sp["n"] >= of else f"{out} (n = {sp['n']} of {of})"


def claims_rows(runs: list[dict[str, Any]], agg: dict[str, Any], verdicts: dict[str, str]) -> list[dict[str, str]]:
    """The claims table of one route, as rows of formatted cells (``claim``, ``measure``, ``digit``, ``vq``,
    ``verdict``): what ``summary.md`` prints, ``digit recipe ship`` records and ``digit demo`` shows."""
    run0, n = runs[0], len(runs)
    st, use = run0["stability_change_rate"], run0["val_token_usage"]

    def row(claim: str, measure: str, digit: str, vq: str, verdict: str) -> dict[str, str]:
        return {"claim": claim, "measure": measure, "digit": digit, "vq": vq, "verdict": verdict}

    rows = []
    if run0.get("tokenizer_knn_top1") is not None:
        rows.append(row("(context)", "encoder: kNN top-1 on val of the mean-pooled tokenizer features",
                        f"{run0['tokenizer_knn_top1']:.2%}", "", "-"))  # fmt: skip
    rows += [row("stability", f"token change rate at SNR {k} dB (lower is better)", f"{st['digit'][k]:.4f}",
                f"{st['vq'][k]:.4f}", verdicts["stability"])
            for k in SNRS if k in st["digit"] and k in st["vq"]]  # fmt: skip
    if use.get("digit") and use.get("vq"):
        d, q = use["digit"], use["vq"]
        rows.append(row("(context)", "distinct ids / perplexity on val", f"{d['distinct']} / {d['perplexity']:.0f}",
                        f"{q['distinct']} / {q['perplexity']:.0f}", "-"))  # fmt: skip
    for claim, metric, fmt, what in (
        ("generation (FID)", "fid", ".2f", "Inception FID, samples vs training-set statistics (lower is better)"),
        ("generation (FD, Lite1)", "fd", ".3f", "FD in EfficientNet-Lite1 (lower is better)"),
        ("understanding", "probe_best_top1", ".2%", "linear-probe top-1 on val, best layer"),
    ):
        rows.append(row(claim, what, fmt_spread(agg[f"{metric}.digit"], fmt, n), fmt_spread(agg[f"{metric}.vq"], fmt, n),
                        verdicts[claim]))  # fmt: skip
        if metric == "fd":  # summaries written before rule 2's combined verdict was recorded lack the key
            both = verdicts.get("generation") or generation_verdict(verdicts["generation (FID)"], verdicts[claim])
            rows.append(row("generation", "FID and FD together (disputed when they disagree)", "", "", both))
    rows.append(row("(context)", "linear probe, embedding layer", fmt_spread(agg["probe_embedding_top1.digit"], ".2%", n),
                    fmt_spread(agg["probe_embedding_top1.vq"], ".2%", n), "-"))  # fmt: skip
    floor = run0["fid"]["floor"], run0["fd"]["floor"]
    if floor[0] is not None or floor[1] is not None:
        f0 = "-" if floor[0] is None else f"{floor[0]:.2f}"
        f1 = "-" if floor[1] is None else f"{floor[1]:.3f}"
        rows.append(row("(floor)", "held-out real images vs the same statistics: FID / FD", f"{f0} / {f1}", "", "-"))
    return rows


def claims_markdown(rows: list[dict[str, str]]) -> list[str]:
    out = ["| claim | measure | discriminative tokens | VQ tokens | verdict |", "|---|---|---|---|---|"]
    return out + [f"| {r['claim']} | {r['measure']} | {r['digit']} | {r['vq']} | {r['verdict']} |" for r in rows]


def route_table(route: str, runs: list[dict[str, Any]], agg: dict[str, Any], verdicts: dict[str, str]) -> str:
    seeds = ", ".join(str(r["seed"]) for r in runs)
    rows = [f"### Route `{route}` (GPT seeds {seeds}: mean ± std [min, max])", ""]
    rows += claims_markdown(claims_rows(runs, agg, verdicts))
    rows += ["", "| figure | " + " | ".join(f"seed {r['seed']}" for r in runs) + " | mean ± std [min, max] |",
             "|---|" + "---|" * (len(runs) + 1)]  # fmt: skip
    for label, (a, b), fmt in SEEDED:
        vals = ["-" if r[a][b] is None else format(r[a][b], fmt) for r in runs]
        rows.append(f"| {label} | " + " | ".join(vals) + f" | {fmt_spread(agg[f'{a}.{b}'], fmt, len(runs))} |")
    return "\n".join(rows)


def baseline_column(baseline: dict[str, Any] | None, routes: dict[str, Any]) -> str:
    """How much the encoder matters: each route's means beside the first single-seed CPU-DINO run."""
    cols = list(routes)
    head = ["| figure |"]
    if baseline:
        head.append(" first run: CPU DINO, 1 seed, 600-step GPTs, FID-proxy in a DINO eval encoder |")
    head += [f" `{r}` (mean of {len(routes[r]['runs'])} seed(s)) |" for r in cols]
    rows = ["".join(head), "|---|" + "---|" * (len(cols) + bool(baseline))]

    def base(path: tuple[str, ...], fmt: str) -> str:
        v: Any = baseline
        for k in path:
            v = (v or {}).get(k) if isinstance(v, dict) else None
        return "-" if v is None else format(v, fmt)

    lines = [("encoder kNN top-1 on val (DINO monitor, CLS)", ("encoder_knn_top1",), ".2%"),
             ("kNN top-1 on val, mean-pooled tokenizer features", ("tokenizer_knn_top1",), ".2%"),
             *[(f"token change rate at {k} dB", ("stability_change_rate", "digit", k), ".4f") for k in SNRS],
             ("Inception FID, discriminative", ("fid", "digit"), ".2f"),
             ("FD / FID-proxy, discriminative", ("fd", "digit"), ".3f"),
             ("val loss stage 1", ("val_loss", "stage1"), ".4f"),
             ("val loss stage 2", ("val_loss", "stage2"), ".4f"),
             ("probe best layer, discriminative", ("probe_best_top1", "digit"), ".2%")]  # fmt: skip
    for label, path, fmt in lines:
        cells = [base(path, fmt)] if baseline else []
        for r in cols:
            run0, agg = routes[r]["runs"][0], routes[r]["aggregate"]
            sp = agg.get(".".join(path)) if len(path) == 2 else None
            if sp is not None:
                cells.append(format(sp["mean"], fmt))
            else:
                v: Any = run0
                for k in path:
                    v = v.get(k) if isinstance(v, dict) else None
                cells.append("-" if v is None else format(v, fmt))
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def summarise(root: str | Path, routes: list[str], seeds: list[int], baseline: dict | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"routes": {}}
    for r in routes:
        runs = [collect_run(root, r, s) for s in seeds]
        agg = aggregate(runs)
        out["routes"][r] = {"runs": runs, "aggregate": agg, "verdicts": route_verdicts(agg, runs[0])}
    out["baseline"] = baseline
    return out


def write_summary(
    root: str | Path,
    results: list[StepResult],
    size: str,
    routes: list[str],
    seeds: list[int],
    baseline: str | Path | None = None,
) -> str:
    root = Path(root)
    base = read_json(baseline) if baseline else None
    s = summarise(root, routes, seeds, base)
    s["size"] = size
    s["steps"] = [{"name": r.name, "command": r.command, "wall_s": round(r.wall_s, 1)} for r in results]
    s["total_wall_s"] = round(sum(r.wall_s for r in results), 1)
    atomic_write_json(root / "summary.json", s)
    lines = [f"# digit recipe cifar10 ({size}): {root}", ""]
    for r in routes:
        rr = s["routes"][r]
        lines += [route_table(r, rr["runs"], rr["aggregate"], rr["verdicts"]), ""]
    lines += ["### How much the encoder matters", "", baseline_column(base, s["routes"]), ""]
    lines += ["| step | wall time | command |", "|---|---|---|"]
    lines += [f"| {r.name} | {r.wall_s / 60:.1f} min | `{r.command}` |" for r in results]
    lines.append(f"\nTotal: {s['total_wall_s'] / 60:.1f} min.")
    md = "\n".join(lines) + "\n"
    atomic_write_bytes(root / "summary.md", md.encode())
    return md
