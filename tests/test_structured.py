"""runtime.structured: JSON-schema and GBNF constrained replies that parse and validate (API, CLI, server);
bad schemas and grammars are one clear error before any evaluation.

The fixture's weights are random: a grammar forces the syntax, not an end, so the schemas here are
bounded (enum, maxLength, maxItems) and every reply ends inside max_tokens.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from medgemma_gguf.errors import InputError, UserError
from medgemma_gguf.runtime.sampling import sampling_settings
from medgemma_gguf.runtime.structured import (
    ANY_OBJECT,
    check_grammar,
    response_format_schema,
    schema_grammar,
)

VARIANT = "mm-deep"
QUESTION = [{"role": "user", "content": "Return the chest X-ray finding as JSON."}]
FINDING = {
    "type": "object",
    "properties": {
        "finding": {"type": "string", "maxLength": 24},
        "severity": {"enum": ["none", "mild", "moderate", "severe"]},
        "urgent": {"type": "boolean"},
        "codes": {"type": "array", "items": {"type": "integer"}, "maxItems": 3},
        "note": {"type": "string", "pattern": "^[a-z ]{0,10}$"},
    },
    "required": ["finding", "severity", "urgent", "codes"],
}


def test_a_schema_becomes_a_grammar_with_json_valid_strings():
    grammar = schema_grammar(FINDING)
    assert grammar.startswith("char ::= ") or "\nchar ::= " in grammar
    char_rule = next(line for line in grammar.splitlines() if line.startswith("char ::="))
    assert r"\x00-\x1F" in char_rule and r"\U0000D800-\U0000DFFF" in char_rule  # no raw control characters
    assert re.search(r'"\\"(mild|severe)\\""', grammar)
    assert sampling_settings(json_schema=FINDING).grammar == grammar


@pytest.mark.parametrize(("schema", "message"), [
    ([1, 2], "json_schema must be a JSON object"),
    ({"type": "nonsense"}, "json_schema is not a valid JSON Schema: 'nonsense' is not valid"),
    ({"properties": {"a": {"maxLength": -1}}}, "json_schema is not a valid JSON Schema"),
    ({"type": "string", "pattern": "abc"}, "cannot be turned into a grammar (Pattern must start with"),
    ({"$ref": "https://example.com/schema.json"}, "cannot be turned into a grammar"),
    ({"type": "string", "maxLength": 5000}, "makes a grammar llama.cpp refuses (number of rules"),
])
def test_bad_schemas_are_refused_with_the_reason(schema, message):
    with pytest.raises(InputError) as caught:
        sampling_settings(json_schema=schema)
    assert message in str(caught.value)
    assert caught.value.for_cli().startswith("--json-schema") and "the JSON schema ('response_format')" in \
        caught.value.for_http()


@pytest.mark.parametrize(("grammar", "message"), [
    ('root ::= "a" undefined', "Undefined rule identifier 'undefined'"),
    ('start ::= "a"', "grammar does not contain a 'root' symbol"),
    ('root ::= "a" (', "expecting ')'"),
    ("   ", "grammar is empty"),
])
def test_bad_grammars_are_refused_with_the_reason(grammar, message):
    with pytest.raises(InputError) as caught:
        sampling_settings(grammar=grammar)
    assert message in str(caught.value) and caught.value.for_cli().startswith("--grammar")


def test_structured_settings_are_checked_together():
    check_grammar('root ::= <start_of_turn> "x"')  # a token reference waits for the model's vocabulary
    with pytest.raises(InputError, match="either json_schema or grammar"):
        sampling_settings(json_schema=FINDING, grammar='root ::= "x"')
    with pytest.raises(InputError, match="grammar must be GBNF text"):
        sampling_settings(grammar=["root"])


def test_response_format_shapes():
    assert response_format_schema(None) is None and response_format_schema({"type": "text"}) is None
    assert response_format_schema({"type": "json_object"}) == ANY_OBJECT
    assert response_format_schema({"type": "json_object", "schema": FINDING}) == FINDING
    assert response_format_schema({"type": "json_schema", "json_schema": {"name": "f", "schema": FINDING}}) == FINDING
    assert response_format_schema({"type": "json_schema", "json_schema": {"name": "f"}}) == ANY_OBJECT
    for bad, message in [({"type": "xml"}, "type must be 'text', 'json_object' or 'json_schema'"),
                         ({"type": "json_schema"}, "needs \"json_schema\""), ("json", "must be an object")]:
        with pytest.raises(InputError, match=message) as caught:
            response_format_schema(bad)
        assert caught.value.for_http().startswith("'response_format'")


def test_the_cli_refuses_a_bad_schema_file_before_loading(tmp_path, capsys):
    from medgemma_gguf.cli import main

    text_model = str(tmp_path / "not-loaded.gguf")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert main(["chat", text_model, "--prompt", "x", "--json-schema", str(broken)]) == 2
    assert "is not JSON" in capsys.readouterr().err
    invalid = tmp_path / "invalid.json"
    invalid.write_text(json.dumps({"type": 5}))
    assert main(["chat", text_model, "--prompt", "x", "--json-schema", str(invalid)]) == 2
    assert capsys.readouterr().err.strip().endswith("error: --json-schema is not a valid JSON Schema: 5 is not "
                                                    "valid under any of the given schemas (at type)")
    grammar = tmp_path / "g.gbnf"
    grammar.write_text('root ::= "x" nothing')
    assert main(["chat", text_model, "--prompt", "x", "--grammar", str(grammar)]) == 2
    assert "error: --grammar is not a grammar llama.cpp accepts: Undefined rule identifier 'nothing'" in \
        capsys.readouterr().err


# --- on a real model --------------------------------------------------------------------------------------


def test_schema_replies_parse_and_validate(text_model):
    for sampling in [{}, *({"temperature": 1.0, "seed": seed} for seed in range(6)),
                     {"temperature": 1.5, "top_k": 0, "top_p": 1.0, "seed": 1}]:
        reply = text_model.chat(QUESTION, max_tokens=160, json_schema=FINDING, **sampling)
        assert reply.finish_reason == "stop", (sampling, reply.text)
        jsonschema.validate(json.loads(reply.text), FINDING)
    free = text_model.chat(QUESTION, max_tokens=30, temperature=1.0, seed=1).text
    with pytest.raises(json.JSONDecodeError):
        json.loads(free)  # without the grammar the tiny model writes no JSON


def test_grammar_replies_match_and_streaming_gives_the_same_text(text_model):
    grammar = 'root ::= "Finding: " [a-z ]{1,12} "." ("!" | "?")?'
    for sampling in ({}, {"temperature": 1.0, "seed": 2}):
        whole = text_model.chat(QUESTION, max_tokens=40, grammar=grammar, **sampling)
        assert re.fullmatch(r"Finding: [a-z ]{1,12}\.[!?]?", whole.text), whole.text
        stream = text_model.chat(QUESTION, max_tokens=40, grammar=grammar, stream=True, **sampling)
        assert "".join(stream) == whole.text and stream.result.token_ids == whole.token_ids
    tokens = text_model.chat(QUESTION, max_tokens=5, grammar='root ::= <[77]> <[78]> "x"')
    assert tokens.token_ids[:2] == [77, 78]


def test_a_grammar_the_vocabulary_cannot_serve_is_refused_before_evaluation(text_model):
    text_model.reset()
    with pytest.raises(UserError, match="invalid token '<no_such_token>'"):
        text_model.chat(QUESTION, grammar='root ::= <no_such_token> "x"')
    assert text_model.engine.n_past == 0


def test_the_cli_writes_schema_valid_json(files, tmp_path, capsys):
    from medgemma_gguf.cli import main

    schema = tmp_path / "finding.json"
    schema.write_text(json.dumps(FINDING))
    args = ["chat", str(files.text_path), "--prompt", QUESTION[0]["content"], "--threads", "1", "--ctx", "512",
            "--max-tokens", "160", "--json-schema", str(schema)]
    assert main(args) == 0
    jsonschema.validate(json.loads(capsys.readouterr().out), FINDING)
    assert main([*args, "--temperature", "1", "--seed", "3", "--json"]) == 0
    jsonschema.validate(json.loads(json.loads(capsys.readouterr().out)["text"]), FINDING)
