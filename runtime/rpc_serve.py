"""``serve --rpc``: the server in front, the model split across RPC workers behind it, in a process of its own.

llama.cpp ends the process whose model uses a worker that dies (``runtime.rpc``). So ``serve --rpc`` runs
two processes: the engine process is the ordinary server (``runtime.server.serve``) with the split model,
listening on a private loopback port; this process listens where the user asked and passes every request
through unchanged (bodies and server-sent events streamed both ways, the API key checked by the engine
process). When the engine process ends, this one stays up: ``/health`` answers 503 with the worker that
stopped answering, a reply being streamed ends with an error event, a reply being computed and every new
request are answered 503 with the same message; every ``RETRY_S`` seconds the workers are probed, and once
all answer the model is loaded again in a new engine process and served as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from medgemma_gguf.errors import UnavailableError, UserError
from medgemma_gguf.processes import free_port, stop_process
from medgemma_gguf.runtime.rpc import Endpoint, probe

log = logging.getLogger(__name__)

RETRY_S = 5.0  # how often a front whose engine process ended checks whether the workers are back
START_TIMEOUT_S = 3600.0  # the engine process loads the model and sends the weights to the workers
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "host", "content-length"}


@dataclass
class Engine:
    """The engine process and what became of it."""

    process: subprocess.Popen
    port: int
    endpoints: tuple[Endpoint, ...]
    down: str = ""  # why it ended, once it has

    def check(self) -> str:
        """'' while the engine process runs, else the message saying which worker stopped answering."""
        if self.down or self.process.poll() is None:
            return self.down
        dead = []
        for endpoint in self.endpoints:
            try:
                probe(endpoint, timeout=2.0)
            except UserError:
                dead.append(str(endpoint))
        who = f"RPC worker {', '.join(dead)} stopped answering" if dead else "the engine process ended"
        self.down = (f"{who} (the engine process exited with {self.process.returncode}); this server loads the "
                     f"model again once every worker answers (checked every {RETRY_S:g} s); retry later")
        log.error("%s", self.down)
        return self.down


def engine_main(fd: int) -> None:
    """The engine process (``python -m medgemma_gguf.runtime.rpc_engine --serve FD``): load the split model and
    serve it on the loopback port it was given. A load failure is sent back as one line."""
    from medgemma_gguf.runtime.rpc_model import _error_payload, load_split
    from medgemma_gguf.runtime.server import serve

    conn = Connection(fd)
    setup, load_options, serve_options = conn.recv()
    try:
        spec = serve_options.pop("audit_spec", None)
        if spec is not None:  # opened here: the audit log is written by the process that answers
            from medgemma_gguf.runtime.audit import AuditLog

            serve_options["audit_log"] = AuditLog(spec[0], max_bytes=spec[1], backups=spec[2])
        model = load_split(setup, **load_options)
    except BaseException as exc:  # noqa: BLE001 - back to the parent as one line
        conn.send(("error", *_error_payload(exc)))
        return
    conn.send(("loaded", model.n_ctx))
    conn.close()
    with model:
        serve(model, **serve_options, trust_forwarded_for=True)  # the front sets X-Forwarded-For


def start_engine(setup: Any, load_options: dict[str, Any], serve_options: dict[str, Any]) -> Engine:
    """Start the engine process on a free loopback port and wait until it serves (or say why it could not)."""
    from medgemma_gguf.runtime.rpc_model import _rebuild_error

    port = free_port()
    parent_socket, child_socket = socket.socketpair()
    with child_socket:
        process = subprocess.Popen(
            [sys.executable, "-m", "medgemma_gguf.runtime.rpc_engine", "--serve", str(child_socket.fileno())],
            pass_fds=(child_socket.fileno(),), stdin=subprocess.DEVNULL, env=dict(os.environ, GGML_NO_BACKTRACE="1"))
    conn = Connection(parent_socket.detach())
    engine = Engine(process, port, tuple(setup.endpoints))
    try:
        conn.send((setup, load_options, dict(serve_options, host="127.0.0.1", port=port, insecure_no_auth=False)))
        if not conn.poll(START_TIMEOUT_S):
            raise UnavailableError(f"the engine process did not load the model within {START_TIMEOUT_S:g} s")
        try:
            message = conn.recv()
        except EOFError:
            raise UnavailableError(engine.check() or "the engine process ended while loading") from None
        if message[0] == "error":
            raise _rebuild_error(message[1], message[2])
    except BaseException:
        stop_engine(engine)
        raise
    finally:
        conn.close()
    import httpx

    deadline = time.monotonic() + 120
    while True:  # loaded: wait for its port
        if engine.check():
            raise UnavailableError(engine.down)
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
            return engine
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                stop_engine(engine)
                raise UnavailableError("the engine process loaded the model but does not answer") from None
            time.sleep(0.2)


def stop_engine(engine: Engine) -> None:
    stop_process(engine.process)


def _error(status: int, message: str) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": "unavailable_error"}}, status_code=status)


class Front:
    """The engine process behind the front, replaced by a new one when the workers answer again."""

    def __init__(self, engine: Engine, restart: Callable[[], Engine] | None = None):
        import httpx

        self.engine = engine
        self.restart = restart
        self.reloading = False
        self.client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{engine.port}", timeout=None)

    async def watch(self) -> None:
        """While the engine process is down: every ``RETRY_S`` seconds probe the workers; when all answer, start
        a new engine process (the model is loaded and the weights sent again) and pass requests to it."""
        import httpx

        while self.restart is not None:
            await asyncio.sleep(RETRY_S)
            if not self.engine.check():
                continue
            try:
                await asyncio.to_thread(lambda: [probe(e, timeout=2.0) for e in self.engine.endpoints])
            except UserError:
                continue
            log.info("every RPC worker answers again: loading the model in a new engine process")
            self.reloading = True
            try:
                engine = await asyncio.to_thread(self.restart)
            except Exception as exc:  # noqa: BLE001 - logged; the next round tries again
                log.error("loading the model again failed: %s", exc)
                continue
            finally:
                self.reloading = False
            old, self.client = self.client, httpx.AsyncClient(base_url=f"http://127.0.0.1:{engine.port}",
                                                              timeout=None)
            self.engine = engine
            await old.aclose()
            log.info("the model is served again")


def create_front(front: Front) -> Any:
    """The ASGI app that passes requests to the engine process, and answers for it while it is gone."""
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    def down_body(message: str) -> dict[str, Any]:
        state = "loading" if front.reloading else "down"
        return {"status": "error", "error": message,
                "rpc": {"workers": [str(e) for e in front.engine.endpoints], "engine": state}}

    async def health(request: Request) -> Response:
        engine, client = front.engine, front.client
        down = engine.check()
        if down:
            return JSONResponse(down_body(down), status_code=503)
        try:
            answer = await client.get("/health")
        except httpx.HTTPError:
            return JSONResponse(down_body(engine.check() or "the engine process does not answer"), status_code=503)
        body = answer.json()
        body["rpc"] = {"workers": [str(e) for e in engine.endpoints], "engine": "up"}
        return JSONResponse(body, status_code=answer.status_code)

    async def forward(request: Request) -> Response:
        engine, client = front.engine, front.client
        down = engine.check()
        if down:
            return _error(503, down)
        # the engine process takes the client's address from X-Forwarded-For (serve's trust_forwarded_for):
        # this front sets it to the real client, so the audit log records who asked
        headers = [(k, v) for k, v in request.headers.items()
                   if k.lower() not in HOP_BY_HOP and k.lower() not in ("x-forwarded-for", "x-forwarded-proto")]
        headers.append(("x-forwarded-for", request.client.host if request.client else "unknown"))
        headers.append(("x-forwarded-proto", request.url.scheme))
        upstream = client.build_request(request.method, request.url.path, params=request.url.query or None,
                                        headers=headers, content=request.stream())
        try:
            answer = await client.send(upstream, stream=True)
        except httpx.HTTPError:
            await asyncio.sleep(0.2)  # let the engine process's exit be seen
            return _error(503, engine.check() or "the engine process does not answer; retry in a moment")
        streaming = answer.headers.get("content-type", "").startswith("text/event-stream")

        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in answer.aiter_raw():
                    yield chunk
            except httpx.HTTPError:
                await asyncio.sleep(0.2)
                message = engine.check() or "the engine process stopped answering"
                if streaming:
                    error = {"error": {"message": message, "type": "unavailable_error"}}
                    yield f"data: {json.dumps(error)}\n\n".encode()
            finally:
                await answer.aclose()

        out_headers = {k: v for k, v in answer.headers.items() if k.lower() not in HOP_BY_HOP}
        if not streaming:  # a whole reply: read it here, so a failure can still be a 503
            try:
                content = await answer.aread()
            except httpx.HTTPError:
                await asyncio.sleep(0.2)
                return _error(503, engine.check() or "the engine process stopped answering")
            finally:
                await answer.aclose()
            return Response(content, status_code=answer.status_code, headers=out_headers)
        return StreamingResponse(body(), status_code=answer.status_code, headers=out_headers)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        watcher = asyncio.create_task(front.watch())
        try:
            yield
        finally:
            watcher.cancel()
            await front.client.aclose()

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]
    return Starlette(routes=[Route("/health", health, methods=["GET"]),
                             Route("/{path:path}", forward, methods=methods)], lifespan=lifespan)


def serve_split(setup: Any, load_options: dict[str, Any], serve_options: dict[str, Any], *, host: str,
                port: int, header_timeout_s: float) -> None:
    """Start the engine process, then serve the front on ``host:port`` until interrupted; the engine process is
    stopped with it."""
    import uvicorn

    from medgemma_gguf.runtime.http_limits import log_config, protocol_class

    front = Front(start_engine(setup, load_options, serve_options),
                  restart=lambda: start_engine(setup, load_options, serve_options))
    # uvicorn re-raises SIGTERM once it has shut down; with the default handler that would end this process
    # before the engine process is stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        uvicorn.run(create_front(front), host=host, port=port, log_level="info", log_config=log_config(),
                    http=protocol_class(header_timeout_s))
    finally:
        stop_engine(front.engine)
