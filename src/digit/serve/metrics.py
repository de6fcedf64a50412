"""`GET /metrics`: the server's state in Prometheus' text format (prometheus_client, one registry per app)."""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
RATE_WINDOW_S = 5.0  # tokens/s is measured over the engine steps of the last few seconds


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        p = "digit_serve_"
        self.queue_depth = Gauge(p + "queue_depth", "requests waiting for the engine", registry=r)
        self.in_flight = Gauge(p + "requests_in_flight", "requests in the engine or being decoded", registry=r)
        self.slots = Gauge(p + "slots", "engine slots (--max-batch)", registry=r)
        self.busy_slots = Gauge(p + "busy_slots", "engine slots holding an image now", registry=r)
        self.occupancy = Gauge(p + "batch_occupancy", "fraction of the slots busy at the last engine step", registry=r)
        self.steps = Counter(p + "engine_steps", "engine steps (one decode forward each)", registry=r)
        self.slot_steps = Counter(
            p + "busy_slot_steps", "busy slots summed over engine steps (/ steps / slots = mean occupancy)", registry=r
        )
        self.tokens = Counter(p + "tokens", "stage-1 tokens sampled", registry=r)
        self.tokens_per_s = Gauge(
            p + "tokens_per_second", f"stage-1 tokens per second over the last {RATE_WINDOW_S:g} s", registry=r
        )
        self.images = Counter(p + "images", "images returned", registry=r)
        self.requests = Counter(p + "requests", "generation requests answered, by HTTP status", ["code"], registry=r)
        self.cancelled = Counter(p + "requests_cancelled", "requests dropped before finishing", ["reason"], registry=r)
        self.latency = Histogram(
            p + "request_latency_seconds",
            "arrival to last PNG, successful generation requests",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.draining = Gauge(p + "draining", "1 once the server stopped taking requests (SIGTERM)", registry=r)
        self._lock = threading.Lock()
        self._window: deque[tuple[float, int]] = deque()

    def bind(self, service: Any) -> None:
        """Gauges read from the service at scrape time."""
        self.queue_depth.set_function(lambda: service.queue_depth)
        self.in_flight.set_function(lambda: service.in_flight)
        self.busy_slots.set_function(lambda: service.busy_slots)
        self.draining.set_function(lambda: float(service.draining))
        self.slots.set(service.engine.slots)

    def on_step(self, busy: int, slots: int, tokens: int, seconds: float) -> None:
        """One engine step (the engine thread): ``busy`` slots stepped, ``tokens`` sampled."""
        self.steps.inc()
        self.slot_steps.inc(busy)
        self.occupancy.set(busy / slots)
        self.tokens.inc(tokens)
        now = time.monotonic()
        with self._lock:
            self._window.append((now, tokens))
            while self._window and self._window[0][0] < now - RATE_WINDOW_S:
                self._window.popleft()
            span = max(now - self._window[0][0] + seconds, 1e-6)
            self.tokens_per_s.set(sum(t for _, t in self._window) / span)

    def render(self) -> bytes:
        return generate_latest(self.registry)
