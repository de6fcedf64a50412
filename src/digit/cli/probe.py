"""`digit probe`: linear-probe top-1 of every layer of a frozen GPT (features extracted once, probes trained together).

    digit probe --run RUN --tokens TRAIN_TOKENS --val-tokens VAL_TOKENS [--layers all|0,3,5] [--epochs E] [--out FILE.json]

Works for a GPT trained on any tokenizer (discriminative or VQ tokens), so the paper's comparison is one command each.
Defaults follow DiGIT's probe (SGD momentum 0.9, lr 0.4, batch 1024, cosine, no weight decay); the last layer, which
the official code never probes, is reported and marked.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from digit.cli.common import add_device_arg, existing_dir, non_negative_int, positive_int
from digit.errors import DigitError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "probe",
        help="linear probes on every layer of a frozen GPT",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--run", type=existing_dir, required=True, help="GPT run directory (config.json + model.safetensors)"
    )
    p.add_argument("--tokens", type=existing_dir, required=True, help="labeled training token directory")
    p.add_argument("--val-tokens", type=existing_dir, required=True, help="labeled validation token directory")
    p.add_argument("--layers", default="all", help="'all' or comma-separated hidden-state indices (0 = embedding)")
    p.add_argument("--epochs", type=positive_int, default=10)
    p.add_argument("--lr", type=float, default=0.4, help="peak SGD learning rate (cosine to 0)")
    p.add_argument("--batch-size", type=positive_int, default=1024, help="probe training batch")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--feature-batch-size", type=positive_int, default=64, help="GPT forward batch for extraction")
    p.add_argument(
        "--train-limit",
        type=positive_int,
        default=None,
        help="probe-train on a seeded random subset of this many training rows (validation stays whole)",
    )
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument(
        "--cache-dir",
        default=None,
        help="keep extracted features here (.npy memmaps, reused next time); use it for large sets, whose "
        "[layers, N, dim] float32 features may not fit in memory",
    )
    p.add_argument("--out", default=None, metavar="FILE.json")
    add_device_arg(p)
    p.set_defaults(func=run)


def parse_layers(value: str, n_states: int) -> list[int]:
    if value == "all":
        return list(range(n_states))
    try:
        layers = [int(v) for v in value.split(",") if v.strip()]
    except ValueError as e:
        raise DigitError(f"--layers must be 'all' or comma-separated integers, got {value!r}") from e
    bad = [v for v in layers if not 0 <= v < n_states]
    if bad or not layers:
        raise DigitError(
            f"--layers {value}: indices must lie in [0, {n_states - 1}] (0 = embedding, {n_states - 1} = last)"
        )
    return sorted(set(layers))


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from digit.cli.common import resolve_device
    from digit.data.tokens import check_provenance, class_label_map, read_token_dir
    from digit.evaluation.probe import cached_gpt_features, feature_cache_key, summarize, train_linear_probes
    from digit.models import load_gpt_run
    from digit.utils.io import atomic_write_json, file_sha256

    device = resolve_device(args.device)
    model, run_config = load_gpt_run(args.run, device=device)
    cfg = model.config
    n_states = cfg.n_layers + 1
    layers = parse_layers(args.layers, n_states)
    train, val = read_token_dir(args.tokens), read_token_dir(args.val_tokens)
    for t in (train, val):
        check_provenance(t, (run_config.get("data") or {}).get("meta"), "tokenizer")
        if tuple(t.grid) != tuple(cfg.grid):
            raise DigitError(f"{t.path}: token grid {t.grid} differs from the model's {tuple(cfg.grid)}")
        if t.vocab_size > cfg.vocab_size:
            raise DigitError(f"{t.path}: vocabulary {t.vocab_size} exceeds the model's {cfg.vocab_size}")
        if not t.labeled:
            raise DigitError(f"{t.path}: probing needs every row labeled (labels.npy has -1 entries)")
    label_map = class_label_map(train, val)  # val's class ids as train's, by name
    val_labels_all = val.labels if label_map is None else label_map[val.labels]
    num_classes = max(train.num_classes, val.num_classes, int(train.labels.max()) + 1, int(val_labels_all.max()) + 1)
    # val is scored on each image once, its original view (a --flip directory also holds the mirrored grids)
    val_rows = val.views.index("orig") * val.n_images + np.arange(val.n_images) if "orig" in val.views else None
    rows = {"train": np.arange(len(train)), "val": np.arange(len(val)) if val_rows is None else val_rows}
    val_labels = np.asarray(val_labels_all[rows["val"]])
    if args.train_limit is not None and args.train_limit < len(train):
        # token directories are sorted by class: a prefix would hold only the first classes
        pick = np.random.default_rng(args.seed).choice(len(train), args.train_limit, replace=False)
        rows["train"] = np.sort(pick)

    weights_sha = file_sha256(Path(args.run) / "model.safetensors")
    feats = {}
    for name, t in (("train", train), ("val", val)):
        grids = np.asarray(t.tokens[rows[name]])
        feats[name] = cached_gpt_features(
            model,
            grids,
            layers,
            cache_dir=args.cache_dir,
            name=name,
            key=feature_cache_key(weights_sha, grids, layers) if args.cache_dir else {},
            batch_size=args.feature_batch_size,
            device=device,
        )
    result = train_linear_probes(
        feats["train"],
        np.asarray(train.labels[rows["train"]]),
        feats["val"],
        val_labels,
        num_classes,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        weight_decay=args.weight_decay,
        seed=args.seed,
        device=device,
    )
    out = summarize(layers, n_states, result)
    out["provenance"] = {
        "run": str(args.run),
        "weights_sha256": weights_sha,
        "model": cfg.to_dict(),
        "tokens": {
            "train": str(args.tokens),
            "val": str(args.val_tokens),
            "n_train": len(rows["train"]),
            "n_train_available": len(train),
            "n_val": len(rows["val"]),
            "train_tokenizer": train.meta.get("tokenizer"),
            "val_tokenizer": val.meta.get("tokenizer"),
        },
        "num_classes": num_classes,
        "pooling": "mean over all positions ([condition; tokens])",
        "condition": {"none": None, "class": "null class"}.get(cfg.cond),
        "probe": {
            "epochs": args.epochs,
            "lr": args.lr,
            "batch_size": args.batch_size,
            "momentum": 0.9,
            "weight_decay": args.weight_decay,
            "schedule": "cosine to 0",
            "seed": args.seed,
            "standardize": "per-layer train mean/std",
        },
        "last_layer_note": "the last hidden state has the final norm applied; the official DiGIT probe never uses it",
    }
    if args.out:
        atomic_write_json(args.out, out)
    print(
        json.dumps(
            {k: out[k] for k in ("best_layer", "best_name", "best_top1")}
            | {"top1": {r["name"]: round(r["top1"], 4) for r in out["layers"]}}
        )
    )
    return 0
