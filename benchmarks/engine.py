"""Serving requests that arrive at random times: the continuous-batching engine against one batch at a time.

Requests (a class, 1-4 images, one seed each, the same sampling parameters) arrive as a seeded Poisson process.
Both servers see the same requests at the same wall-clock arrival times:

- engine: `digit.sampling.engine.Engine` with ``--slots`` slots; arrivals are admitted at the next step boundary;
- batch: whenever it is free, the server takes every waiting request (whole requests, up to ``--slots`` images, at
  least one request) and samples them as one batch with `digit.sampling.generate.sample`; arrivals wait for the
  whole batch to finish.

Printed side by side: images/s over the whole run, and per-request latency (finish - arrival) p50 / p99.

    python benchmarks/engine.py --threads 1                 # small random-weight model, 32 requests
    python benchmarks/engine.py --preset gpt-b --grid 16 --requests 16 --rate 0.05 --threads 1
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

from digit.models import GPT, build_config  # noqa: E402
from digit.sampling.engine import Engine, Request  # noqa: E402
from digit.sampling.generate import sample  # noqa: E402
from digit.sampling.params import SamplingParams  # noqa: E402
from digit.sampling.seeds import image_generators  # noqa: E402


def workload(n: int, rate: float, classes: int, params: SamplingParams, seed: int) -> list[tuple[float, Request]]:
    """``n`` requests with exponential inter-arrival times of mean 1 / rate seconds (a Poisson process)."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, n))
    sizes = rng.integers(1, 5, n)
    labels = rng.integers(0, classes, n)
    return [
        (float(t), Request(cond=int(c), n=int(k), params=params, seed=seed * 1000 + i))
        for i, (t, k, c) in enumerate(zip(arrivals, sizes, labels))
    ]


def serve_engine(model, work, slots: int) -> tuple[float, list[float], int]:
    engine = Engine(model, slots=slots)
    start = time.perf_counter()
    arrival: dict[int, float] = {}
    latency: list[float] = []
    nxt = 0
    while nxt < len(work) or not engine.idle:
        now = time.perf_counter() - start
        while nxt < len(work) and work[nxt][0] <= now:
            arrival[engine.submit(work[nxt][1])] = work[nxt][0]
            nxt += 1
        if engine.idle:  # nothing to do until the next arrival
            time.sleep(max(0.0, work[nxt][0] - now))
            continue
        for f in engine.step():
            latency.append(time.perf_counter() - start - arrival[f.id])
    return time.perf_counter() - start, latency, engine.forward_passes


def serve_batches(model, work, slots: int) -> tuple[float, list[float], int]:
    start = time.perf_counter()
    latency: list[float] = []
    passes = 0
    nxt = 0
    while nxt < len(work):
        now = time.perf_counter() - start
        if work[nxt][0] > now:
            time.sleep(work[nxt][0] - now)
            now = time.perf_counter() - start
        batch = [work[nxt]]
        nxt += 1
        while nxt < len(work) and work[nxt][0] <= now and sum(r.n for _, r in batch) + work[nxt][1].n <= slots:
            batch.append(work[nxt])
            nxt += 1
        labels = torch.tensor([r.cond for _, r in batch for _ in range(r.n)])
        gens = [g for _, r in batch for g in image_generators(r.seed, range(r.n))]
        passes += sample(model, labels, None, batch[0][1].params, generator=gens).forward_passes
        done = time.perf_counter() - start
        latency += [done - t for t, _ in batch]
    model.clear_cache()
    return time.perf_counter() - start, latency, passes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="GPT preset (random weights)")
    p.add_argument("--grid", type=int, default=8, help="token grid side")
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--rate", type=float, default=2.0, help="mean arrivals per second")
    p.add_argument("--slots", type=int, default=8, help="engine slots = the batch server's largest batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    SamplingParams.add_arguments(p, only=("temperature", "top_k", "cfg_scale"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    params = SamplingParams.from_args(args, base=SamplingParams(cfg_scale=4.0, top_k=100))
    torch.manual_seed(0)
    cfg = build_config(args.preset, vocab_size=args.vocab, grid=(args.grid, args.grid), cond="class", num_classes=10)
    model = GPT(cfg).eval()
    with torch.no_grad():  # LlamaGen zero-initialises the head; random logits make top-k and CFG meaningful
        model.head.weight.normal_(0, 0.02)
    work = workload(args.requests, args.rate, cfg.num_classes, params, args.seed)
    images = sum(r.n for _, r in work)
    print(
        f"model {args.preset}: {cfg.dim}d x {cfg.n_layers} layers, {cfg.seq_len} tokens, {model.num_params() / 1e6:.1f}M"
        f" params; {args.requests} requests ({images} images) at {args.rate}/s (Poisson, seed {args.seed}); "
        f"{args.slots} slots; {params.to_dict()}; {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    with torch.inference_mode():  # warm-up outside the timings
        sample(model, torch.arange(2), None, params)
    for name, serve in (("engine (continuous batching)", serve_engine), ("one batch at a time", serve_batches)):
        with torch.inference_mode():
            wall, lat, passes = serve(model, work, args.slots)
        print(
            f"{name:<30} {wall:7.2f} s  {images / wall:7.3f} img/s  latency p50 {np.percentile(lat, 50):6.2f} s  "
            f"p99 {np.percentile(lat, 99):6.2f} s  ({passes} forward passes)"
        )


if __name__ == "__main__":
    main()
