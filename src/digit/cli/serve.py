"""`digit serve`: the HTTP server (`digit.serve`)."""

from __future__ import annotations

import argparse

from digit.cli.common import add_device_arg, add_text_encoder_args, positive_float, positive_int


def register(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve image generation over HTTP (JSON API, web page, Prometheus metrics)",
        description="An HTTP server over the continuous-batching engine: POST /v1/images/generations (JSON: class or "
        "class_name, or prompt for a text-conditional model, n, seed, sampling parameters -> base64 PNGs), GET / (a web page), GET /healthz, GET /metrics. "
        "A full queue answers 503 with Retry-After; SIGTERM stops taking requests and finishes those in flight.",
    )
    p.add_argument(
        "--model",
        default="cifar10",
        help="a model folder (stage1/, vq/ and for DiGIT stage2/: `digit recipe ship` or save_pretrained), 'cifar10' "
        "(the shipped reference models, the default) or a Hugging Face repository id",
    )
    add_text_encoder_args(
        p,
        "a text-conditional model's text encoder (default: the folder's text_encoder/ or the directory "
        "save_pretrained recorded); requests then give a prompt",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port, printed at start)")
    p.add_argument("--max-batch", type=positive_int, default=16, help="engine slots: images sampled together")
    p.add_argument("--max-queue", type=positive_int, default=64, help="requests waiting before new ones get 503")
    p.add_argument("--timeout", type=positive_float, default=60.0, help="seconds per request before 504")
    p.add_argument("--max-images", type=positive_int, default=16, help="largest n per request")
    p.add_argument("--compile", action="store_true", help="torch.compile the engine's decode step")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    add_device_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from digit.cli.common import resolve_device, text_encoder_dir
    from digit.errors import DigitError
    from digit.serve.server import run_server
    from digit.serve.service import ServeConfig

    if not 0 <= args.port <= 65535:
        raise DigitError(f"--port must be in [0, 65535], got {args.port}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    config = ServeConfig(
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        timeout=args.timeout,
        max_images=args.max_images,
        compile=args.compile,
    )
    device = resolve_device(args.device)
    return run_server(
        args.model,
        host=args.host,
        port=args.port,
        config=config,
        device=device,
        log_level=args.log_level,
        text_encoder=text_encoder_dir(args),
    )
