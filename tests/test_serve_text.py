"""`digit serve` with a text-conditional model: requests carry a prompt; each slot of the engine carries its caption
(and the null caption for guidance), so every answer is the pixels `digit generate --prompt` makes with the same seed,
alone or mixed with other prompts. A real server on 127.0.0.1 with tiny random-weight models."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from digit.sampling.params import SamplingParams
from serve_helpers import Server, make_text_model_folder
from test_serve import pixels

REQUESTS = [
    {"prompt": "a red circle", "n": 2, "seed": 5, "cfg_scale": 3.0, "top_k": 5},
    {"prompt": "two small blue squares, left of a triangle", "n": 1, "seed": 5, "temperature": 0.7},
    {"prompt": "a red circle", "n": 2, "seed": 6, "cfg_scale": 3.0, "top_k": 5},  # only the seed differs from #0
    {"prompt": "nothing", "n": 3, "seed": 1, "cfg_scale": 2.0, "cfg_schedule": "linear", "decoder": {"top_p": 1.0}},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_text_model_folder(tmp_path_factory.mktemp("serve-text") / "model")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    s = Server(model_dir, "--max-batch", "3", log=tmp_path_factory.mktemp("log") / "text.log")
    yield s
    s.stop()


def test_text_requests_equal_generate_by_prompt_alone_and_mixed(server, model_dir):
    from digit.pipeline import decoder_defaults, generate_images, load_pipeline

    with ThreadPoolExecutor(len(REQUESTS)) as pool:
        together = list(pool.map(server.generate, REQUESTS))
    alone = [server.generate(r) for r in REQUESTS]
    pipe = load_pipeline(model_dir / "stage1", model_dir / "vq", model_dir / "stage2",
                         text_encoder=model_dir / "text_encoder")  # fmt: skip
    for req, (status, body), (status1, body1) in zip(REQUESTS, together, alone):
        assert status == 200 and status1 == 200, body
        assert body["data"] == body1["data"]  # the same PNGs mixed with other prompts and alone
        assert body["prompt"] == req["prompt"] and body["class"] is None and body["n"] == req["n"]
        stage1 = SamplingParams(**{k: v for k, v in req.items() if k not in ("prompt", "n", "seed", "decoder")})
        decoder = decoder_defaults(pipe.kind).replace(**req.get("decoder", {}))
        n = req["n"]
        ref = generate_images(pipe, np.full(n, -1), stage1, decoder, prompts=[req["prompt"]] * n, seed=req["seed"])
        assert np.array_equal(np.stack([pixels(item) for item in body["data"]]), ref.images)
    assert together[0][1]["data"] != together[2][1]["data"]  # the seed matters


def test_text_model_description_and_refusals(server):
    status, _, raw = server.get("/v1/model")
    info = json.loads(raw)
    assert status == 200 and info["text"] is True and info["classes"] == []
    for body, message in [
        ({"class": 1, "prompt": "x"}, "class given but the model is text-conditional: give prompt instead"),
        ({"n": 1}, "this model is text-conditional: give prompt"),
        ({"prompt": 3}, "prompt must be a string"),
        ({"prompt": "   "}, "prompt must be non-empty text"),
        ({"prompt": "a\nb"}, "control character"),
        ({"prompt": "x" * 5000}, "at most 4096"),
    ]:
        status, answer = server.generate(body)
        assert status == 400 and message in answer["error"]["message"], (body, answer)


def test_load_model_takes_the_text_encoder_flag(model_dir, tmp_path):
    """`digit serve --text-encoder DIR` (server.load_model): the directory given wins and is checked against the run."""
    from digit.errors import DigitError
    from digit.serve.server import load_model

    other = tmp_path / "other"
    other.mkdir()
    (other / "text_encoder.json").write_text(json.dumps({"kind": "random-test", "dim": 8, "max_length": 12, "seed": 9}))
    with pytest.raises(DigitError, match="not the encoder this run was trained with"):
        load_model(model_dir, text_encoder=other)
    pipe, name = load_model(model_dir, text_encoder=model_dir / "text_encoder")
    assert pipe.is_text and name == "model" and pipe.text_encoder_dir == model_dir / "text_encoder"
