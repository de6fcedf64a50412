"""`digit serve` under closed-loop load, beside the offline batch sampler at the same batch size.

For each concurrency C (default 1, 4, 16): a fresh ``digit serve --max-batch C`` on 127.0.0.1, C client threads each
sending one-image requests back to back (a new one as soon as the last answer arrives; a bounded count per client and a
wall-clock cap). Printed: images/s over the run, per-request latency p50 / p99 and the mean fraction of the engine's
slots busy per step (from /metrics), beside `digit generate`'s sampler
(`digit.pipeline.generate_images`, batch size C, same model and sampling parameters, in this process). Then overload:
a server with one slot and a one-request queue, kept full, answers a series of requests: the 503 latency.

    python benchmarks/serve.py                       # shipped CIFAR-10 models, 1 / 4 / 16 clients, one torch thread
    python benchmarks/serve.py --levels 1 4 16 64 --per-client 4
    python benchmarks/serve.py --soak 600             # 4 clients for 10 minutes: the server's RSS over time

Everything runs on this machine (server, clients, offline sampler): on a shared CPU the figures move with the load.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

PARAMS = {"cfg_scale": 2.0, "top_k": 100}  # the demo's settings


class Server:
    def __init__(self, model: str, threads: int, *args: str) -> None:
        cmd = [sys.executable, "-m", "digit", "serve", "--model", model, "--port", "0", "--threads", str(threads)]
        self.proc = subprocess.Popen([*cmd, *args, "--log-level", "warning"], stdout=subprocess.PIPE, text=True)
        self.port = None
        for line in self.proc.stdout:
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
            if m:
                self.port = int(m.group(1))
                break
        if self.port is None:
            raise SystemExit("digit serve did not start")
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()  # keep its pipe drained
        end = time.monotonic() + 60
        while time.monotonic() < end:
            try:
                if self.call("GET", "/healthz")[0] == 200:
                    return
            except OSError:
                time.sleep(0.05)
        raise SystemExit("digit serve never became healthy")

    def call(self, method: str, path: str, body: dict | None = None):
        # a new connection per request: on a reused keep-alive connection http.client and the server met TCP's
        # delayed ACK here (every answer ~40 ms late, a 503 too), which would be measured as server latency
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def occupancy_counts(self) -> tuple[float, float]:
        """(engine steps, busy slot-steps) so far, from /metrics."""
        text = self.call("GET", "/metrics")[1].decode()
        value = lambda name: float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))  # noqa: E731
        return value("digit_serve_engine_steps_total"), value("digit_serve_busy_slot_steps_total")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(120)


def closed_loop(server: Server, clients: int, per_client: int, max_seconds: float) -> tuple[int, float, list[float]]:
    latencies: list[float] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + max_seconds

    def client(k: int) -> None:
        for i in range(per_client):
            if time.perf_counter() > stop_at:
                break
            t0 = time.perf_counter()
            req = {"class": (k + i) % 10, "n": 1, "seed": k * 100_000 + i, **PARAMS}
            status, _ = server.call("POST", "/v1/images/generations", req)
            if status != 200:
                raise SystemExit(f"request failed: {status}")
            with lock:
                latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(latencies), time.perf_counter() - t0, latencies


def rss_mb(pid: int) -> float:
    """Resident set size of a process (Linux /proc), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise SystemExit(f"no VmRSS for pid {pid}")


def soak(model: str, threads: int, seconds: float, clients: int = 4, every: float = 30.0) -> None:
    """Clients in a closed loop for ``seconds``; the server's RSS printed every ``every`` seconds (a leak shows as growth)."""
    server = Server(model, threads, "--max-batch", str(clients), "--max-queue", str(2 * clients))
    served = [0]
    stop_at = time.perf_counter() + seconds

    def client(k: int) -> None:
        i = 0
        while time.perf_counter() < stop_at:
            status, _ = server.call(
                "POST", "/v1/images/generations", {"class": (k + i) % 10, "n": 1, "seed": i, **PARAMS}
            )
            if status != 200:
                raise SystemExit(f"request failed: {status}")
            served[0] += 1
            i += 1

    try:
        threads_ = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
        t0 = time.perf_counter()
        for t in threads_:
            t.start()
        print(f"{'t (s)':>6} | {'images':>6} | server RSS (MiB)", flush=True)
        while True:
            print(f"{time.perf_counter() - t0:>6.0f} | {served[0]:>6} | {rss_mb(server.proc.pid):.1f}", flush=True)
            if time.perf_counter() >= stop_at:
                break
            time.sleep(min(every, max(stop_at - time.perf_counter(), 0.0)))
        for t in threads_:
            t.join()
        print(f"{time.perf_counter() - t0:>6.0f} | {served[0]:>6} | {rss_mb(server.proc.pid):.1f}  (end)")
    finally:
        server.stop()


def offline_rate(model: str, batch: int, images: int) -> float:
    from digit.hub import load_pretrained
    from digit.pipeline import generate_images
    from digit.sampling.params import SamplingParams

    pipe = load_pretrained(model)
    params = SamplingParams(**PARAMS)
    labels = np.arange(images) % max(pipe.num_classes, 1)
    generate_images(pipe, labels[:batch], params, batch_size=batch, seed=1)  # warm-up (allocations, caches)
    t0 = time.perf_counter()
    generate_images(pipe, labels, params, batch_size=batch, seed=0)
    return images / (time.perf_counter() - t0)


def overload(model: str, threads: int, probes: int) -> list[float]:
    """One slot, a one-request queue, both kept busy by slow requests: how fast is the refusal?"""
    server = Server(model, threads, "--max-batch", "1", "--max-queue", "1", "--max-images", "64")
    socks = []
    try:
        for seed in range(2):  # 64 images one at a time: long enough for every probe
            body = json.dumps({"class": 0, "n": 64, "seed": seed}).encode()
            s = socket.create_connection(("127.0.0.1", server.port))
            s.sendall(
                b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            socks.append(s)
            time.sleep(0.5)  # the first enters the slot before the second arrives
        out = []
        for i in range(probes):
            t0 = time.perf_counter()
            status, _ = server.call("POST", "/v1/images/generations", {"class": 1, "seed": i})
            out.append(time.perf_counter() - t0)
            if status != 503:
                raise SystemExit(f"expected 503 under overload, got {status}")
        return out
    finally:
        for s in socks:
            s.close()
        server.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cifar10", help="what `digit serve --model` takes (default: shipped CIFAR-10)")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients (= --max-batch)")
    p.add_argument("--per-client", type=int, default=8, help="requests per client (one image each)")
    p.add_argument("--max-seconds", type=float, default=120, help="wall-clock cap per level")
    p.add_argument("--overload-probes", type=int, default=50)
    p.add_argument("--threads", type=int, default=1, help="torch threads, server and offline sampler")
    p.add_argument(
        "--soak", type=float, default=0, help="instead: 4 clients for this many seconds, server RSS over time"
    )
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.soak > 0:
        soak(args.model, args.threads, args.soak)
        return
    rows = []
    for c in args.levels:
        server = Server(args.model, args.threads, "--max-batch", str(c), "--max-queue", str(max(2 * c, 8)))
        try:
            closed_loop(server, c, 1, args.max_seconds)  # warm-up: one request per client
            before = server.occupancy_counts()
            n, wall, lat = closed_loop(server, c, args.per_client, args.max_seconds)
            after = server.occupancy_counts()
        finally:
            server.stop()
        occupancy = (after[1] - before[1]) / max(after[0] - before[0], 1) / c
        off = offline_rate(args.model, c, max(c * args.per_client, 2 * c))
        rows.append((c, n / wall, np.percentile(lat, 50), np.percentile(lat, 99), occupancy, off))
        print(f"  {c} clients: {n} images in {wall:.1f} s", flush=True)
    print(f"\nmodel {args.model}, one image per request, {PARAMS}, torch threads {args.threads}")
    print(
        f"{'clients':>7} | {'serve img/s':>11} | {'p50 s':>6} | {'p99 s':>6} | {'slots busy':>10} | "
        f"{'offline batch img/s':>19} | ratio"
    )
    for c, rate, p50, p99, occ, off in rows:
        print(f"{c:>7} | {rate:>11.2f} | {p50:>6.3f} | {p99:>6.3f} | {occ:>10.2f} | {off:>19.2f} | {rate / off:.2f}")
    if args.overload_probes:
        lat = np.asarray(overload(args.model, args.threads, args.overload_probes)) * 1000
        print(
            f"overload (1 slot, 1 queued): {len(lat)} requests answered 503, latency p50 {np.percentile(lat, 50):.1f} ms,"
            f" p99 {np.percentile(lat, 99):.1f} ms, max {lat.max():.1f} ms"
        )


if __name__ == "__main__":
    main()
