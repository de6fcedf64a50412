"""Helpers for the `digit serve` tests: tiny random-weight model folders, a real server in a subprocess on 127.0.0.1,
HTTP through the standard library (no client library between the test and the server)."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from digit.models import GPT, build_config
from digit.tokenizers.vq import VQModel

CLASSES = ["ant", "bee", "cat", "dog"]
SRC = str(Path(__file__).resolve().parents[1] / "src")
START_TIMEOUT_S = 180  # importing torch and loading the models on a loaded 2-core machine


TEXT_ENCODER = {"kind": "random-test", "dim": 8, "max_length": 12, "seed": 1}


def _save_run(path: Path, model_config, meta: dict[str, Any], seed: int, data: dict[str, Any] | None = None) -> None:
    torch.manual_seed(seed)
    model = GPT(model_config)
    with torch.no_grad():  # weights large enough that sampling is far from uniform (distinct images per seed)
        for p in model.parameters():
            p.normal_(0, 0.3)
    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    config = {"model": model_config.to_dict(), "data": {"meta": meta, **(data or {})}}
    (path / "config.json").write_text(json.dumps(config))


def make_model_folder(root: Path, stage1_grid: int = 16, decoder: bool = True) -> Path:
    """A DiGIT-shaped model folder (stage1/, stage2/, vq/) of random tiny models: stage 1 samples a
    ``stage1_grid``-square grid of 16 ids per class (4 classes), the decoder turns it into a 4x4 grid of a 32-code VQ
    that renders 16-px images. Without ``decoder``: a LlamaGen-shaped folder (stage 1 samples the VQ's codes)."""
    torch.manual_seed(0)
    VQModel.from_preset("tiny", image_size=16, codebook_size=32).save(root / "vq")
    meta = {"class_names": CLASSES, "num_classes": len(CLASSES)}
    g = stage1_grid
    if decoder:
        s1 = build_config("tiny", vocab_size=16, grid=(g, g), cond="class", num_classes=len(CLASSES))
        dec = build_config("tiny", vocab_size=32, grid=(4, 4), cond="prefix", prefix_vocab_size=16, prefix_grid=(g, g))
        _save_run(root / "stage2", dec, {}, seed=2)
    else:
        s1 = build_config("tiny", vocab_size=32, grid=(4, 4), cond="class", num_classes=len(CLASSES))
    _save_run(root / "stage1", s1, meta, seed=1)
    return root


def make_text_model_folder(root: Path, stage1_grid: int = 8) -> Path:
    """A DiGIT-shaped folder whose stage 1 is text-conditional (12 caption positions of 8 features), with the
    deterministic random test encoder in ``text_encoder/`` (the run records its identity, as training does)."""
    from digit.data.text_features import RandomTextEncoder

    torch.manual_seed(0)
    VQModel.from_preset("tiny", image_size=16, codebook_size=32).save(root / "vq")
    (root / "text_encoder").mkdir()
    (root / "text_encoder" / "text_encoder.json").write_text(json.dumps(TEXT_ENCODER))
    g = stage1_grid
    s1 = build_config("tiny", vocab_size=16, grid=(g, g), cond="text", caption_len=12, caption_dim=8)
    dec = build_config("tiny", vocab_size=32, grid=(4, 4), cond="prefix", prefix_vocab_size=16, prefix_grid=(g, g))
    _save_run(root / "stage2", dec, {}, seed=2)
    identity = RandomTextEncoder(dim=8, max_length=12, seed=1).identity()
    _save_run(root / "stage1", s1, {}, seed=1, data={"text_encoder": identity})
    return root


class Server:
    """``python -m digit serve --port 0 ...`` in a subprocess; the port is read from its first lines."""

    def __init__(self, model: Path, *args: str, log: Path) -> None:
        env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
        cmd = [sys.executable, "-m", "digit", "serve", "--model", str(model), "--port", "0", "--threads", "1", *args]
        self.log = log
        self._out = open(log, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT, env=env)
        self.port = self._wait_port()
        self._wait_healthy()

    def _wait_port(self) -> int:
        end = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < end:
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", self.log.read_text(errors="replace"))
            if m:
                return int(m.group(1))
            if self.proc.poll() is not None:
                raise RuntimeError(f"digit serve exited with {self.proc.returncode}:\n{self.log.read_text()}")
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"digit serve did not start within {START_TIMEOUT_S} s:\n{self.log.read_text()}")

    def _wait_healthy(self) -> None:
        end = time.monotonic() + 60
        while time.monotonic() < end:
            try:
                if self.get("/healthz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"digit serve never became healthy:\n{self.log.read_text()}")

    # ---- HTTP
    def request(
        self, method: str, path: str, body: Any = None, timeout: float = 60
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
            headers = {"Content-Type": "application/json"} if data is not None else {}
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def get(self, path: str) -> tuple[int, dict[str, str], bytes]:
        return self.request("GET", path)

    def generate(self, body: dict[str, Any], timeout: float = 120) -> tuple[int, dict[str, Any]]:
        status, _, raw = self.request("POST", "/v1/images/generations", body, timeout=timeout)
        return status, json.loads(raw)

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics as ``name{labels}`` -> value, parsed by prometheus_client's own parser."""
        from prometheus_client.parser import text_string_to_metric_families

        status, headers, raw = self.get("/metrics")
        assert status == 200 and headers["content-type"].startswith("text/plain")
        out = {}
        for family in text_string_to_metric_families(raw.decode()):
            for s in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out

    def wait_for(self, predicate, what: str, timeout: float = 30) -> dict[str, float]:
        """Poll /metrics until ``predicate(metrics)`` holds (bounded)."""
        end = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if predicate(m):
                return m
            if time.monotonic() > end:
                raise AssertionError(f"timed out waiting for {what}: {m}")
            time.sleep(0.02)

    def open_raw(self, body: dict[str, Any]) -> socket.socket:
        """Send a generation request on a raw socket and return it unread (close it to disconnect)."""
        data = json.dumps(body).encode()
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        head = (
            f"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n"
        )
        sock.sendall(head.encode() + data)
        return sock

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()
        return self.proc.returncode


def read_http_response(sock: socket.socket, timeout: float = 60) -> tuple[int, bytes]:
    """Status and body of one response read from a raw socket (Content-Length bodies)."""
    sock.settimeout(timeout)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed before a response: {buf!r}")
        buf += chunk
    head, body = buf.split(b"\r\n\r\n", 1)
    status = int(head.split(b" ", 2)[1])
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, body
