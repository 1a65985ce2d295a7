"""The OpenAI request fields this server honours, accepts or refuses, and the shapes of its replies.

Policy: every field a client may send is honoured, or accepted because it asks nothing of the model, or
refused with 400 naming it — never silently ignored. ``CHAT_FIELDS`` / ``COMPLETION_FIELDS`` list them;
a field in neither is refused as unknown.

* input: ``messages`` (chat); ``prompt`` (completions: raw text — the chat template is not applied — or
  a list of token ids);
* ``model``: chooses the LoRA adapters (``runtime.lora``); the reply names it;
* ``stream``, ``stream_options.include_usage``: server-sent events; a last chunk with the usage;
* ``max_completion_tokens`` / ``max_tokens``: the reply's token limit (the first wins; each at most the
  server's limit);
* sampling, through llama.cpp's sampler chain (``runtime.sampling``): ``temperature``, ``top_p``,
  ``top_k``, ``min_p``, ``presence_penalty``, ``frequency_penalty``, ``repetition_penalty`` (=
  llama-server's ``repeat_penalty``), ``repeat_last_n``, ``logit_bias``, ``seed``, ``stop``;
* structured output (``runtime.structured``): ``response_format``, llama-server's ``grammar`` and
  ``json_schema``;
* ``logprobs`` + ``top_logprobs`` (chat: a bool and 0..20; completions: ``logprobs`` 0..5):
  log-probabilities from the logits before sampling;
* ``reasoning_effort``: anything but "none" asks MedGemma to think first;
* ``ignore_eos`` (llama-server's): keep generating past end-of-turn tokens;
* ``n``: 1 only (one reply per request; several requests run in parallel slots);
* accepted and not used: ``user``, ``safety_identifier`` (they identify the end user to OpenAI);
* accepted when they ask for what the server does anyway: ``store`` false, ``modalities`` ["text"],
  ``service_tier`` "auto"/"default", ``echo`` false, ``best_of`` 1, ``suffix`` "";
* refused: ``tools``, ``tool_choice``, ``parallel_tool_calls``, ``functions``, ``function_call`` (MedGemma is
  not trained for tool calls), and every other field (``audio``, ``prediction``, ``web_search_options``,
  ``metadata``, llama-server's other sampler fields, ...).

Messages: ``role`` and ``content`` (``name`` and tool fields are refused); an assistant message may carry back
the ``reasoning_content`` this server returned — accepted and left out of the prompt; content items have the
fields ``runtime.prompt.CONTENT_ITEM_FIELDS`` lists (``image_url.detail`` "auto" or "high": the model sees every
image at its one resolution), ``response_format`` those of ``runtime.structured.RESPONSE_FORMAT_FIELDS``; any
other nested field is refused with its path (``messages[0].content[1].cache_control``). ``stream_options``
needs ``stream``: true, as in OpenAI's API. ``null`` counts as absent everywhere, as in llama-server.

Reply shapes follow openai-python's types: ``chat.completion`` / ``chat.completion.chunk`` /
``text_completion``; logprobs as ``{"content": [{token, logprob, bytes, top_logprobs}]}`` (chat) and
``{tokens, token_logprobs, top_logprobs, text_offset}`` (completions). The reasoning block comes as the
message's ``reasoning_content`` and as ``reasoning_content`` stream deltas, as llama-server sends it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from medgemma_gguf.errors import UserError, unknown_fields
from medgemma_gguf.runtime.batching import MAX_TOP_LOGPROBS, TokenLogprob
from medgemma_gguf.runtime.http_limits import ApiError
from medgemma_gguf.runtime.prompt import content_item_problem
from medgemma_gguf.runtime.sampling import SamplingSettings, settings_from_request, think_from_request
from medgemma_gguf.runtime.studies import requested_images

MAX_COMPLETION_LOGPROBS = 5  # OpenAI's legacy completions limit

TOOLS_REFUSAL = ("MedGemma is not trained for tool calls (function calling); send the request without it and "
                 "ask for structured output with 'response_format' instead")

SAMPLING = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
            "repeat_penalty", "repeat_last_n", "logit_bias", "seed", "stop", "response_format", "grammar",
            "json_schema", "max_tokens")
COMMON = ("model", "stream", "stream_options", "n", "user", "safety_identifier", "ignore_eos", *SAMPLING)
CHAT_FIELDS = frozenset((*COMMON, "messages", "max_completion_tokens", "logprobs", "top_logprobs",
                         "reasoning_effort", "store", "modalities", "service_tier", *(
                             "tools", "tool_choice", "parallel_tool_calls", "functions", "function_call")))
COMPLETION_FIELDS = frozenset((*COMMON, "prompt", "logprobs", "echo", "best_of", "suffix"))
TOOL_FIELDS = ("tools", "tool_choice", "parallel_tool_calls", "functions", "function_call")
MESSAGE_FIELDS = frozenset(("role", "content"))
# an assistant turn as this server returns it: its reasoning is accepted back and left out of the prompt (the model
# is not shown its earlier thoughts, as llama-server does for templates that do not render them)
ASSISTANT_MESSAGE_FIELDS = MESSAGE_FIELDS | {"reasoning_content"}


def RequestError(message: str, status: int = 400) -> ApiError:  # noqa: N802 - reads as the exception it makes
    """A request refused with ``status`` (400 unless said) and one line naming the field."""
    return ApiError(status, message)


@dataclass(frozen=True)
class ParsedRequest:
    """The fields of a chat or completions request this server uses, validated."""

    stream: bool
    include_usage: bool
    sampling: SamplingSettings
    model: str | None
    top_logprobs: int | None  # None: no logprobs
    ignore_eos: bool
    messages: list[Any] | None = None  # chat
    think: bool = False  # chat
    prompt: str | list[int] | None = None  # completions


def _present(body: Mapping[str, Any], name: str) -> bool:
    return body.get(name) is not None


def _refuse_unknown(body: Mapping[str, Any], known: frozenset[str], endpoint: str) -> None:
    for name in TOOL_FIELDS:
        if _present(body, name):
            raise RequestError(f"'{name}' is not supported: {TOOLS_REFUSAL}")
    unknown = unknown_fields(body, known)
    if unknown:
        raise RequestError(f"'{unknown[0]}' is not a field this server honours for {endpoint}; remove it (the "
                           "README's server section lists the fields)")
    trivial = {"store": (False,), "modalities": (["text"],), "service_tier": ("auto", "default"),
               "echo": (False,), "best_of": (1,), "suffix": ("",)}
    for name, allowed in trivial.items():
        if name in known and _present(body, name) and not any(
                body[name] == value and type(body[name]) is type(value) for value in allowed):
            reasons = {"store": "the server stores no completions", "modalities": "MedGemma replies in text only",
                       "service_tier": "a local server has one tier", "echo": "the prompt is not echoed back",
                       "best_of": "one completion per request", "suffix": "MedGemma does not fill in the middle"}
            shown = ", ".join(repr(v) for v in allowed)
            raise RequestError(f"'{name}' must be {shown} or absent: {reasons[name]}")


def _flag(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(f"'{name}' must be true or false")
    return value


def _stream_options(body: Mapping[str, Any]) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, Mapping):
        raise RequestError("'stream_options' must be an object like {\"include_usage\": true}")
    for key, value in options.items():
        if key not in ("include_usage", "include_obfuscation"):
            raise RequestError(f"'stream_options.{key}' is not supported; only 'include_usage' is")
        if value is not None and not isinstance(value, bool):
            raise RequestError(f"'stream_options.{key}' must be true or false")
    if options.get("include_obfuscation"):
        raise RequestError("'stream_options.include_obfuscation' is not supported: the server pads no stream "
                           "chunks; set it to false or leave it out")
    if not _flag(body, "stream"):  # as OpenAI: the options shape a stream
        raise RequestError("'stream_options' is only allowed with 'stream': true; remove it or stream the reply")
    return bool(options.get("include_usage"))


def _n(body: Mapping[str, Any]) -> None:
    value = body.get("n")
    if value is not None and (type(value) is not int or value != 1):
        raise RequestError("'n' must be 1: one reply per request (send several requests: they run in parallel "
                           "slots)")


def _sampling(body: Mapping[str, Any], max_tokens_limit: int) -> SamplingSettings:
    if _present(body, "repetition_penalty") and _present(body, "repeat_penalty"):
        raise RequestError("pass either 'repetition_penalty' or 'repeat_penalty', not both")
    fields = dict(body)
    if _present(body, "repetition_penalty"):
        fields["repeat_penalty"] = body["repetition_penalty"]
    try:
        sampling = settings_from_request(fields, default_max_tokens=max_tokens_limit)
    except UserError as exc:
        raise RequestError(exc.for_http(), exc.http_status) from exc
    for name in ("max_completion_tokens", "max_tokens"):  # each one given, whichever wins
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > max_tokens_limit:
            raise RequestError(f"'{name}' {value} is above this server's limit of {max_tokens_limit}")
    return sampling


def _model(body: Mapping[str, Any]) -> str | None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError("'model' must be a string (GET /v1/models lists them)")
    return model


def _count_images(messages: Any) -> int:
    return sum(requested_images(item) for m in messages if isinstance(m, Mapping) and isinstance(m.get("content"), list)
               for item in m["content"] if isinstance(item, Mapping))


def parse_chat_request(body: Any, *, max_tokens_limit: int, max_images: int) -> ParsedRequest:
    """Validate a chat completions body (module docstring); ``RequestError`` naming the first problem."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    _refuse_unknown(body, CHAT_FIELDS, "chat completions")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty array of {role, content} objects")
    for index, message in enumerate(messages):
        if isinstance(message, Mapping):
            if message.get("role") == "tool" or _present(message, "tool_calls") or _present(message, "tool_call_id"):
                raise RequestError(f"'messages[{index}]' is a tool message or call: {TOOLS_REFUSAL}")
            known = ASSISTANT_MESSAGE_FIELDS if message.get("role") == "assistant" else MESSAGE_FIELDS
            extra = unknown_fields(message, known)
            if extra:
                raise RequestError(f"'messages[{index}].{extra[0]}' is not supported: a message has 'role' and "
                                   "'content' only (Gemma's chat template has no names)")
            if not isinstance(message.get("reasoning_content") or "", str):
                raise RequestError(f"'messages[{index}].reasoning_content' must be a string")
            content = message.get("content")
            for number, item in enumerate(content if isinstance(content, list) else ()):
                problem = content_item_problem(item) if isinstance(item, Mapping) else None
                if problem is not None:
                    raise RequestError(f"'messages[{index}].content[{number}].{problem[0]}' {problem[1]}")
    n_images = _count_images(messages)
    if n_images > max_images:
        raise RequestError(f"the request has {n_images} images (a volume counts its 'slices', a slide its "
                           f"'patches'); this server accepts at most {max_images}")
    _n(body)
    logprobs = _flag(body, "logprobs")
    top = body.get("top_logprobs")
    if top is not None:
        if type(top) is not int or not 0 <= top <= MAX_TOP_LOGPROBS:
            raise RequestError(f"'top_logprobs' must be a whole number from 0 to {MAX_TOP_LOGPROBS}")
        if not logprobs:
            raise RequestError("'top_logprobs' needs 'logprobs': true")
    try:
        think = think_from_request(body)
    except UserError as exc:
        raise RequestError(exc.for_http(), exc.http_status) from exc
    return ParsedRequest(stream=_flag(body, "stream"), include_usage=_stream_options(body),
                         sampling=_sampling(body, max_tokens_limit), model=_model(body),
                         top_logprobs=(top or 0) if logprobs else None, ignore_eos=_flag(body, "ignore_eos"),
                         messages=messages, think=think)


def parse_completion_request(body: Any, *, max_tokens_limit: int) -> ParsedRequest:
    """Validate a legacy completions body: ``prompt`` is raw text (the chat template is not applied) or a
    list of token ids; ``logprobs`` is 0..5 alternatives."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    _refuse_unknown(body, COMPLETION_FIELDS, "completions")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list):
        if not prompt or not all(type(t) is int and t >= 0 for t in prompt):
            raise RequestError("'prompt' must be a string or one list of token ids (one prompt per request)")
    elif not isinstance(prompt, str) or not prompt:
        raise RequestError("'prompt' must be a non-empty string (raw text: the chat template is not applied), or a "
                           "list of token ids")
    _n(body)
    logprobs = body.get("logprobs")
    if logprobs is not None and (type(logprobs) is not int or not 0 <= logprobs <= MAX_COMPLETION_LOGPROBS):
        raise RequestError(f"'logprobs' must be a whole number from 0 to {MAX_COMPLETION_LOGPROBS} (alternatives per "
                           "token)")
    return ParsedRequest(stream=_flag(body, "stream"), include_usage=_stream_options(body),
                         sampling=_sampling(body, max_tokens_limit), model=_model(body), top_logprobs=logprobs,
                         ignore_eos=_flag(body, "ignore_eos"), prompt=prompt)


# --- replies --------------------------------------------------------------------------------------------

MISSING_LOGPROB = -9999.0  # OpenAI's value for a probability too small to represent


def _logprob_value(value: float) -> float:
    return value if value > MISSING_LOGPROB else MISSING_LOGPROB


def _text(piece: bytes) -> str:
    return piece.decode("utf-8", errors="replace")


def chat_logprob(entry: TokenLogprob) -> dict[str, Any]:
    """One token's entry in a chat reply's ``logprobs.content``."""
    return {"token": _text(entry.piece), "logprob": _logprob_value(entry.logprob), "bytes": list(entry.piece),
            "top_logprobs": [{"token": _text(piece), "logprob": _logprob_value(value), "bytes": list(piece)}
                             for _, piece, value in entry.top]}


def completion_logprobs(entries: Sequence[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """Legacy completions' ``logprobs`` for ``entries``; ``offset``: the text offset of the first one."""
    tokens, values, tops, offsets = [], [], [], []
    for entry in entries:
        text = _text(entry.piece)
        tokens.append(text)
        values.append(_logprob_value(entry.logprob))
        tops.append({_text(piece): _logprob_value(value) for _, piece, value in entry.top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def now() -> int:
    return int(time.time())
