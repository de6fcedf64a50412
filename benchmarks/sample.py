"""Sampling throughput of a GPT-B-shaped LlamaGen-layout model (random weights), with the cached sampler of
`digit.sampling.generate` beside (a) a naive sampler that re-runs the whole sequence every step and (b), with
``--reference PATH`` to a LlamaGen checkout, LlamaGen's own `generate` on the same weights and settings.

    python benchmarks/sample.py                       # 16x16 tokens, batch 8 and 64, cfg 4.0, top-k 2000
    python benchmarks/sample.py --reference /tmp/llamagen
    python benchmarks/sample.py --quick               # smoke run: tiny model, full naive sampler, token equality
    python benchmarks/sample.py --reference /tmp/llamagen --precision bf16   # both sides in bf16 (LlamaGen's default)

The naive sampler is too slow to run for 256 tokens on a CPU: by default it is timed at a few sequence lengths and
its total is integrated from a linear fit (printed as "estimated"); ``--naive-full`` runs it end to end.
``--precision bf16`` casts both models' weights (and so their KV caches) to bfloat16, as LlamaGen's sample_c2i.py
does with its default ``--precision bf16``; the logit check against LlamaGen is made at fp32 before the cast.
Peak memory is the process RSS sampled every 10 ms during each phase; the process's peak (getrusage) is printed last. On a shared machine wall times swing with the
load; the process CPU time printed beside them (all threads) is a steadier measure of the work done.
"""

from __future__ import annotations

import sys
from pathlib import Path

# benchmarks/ holds scripts named like stdlib modules (tokenize.py): keep this directory off sys.path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import resource  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from contextlib import contextmanager  # noqa: E402

import torch  # noqa: E402

from digit.convert.keys import to_llamagen  # noqa: E402
from digit.models import GPT, build_config  # noqa: E402
from digit.sampling.filters import cfg, filter_logits, sample_from_logits  # noqa: E402
from digit.sampling.generate import generate  # noqa: E402
from digit.sampling.params import SamplingParams  # noqa: E402
from digit.sampling.precision import PRECISIONS, cast_for_sampling, sampling_dtype  # noqa: E402

PAGE = 4096


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


@contextmanager
def peak_rss(result: dict):
    """Track the peak RSS while the block runs (a sampling thread)."""
    stop, peak = threading.Event(), [rss_bytes()]

    def watch():
        while not stop.wait(0.01):
            peak[0] = max(peak[0], rss_bytes())

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    start, cpu = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        result["seconds"] = time.perf_counter() - start
        result["cpu_seconds"] = time.process_time() - cpu  # all threads: a load-independent work measure
        stop.set()
        t.join()
        result["peak_rss_gb"] = max(peak[0], rss_bytes()) / 2**30


@torch.inference_mode()
def naive_generate(model: GPT, labels, cfg_scale, top_k, generator, n_tokens=None):
    """Reference sampler: every step runs the full forward over [cond; tokens so far] (no cache)."""
    B, T = len(labels), n_tokens or model.config.seq_len
    cond = torch.cat([labels, model.condition.null(labels)]) if cfg_scale != 1.0 else labels
    rows = len(cond)
    tokens = torch.zeros(rows, model.config.seq_len, dtype=torch.long)
    for i in range(T):
        logits = model(tokens, cond)[:, i]  # causal: position i sees only tokens < i
        if cfg_scale != 1.0:
            logits = cfg(logits[:B], logits[B:], cfg_scale)
        tok = sample_from_logits(filter_logits(logits, 1.0, top_k, 1.0), generator)
        tokens[:, i] = tok.repeat(rows // B)
    return tokens[:B, :T]


@torch.inference_mode()
def naive_step_seconds(model: GPT, rows: int, length: int, cond) -> float:
    """Seconds of one naive step at sequence length ``length`` (a forward over cond + length tokens)."""
    cfg_ = model.config
    x = model._embed(
        torch.cat(
            [model.embed_condition(cond, rows), model.token_embed(torch.zeros(rows, length, dtype=torch.long))], 1
        ),
        torch.arange(cfg_.cond_len + length),
    )
    t = time.perf_counter()
    model.head(model._blocks(x)[:, -1])
    return time.perf_counter() - t


def build_model(args) -> GPT:
    torch.manual_seed(0)
    over = {"vocab_size": 16384, "grid": (args.grid, args.grid), "cond": "class", "num_classes": 1000}
    if args.quick:
        over.update(dim=128, layers=2, heads=4)
    model = GPT(build_config("gpt-b", **over)).eval()
    with torch.no_grad():  # LlamaGen zero-initialises the head; random logits make top-k and CFG meaningful
        model.head.weight.normal_(0, 0.02)
    return model


def time_ours(model, labels, args, seed=0) -> tuple[dict, torch.Tensor]:
    res: dict = {}
    gen = torch.Generator().manual_seed(seed)
    with peak_rss(res):
        out = generate(model, labels, params=args.params, generator=gen, compile=args.compile)
    model.clear_cache()
    return res, out


@contextmanager
def _fp32(model: GPT):
    """The model at fp32 for the block (the weights check against LlamaGen is made at full precision)."""
    dtype = next(model.parameters()).dtype
    model.to(torch.float32)
    try:
        yield
    finally:
        model.to(dtype)


def time_reference(model: GPT, labels, args) -> tuple[dict, float]:
    """LlamaGen's own generate on the same weights; also returns the max |logit difference| of a full forward."""
    sys.path.insert(0, str(Path(args.reference).resolve()))
    from autoregressive.models.generate import generate as lg_generate
    from autoregressive.models.gpt import ModelArgs, Transformer

    c = model.config
    lg = Transformer(
        ModelArgs(
            dim=c.dim,
            n_layer=c.n_layers,
            n_head=c.n_heads,
            vocab_size=c.vocab_size,
            block_size=c.seq_len,
            num_classes=c.num_classes,
            cls_token_num=1,
            model_type="c2i",
        )
    )
    with _fp32(model):
        lg.load_state_dict(to_llamagen(model.state_dict()), strict=True)  # our names -> LlamaGen's, one to one
    lg.eval()
    tokens = torch.randint(0, c.vocab_size, (2, c.seq_len), generator=torch.Generator().manual_seed(1))
    lab = labels[:2]
    with torch.inference_mode():
        # LlamaGen's full forward keys its RoPE slicing on module.training: use train mode with every dropout off
        lg.train()
        for m in lg.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        lg.cls_embedding.dropout_prob = 0.0
        ref_logits, _ = lg(tokens[:, :-1], lab)
        lg.eval()
        with _fp32(model):
            diff = float((ref_logits - model(tokens, lab)).abs().max())
    lg.to(sampling_dtype(args.precision))  # LlamaGen's sample_c2i.py: gpt_model.to(dtype=precision)
    res: dict = {}
    torch.manual_seed(0)
    with peak_rss(res), torch.inference_mode():
        lg_generate(
            lg,
            labels,
            c.seq_len,
            cfg_scale=args.cfg_scale,
            top_k=args.top_k,
            temperature=args.params.temperature,
            top_p=args.params.top_p,
            sample_logits=True,
        )
    return res, diff


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--big-batch", type=int, default=64, help="second batch size for the scaling figure (0 = skip)")
    p.add_argument("--grid", type=int, default=16, help="token grid side (16 -> 256 tokens)")
    SamplingParams.add_arguments(
        p, only=("temperature", "top_k", "top_p", "cfg_scale"), defaults=SamplingParams(cfg_scale=4.0, top_k=2000)
    )
    p.add_argument("--reference", default=None, help="path of a LlamaGen checkout to time its generate too")
    p.add_argument("--naive-full", action="store_true", help="run the naive sampler end to end (slow)")
    p.add_argument("--skip-naive", action="store_true", help="leave the naive sampler out")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="weights and KV cache (both samplers)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny model, 8x8 grid, batch 4 and 8")
    args = p.parse_args()
    args.params = SamplingParams.from_args(args, base=SamplingParams(cfg_scale=4.0, top_k=2000))
    args.cfg_scale, args.top_k = args.params.cfg_scale, args.params.top_k
    if args.quick:
        args.grid, args.batch_size, args.big_batch, args.naive_full = 8, 4, 8, True
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args)
    args.precision = cast_for_sampling(model, args.precision)  # "auto" resolved; LlamaGen gets the same dtype
    c = model.config
    T, B = c.seq_len, args.batch_size
    labels = torch.arange(B) % c.num_classes
    print(
        f"model: {c.dim}d x {c.n_layers} layers x {c.n_heads} heads, {model.num_params() / 1e6:.1f}M params, "
        f"{T} tokens, cfg {args.cfg_scale}, top-k {args.top_k}, {args.precision}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}"
    )

    with torch.inference_mode():  # warm-up: allocator and kernels, outside every timing
        model.setup_cache(2 * B)
        model.prefill(torch.cat([labels, labels]), 2 * B)
        model.clear_cache()
    ours, out = time_ours(model, labels, args)
    line = lambda name, r, n: print(  # noqa: E731
        f"{name:<34} {r['seconds']:8.2f} s  {n / r['seconds']:7.3f} img/s  {n * T / r['seconds']:8.1f} tok/s  "
        f"peak RSS {r['peak_rss_gb']:.2f} GB  (process CPU {r['cpu_seconds']:.1f} s)"
    )
    line(f"digit cached, batch {B}", ours, B)

    rows = 2 * B if args.cfg_scale != 1.0 else B
    cond = torch.cat([labels, model.condition.null(labels)]) if args.cfg_scale != 1.0 else labels
    if args.skip_naive:
        pass
    elif args.naive_full:
        res: dict = {}
        with peak_rss(res):
            naive = naive_generate(model, labels, args.cfg_scale, args.top_k, torch.Generator().manual_seed(0))
        line(f"naive (full re-run), batch {B}", res, B)
        same = float((naive == out.flatten(1)).double().mean())
        print(f"  naive vs cached, same seed: {same:.4f} of tokens identical")
        naive_s = res["seconds"]
    else:
        lengths = [T // 4, T // 2, T]
        secs = [naive_step_seconds(model, rows, n, cond) for n in lengths]
        slope = (secs[-1] - secs[0]) / (lengths[-1] - lengths[0])
        naive_s = sum(secs[0] + slope * (n - lengths[0]) for n in range(T))
        print(
            f"{'naive (full re-run), batch ' + str(B):<34} {naive_s:8.2f} s  (estimated from one step at lengths "
            f"{lengths}: {', '.join(f'{s:.2f}' for s in secs)} s)"
        )
    if not args.skip_naive:
        print(f"  speed-up over naive: {naive_s / ours['seconds']:.1f}x")

    if args.reference:
        ref, diff = time_reference(model, labels, args)
        line(f"LlamaGen generate, batch {B}", ref, B)
        print(
            f"  speed-up over LlamaGen: {ref['seconds'] / ours['seconds']:.2f}x; "
            f"max |logit diff| digit vs LlamaGen full forward: {diff:.2e}"
        )

    if args.big_batch:
        big_labels = torch.arange(args.big_batch) % c.num_classes
        big, _ = time_ours(model, big_labels, args, seed=1)
        line(f"digit cached, batch {args.big_batch}", big, args.big_batch)
        ratio = (args.big_batch / big["seconds"]) / (B / ours["seconds"])
        print(f"  img/s at batch {args.big_batch} / img/s at batch {B}: {ratio:.2f}x")
    print(
        f"process peak RSS (getrusage ru_maxrss): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB"
    )


if __name__ == "__main__":
    main()
