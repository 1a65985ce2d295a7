"""An OpenAI-compatible HTTP server for one loaded MedGemma model: ``create_app(model) -> FastAPI``.

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (raw prompt; plain JSON or
server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``), ``GET /v1/models``,
``GET /health``, ``GET /metrics`` (Prometheus text), and the web chat page at ``/`` (static files in
``runtime/web``; ``GET /api/presets`` and ``POST /api/thumbnail`` serve it; it sends volumes and slides as
the study items below).

Requests run in parallel slots with continuous batching (``runtime.batching``: ``serve --parallel N``, each
slot ``--ctx`` positions); requests beyond the slots wait in a queue of ``queue_size`` (``--queue``), and a
request that finds it full is answered 429 with ``Retry-After``. A client that disconnects — streaming or
not, running or queued — frees its slot at the next token; ``request_timeout`` (``--request-timeout``)
ends a reply after that many seconds from its arrival (``finish_reason`` "length", ``timings.timed_out``),
or answers 503 if it was still queued.

Fields: every one is honoured or refused with 400 naming it (``runtime.openai_api``); tools are refused
(MedGemma is not trained for tool calls). Defaults differ from OpenAI's in one place: ``temperature``
defaults to 0 (greedy, as in Google's MedGemma examples); ``max_tokens`` defaults to the server's limit.
Logprobs come from the model's logits before sampling. A seeded request reproduces only when it runs
alone: batched with others, the last bits of its logits change (``runtime.batching``).

Safety: images come as base64 ``data:`` URIs; a local path (or ``file://`` URL) for an image, volume or
slide only under the folders the server allows (``allowed_roots``, ``serve --allow-dir``; with
``allow_local_files`` and no folder given, the working directory): symlinks are resolved before the test,
only regular files are read and their size is checked first (``runtime.sources``). http(s) and every other
remote URL are refused with 400 and never fetched (server-side request forgery). Studies
(``runtime.studies``): ``{"type": "volume", "data": <base64 of a zipped DICOM series or a NIfTI file>}``,
``{"type": "slide", "data": ...}`` and ``{"type": "longitudinal", "prior", "current"}``. Limits: request
body bytes (413; the default fits an 85-slice CT series zipped as base64), JSON nesting, header and body
read timeouts (``runtime.http_limits``), pixels per image, images per request (a volume counts its
slices, a slide its patches; the default takes a CT study), ``max_tokens``/``max_completion_tokens``.
An API key, when set, must be non-empty and come as ``Authorization: Bearer KEY`` (401 otherwise;
``/health`` and the page's static files stay open; ``/metrics`` needs the key, as in llama-server); binding
beyond loopback needs a key or ``insecure_no_auth``. CORS is off unless origins are given (``--cors-origin``).
Every bad request is answered ``{"error": {"message", "type"}}`` with a 4xx status and the server keeps
serving; an unexpected failure is a 500 with a request id and a generic message (the details only in the server's log).

LoRA adapters (``serve --lora``): ``GET /v1/models`` lists the ids and a request's ``model`` chooses the
adapters it runs with (``runtime.lora``: ``M`` = the default set, ``M+base``, ``M+<adapter>``); the reply's
``model`` is the id it ran with. Requests with different adapter sets run in separate batches.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import io
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, Response
from starlette.concurrency import run_in_threadpool

from medgemma_gguf.errors import UserError
from medgemma_gguf.privacy import content_log, loggable, set_content_logging
from medgemma_gguf.runtime.audit import AUDIT_STATE_KEY, AuditLog, AuditMiddleware
from medgemma_gguf.runtime.batching import Batcher, Job, QueueFull, TokenEvent, TokenLogprob
from medgemma_gguf.runtime.chat import ChatModel, ChatResult
from medgemma_gguf.runtime.http_limits import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_MAX_JSON_DEPTH,
    ApiError,
    HttpLimits,
    check_binding,
    install,
    internal_error_message,
    parse_json,
    read_body,
    request_id,
)
from medgemma_gguf.runtime.openai_api import (
    ParsedRequest,
    chat_logprob,
    completion_logprobs,
    now,
    parse_chat_request,
    parse_completion_request,
)
from medgemma_gguf.runtime.prompt import Prompt, load_presets
from medgemma_gguf.runtime.reply import CONTENT, OPENAI_DELTA_KEYS
from medgemma_gguf.runtime.sampling import Sampler
from medgemma_gguf.runtime.sources import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_IMAGES

log = logging.getLogger(__name__)

MiB = 1024**2
WEB_DIR = Path(__file__).with_name("web")
DEFAULT_QUEUE = 32
# the page loads only its own files and talks only to this server (no patient data leaves the machine)
PAGE_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
THUMBNAIL_SIZE = 160
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/",
             "/api/presets", "/api/thumbnail")


DEFAULT_MAX_LOCAL_FILE_BYTES = 256 * MiB  # one image file read from an allowed folder


@dataclass(frozen=True)
class ServerLimits:
    """Per-request limits; the body, nesting and timeout ones are enforced by ``runtime.http_limits``."""

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_image_pixels: int = 25_000_000
    max_images: int = DEFAULT_MAX_IMAGES
    max_tokens_limit: int = 2048
    max_json_depth: int = DEFAULT_MAX_JSON_DEPTH
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    max_file_bytes: int = DEFAULT_MAX_LOCAL_FILE_BYTES

    @property
    def http(self) -> HttpLimits:
        return HttpLimits(self.max_body_bytes, self.max_json_depth, self.header_timeout_s, self.body_timeout_s)


def _user_error(exc: UserError) -> ApiError:
    return ApiError(exc.http_status, exc.for_http(), "not_found_error" if exc.http_status == 404 else
                    "invalid_request_error")


class _Counting:
    """ASGI middleware counting responses by endpoint and status for ``/metrics``."""

    def __init__(self, app: Any, counts: Counter):
        self.app = app
        self.counts = counts

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "/static" if path.startswith("/static/") else "other"

        async def counted(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                self.counts[(endpoint, str(message["status"]))] += 1
            await send(message)

        await self.app(scope, receive, counted)


def create_app(model: ChatModel, *, api_key: str | None = None, allow_local_files: bool = False,
               limits: ServerLimits | None = None, allowed_roots: Sequence[Path] = (), parallel: int | None = None,
               queue_size: int = DEFAULT_QUEUE, request_timeout: float | None = None,
               cors_origins: Sequence[str] = (), audit_log: AuditLog | None = None) -> FastAPI:
    """The FastAPI app serving ``model`` with ``parallel`` slots (default: every sequence the model was loaded
    with, ``load(n_parallel=...)``). Local paths (images, volumes, slides) are read only under
    ``allowed_roots``; ``allow_local_files`` without roots allows the working directory. The slots start
    with the app (its lifespan) and stop with it. ``audit_log``: one JSON line per request (``runtime.audit``)."""
    limits = limits or ServerLimits()
    roots = tuple(Path(r) for r in allowed_roots) or ((Path.cwd(),) if allow_local_files else ())
    check_binding("127.0.0.1", api_key)  # an empty key is refused, never read as "no key"
    if request_timeout is not None and not request_timeout > 0:
        raise UserError("the request timeout must be a number of seconds > 0")
    state: dict[str, Batcher] = {}
    http_counts: Counter = Counter()

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        state["batcher"] = Batcher(model, n_slots=parallel, queue_size=queue_size)
        try:
            yield
        finally:
            await run_in_threadpool(state.pop("batcher").close)

    app = FastAPI(title="medgemma-gguf", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    install(app)  # request ids, one log line per failure, generic 500s (runtime.http_limits)
    if cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)
    app.add_middleware(_Counting, counts=http_counts)
    if audit_log is not None:
        app.add_middleware(AuditMiddleware, log=audit_log, api_key=api_key)
    created = int(time.time())
    image_options = model.image_options(max_pixels=limits.max_image_pixels, allow_local_files=False,
                                        allowed_roots=roots, max_images=limits.max_images,
                                        max_file_bytes=limits.max_file_bytes)

    def batcher() -> Batcher:
        if "batcher" not in state:
            raise ApiError(503, "the server is starting or stopping; retry in a moment", "unavailable_error")
        return state["batcher"]

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "invalid or missing API key; send 'Authorization: Bearer KEY'", "authentication_error")

    async def json_body(request: Request) -> Any:
        authorize(request)
        body = parse_json(await read_body(request, limits.http), limits.http)
        content_log("request %s %s: %s", request_id(request), request.url.path, loggable(body))  # --log-content
        return body

    # --- the page and its helpers ----------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", headers={"Content-Security-Policy": PAGE_POLICY,
                                                             "Cache-Control": "no-cache"})

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> FileResponse:
        files = {p.name: p for p in WEB_DIR.iterdir() if p.is_file() and p.name != "index.html"}
        if name not in files:
            raise ApiError(404, f"no file {name!r} here", "not_found_error")
        return FileResponse(files[name], headers={"Content-Security-Policy": PAGE_POLICY, "Cache-Control": "no-cache"})

    @app.get("/api/presets")
    async def presets(request: Request) -> dict[str, Any]:
        """The page's settings: the presets (task presets with their input kind and texts, which the page lays
        out as ``runtime.studies.task_layout`` does) and the limits it checks before sending."""
        authorize(request)
        return {"presets": [{"name": p.name, "description": p.description, "system": p.system, "input": p.input,
                             "instruction": p.instruction, "question": p.question, "prompt_hint": p.prompt_hint}
                            for p in load_presets().values()],
                "model": model.name, "vision": model.has_vision, "max_tokens_limit": limits.max_tokens_limit,
                "max_images": limits.max_images, "n_ctx": model.n_ctx, "max_body_bytes": limits.max_body_bytes}

    @app.post("/api/thumbnail")
    async def thumbnail(request: Request) -> dict[str, Any]:
        """A small PNG of an image the page attaches (DICOM too, which a browser cannot show itself)."""
        body = await json_body(request)
        uri = body.get("image") if isinstance(body, dict) else None
        if not isinstance(uri, str):
            raise ApiError(400, "send {\"image\": \"data:...;base64,...\"}")

        def render() -> str:
            from medgemma_gguf.runtime.images import load_image_from_data_uri

            img = load_image_from_data_uri(uri, max_pixels=limits.max_image_pixels)
            img.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
            buffer = io.BytesIO()
            img.save(buffer, format="PNG")
            return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

        try:
            return {"thumbnail": await run_in_threadpool(render)}
        except UserError as exc:
            raise _user_error(exc) from exc

    # --- OpenAI endpoints ------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> dict[str, Any]:
        current = state.get("batcher")
        return {"status": "ok" if current else "unavailable", "model": model.name,
                "slots": current.n_slots if current else 0,
                "slots_busy": current.busy_slots() if current else 0,
                "queue": current.queue_depth() if current else 0}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        ids = model.model_ids
        return {"object": "list", "data": [
            {"id": model_id, "object": "model", "created": created, "owned_by": "medgemma-gguf",
             "lora": [{"name": n, "scale": ids.adapters[n].scale} for n in ids.resolve(model_id)]}
            for model_id in ids.listed()]}

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        authorize(request)  # as llama-server: request counts and timings are for the operator
        from medgemma_gguf.runtime.metrics import render_metrics

        body, content_type = render_metrics(state.get("batcher"), http_counts, queue_size)
        return Response(body, media_type=content_type)

    def prepare(req: ParsedRequest, prompt_of: Any) -> tuple[Prompt, Sampler, tuple[str, ...]]:
        """Build the prompt and the sampler on the request's thread: every 4xx before the request queues."""
        try:
            adapters = model.model_ids.resolve(req.model)
            prompt = prompt_of()
            model.check_fits(prompt)
            sampler = model.engine.new_sampler(req.sampling.resolve(model.sampling_defaults),
                                               reasoning=model.reasoning_markers)
        except UserError as exc:
            raise _user_error(exc) from exc
        return prompt, sampler, adapters

    async def run(request: Request, req: ParsedRequest, prompt: Prompt, sampler: Sampler,
                  adapters: tuple[str, ...], shape: str) -> Any:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        deadline = time.monotonic() + request_timeout if request_timeout else None
        job = Job(prompt, req.sampling, sampler, lambda kind, value: loop.call_soon_threadsafe(
            events.put_nowait, (kind, value)), adapters=adapters, top_logprobs=req.top_logprobs,
            ignore_eos=req.ignore_eos, deadline=deadline)
        try:
            batcher().submit(job)
        except QueueFull as exc:
            sampler.close()
            raise ApiError(429, f"all {batcher().n_slots} slots are busy and the queue is full "
                                f"({batcher().queue_depth()} waiting); retry after {exc.retry_after} s",
                           "rate_limit_error",
                           {"Retry-After": str(exc.retry_after)}) from None
        except BaseException:
            sampler.close()
            raise

        async def watch() -> None:  # the client going away cancels the job, wherever it is
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    job.cancelled.set()
                    return

        watcher = asyncio.ensure_future(watch())
        kind, value = await events.get()  # "started", or the job ended before it got a slot
        rid = request_id(request)
        if kind != "started":
            watcher.cancel()
            raise _job_error(kind, value, rid)
        model_id = model.model_ids.reply_id(req.model)
        audit = request.scope.setdefault("state", {}).setdefault(AUDIT_STATE_KEY, {})
        audit["model"] = model_id
        completion_id = (f"chatcmpl-{uuid.uuid4().hex}" if shape == "chat" else f"cmpl-{uuid.uuid4().hex}")
        if req.stream:
            from sse_starlette.sse import EventSourceResponse

            return EventSourceResponse(_stream(events, job, watcher, req, shape, completion_id, model_id, rid,
                                               audit))
        try:
            logprobs: list[TokenLogprob] = []
            while True:
                kind, value = await events.get()
                if kind == "token":
                    if value.logprob is not None:
                        logprobs.append(value.logprob)
                elif kind == "done":
                    break
                else:
                    raise _job_error(kind, value, rid)
        finally:
            watcher.cancel()
        if value is None or value.finish_reason == "cancelled":
            return Response(status_code=499)  # nobody is listening any more
        _record(audit, rid, value)
        return _full_reply(shape, completion_id, model_id, value, logprobs if req.top_logprobs is not None else None)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await json_body(request)
        req = parse_chat_request(body, max_tokens_limit=limits.max_tokens_limit, max_images=limits.max_images)
        prompt, sampler, adapters = await run_in_threadpool(
            prepare, req, lambda: model.prompt(req.messages or [], images=image_options, think=req.think))
        return await run(request, req, prompt, sampler, adapters, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await json_body(request)
        req = parse_completion_request(body, max_tokens_limit=limits.max_tokens_limit)

        def raw_prompt() -> Prompt:
            if isinstance(req.prompt, list):
                bad = [t for t in req.prompt if t >= model.engine.n_vocab]
                if bad:
                    raise UserError(f"'prompt' holds token {bad[0]}, but the vocabulary has {model.engine.n_vocab}")
                ids = list(req.prompt)
            else:
                assert isinstance(req.prompt, str)
                ids = model.engine.tokenize(req.prompt)
                if not ids or ids[0] != model.engine.bos_token:
                    ids = [model.engine.bos_token, *ids]  # as llama-server: BOS added unless the text has it
            return Prompt([ids], req.prompt if isinstance(req.prompt, str) else "", 0)

        prompt, sampler, adapters = await run_in_threadpool(prepare, req, raw_prompt)
        return await run(request, req, prompt, sampler, adapters, "text")

    return app


def _job_error(kind: str, value: Any, rid: str) -> ApiError:
    if kind == "error" and isinstance(value, UserError):
        return _user_error(value)
    if kind == "error" and isinstance(value, TimeoutError):
        return ApiError(503, f"{value}; retry later", "unavailable_error", {"Retry-After": "5"})
    if kind == "done":  # cancelled while queued: the client has gone
        return ApiError(499, "the client closed the request", "cancelled")
    log.error("request %s: generation failed", rid, exc_info=value if isinstance(value, BaseException) else None)
    return ApiError(500, internal_error_message(rid), "server_error")


def _record(audit: dict[str, Any], rid: str, result: ChatResult) -> None:
    """The reply's token counts for the audit log; its text only for ``--log-content``."""
    audit["prompt_tokens"], audit["completion_tokens"] = result.prompt_tokens, result.completion_tokens
    content_log("request %s: reply %s", rid, loggable(result.text))


def _usage(result: ChatResult) -> dict[str, Any]:
    usage = result.openai_usage()
    usage["prompt_tokens_details"] = {"cached_tokens": int(result.timings.get("prompt_positions_reused", 0))}
    return usage


def _full_reply(shape: str, completion_id: str, model_id: str, result: ChatResult,
                logprobs: list[TokenLogprob] | None) -> dict[str, Any]:
    if shape == "chat":
        choice = {"index": 0, "message": result.openai_message(), "finish_reason": result.finish_reason,
                  "logprobs": {"content": [chat_logprob(e) for e in logprobs], "refusal": None}
                  if logprobs is not None else None}
        kind = "chat.completion"
    else:
        choice = {"index": 0, "text": result.text, "finish_reason": result.finish_reason,
                  "logprobs": completion_logprobs(logprobs) if logprobs is not None else None}
        kind = "text_completion"
    return {"id": completion_id, "object": kind, "created": now(), "model": model_id, "choices": [choice],
            "usage": _usage(result), "timings": result.timings}


async def _stream(events: asyncio.Queue, job: Job, watcher: asyncio.Future, req: ParsedRequest, shape: str,
                  completion_id: str, model_id: str, rid: str,
                  audit: dict[str, Any]) -> AsyncIterator[dict[str, str]]:
    """The job's events as OpenAI stream chunks; the generator closing (the client left) cancels the job."""
    chat = shape == "chat"
    kind_name = "chat.completion.chunk" if chat else "text_completion"
    usage_null = {"usage": None} if req.include_usage else {}
    text_offset = 0

    def chunk(choice: dict[str, Any], **extra: Any) -> dict[str, str]:
        payload = {"id": completion_id, "object": kind_name, "created": now(), "model": model_id,
                   "choices": [choice], **usage_null, **extra}
        return {"data": json.dumps(payload, ensure_ascii=False)}

    pending: list[TokenLogprob] = []  # logprobs of tokens whose text is not shown yet

    def logprobs_field() -> Any:
        nonlocal text_offset
        if req.top_logprobs is None:
            return None
        entries = list(pending)
        pending.clear()
        if chat:
            return {"content": [chat_logprob(e) for e in entries]}
        field = completion_logprobs(entries, text_offset)
        text_offset += sum(len(t) for t in field["tokens"])
        return field

    try:
        if chat:
            yield chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None})
        while True:
            kind, value = await events.get()
            if kind == "token":
                event: TokenEvent = value
                if event.logprob is not None:
                    pending.append(event.logprob)
                for channel, text in event.deltas:
                    if chat:
                        yield chunk({"index": 0, "delta": {OPENAI_DELTA_KEYS[channel]: text},
                                     "logprobs": logprobs_field(), "finish_reason": None})
                    elif channel == CONTENT:
                        yield chunk({"index": 0, "text": text, "logprobs": logprobs_field(), "finish_reason": None})
            elif kind == "done":
                result: ChatResult = value
                _record(audit, rid, result)
                final = {"index": 0, "logprobs": logprobs_field() if pending else None,
                         "finish_reason": result.finish_reason}
                yield chunk({**final, "delta": {}} if chat else {**final, "text": ""}, timings=result.timings)
                if req.include_usage:
                    payload = {"id": completion_id, "object": kind_name, "created": now(), "model": model_id,
                               "choices": [], "usage": _usage(result)}
                    yield {"data": json.dumps(payload)}
                break
            else:
                error = _job_error(kind, value, rid)
                yield {"data": json.dumps({"error": {"message": error.message, "type": error.kind}})}
                break
        yield {"data": "[DONE]"}
    finally:
        job.cancelled.set()  # a no-op once the job is done
        watcher.cancel()


def serve(model: ChatModel, *, host: str = "127.0.0.1", port: int = 8080, api_key: str | None = None,
          allow_local_files: bool = False, limits: ServerLimits | None = None,
          allowed_roots: Sequence[Path] = (), insecure_no_auth: bool = False, parallel: int | None = None,
          queue_size: int = DEFAULT_QUEUE, request_timeout: float | None = None,
          cors_origins: Sequence[str] = (), audit_log: AuditLog | None = None, log_content: bool = False,
          trust_forwarded_for: bool = False) -> None:
    """Serve ``model`` with uvicorn until interrupted (``runtime.http_limits``: binding rules, header timeout).

    The client's address (access log, audit log) is the connection's own: uvicorn would take it from
    ``X-Forwarded-For`` sent from 127.0.0.1, which any local process can forge. ``trust_forwarded_for``:
    take it from there (the ``serve --rpc`` engine process, whose one client is its front, which sets it).

    The log holds no request or reply content at any level unless ``log_content`` (``--log-content``: at DEBUG;
    ``medgemma_gguf.privacy``)."""
    import uvicorn

    from medgemma_gguf.runtime.http_limits import log_config, protocol_class

    check_binding(host, api_key, insecure_no_auth=insecure_no_auth)
    limits = limits or ServerLimits()
    app = create_app(model, api_key=api_key, allow_local_files=allow_local_files, limits=limits,
                     allowed_roots=allowed_roots, parallel=parallel, queue_size=queue_size,
                     request_timeout=request_timeout, cors_origins=cors_origins, audit_log=audit_log)
    set_content_logging(log_content)
    uvicorn.run(app, host=host, port=port, log_level="info", log_config=log_config(log_content=log_content),
                http=protocol_class(limits.header_timeout_s), proxy_headers=trust_forwarded_for)
