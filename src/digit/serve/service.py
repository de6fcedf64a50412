"""The generation service behind `digit serve`: a bounded queue in front of the continuous-batching engine.

Threads and who owns what:

- the HTTP event loop calls :meth:`GenerationService.submit` (refused at once when the queue is full or the service
  is draining) and :meth:`GenerationService.cancel` (timeout, client gone); it awaits each job's asyncio future and
  reads its progress;
- one *engine thread* owns the `digit.sampling.engine.Engine` (stage 1, every model call on it happens there): it moves
  queued jobs into the engine while the engine has a free slot for each of their images, applies cancellations, and
  calls ``Engine.step()`` while there is work;
- one *decode thread* takes the finished stage-1 requests through the stage-2 decoder (continuing each image's own
  random stream, as `digit.pipeline.generate_images` does) and the VQ decoder, encodes PNGs and resolves the futures;
  the requests that finished meanwhile go together, one decoder batch per set of decoder parameters.

So a request's images are those of ``digit generate`` with the same seed and parameters (the engine's guarantee, tested
in tests/test_serve.py against `generate_images`), whatever else the server is doing.
"""

from __future__ import annotations

import asyncio
import io
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from digit.errors import DigitError
from digit.sampling.engine import Engine, Finished, Request
from digit.sampling.params import SamplingParams


class QueueFull(Exception):
    """The bounded queue is full: answer 503 with Retry-After."""


class Draining(Exception):
    """The service stopped taking requests (SIGTERM): answer 503."""


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    max_batch: int = 16  # engine slots: images sampled together
    max_queue: int = 64  # requests waiting for the engine before new ones get 503
    timeout: float = 60.0  # seconds from arrival to the last PNG, else 504
    max_images: int = 16  # images per request
    compile: bool = False  # torch.compile the engine's decode step

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "max_images"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise DigitError(f"{name} must be an integer >= 1, got {v!r}")
        if not (isinstance(self.timeout, (int, float)) and 0 < self.timeout < float("inf")):
            raise DigitError(f"timeout must be a positive number of seconds, got {self.timeout!r}")


@dataclass(frozen=True)
class GenerationSpec:
    """One validated request (`digit.serve.api.parse_generation`)."""

    label: int | None  # class id, None for an unconditional model
    n: int
    seed: int
    stage1: SamplingParams
    decoder: SamplingParams | None  # None without a stage-2 decoder
    timeout: float  # this request's own limit (<= the server's)
    stream: bool = False
    prompt: str | None = None  # the caption of a text-conditional model
    caption: Any = None  # its encoding (a Caption row), when the caller encoded it already (`digit.serve.app`)


@dataclass
class GeneratedImages:
    pngs: list[bytes]
    timings: dict[str, float]


@dataclass
class Job:
    spec: GenerationSpec
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    arrived: float = field(default_factory=time.perf_counter)
    admitted: float | None = None  # entered the engine
    engine_id: int | None = None
    tokens_done: int = 0
    tokens_total: int = 0
    cancelled: str | None = None  # the reason, once cancelled

    @property
    def deadline(self) -> float:
        return self.arrived + self.spec.timeout

    def resolve(self, result: Any = None, error: BaseException | None = None) -> None:
        def _set() -> None:
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)

        try:
            self.loop.call_soon_threadsafe(_set)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


def encode_png(image: Any) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


class GenerationService:
    """See the module docstring. ``pipe``: a `digit.pipeline.Pipeline` (stage 1 autoregressive)."""

    def __init__(self, pipe: Any, config: ServeConfig, metrics: Any = None) -> None:
        self.pipe, self.config, self.metrics = pipe, config, metrics
        self.engine = Engine(pipe.stage1, slots=config.max_batch, compile=config.compile)
        self.tokens_per_image = self.engine.T
        self._cv = threading.Condition()
        self._queue: deque[Job] = deque()
        self._cancels: list[Job] = []
        self._running: dict[int, Job] = {}  # engine id -> job (engine thread only)
        self._decoding = 0
        self._stop = False
        self.draining = False
        self._engine_thread: threading.Thread | None = None
        self._finished: queue.Queue = queue.Queue()  # (job, Finished, time) for the decode thread; None: stop
        self._decode_thread: threading.Thread | None = None
        self.busy_slots = 0  # snapshots for /metrics, written by the engine thread
        self.error: BaseException | None = None  # what stopped the engine thread, if anything did

    # ------------------------------------------------------------------ called from the event loop
    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        return len(self._running) + self._decoding

    def submit(self, spec: GenerationSpec, loop: asyncio.AbstractEventLoop) -> Job:
        job = Job(spec, loop.create_future(), loop)
        job.tokens_total = spec.n * self.tokens_per_image
        with self._cv:
            if self.draining or self._stop:
                raise Draining()
            if len(self._queue) >= self.config.max_queue:
                raise QueueFull()
            self._queue.append(job)
            self._cv.notify()
        return job

    def cancel(self, job: Job, reason: str) -> None:
        """Stop working on ``job``: it leaves the queue, or its images leave their slots at the next step boundary."""
        with self._cv:
            if job.cancelled is not None or job.future.done():
                return
            job.cancelled = reason
            self._cancels.append(job)
            self._cv.notify()
        if self.metrics is not None:
            self.metrics.cancelled.labels(reason=reason).inc()

    def start(self) -> None:
        self._engine_thread = threading.Thread(target=self._run_engine, name="digit-serve-engine", daemon=True)
        self._engine_thread.start()
        self._decode_thread = threading.Thread(target=self._run_decoder, name="digit-serve-decode", daemon=True)
        self._decode_thread.start()

    def begin_drain(self) -> None:
        """Stop taking requests; those queued or in flight go on."""
        with self._cv:
            self.draining = True

    def stop(self, timeout: float | None = None) -> None:
        """Drain: take nothing new, finish every accepted job, then stop the threads."""
        with self._cv:
            self.draining = True
            self._stop = True
            self._cv.notify()
        if self._engine_thread is not None:
            self._engine_thread.join(timeout)
        self._finished.put(None)
        if self._decode_thread is not None:
            self._decode_thread.join(timeout)

    # ------------------------------------------------------------------ the engine thread
    def _apply_cancels(self) -> None:
        for job in self._cancels:
            if job.engine_id is not None:
                self.engine.cancel(job.engine_id)
                self._running.pop(job.engine_id, None)
            else:
                try:
                    self._queue.remove(job)
                except ValueError:  # already handed to the decoder: it drops the result
                    pass
        self._cancels.clear()

    def _admit(self) -> None:
        # a job enters the engine only when a slot is free for each of its images already admitted, so the waiting
        # happens here (bounded, visible as queue depth) and not in the engine's own queue
        while self._queue and self.engine.pending_images < self.engine.slots:
            job = self._queue.popleft()
            spec = job.spec
            try:
                cond = spec.label
                if spec.prompt is not None:  # each image's slot carries this caption (and its null caption for CFG)
                    cond = spec.caption if spec.caption is not None else self.pipe.encode_prompts([spec.prompt])[0]
                job.engine_id = self.engine.submit(Request(cond=cond, n=spec.n, params=spec.stage1, seed=spec.seed))
            except DigitError as e:  # validated at the boundary already; kept so that a miss is a 400, not a hang
                job.resolve(error=e)
                continue
            job.admitted = time.perf_counter()
            self._running[job.engine_id] = job

    def _run_engine(self) -> None:
        try:
            while True:
                with self._cv:
                    self._apply_cancels()
                    self._admit()
                    if self.engine.idle:
                        self.busy_slots = 0
                        if self._stop and not self._queue:
                            return
                        self._cv.wait(timeout=0.5)
                        continue
                t0 = time.perf_counter()
                finished = self.engine.step()
                made = 0
                for job in self._running.values():
                    done = self.engine.progress(job.engine_id)[0]
                    made += done - job.tokens_done
                    job.tokens_done = done
                for f in finished:
                    job = self._running.pop(f.id)
                    made += job.tokens_total - job.tokens_done
                    job.tokens_done = job.tokens_total
                    with self._cv:
                        self._decoding += 1
                    self._finished.put((job, f, time.perf_counter()))
                self.busy_slots = self.engine.busy_slots
                if self.metrics is not None:
                    self.metrics.on_step(self.engine.stepped_slots, self.engine.slots, made, time.perf_counter() - t0)
        except BaseException as e:  # a model error: fail every job instead of leaving them waiting
            self.error = e
            with self._cv:
                self.draining = True
                jobs = list(self._queue) + list(self._running.values())
                self._queue.clear()
                self._running.clear()
            for job in jobs:
                job.resolve(error=e)
            raise

    # ------------------------------------------------------------------ the decode thread
    def _run_decoder(self) -> None:
        """Take every finished request waiting (up to a batch of ``max_batch`` images) through stage 2 and the VQ
        together: one decoder batch per set of decoder parameters instead of one per request."""
        while True:
            item = self._finished.get()
            if item is None:
                return
            batch, images, stop = [item], item[0].spec.n, False
            while images < self.config.max_batch:
                try:
                    nxt = self._finished.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
                images += nxt[0].spec.n
            try:
                self._finish(batch)
            finally:
                with self._cv:
                    self._decoding -= len(batch)
            if stop:
                return

    @torch.inference_mode()
    def _finish(self, batch: list[tuple[Job, Finished, float]]) -> None:
        from digit.sampling.generate import sample
        from digit.utils.images import to_uint8

        groups: dict[SamplingParams | None, list[tuple[Job, Finished, float]]] = {}
        for item in batch:
            if item[0].cancelled is None:
                groups.setdefault(item[0].spec.decoder, []).append(item)
        pipe = self.pipe
        for params, items in groups.items():
            try:
                t0 = time.perf_counter()
                # image i of each request keeps its own generator: its rows do not depend on the batch around them
                ids = torch.cat([f.tokens for _, f, _ in items])
                if pipe.decoder is not None:
                    gens = [g for _, f, _ in items for g in f.generators]
                    ids = sample(pipe.decoder, ids.reshape(len(ids), -1), None, params, generator=gens).tokens
                t1 = time.perf_counter()
                images = to_uint8(pipe.vq.decode(ids))
                start = 0
                for job, _, stage1_done in items:
                    pngs = [encode_png(img) for img in images[start : start + job.spec.n]]
                    start += job.spec.n
                    t2 = time.perf_counter()
                    timings = {
                        "queue_s": (job.admitted or t0) - job.arrived,
                        "stage1_s": stage1_done - (job.admitted or stage1_done),
                        "decode_wait_s": t0 - stage1_done,
                        "stage2_s": t1 - t0,
                        "vq_png_s": t2 - t1,
                        "total_s": t2 - job.arrived,
                    }
                    job.resolve(GeneratedImages(pngs, timings))
            except BaseException as e:
                for job, _, _ in items:
                    job.resolve(error=e)
