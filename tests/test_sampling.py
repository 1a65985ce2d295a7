"""runtime.sampling: one validation for every interface, the model's defaults from general.sampling.*, and
llama.cpp's sampler chain — settings change the reply as documented, seeds reproduce it."""

from __future__ import annotations

import math

import pytest

from medgemma_gguf.errors import InputError, UserError
from medgemma_gguf.runtime.sampling import (
    GEMMA3_SAMPLING,
    ModelSampling,
    model_sampling,
    sampling_settings,
    settings_from_request,
)

VARIANT = "mm-deep"
QUESTION = [{"role": "user", "content": "What is the normal adult resting heart rate?"}]

# (keyword arguments, the setting the error must name) — every kind of bad value in one table
BAD_SETTINGS = [
    ({"top_k": -1}, "top_k"),
    ({"top_k": 10**30}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"top_k": True}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"min_p": -0.1}, "min_p"),
    ({"min_p": math.nan}, "min_p"),
    ({"top_p": 1.01}, "top_p"),
    ({"top_p": -math.inf}, "top_p"),
    ({"temperature": 5e-324}, "temperature"),
    ({"temperature": float("1e400")}, "temperature"),
    ({"temperature": 10**400}, "temperature"),
    ({"temperature": 1e300}, "temperature"),
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"repeat_penalty": 0}, "repeat_penalty"),
    ({"repeat_penalty": 11}, "repeat_penalty"),
    ({"repeat_penalty": math.inf}, "repeat_penalty"),
    ({"repeat_last_n": -2}, "repeat_last_n"),
    ({"repeat_last_n": 10**20}, "repeat_last_n"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"frequency_penalty": False}, "frequency_penalty"),
    ({"seed": 2**40}, "seed"),
    ({"seed": -2}, "seed"),
    ({"seed": False}, "seed"),
    ({"seed": 1.5}, "seed"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 10**100}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 1000}}, "logit_bias"),
    ({"logit_bias": {"5": math.nan}}, "logit_bias"),
    ({"logit_bias": {-1: 5}}, "logit_bias"),
    ({"logit_bias": [1, 2, 3]}, "logit_bias"),
]

CLI_FLAGS = {"top_k": "--top-k", "min_p": "--min-p", "top_p": "--top-p", "temperature": "--temperature",
             "repeat_penalty": "--repeat-penalty", "repeat_last_n": "--repeat-last-n",
             "presence_penalty": "--presence-penalty", "frequency_penalty": "--frequency-penalty",
             "seed": "--seed", "max_tokens": "--max-tokens", "logit_bias": "--logit-bias"}


@pytest.mark.parametrize(("arguments", "name"), BAD_SETTINGS, ids=[f"{k}={v!r:.20}" for k, v in
                                                                   (next(iter(a.items())) for a, _ in BAD_SETTINGS)])
def test_every_bad_setting_is_one_clear_error_per_interface(arguments, name):
    with pytest.raises(InputError) as caught:
        sampling_settings(**arguments)
    error = caught.value
    assert str(error).startswith(f"{name} must ") or f"{name} keys must" in str(error), str(error)
    assert error.for_cli().startswith(CLI_FLAGS[name]) and error.for_http().startswith(f"'{name}'")
    assert error.http_status == 400 and error.exit_code == 2
    assert "\n" not in str(error) and len(str(error)) < 200


def test_good_settings_pass_and_none_means_unset():
    settings = sampling_settings(temperature=0.7, top_k=40, top_p=0.9, min_p=0.05, repeat_penalty=1.1,
                                 repeat_last_n=-1, presence_penalty=-2, frequency_penalty=2.0, seed=0,
                                 logit_bias={"12": -100, 7: 3.5}, max_tokens=2**31 - 1)
    assert settings.logit_bias == ((7, 3.5), (12, -100.0)) and settings.seed == 0
    assert sampling_settings(seed=-1).seed is None and sampling_settings(seed=None).seed is None
    assert sampling_settings(temperature=None, max_tokens=None) == sampling_settings()
    assert sampling_settings(temperature=1e-3).temperature == 1e-3 and sampling_settings(top_p=0).top_p == 0


def test_a_sampled_request_takes_the_models_values_for_what_it_leaves_unset():
    text_model = ModelSampling(top_k=20, top_p=0.8, min_p=0.1, repeat_penalty=1.2)
    greedy = sampling_settings().resolve(text_model)
    assert (greedy.top_k, greedy.top_p, greedy.min_p, greedy.repeat_penalty) == (0, 1.0, 0.0, 1.0)
    sampled = sampling_settings(temperature=1.0, top_p=0.5).resolve(text_model)
    assert (sampled.top_k, sampled.top_p, sampled.min_p, sampled.repeat_penalty) == (20, 0.5, 0.1, 1.2)
    assert sampled.repeat_last_n == 64
    third_party = model_sampling({"general.architecture": "gemma3"})
    assert third_party == GEMMA3_SAMPLING and (third_party.top_k, third_party.top_p) == (64, 0.95)
    damaged = model_sampling({"general.sampling.top_k": -3, "general.sampling.top_p": 0.5})
    assert damaged.top_k is None and damaged.top_p == 0.5


def test_request_fields_map_to_the_same_validation():
    settings = settings_from_request({"max_tokens": 9, "max_completion_tokens": 12, "temperature": 0.5, "top_k": 3,
                                      "seed": None, "logit_bias": {"4": 2}, "repeat_penalty": 1.3},
                                     default_max_tokens=100)
    assert (settings.max_tokens, settings.temperature, settings.top_k, settings.seed) == (12, 0.5, 3, None)
    assert settings.logit_bias == ((4, 2.0),) and settings.repeat_penalty == 1.3
    assert settings_from_request({}, default_max_tokens=100).max_tokens == 100
    with pytest.raises(InputError) as caught:
        settings_from_request({"top_k": -1}, default_max_tokens=100)
    assert caught.value.for_http().startswith("'top_k' must be a whole number >= 0")


def test_generation_config_becomes_general_sampling_keys():
    from medgemma_gguf.convert.metadata import sampling_defaults

    assert sampling_defaults({"top_k": 64, "top_p": 0.95, "do_sample": True}) == {
        "general.sampling.top_k": 64, "general.sampling.top_p": 0.95}
    assert sampling_defaults({"temperature": 0.6, "repetition_penalty": 1.05, "min_p": 0.01}) == {
        "general.sampling.temp": 0.6, "general.sampling.penalty_repeat": 1.05, "general.sampling.min_p": 0.01}
    assert sampling_defaults({"top_k": -1, "top_p": "x", "temperature": True, "min_p": 2}) == {}


def test_the_cli_refuses_bad_settings_before_loading(tmp_path, capsys):
    from medgemma_gguf.cli import main

    text_model = str(tmp_path / "not-loaded.gguf")  # never opened: the settings are checked first
    for args, message in [(["--top-k", "-1"], "error: --top-k must be a whole number >= 0 (0 = off), got -1"),
                          (["--temperature", "5e-324"], "error: --temperature must be 0 (greedy) or between"),
                          (["--temperature", "1e400"], "error: --temperature must be 0 (greedy) or between"),
                          (["--min-p", "nan"], "error: --min-p must be between 0 and 1"),
                          (["--repeat-penalty", "0"], "error: --repeat-penalty must be between 0.1 and 10"),
                          (["--seed", "99999999999999999999"], "error: --seed must be a whole number"),
                          (["--logit-bias", "12=500"], "error: --logit-bias must be between -100 and 100")]:
        assert main(["chat", text_model, "--prompt", "x", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(message), err
    assert main(["chat", text_model, "--prompt", "x", "--logit-bias", "twelve"]) == 2
    assert "TOKEN_ID=BIAS" in capsys.readouterr().err
    assert main(["chat", text_model, "--prompt", "x", *[f"--stop={c}" for c in "abcde"]]) == 2
    assert "error: --stop takes at most 4 stop strings, got 5" in capsys.readouterr().err
    assert main(["chat", text_model, "--prompt", "x", "--stop", ""]) == 2
    assert "error: --stop strings must not be empty" in capsys.readouterr().err
    assert main(["chat", text_model, "--prompt", "x", "--logit-bias", "twelve"]) == 2
    assert "TOKEN_ID=BIAS" in capsys.readouterr().err


# --- the chain on a real model -----------------------------------------------------------------------------


def test_converted_gguf_carries_medgemmas_sampling_defaults_for_llama_cpp(files, text_model):
    import ctypes

    import llama_cpp

    assert text_model.sampling_defaults.source == "the GGUF's general.sampling keys"
    assert text_model.sampling_defaults.top_k == 64 and text_model.sampling_defaults.top_p == pytest.approx(0.95)
    buffer = ctypes.create_string_buffer(64)
    llama_model = llama_cpp.llama_get_model(text_model.engine.llama_context)
    for key, expected in (("general.sampling.top_k", 64), ("general.sampling.top_p", 0.95)):
        assert llama_cpp.llama_model_meta_val_str(llama_model, key.encode(), buffer, len(buffer)) > 0
        assert float(buffer.value) == pytest.approx(expected)  # what llama-server reads at load
    assert llama_cpp.llama_model_meta_val_str(llama_model, b"general.sampling.temp", buffer, len(buffer)) < 0


def test_top_k_1_and_min_p_1_are_greedy(text_model):
    greedy = text_model.chat(QUESTION, max_tokens=16).token_ids
    assert text_model.chat(QUESTION, max_tokens=16, temperature=1.0, top_k=1, seed=3).token_ids == greedy
    assert text_model.chat(QUESTION, max_tokens=16, temperature=1.0, min_p=1.0, seed=3).token_ids == greedy
    assert text_model.chat(QUESTION, max_tokens=16, temperature=1.0, seed=3).token_ids != greedy


def test_penalties_change_a_repetitive_reply(text_model):
    greedy = text_model.chat(QUESTION, max_tokens=16).token_ids
    assert max(greedy.count(t) for t in greedy) >= 8  # the tiny model repeats itself
    for penalty in ({"repeat_penalty": 1.5}, {"presence_penalty": 2.0}, {"frequency_penalty": 2.0}):
        reply = text_model.chat(QUESTION, max_tokens=16, **penalty).token_ids
        assert reply != greedy and max(reply.count(t) for t in reply) < 8, penalty
    assert text_model.chat(QUESTION, max_tokens=16, repeat_penalty=1.5, repeat_last_n=0).token_ids == greedy  # off


def test_logit_bias_forces_and_bans_tokens(text_model):
    greedy = text_model.chat(QUESTION, max_tokens=6).token_ids
    banned = text_model.chat(QUESTION, max_tokens=6, logit_bias={greedy[0]: -100}).token_ids
    assert greedy[0] not in banned
    forced = text_model.chat(QUESTION, max_tokens=4, logit_bias={"77": 100}).token_ids
    assert forced == [77] * 4
    with pytest.raises(UserError, match=r"logit_bias names token 5000, but the vocabulary has 1088 tokens"):
        text_model.chat(QUESTION, logit_bias={5000: 1})


def test_unset_top_k_and_top_p_take_the_models_values(text_model):
    sampled = {"max_tokens": 12, "temperature": 1.0, "seed": 11}
    default = text_model.chat(QUESTION, **sampled).token_ids
    assert text_model.chat(QUESTION, **sampled, top_k=64, top_p=0.95).token_ids == default
    assert text_model.chat(QUESTION, **sampled, top_k=0, top_p=1.0).token_ids != default


def test_seeds_reproduce_and_differ(text_model):
    sampled = {"max_tokens": 12, "temperature": 1.2}
    first = text_model.chat(QUESTION, **sampled, seed=1).token_ids
    assert text_model.chat(QUESTION, **sampled, seed=1).token_ids == first
    assert text_model.chat(QUESTION, **sampled, seed=2).token_ids != first
    unseeded = {tuple(text_model.chat(QUESTION, **sampled).token_ids) for _ in range(3)}
    assert len(unseeded) > 1  # no seed: a fresh one each time


def test_the_readme_decoding_commands_use_real_chat_options():
    import re
    import shlex
    from pathlib import Path

    from medgemma_gguf.runtime.cli import chat_command

    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Decoding"):readme.index("## Imaging studies")]
    commands = [shlex.split(line) for line in re.findall(r"^medgemma-gguf chat [^\n]*", section, flags=re.MULTILINE)]
    assert len(commands) == 5
    known = {opt for param in chat_command.params for opt in param.opts}
    for words in commands:
        flags = {w for w in words if w.startswith("--")}
        assert flags <= known, flags - known
        chat_command.make_context("chat", words[2:], resilient_parsing=True)
    for block in re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL):
        compile(block, "README.md", "exec")
    for name, flag in CLI_FLAGS.items():  # every setting is documented with its flag
        assert f"`{name}" in section and f"`{flag}" in section, name
