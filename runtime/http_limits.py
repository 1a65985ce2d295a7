"""What the HTTP server guards before a request reaches the model: who may connect, how long a client may
take, how big and how deep a body may be, and what a client sees when something fails.

Kept apart from ``runtime.server`` (the endpoints) so every server built on it gets the same rules:

* Binding. ``check_binding``: an API key must be non-empty ("" is refused at start, never read as "no
  key"); a host beyond loopback without a key is refused unless ``insecure_no_auth`` says so explicitly
  (``serve --insecure-no-auth``).
* Timeouts (slow-loris). ``protocol_class``: uvicorn's h11 protocol with a timer from the first byte of a
  request (or the connection) to the end of its headers; a client that has not sent them within
  ``header_timeout_s`` is disconnected. ``read_body``: the body must arrive within ``body_timeout_s`` in
  all and with no pause longer than ``min(BODY_IDLE_S, body_timeout_s)``; 408 otherwise. llama-server
  has one read timeout (``--timeout``, 600 s); uvicorn alone has none before the first request completes.
* Bodies. ``read_body``: at most ``max_body_bytes`` (413, checked against Content-Length before reading).
  ``parse_json``: strict JSON (``NaN``/``Infinity`` refused), integers of at most ``MAX_INT_DIGITS``
  digits, nesting at most ``max_json_depth`` deep (400) — Python's parser would otherwise raise
  RecursionError or ValueError, and deep values break code that walks them later.
* Failures. ``RequestGuard`` (an ASGI middleware) gives every request an id (``X-Request-Id``); an
  unexpected exception is logged once at ERROR with the id and the traceback, and the client gets 500
  ``{"error": {"message": "internal error (request id ...)", "type": "server_error"}}`` — never the
  exception's text. A client that disconnects while uploading is one INFO line, not an error.
  ``install`` adds the guard and the JSON error handlers to a FastAPI app.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from medgemma_gguf.errors import InputError, setting
from medgemma_gguf.runtime.sources import DEFAULT_MAX_BODY_BYTES

log = logging.getLogger(__name__)

LOOPBACK_NAMES = ("localhost",)
DEFAULT_MAX_JSON_DEPTH = 64  # an OpenAI chat request nests 6 deep; JSON schemas a few more
MAX_INT_DIGITS = 4000  # below Python's int-parsing limit (4300), far above any real field
DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_BODY_TIMEOUT_S = 300.0  # the default 80 MiB body at 2.2 Mbit/s
BODY_IDLE_S = 30.0
REQUEST_ID_HEADER = "x-request-id"


@dataclass(frozen=True)
class HttpLimits:
    """Per-connection and per-body limits (see the module docstring)."""

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_json_depth: int = DEFAULT_MAX_JSON_DEPTH
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S


class ApiError(Exception):
    """A request error answered as ``{"error": {"message", "type"}}`` with ``status``."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.headers = headers  # e.g. Retry-After on a 429


def error_body(message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind}}


# --- who may connect ------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, "localhost")."""
    name = host.strip().strip("[]").lower()
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_binding(host: str, api_key: str | None, *, insecure_no_auth: bool = False) -> None:
    """Refuse an empty API key, and a host beyond loopback without a key unless ``insecure_no_auth``."""
    if api_key is not None and not api_key.strip():
        raise InputError(f"{setting('api_key')} is empty, which would leave the server open; set a non-empty key "
                         "or none (unset MEDGEMMA_API_KEY)")
    if api_key is None and not is_loopback(host) and not insecure_no_auth:
        raise InputError(f"binding to {host} lets other machines use the model; set {setting('api_key')} (or "
                         f"MEDGEMMA_API_KEY), or pass {setting('insecure_no_auth')} to serve it without one")


# --- bodies ---------------------------------------------------------------------------------------------


async def read_body(request: Any, limits: HttpLimits) -> bytes:
    """The request body, at most ``max_body_bytes`` (413), arriving within the body timeouts (408).

    A client that disconnects raises starlette's ``ClientDisconnect`` (``RequestGuard`` logs it at INFO).
    """
    limit = limits.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {declared} bytes; this server accepts at most {limit}")
    idle = min(BODY_IDLE_S, limits.body_timeout_s)
    deadline = time.monotonic() + limits.body_timeout_s
    chunks: list[bytes] = []
    total = 0
    stream: AsyncIterator[bytes] = request.stream()
    while True:
        wait = min(idle, deadline - time.monotonic())
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), timeout=max(wait, 0.0))
        except StopAsyncIteration:
            break
        except TimeoutError:
            log.info("request %s: body not received in time (%d bytes after %.0f s); closing", request_id(request),
                     total, limits.body_timeout_s - (deadline - time.monotonic()))
            raise ApiError(408, f"the request body did not arrive in time (each part within {idle:g} s, all "
                                f"within {limits.body_timeout_s:g} s); send it at once", "timeout_error") from None
        total += len(chunk)
        if total > limit:
            raise ApiError(413, f"the request body is over {limit} bytes, this server's limit")
        chunks.append(chunk)
    return b"".join(chunks)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number; send a finite number")


def _parse_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise ValueError(f"a number with {digits} digits is beyond any field's range")
    return int(text)


def json_depth_exceeds(value: Any, max_depth: int) -> bool:
    """True when ``value`` nests lists/objects more than ``max_depth`` deep (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        for child in children:
            if isinstance(child, dict | list):
                if depth + 1 > max_depth:
                    return True
                stack.append((child, depth + 1))
    return False


def parse_json(raw: bytes, limits: HttpLimits) -> Any:
    """The decoded JSON body; ApiError(400) naming the problem (syntax, encoding, huge numbers, nesting)."""
    try:
        body = json.loads(raw, parse_constant=_refuse_constant, parse_int=_parse_int)
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc.msg} at line {exc.lineno} column "
                            f"{exc.colno}); send a JSON object") from None
    except UnicodeDecodeError:
        raise ApiError(400, "the request body is not valid JSON (not UTF-8 text); send a UTF-8 JSON object") from None
    except RecursionError:
        raise ApiError(400, f"the request body is not valid JSON here: nested more than "
                            f"{limits.max_json_depth} levels deep; flatten it") from None
    except ValueError as exc:  # parse_int / parse_constant
        raise ApiError(400, f"the request body is not valid JSON here: {exc}") from None
    if isinstance(body, dict | list) and json_depth_exceeds(body, limits.max_json_depth):
        raise ApiError(400, f"the request body nests lists/objects more than {limits.max_json_depth} levels deep; "
                            "flatten it")
    return body


# --- failures -------------------------------------------------------------------------------------------


def request_id(request: Any) -> str:
    """The id ``RequestGuard`` gave this request ("-" outside it)."""
    state = request.scope.get("state") or {}
    return str(state.get("request_id", "-"))


def internal_error_message(rid: str) -> str:
    return f"internal error (request id {rid}); the server's log has the details"


class RequestGuard:
    """ASGI middleware: a request id per request, one log line per failure, a generic 500 (module docstring)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from starlette.requests import ClientDisconnect

        rid = uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = rid
        started = False

        async def send_with_id(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []),
                                                  (REQUEST_ID_HEADER.encode(), rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:
            log.info("request %s: the client disconnected before sending the whole request (%s %s)", rid,
                     scope.get("method"), scope.get("path"))
        except Exception as exc:  # noqa: BLE001 - the one place unexpected failures are turned into a 500
            log.error("request %s failed (%s %s)", rid, scope.get("method"), scope.get("path"), exc_info=exc)
            if started:
                return  # a streamed reply already reports it in-band; the server closes the response
            body = json.dumps(error_body(internal_error_message(rid), "server_error")).encode()
            await send_with_id({"type": "http.response.start", "status": 500,
                                "headers": [(b"content-type", b"application/json"),
                                            (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})


def install(app: Any) -> None:
    """Add ``RequestGuard`` and the JSON answers for ``ApiError`` and HTTP errors (404, 405) to a FastAPI app."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(ApiError)
    async def api_error(_request: Any, exc: ApiError) -> JSONResponse:
        headers = {**({"connection": "close"} if exc.status in (408, 413) else {}), **(exc.headers or {})}
        return JSONResponse(error_body(exc.message, exc.kind), status_code=exc.status, headers=headers or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Any, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Any, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body("the request does not match this endpoint", "invalid_request_error"),
                            status_code=400)

    app.add_middleware(RequestGuard)


# --- the server process ---------------------------------------------------------------------------------


def protocol_class(header_timeout_s: float) -> type:
    """uvicorn's h11 protocol with a header timeout: a connection that has not sent a request's line and
    headers within ``header_timeout_s`` of connecting (or of the first byte of the next request on a
    kept-alive connection) is closed. uvicorn's own keep-alive timeout still closes idle connections."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutProtocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self.conn.their_state is h11.IDLE:
                self._arm()
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
                log.info("%s sent no complete request headers within %g s; closing the connection", client,
                         header_timeout_s)
                self.transport.close()

    return HeaderTimeoutProtocol


class _NoQueryString(logging.Filter):
    """uvicorn's access lines without query strings (no endpoint reads one; a client may put anything there)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (args[0], args[1], args[2].split("?", 1)[0] + "?<query>", *args[3:])
        return True


def log_config(*, log_content: bool = False) -> dict[str, Any]:
    """uvicorn's logging configuration with this package's loggers at INFO on the same handler, and the
    privacy policy (``medgemma_gguf.privacy``): tracebacks without exception messages, the content logger
    (DEBUG) only with ``log_content``, other libraries' warnings through the same formatter."""
    import copy

    from uvicorn.config import LOGGING_CONFIG
    from uvicorn.logging import DefaultFormatter

    from medgemma_gguf.privacy import CONTENT_LOGGER, ContentFilter, safe_formatter_class

    config = copy.deepcopy(LOGGING_CONFIG)
    config["formatters"]["default"]["()"] = safe_formatter_class(DefaultFormatter)
    config.setdefault("filters", {}).update({"content": {"()": ContentFilter}, "no_query": {"()": _NoQueryString}})
    for handler in config["handlers"].values():
        handler["filters"] = ["content"]
    config["handlers"]["access"]["filters"] = ["content", "no_query"]
    config["loggers"]["medgemma_gguf"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    config["loggers"][CONTENT_LOGGER] = {"handlers": ["default"], "level": "DEBUG" if log_content else "CRITICAL",
                                         "propagate": False}
    config["root"] = {"handlers": ["default"], "level": "WARNING"}
    return config
