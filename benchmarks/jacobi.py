"""Speculative Jacobi decoding against standard decoding: forward passes per image, wall time, sample quality.

    python benchmarks/jacobi.py            # CIFAR-10 reference models, GPT-B shape (1 image), FD on 500 samples each
    python benchmarks/jacobi.py --quick    # smoke run: few images, no GPT-B, FD on 100 samples

1. Speed, on the shipped CIFAR-10 reference models (`src/digit/assets/cifar10`) at the recipe's sampling settings
   (stage 1: CFG 2.0, top-k 100; stage-2 decoder: top-p 0.8), every decode mode on the same seeds and labels.
   Forward passes per image = the forwards of the batch the image was in (prefill included; standard decoding: one
   per token). Stage 2 is conditioned on one fixed set of stage-1 samples.
2. Speed of one forward, on a GPT-B-shaped model with random weights (16x16 tokens, vocabulary 16384, CFG 4.0,
   top-k 2000): the verify block costs more than a one-token step, so wall time falls less than the forward count.
   Random weights do not predict like a trained model: their forward counts say nothing about real acceptance rates.
3. Quality: N images through the whole pipeline (stage 1 -> stage 2 -> VQ) with Jacobi decoding in both stages,
   and with standard decoding; Fréchet distance in the shipped tokenizer encoder's mean-pooled patch features
   (`digit eval --features DIR`'s space) between every pair of two standard and two Jacobi sets (seeds 0 and 1): the
   distance between the two standard sets is the noise level at this N.
"""

from __future__ import annotations

import sys
from pathlib import Path

# benchmarks/ holds scripts named like stdlib modules (tokenize.py): keep this directory off sys.path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import digit  # noqa: E402
from digit.sampling.generate import generate  # noqa: E402
from digit.sampling.jacobi import jacobi_generate  # noqa: E402
from digit.sampling.params import SamplingParams as Params  # noqa: E402

ASSETS = Path(digit.__file__).resolve().parent / "assets" / "cifar10"


STAGE1 = Params(cfg_scale=2.0, top_k=100)  # the CIFAR-10 recipe's sample step
STAGE2 = Params(top_p=0.8)  # DiGIT's AR-decoder default


def decode(model, cond, n, params, mode, generator, window):
    """-> (tokens [B, T], forward passes of this batch). mode: "ar" | "jacobi-random" | "jacobi-repeat"."""
    if mode == "ar":
        out = generate(model, cond, n, params, generator=generator)
        return out.flatten(1), model.config.seq_len  # prefill + one step per further token
    init = mode.split("-", 1)[1]
    return jacobi_generate(model, cond, n, params, generator, window=window, init=init)


def run_batches(model, cond, n, batch, params, mode, seed, window):
    """All n samples in batches (batch b seeded with seed * 1_000_003 + b) -> (tokens, forwards per image,
    (wall seconds, process CPU seconds)). On a shared machine the CPU time is the steadier measure of the work."""
    toks, fwd = [], []
    t0, c0 = time.perf_counter(), time.process_time()
    for b, s in enumerate(range(0, n, batch)):
        e = min(s + batch, n)
        g = torch.Generator().manual_seed(seed * 1_000_003 + b)
        c = cond[s:e] if cond is not None else None
        t, f = decode(model, c, e - s, params, mode, g, window)
        toks.append(t)
        fwd += [f] * (e - s)
    return torch.cat(toks), float(np.mean(fwd)), (time.perf_counter() - t0, time.process_time() - c0)


def speed_table(pipe, n, batches, modes, window):
    print(f"\n## 1. CIFAR-10 reference models: {n} images, window {window}")
    print("| model | batch | decode | forwards / image | vs ar | wall | CPU | vs ar (CPU) |")
    print("|---|---|---|---|---|---|---|---|")
    labels = torch.arange(n) % pipe.num_classes
    prefix = run_batches(pipe.stage1, labels, n, 8, STAGE1, "ar", 99, window)[0]  # stage 2's fixed conditions
    for name, model, cond, params in (
        ("stage 1", pipe.stage1, labels, STAGE1),
        ("stage 2", pipe.decoder, prefix, STAGE2),
    ):
        for batch in batches:
            base = None
            for mode in modes:
                _, fwd, (sec, cpu) = run_batches(model, cond, n, batch, params, mode, 0, window)
                base = base or (fwd, cpu)
                print(
                    f"| {name} | {batch} | {mode} | {fwd:.1f} | {base[0] / fwd:.2f}x | {sec:.2f} s | {cpu:.2f} s "
                    f"| {base[1] / cpu:.2f}x |"
                )


def gpt_b(images, window, tokens_side):
    from digit.models import GPT, build_config

    print(f"\n## 2. GPT-B shape, random weights: {tokens_side}x{tokens_side} tokens, batch 1, {images} image(s)")
    torch.manual_seed(0)
    grid = (tokens_side, tokens_side)
    model = GPT(build_config("gpt-b", vocab_size=16384, grid=grid, cond="class", num_classes=1000)).eval()
    with torch.no_grad():  # LlamaGen zero-initialises the head; random logits make top-k and CFG meaningful
        model.head.weight.normal_(0, 0.02)
    params = Params(cfg_scale=4.0, top_k=2000)
    labels = torch.arange(images) % 1000
    print("| decode | forwards / image | wall / image | CPU / image | CPU s / forward | vs ar (CPU) |")
    print("|---|---|---|---|---|---|")
    base = None
    for mode in ("ar", "jacobi-random"):
        _, fwd, (sec, cpu) = run_batches(model, labels, images, 1, params, mode, 0, window)
        base = base or cpu
        print(
            f"| {mode} | {fwd:.1f} | {sec / images:.2f} s | {cpu / images:.2f} s | {cpu / images / fwd:.3f} "
            f"| {base / cpu:.2f}x |"
        )


def pipeline_images(pipe, n, batch, mode, seed, window):
    labels = torch.arange(n) % pipe.num_classes
    s1, f1, t1 = run_batches(pipe.stage1, labels, n, batch, STAGE1, mode, seed, window)
    s2, f2, t2 = run_batches(pipe.decoder, s1, n, batch, STAGE2, mode, seed + 7, window)
    with torch.inference_mode():
        images = torch.cat([pipe.vq.decode(s2[i : i + 100].view(-1, *pipe.vq.grid_size)) for i in range(0, n, 100)])
    return (images.clamp(0, 1) * 255).to(torch.uint8), (f1, f2), (t1[0] + t2[0], t1[1] + t2[1])


def fd_table(pipe, n, batch, window, mode):
    from digit.evaluation.features import EncoderExtractor
    from digit.evaluation.fid import feature_statistics, frechet_distance

    print(f"\n## 3. Quality: {n} images per set, batch {batch}, {mode} in both stages vs standard decoding")
    extractor = EncoderExtractor(ASSETS / "tokenizer", "cpu")

    def stats(images):
        with torch.inference_mode():
            feats = torch.cat([extractor(images[i : i + 100])["pool"] for i in range(0, len(images), 100)])
        return feature_statistics(feats.numpy())

    sets = {}
    print("| set | forwards / image, stage 1 + stage 2 | wall, CPU (both stages) |")
    print("|---|---|---|")
    for m, seed in (("ar", 0), ("ar", 1), (mode, 0), (mode, 1)):
        images, (f1, f2), (sec, cpu) = pipeline_images(pipe, n, batch, m, seed, window)
        sets[f"{m} seed {seed}"] = stats(images)
        print(f"| {m} seed {seed} | {f1:.1f} + {f2:.1f} | {sec:.1f} s, {cpu:.1f} s |")
    print("\n| pair | FD (tokenizer encoder features) |")
    print("|---|---|")
    names = list(sets)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            print(f"| {a} vs {b} | {frechet_distance(*sets[a], *sets[b]):.4f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=32, help="images per speed row (0 skips the speed rows)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--window", type=int, default=16, help="Jacobi draft tokens per iteration")
    ap.add_argument("--gpt-b-images", type=int, default=1, help="0 skips the GPT-B rows")
    ap.add_argument("--gpt-b-side", type=int, default=16, help="GPT-B token grid side (16: 256 tokens)")
    ap.add_argument("--fd-n", type=int, default=500, help="images per FD set (0 skips the quality rows)")
    ap.add_argument("--fd-batch", type=int, default=25)
    ap.add_argument("--fd-mode", default="jacobi-random", choices=["jacobi-random", "jacobi-repeat"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smoke run: 8 images, no GPT-B, FD on 100 images")
    args = ap.parse_args()
    if args.quick:
        args = replace_args(args, n=8, gpt_b_images=0, fd_n=100)
    torch.set_num_threads(args.threads)
    from digit.pipeline import load_pipeline

    pipe = load_pipeline(ASSETS / "stage1", ASSETS / "vq", ASSETS / "stage2")
    print(f"torch {torch.__version__}, {args.threads} thread(s), fp32, CPU")
    if args.n:
        speed_table(pipe, args.n, args.batch_sizes, ("ar", "jacobi-random", "jacobi-repeat"), args.window)
    if args.gpt_b_images:
        gpt_b(args.gpt_b_images, args.window, args.gpt_b_side)
    if args.fd_n:
        fd_table(pipe, args.fd_n, args.fd_batch, args.window, args.fd_mode)


def replace_args(ns: argparse.Namespace, **kw) -> argparse.Namespace:
    d = vars(ns).copy()
    d.update(kw)
    return argparse.Namespace(**d)


if __name__ == "__main__":
    main()
