"""Load MedGemma GGUF files and chat with them: ``load(...) -> ChatModel``, ``ChatModel.chat(messages)``.

Decoding. The prompt is built by ``runtime.prompt`` (token-for-token what the HF processor builds) and
evaluated with ``runtime.engine.Engine``; each new token is chosen by llama.cpp's sampler chain, built per
request from validated settings (``runtime.sampling``: greedy by default, the model's top-k/top-p when a
temperature is set).

Generation stops at an end-of-generation token (``<end_of_turn>``, ``<eos>``: llama.cpp's EOG set; not
part of the text) or a stop string (``finish_reason`` "stop"), after ``max_tokens`` tokens, or when the
context is full ("length"). The text comes from ``runtime.reply``: decoded incrementally from the tokens'
UTF-8 bytes, so a character split over several byte tokens comes out whole, and cut before a stop string
even when it spans tokens; a stream holds back only what could still become a stop string.

Context. A prompt that does not fit in the context (with room for one generated token) raises a
``UserError`` before anything is evaluated. Multi-turn: every call passes the whole conversation; the
KV cache keeps what was evaluated last (prompt and generated tokens), and the new prompt re-uses its
longest common prefix — images compared by pixel hash — so only the new turn is evaluated. With the small
sliding-window cache (the default) a prefix is re-used only while the window behind it is still cached
(``runtime.kv_reuse``: appending a turn always is); otherwise, and when the cache cannot be trimmed, it is
cleared and the prompt evaluated from the start — the reply is then the one a fresh context gives.

Seeds. The prompt's last token is always decoded in a batch of its own, so the same request gives the same
logits, and with the same seed the same reply, whether its prefix was re-used or evaluated afresh (the
limits are in ``runtime.sampling``). Not covered either: a prefix cached by another conversation (its
tokens were decoded in other batch shapes).

``ChatModel`` is not thread-safe on its own: one conversation at a time; starting a new ``chat`` ends any
unfinished stream of the previous one. While a server runs on it (``runtime.batching``, ``load(n_parallel=N)``)
the server owns the context, and ``chat``/``generate`` from any thread run as requests in its slots.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medgemma_gguf.errors import InputError, NotFoundError, ResourceError, UserError, setting
from medgemma_gguf.gguf_info import check_model_pair, read_gguf_info
from medgemma_gguf.integrity import check_file_against_folder
from medgemma_gguf.manifest import Manifest
from medgemma_gguf.pull import is_hub_spec, pull
from medgemma_gguf.runtime.context_settings import DEFAULT_N_UBATCH, MAX_PARALLEL, ContextSettings
from medgemma_gguf.runtime.engine import Engine, ImagePart
from medgemma_gguf.runtime.images import DEFAULT_MAX_PIXELS
from medgemma_gguf.runtime.lora import LoraFile, LoraSpec, ModelIds, check_lora_files, parse_lora_specs
from medgemma_gguf.runtime.offload import (
    OffloadPlan,
    SplitPlan,
    gpu_offload_supported,
    largest_context,
    plan_offload,
    query_free_vram,
    read_text_model,
    read_vision_model,
)
from medgemma_gguf.runtime.prompt import ImageOptions, Prompt, PromptImage, build_prompt, resolve_system
from medgemma_gguf.runtime.quant_choice import available_memory_bytes, choose_quant
from medgemma_gguf.runtime.reply import CONTENT, Delta, ReasoningMarkers, ReplyText
from medgemma_gguf.runtime.sampling import Sampler, SamplingSettings, model_sampling, sampling_settings
from medgemma_gguf.sizes import format_size, parse_size

log = logging.getLogger(__name__)

CONTEXT_STEP = 256  # llama.cpp pads contexts to a multiple of 256 cells


def context_overflow_message(prompt: Prompt, n_ctx: int) -> str:
    """Why ``prompt`` does not fit in ``n_ctx`` positions (one kept for a generated token), and how many images do."""
    text = prompt.n_positions - prompt.n_images * prompt.image_tokens
    head = (f"the conversation needs {prompt.n_positions} positions ({text} of text"
            + (f" and {prompt.n_images} images of {prompt.image_tokens}" if prompt.n_images else "")
            + f") and the context holds {n_ctx}")
    if not prompt.n_images:
        return f"{head}; raise {setting('n_ctx')} or start a new conversation"
    fit = max(0, (n_ctx - 1 - text) // prompt.image_tokens)
    return (f"{head}: with this text {fit} of the {prompt.n_images} images fit; send at most {fit} images (a volume: "
            f"{setting('volume_slices')} {fit}) or raise {setting('n_ctx')} to at least {prompt.n_positions + 1}")


# --- results ------------------------------------------------------------------------------------------


@dataclass
class ChatResult:
    """A finished reply. ``prompt_tokens`` counts image positions too; ``timings`` are in ms and tokens/s."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    timings: dict[str, float] = field(default_factory=dict)
    finish_reason: str = "stop"
    token_ids: list[int] = field(default_factory=list)
    reasoning: str = ""  # the reasoning block's text ("" when the model wrote none): never part of ``text``
    reasoning_tokens: int = 0  # tokens of the reasoning block, markers included (counted in completion_tokens)

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text, "reasoning": self.reasoning, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "reasoning_tokens": self.reasoning_tokens,
                "finish_reason": self.finish_reason, "timings": self.timings}

    def openai_message(self) -> dict[str, Any]:
        """The reply as an OpenAI chat message; the reasoning as ``reasoning_content`` (llama-server's key)."""
        message: dict[str, Any] = {"role": "assistant", "content": self.text}
        if self.reasoning:
            message["reasoning_content"] = self.reasoning
        return message

    def openai_usage(self) -> dict[str, Any]:
        """OpenAI's ``usage`` object for this reply."""
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "completion_tokens_details": {"reasoning_tokens": self.reasoning_tokens}}


class ChatStream(Iterator[str]):
    """The text pieces of a reply as they are generated; ``result`` is set once the stream is exhausted.

    Iterating gives the reply's text; ``deltas()`` gives every piece as ``(channel, text)`` (the
    channels of ``runtime.reply``). Use one or the other.
    """

    def __init__(self, deltas: Generator[Delta, None, Any]):
        self._deltas = deltas
        self.result: ChatResult | None = None

    def __iter__(self) -> ChatStream:
        return self

    def __next__(self) -> str:
        while True:
            channel, text = self._next_delta()
            if channel == CONTENT:
                return text

    def _next_delta(self) -> Delta:
        try:
            return next(self._deltas)
        except StopIteration as stop:
            self.result = stop.value
            raise

    def deltas(self) -> Iterator[Delta]:
        """Every piece as it comes, with its channel."""
        while True:
            try:
                yield self._next_delta()
            except StopIteration:
                return

    def close(self) -> None:
        """Stop generating (the tokens generated so far stay in the KV cache)."""
        self._deltas.close()

    def collect(self) -> ChatResult:
        """Run to the end and return the result."""
        for _ in self.deltas():
            pass
        assert self.result is not None
        return self.result


# --- the model ----------------------------------------------------------------------------------------


class ChatModel:
    """A loaded MedGemma text model (+ mmproj) ready to chat. Build it with ``load``."""

    def __init__(self, engine: Engine, *, name: str, plan: OffloadPlan | SplitPlan | None = None,
                 allow_local_files: bool = True, max_image_pixels: int = DEFAULT_MAX_PIXELS,
                 window: tuple[float, float] | None = None, adapters: Sequence[LoraFile] = (), mmproj_note: str = "",
                 choice_note: str = ""):
        self.engine = engine
        self.name = name
        self.plan = plan
        self.mmproj_note = mmproj_note  # which mmproj was found beside the model and why (or why none)
        self.choice_note = choice_note  # why this quant of a folder was taken
        self.adapters = list(adapters)
        self._lora_handles = {a.name: engine.load_lora(a.path) for a in self.adapters}
        self.model_ids = ModelIds(name, self.adapters)
        self.active_adapters: tuple[str, ...] = ()
        info = read_gguf_info(engine.model_path)
        template = info.metadata.get("tokenizer.chat_template")
        if not isinstance(template, str) or not template:
            raise UserError(f"{engine.model_path} has no tokenizer.chat_template; re-convert it with medgemma-gguf")
        self.template: str = template
        self.sampling_defaults = model_sampling(info.metadata)
        self.reasoning_markers = ReasoningMarkers.from_engine(engine)
        self.bos_text = engine.token_piece(engine.bos_token, special=True).decode("utf-8")
        self.image_size: int | None = None
        self.image_tokens = 0
        if engine.has_vision and engine.mmproj_path is not None:
            self.image_size = int(read_gguf_info(engine.mmproj_path).metadata["clip.vision.image_size"])
            blank = np.zeros((self.image_size, self.image_size, 3), dtype=np.uint8)
            self.image_tokens = engine.image_token_count(ImagePart(blank))
        self.allow_local_files = allow_local_files
        self.max_image_pixels = max_image_pixels
        self.window = window
        self.context_settings = engine.settings  # the context as planned (created now, or by allocate_context)
        self._kv_units: list[int | tuple[str, str, int]] = []
        self._generation = 0
        self._closed = False
        self.served_by: Any = None  # a runtime.batching.Batcher that owns the context while serving
        self.use_adapters(self.model_ids.default)

    # properties ------------------------------------------------------------------------------------
    @property
    def model_path(self) -> Path:
        return self.engine.model_path

    @property
    def mmproj_path(self) -> Path | None:
        return self.engine.mmproj_path

    @property
    def has_vision(self) -> bool:
        return self.engine.has_vision

    @property
    def n_ctx(self) -> int:
        return self.engine.n_ctx

    def no_vision_error(self) -> InputError:
        """The error for images sent to a model loaded without an mmproj, with why none was found."""
        why = f" ({self.mmproj_note})" if self.mmproj_note else ""
        return InputError(f"this model was loaded without an mmproj{why}; pass one with {setting('mmproj')} to send "
                          "images")

    def allocate_context(self, n_positions: int | None = None) -> None:
        """Create the context now, if ``load(lazy_context=True)`` left it for later: with ``n_positions``, the
        smallest that holds them (a multiple of 256, within the planned size), else the planned size. A reply
        creates it at the planned size when this was not called."""
        self._check_open()
        if self.engine.has_context:
            return
        settings = self.context_settings
        if n_positions is not None:
            needed = -(-max(1, n_positions) // CONTEXT_STEP) * CONTEXT_STEP
            if needed > settings.n_ctx:
                raise ResourceError(f"the conversation needs {n_positions} positions but at most {settings.n_ctx} fit "
                                    f"in memory ({setting('n_ctx')} auto); shorten it, lower the reply's "
                                    f"{setting('max_tokens')}, or use a quantized KV cache ({setting('kv_type')} q8_0)")
            settings = settings.with_(n_ctx=needed)
        self.engine.create_context(settings)
        self._apply_adapters()
        log.info("context created: %s", settings.describe())

    def image_options(self, *, window: tuple[float, float] | None = None, max_pixels: int | None = None,
                      allow_local_files: bool | None = None, allowed_roots: tuple[Path, ...] = (),
                      max_images: int | None = None, max_file_bytes: int | None = None) -> ImageOptions | None:
        """How this model loads images (None without an mmproj)."""
        if self.image_size is None:
            return None
        if allow_local_files is None:
            allow_local_files = self.allow_local_files
        return ImageOptions(self.image_size, window=window if window is not None else self.window,
                            max_pixels=max_pixels or self.max_image_pixels, allow_local_files=allow_local_files,
                            allowed_roots=tuple(allowed_roots), max_images=max_images, n_ctx=self.n_ctx,
                            image_tokens=self.image_tokens,
                            **({} if max_file_bytes is None else {"max_file_bytes": max_file_bytes}))

    # prompts ---------------------------------------------------------------------------------------
    def prompt(self, messages: Sequence[Mapping[str, Any]], *, system: str | None = None, preset: str | None = None,
               images: ImageOptions | None = None, think: bool = False) -> Prompt:
        """The exact prompt (token runs and images) for ``messages``; see ``runtime.prompt``."""
        self._check_open()
        if self.image_size is None and images is None and _has_images(messages):
            raise self.no_vision_error()
        return build_prompt(messages, template=self.template, tokenize=self.engine.tokenize, bos_token=self.bos_text,
                            bos_id=self.engine.bos_token, image_tokens=self.image_tokens,
                            images=images if images is not None else self.image_options(),
                            system=resolve_system(system, preset), think=think)

    def _check_open(self) -> None:
        if self._closed:
            raise UserError("this model was closed; load it again")

    def _check_not_served(self) -> None:
        if self.served_by is not None:
            raise UserError("this model is being served (runtime.server owns its context until the server stops); "
                            "send the request to the server, or load the model a second time")

    def check_fits(self, prompt: Prompt) -> None:
        """UserError when the model was closed or the prompt leaves no room in the context for a generated token."""
        self._check_open()
        if prompt.n_positions + 1 > self.n_ctx:
            raise ResourceError(context_overflow_message(prompt, self.n_ctx))

    # chat ------------------------------------------------------------------------------------------
    def chat(self, messages: Sequence[Mapping[str, Any]], *, stream: bool = False, system: str | None = None,
             preset: str | None = None, think: bool = False, max_tokens: int = 256, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
             repeat_penalty: float | None = None, repeat_last_n: int | None = None,
             presence_penalty: float | None = None,
             frequency_penalty: float | None = None, seed: int | None = None,
             logit_bias: Mapping[int, float] | None = None, stop: str | Sequence[str] | None = None,
             json_schema: Mapping[str, Any] | None = None, grammar: str | None = None) -> ChatResult | ChatStream:
        """Reply to ``messages`` (HF/OpenAI shape; images as ``{"type": "image", "path"|"image"|"url": ...}``).

        Returns a ``ChatResult``, or with ``stream=True`` a ``ChatStream`` of text pieces. The sampling
        settings (ranges and defaults: ``runtime.sampling``) default to greedy decoding; ``None`` means the
        model's value when ``temperature`` > 0. ``json_schema`` (a JSON Schema dict) or ``grammar`` (GBNF
        text) constrain the reply (``runtime.structured``). ``think``: start the system prompt with
        ``runtime.prompt.THINK_SYSTEM_PREFIX`` so MedGemma 27B reasons first; whatever reasoning block the
        model writes comes back apart, in ``ChatResult.reasoning`` (and ``ChatStream.deltas()``), never in
        the text. Bad messages, images, settings, schemas and grammars, and prompts too long for the
        context, raise ``UserError`` before evaluation.
        """
        settings = sampling_settings(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                     min_p=min_p, repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n,
                                     presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                                     seed=seed, logit_bias=logit_bias, stop=stop, json_schema=json_schema,
                                     grammar=grammar)
        prompt = self.prompt(messages, system=system, preset=preset, think=think)
        replies = self.generate(prompt, settings)
        return replies if stream else replies.collect()

    def generate(self, prompt: Prompt, settings: SamplingSettings | None = None, *, ignore_eos: bool = False,
                 should_stop: Callable[[], bool] | None = None, **fields: Any) -> ChatStream:
        """Evaluate ``prompt`` now (re-using the cached prefix) and return the stream of the reply.

        ``settings`` from ``runtime.sampling.sampling_settings``, or its arguments as keywords
        (``max_tokens=32, temperature=1``). ``ignore_eos``: do not stop at end-of-generation tokens
        (benchmarks, tests); they are then generated and fed back like any token (their text is empty).
        ``should_stop``: polled before each token is decoded; True ends the reply with ``finish_reason``
        "cancelled" (a client went away).
        """
        if settings is None:
            settings = sampling_settings(**fields)
        elif fields:
            raise TypeError("pass either settings or sampling keywords, not both")
        self.check_fits(prompt)
        self.allocate_context()
        sampler = self.engine.new_sampler(settings.resolve(self.sampling_defaults), reasoning=self.reasoning_markers)
        if self.served_by is not None:  # the server's batcher owns the context: the reply runs in one of its slots
            return ChatStream(self.served_by.generate(prompt, settings, sampler, adapters=self.active_adapters,
                                                      ignore_eos=ignore_eos, should_stop=should_stop))
        try:
            self._generation += 1
            started = time.perf_counter()
            _, reused = self._evaluate_prompt(prompt, logits="context")
        except BaseException:
            sampler.close()
            raise
        prompt_seconds = time.perf_counter() - started
        timings = {"prompt_ms": prompt_seconds * 1e3, "prompt_positions_evaluated": prompt.n_positions - reused,
                   "prompt_positions_reused": reused}
        reply = ReplyText(self.engine.piece, stop=settings.stop, markers=self.reasoning_markers)
        return ChatStream(self._decode(sampler, reply, prompt, settings.max_tokens, timings, started, ignore_eos,
                                       should_stop, self._generation))

    def next_token_logits(self, prompt: Prompt) -> np.ndarray:
        """The logits after ``prompt`` (float32 [n_vocab]), evaluated as ``generate`` evaluates it."""
        self._check_not_served()
        self.check_fits(prompt)
        self.allocate_context()
        self._generation += 1
        return self._evaluate_prompt(prompt, logits="last")[0][-1]

    def use_adapters(self, names: Sequence[str]) -> None:
        """Run the next replies with exactly these loaded LoRA adapters (each at its scale; ``()`` = the base).

        A change clears the cached conversation: its keys and values were computed with the previous set.
        """
        self._check_open()
        names = tuple(names)
        if names == self.active_adapters:
            return
        unknown = [n for n in names if n not in self._lora_handles]
        if unknown:
            raise UserError(f"LoRA adapter {unknown[0]!r} is not loaded; loaded: "
                            f"{', '.join(self._lora_handles) or 'none'} (add it with {setting('lora')})")
        if self.served_by is not None:  # the server applies each request's set to its own batches
            self.active_adapters = names
            return
        self.active_adapters = names
        self._apply_adapters()
        self.reset()

    def adapter_set(self, names: Sequence[str]) -> list[tuple[Any, float]]:
        """The loaded adapters ``names`` as (llama.cpp handle, scale) pairs, for ``Engine.set_loras``."""
        scales = {a.name: a.scale for a in self.adapters}
        return [(self._lora_handles[n], scales[n]) for n in names]

    def serve_with(self, owner: object | None) -> None:
        """Hand the context to ``owner`` (a ``runtime.batching.Batcher``), or take it back with None. While it is
        served, the model's own ``chat``/``generate`` run in one of the server's slots (``next_token_logits``
        refuses); afterwards they start from a cleared cache."""
        if owner is not None and self.served_by is not None and self.served_by is not owner:
            raise UserError("this model is already being served; stop that server first, or load the model again")
        if owner is not None:
            self.allocate_context()
        self.served_by = owner
        if owner is None and not self._closed:
            self.engine.set_loras(self.adapter_set(self.active_adapters))  # the server switched sets per batch
            self.reset()

    def _apply_adapters(self) -> None:
        if self.engine.has_context:
            self.engine.set_loras(self.adapter_set(self.active_adapters))

    def reset(self) -> None:
        """Forget the cached conversation (the next chat evaluates its whole prompt)."""
        self._generation += 1
        if not self._closed and self.served_by is None and self.engine.has_context:
            self.engine.reset()
        self._kv_units = []

    def close(self) -> None:
        """Free the model (a server still running on it is stopped first)."""
        if self.served_by is not None:
            self.served_by.close()
        self._generation += 1
        self._closed = True
        self.engine.close()

    def __enter__(self) -> ChatModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # internals -------------------------------------------------------------------------------------
    def _evaluate_prompt(self, prompt: Prompt, *, logits: str) -> tuple[np.ndarray, int]:
        """Evaluate the prompt's new part: ``Engine.eval_parts``'s logits ("last" or "context", where the
        sampler reads them), and how many positions were re-used from the cache."""
        units = prompt.units
        if not units or isinstance(units[-1], tuple):
            raise UserError("the prompt must end with text; the chat template produced none after the last image")
        common = 0
        for cached, new in zip(self._kv_units, units, strict=False):
            if cached != new:
                break
            common += 1
        common = min(common, len(units) - 1)  # the last token is evaluated again for its logits
        reused = sum(u[2] if isinstance(u, tuple) else 1 for u in units[:common])
        if reused != self.engine.n_past and not (reused < self.engine.n_past and self.engine.truncate(reused)):
            self.engine.reset()
            common = reused = 0
        self._kv_units = units[:common]
        parts: list[list[int] | ImagePart] = []
        position = 0
        for part in prompt.parts:
            size = 1 if isinstance(part, PromptImage) else len(part)
            if position + size > common:
                if isinstance(part, PromptImage):
                    parts.append(ImagePart(part.pixels))
                else:
                    parts.append(list(part[max(0, common - position):]))
            position += size
        # the last token gets a llama_decode of its own: its logits are then computed by the same batch shape
        # whether the prefix was re-used or evaluated now, so a seeded reply does not depend on the cache
        last = parts[-1]
        if isinstance(last, list) and len(last) > 1:
            parts[-1:] = [last[:-1], last[-1:]]
        try:
            rows = self.engine.eval_parts(parts, logits=logits)
        except BaseException:
            self.engine.reset()
            self._kv_units = []
            raise
        self._kv_units = list(units)
        return rows, reused

    def _decode(self, sampler: Sampler, reply: ReplyText, prompt: Prompt, max_tokens: int,
                timings: dict[str, float], started: float, ignore_eos: bool,
                should_stop: Callable[[], bool] | None, generation: int):
        engine = self.engine
        token_ids: list[int] = []
        n_tokens = 0
        finish = "length"
        decode_seconds = 0.0
        first_token_at = None
        step_started = time.perf_counter()
        try:
            while n_tokens < max_tokens:
                if generation != self._generation:
                    raise RuntimeError("this stream was ended by a newer chat on the same model (or the model was "
                                       "closed)")
                token = sampler.sample()
                if token < 0:  # the grammar allows no further token
                    log.warning("the reply's grammar allows no token after %d tokens; the reply ends here", n_tokens)
                    break
                if first_token_at is None:
                    first_token_at = time.perf_counter()
                if not ignore_eos and engine.is_end_of_generation(token):
                    finish = "stop"
                    break
                n_tokens += 1
                token_ids.append(token)
                shown = reply.push(token)
                decode_seconds += time.perf_counter() - step_started
                if shown:
                    yield from shown
                if generation != self._generation:
                    raise RuntimeError("this stream was ended by a newer chat on the same model (or the model was "
                                       "closed)")
                if reply.stopped:
                    finish = "stop"
                    break
                if n_tokens == max_tokens or engine.n_past + 1 > engine.n_ctx:
                    break
                if should_stop is not None and should_stop():
                    finish = "cancelled"
                    break
                step_started = time.perf_counter()
                engine.decode_next(token)
                self._kv_units.append(token)
        finally:
            sampler.close()
        yield from reply.finish()
        timings["time_to_first_token_ms"] = ((first_token_at or time.perf_counter()) - started) * 1e3
        timings["decode_ms"] = decode_seconds * 1e3
        timings["decode_tokens_per_s"] = (n_tokens - 1) / decode_seconds if n_tokens > 1 and decode_seconds else 0.0
        timings["total_ms"] = (time.perf_counter() - started) * 1e3
        return ChatResult(reply.text, prompt.n_positions, n_tokens, timings, finish, token_ids, reply.reasoning,
                          reply.reasoning_tokens)


def _has_images(messages: Sequence[Mapping[str, Any]]) -> bool:
    from medgemma_gguf.runtime.prompt import STUDY_ITEM_TYPES

    kinds = ("image", "image_url", *STUDY_ITEM_TYPES)
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
        return False  # not messages at all: normalize_messages says so
    for message in messages:
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, list | tuple) and any(isinstance(item, Mapping) and item.get("type") in kinds
                                                     for item in content):
            return True
    return False


# --- loading ------------------------------------------------------------------------------------------


def _gpu_layers(value: str | int) -> str | int:
    if value == "auto":
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UserError(f"n_gpu_layers must be 'auto' or a whole number >= 0, got {value!r}")
    return value


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == b"GGUF"


def mmproj_beside(model_path: Path) -> tuple[Path | None, str]:
    """The mmproj for a text GGUF given alone: from its folder's manifest, else the folder's mmproj GGUFs that
    fit the model (``Manifest.mmproj_for``: F16, BF16, F32, Q8_0); with a note saying which and why."""
    folder = model_path.parent
    try:
        choice = Manifest.for_folder(folder).mmproj_for(folder, model_path)
    except UserError as exc:
        return None, f"no mmproj found beside it: {exc}"
    return choice.path, (f"found beside it: {choice.note}" if choice.path else choice.note)


@dataclass(frozen=True)
class ModelFiles:
    """The text GGUF and mmproj ``load`` runs, the model's name, and why they were chosen."""

    model_path: Path
    mmproj_path: Path | None
    name: str
    choice_note: str = ""
    mmproj_note: str = ""


def resolve_model_files(model: str | Path, mmproj: str | Path | None, *, quant: str | None, n_ctx: int,
                        vram_bytes: int | None, settings: ContextSettings | None = None) -> ModelFiles:
    """The files ``load`` runs for ``model`` (a GGUF or a folder: ``choose_quant``) and ``mmproj`` (else the one
    beside the model), checked to belong together and be complete; nothing is loaded."""
    mmproj_note = choice_note = ""
    if is_hub_spec(str(model)):  # hf:REPO[:QUANT]: that quant and its mmproj, downloaded into the Hub cache
        pulled = pull(str(model), quant=quant)
        model, quant, choice_note = pulled.model, None, f"{pulled.repo}:{pulled.quant} (commit {pulled.revision[:12]})"
        if mmproj is None:
            mmproj, mmproj_note = pulled.mmproj, pulled.mmproj_note
    model = Path(model)
    name = model.stem
    if model.is_dir():
        choice = choose_quant(model, n_ctx=n_ctx, vram_bytes=vram_bytes, quant=quant, settings=settings)
        log.info("using %s (%s, %.2f bits per weight) from %s: %s", choice.path.name, choice.type, choice.bpw, model,
                 choice.why)
        manifest = Manifest.for_folder(model)
        name = choice.path.stem if manifest.discovered else (manifest.model or choice.path.stem)
        model_path = choice.path
        choice_note = choice.why
        if mmproj is None:
            mmproj = choice.mmproj
            mmproj_note = choice.mmproj_note
    else:
        if quant is not None:
            raise InputError(f"{setting('quant')} selects a file from a folder; pass the folder, or drop it")
        if not model.is_file():
            raise NotFoundError(f"model {model} not found; pass a .gguf file, a folder of GGUFs or hf:REPO:QUANT")
        model_path = model
        if mmproj is None and _is_gguf(model_path):
            mmproj, mmproj_note = mmproj_beside(model_path)
    mmproj_path = Path(mmproj) if mmproj is not None else None
    if mmproj_path is not None and not mmproj_path.is_file():
        raise NotFoundError(f"mmproj {mmproj_path} not found; check the path")
    for path in (model_path, mmproj_path):
        if path is not None:
            check_file_against_folder(path)  # the size its folder's manifest records (cheap; verify re-hashes)
        if path is not None and not _is_gguf(path):
            raise UserError(f"{path} is not a GGUF file; pass files made by medgemma-gguf convert")
    check_model_pair(model_path, mmproj_path)
    for path in (model_path, mmproj_path):
        if path is not None:
            read_gguf_info(path).check_complete()
    if mmproj_path is not None and mmproj_note:
        log.info("mmproj %s", mmproj_note)
    return ModelFiles(model_path, mmproj_path, name, choice_note, mmproj_note)


def load(model: str | Path, mmproj: str | Path | None = None, *, n_gpu_layers: str | int = "auto",
         n_ctx: int | str = 4096, vram: str | int | None = None, n_threads: int | None = None,
         quant: str | None = None, allow_local_files: bool = True, max_image_pixels: int = DEFAULT_MAX_PIXELS,
         window: tuple[float, float] | None = None, lora: Sequence[LoraSpec] | None = None, n_parallel: int = 1,
         devices: Sequence[int] | None = None, tensor_split: Sequence[float] | None = None,
         mmproj_gpu: bool | None = None, swa_full: bool = False, kv_type: str = "f16", kv_type_k: str | None = None,
         kv_type_v: str | None = None, flash_attn: str = "auto", n_ubatch: int | None = None,
         lazy_context: bool = False) -> ChatModel:
    """Load a MedGemma GGUF (or the best fitting quant of a folder) for chatting.

    ``model``: a text GGUF (the first part of a split model), a folder — an output folder of
    ``medgemma-gguf convert`` or any folder of GGUFs (Unsloth's, bartowski's, ggml-org's) — or
    ``"hf:REPO[:QUANT]"`` (that quant and its mmproj downloaded into the Hub cache first, ``medgemma_gguf.pull``;
    ``quant`` may name the quant instead). From a folder the default rule of ``runtime.quant_choice.choose_quant``
    picks the quant (GPU: the best that fits ``vram``; CPU: the best of at most 5.5 bits per weight that fits in
    RAM; ranked by a report's KL when the folder has one, else by bits per weight); ``quant="Q4_K_M"`` picks one
    by type or name. Without ``mmproj``, the mmproj is found beside the text model (the manifest's, else an mmproj GGUF
    of the folder that fits the model: F16 before BF16, F32, Q8_0), and ``ChatModel.mmproj_note`` says which.
    A mismatched mmproj (another model's width, or not a Gemma 3 projector) is refused here.
    ``n_gpu_layers="auto"`` plans with ``runtime.offload.plan_offload`` (logged at INFO and kept in
    ``ChatModel.plan``); without a GPU build everything runs on the CPU. ``vram``: bytes or "6GiB".
    ``window``: (center, width) for 16-bit / DICOM grayscale images. ``lora``: GGUF LoRA adapters
    (``medgemma-gguf convert-adapter``) applied to every reply, as paths (scale 1) or ``(path, scale)``
    pairs; each is checked against the model first (another base, or a vision-tower adapter, is refused:
    see ``runtime.lora``); ``ChatModel.use_adapters`` switches between them. ``n_parallel``: sequences in the
    context, each with ``n_ctx`` positions (the server's slots, ``runtime.batching``; memory is planned for
    ``n_parallel × n_ctx``); the model's own ``chat`` uses the first.

    ``devices``, ``tensor_split``: llama.cpp's device list and split for the offloaded layers (RPC workers'
    devices: ``runtime.rpc_model`` passes them, with a number of ``n_gpu_layers``); ``mmproj_gpu``: whether the
    vision encoder may use a GPU (default: when layers are offloaded).
    To split a model across machines, use ``medgemma_gguf.load(..., rpc=[...])`` (``runtime.rpc_model``).

    The context (``runtime.context_settings``; every combination llama.cpp would refuse is refused here,
    before anything is loaded): ``n_ctx`` positions, or ``"auto"`` — the largest that fits the GPU budget
    with every layer offloaded (else the available RAM), capped at the model's training context (with a
    folder, the quant is chosen for a 4096-token context first). ``swa_full``: keep every position in the
    sliding-window layers (default: only their window, ``runtime.kv_reuse``). ``kv_type``: the K and V cache
    type, f16, q8_0 or q4_0 (``kv_type_k`` / ``kv_type_v`` set one of them); a quantized V needs
    ``flash_attn`` auto or on. ``n_ubatch``: the micro-batch (default 512, at least an image's positions).
    ``lazy_context``: create the context at the first reply or ``ChatModel.allocate_context`` (so a one-shot
    prompt can size it).
    """
    vram_bytes = parse_size(vram, setting("vram")) if isinstance(vram, str) else vram
    settings = context_settings(n_ctx, n_parallel=n_parallel, swa_full=swa_full, kv_type=kv_type, kv_type_k=kv_type_k,
                                kv_type_v=kv_type_v, flash_attn=flash_attn, n_ubatch=n_ubatch)
    auto_ctx = n_ctx == "auto"
    n_gpu_layers = _gpu_layers(n_gpu_layers)
    files = resolve_model_files(model, mmproj, quant=quant, n_ctx=settings.n_ctx, vram_bytes=vram_bytes,
                                settings=settings)
    model_path, mmproj_path, name = files.model_path, files.mmproj_path, files.name
    mmproj_note, choice_note = files.mmproj_note, files.choice_note
    text_model = read_text_model(model_path)
    trained = text_model.context_length
    if trained and not auto_ctx and settings.n_ctx > trained:  # llama.cpp would allocate it, then degrade
        raise InputError(f"{setting('n_ctx')} {settings.n_ctx} is beyond the {trained}-token context "
                         f"{model_path.name} was trained for; pass at most {trained} (or auto)")
    settings.check_model((text_model.key_length,), (text_model.value_length,))
    adapters = check_lora_files(parse_lora_specs(lora), model_path)
    if mmproj_path is not None:
        image_tokens = read_vision_model(mmproj_path).n_image_tokens or 0
        if settings.n_ubatch < image_tokens:
            if n_ubatch is not None:
                raise InputError(f"an image takes {image_tokens} positions, more than the micro-batch {n_ubatch}; "
                                 f"use n_ubatch >= {image_tokens}")
            settings = settings.with_(n_ubatch=image_tokens)
    if auto_ctx:
        settings = settings.with_(n_ctx=_auto_context(model_path, mmproj_path, settings, n_gpu_layers, vram_bytes))
    plan = None
    if n_gpu_layers == "auto":
        plan = plan_offload(model_path, vram_bytes=vram_bytes, mmproj_path=mmproj_path, settings=settings)
        log.info("offload plan:\n%s", plan.describe())
        if plan.cpu_kv > (free := available_memory_bytes()):  # weights are mapped from the file; the cache is not
            raise ResourceError(f"the KV cache for {setting('n_ctx')} {settings.n_ctx} x {n_parallel} needs "
                                f"{format_size(plan.cpu_kv)} of memory and {format_size(free)} is available; "
                                f"lower {setting('n_ctx')}")
        gpu_layers = plan.n_gpu_layers
    else:
        gpu_layers = int(n_gpu_layers)
    engine = Engine(model_path, mmproj_path, n_gpu_layers=gpu_layers, n_threads=n_threads, devices=devices,
                    tensor_split=tensor_split, mmproj_gpu=mmproj_gpu, settings=settings,
                    create_context=not lazy_context)
    try:
        return ChatModel(engine, name=name, plan=plan, allow_local_files=allow_local_files,
                         max_image_pixels=max_image_pixels, window=window, adapters=adapters,
                         mmproj_note=mmproj_note, choice_note=choice_note)
    except BaseException:
        engine.close()
        raise


def context_settings(n_ctx: int | str, *, n_parallel: int = 1, swa_full: bool = False, kv_type: str = "f16",
                     kv_type_k: str | None = None, kv_type_v: str | None = None, flash_attn: str = "auto",
                     n_ubatch: int | None = None) -> ContextSettings:
    """``load``'s context arguments as ``ContextSettings`` (checked; ``n_ctx="auto"`` gives 4096 until
    ``load`` knows the files), with one logits row per sequence and decode — the prompt's last token, one
    token per slot, as llama-server sets it."""
    auto_ctx = n_ctx == "auto"
    if not auto_ctx and (isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 16):
        raise InputError(f"{setting('n_ctx')} must be 'auto' or a whole number of tokens >= 16, got {n_ctx!r}")
    if isinstance(n_parallel, bool) or not isinstance(n_parallel, int) or not 1 <= n_parallel <= MAX_PARALLEL:
        raise InputError(f"{setting('parallel')} must be a whole number from 1 to {MAX_PARALLEL}, got {n_parallel!r}")
    return ContextSettings(n_ctx=4096 if auto_ctx else int(n_ctx), n_seq=n_parallel, swa_full=bool(swa_full),
                           type_k=kv_type_k or kv_type, type_v=kv_type_v or kv_type, flash_attn=flash_attn,
                           n_ubatch=n_ubatch or DEFAULT_N_UBATCH, n_outputs_max=n_parallel)


def _auto_context(model_path: Path, mmproj_path: Path | None, settings: ContextSettings, n_gpu_layers: str | int,
                  vram_bytes: int | None) -> int:
    """``n_ctx="auto"``: the largest context that fits (``runtime.offload.largest_context``)."""
    gpu = n_gpu_layers != 0 and gpu_offload_supported()[0]
    memory = (vram_bytes if vram_bytes is not None else query_free_vram()) if gpu else available_memory_bytes()
    n_ctx = largest_context(model_path, memory_bytes=memory, gpu=gpu, settings=settings, mmproj_path=mmproj_path)
    where = "the GPU budget" if gpu else "the available memory"
    if n_ctx is None:
        if gpu:  # not even a short context fits with every layer on the GPU: plan a partial offload
            n_ctx = min(4096, read_text_model(model_path).context_length or 4096)
            log.warning("%s auto: the whole model does not fit %s with any context; using %d positions and "
                        "offloading part of the model", "n_ctx", where, n_ctx)
            return n_ctx
        raise ResourceError(f"{setting('n_ctx')} auto: not even 256 positions fit {where} next to the model; free "
                            "memory, or use a smaller quant")
    log.info("n_ctx auto: %d positions fit %s (%s)", n_ctx, where, settings.with_(n_ctx=n_ctx).describe())
    return n_ctx
