"""Training throughput of the one trainer on a GPT-B-shaped LlamaGen-layout model (batch 8 x 256 tokens, AdamW).

Times ``Trainer.train_step`` (forward, backward, clip, AdamW step: the code path `digit train` runs) after warm-up
steps, and prints s/step, tokens/s and the ratio to LlamaGen's own step measured on this 2-core CPU (13.6 s/step,
fp32). With ``--reference PATH`` (a LlamaGen checkout; never committed) it also times LlamaGen's ``Transformer`` with
their ``train_c2i.py`` step (AdamW on dim >= 2 tensors, clip 1.0) on the same weights and batch, side by side.
On CUDA the step runs under bf16 autocast and the model FLOPs utilisation is printed
(6 N + 12 L d T FLOPs per token, PaLM appendix B; peak from ``--peak-tflops``, default H100 SXM bf16 dense 989).

    python benchmarks/train.py                     # GPT-B, batch 8, fp32 on CPU
    python benchmarks/train.py --reference /tmp/llamagen
    python benchmarks/train.py --quick             # a small model, seconds: checks the script runs
"""

from __future__ import annotations

import sys

# benchmarks/tokenize.py would shadow the standard library's `tokenize` (imported by numpy via inspect/linecache)
# when this script's directory heads sys.path.
if sys.path and sys.path[0] and __file__.startswith(sys.path[0]):
    sys.path.pop(0)

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time
from pathlib import Path

import numpy as np
import torch

from digit.data.tokens import read_token_dir, write_token_dir
from digit.models.presets import build_config
from digit.training import TrainConfig, Trainer
from digit.training.gpt_task import GPTTask
from digit.training.trainer import to_device

LLAMAGEN_CPU_S_PER_STEP = 13.6  # LlamaGen's GPT-B training step measured on this machine (issue 3)
OPTIM = {
    "lr": 1e-4,
    "betas": [0.9, 0.95],
    "eps": 1e-8,
    "weight_decay": 0.05,
    "schedule": "constant",
    "warmup": 0,
    "warmup_init_lr": 0.0,
    "clip": 1.0,
}


def flops_per_token(cfg) -> float:
    n = sum(p.numel() for n, p in _params(cfg) if not n.startswith(("token_embed", "condition")))
    return 6 * n + 12 * cfg.n_layers * cfg.dim * cfg.seq_len


def _params(cfg):
    from digit.models.gpt import GPT

    with torch.device("meta"):
        return list(GPT(cfg).named_parameters())


def time_ours(args, tmp: Path, device: torch.device) -> tuple[list[float], GPTTask, list]:
    rng = np.random.default_rng(0)
    h = w = args.grid
    n = args.batch_size * (args.warmup + args.steps)
    write_token_dir(
        tmp / "tok",
        rng.integers(0, args.vocab, (n, h, w)),
        rng.integers(0, 1000, n),
        vocab_size=args.vocab,
        num_classes=1000,
    )
    cfg = build_config(args.model, vocab_size=args.vocab, grid=(h, w), cond="class", num_classes=1000)
    task = GPTTask(cfg, read_token_dir(tmp / "tok"), optim=OPTIM, total_steps=args.warmup + args.steps)
    trainer = Trainer(
        task,
        TrainConfig(steps=args.warmup + args.steps, batch_size=args.batch_size, compile=args.compile, progress=False),
        tmp / "run",
        device=device,
    )
    trainer.setup()
    task.model.train()
    batches = [
        to_device(
            task.collate([task.dataset[i] for i in range(s * args.batch_size, (s + 1) * args.batch_size)]), device
        )
        for s in range(args.warmup + args.steps)
    ]
    times = []
    for s, b in enumerate(batches):
        _sync(device)
        t, c = time.perf_counter(), time.process_time()
        trainer.train_step(s, [b])
        _sync(device)
        times.append((time.perf_counter() - t, time.process_time() - c))
    return times[args.warmup :], task, batches


def time_reference(args, task: GPTTask, batches: list, device: torch.device) -> list[float]:
    """LlamaGen's Transformer and train_c2i.py step on the same initial weights and batches."""
    sys.path.insert(0, str(Path(args.reference).resolve()))
    from autoregressive.models.gpt import ModelArgs, Transformer

    c = task.cfg
    torch.manual_seed(0)
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
    lg.to(device).train()
    decay = [p for p in lg.parameters() if p.dim() >= 2]
    no_decay = [p for p in lg.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-4,
        betas=(0.9, 0.95),
        fused=device.type == "cuda",
    )
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    times = []
    for b in batches:
        _sync(device)
        t, cpu = time.perf_counter(), time.process_time()
        z = b["tokens"]
        with amp:
            _, loss = lg(cond_idx=b["label"], idx=z[:, :-1], targets=z)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lg.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        times.append((time.perf_counter() - t, time.process_time() - cpu))
    return times[args.warmup :]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt-b")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grid", type=int, default=16, help="tokens per side (16: 256 tokens)")
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="accelerator peak for MFU (H100 SXM bf16 dense)")
    p.add_argument("--reference", default=None, help="path of a LlamaGen checkout to time its step too")
    p.add_argument("--quick", action="store_true", help="small preset, batch 2, 1 timed step")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args()
    if args.quick:
        args.model, args.batch_size, args.steps, args.warmup, args.vocab = "small", 2, 1, 1, 1024
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokens_per_step = args.batch_size * args.grid * args.grid
    with tempfile.TemporaryDirectory() as tmp:
        times, task, batches = time_ours(args, Path(tmp), device)
        ours = float(np.median([t for t, _ in times]))
        res = {
            "model": args.model,
            "params_M": task.model.num_params() / 1e6,
            "batch": args.batch_size,
            "tokens_per_step": tokens_per_step,
            "device": str(device),
            "threads": torch.get_num_threads(),
            "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
            "s_per_step": ours,
            "tokens_per_s": tokens_per_step / ours,
            # CPU seconds of this process per step: steadier than wall time on a shared machine
            "cpu_s_per_step": float(np.median([c for _, c in times])),
            "step_times_wall_cpu": times,
        }
        if device.type == "cpu" and args.model == "gpt-b" and args.batch_size == 8 and args.grid == 16:
            res["speedup_vs_llamagen_measured_13.6s"] = LLAMAGEN_CPU_S_PER_STEP / ours
        if device.type == "cuda":
            res["mfu"] = flops_per_token(task.cfg) * tokens_per_step / ours / (args.peak_tflops * 1e12)
        if args.reference:
            ref = time_reference(args, task, batches, device)
            res["llamagen_s_per_step"] = float(np.median([t for t, _ in ref]))
            res["llamagen_cpu_s_per_step"] = float(np.median([c for _, c in ref]))
            res["llamagen_step_times_wall_cpu"] = ref
            res["speedup_vs_llamagen_side_by_side"] = res["llamagen_s_per_step"] / ours
            res["cpu_time_ratio_llamagen_over_ours"] = res["llamagen_cpu_s_per_step"] / res["cpu_s_per_step"]
    for k, v in res.items():
        print(f"{k:>36}: {v:.4g}" if isinstance(v, float) else f"{k:>36}: {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
