"""medgemma_gguf.errors: one message, worded for the interface that shows it."""

from __future__ import annotations

import pytest

from medgemma_gguf.errors import SETTINGS, ExistsError, ResourceError, UserError, setting
from medgemma_gguf.hub import resolve_source


def test_a_setting_is_named_in_each_interfaces_words() -> None:
    error = ResourceError(f"the prompt needs 700 positions but the context holds 512; raise {setting('n_ctx')}")
    assert str(error) == error.for_python() == "the prompt needs 700 positions but the context holds 512; raise n_ctx"
    assert error.for_cli().endswith("raise --ctx")
    assert error.for_http().endswith("raise the server's context size (serve --ctx)")
    assert "--" not in SETTINGS["max_tokens"].http and "--" not in SETTINGS["temperature"].python


def test_user_text_is_never_taken_for_a_setting() -> None:
    error = UserError("file {n_ctx}.gguf and {{x}} are\n   missing")
    assert str(error) == error.for_cli() == error.for_http() == "file {n_ctx}.gguf and {{x}} are missing"


def test_unknown_settings_are_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown setting 'ctx_size'"):
        setting("ctx_size")


def test_kinds_carry_exit_code_and_http_status() -> None:
    assert (UserError("x").exit_code, UserError("x").http_status) == (2, 400)
    assert ExistsError("x").http_status == 409 and issubclass(ExistsError, UserError)


def test_the_cli_prints_its_own_words(tmp_path, capsys) -> None:
    from medgemma_gguf.cli import main

    with pytest.raises(UserError) as caught:
        resolve_source(str(tmp_path), revision="v1")
    assert str(caught.value).startswith("revision applies")
    (tmp_path / "config.json").write_text("{}")
    code = main(["convert", str(tmp_path), "--outdir", str(tmp_path / "out"), "--revision", "v1"])
    assert code == 2 and "error: --revision applies to Hub repo ids only" in capsys.readouterr().err
