"""Structured output: a JSON schema or a GBNF grammar that constrains the reply, checked before evaluation.

* ``json_schema``: checked as a JSON Schema (``jsonschema``: its draft's meta-schema), then turned into a
  GBNF grammar by llama-cpp-python's converter (``llama_cpp.llama_grammar``), with one change: a string
  character excludes the control characters U+0000–U+001F and DEL, as llama.cpp's own C++ converter has
  it, so every reply parses with Python's strict ``json.loads``.
* ``grammar``: GBNF text as llama.cpp reads it (``root`` is where it starts).
* Server ``response_format`` (OpenAI's shapes): ``{"type": "text"}`` (none), ``{"type": "json_object"}``
  (any JSON object; llama-server's ``"schema"`` key is honoured) and ``{"type": "json_schema",
  "json_schema": {"name": ..., "schema": {...}, "strict": ...}}`` (without a schema: any object; ``strict`` either
  way: the grammar always holds the reply to the schema). Any other field is refused (``RESPONSE_FORMAT_FIELDS``).

What the grammar enforces: types, ``properties``/``required``/``additionalProperties`` (an object without
``additionalProperties`` is closed), ``enum``/``const``, ``items``/``prefixItems``/``minItems``/``maxItems``,
string ``minLength``/``maxLength``/``pattern`` (anchored ``^…$``)/``format`` (date, time, date-time,
uuid), ``anyOf``/``oneOf``/``allOf``, local ``$ref``. Not enforced: numeric bounds (``minimum``,
``maximum``, ``multipleOf``), ``uniqueItems``, string formats other than those. Whitespace is at most one
space between tokens. A grammar forces the syntax, not an end: a schema without bounds (``maxLength``,
``maxItems``, ``enum``) lets a weak model write until ``max_tokens`` (``finish_reason`` "length", the JSON
then incomplete). Huge bounds (``maxLength`` in the thousands) make llama.cpp refuse the grammar.

Grammars are checked when the settings are (no model needed) and again when the sampler is built on the
model's vocabulary (token references such as ``<think>`` need it): every problem is an ``InputError``
naming the setting, before anything is evaluated.

Thinking: on a model with reasoning markers the grammar admits one reasoning block
(``<unused94>`` … ``<unused95>``, free text) before what it constrains (``with_reasoning_block``); stop
strings do not apply inside that block (``runtime.reply``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import llama_cpp
from llama_cpp.llama_grammar import BuiltinRule, SchemaConverter

from medgemma_gguf.errors import InputError, setting, unknown_fields
from medgemma_gguf.runtime.llama_log import native_errors

ROOT = "root"
ANY_OBJECT: dict[str, Any] = {"type": "object"}
# llama.cpp's C++ converter's string character (common/json-schema-to-grammar.cpp: no raw control characters),
# also without the code points UTF-8 cannot carry (surrogates, above U+10FFFF), which byte tokens could spell
STRICT_CHAR = BuiltinRule(
    r'[^"\\\x7F\x00-\x1F\U0000D800-\U0000DFFF\U00110000-\U7FFFFFFF] | [\\] (["\\/bfnrt] | "u" [0-9a-fA-F]{4})', [])


class _Converter(SchemaConverter):
    """llama-cpp-python's schema converter with JSON-valid string characters."""

    def _add_primitive(self, name: str, rule: BuiltinRule) -> str:
        return super()._add_primitive(name, STRICT_CHAR if name == "char" else rule)


def schema_grammar(schema: Any) -> str:
    """The GBNF grammar (root ``root``) of a JSON schema; InputError for a schema that is not valid or
    cannot be turned into a grammar."""
    from jsonschema import Draft202012Validator, SchemaError, validators

    if not isinstance(schema, Mapping):
        raise InputError(f"{setting('json_schema')} must be a JSON object (a JSON Schema), got "
                         f"{type(schema).__name__}")
    schema = dict(schema)
    try:
        validators.validator_for(schema, default=Draft202012Validator).check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        raise InputError(f"{setting('json_schema')} is not a valid JSON Schema: {exc.message}"
                         + (f" (at {where})" if where else "")) from None
    try:
        converter = _Converter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
        converter.visit(converter.resolve_refs(json.loads(json.dumps(schema)), "input"), "")
        grammar = converter.format_grammar()
    except RecursionError:
        raise InputError(f"{setting('json_schema')} is nested too deeply to turn into a grammar") from None
    except Exception as exc:  # the converter asserts on what it does not support
        detail = str(exc) or type(exc).__name__
        raise InputError(f"{setting('json_schema')} cannot be turned into a grammar ({detail}); use the "
                         "keywords listed in the README's structured output section") from None
    check_grammar(grammar, name="json_schema")
    return grammar


# OpenAI's response_format shapes and their fields (null counts as absent; any other field is refused):
# llama-server's "schema" in a json_object format is honoured; json_schema.name / description only label the
# schema, and json_schema.strict is accepted either way because the grammar always holds the reply to the schema
RESPONSE_FORMAT_FIELDS: dict[str, frozenset[str]] = {
    "text": frozenset(("type",)),
    "json_object": frozenset(("type", "schema")),
    "json_schema": frozenset(("type", "json_schema")),
}
JSON_SCHEMA_FIELDS = frozenset(("name", "description", "schema", "strict"))


def response_format_schema(response_format: Any) -> dict[str, Any] | None:
    """The JSON schema an OpenAI ``response_format`` asks for (None for text); InputError for other shapes."""
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise InputError(f"{setting('response_format')} must be an object such as {{\"type\": \"json_object\"}}")
    kind = response_format.get("type")
    if not isinstance(kind, str) or kind not in RESPONSE_FORMAT_FIELDS:
        raise InputError(f"{setting('response_format')} type must be 'text', 'json_object' or 'json_schema', "
                         f"got {kind!r}")
    _refuse_fields(response_format, RESPONSE_FORMAT_FIELDS[kind], f"a {kind} format")
    if kind == "text":
        return None
    if kind == "json_object":
        schema = response_format.get("schema")
        return ANY_OBJECT if schema is None else schema
    spec = response_format.get("json_schema")
    if not isinstance(spec, Mapping):
        raise InputError(f"{setting('response_format')} of type json_schema needs \"json_schema\": "
                         "{\"name\": ..., \"schema\": {...}}")
    _refuse_fields(spec, JSON_SCHEMA_FIELDS, "its json_schema", "json_schema.")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise InputError(f"{setting('response_format')} json_schema.strict must be true or false (the reply is "
                         "held to the schema either way)")
    schema = spec.get("schema")
    return ANY_OBJECT if schema is None or schema == {} else schema


def _refuse_fields(fields: Mapping[str, Any], known: frozenset[str], what: str, prefix: str = "") -> None:
    extra = unknown_fields(fields, known)
    if extra:
        listed = ", ".join(f"'{k}'" for k in sorted(known))
        raise InputError(f"{setting('response_format')} field '{prefix}{extra[0]}' is not supported: {what} has "
                         f"{listed}; remove it")


_PARSE_ERROR = re.compile(r"error parsing grammar: (.+)")


def _reason(lines: list[str]) -> str:
    for line in lines:
        match = _PARSE_ERROR.search(line)
        if match:
            return match.group(1).strip()[:160]
    useful = [line.strip() for line in lines if line.strip() and "failed to parse grammar" not in line]
    return useful[0][:160] if useful else "llama.cpp refused it"


def grammar_sampler(grammar: str, vocab: Any, *, root: str = ROOT, name: str = "grammar") -> Any:
    """A llama.cpp grammar sampler for ``grammar`` on ``vocab``; InputError naming ``name`` when it is refused."""
    if not grammar.strip():
        raise InputError(f"{setting(name)} is empty; pass GBNF rules starting with 'root ::= ...'")
    with native_errors() as lines:
        sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), root.encode("utf-8"))
    if not sampler:
        if vocab is None and any("no vocab to parse token" in line for line in lines):
            return None  # token references: checked once the model's vocabulary is there
        if name == "json_schema":
            raise InputError(f"{setting(name)} makes a grammar llama.cpp refuses ({_reason(lines)}); lower its "
                             "maxLength/maxItems bounds")
        raise InputError(f"{setting(name)} is not a grammar llama.cpp accepts: {_reason(lines)}")
    return sampler


REPLY_ROOT = "medgemma-gguf-reply"


def with_reasoning_block(grammar: str, start: int, end: int,
                         marker_texts: tuple[str, str] | tuple[()] = ()) -> tuple[str, str]:
    """``grammar`` behind an optional reasoning block ``<start> (any token but <end>)* <end>``; the new root.

    MedGemma may reason before it answers (1.5 4B does unasked): the block is free text and the grammar
    constrains what follows it, or the whole reply when the model writes no block — unlike a lazy grammar
    triggered by the end marker, which would leave a reply without a block unconstrained. A grammar that
    names a marker itself (``<unused94>`` or ``<[id]>``) handles the block its own way and is kept as it is.
    """
    names = (f"<[{start}]>", f"<[{end}]>", *(f"<{text.strip('<>')}>" for text in marker_texts))
    if any(name in grammar for name in names):
        return grammar, ROOT
    wrapped = (f"{grammar}\n{REPLY_ROOT} ::= ( <[{start}]> {REPLY_ROOT}-thinking <[{end}]> )? {ROOT}\n"
               f"{REPLY_ROOT}-thinking ::= !<[{end}]>*\n")
    return wrapped, REPLY_ROOT


def check_grammar(grammar: str, *, name: str = "grammar") -> None:
    """Parse ``grammar`` without a model (token references are left for ``grammar_sampler``)."""
    sampler = grammar_sampler(grammar, None, name=name)
    if sampler:
        llama_cpp.llama_sampler_free(sampler)
