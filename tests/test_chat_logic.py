"""ChatModel's logic on a scripted fake engine (``fixtures.fake_engine``): no model, unit tier.

What llama.cpp computes is tested on tiny models elsewhere (test_runtime_chat, test_sampling); here the
prompt the real chat template renders, the cache re-use between turns, stop strings, the reasoning block,
``max_tokens``, cancellation, context limits and streaming are checked exactly, in milliseconds.
"""

from __future__ import annotations

import pytest

from medgemma_gguf.errors import ResourceError, UserError
from medgemma_gguf.fixtures.fake_engine import FakeEngine
from medgemma_gguf.runtime.chat import ChatModel, ChatResult


def model_with(tmp_path, *replies: str, n_ctx: int = 512) -> tuple[ChatModel, FakeEngine]:
    engine = FakeEngine.create(tmp_path, replies, n_ctx=n_ctx)
    return ChatModel(engine, name="fake"), engine  # type: ignore[arg-type]


def text_of(engine: FakeEngine, tokens: list[int]) -> str:
    return b"".join(engine.token_piece(t, special=True) for t in tokens).decode("utf-8")


def ask(model: ChatModel, text: str, **options) -> ChatResult:
    reply = model.chat([{"role": "user", "content": text}], **options)
    assert isinstance(reply, ChatResult)
    return reply


def test_the_prompt_is_gemma_3s_turn_layout_and_the_reply_ends_at_end_of_turn(tmp_path):
    model, engine = model_with(tmp_path, "Pneumothorax is air in the pleural space.")
    reply = ask(model, "What is a pneumothorax?", system="Be brief.")
    assert reply.text == "Pneumothorax is air in the pleural space."
    assert reply.finish_reason == "stop"
    assert reply.completion_tokens == len("Pneumothorax is air in the pleural space.")
    prompt = text_of(engine, engine.evaluated[0] + engine.evaluated[1])
    assert prompt == ("<bos><start_of_turn>user\nBe brief.\n\nWhat is a pneumothorax?<end_of_turn>\n"
                      "<start_of_turn>model\n")
    assert len(engine.evaluated[1]) == 1  # the last prompt token is decoded alone (seeded replies reproduce)
    assert engine.samplers[0].closed


def test_a_follow_up_re_uses_the_cached_prefix_and_evaluates_only_the_new_turn(tmp_path):
    model, engine = model_with(tmp_path, "Air in the pleura.", "A chest X-ray.")
    first = [{"role": "user", "content": "What is a pneumothorax?"}]
    reply = model.chat(first)
    assert isinstance(reply, ChatResult)
    before = len(engine.evaluated)
    second = model.chat([*first, {"role": "assistant", "content": reply.text},
                         {"role": "user", "content": "How is it seen?"}])
    assert isinstance(second, ChatResult) and second.text == "A chest X-ray."
    new = [t for run in engine.evaluated[before:] for t in run]
    assert text_of(engine, new).startswith("<end_of_turn>\n<start_of_turn>user\nHow is it seen?")
    assert second.timings["prompt_positions_reused"] > 0
    assert second.timings["prompt_positions_evaluated"] == len(new) - second.completion_tokens  # each decoded


def test_a_stop_string_split_across_tokens_ends_the_reply_before_it(tmp_path):
    model, _ = model_with(tmp_path, "Findings: none.\nImpression: normal.")
    reply = ask(model, "Report", stop=["\nImpression"])
    assert reply.text == "Findings: none."
    assert reply.finish_reason == "stop"


def test_max_tokens_ends_the_reply_with_finish_reason_length(tmp_path):
    model, _ = model_with(tmp_path, "abcdefghijkl")
    reply = ask(model, "Spell", max_tokens=5)
    assert (reply.text, reply.completion_tokens, reply.finish_reason) == ("abcde", 5, "length")


def test_the_reasoning_block_is_kept_apart_from_the_answer(tmp_path):
    model, _ = model_with(tmp_path, "<unused94>thought\nThe lung edge is visible.<unused95>Pneumothorax.")
    reply = ask(model, "Read the film")
    assert reply.text == "Pneumothorax."
    assert reply.reasoning == "The lung edge is visible."
    assert reply.openai_message() == {"role": "assistant", "content": "Pneumothorax.",
                                      "reasoning_content": "The lung edge is visible."}


def test_a_character_split_across_tokens_streams_whole(tmp_path):
    model, _ = model_with(tmp_path, "µg/kg · 5 mg")
    stream = model.chat([{"role": "user", "content": "dose"}], stream=True)
    pieces = list(stream)
    assert "".join(pieces) == "µg/kg · 5 mg"
    assert all(piece.encode("utf-8").decode("utf-8") == piece for piece in pieces)
    assert stream.result is not None and stream.result.text == "µg/kg · 5 mg"


def test_should_stop_cancels_between_tokens(tmp_path):
    model, _ = model_with(tmp_path, "a long answer")
    calls = []
    stream = model.generate(model.prompt([{"role": "user", "content": "q"}]), max_tokens=50,
                            should_stop=lambda: calls.append(1) or len(calls) >= 3)
    result = stream.collect()
    assert (result.text, result.finish_reason) == ("a l", "cancelled")


def test_a_prompt_that_leaves_no_room_is_refused_before_anything_is_evaluated(tmp_path):
    model, engine = model_with(tmp_path, "unused", n_ctx=40)
    with pytest.raises(ResourceError, match="context"):
        ask(model, "x" * 60)
    assert engine.evaluated == [] and engine.samplers == []


def test_a_new_chat_ends_the_stream_of_the_previous_one(tmp_path):
    model, _ = model_with(tmp_path, "first reply", "second")
    stream = model.chat([{"role": "user", "content": "one"}], stream=True)
    next(iter(stream))
    ask(model, "two")
    with pytest.raises(RuntimeError, match="newer chat"):
        list(stream)


def test_a_closed_model_says_so(tmp_path):
    model, engine = model_with(tmp_path, "never")
    model.close()
    assert engine.closed
    with pytest.raises(UserError, match="closed"):
        ask(model, "q")
