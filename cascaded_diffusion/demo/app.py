"""The demo's web side: a Starlette app serving one static page and a small JSON API, run by uvicorn.

Starlette rather than gradio (docs/demo.md has the comparison): it and uvicorn pull in 7 small packages where
gradio pulls in 52 (pandas, huggingface_hub, its own client and a bundled front end among them), and the page is one
file of HTML and JavaScript that a real browser test drives directly.

API (every error is JSON ``{"error": message}``, never a traceback):

* ``GET /`` — the page; ``GET /api/info`` — the cascade: classes, stages, level ranges and defaults;
* ``POST /api/sample`` — a JSON object of parameters (:meth:`DemoEngine.parse`) -> the images; 400 for a bad
  parameter, 409 while another sample is drawn; sampling runs on a worker thread, not the event loop;
* ``GET /api/progress`` — the current sample's stage and step (from the samplers' per-step callback).
"""

from __future__ import annotations

import json
import socket
import sys
import traceback
from pathlib import Path

from ..errors import UserError
from .engine import DemoBusy, DemoEngine, DemoParameterError

PAGE = Path(__file__).with_name("index.html")
MAX_BODY = 64 * 1024  # the page sends a few hundred bytes; anything far larger is not the page


def _require_web_packages() -> None:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise UserError(f"cdm demo needs the web server packages ({e.name} is missing): "
                        "pip install 'cascaded-diffusion[demo]'") from None


def build_app(engine: DemoEngine):
    _require_web_packages()
    import anyio
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Route

    page = PAGE.read_text()

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    async def index(request):
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    async def info(request):
        return JSONResponse(engine.info())

    async def progress(request):
        return JSONResponse(engine.progress(), headers={"Cache-Control": "no-store"})

    async def sample(request):
        raw = await request.body()
        if len(raw) > MAX_BODY:
            return error(413, f"request body of {len(raw)} bytes; the parameters fit in {MAX_BODY}")
        try:
            body = json.loads(raw) if raw.strip() else {}
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return error(400, f"the body is not JSON: {e}")
        try:
            params = engine.parse(body)
            engine.try_acquire()  # on the event loop: a second request is answered at once, not queued
        except DemoParameterError as e:
            return error(400, str(e))
        except DemoBusy as e:
            return error(409, str(e))
        started = False

        def work():
            nonlocal started
            started = True
            return engine.sample(params, acquired=True)  # releases the engine when it ends, however it ends

        try:
            # off the event loop, so /api/progress and other requests are answered meanwhile; a client that
            # goes away does not cancel a running thread (anyio waits for it)
            result = await anyio.to_thread.run_sync(work)
        except BaseException as e:
            if not started:  # cancelled before the thread ran: nobody else will release the engine
                engine.release()
            if not isinstance(e, Exception):
                raise
            # a bug, not the user's: the traceback goes to the server's log, not the page
            traceback.print_exc(file=sys.stderr)
            return error(500, f"sampling failed ({type(e).__name__}: {e}); see the server's log")
        return JSONResponse(result)

    async def not_found(request, exc):
        return error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    routes = [Route("/", index), Route("/api/info", info), Route("/api/progress", progress),
              Route("/api/sample", sample, methods=["POST"])]
    from starlette.exceptions import HTTPException

    return Starlette(routes=routes, exception_handlers={HTTPException: not_found})


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port); port 0 picks a free one. Bound here, before the server starts, so a
    port in use is a one-line error and the URL printed is the real one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(16)
    return sock


def make_server(engine: DemoEngine, log_level: str = "warning"):
    """A uvicorn server for ``engine``'s app; ``server.run(sockets=[bind(...)])`` serves until ``should_exit``."""
    _require_web_packages()
    import uvicorn

    return uvicorn.Server(uvicorn.Config(build_app(engine), log_level=log_level, access_log=False))
