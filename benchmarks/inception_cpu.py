"""Feature extraction for the CIFAR-10 recipe's generation scores on CPU: the FID Inception (torch-fidelity's network with
the packaged weights) in the default memory layout (the TorchScript reference's) and in channels-last (what
``InceptionExtractor`` runs since 2 December 2026: its features differ from the default layout's by ~1e-5 relative,
summation order only), and the EfficientNet-Lite1 FD encoder, side by side; 32x32 uint8 inputs as the recipe's samples.

    python benchmarks/inception_cpu.py                # 2 threads, 3 batches of 50 per variant
    python benchmarks/inception_cpu.py --threads 1 --batches 2

Figures: images/s of wall time, and CPU milliseconds per image (all threads), which swings less with the load of a
shared machine; "on N free cores" divides the CPU time by the thread count (what the same work takes alone).
The variants' features are compared too (max abs difference against the default layout).
"""

from __future__ import annotations

import sys
from pathlib import Path

# benchmarks/ holds scripts named like stdlib modules (tokenize.py): keep this directory off sys.path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402


def measure(fn, x: torch.Tensor, batches: int) -> tuple[float, float, torch.Tensor]:
    with torch.inference_mode():
        out = fn(x)  # warm-up (oneDNN picks its kernels here)
        t, c = time.perf_counter(), time.process_time()
        for _ in range(batches):
            fn(x)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
    n = batches * len(x)
    return n / wall, cpu / n * 1000, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--batches", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from digit.evaluation.features import build_extractor

    x = torch.randint(0, 256, (args.batch, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    inc = build_extractor("inception", "cpu")
    rows = []
    inc.model.to(memory_format=torch.contiguous_format)
    rows.append(("inception pool3, default layout", *measure(lambda b: inc(b, logits=False)["pool"], x, args.batches)))
    inc.model.to(memory_format=torch.channels_last)
    rows.append(("inception pool3, channels-last (used)", *measure(lambda b: inc(b, logits=False)["pool"], x, args.batches)))
    fd = build_extractor("tf_efficientnet_lite1", "cpu")
    rows.append(("efficientnet-lite1 FD, 128 px", *measure(lambda b: fd(b)["pool"], x, args.batches)))
    print(f"threads {args.threads}, batch {args.batch} x {args.batches}, load average {os.getloadavg()[0]:.2f}")
    print(f"{'extractor':36s} {'img/s':>7s} {'cpu ms/img':>11s} {'img/s on free cores':>20s}")
    for name, ips, cpu_ms, _ in rows:
        print(f"{name:36s} {ips:7.1f} {cpu_ms:11.0f} {1000 * args.threads / cpu_ms:20.1f}")
    diff = (rows[0][3] - rows[1][3]).abs().max().item()
    print(
        f"channels-last vs default layout: max |feature difference| {diff:.2e} (features up to {rows[0][3].abs().max():.2f})"
    )


if __name__ == "__main__":
    main()
