"""Sampling settings (one validation for every interface), the model's defaults, and llama.cpp's sampler chain.

Settings. ``sampling_settings(...)`` is the one place sampling settings are checked: the CLI, the Python API
(``ChatModel.chat``/``generate``) and the server (``settings_from_request``) all go through it, and a bad
value raises an ``InputError`` naming the setting in the interface's words (``--top-k``, ``top_k``,
``'top_k'``): bools or text where a number belongs, NaN and infinities, huge or denormal values, numbers
out of range.

| setting | range | off / default |
|---|---|---|
| ``max_tokens`` | 1 .. 2**31-1 | 256 (CLI, API); the server's limit (server) |
| ``temperature`` | 0, or 0.001 .. 100 | 0 = greedy (the project's default, as Google's MedGemma examples) |
| ``top_k`` | 0 .. 2**31-1 | 0 = off; unset: the model's value when sampling |
| ``top_p`` | 0 .. 1 | 1 = off; unset: the model's value when sampling |
| ``min_p`` | 0 .. 1 | 0 = off; unset: the model's value when sampling |
| ``repeat_penalty`` | 0.1 .. 10 | 1 = off; unset: the model's value when sampling |
| ``repeat_last_n`` | -1 .. 2**31-1 | 64 (llama.cpp's); 0 = off, -1 = the whole context |
| ``presence_penalty``, ``frequency_penalty`` | -2 .. 2 (OpenAI's range) | 0 = off |
| ``seed`` | 0 .. 4294967294, or -1 / None | None or -1 = a fresh random seed |
| ``logit_bias`` | {token id: -100 .. 100} | none |
| ``stop`` | a string or up to 4 non-empty strings | none (``runtime.reply`` cuts the reply there) |
| ``json_schema`` / ``grammar`` | a JSON Schema object / GBNF text (``runtime.structured``) | none |

Defaults from the model. Temperature 0 (greedy) stays the default. A request that sets a temperature > 0
takes, for each of top-k, top-p, min-p and the repeat penalty it leaves unset, the model's value: the
GGUF's ``general.sampling.*`` keys (``medgemma-gguf convert`` writes them from ``generation_config.json``:
MedGemma's are top-k 64, top-p 0.95), or — for a GGUF without those keys, e.g. one converted by an older
tool — Gemma 3's published generation defaults, top-k 64 and top-p 0.95 (``GEMMA3_SAMPLING``), min-p
off, no repeat penalty. The GGUF's ``general.sampling.temp`` is not used: greedy is the default.

The chain. Built per request through llama.cpp's ``llama_sampler_*`` API, in llama-server's order:
logit bias → penalties → top-k → top-p → min-p → temperature → distribution with the seed; with
temperature 0 greedy replaces the last five (argmax, ties to the lowest id, as HF's greedy search).
``llama_sampler_sample`` reads the logits inside llama.cpp and accepts the token, so nothing per token
goes through numpy. The penalties count the reply's own tokens (the last ``repeat_last_n``), as OpenAI
defines them; llama-server also counts the prompt's tail.

Seeds. With the same seed, the same request gives the same tokens, whether its prefix was re-used from
the cache or evaluated from a fresh load: the prompt's last token is always decoded in a batch of its
own (``runtime.chat``), so both paths compute the same logits, and the chain draws from the same
generator. Not covered: another thread count, another backend (GPU offload) or another build of llama.cpp
(the last bits of the logits differ), and — once the server batches several requests together — a
seeded server request reproduces only when it runs alone.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import gguf
import llama_cpp

from medgemma_gguf.errors import InputError, setting
from medgemma_gguf.runtime.reply import MAX_STOP, THINK_END, THINK_START, ReasoningMarkers
from medgemma_gguf.runtime.structured import (
    ROOT,
    check_grammar,
    grammar_sampler,
    response_format_schema,
    schema_grammar,
    with_reasoning_block,
)

INT32_MAX = 2**31 - 1
RANDOM_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: llama.cpp draws a seed itself
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 100.0
DEFAULT_MAX_TOKENS = 256
DEFAULT_REPEAT_LAST_N = 64  # llama.cpp's penalty_last_n


@dataclass(frozen=True)
class ModelSampling:
    """A model's sampling defaults, applied to the settings a sampled request leaves unset."""

    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    repeat_last_n: int | None = None
    temperature: float | None = None  # recorded, never used: the project's default is greedy
    source: str = ""


# Gemma 3's and MedGemma's generation_config.json (top_k 64, top_p 0.95): for GGUFs without the keys
GEMMA3_SAMPLING = ModelSampling(top_k=64, top_p=0.95, source="Gemma 3's generation_config.json")

_GGUF_KEYS = {  # general.sampling.* key -> ModelSampling field
    gguf.Keys.General.SAMPLING_TOP_K: "top_k",
    gguf.Keys.General.SAMPLING_TOP_P: "top_p",
    gguf.Keys.General.SAMPLING_MIN_P: "min_p",
    gguf.Keys.General.SAMPLING_PENALTY_REPEAT: "repeat_penalty",
    gguf.Keys.General.SAMPLING_PENALTY_LAST_N: "repeat_last_n",
    gguf.Keys.General.SAMPLING_TEMP: "temperature",
}


def model_sampling(metadata: Mapping[str, Any]) -> ModelSampling:
    """The ``general.sampling.*`` values of a GGUF's metadata; ``GEMMA3_SAMPLING`` when it has none.

    A value out of range (a damaged or foreign file) is ignored, as if the key were absent.
    """
    values: dict[str, Any] = {}
    for key, field_name in _GGUF_KEYS.items():
        if key not in metadata:
            continue
        try:
            checked = sampling_settings(**{field_name: metadata[key]})
        except InputError:
            continue
        values[field_name] = getattr(checked, field_name)
    if not values:
        return GEMMA3_SAMPLING
    return ModelSampling(**values, source="the GGUF's general.sampling keys")


# --- the one validation ---------------------------------------------------------------------------------


def _show(value: Any) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int too long to print
        return "a number too large to print"
    return text if len(text) <= 40 else text[:37] + "..."


def _number(name: str, value: Any, low: float, high: float, meaning: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InputError(f"{setting(name)} must be a number {meaning}, got {_show(value)}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number) or not low <= number <= high:
        raise InputError(f"{setting(name)} must be {meaning}, got {_show(value)}")
    return number


def _integer(name: str, value: Any, low: int, high: int, meaning: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InputError(f"{setting(name)} must be a whole number {meaning}, got {_show(value)}")
    return int(value)


def _temperature(value: Any) -> float:
    meaning = f"0 (greedy) or between {MIN_TEMPERATURE:g} and {MAX_TEMPERATURE:g}"
    number = _number("temperature", value, 0.0, MAX_TEMPERATURE, meaning)
    if 0 < number < MIN_TEMPERATURE:
        raise InputError(f"{setting('temperature')} must be {meaning}, got {_show(value)}")
    return number


def _logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, list | tuple) and all(isinstance(i, list | tuple) and len(i) == 2 for i in value):
        items = [tuple(i) for i in value]
    else:
        raise InputError(f"{setting('logit_bias')} must map token ids to biases, e.g. {{\"1234\": -100}}, "
                         f"got {_show(value)}")
    biases: dict[int, float] = {}
    for token, bias in items:
        if isinstance(token, str) and token.strip().isdigit():
            token = int(token)
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token <= INT32_MAX:
            raise InputError(f"{setting('logit_bias')} keys must be token ids (whole numbers >= 0), "
                             f"got {_show(token)}")
        biases[token] = _number("logit_bias", bias, -100.0, 100.0, f"between -100 and 100 (token {token})")
    return tuple(sorted(biases.items()))


def _stop(value: Any) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list | tuple) or not all(isinstance(s, str) for s in stops):
        raise InputError(f"{setting('stop')} must be a string or a list of up to {MAX_STOP} strings, "
                         f"got {_show(value)}")
    if len(stops) > MAX_STOP:
        raise InputError(f"{setting('stop')} takes at most {MAX_STOP} stop strings, got {len(stops)}")
    if any(not s for s in stops):
        raise InputError(f"{setting('stop')} strings must not be empty; drop the empty one")
    return tuple(dict.fromkeys(stops))


@dataclass(frozen=True)
class SamplingSettings:
    """Validated settings of one request (build with ``sampling_settings``). ``None``: the model's default."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    repeat_last_n: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    stop: tuple[str, ...] = ()
    grammar: str | None = None  # GBNF (root "root"): from grammar=, or converted from json_schema=
    json_schema: Mapping[str, Any] | None = field(default=None, compare=False)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def resolve(self, model: ModelSampling) -> SamplingSettings:
        """Every ``None`` replaced: the model's values when sampling (temperature > 0), else "off"."""
        sampled = not self.greedy

        def pick(own: Any, models: Any, off: Any) -> Any:
            if own is not None:
                return own
            return models if sampled and models is not None else off

        return replace(
            self,
            top_k=pick(self.top_k, model.top_k, 0),
            top_p=pick(self.top_p, model.top_p, 1.0),
            min_p=pick(self.min_p, model.min_p, 0.0),
            repeat_penalty=pick(self.repeat_penalty, model.repeat_penalty, 1.0),
            repeat_last_n=pick(self.repeat_last_n, model.repeat_last_n, DEFAULT_REPEAT_LAST_N),
        )


def sampling_settings(*, max_tokens: Any = DEFAULT_MAX_TOKENS, temperature: Any = 0.0, top_k: Any = None,
                      top_p: Any = None, min_p: Any = None, repeat_penalty: Any = None, repeat_last_n: Any = None,
                      presence_penalty: Any = None, frequency_penalty: Any = None, seed: Any = None,
                      logit_bias: Any = None, stop: Any = None, json_schema: Any = None,
                      grammar: Any = None) -> SamplingSettings:
    """Check every sampling setting (the ranges are in the module docstring); InputError naming the first bad one.

    ``None`` means "not set" everywhere (JSON ``null`` too); ``seed=-1`` means a random seed, as in llama.cpp.
    ``json_schema`` (a JSON Schema object) or ``grammar`` (GBNF text) constrain the reply
    (``runtime.structured``); both are checked here, before any model work.
    """
    if json_schema is not None and grammar is not None:
        raise InputError(f"pass either {setting('json_schema')} or {setting('grammar')}, not both")
    if grammar is not None:
        if not isinstance(grammar, str):
            raise InputError(f"{setting('grammar')} must be GBNF text, got {type(grammar).__name__}")
        check_grammar(grammar)
    elif json_schema is not None:
        grammar = schema_grammar(json_schema)
    return SamplingSettings(
        max_tokens=_integer("max_tokens", DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens, 1, INT32_MAX,
                            f"between 1 and {INT32_MAX}"),
        temperature=_temperature(0.0 if temperature is None else temperature),
        top_k=None if top_k is None else _integer("top_k", top_k, 0, INT32_MAX, ">= 0 (0 = off)"),
        top_p=None if top_p is None else _number("top_p", top_p, 0.0, 1.0, "between 0 and 1 (1 = off)"),
        min_p=None if min_p is None else _number("min_p", min_p, 0.0, 1.0, "between 0 and 1 (0 = off)"),
        repeat_penalty=None if repeat_penalty is None else _number(
            "repeat_penalty", repeat_penalty, 0.1, 10.0, "between 0.1 and 10 (1 = off)"),
        repeat_last_n=None if repeat_last_n is None else _integer(
            "repeat_last_n", repeat_last_n, -1, INT32_MAX, "of tokens >= 0 (0 = off), or -1 for the whole context"),
        presence_penalty=0.0 if presence_penalty is None else _number(
            "presence_penalty", presence_penalty, -2.0, 2.0, "between -2 and 2 (0 = off)"),
        frequency_penalty=0.0 if frequency_penalty is None else _number(
            "frequency_penalty", frequency_penalty, -2.0, 2.0, "between -2 and 2 (0 = off)"),
        seed=None if seed is None or (type(seed) is int and seed == -1) else _integer(
            "seed", seed, 0, RANDOM_SEED - 1, f"between 0 and {RANDOM_SEED - 1} (or -1 for a random seed)"),
        logit_bias=() if logit_bias is None else _logit_bias(logit_bias),
        stop=() if stop is None else _stop(stop),
        grammar=grammar,
        json_schema=json_schema,
    )


# OpenAI / llama-server request field -> sampling_settings argument
REQUEST_FIELDS = {
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
    "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
    "repeat_penalty": "repeat_penalty", "repeat_last_n": "repeat_last_n", "seed": "seed",
    "logit_bias": "logit_bias", "stop": "stop",
}


def settings_from_request(body: Mapping[str, Any], *, default_max_tokens: int) -> SamplingSettings:
    """The sampling settings of an OpenAI chat completion request (llama-server's extensions included).

    ``max_completion_tokens`` wins over ``max_tokens``, and each one given is checked; ``null`` counts as
    absent; InputError (HTTP 400) naming the request field for any bad value.
    """
    for name in ("max_completion_tokens", "max_tokens"):
        if body.get(name) is not None:
            _integer(name, body[name], 1, INT32_MAX, f"between 1 and {INT32_MAX}")
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    fields = {argument: body.get(name) for name, argument in REQUEST_FIELDS.items()}
    schema = response_format_schema(body.get("response_format"))
    if schema is not None and (body.get("json_schema") is not None or body.get("grammar") is not None):
        raise InputError(f"pass either {setting('response_format')} or llama-server's 'json_schema'/'grammar', "
                         "not both")
    return sampling_settings(max_tokens=default_max_tokens if max_tokens is None else max_tokens,
                             json_schema=schema if schema is not None else body.get("json_schema"),
                             grammar=body.get("grammar"), **fields)


REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")  # OpenAI's values


def think_from_request(body: Mapping[str, Any]) -> bool:
    """Whether an OpenAI request asks the model to reason: ``reasoning_effort`` set to anything but "none"
    adds ``runtime.prompt.THINK_SYSTEM_PREFIX`` (MedGemma has no effort levels); absent or "none" does not."""
    effort = body.get("reasoning_effort")
    if effort is None:
        return False
    if effort not in REASONING_EFFORTS:
        raise InputError(f"{setting('think')} must be one of {', '.join(REASONING_EFFORTS)}, got {_show(effort)}")
    return effort != "none"


# --- the chain ------------------------------------------------------------------------------------------


class Sampler:
    """One request's llama.cpp sampler chain: ``sample()`` picks (and accepts) the next token; ``close()``.

    ``settings`` must be resolved (``SamplingSettings.resolve``). ``n_vocab`` bounds the logit-bias ids;
    ``n_ctx`` is the window of ``repeat_last_n=-1``.

    ``reasoning``: the model's reasoning markers; a grammar then admits one reasoning block before what it
    constrains (``runtime.structured.with_reasoning_block``). With a grammar, tokens are chosen as llama.cpp's
    common sampler chooses them: the chain picks a token
    from the raw logits, the grammar checks that one token, and only when it is rejected are the logits
    filtered by the grammar over the whole vocabulary and the chain run again. Only grammar-valid tokens
    are ever accepted (llama.cpp aborts the process on any other); when the grammar allows no token at all
    ``sample()`` returns -1 and the reply ends.
    """

    def __init__(self, context: Any, vocab: Any, settings: SamplingSettings, *, n_vocab: int, n_ctx: int,
                 reasoning: ReasoningMarkers | None = None):
        self._ctx = context
        self._chain = self._grammar = None
        self._wrappers: list[Any] = []
        bad = [token for token, _ in settings.logit_bias if token >= n_vocab]
        if bad:
            raise InputError(f"{setting('logit_bias')} names token {bad[0]}, but the vocabulary has {n_vocab} "
                             f"tokens (ids 0 to {n_vocab - 1})")
        if settings.grammar is not None:
            name = "json_schema" if settings.json_schema is not None else "grammar"
            grammar, root = settings.grammar, ROOT
            if reasoning is not None:
                grammar, root = with_reasoning_block(grammar, reasoning.start, reasoning.end, (THINK_START, THINK_END))
            self._grammar = grammar_sampler(grammar, vocab, root=root, name=name)
        self._chain = self._new_chain()
        add = self._add
        if settings.logit_bias:
            biases = (llama_cpp.llama_logit_bias * len(settings.logit_bias))()
            for i, (token, bias) in enumerate(settings.logit_bias):
                biases[i].token, biases[i].bias = token, bias  # type: ignore[assignment]
            add(llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(settings.logit_bias), biases))
        last_n = n_ctx if settings.repeat_last_n == -1 else settings.repeat_last_n
        if last_n and (settings.repeat_penalty != 1.0 or settings.presence_penalty or settings.frequency_penalty):
            add(llama_cpp.llama_sampler_init_penalties(n_vocab, last_n, settings.repeat_penalty,
                                                       settings.frequency_penalty, settings.presence_penalty))
        if settings.greedy:
            add(llama_cpp.llama_sampler_init_greedy())
        else:
            if settings.top_k:
                add(llama_cpp.llama_sampler_init_top_k(settings.top_k))
            top_p = 1.0 if settings.top_p is None else settings.top_p
            min_p = 0.0 if settings.min_p is None else settings.min_p
            if top_p < 1.0:
                add(llama_cpp.llama_sampler_init_top_p(top_p, 1))
            if min_p > 0.0:
                add(llama_cpp.llama_sampler_init_min_p(min_p, 1))
            add(llama_cpp.llama_sampler_init_temp(settings.temperature))
            add(llama_cpp.llama_sampler_init_dist(RANDOM_SEED if settings.seed is None else settings.seed))
        if self._grammar:
            self._probe = llama_cpp.llama_sampler_init_greedy()
            self._one = (llama_cpp.llama_token_data * 1)()
            self._one_array = llama_cpp.llama_token_data_array(data=self._one, size=1, selected=-1, sorted=False)
            self._fast = self._wrap(self._chain_only)
            self._full = self._wrap(self._grammar_then_chain)
            self._dead = False
            self.sample = self._sample_with_grammar  # type: ignore[method-assign]

    @staticmethod
    def _new_chain() -> Any:
        params = llama_cpp.llama_sampler_chain_default_params()
        params.no_perf = True
        return llama_cpp.llama_sampler_chain_init(params)

    def _add(self, sampler: Any) -> None:
        if not sampler:
            raise RuntimeError("llama.cpp could not create a sampler")
        llama_cpp.llama_sampler_chain_add(self._chain, sampler)  # the chain owns it from here

    def _wrap(self, apply: Any) -> Any:
        """A chain holding one Python sampler (the chain keeps llama_sampler_sample's logits buffer)."""
        function = llama_cpp.llama_sampler_i_apply(lambda _smpl, cur_p: apply(cur_p.contents))
        iface = llama_cpp.llama_sampler_i()
        iface.apply = function
        sampler = llama_cpp.llama_sampler(iface=ctypes.pointer(iface), ctx=None)
        chain = self._new_chain()
        llama_cpp.llama_sampler_chain_add(chain, ctypes.pointer(sampler))
        self._wrappers.append((chain, function, iface, sampler))
        return chain

    def _chain_only(self, candidates: Any) -> None:
        llama_cpp.llama_sampler_apply(self._chain, ctypes.byref(candidates))

    def _grammar_then_chain(self, candidates: Any) -> None:
        try:
            llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(candidates))
            llama_cpp.llama_sampler_apply(self._probe, ctypes.byref(candidates))
            if not math.isfinite(candidates.data[candidates.selected].logit):
                self._dead = True  # the grammar allows no token here
                return
            candidates.selected = -1
            llama_cpp.llama_sampler_apply(self._chain, ctypes.byref(candidates))
        except Exception:  # noqa: BLE001 - an exception cannot cross back into llama.cpp
            self._dead = True
            candidates.selected = 0

    def _allowed(self, token: int) -> bool:
        self._one[0].id, self._one[0].logit, self._one[0].p = token, 0.0, 0.0  # type: ignore[assignment]
        self._one_array.size, self._one_array.selected, self._one_array.sorted = 1, -1, False
        llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(self._one_array))
        return math.isfinite(self._one[0].logit)

    def _sample_with_grammar(self, index: int = -1) -> int:
        token = llama_cpp.llama_sampler_sample(self._fast, self._ctx, index)  # the chain alone, nothing accepted
        if not self._allowed(token):
            token = llama_cpp.llama_sampler_sample(self._full, self._ctx, index)
            if self._dead or not self._allowed(token):
                return -1
        llama_cpp.llama_sampler_accept(self._grammar, token)
        llama_cpp.llama_sampler_accept(self._chain, token)
        return token

    @property
    def seed(self) -> int:
        """The seed the chain's distribution uses (llama.cpp's own draw when none was given)."""
        return int(llama_cpp.llama_sampler_get_seed(self._chain))

    def sample(self, index: int = -1) -> int:
        """The next token from the context's logits of batch row ``index`` (-1: the last row of the last
        decode; ``runtime.batching`` passes each slot's row), accepted into the chain (penalty history)."""
        return llama_cpp.llama_sampler_sample(self._chain, self._ctx, index)

    def close(self) -> None:
        for chain, *_ in self._wrappers:
            llama_cpp.llama_sampler_chain_remove(chain, 0)  # the Python sampler is not llama.cpp's to free
            llama_cpp.llama_sampler_free(chain)
        self._wrappers = []
        for name in ("_chain", "_grammar", "_probe"):
            sampler = getattr(self, name, None)
            if sampler:
                llama_cpp.llama_sampler_free(sampler)
                setattr(self, name, None)

    def __del__(self) -> None:
        self.close()
