"""`digit serve` against real servers on 127.0.0.1 (subprocesses on free ports) with tiny random-weight models:
results equal to `digit generate`'s and to the same request alone, validation errors, overload, timeouts, clients that
go away, metrics, and a SIGTERM that finishes the requests in flight."""

from __future__ import annotations

import base64
import io
import json
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from digit.errors import DigitError
from digit.sampling.params import SamplingParams
from serve_helpers import CLASSES, Server, make_model_folder, read_http_response

T = 256  # stage-1 tokens per image (16x16 grid)
SLOW = {"class": 0, "n": 16, "seed": 99}  # 16 images one at a time: ~16 x 255 engine steps, seconds at least


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_folder(tmp_path_factory.mktemp("serve") / "model")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """Four slots, a roomy queue: the concurrency and validation tests."""
    s = Server(model_dir, "--max-batch", "4", "--max-queue", "32", log=tmp_path_factory.mktemp("log") / "a.log")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def narrow(model_dir, tmp_path_factory):
    """One slot and a queue of two: overload, disconnects and timeouts are easy to set up."""
    log = tmp_path_factory.mktemp("log") / "b.log"
    s = Server(model_dir, "--max-batch", "1", "--max-queue", "2", "--timeout", "60", log=log)
    yield s
    s.stop()


def pixels(item: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).convert("RGB"))


def idle(m: dict) -> bool:
    return (
        m["digit_serve_queue_depth"] == 0
        and m["digit_serve_requests_in_flight"] == 0
        and (m["digit_serve_busy_slots"] == 0)
    )


REQUESTS = [
    {"class": 1, "n": 2, "seed": 5, "cfg_scale": 3.0, "top_k": 5},
    {"class_name": "cat", "n": 1, "seed": 5, "temperature": 0.7, "top_p": 0.9},
    {"class": 3, "n": 3, "seed": 11, "cfg_scale": 2.0, "cfg_schedule": "linear", "decoder": {"top_p": 1.0}},
    {"class": 1, "n": 2, "seed": 6, "cfg_scale": 3.0, "top_k": 5},  # only the seed differs from the first
    {"class": 0, "n": 1, "seed": 0, "temperature": 0.0},
    {"class": 2, "n": 2, "seed": 7, "cfg_scale": 1.5, "cfg_interval": 100, "decoder": {"temperature": 0.5}},
]


def test_concurrent_requests_equal_offline_generation_and_alone(server, model_dir):
    """Six requests at once through four slots: each answer holds exactly the images `digit generate` makes for the
    same class, seed and parameters (offline, in this process), and the same PNGs as the request sent alone."""
    from digit.pipeline import decoder_defaults, generate_images, load_pipeline

    with ThreadPoolExecutor(len(REQUESTS)) as pool:
        together = list(pool.map(server.generate, REQUESTS))
    alone = [server.generate(r) for r in REQUESTS]
    pipe = load_pipeline(model_dir / "stage1", model_dir / "vq", model_dir / "stage2")
    for req, (status, body), (status1, body1) in zip(REQUESTS, together, alone):
        assert status == 200 and status1 == 200, body
        assert body["data"] == body1["data"]  # byte for byte: same PNGs mixed with others and alone
        label = req.get("class", CLASSES.index(req.get("class_name", "")) if "class_name" in req else None)
        assert body["class"] == label and body["class_name"] == CLASSES[label] and body["n"] == req["n"]
        stage1 = SamplingParams(
            **{k: v for k, v in req.items() if k not in ("class", "class_name", "n", "seed", "decoder")}
        )
        decoder = decoder_defaults(pipe.kind).replace(**req.get("decoder", {}))
        assert body["parameters"] == {"stage1": stage1.to_dict(), "decoder": decoder.to_dict()}
        ref = generate_images(pipe, np.full(req["n"], label), stage1, decoder, seed=req["seed"], batch_size=req["n"])
        got = np.stack([pixels(item) for item in body["data"]])
        assert got.shape == (req["n"], 16, 16, 3) and [d["index"] for d in body["data"]] == list(range(req["n"]))
        assert np.array_equal(got, ref.images)
    # the seed matters: the first and fourth requests differ only by it
    assert together[0][1]["data"] != together[3][1]["data"]


def test_streaming_progress_then_the_same_result(server):
    req = {"class": 2, "n": 2, "seed": 3, "cfg_scale": 2.0}
    conn_status, headers, raw = server.request("POST", "/v1/images/generations", {**req, "stream": True})
    assert conn_status == 200 and headers["content-type"].startswith("application/x-ndjson")
    events = [json.loads(line) for line in raw.decode().splitlines()]
    progress = [e for e in events if e["type"] == "progress"]
    assert events[-1]["type"] == "result" and all(e["type"] == "progress" for e in events[:-1])
    assert progress and all(e["total"] == 2 * T for e in progress)
    counts = [e["tokens"] for e in progress]
    assert counts == sorted(counts) and 0 <= counts[0] and counts[-1] <= 2 * T
    assert len(set(counts)) >= 2  # progress moved while the tokens were sampled (256 steps, reported every 0.1 s)
    status, plain = server.generate(req)
    assert status == 200 and events[-1]["data"] == plain["data"] and events[-1]["parameters"] == plain["parameters"]


BAD = [
    (b"not json", "not valid JSON"),
    ([1, 2], "must be a JSON object"),
    ({"class": 1, "colour": "red"}, "unknown fields: colour"),
    ({}, "exactly one of class"),
    ({"class": 1, "class_name": "ant"}, "exactly one of class"),
    ({"class": 4}, "class must be an integer in [0, 4)"),
    ({"class": True}, "class must be an integer"),
    ({"class_name": "emu"}, "unknown class_name 'emu' (known: ant, bee, cat, dog)"),
    ({"class": 0, "n": 0}, "n must be an integer in [1, 16]"),
    ({"class": 0, "n": 17}, "n must be an integer in [1, 16]"),
    ({"class": 0, "seed": -1}, "seed must be an integer"),
    ({"class": 0, "seed": 1.5}, "seed must be an integer"),
    ({"class": 0, "temperature": -1}, "temperature must be a finite number >= 0, got -1"),
    ({"class": 0, "top_p": 0}, "top_p must be a number in (0, 1]"),
    ({"class": 0, "top_k": 2.5}, "top_k must be an integer >= 0"),
    ({"class": 0, "cfg_schedule": "cubic"}, "cfg_schedule must be one of constant, linear"),
    ({"class": 0, "decode": "jacobi"}, "unknown fields: decode"),
    ({"class": 0, "decoder": {"cfg_scale": 2.0}}, "decoder: unknown or unsupported parameters cfg_scale"),
    ({"class": 0, "decoder": {"top_p": 1.5}}, "top_p must be a number in (0, 1]"),
    ({"class": 0, "decoder": [1]}, "decoder must be a JSON object"),
    ({"class": 0, "timeout": 1000}, "timeout must be in (0, 60]"),
    ({"class": 0, "timeout": "soon"}, "timeout must be a number"),
    ({"class": 0, "stream": "yes"}, "stream must be true or false"),
    ({"class": 0, "prompt": "a cat"}, "prompt given but the model is class-conditional, not text"),
]


@pytest.mark.parametrize("body, message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_validation_errors_are_400_json_with_the_message(server, body, message):
    status, headers, raw = server.request("POST", "/v1/images/generations", body if isinstance(body, bytes) else body)
    assert status == 400 and headers["content-type"] == "application/json"
    err = json.loads(raw)["error"]
    assert err["type"] == "invalid_request" and message in err["message"], err


def test_guidance_refused_for_a_model_whose_null_class_was_never_trained(model_dir):
    """Like DiGIT's converted stage 1 (class_dropout 0): a cfg_scale is a 400 with the sampler's own message, and the
    engine runs it unguided."""
    from digit.pipeline import Pipeline
    from digit.sampling.engine import Engine
    from digit.serve.api import parse_generation
    from digit.serve.service import ServeConfig

    pipe = Pipeline.from_pretrained(model_dir)
    pipe.stage1.config.class_dropout = 0.0
    with pytest.raises(DigitError, match="trained with class dropout"):
        parse_generation({"class": 0, "cfg_scale": 2.0}, pipe, ServeConfig())
    assert parse_generation({"class": 0}, pipe, ServeConfig()).stage1.cfg_scale == 1.0
    assert Engine(pipe.stage1, slots=1).guided is False


def test_sampling_messages_are_samplingparams_own(server):
    """The server adds no rule of its own to the sampling values: its message is SamplingParams'."""
    with pytest.raises(DigitError) as e:
        SamplingParams(temperature=float("inf"))
    status, body = server.generate({"class": 0, "temperature": 1e999})  # JSON's 1e999 parses as inf
    assert status == 400 and body["error"]["message"] == str(e.value)


def test_routes_health_page_and_http_errors(server):
    status, _, raw = server.get("/healthz")
    assert status == 200 and json.loads(raw)["status"] == "ok"
    status, headers, raw = server.get("/")
    assert status == 200 and headers["content-type"].startswith("text/html") and b'id="generate"' in raw
    status, _, raw = server.get("/v1/model")
    info = json.loads(raw)
    assert [c["class_name"] for c in info["classes"]] == CLASSES and info["kind"] == "digit-ar"
    assert info["tokens_per_image"] == T and info["image_size"] == 16 and info["limits"]["max_images"] == 16
    assert info["guidance"] is True  # trained with class dropout: the page offers a cfg scale
    assert server.get("/nope")[0] == 404
    assert server.get("/v1/images/generations")[0] == 405
    status, _, _ = server.request("POST", "/v1/images/generations", b'{"class": 0, "pad": "' + b"x" * 100_000 + b'"}')
    assert status == 413


def test_metrics_count_what_was_served(server):
    before = server.wait_for(idle, "an idle server")
    status, body = server.generate({"class": 1, "n": 3, "seed": 2})
    assert status == 200
    server.generate({"class": 9})
    after = server.metrics()
    d = {k: after[k] - before.get(k, 0.0) for k in after if isinstance(after[k], float)}
    assert d["digit_serve_images_total"] == 3
    assert d["digit_serve_tokens_total"] == 3 * T  # every stage-1 token of the request, counted once
    assert d['digit_serve_requests_total{code="200"}'] == 1 and d['digit_serve_requests_total{code="400"}'] == 1
    assert d["digit_serve_request_latency_seconds_count"] == 1
    assert 0 < d["digit_serve_request_latency_seconds_sum"] <= body["timings"]["total_s"] + 1.0
    assert d["digit_serve_engine_steps_total"] >= T - 1  # three images in four slots: one wave of T - 1 steps
    assert d["digit_serve_busy_slot_steps_total"] == 3 * (T - 1)
    assert after["digit_serve_slots"] == 4 and after["digit_serve_tokens_per_second"] > 0
    assert 0 <= after["digit_serve_batch_occupancy"] <= 1 and after["digit_serve_draining"] == 0
    buckets = [after[k] for k in after if k.startswith("digit_serve_request_latency_seconds_bucket")]
    assert buckets == sorted(buckets)  # cumulative


def _busy(m: dict) -> bool:
    return m["digit_serve_busy_slots"] == 1


def test_overload_answers_503_with_retry_after_at_once(narrow):
    """One request in the slot and two queued fill the server: the next is refused at once, the queue unchanged."""
    narrow.wait_for(idle, "an idle server")
    socks = [narrow.open_raw(SLOW)]
    try:
        narrow.wait_for(_busy, "the first request in its slot")
        socks += [narrow.open_raw({**SLOW, "seed": i}) for i in (1, 2)]
        narrow.wait_for(lambda m: _busy(m) and m["digit_serve_queue_depth"] == 2, "one in the slot, two queued")
        t0 = time.perf_counter()
        status, headers, raw = narrow.request("POST", "/v1/images/generations", {"class": 1})
        elapsed = time.perf_counter() - t0
        assert status == 503 and headers["retry-after"] == "1"
        assert json.loads(raw)["error"]["type"] == "overloaded"
        assert elapsed < 1.0, elapsed  # no waiting: refused before any queueing (~ms here; loaded CI gets slack)
        m = narrow.metrics()
        assert m["digit_serve_queue_depth"] == 2 and m['digit_serve_requests_total{code="503"}'] >= 1
    finally:
        for s in socks:
            s.close()
    narrow.wait_for(idle, "the three clients' requests dropped", timeout=30)


def test_disconnect_frees_the_slot_and_the_queue(narrow):
    narrow.wait_for(idle, "an idle server")
    before = narrow.metrics()
    running = narrow.open_raw(SLOW)
    narrow.wait_for(_busy, "the first request in its slot")
    queued = narrow.open_raw({**SLOW, "seed": 1})
    narrow.wait_for(lambda m: m["digit_serve_queue_depth"] == 1, "the second request queued")
    queued.close()  # leaves while waiting: out of the queue, the first one still running
    m = narrow.wait_for(lambda m: m["digit_serve_queue_depth"] == 0, "the queued request dropped")
    assert _busy(m)
    running.close()  # leaves mid-sampling: its slot frees long before its 16 x 255 steps are done
    t0 = time.perf_counter()
    after = narrow.wait_for(idle, "the running request dropped", timeout=10)
    assert time.perf_counter() - t0 < 5
    cancelled = 'digit_serve_requests_cancelled_total{reason="disconnect"}'
    assert after[cancelled] - before.get(cancelled, 0) == 2
    assert after["digit_serve_images_total"] == before["digit_serve_images_total"]  # nothing was decoded for them
    tokens = after["digit_serve_tokens_total"] - before["digit_serve_tokens_total"]
    assert 0 < tokens < 16 * T  # the first one had started, and stopped early
    status, body = narrow.generate({"class": 2, "seed": 4}, timeout=60)  # the slot serves the next request
    assert status == 200 and len(body["data"]) == 1


def test_timeout_is_504_and_frees_the_slot(narrow):
    narrow.wait_for(idle, "an idle server")
    t0 = time.perf_counter()
    status, body = narrow.generate({**SLOW, "timeout": 0.5})
    elapsed = time.perf_counter() - t0
    assert status == 504 and body["error"]["type"] == "timeout" and "0.5 s" in body["error"]["message"]
    assert 0.5 <= elapsed < 5, elapsed
    m = narrow.wait_for(idle, "the timed-out request dropped", timeout=10)
    assert m['digit_serve_requests_cancelled_total{reason="timeout"}'] >= 1


def test_streaming_client_that_leaves_frees_its_slot(narrow):
    narrow.wait_for(idle, "an idle server")
    sock = narrow.open_raw({**SLOW, "stream": True})
    sock.settimeout(30)
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")  # headers and the first progress lines
    narrow.wait_for(_busy, "the request in its slot")
    sock.close()
    m = narrow.wait_for(idle, "the streaming request dropped", timeout=10)
    assert m['digit_serve_requests_cancelled_total{reason="disconnect"}'] >= 1


def test_sigterm_finishes_in_flight_and_refuses_new_work(model_dir, tmp_path):
    """SIGTERM: the request being sampled still gets all its images, a request that arrives afterwards (its headers
    sent before, its body after) gets 503, new connections are refused, the process ends on its own."""
    s = Server(model_dir, "--max-batch", "2", "--max-images", "32", log=tmp_path / "c.log")
    try:
        req = {"class": 3, "n": 32, "seed": 8}  # 16 waves of 255 steps in 2 slots: seconds even on a fast CPU
        result = {}
        worker = threading.Thread(target=lambda: result.update(r=s.generate(req, timeout=120)))
        worker.start()
        s.wait_for(lambda m: m["digit_serve_busy_slots"] == 2, "the request in flight")
        late = socket.create_connection(("127.0.0.1", s.port), timeout=30)
        body = json.dumps({"class": 1}).encode()
        late.sendall(
            b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body[:3]
        )
        time.sleep(0.3)  # the app has the request's headers and waits for its body
        s.proc.send_signal(signal.SIGTERM)
        assert worker.is_alive()  # the signal came while the request was being sampled
        end = time.monotonic() + 20
        while True:  # the listening socket closes: no new connections
            try:
                socket.create_connection(("127.0.0.1", s.port), timeout=1).close()
            except OSError:
                break
            assert time.monotonic() < end, "still accepting connections after SIGTERM"
            time.sleep(0.05)
        late.sendall(body[3:])
        status, raw = read_http_response(late)
        late.close()
        assert status == 503 and json.loads(raw)["error"]["type"] == "shutting_down"
        worker.join(120)
        status, out = result["r"]
        assert status == 200 and len(out["data"]) == 32  # the in-flight request finished whole
        assert s.proc.wait(60) == -signal.SIGTERM  # uvicorn re-raises the signal after its graceful exit
        log = s.log.read_text()
        assert "Application shutdown complete" in log and "Traceback" not in log
    finally:
        s.stop()


def test_llamagen_folder_without_decoder(tmp_path):
    """A folder without stage2/ (LlamaGen: stage 1 samples VQ codes) serves too; decoder parameters are refused."""
    folder = make_model_folder(tmp_path / "m", decoder=False)
    s = Server(folder, "--max-batch", "2", log=tmp_path / "d.log")
    try:
        status, body = s.generate({"class_name": "dog", "n": 2, "seed": 1, "cfg_scale": 2.0})
        assert status == 200 and body["parameters"]["decoder"] is None and len(body["data"]) == 2
        from digit.pipeline import generate_images, load_pipeline

        pipe = load_pipeline(folder / "stage1", folder / "vq")
        ref = generate_images(pipe, np.full(2, 3), SamplingParams(cfg_scale=2.0), seed=1, batch_size=2)
        assert np.array_equal(np.stack([pixels(d) for d in body["data"]]), ref.images)
        status, body = s.generate({"class": 0, "decoder": {"top_p": 0.5}})
        assert status == 400 and "no stage-2 decoder" in body["error"]["message"]
    finally:
        s.stop()


def test_cli_refusals(tmp_path, capsys):
    from digit.cli import main

    (tmp_path / "empty").mkdir()
    assert main(["serve", "--model", str(tmp_path / "empty")]) == 2
    assert "is not a digit model folder (missing stage1/, vq/" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path / "empty"), "--port", "70000"]) == 2
    assert "--port must be in [0, 65535]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--max-batch", "0"])
    assert main(["serve", "--timeout", "inf", "--model", str(tmp_path / "empty")]) == 2
    assert "timeout must be a positive number" in capsys.readouterr().err
