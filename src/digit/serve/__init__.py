"""`digit serve`: an HTTP server (Starlette + uvicorn) over the continuous-batching engine.

- `digit.serve.service`: the bounded queue, the engine thread (stage 1) and the decode thread (stage 2 + VQ);
- `digit.serve.api`: request validation and the JSON answers;
- `digit.serve.app`: ``create_app(pipe, config)``, the routes;
- `digit.serve.metrics`: ``/metrics`` (Prometheus);
- `digit.serve.server`: model folder loading, uvicorn, graceful shutdown;
- ``static/index.html``: the web page at ``/``.
"""
