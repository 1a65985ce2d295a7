"""runtime.reply: UTF-8 pieces, stop strings across token boundaries (never shown, only a possible stop
prefix held back while streaming), on synthetic token streams and on a real model's replies."""

from __future__ import annotations

import json

import pytest

from medgemma_gguf.errors import InputError
from medgemma_gguf.runtime.reply import CONTENT, ReplyText, StopStrings, Utf8Decoder
from medgemma_gguf.runtime.sampling import sampling_settings

VARIANT = "mm-deep"
QUESTION = [{"role": "user", "content": "What is the normal adult resting heart rate?"}]


def test_utf8_decoder_keeps_split_characters_whole():
    decoder = Utf8Decoder()
    data = "é🩻a".encode()
    pieces = [decoder.push(data[i:i + 1]) for i in range(len(data))]
    assert pieces == ["", "é", "", "", "", "🩻", "a"]
    assert decoder.finish() == ""
    broken = Utf8Decoder()
    assert broken.push(b"\xf0\x9f") == "" and broken.finish() == "\ufffd"
    assert Utf8Decoder().push(b"\xffok") == "\ufffdok"


def _run(pieces: list[bytes], stop: list[str]) -> tuple[list[str], str, bool]:
    """Feed byte pieces as tokens 0..n-1; the shown pieces, the final text, and whether it stopped."""
    reply = ReplyText(lambda token: pieces[token], stop=stop)
    shown: list[str] = []
    for token in range(len(pieces)):
        shown += [text for channel, text in reply.push(token) if channel == CONTENT]
        if reply.stopped:
            break
    shown += [text for _, text in reply.finish()]
    return shown, reply.text, reply.stopped


def test_a_stop_string_split_over_tokens_ends_the_reply_and_is_never_shown():
    shown, text, stopped = _run([b"The rate is 6", b"0-1", b"00 b", b"pm", b"\nMore"], ["\nMore", "00 bpm"])
    assert stopped and text == "The rate is 60-1" and "".join(shown) == text
    assert all("0 b" not in piece for piece in shown)
    # the earliest stop string in the text wins, whichever is listed first
    assert _run([b"ab", b"cd", b"ef"], ["def", "bc"])[1] == "a"


def test_only_a_possible_stop_prefix_is_held_back():
    stops = StopStrings(["END!"])
    assert stops.push("abcE") == "abc"  # "E" could begin END!
    assert stops.push("N") == ""  # "EN" too
    assert stops.push("Dx") == "ENDx"  # "ENDx" cannot: all shown
    assert stops.push("EN") == "" and stops.flush() == "EN"  # at the end, the held text is the reply's
    assert not stops.stopped
    shown, text, stopped = _run([b"EN", b"D", b" ok E", b"ND!", b"tail"], ["END!"])
    assert shown == ["END ok "] and text == "END ok " and stopped  # "END" waited for its "!"


def test_a_character_split_over_byte_tokens_can_complete_a_stop_string():
    data = "x 🩻 y".encode()
    shown, text, stopped = _run([data[i:i + 1] for i in range(len(data))], ["🩻"])
    assert stopped and text == "x " and "".join(shown) == text
    shown, text, stopped = _run([b"ok \xf0\x9f"], ["z"])
    assert not stopped and text == "ok \ufffd"


def test_stop_lists_are_checked():
    assert sampling_settings(stop="\n").stop == ("\n",)
    assert sampling_settings(stop=["a", "b", "a"]).stop == ("a", "b")
    for bad, message in [(["a", "b", "c", "d", "e"], "at most 4 stop strings, got 5"), ([""], "must not be empty"),
                         (["ok", ""], "must not be empty"), ([1], "string or a list"), (7, "string or a list"),
                         ({"a": 1}, "string or a list")]:
        with pytest.raises(InputError, match=message) as caught:
            sampling_settings(stop=bad)
        assert caught.value.for_cli().startswith("--stop") and caught.value.for_http().startswith("'stop'")


# --- on a real model -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(converted):
    from medgemma_gguf.runtime import load

    chat_model = load(converted(VARIANT).text_path, n_gpu_layers=0, n_ctx=512, n_threads=1)
    yield chat_model
    chat_model.close()


def test_stop_strings_across_token_boundaries_on_a_real_reply(model):
    sampled = {"max_tokens": 24, "temperature": 1.0, "seed": 5}
    full = model.chat(QUESTION, **sampled)
    pieces = [model.engine.token_piece(t).decode("utf-8", "replace") for t in full.token_ids]
    assert "".join(pieces) == full.text
    cut = next(i for i in range(2, len(pieces)) if len(pieces[i - 1]) >= 2 and len(pieces[i]) >= 2
               and full.text.count(pieces[i - 1][-2:] + pieces[i][:2]) == 1)
    before = "".join(pieces[:cut - 1]) + pieces[cut - 1][:-2]
    stop = pieces[cut - 1][-2:] + pieces[cut][:2]  # two characters of each of two tokens
    stopped = model.chat(QUESTION, **sampled, stop=["never appears", stop])
    assert stopped.text == before and stopped.finish_reason == "stop"
    assert stopped.token_ids == full.token_ids[:cut + 1] and stopped.completion_tokens == cut + 1
    stream = model.chat(QUESTION, **sampled, stop=[stop], stream=True)
    streamed = list(stream)
    assert "".join(streamed) == before == stream.result.text
    missing = model.chat(QUESTION, **sampled, stop=[stop[0] + "\u2603"])  # starts like the reply, never completes
    assert missing.text == full.text and missing.finish_reason == full.finish_reason


def test_streamed_text_equals_the_finished_text(model):
    for stop in (None, ["a"], ["e ", "ti"], [" "]):
        sampled = {"max_tokens": 20, "temperature": 1.1, "seed": 9, "stop": stop}
        whole = model.chat(QUESTION, **sampled)
        stream = model.chat(QUESTION, stream=True, **sampled)
        assert "".join(stream) == whole.text == stream.result.text, stop
        assert stream.result.token_ids == whole.token_ids


def test_the_cli_stops_at_a_stop_string(model, converted, capsys):
    from medgemma_gguf.cli import main

    sampled = {"max_tokens": 24, "temperature": 1.0, "seed": 5}
    full = model.chat(QUESTION, **sampled).text
    stop = full[4:7]
    expected = model.chat(QUESTION, **sampled, stop=[stop, "zzz"]).text
    assert expected == full[:full.index(stop)]
    args = ["chat", str(converted(VARIANT).text_path), "--prompt", QUESTION[0]["content"], "--threads", "1",
            "--ctx", "512", "--max-tokens", "24", "--temperature", "1", "--seed", "5", "--stop", stop, "--stop", "zzz"]
    assert main(args) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert main([*args, "--json"]) == 0
    reply = json.loads(capsys.readouterr().out)
    assert reply["text"] == expected and reply["finish_reason"] == "stop"
