"""Run the app under uvicorn: load a model, bind, serve; SIGTERM / Ctrl-C drain before exiting.

Shutdown on SIGTERM (or the first Ctrl-C): the service stops taking requests at once (503 for any that still reach
it), uvicorn closes the listening socket and waits for the requests in flight, then the app's lifespan finishes every
accepted job and stops the engine threads. A second Ctrl-C quits without waiting (uvicorn's force exit).
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from types import FrameType
from typing import Any

from digit.errors import DigitError
from digit.serve.service import ServeConfig


def load_model(
    model: str | os.PathLike, device: Any = "cpu", text_encoder: str | os.PathLike | None = None
) -> tuple[Any, str]:
    """What `Pipeline.from_pretrained` loads (a model folder, ``"cifar10"`` for the shipped reference models, or a
    Hugging Face repository id; ``text_encoder``: a text-conditional model's encoder directory), checked to be
    servable. Returns (the pipeline, a name for the API)."""
    from digit.hub import load_pretrained

    pipe = load_pretrained(model, device=device, text_encoder=text_encoder)
    if not pipe.stage1.config.causal:
        raise DigitError("the server samples stage 1 autoregressively; this stage-1 model is bidirectional (MaskGIT)")
    name = os.fspath(model)
    return pipe, (Path(name).resolve().name if Path(name).is_dir() else name)


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind before serving, so ``--port 0`` gets a free port we can print (tests read it from the first line)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise DigitError(f"cannot listen on {host}:{port} ({e.strerror or e})") from e
    sock.set_inheritable(True)
    return sock


def run_server(
    model: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    config: ServeConfig | None = None,
    device: Any = "cpu",
    log_level: str = "info",
    text_encoder: str | os.PathLike | None = None,
) -> int:
    import uvicorn

    from digit.serve.app import create_app

    config = config or ServeConfig()
    pipe, name = load_model(model, device, text_encoder)
    app = create_app(pipe, config, model_name=name)
    service = app.state.service
    sock = bind_socket(host, port)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    print(
        f"digit serve: {name} ({pipe.kind}) on {device}, {config.max_batch} slots, queue {config.max_queue}, "
        f"timeout {config.timeout:g} s\ndigit serve: listening on http://{shown}:{bound}",
        flush=True,
    )

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            service.begin_drain()  # from now on: 503, while uvicorn lets the requests in flight finish
            super().handle_exit(sig, frame)

    uv_config = uvicorn.Config(
        app,
        log_level=log_level,
        lifespan="on",
        timeout_graceful_shutdown=int(config.timeout) + 5,  # no request in flight outlives its own timeout
        access_log=False,
    )
    server = Server(uv_config)
    server.run(sockets=[sock])
    sock.close()
    if service.error is not None:
        print(f"digit serve: the engine stopped: {service.error}", file=sys.stderr)
        return 1
    return 0
