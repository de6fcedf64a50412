"""Copy a finished recipe's inference files into a self-contained model folder (what `digit demo` loads).

Only what inference needs travels: safetensors weights, JSON configs, the K-means centroids, and one validation image
per class. The discriminative tokenizer gets its encoder's weights stored inside it, so the folder depends on nothing
else on disk.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from digit.errors import DigitError
from digit.utils.io import atomic_write_json, file_sha256, read_json
from digit.utils.outputs import OutputDir, as_output

MODEL_PARTS = ("tokenizer", "vq", "stage1", "stage2")
MANIFEST = "models.json"
# the recipe figures a shipped folder records (digit.recipes.report.collect_run names them)
FIGURES = ("encoder_knn_top1", "tokenizer_knn_top1", "vq_psnr", "fid", "fd", "fd_space", "probe_best_top1")


def ship_models(
    recipe: str | os.PathLike,
    out: str | os.PathLike | OutputDir,
    images_per_class: int = 1,
    route: str = "dino",
    seed: int = 0,
) -> Path:
    """``route`` and ``seed`` pick the tokenizer (``<route>/tokenizer``) and GPTs (``<route>/seed<seed>/``)."""
    from digit.data.decode import decode_image
    from digit.recipes.report import collect_run
    from digit.tokenizers.encoder import ENCODER_WEIGHTS

    target = as_output(out, "recipe ship")
    recipe, out = Path(recipe), target.path
    where = {"tokenizer": recipe / route / "tokenizer", "vq": recipe / "vq",
             "stage1": recipe / route / f"seed{seed}" / "stage1", "stage2": recipe / route / f"seed{seed}" / "stage2"}  # fmt: skip
    need = [where["tokenizer"] / "tokenizer.json", where["tokenizer"] / "centroids.npy", where["vq"] / "tokenizer.json",
            where["vq"] / "model.safetensors", where["stage1"] / "config.json", where["stage1"] / "model.safetensors",
            where["stage2"] / "config.json", where["stage2"] / "model.safetensors", recipe / "data" / "val"]  # fmt: skip
    missing = [str(n.relative_to(recipe)) for n in need if not n.exists()]
    if missing:
        raise DigitError(
            f"{recipe} is not a finished recipe directory for route {route}, seed {seed} (missing {', '.join(missing)})"
        )
    from digit.recipes.runner import DONE_DIR

    # a training step writes model.safetensors at each checkpoint: the files exist long before the step is done
    steps = (f"{route}/tokenizer", "vq", f"{route}/seed{seed}/stage1", f"{route}/seed{seed}/stage2")
    unfinished = [n for n in steps if not (recipe / DONE_DIR / f"{n}.json").is_file()]
    if unfinished:
        raise DigitError(
            f"{recipe}: {', '.join(unfinished)} not finished (a run in progress writes its weights at every "
            "checkpoint); finish them with the same `digit recipe cifar10` command first"
        )
    tmp = target.begin()
    try:
        tok_cfg = read_json(where["tokenizer"] / "tokenizer.json")
        weights = tok_cfg["encoder"]["weights"]
        src_weights = {
            "dir": lambda: Path(weights["path"]) / ENCODER_WEIGHTS,
            "stored": lambda: where["tokenizer"] / ENCODER_WEIGHTS,
            "random": lambda: where["tokenizer"] / ENCODER_WEIGHTS,
            "package": lambda: _packaged_as_safetensors(tok_cfg, tmp),
        }.get(weights.get("kind"))
        if src_weights is None:
            raise DigitError(f"cannot ship a tokenizer whose encoder weights are of kind {weights.get('kind')!r}")
        enc_path = src_weights()
        if not enc_path.is_absolute():
            enc_path = recipe / enc_path
        if weights.get("kind") == "dir" and weights.get("sha256") and file_sha256(enc_path) != weights["sha256"]:
            raise DigitError(f"{enc_path} changed since the tokenizer was fitted (sha256 differs): refusing to ship it")
        (tmp / "tokenizer").mkdir(parents=True)
        shutil.copyfile(enc_path, tmp / "tokenizer" / ENCODER_WEIGHTS)
        if weights.get("kind") == "package":
            enc_path.unlink()
        shutil.copyfile(where["tokenizer"] / "centroids.npy", tmp / "tokenizer" / "centroids.npy")
        tok_cfg["encoder"]["weights"] = {"kind": "stored", "from": weights}
        atomic_write_json(tmp / "tokenizer" / "tokenizer.json", tok_cfg)
        for part, files in (("vq", ("tokenizer.json", "model.safetensors")),
                            ("stage1", ("config.json", "model.safetensors")),
                            ("stage2", ("config.json", "model.safetensors"))):  # fmt: skip
            (tmp / part).mkdir()
            for f in files:
                shutil.copyfile(where[part] / f, tmp / part / f)
        # one validation image per class, as PNG (the demo's inputs for the tokenizer at work)
        (tmp / "images").mkdir()
        val = recipe / "data" / "val"
        for class_dir in sorted(p for p in val.iterdir() if p.is_dir()):
            for f in sorted(class_dir.iterdir())[:images_per_class]:
                decode_image(f.read_bytes()).save(tmp / "images" / f"{class_dir.name}-{f.stem}.png")
        summary = read_json(recipe / "summary.json") if (recipe / "summary.json").is_file() else {}
        run = collect_run(recipe, route, seed)
        claims, claim_seeds = _claims(summary, run, route)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        atomic_write_json(
            tmp / MANIFEST,
            {
                "made_by": f"digit recipe cifar10 ... then digit recipe ship --recipe DIR --route {route} "
                f"--seed {seed} --out DIR",
                "recipe_size": summary.get("size"),
                "route": route,
                "seed": seed,
                "figures": {k: run.get(k) for k in FIGURES},
                "claims": claims,
                "claims_seeds": claim_seeds,
                "steps": summary.get("steps"),
                "sha256": {str(p.relative_to(tmp)): file_sha256(p) for p in files},
            },
        )
        target.publish(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _claims(summary: dict, run: dict, route: str) -> tuple[list[dict[str, str]], list[int]]:
    """The route's claims table over every seed the recipe summarised (mean ± std, verdicts by the stated rules),
    or over the shipped seed alone when the recipe has not summarised this route."""
    from digit.recipes.report import aggregate, claims_rows, route_verdicts

    summarised = (summary.get("routes") or {}).get(route)
    if summarised and run["seed"] not in [r["seed"] for r in summarised["runs"]]:
        summarised = None  # a summary that predates the shipped seed does not speak for it
    if summarised:
        runs, agg, verdicts = summarised["runs"], summarised["aggregate"], summarised["verdicts"]
    else:
        runs = [run]
        agg = aggregate(runs)
        verdicts = route_verdicts(agg, run)
    return claims_rows(runs, agg, verdicts), [r["seed"] for r in runs]


def _packaged_as_safetensors(tok_cfg: dict, tmp: Path) -> Path:
    """Packaged encoder weights (a pip package's .pth) re-verified, loaded, and written as the timm model's
    safetensors, so the shipped tokenizer needs neither the package nor pickle."""
    from digit.tokenizers.encoder import encoder_from_config
    from digit.utils.io import atomic_save_safetensors

    enc = encoder_from_config(tok_cfg["encoder"])
    path = tmp / "packaged-encoder.safetensors"
    atomic_save_safetensors(path, enc.model.state_dict())
    return path
