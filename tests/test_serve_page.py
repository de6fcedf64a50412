"""The web page of `digit serve` in a real headless browser (the system's Chromium; CI installs Debian's package):
it loads, a class is chosen, progress shows while tokens are sampled, and the images that appear are the API's."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from browser import Chromium, find_chromium
from serve_helpers import CLASSES, Server, make_model_folder

CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium on PATH (Debian: apt-get install chromium; .ci/run installs it)"
)


def test_page_generates_images_with_progress(tmp_path):
    folder = make_model_folder(tmp_path / "model")
    # one slot: three images one after the other (3 x 255 steps), so the page has progress to show
    server = Server(folder, "--max-batch", "1", log=tmp_path / "serve.log")
    try:
        with Chromium(CHROMIUM) as browser:
            page = browser.open(f"http://127.0.0.1:{server.port}/")
            page.wait_for("!document.getElementById('generate').disabled", "the form ready")
            names = page.js("[...document.querySelectorAll('#class option')].map(o => o.textContent)")
            assert names == CLASSES
            assert "tokens per image" in page.js("document.getElementById('model').textContent")
            page.js(
                """(() => {
                const set = (id, v) => { const e = document.getElementById(id); e.value = v;
                                         e.dispatchEvent(new Event('change', {bubbles: true})); };
                set('class', '2'); set('n', '3'); set('seed', '5'); set('cfg_scale', '2'); set('top_k', '4');
                document.getElementById('generate').click();
            })()"""
            )
            done = "document.querySelectorAll('#results img.sample').length === 3"
            page.wait_for(  # and record the progress bar's readings on the way (window.__seen)
                f"(() => {{ const p = document.getElementById('progress'); window.__seen = (window.__seen || [])"
                f".concat([[p.value, p.max]]); return {done}; }})()",
                "three images",
            )
            seen = page.js("window.__seen")
            loaded = "[...document.querySelectorAll('#results img.sample')].every(i => i.complete && i.naturalWidth)"
            page.wait_for(loaded, "the images decoded")
            sizes = page.js(
                "[...document.querySelectorAll('#results img.sample')].map(i => [i.naturalWidth, i.naturalHeight])"
            )
            srcs = page.js("[...document.querySelectorAll('#results img.sample')].map(i => i.src)")
            title = page.js("document.querySelector('#results .run h2').textContent")
            status = page.js("document.getElementById('status').textContent")
            final = page.js("[document.getElementById('progress').value, document.getElementById('progress').max]")
            shot = page.screenshot()

            # a value the form lets through but the server refuses comes back as the server's message, shown as an
            # error (the form's own min / max checks stop the others before any request)
            page.js("document.getElementById('seed').value = '1e20'; document.getElementById('generate').click()")
            page.wait_for("document.getElementById('status').className === 'error'", "the error message")
            error = page.js("document.getElementById('status').textContent")
        req = {"class": 2, "n": 3, "seed": 5, "cfg_scale": 2, "top_k": 4, "temperature": 1}
        status_code, body = server.generate(req)  # the same request through the API
    finally:
        server.stop()

    assert sizes == [[16, 16]] * 3
    assert title.startswith("cat") and "seed 5" in title and "guidance 2" in title and "top-k 4" in title
    assert status.startswith("3 image(s)")
    assert final == [3 * 256, 3 * 256]
    # progress was shown while the tokens were sampled: some reading strictly between none and all of them
    assert any(0 < v < m for v, m in seen if m == 3 * 256), seen
    # the images on the page are exactly the API's answer to the same request
    assert status_code == 200
    assert srcs == ["data:image/png;base64," + d["b64_json"] for d in body["data"]]
    img = Image.open(io.BytesIO(shot))
    assert img.format == "PNG" and img.size == (1000, 760)
    assert error.startswith("400: seed must be an integer in [0, 2**63 - 1]"), error


def test_page_link_prefills_and_runs(tmp_path):
    """A link carries the form (``/?class=dog&seed=3&n=2&run=1``): the page picks the class by name and generates."""
    folder = make_model_folder(tmp_path / "model", stage1_grid=4)
    server = Server(folder, "--max-batch", "2", log=tmp_path / "serve.log")
    try:
        with Chromium(CHROMIUM) as browser:
            page = browser.open(f"http://127.0.0.1:{server.port}/?class=dog&seed=3&n=2&cfg_scale=1&run=1")
            page.wait_for("document.querySelectorAll('#results img.sample').length === 2", "two images")
            chosen = page.js("document.getElementById('class').selectedOptions[0].textContent")
            srcs = page.js("[...document.querySelectorAll('#results img.sample')].map(i => i.src)")
        status, body = server.generate({"class_name": "dog", "seed": 3, "n": 2, "cfg_scale": 1, "top_k": 100})
    finally:
        server.stop()
    assert chosen == "dog" and status == 200
    assert srcs == ["data:image/png;base64," + d["b64_json"] for d in body["data"]]
    assert base64.b64decode(srcs[0].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


def test_page_shows_a_prompt_box_for_a_text_model(tmp_path):
    """A text-conditional model: the page hides the class list, shows a prompt box, and sends the prompt; the images
    are the API's answer to the same request."""
    from serve_helpers import make_text_model_folder

    server = Server(make_text_model_folder(tmp_path / "model"), "--max-batch", "2", log=tmp_path / "serve.log")
    try:
        with Chromium(CHROMIUM) as browser:
            page = browser.open(f"http://127.0.0.1:{server.port}/?prompt=a%20blue%20square&n=2&seed=3&top_k=4&run=1")
            done = "document.querySelectorAll('#results img.sample').length === 2"
            page.wait_for(done, "two images")
            hidden = page.js(
                "[document.getElementById('class_box').hidden, document.getElementById('prompt_box').hidden]"
            )
            srcs = page.js("[...document.querySelectorAll('#results img.sample')].map(i => i.src)")
            title = page.js("document.querySelector('#results .run h2').textContent")
        req = {"prompt": "a blue square", "n": 2, "seed": 3, "cfg_scale": 2, "top_k": 4, "temperature": 1}
        status_code, body = server.generate(req)
    finally:
        server.stop()
    assert hidden == [True, False]
    assert title.startswith('"a blue square"') and "seed 3" in title
    assert status_code == 200 and srcs == ["data:image/png;base64," + d["b64_json"] for d in body["data"]]
