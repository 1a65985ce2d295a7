"""Thinking: MedGemma's <unused94>thought … <unused95> block, found by the vocabulary's marker tokens, comes
back apart from the answer (ChatResult.reasoning, stream deltas, CLI --show-thinking, the server's
reasoning_content), never shows half a marker, is not cut by stop strings, and --think adds the model
card's system-prompt instruction.

The ``text-think`` fixture has the markers as added tokens at ids of its own (not MedGemma's 100/101).
Its random weights never think unasked, so the tests force a block with a grammar that names the markers.
"""

from __future__ import annotations

import json
import re

import jsonschema

from medgemma_gguf.runtime.reply import CONTENT, REASONING, ReasoningMarkers, ReplyText

VARIANT = "text-think"
QUESTION = [{"role": "user", "content": "Is there a pneumothorax?"}]
# a block as MedGemma writes it, then the answer: what a reply with reasoning looks like
THINKING = 'root ::= <unused94> "thought\\n" [a-z ]{3,20} <unused95> "\\n" "Answer: " [a-z]{1,8}'


# --- the splitter on token streams --------------------------------------------------------------------------

PIECES = {1: b"<unused94>", 2: b"<unused95>", 3: b"tho", 4: b"ught\n", 5: b"look", 6: b" at", 7: b"\n\n",
          8: b"Yes", 9: b".", 10: b" E", 11: b"ND", 12: b"\xf0\x9f", 13: b"\xa9\xbb"}
MARKERS = ReasoningMarkers(start=1, end=2)


def _split(tokens: list[int], **options) -> tuple[list[tuple[str, str]], ReplyText]:
    reply = ReplyText(PIECES.__getitem__, markers=MARKERS, **options)
    deltas = []
    for token in tokens:
        deltas += reply.push(token)
        if reply.stopped:
            break
    return deltas + reply.finish(), reply


def test_the_block_goes_to_reasoning_without_markers_or_label():
    deltas, reply = _split([1, 3, 4, 5, 6, 2, 7, 8, 9])
    assert reply.reasoning == "look at" and reply.text == "Yes." and reply.reasoning_tokens == 6
    assert "".join(t for c, t in deltas if c == REASONING) == reply.reasoning
    assert "".join(t for c, t in deltas if c == CONTENT) == reply.text
    assert not any("unused" in text or "<" in text for _, text in deltas)  # never a marker, whole or half
    assert deltas[0] == (REASONING, "look")  # "tho" + "ught\n" waited until they were the label


def test_blocks_only_open_at_the_start_and_may_stay_open():
    _, late = _split([8, 1, 5, 2])
    assert late.text == "Yes<unused94>look<unused95>" and late.reasoning == ""  # mid-answer markers are text
    _, open_block = _split([1, 5, 6, 12, 13])
    assert open_block.reasoning == "look at🩻" and open_block.text == ""  # ran out of tokens while thinking
    _, other_label = _split([1, 5, 2, 8])
    assert other_label.reasoning == "look" and other_label.text == "Yes"
    plain = ReplyText(PIECES.__getitem__)
    for token in (1, 5, 2, 8):
        plain.push(token)
    plain.finish()
    assert plain.text == "<unused94>look<unused95>Yes" and plain.reasoning == ""  # a model without markers


def test_stop_strings_do_not_apply_inside_the_block():
    deltas, reply = _split([1, 5, 10, 11, 2, 8, 10, 11, 9], stop=[" END"])
    assert reply.reasoning == "look END" and reply.text == "Yes" and reply.stopped
    assert "".join(t for c, t in deltas if c == CONTENT) == "Yes"


# --- on a model with the markers --------------------------------------------------------------------------


def test_the_markers_come_from_the_vocabulary(text_model, converted):
    from medgemma_gguf.runtime import load

    markers = text_model.reasoning_markers
    assert markers is not None and markers.start != 100  # the fixture's own ids, not MedGemma's
    assert text_model.engine.token_piece(markers.start) == b"<unused94>"
    with load(converted("mm-deep").text_path, n_gpu_layers=0, n_ctx=256, n_threads=1) as other:
        assert other.reasoning_markers is None


def test_a_reply_with_reasoning_streamed_and_not(text_model):
    sampling = {"max_tokens": 60, "temperature": 1.0, "seed": 3, "grammar": THINKING}
    whole = text_model.chat(QUESTION, **sampling)
    assert re.fullmatch(r"[a-z ]{3,20}", whole.reasoning) and re.fullmatch(r"Answer: [a-z]{1,8}", whole.text)
    assert whole.finish_reason == "stop" and 3 <= whole.reasoning_tokens < whole.completion_tokens
    raw = b"".join(text_model.engine.token_piece(t) for t in whole.token_ids).decode()
    assert raw == f"<unused94>thought\n{whole.reasoning}<unused95>\n{whole.text}"
    stream = text_model.chat(QUESTION, stream=True, **sampling)
    deltas = list(stream.deltas())
    assert "".join(t for c, t in deltas if c == REASONING) == whole.reasoning
    assert "".join(t for c, t in deltas if c == CONTENT) == whole.text == stream.result.text
    assert not any("<unused" in t for _, t in deltas)
    assert "".join(text_model.chat(QUESTION, stream=True, **sampling)) == whole.text  # iterating gives the answer only
    stop = next(whole.reasoning[i:i + 2] for i in range(len(whole.reasoning) - 1)
                if whole.reasoning[i:i + 2] not in whole.text and whole.reasoning[i:i + 2].strip())
    stopped = text_model.chat(QUESTION, **sampling, stop=[stop])
    assert stopped.text == whole.text and stopped.reasoning == whole.reasoning  # not cut inside the block


def test_a_schema_reply_may_reason_first_and_still_validates(text_model):
    schema = {"type": "object", "properties": {"severity": {"enum": ["none", "mild", "severe"]},
                                               "urgent": {"type": "boolean"}}, "required": ["severity", "urgent"]}
    markers = text_model.reasoning_markers
    # the biases make the model open a block (the grammar allows one first), then close it at once
    reply = text_model.chat(QUESTION, max_tokens=60, json_schema=schema,
                            logit_bias={markers.start: 50, markers.end: 100})
    assert reply.token_ids[:2] == [markers.start, markers.end] and reply.reasoning_tokens == 2
    jsonschema.validate(json.loads(reply.text), schema)
    plain = text_model.chat(QUESTION, max_tokens=60, json_schema=schema)
    assert markers.start not in plain.token_ids
    jsonschema.validate(json.loads(plain.text), schema)


def test_think_starts_the_system_prompt_with_the_instruction(text_model):
    from medgemma_gguf.runtime.prompt import THINK_SYSTEM_PREFIX

    assert THINK_SYSTEM_PREFIX == "SYSTEM INSTRUCTION: think silently if needed."
    alone = text_model.prompt(QUESTION, think=True).text
    assert alone.startswith(f"<bos><start_of_turn>user\n{THINK_SYSTEM_PREFIX}\n\nIs there")
    with_system = text_model.prompt(QUESTION, system="You are a radiologist.", think=True).text
    assert f"user\n{THINK_SYSTEM_PREFIX} You are a radiologist.\n\nIs there" in with_system
    own = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, *QUESTION]
    assert f"user\n{THINK_SYSTEM_PREFIX} Be brief.\n\n" in text_model.prompt(own, think=True).text
    assert text_model.prompt(own, think=True).text == text_model.prompt(
        [{"role": "system", "content": f"{THINK_SYSTEM_PREFIX} Be brief."}, *QUESTION], think=True).text
    assert THINK_SYSTEM_PREFIX not in text_model.prompt(QUESTION).text
    thinking = text_model.prompt(QUESTION, think=True)
    assert text_model.chat(QUESTION, think=True, max_tokens=4).prompt_tokens == thinking.n_positions


def test_the_cli_hides_reasoning_unless_asked(files, tmp_path, capsys):
    from medgemma_gguf.cli import main

    grammar = tmp_path / "thinking.gbnf"
    grammar.write_text(THINKING)
    args = ["chat", str(files.text_path), "--prompt", QUESTION[0]["content"], "--threads", "1", "--ctx", "512",
            "--max-tokens", "60", "--temperature", "1", "--seed", "3", "--grammar", str(grammar)]
    assert main([*args, "--json"]) == 0
    reply = json.loads(capsys.readouterr().out)
    assert reply["reasoning"] and reply["text"].startswith("Answer: ") and reply["reasoning_tokens"] > 0
    assert main(args) == 0
    hidden = capsys.readouterr()
    assert hidden.out == reply["text"] + "\n" and reply["reasoning"] not in hidden.err
    assert "(thinking; --show-thinking prints it)" in hidden.err
    assert main([*args, "--show-thinking"]) == 0
    shown = capsys.readouterr()
    assert shown.out == reply["text"] + "\n" and reply["reasoning"] + "\n" in shown.err
    assert main([*args[:-2], "--think", "--max-tokens", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["prompt_tokens"] > reply["prompt_tokens"]


def test_the_server_returns_reasoning_content(text_model):
    from fastapi.testclient import TestClient

    from medgemma_gguf.runtime.server import create_app

    body = {"messages": QUESTION, "max_tokens": 60, "temperature": 1.0, "seed": 3, "grammar": THINKING}
    expected = text_model.chat(QUESTION, max_tokens=60, temperature=1.0, seed=3, grammar=THINKING)
    with TestClient(create_app(text_model)) as client:
        reply = client.post("/v1/chat/completions", json=body).json()
        message = reply["choices"][0]["message"]
        assert message == {"role": "assistant", "content": expected.text, "reasoning_content": expected.reasoning}
        assert reply["usage"]["completion_tokens_details"]["reasoning_tokens"] == expected.reasoning_tokens
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
            events = [json.loads(line[6:]) for line in response.iter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
        deltas = [e["choices"][0]["delta"] for e in events]
        assert "".join(d.get("reasoning_content", "") for d in deltas) == expected.reasoning
        assert "".join(d.get("content") or "" for d in deltas) == expected.text
        plain = client.post("/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 3}).json()
        assert "reasoning_content" not in plain["choices"][0]["message"]
        thinking = client.post("/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 3,
                                                              "reasoning_effort": "high"}).json()
        assert thinking["usage"]["prompt_tokens"] == text_model.prompt(QUESTION, think=True).n_positions
        bad = client.post("/v1/chat/completions", json={"messages": QUESTION, "reasoning_effort": "extreme"})
        assert bad.status_code == 400 and bad.json()["error"]["message"].startswith("'reasoning_effort' must be")
