"""An OpenAI-compatible HTTP server for one loaded MedGemma model: ``create_app(model) -> FastAPI``.

Endpoints: ``POST /v1/chat/completions`` (plain JSON or server-sent events in OpenAI's chunk format,
ending with ``data: [DONE]``), ``GET /v1/models``, ``GET /health``.

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
``/health`` stays open); binding beyond loopback needs a key or ``insecure_no_auth``. Every bad request is
answered ``{"error": {"message", "type"}}`` with a 4xx status and the server keeps serving; an unexpected
failure is a 500 with a request id and a generic message (the details only in the server's log).

LoRA adapters (``serve --lora``): ``GET /v1/models`` lists the ids and a request's ``model`` chooses the
adapters it runs with (``runtime.lora``: ``M`` = the default set, ``M+base``, ``M+<adapter>``); the reply's
``model`` is the id it ran with. Switching adapters clears the cached prefix.

One model, one context: requests run one at a time (a lock held from prompt building to the last token;
a streaming client that disconnects stops its generation at the next token). Defaults differ from
OpenAI's in one place: ``temperature`` defaults to 0 (greedy, as in Google's MedGemma examples);
``max_tokens`` defaults to the server's limit. ``n > 1`` is refused with 400.

Sampling fields (checked by ``runtime.sampling.settings_from_request``, the validation the CLI and the
Python API use): ``temperature``, ``top_p``, ``seed``, ``presence_penalty``, ``frequency_penalty``,
``logit_bias``, ``stop`` (up to 4 strings, never part of the reply, also when streaming), and
llama-server's ``top_k``, ``min_p``, ``repeat_penalty``, ``repeat_last_n``. A sampled request takes the
model's top-k/top-p for what it leaves unset. Structured output: ``response_format`` in OpenAI's shapes
(``json_object``, ``json_schema``) and llama-server's ``grammar``/``json_schema`` (``runtime.structured``).
Reasoning: a reasoning block the model writes comes back as the message's ``reasoning_content`` and as
``reasoning_content`` stream deltas, never in ``content`` (``runtime.reply``); ``reasoning_effort`` other
than "none" adds MedGemma's think instruction to the system prompt.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool

from medgemma_gguf.errors import UserError
from medgemma_gguf.runtime.chat import ChatModel, ChatResult, ChatStream
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
from medgemma_gguf.runtime.reply import OPENAI_DELTA_KEYS
from medgemma_gguf.runtime.sampling import SamplingSettings, settings_from_request, think_from_request
from medgemma_gguf.runtime.sources import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_IMAGES
from medgemma_gguf.runtime.studies import requested_images

log = logging.getLogger(__name__)

MiB = 1024**2
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


@dataclass(frozen=True)
class CompletionRequest:
    """The fields of a chat completion request this server uses, validated."""

    messages: list[Any]
    stream: bool
    include_usage: bool
    sampling: SamplingSettings
    model: str | None = None
    think: bool = False


def _count_images(messages: Any) -> int:
    if not isinstance(messages, list):
        return 0
    return sum(requested_images(item) for m in messages if isinstance(m, Mapping) and isinstance(m.get("content"), list)
               for item in m["content"] if isinstance(item, Mapping))


def parse_request(body: Any, limits: ServerLimits) -> CompletionRequest:
    """Validate a decoded request body; ApiError(400) naming the first problem."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty array of {role, content} objects")
    n_images = _count_images(messages)
    if n_images > limits.max_images:
        raise ApiError(400, f"the request has {n_images} images (a volume counts its 'slices', a slide its 'patches'); "
                            f"this server accepts at most {limits.max_images}")
    if body.get("n") is not None and (type(body["n"]) is not int or body["n"] != 1):
        raise ApiError(400, "'n' must be 1: one model, one reply per request")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool | None):
        raise ApiError(400, "'stream_options' must be an object like {\"include_usage\": true}")
    include_usage = bool(options.get("include_usage"))
    try:
        sampling = settings_from_request(body, default_max_tokens=limits.max_tokens_limit)
    except UserError as exc:
        raise ApiError(exc.http_status, exc.for_http()) from exc
    for name in ("max_completion_tokens", "max_tokens"):  # each one given, whichever wins
        if body.get(name) is not None and body[name] > limits.max_tokens_limit:
            raise ApiError(400, f"'{name}' {body[name]} is above this server's limit of {limits.max_tokens_limit}")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "'model' must be a string (GET /v1/models lists them)")
    try:
        think = think_from_request(body)
    except UserError as exc:
        raise ApiError(exc.http_status, exc.for_http()) from exc
    return CompletionRequest(messages, stream, include_usage, sampling, model, think)


def create_app(model: ChatModel, *, api_key: str | None = None, allow_local_files: bool = False,
               limits: ServerLimits | None = None, allowed_roots: Sequence[Path] = ()) -> FastAPI:
    """The FastAPI app serving ``model``. Local paths (images, volumes, slides) are read only under
    ``allowed_roots``; ``allow_local_files`` without roots allows the working directory."""
    limits = limits or ServerLimits()
    roots = tuple(Path(r) for r in allowed_roots) or ((Path.cwd(),) if allow_local_files else ())
    check_binding("127.0.0.1", api_key)  # an empty key is refused, never read as "no key"
    app = FastAPI(title="medgemma-gguf", docs_url=None, redoc_url=None, openapi_url=None)
    install(app)  # request ids, one log line per failure, generic 500s (runtime.http_limits)
    lock = threading.Lock()
    created = int(time.time())
    image_options = model.image_options(max_pixels=limits.max_image_pixels, allow_local_files=False,
                                        allowed_roots=roots, max_images=limits.max_images,
                                        max_file_bytes=limits.max_file_bytes)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "invalid or missing API key; send 'Authorization: Bearer KEY'", "authentication_error")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model.name}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        ids = model.model_ids
        return {"object": "list", "data": [
            {"id": model_id, "object": "model", "created": created, "owned_by": "medgemma-gguf",
             "lora": [{"name": n, "scale": ids.adapters[n].scale} for n in ids.resolve(model_id)]}
            for model_id in ids.listed()]}

    def start(req: CompletionRequest, cancelled: threading.Event | None = None) -> ChatStream:
        """Build the prompt and evaluate it (the caller holds the lock); ApiError(400) for bad input."""
        try:
            model.use_adapters(model.model_ids.resolve(req.model))  # a change clears the cached prefix
            prompt = model.prompt(req.messages, images=image_options, think=req.think)
            return model.generate(prompt, req.sampling,
                                  should_stop=cancelled.is_set if cancelled is not None else None)
        except UserError as exc:
            raise ApiError(exc.http_status, exc.for_http()) from exc

    def complete(req: CompletionRequest) -> tuple[ChatResult, str]:
        with lock:
            return start(req).collect(), model.model_ids.reply_id(req.model)

    def chunk(completion_id: str, model_id: str, delta: dict[str, Any], finish: str | None = None,
              **extra: Any) -> dict[str, str]:
        payload = {"id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()),
                   "model": model_id, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                   "finish_reason": finish}], **extra}
        return {"data": json.dumps(payload, ensure_ascii=False)}

    async def stream_completion(req: CompletionRequest, completion_id: str, rid: str):
        from sse_starlette.sse import EventSourceResponse

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        cancelled = threading.Event()

        def put(kind: str, value: Any = None) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

        def worker() -> None:
            with lock:
                try:
                    replies = start(req, cancelled)
                except Exception as exc:  # noqa: BLE001 - handed to the request's task
                    put("error", exc)
                    return
                put("ready")
                try:
                    for delta in replies.deltas():  # ends early once the client has gone (cancelled is set)
                        put("piece", delta)
                    put("done", replies.result)
                except Exception as exc:  # noqa: BLE001
                    log.error("request %s: generation failed", rid, exc_info=exc)
                    put("failed", exc)

        threading.Thread(target=worker, name="medgemma-generate", daemon=True).start()
        kind, value = await queue.get()
        if kind == "error":
            cancelled.set()
            raise value
        model_id = model.model_ids.reply_id(req.model)

        async def events() -> AsyncIterator[dict[str, str]]:
            try:
                yield chunk(completion_id, model_id, {"role": "assistant", "content": ""})
                while True:
                    kind, value = await queue.get()
                    if kind == "piece":
                        channel, text = value
                        yield chunk(completion_id, model_id, {OPENAI_DELTA_KEYS[channel]: text})
                    elif kind == "done":
                        yield chunk(completion_id, model_id, {}, value.finish_reason)
                        if req.include_usage:
                            usage = value.openai_usage()
                            payload = {"id": completion_id, "object": "chat.completion.chunk",
                                       "created": int(time.time()),
                                       "model": model_id, "choices": [],
                                       "usage": usage}
                            yield {"data": json.dumps(payload)}
                        break
                    else:
                        error = {"error": {"message": internal_error_message(rid), "type": "server_error"}}
                        yield {"data": json.dumps(error)}
                        break
                yield {"data": "[DONE]"}
            finally:
                cancelled.set()

        return EventSourceResponse(events())

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        body = parse_json(await read_body(request, limits.http), limits.http)
        req = parse_request(body, limits)
        if req.stream:
            return await stream_completion(req, f"chatcmpl-{uuid.uuid4().hex}", request_id(request))
        result, model_id = await run_in_threadpool(complete, req)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model_id,
            "choices": [{"index": 0, "message": result.openai_message(), "logprobs": None,
                         "finish_reason": result.finish_reason}],
            "usage": result.openai_usage(),
            "timings": result.timings,
        }

    return app


def serve(model: ChatModel, *, host: str = "127.0.0.1", port: int = 8080, api_key: str | None = None,
          allow_local_files: bool = False, limits: ServerLimits | None = None,
          allowed_roots: Sequence[Path] = (), insecure_no_auth: bool = False) -> None:
    """Serve ``model`` with uvicorn until interrupted (``runtime.http_limits``: binding rules, header timeout)."""
    import uvicorn

    from medgemma_gguf.runtime.http_limits import log_config, protocol_class

    check_binding(host, api_key, insecure_no_auth=insecure_no_auth)
    limits = limits or ServerLimits()
    app = create_app(model, api_key=api_key, allow_local_files=allow_local_files, limits=limits,
                     allowed_roots=allowed_roots)
    uvicorn.run(app, host=host, port=port, log_level="info", log_config=log_config(),
                http=protocol_class(limits.header_timeout_s))
