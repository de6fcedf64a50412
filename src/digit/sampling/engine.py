"""Continuous batching: a fixed number of slots over one static KV cache, requests admitted as slots free up.

A :class:`Request` (condition, number of images, `SamplingParams`, seed) is split into images; each image occupies one
slot from admission until its last token. Every :meth:`Engine.step` is one step boundary:

1. free slots take the next waiting images (FIFO); if any were admitted, one prefill over every slot's condition fills
   cache positions ``0 .. C-1`` (the other slots rewrite their own condition's entries with the same values, so the
   model needs no per-row prefill) and gives the new images their first token;
2. one decode forward with per-row positions (``decode_step(tokens [R, 1], positions [R, 1])``) moves every busy slot
   one token on; each slot applies its own guidance scale (schedule and interval at its own token index),
   temperature, top-k and top-p (`digit.sampling.generate.choose` with per-row settings);
3. images that reached their last token free their slot; a request whose images are all done is returned.

Between steps, :meth:`Engine.cancel` drops a request (its slots free for the next waiting images) and
:meth:`Engine.progress` counts its tokens so far (`digit serve`: clients that leave, progress events).

With classifier-free guidance (``guided=True``, the default for a class- or text-conditional model) every slot carries
its pair of rows, [cond rows; null rows] as in `digit.sampling.generate`; a request with ``cfg_scale`` 1 uses only its
conditional row. Free slots decode junk that is never read.

Text-conditional models: a request's condition is one `Caption` row (features [L, D], mask [L], LlamaGen's left-padded
layout: `digit.prompts.encode_prompts`). Each slot holds its caption, and its null row the null caption under the same
mask (as LlamaGen's sampler); the prefill recomputes the model's per-row key mask from every slot's caption, so each
row reads exactly its own caption's valid positions in every decode step.

What is guaranteed about a request's tokens: image ``i`` of a request draws its noise from its own generator seeded
from (``seed``, ``i``) (`digit.sampling.seeds`), one Exp(1) vector per token, and each row of the fixed-shape step is
computed from that row's inputs only. So its tokens are a function of (model, engine slot count and guidance layout,
condition, params, seed, i), not of which other requests share the batch, which slot it lands in or when it arrives:
bitwise identical alone and mixed with others where the kernels compute each row independently of the others, as
CPU fp32 does (tested: greedy and seeded sampling, both exact). On a device whose kernels are not batch-row invariant
the draws are still identical, so the outputs are identical in distribution.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from digit.errors import DigitError
from digit.models.conditions import Caption, join_conditions
from digit.sampling.filters import cfg_scale_at, fill_exponential
from digit.sampling.generate import CachedDecoder, RowSettings, choose, step_function
from digit.sampling.params import SamplingParams
from digit.sampling.seeds import image_generators


@dataclass(frozen=True)
class Request:
    """``cond``: a class id (class-conditional model), prefix tokens [P] (prefix model), one `Caption` row (text
    model: features [L, D] or [1, L, D], mask [L] or [1, L]) or None (unconditional)."""

    cond: Any = None
    n: int = 1
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int = 0


@dataclass
class Finished:
    id: int
    request: Request
    tokens: torch.Tensor  # [n, h, w] long, image i at row i
    # image i's random stream after its last token: a next stage (the stage-2 decoder) continues it, as
    # `digit.pipeline.generate_images` carries one generator per image through both stages
    generators: list[torch.Generator] = field(default_factory=list)


@dataclass
class _Image:
    request_id: int
    index: int  # image index within its request
    cond: torch.Tensor | Caption | None  # [] class id / [P] prefix / a Caption row ([L, D], [L])
    generator: torch.Generator
    params: SamplingParams
    step: int = 0  # index of the next token to produce


class Engine:
    """Serve :class:`Request` s with ``slots`` images in flight (see the module docstring). The engine owns the
    model's KV cache (allocated for its rows at construction): sampling with the same model elsewhere while the engine
    has work would replace it."""

    def __init__(self, model: CachedDecoder, slots: int, *, guided: bool | None = None, compile: bool = False) -> None:
        cfg = model.config
        if not cfg.causal:
            raise DigitError("the engine serves autoregressive models (a causal=False model decodes with MaskGIT)")
        if slots < 1:
            raise DigitError(f"slots must be >= 1, got {slots}")
        self.model, self.slots = model, slots
        # a model whose null condition was never trained (class_dropout 0) cannot be guided: no null rows by default
        trained_null = cfg.cond in ("class", "text") and cfg.class_dropout > 0
        self.guided = trained_null if guided is None else bool(guided)
        if self.guided and not trained_null:
            raise DigitError(
                "classifier-free guidance needs a class- or text-conditional model trained with class dropout"
            )
        self.device = next(model.parameters()).device
        self.rows = 2 * slots if self.guided else slots
        self._step_fn = step_function(compile, self.device)
        self._compile = compile
        T, C = cfg.seq_len, cfg.cond_len
        self.T, self.C = T, C
        self._ids = itertools.count()
        self._waiting: deque[_Image] = deque()
        self._slot: list[_Image | None] = [None] * slots
        self._out: dict[int, torch.Tensor] = {}
        self._left: dict[int, int] = {}
        self._requests: dict[int, Request] = {}
        self._gens: dict[int, list[torch.Generator]] = {}
        self._made: dict[int, int] = {}  # tokens produced so far per request (progress)
        self._cond = self._blank_cond()
        self._fed = torch.zeros(self.rows, 1, dtype=torch.long, device=self.device)
        self._settings: RowSettings | None = None
        self.forward_passes = 0
        self.steps = 0
        self.stepped_slots = 0  # slots that held an image at the last step (after its admissions)
        model.train(False)
        model.setup_cache(self.rows)

    # ---- requests
    def _blank_cond(self) -> torch.Tensor | Caption | None:
        cfg = self.model.config
        if cfg.cond == "text":  # a free slot's caption: zero features, every position valid (junk, never read)
            L, D = cfg.caption_len, cfg.caption_dim
            feats = torch.zeros(self.slots, L, D, dtype=torch.float32, device=self.device)
            return Caption(feats, torch.ones(self.slots, L, dtype=torch.bool, device=self.device))
        if cfg.cond == "class":
            return torch.zeros(self.slots, dtype=torch.long, device=self.device)
        if cfg.cond == "prefix":
            return torch.zeros(self.slots, cfg.prefix_len, dtype=torch.long, device=self.device)
        return None

    def _check_cond(self, cond: Any) -> torch.Tensor | Caption | None:
        cfg = self.model.config
        if cfg.cond == "none":
            if cond is not None:
                raise DigitError("an unconditional model takes no condition")
            return None
        if cfg.cond == "text":
            L, D = cfg.caption_len, cfg.caption_dim
            ok = isinstance(cond, Caption)
            f = cond.features.reshape(L, D) if ok and tuple(cond.features.shape) in ((L, D), (1, L, D)) else None
            m = cond.mask.reshape(L) if ok and tuple(cond.mask.shape) in ((L,), (1, L)) else None
            if f is None or m is None or m.dtype != torch.bool or not torch.is_floating_point(f):
                raise DigitError(
                    f"a text request needs one Caption row: float features [{L}, {D}] and a bool mask [{L}]"
                )
            if not bool(torch.isfinite(f).all()):
                raise DigitError("a text request's caption features must be finite")
            return Caption(f.to(self.device, torch.float32), m.to(self.device))
        c = torch.as_tensor(cond, dtype=torch.long, device=self.device)
        if cfg.cond == "class":
            if c.dim() != 0 or not 0 <= int(c) < cfg.num_classes:
                raise DigitError(f"a class-conditional request needs one class id in [0, {cfg.num_classes})")
        elif c.shape != (cfg.prefix_len,) or int(c.min()) < 0 or int(c.max()) >= cfg.prefix_vocab_size:
            raise DigitError(f"a prefix request needs {cfg.prefix_len} prefix tokens in [0, {cfg.prefix_vocab_size})")
        return c

    def submit(self, request: Request) -> int:
        """Queue a request; its images enter slots at the next step boundaries. Returns its id."""
        if not isinstance(request.params, SamplingParams):
            raise DigitError("request.params must be a SamplingParams")
        if request.n < 1:
            raise DigitError(f"a request needs n >= 1 images, got {request.n}")
        if request.params.decode != "ar":
            raise DigitError(f"the engine decodes autoregressively (decode 'ar'), not {request.params.decode!r}")
        if request.params.guided and not self.guided:
            raise DigitError("this engine runs without guidance: cfg_scale must be 1")
        cond = self._check_cond(request.cond)
        rid = next(self._ids)
        self._requests[rid] = request
        self._left[rid] = request.n
        self._out[rid] = torch.empty(request.n, self.T, dtype=torch.long, device=self.device)
        gens = image_generators(request.seed, range(request.n), self.device)
        self._gens[rid] = gens
        self._made[rid] = 0
        self._waiting.extend(_Image(rid, i, cond, g, request.params) for i, g in enumerate(gens))
        return rid

    def cancel(self, request_id: int) -> bool:
        """Drop a request that has not finished: its waiting images leave the queue and its images in slots free them
        (taken by the next waiting images at the next step). False when the id is unknown or already finished."""
        if request_id not in self._requests:
            return False
        self._waiting = deque(img for img in self._waiting if img.request_id != request_id)
        for j, img in enumerate(self._slot):
            if img is not None and img.request_id == request_id:
                self._slot[j] = None
        for table in (self._requests, self._out, self._left, self._gens, self._made):
            del table[request_id]
        return True

    def progress(self, request_id: int) -> tuple[int, int]:
        """(tokens produced, tokens needed) of a request not yet finished; (0, 0) for an unknown id."""
        if request_id not in self._requests:
            return 0, 0
        return self._made[request_id], self._requests[request_id].n * self.T

    @property
    def pending_images(self) -> int:
        """Images admitted to the engine and not finished: in slots or waiting for one."""
        return len(self._waiting) + self.busy_slots

    @property
    def idle(self) -> bool:
        return not self._waiting and all(s is None for s in self._slot)

    @property
    def busy_slots(self) -> int:
        return sum(s is not None for s in self._slot)

    # ---- one step boundary
    def _row_settings(self) -> RowSettings:
        params = [s.params if s is not None else SamplingParams() for s in self._slot]
        return RowSettings.build(params, self.model.config.vocab_size, self.device)

    def _scales(self) -> torch.Tensor | None:
        if not self.guided:
            return None
        s = [
            cfg_scale_at(x.step, self.T, x.params.cfg_scale, x.params.cfg_interval, x.params.cfg_schedule)
            if x is not None
            else 1.0
            for x in self._slot
        ]
        return torch.tensor(s, dtype=torch.float32, device=self.device)

    def _noise(self, width: int, live: list[int]) -> torch.Tensor:
        noise = torch.ones(self.slots, width, dtype=torch.float32, device=self.device)
        for j in live:
            fill_exponential(noise[j : j + 1], [self._slot[j].generator])
        return noise

    def _record(self, tokens: torch.Tensor, live: list[int]) -> list[Finished]:
        done = []
        for j in live:
            img = self._slot[j]
            self._out[img.request_id][img.index, img.step] = tokens[j]
            self._fed[j :: self.slots] = tokens[j]  # both rows of the pair
            img.step += 1
            self._made[img.request_id] += 1
            if img.step == self.T:
                self._slot[j] = None
                self._left[img.request_id] -= 1
                if self._left[img.request_id] == 0:
                    rid = img.request_id
                    grid = self._out.pop(rid).view(-1, *self.model.config.grid)
                    done.append(Finished(rid, self._requests.pop(rid), grid, self._gens.pop(rid)))
                    del self._left[rid], self._made[rid]
        return done

    @torch.inference_mode()
    def step(self) -> list[Finished]:
        """Admit, prefill if needed, decode one token in every busy slot; the requests finished at this step."""
        done: list[Finished] = []
        admitted = []
        for j in range(self.slots):
            if self._slot[j] is None and self._waiting:
                img = self._waiting.popleft()
                self._slot[j] = img
                admitted.append(j)
                if isinstance(img.cond, Caption):
                    self._cond.features[j] = img.cond.features
                    self._cond.mask[j] = img.cond.mask
                elif img.cond is not None:
                    self._cond[j] = img.cond
        self.stepped_slots = self.busy_slots
        if admitted or self._settings is None:
            self._settings = self._row_settings()
        if admitted:
            cond = self._cond
            if self.guided:
                cond = join_conditions(cond, self.model.condition.null(cond))
            logits = self.model.prefill(cond, self.rows)
            self.forward_passes += 1
            tokens = choose(logits, self._scales(), self._settings, self._noise(logits.shape[-1], admitted))
            done += self._record(tokens, admitted)
        live = [j for j, s in enumerate(self._slot) if s is not None and s.step > 0]
        if live:
            # a free slot decodes junk at the last cache position: written by its own next image before it is read
            last = self.C + self.T - 2
            pos = [self.C + s.step - 1 if s is not None and s.step > 0 else last for s in self._slot]
            positions = torch.tensor(pos * (2 if self.guided else 1), device=self.device)[:, None]
            noise = self._noise(self.model.config.vocab_size, live)
            tokens = self._step_fn(self.model, self._fed, positions, None, self._scales(), self._settings, noise)
            self.forward_passes += 1
            done += self._record(tokens, live)
        self.steps += 1
        return done

    def run(self, requests: list[Request]) -> list[Finished]:
        """Submit every request, step until all are done; results in submission order."""
        ids = [self.submit(r) for r in requests]
        results: dict[int, Finished] = {}
        while not self.idle:
            for f in self.step():
                results[f.id] = f
        return [results[i] for i in ids]
