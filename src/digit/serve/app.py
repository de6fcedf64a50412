"""The ASGI app (Starlette): routes, the bounded queue's answers, timeouts, disconnects, the engine's lifespan.

``create_app(pipe, config)`` is all a test or another ASGI server needs; `digit.serve.server` runs it under uvicorn.

- ``POST /v1/images/generations``: see `digit.serve.api`; 400 for a bad request, 503 + ``Retry-After`` at once when the
  queue is full (or 503 while shutting down), 504 past the request's time limit. With ``"stream": true`` the answer is
  NDJSON: ``{"type": "progress", "tokens": k, "total": t}`` lines while stage 1 samples, then one ``"result"`` line
  (the non-streaming answer plus ``"type"``) or one ``"error"`` line.
- A client that goes away (connection closed) has its request cancelled: its images leave the engine's slots.
- ``GET /`` the web page, ``GET /v1/model`` what the page needs (classes, defaults, limits), ``GET /healthz``,
  ``GET /metrics`` (Prometheus text format).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from digit.errors import DigitError
from digit.serve.api import class_name, error_body, generation_response, parse_generation, parse_json
from digit.serve.metrics import Metrics
from digit.serve.service import Draining, GenerationService, Job, QueueFull, ServeConfig

MAX_BODY_BYTES = 64 * 1024
PROGRESS_INTERVAL_S = 0.1  # NDJSON progress cadence (also how soon a streaming client's departure is noticed)
RETRY_AFTER_S = 1


def _error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(kind, message), status_code=status, headers=headers)


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read: the next ASGI message is the end)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def create_app(pipe: Any, config: ServeConfig | None = None, *, model_name: str = "digit") -> Starlette:
    """The app around a loaded `digit.pipeline.Pipeline`. The engine threads start with the app's lifespan and stop
    (after finishing every accepted request) when it ends."""
    config = config or ServeConfig()
    metrics = Metrics()
    service = GenerationService(pipe, config, metrics)
    metrics.bind(service)
    page = resources.files("digit.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    def answered(status: int) -> None:
        metrics.requests.labels(code=str(status)).inc()

    def refusal(e: Exception) -> JSONResponse:
        if isinstance(e, QueueFull):
            answered(503)
            msg = f"the queue is full ({config.max_queue} requests waiting): retry later"
            return _error(503, "overloaded", msg, {"Retry-After": str(RETRY_AFTER_S)})
        answered(503)
        return _error(503, "shutting_down", "the server is shutting down and takes no new requests")

    def success(job: Job) -> dict[str, Any]:
        result = job.future.result()
        metrics.images.inc(len(result.pngs))
        metrics.latency.observe(time.perf_counter() - job.arrived)
        answered(200)
        return generation_response(job.spec, result, pipe, model_name)

    async def generations(request: Request) -> Response:
        if service.draining:
            return refusal(Draining())
        try:
            spec = parse_generation(parse_json(await request.body()), pipe, config)
            if spec.prompt is not None:  # the text encoder runs off the event loop and off the engine thread
                loop = asyncio.get_running_loop()
                caption = await loop.run_in_executor(None, lambda: pipe.encode_prompts([spec.prompt])[0])
                spec = dataclasses.replace(spec, caption=caption)
        except DigitError as e:
            answered(400)
            return _error(400, "invalid_request", str(e))
        try:
            job = service.submit(spec, asyncio.get_running_loop())
        except (QueueFull, Draining) as e:
            return refusal(e)
        if spec.stream:
            return StreamingResponse(_events(job), media_type="application/x-ndjson")
        watcher = asyncio.ensure_future(_disconnected(request))
        try:
            remaining = max(job.deadline - time.perf_counter(), 0.0)
            await asyncio.wait({job.future, watcher}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if job.future.done():
            return _finished(job)
        if watcher.done() and not watcher.cancelled():
            service.cancel(job, "disconnect")
            answered(499)  # nginx's "client closed request": nobody reads this answer
            return Response(status_code=499)
        service.cancel(job, "timeout")
        answered(504)
        return _error(504, "timeout", f"not finished within {spec.timeout:g} s")

    def _finished(job: Job) -> Response:
        if job.future.exception() is not None:
            e = job.future.exception()
            if isinstance(e, DigitError):
                answered(400)
                return _error(400, "invalid_request", str(e))
            answered(500)
            return _error(500, "internal", f"generation failed: {type(e).__name__}: {e}")
        return JSONResponse(success(job))

    async def _events(job: Job):
        def line(obj: dict[str, Any]) -> bytes:
            return (json.dumps(obj) + "\n").encode()

        try:
            while True:
                remaining = job.deadline - time.perf_counter()
                if remaining <= 0:
                    service.cancel(job, "timeout")
                    answered(504)
                    yield line(
                        {"type": "error", **error_body("timeout", f"not finished within {job.spec.timeout:g} s")}
                    )
                    return
                yield line({"type": "progress", "tokens": job.tokens_done, "total": job.tokens_total})
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(job.future), min(PROGRESS_INTERVAL_S, remaining))
                if job.future.done():
                    break
            if job.future.exception() is not None:
                e = job.future.exception()
                code = 400 if isinstance(e, DigitError) else 500
                answered(code)
                yield line({"type": "error", **error_body("invalid_request" if code == 400 else "internal", str(e))})
                return
            yield line({"type": "result", **success(job)})
        finally:  # the client left mid-stream (the response task is cancelled): free its slots
            if not job.future.done():
                service.cancel(job, "disconnect")

    async def model_info(request: Request) -> Response:
        k = pipe.num_classes
        example = {"prompt": "a prompt"} if pipe.is_text else {"class": 0} if k else {}
        return JSONResponse(
            {
                "model": model_name,
                "kind": pipe.kind,
                "text": pipe.is_text,  # the page shows a prompt box instead of the class list
                "guidance": service.engine.guided,  # false: no trained null condition, the page fixes cfg_scale at 1
                "classes": [{"class": i, "class_name": class_name(pipe, i)} for i in range(k)],
                "image_size": int(pipe.vq.image_size),
                "tokens_per_image": service.tokens_per_image,
                "defaults": {
                    "n": 1,
                    "seed": 0,
                    "stage1": parse_generation(example, pipe, config).stage1.to_dict(),
                },
                "limits": {"max_images": config.max_images, "timeout": config.timeout, "max_batch": config.max_batch},
            }
        )

    async def healthz(request: Request) -> Response:
        if service.error is not None:
            return JSONResponse({"status": "error", "error": str(service.error)}, status_code=500)
        if service.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok", "queue_depth": service.queue_depth, "in_flight": service.in_flight})

    async def metrics_page(request: Request) -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    async def index(request: Request) -> Response:
        return HTMLResponse(page)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        service.start()
        try:
            yield
        finally:
            # uvicorn has waited for the requests in flight; anything still accepted finishes before we return
            await asyncio.get_running_loop().run_in_executor(None, service.stop, config.timeout)

    routes = [
        Route("/", index),
        Route("/v1/images/generations", generations, methods=["POST"]),
        Route("/v1/model", model_info),
        Route("/healthz", healthz),
        Route("/metrics", metrics_page),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, max_body_size=MAX_BODY_BYTES)
    app.state.service = service
    app.state.metrics = metrics
    return app
