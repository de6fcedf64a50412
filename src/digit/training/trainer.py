"""The one training loop. Every trained thing (GPT, VQGAN, DINO encoder) is a ``Task`` (see ``digit.training.task``).

Exact resume: the data order is a pure function of (seed, epoch) (a permutation, drop-last), the position is the step
counter, schedules are pure functions of the step, and the checkpoint holds every module, optimizer, EMA, task state
and each rank's RNG states. A run killed at any moment restarts from its last atomic checkpoint and reproduces, on CPU,
the weights of an uninterrupted run bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from digit.errors import DigitError
from digit.training import checkpoint as ckpt
from digit.training.ema import EMA
from digit.training.interrupt import StopRequest, TrainingInterrupted
from digit.training.optim import build_adamw, clip_grad_norm, set_hyperparameters
from digit.training.parallel import apply_parallel, compile_blocks, is_sharded
from digit.training.run_files import compare_configs, truncate_metrics
from digit.training.steps import epoch_permutation, seed_for, steps_per_epoch, total_steps
from digit.training.task import OptimizerSpec, TaskBase
from digit.utils.artifacts import read_json_object
from digit.utils.distributed import barrier, get_dist_info
from digit.utils.io import atomic_write_json
from digit.utils.locking import lock_on_main_rank
from digit.utils.outputs import claim_dir, mark_dir

STATE_FILE = "train_state.pt"


@dataclass(kw_only=True)
class TrainConfig:
    """The loop's own settings; optimizer hyper-parameters live in the task's ``OptimizerSpec``s."""

    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 8  # global: per-rank micro-batch = batch_size / world_size / grad_accum
    grad_accum: int = 1
    seed: int = 0
    ema: float = 0.0  # 0: off
    save_every: int = 0  # 0: only at the end
    eval_every: int = 0
    log_every: int = 1
    parallel: str = "none"
    compile: bool = False
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    num_workers: int = 0
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def to_device(batch: Any, device: torch.device) -> Any:
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


class Trainer:
    """Runs ``task`` for ``cfg`` and writes the run directory ``out``."""

    def __init__(
        self,
        task: TaskBase,
        cfg: TrainConfig,
        out: str | Path,
        *,
        resume: bool = False,
        device: torch.device | None = None,
        inputs: Iterable[str | Path | None] = (),
    ) -> None:
        """``inputs``: the paths the run reads (data, tokens, ...); a run directory may not overlap any of them."""
        self.task, self.cfg, self.out, self.resume = task, cfg, Path(out), resume
        self.inputs = list(inputs)
        self.dist = get_dist_info()
        self.device = device or (
            torch.device(f"cuda:{self.dist.local_rank}") if torch.cuda.is_available() else torch.device("cpu")
        )
        per = self.dist.world_size * cfg.grad_accum
        if cfg.batch_size % per:
            raise DigitError(f"--batch-size {cfg.batch_size} is not divisible by world size x grad accum ({per})")
        self.micro = cfg.batch_size // per
        self.n = len(task.dataset)
        self.steps_per_epoch = steps_per_epoch(self.n, cfg.batch_size)
        self.total = total_steps(self.n, cfg.batch_size, steps=cfg.steps, epochs=cfg.epochs)
        task.set_run_length(self.steps_per_epoch, self.total)
        use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
        self.config = {"task": task.name, **task.config()}
        self.config["train"] = {**cfg.to_dict(), **self.config.get("train", {})}

    # ------------------------------------------------------------ set-up
    def _prepare_dir(self) -> dict | None:
        cfg_path, state_path = self.out / "config.json", self.out / STATE_FILE
        claim_dir(self.out, kind="run", inputs=self.inputs, is_legacy=lambda d: (d / "config.json").is_file())
        self._lock = lock_on_main_rank(self.out, self.dist.is_main, self.dist.enabled)  # after the claim: ours
        if cfg_path.exists() and not self.resume:
            raise DigitError(f"{self.out} already holds a run; pass --resume to continue it or choose another --out")
        state = None
        if self.resume and cfg_path.exists():
            stored = read_json_object(cfg_path)
            diffs = compare_configs(stored, self.config)
            if diffs:
                raise DigitError(f"{cfg_path}: cannot resume this run, its config differs ({', '.join(diffs[:5])})")
            before = {k: (stored.get("train") or {}).get(k) for k in ("steps", "epochs")}
            now = {k: self.config["train"].get(k) for k in ("steps", "epochs")}
            if (
                before != now and self.dist.is_main
            ):  # allowed (extending a run), but not the run an uninterrupted one is
                print(
                    f"note: the run's length changed ({before} -> {now}): schedules over the run's length (cosine "
                    "lr, DINO's momentum and temperatures) follow the new length from here on",
                    file=sys.stderr,
                )
            if state_path.exists():
                state = ckpt.load_train_state(state_path)
        barrier()  # every rank has checked the directory before rank 0 writes into it
        if self.dist.is_main:
            mark_dir(self.out, "run")
            atomic_write_json(cfg_path, self.config)
            truncate_metrics(self.out / "metrics.jsonl", state["step"] if state else 0)
        barrier()
        return state

    def setup(self) -> None:
        task, cfg = self.task, self.cfg
        self.modules = task.modules()
        self.specs: list[OptimizerSpec] = task.optimizers()
        trained = {m for s in self.specs for m in s.modules}
        for name in trained - set(self.modules):
            raise DigitError(f"optimizer names unknown module {name!r}")
        for m in self.modules.values():
            m.to(self.device)
        if cfg.compile:
            for name in trained:
                compile_blocks(self.modules[name], task.shard_units(name, self.modules[name]))
        apply_parallel(self.modules, trained, cfg.parallel, task.shard_units, self.device)
        # A container only to name parameters "<module>.<param>" (no forward, no wrapping).
        self.container = nn.ModuleDict(self.modules)
        self.optimizers = []
        for spec in self.specs:
            named = [(f"{m}.{n}", p) for m in spec.modules for n, p in self.modules[m].named_parameters()]
            self.optimizers.append(build_adamw(named, spec, self.device))
        ema_names = getattr(task, "ema_modules", None) or [m for m in self.modules if m in trained]
        self.emas = {m: EMA(self.modules[m], cfg.ema) for m in ema_names} if cfg.ema > 0 else {}

    def _restore(self, state: dict) -> int:
        path = self.out / STATE_FILE
        for name, m in self.modules.items():
            ckpt.check_module_state(path, name, m, state["modules"].get(name))
        try:
            for name, m in self.modules.items():
                ckpt.load_full_state_dict(m, state["modules"][name])
            for spec, opt in zip(self.specs, self.optimizers):
                ckpt.load_optimizer_state(self.container, opt, state["optimizers"][spec.name])
            for name, e in self.emas.items():
                e.load_full_state_dict(state["ema"][name])
            self.task.load_state_dict(state.get("task", {}))
            rngs = state["rng"]
            ckpt.set_rng_state(rngs[self.dist.rank % len(rngs)])
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
            # the state passed the key checks of load_train_state but its contents do not fit this run
            what = f"no entry {e}" if isinstance(e, KeyError) else str(e).strip().splitlines()[0]
            raise DigitError(f"{path}: cannot resume from it ({what})") from e
        return int(state["step"])

    def _checkpoint(self, step: int) -> None:
        """Gather full state (collective under FSDP), then rank 0 writes train_state.pt and the exported weights."""
        import torch.distributed as dist

        modules = {n: ckpt.full_state_dict(m) for n, m in self.modules.items()}
        optims = {s.name: ckpt.optimizer_state(self.container, o) for s, o in zip(self.specs, self.optimizers)}
        emas = {n: e.full_state_dict() for n, e in self.emas.items()}
        rng = [ckpt.rng_state()]
        if self.dist.enabled:
            gathered: list = [None] * self.dist.world_size
            dist.all_gather_object(gathered, rng[0])
            rng = gathered
        if self.dist.is_main:
            epoch, k = divmod(step, self.steps_per_epoch)
            ckpt.save_train_state(
                self.out / STATE_FILE,
                {
                    "step": step,
                    "epoch": epoch,
                    "batch_in_epoch": k,
                    "config": self.config,
                    "modules": modules,
                    "optimizers": optims,
                    "ema": emas,
                    "task": self.task.state_dict(),
                    "rng": rng,
                },
            )
            self.task.export(self.out, {**modules, **emas})
        if self.dist.enabled:
            dist.barrier()

    # ------------------------------------------------------------ data
    def _micro_batches(self, start: int):
        """Yield, for each step from ``start``, this rank's ``grad_accum`` micro-batches."""
        from torch.utils.data import DataLoader

        cfg, r = self.cfg, self.dist.rank
        step = start
        while step < self.total:
            epoch, k0 = divmod(step, self.steps_per_epoch)
            if hasattr(self.task.dataset, "set_epoch"):
                self.task.dataset.set_epoch(epoch)
            perm = epoch_permutation(self.n, cfg.seed, epoch)
            last = min(self.steps_per_epoch, k0 + self.total - step)
            index_batches = []
            for k in range(k0, last):
                glob = perm[k * cfg.batch_size : (k + 1) * cfg.batch_size]
                mine = glob[r * self.micro * cfg.grad_accum : (r + 1) * self.micro * cfg.grad_accum]
                index_batches += [mine[a * self.micro : (a + 1) * self.micro].tolist() for a in range(cfg.grad_accum)]
            # An own generator: creating an iterator must not draw from the global RNG (it would desynchronise a
            # resumed run, which creates its iterator at another step), and worker seeds follow (seed, epoch).
            gen = torch.Generator().manual_seed(seed_for(cfg.seed, epoch, 1))
            loader = DataLoader(
                self.task.dataset,
                batch_sampler=index_batches,
                collate_fn=self.task.collate,
                num_workers=cfg.num_workers,
                pin_memory=self.device.type == "cuda",
                generator=gen,
            )
            it = iter(loader)
            for _ in range(k0, last):
                yield [to_device(next(it), self.device) for _ in range(cfg.grad_accum)]
                step += 1

    # ------------------------------------------------------------ loop
    def fit(self) -> dict[str, float]:
        """Train to ``total`` steps, holding the run directory's lock throughout (a second process is refused)."""
        self._lock = None
        try:
            return self._fit()
        finally:
            if self._lock is not None:
                self._lock.release()

    def _fit(self) -> dict[str, float]:
        from tqdm import tqdm

        cfg, task = self.cfg, self.task
        state = self._prepare_dir()
        self.setup()
        start = 0
        if state is not None:
            start = self._restore(state)
            if start > self.total:
                # rewriting the checkpoint under a smaller step would pair step-`total` metadata with later weights
                raise DigitError(f"the run is already at step {start}; --steps/--epochs must cover at least that many")
        else:
            # Per-rank training randomness (dropout, class dropout); the model init happened before, identically.
            s = seed_for(cfg.seed, self.dist.rank)
            torch.manual_seed(s)
            np.random.seed(s % (1 << 32))
            import random

            random.seed(s)
        for m in self.modules.values():
            m.train()
        bar = tqdm(
            total=self.total,
            initial=start,
            disable=not (cfg.progress and self.dist.is_main),
            desc=f"train {task.name}",
            dynamic_ncols=True,
        )
        with StopRequest(self.dist.enabled, self.device) as stop:
            last = self._loop(start, bar, stop)
        bar.close()
        if start >= self.total and state is not None:
            self._checkpoint(start)  # nothing left to run: still (re)write the artefacts
        return last

    def _loop(self, start: int, bar: Any, stop: StopRequest) -> dict[str, float]:
        cfg, task = self.cfg, self.task
        last: dict[str, float] = {}
        t0, units = time.perf_counter(), 0
        for step, micros in enumerate(self._micro_batches(start), start=start):
            logs = self.train_step(step, micros)
            units += sum(task.count(mb) for mb in micros) * self.dist.world_size
            done = step + 1
            if done % cfg.log_every == 0 or done == self.total:
                dt = max(time.perf_counter() - t0, 1e-9)
                logs[f"{getattr(task, 'unit', 'samples')}_per_s"] = units / dt
                if cfg.eval_every and (done % cfg.eval_every == 0 or done == self.total):
                    logs.update(self._evaluate(done))
                self._log({"step": done, **logs})
                last = logs
                bar.set_postfix(
                    {k: f"{v:.4g}" for k, v in logs.items() if k in ("loss", "val_loss", "lr")}
                    | {"units/s": f"{logs[next(k for k in logs if k.endswith('_per_s'))]:.0f}"}
                )
                t0, units = time.perf_counter(), 0
            elif cfg.eval_every and done % cfg.eval_every == 0:
                self._log({"step": done, **self._evaluate(done)})
            bar.update(1)
            saved = (cfg.save_every and done % cfg.save_every == 0) or done == self.total
            if saved:
                self._checkpoint(done)
            if done < self.total and stop.requested():
                if not saved:
                    self._checkpoint(done)
                bar.close()
                raise TrainingInterrupted(
                    f"stopped after step {done} of {self.total}; checkpoint saved in {self.out}: "
                    "run the same command with --resume to continue"
                )
        return last

    def train_step(self, step: int, micros: list) -> dict[str, float]:
        """One optimizer step (every phase) on this rank's micro-batches; returns the logged values."""
        import torch.distributed as dist

        cfg, task = self.cfg, self.task
        task.before_step(step)
        logs: dict[str, float] = {}
        for spec, opt in zip(self.specs, self.optimizers):
            if not spec.is_active(step):
                continue
            for m in self.modules.values():
                m.zero_grad(set_to_none=True)
            lr = set_hyperparameters(opt, spec, step)
            total = torch.zeros((), device=self.device)
            sums: dict[str, torch.Tensor] = {}
            for micro in micros:
                with self.autocast:
                    loss, metrics = task.compute_loss(micro, step, spec.name)
                (loss / cfg.grad_accum).backward()
                total += loss.detach().float()
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + torch.as_tensor(v, dtype=torch.float32, device=self.device)
            task.before_optimizer_step(step, spec.name)
            params = [p for g in opt.param_groups for p in g["params"]]
            gnorm = clip_grad_norm(params, spec.clip)
            opt.step()
            task.after_optimizer_step(step, spec.name)
            prefix = "" if spec.name == "main" else f"{spec.name}_"
            vals = torch.stack([total, *sums.values()]) / cfg.grad_accum
            if self.dist.enabled:
                dist.all_reduce(vals)
                vals /= self.dist.world_size
            vals = vals.tolist()
            logs[f"{prefix}loss"] = vals[0]
            logs.update({f"{prefix}{k}": v for k, v in zip(sums, vals[1:])})
            logs[f"{prefix}lr"] = lr
            logs[f"{prefix}grad_norm"] = float(gnorm)
        for e in self.emas.values():
            e.update()
        return logs

    def _evaluate(self, step: int) -> dict[str, float]:
        """The task's figures on the trained weights; with an EMA (what model.safetensors holds) also on the averaged
        weights, as ``<name>_ema`` (not under FSDP)."""
        for m in self.modules.values():
            m.eval()
        try:
            with torch.no_grad(), self.autocast:
                out = {k: float(v) for k, v in self.task.evaluate(step).items()}
                # FSDP leaves the root unsharded after a forward, so swapping shards in would mix layouts: not there
                if self.emas and out and not any(is_sharded(m) for m in self.modules.values()):
                    with contextlib.ExitStack() as stack:
                        for e in self.emas.values():
                            stack.enter_context(e.applied())
                        out.update({f"{k}_ema": float(v) for k, v in self.task.evaluate(step).items()})
                return out
        finally:
            for m in self.modules.values():
                m.train()

    def _log(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
