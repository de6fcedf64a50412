"""The README's screenshot of `digit serve`'s web page: a server on the given model, the page in headless Chromium
(tests/browser.py: the DevTools protocol over a pipe), two classes generated through the form, then a PNG.

    python benchmarks/serve_screenshot.py --out docs/serve-page.png      # the shipped CIFAR-10 models
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]  # benchmarks/ has stdlib-like names
sys.path.insert(0, str(HERE.parent / "tests"))  # the browser driver the page's test uses

import argparse  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

from browser import Chromium, find_chromium  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cifar10")
    p.add_argument("--out", required=True)
    p.add_argument("--runs", nargs="+", default=["ship:2", "horse:1"], help="CLASS:SEED, generated in this order")
    p.add_argument("--n", type=int, default=8)
    args = p.parse_args()
    chromium = find_chromium()
    if chromium is None:
        sys.exit("no Chromium on PATH (Debian: apt-get install chromium)")
    cmd = [sys.executable, "-m", "digit", "serve", "--model", args.model, "--port", "0", "--threads", "1"]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        port = None
        for line in server.stdout:
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
            if m:
                port = int(m.group(1))
                break
        if port is None:
            sys.exit("digit serve did not start")
        with Chromium(chromium, width=1000, height=580) as browser:
            page = browser.open(f"http://127.0.0.1:{port}/")
            page.wait_for("!document.getElementById('generate').disabled", "the form")
            for i, run in enumerate(args.runs):
                name, seed = run.split(":")
                page.js(
                    f"""(() => {{ const s = document.getElementById('class');
                    s.value = [...s.options].find(o => o.textContent === {name!r}).value;
                    document.getElementById('seed').value = {int(seed)};
                    document.getElementById('n').value = {args.n};
                    document.getElementById('generate').click(); }})()"""
                )
                page.wait_for(f"document.querySelectorAll('#results .run').length === {i + 1}", f"run {i + 1}", 300)
                page.wait_for("!document.getElementById('generate').disabled", "the form again")
            time.sleep(0.3)  # the last images painted
            Path(args.out).write_bytes(page.screenshot())
        print(f"wrote {args.out}")
    finally:
        server.terminate()
        server.wait(60)


if __name__ == "__main__":
    main()
