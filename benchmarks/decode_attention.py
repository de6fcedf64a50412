"""One decode step of a GPT-B-shaped model (random weights) reading only the filled KV-cache entries (the eager path
of `GPT.decode_step`) against reading the whole static cache through the causal mask (the fixed-shape path kept for
torch.compile / CUDA graphs), at several fill levels, side by side.

    python benchmarks/decode_attention.py                 # GPT-B, 16x16 tokens, 16 rows (batch 8 with CFG)
    python benchmarks/decode_attention.py --rows 128
    python benchmarks/decode_attention.py --quick         # smoke run: small model

Both paths give the same logits (tests/test_gpt_model.py checks it); the figures are the median wall time of
``--repeats`` steps per fill level, and the process CPU time (all threads) beside it, which swings less with the load
of a shared machine.
"""

from __future__ import annotations

import sys
from pathlib import Path

# benchmarks/ holds scripts named like stdlib modules (tokenize.py): keep this directory off sys.path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from unittest import mock  # noqa: E402

import torch  # noqa: E402

from digit.models import GPT, build_config  # noqa: E402


def step_times(model: GPT, rows: int, pos: int, repeats: int, static: bool) -> tuple[float, float]:
    """Median (wall, cpu) seconds of one decode step at sequence position ``pos``."""
    tok = torch.zeros(rows, 1, dtype=torch.long)
    p = torch.tensor([pos])
    walls, cpus = [], []
    # the fixed-shape path is what decode_step takes under torch.compile; here it is forced in eager mode
    ctx = mock.patch.object(torch.compiler, "is_compiling", lambda: True) if static else mock.MagicMock()
    with ctx, torch.inference_mode():
        model.decode_step(tok, p)  # warm-up
        for _ in range(repeats):
            t, c = time.perf_counter(), time.process_time()
            model.decode_step(tok, p)
            walls.append(time.perf_counter() - t)
            cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus)


def attention_times(model: GPT, rows: int, filled: int, repeats: int) -> tuple[float, float]:
    """CPU microseconds of one layer's attention call alone at a fill level: (filled entries, whole cache + mask)."""
    import torch.nn.functional as F

    cfg, S = model.config, model.cache_len
    q = torch.randn(rows, cfg.n_heads, 1, cfg.head_dim)
    k, v = torch.randn(rows, cfg.n_heads, S, cfg.head_dim), torch.randn(rows, cfg.n_heads, S, cfg.head_dim)
    mask = model.causal_mask[filled - 1 : filled, :S]

    def cpu_us(fn) -> float:
        fn()
        c = time.process_time()
        for _ in range(repeats):
            fn()
        return (time.process_time() - c) / repeats * 1e6

    sliced = cpu_us(lambda: F.scaled_dot_product_attention(q, k[:, :, :filled], v[:, :, :filled]))
    masked = cpu_us(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    return sliced, masked


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=16, help="batch rows (CFG doubles the batch: 16 = batch 8)")
    ap.add_argument("--grid", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="small model, few repeats")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    over = {"vocab_size": 16384, "grid": (args.grid, args.grid), "cond": "class", "num_classes": 1000}
    if args.quick:
        over.update(dim=128, layers=2, heads=4)
        args.repeats = min(args.repeats, 3)
    model = GPT(build_config("gpt-b", **over)).eval()
    model.setup_cache(args.rows)
    C, S = model.config.cond_len, model.cache_len
    print(f"GPT {model.config.dim}d x {model.config.n_layers} layers, {args.rows} rows, cache {S} entries, "
          f"{args.threads} thread(s), median of {args.repeats} steps")  # fmt: skip
    print(f"{'position':>8} {'filled':>7} | {'sliced ms':>9} {'cpu ms':>7} | {'masked ms':>9} {'cpu ms':>7} | speed-up"
          f" | attention call alone (cpu us, sliced / masked)")  # fmt: skip
    for frac in (0.1, 0.25, 0.5, 0.75, 1.0):
        pos = min(S - 1, C + int(frac * (S - C)))
        sw, sc = step_times(model, args.rows, pos, args.repeats, static=False)
        mw, mc = step_times(model, args.rows, pos, args.repeats, static=True)
        a_s, a_m = attention_times(model, args.rows, pos + 1, 30 * args.repeats)
        print(f"{pos:>8} {pos + 1:>7} | {sw * 1e3:>9.1f} {sc * 1e3:>7.1f} | {mw * 1e3:>9.1f} {mc * 1e3:>7.1f} | "
              f"{mw / sw:.2f}x wall, {mc / sc:.2f}x cpu | {a_s:.0f} / {a_m:.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
