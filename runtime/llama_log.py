"""llama.cpp's and libmtmd's log lines routed to Python logging (one callback per process), and
``native_errors`` to collect what a short native call reports (its log lines and its own stderr output).

llama.cpp logs through ``llama_log_set``'s callback or, before one is set, to stderr; libmtmd has its own
two setters. Levels (ggml_log_level): 2 INFO, 3 WARN, 4 ERROR, 5 CONT; only WARN and ERROR surface.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
import tempfile
from collections.abc import Iterator

import llama_cpp
import llama_cpp.mtmd_cpp as mtmd

log = logging.getLogger(__name__)


# llama.cpp warnings that are expected for Gemma 3 and need no action from the user: logged at DEBUG
EXPECTED_LLAMA_WARNINGS = (
    "llama_kv_cache_iswa: using full-size SWA cache",  # asked for with swa_full=True (--swa-full)
)


_CAPTURED: list[str] | None = None  # set by native_errors()
_RECORDED: list[str] | None = None  # set by record_log(): every line, also forwarded


@llama_cpp.llama_log_callback
def _forward_log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
    message = text.decode("utf-8", errors="replace").rstrip()
    if not message:
        return
    if _RECORDED is not None:
        _RECORDED.append(message)
    if _CAPTURED is not None and level in (3, 4):
        _CAPTURED.append(message)
        return
    python_level = logging.WARNING if level == 3 else logging.ERROR if level == 4 else logging.DEBUG
    if python_level == logging.WARNING and message.startswith(EXPECTED_LLAMA_WARNINGS):
        python_level = logging.DEBUG
    log.log(python_level, message)


_LOGGING_ROUTED = False


def route_llama_logs() -> None:
    """Send llama.cpp / libmtmd log lines to Python logging instead of stderr (once per process)."""
    global _LOGGING_ROUTED
    if not _LOGGING_ROUTED:
        llama_cpp.llama_log_set(_forward_log, ctypes.c_void_p(0))
        mtmd.mtmd_log_set(_forward_log, ctypes.c_void_p(0))
        mtmd.mtmd_helper_log_set(_forward_log, ctypes.c_void_p(0))
        _LOGGING_ROUTED = True


@contextlib.contextmanager
def native_errors() -> Iterator[list[str]]:
    """Collect what llama.cpp reports while the block runs — its warning and error log lines (not logged)
    and what it prints to stderr itself (the grammar parser does) — into the list it yields.

    For short calls whose failure is explained only there (``llama_sampler_init_grammar``); stderr output of
    other threads during the call lands in the list too.
    """
    global _CAPTURED
    route_llama_logs()
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as spool:
        os.dup2(spool.fileno(), 2)
        _CAPTURED = lines
        try:
            yield lines
        finally:
            _CAPTURED = None
            os.dup2(saved, 2)
            os.close(saved)
            spool.seek(0)
            lines += spool.read().decode("utf-8", errors="replace").splitlines()


@contextlib.contextmanager
def record_log() -> Iterator[list[str]]:
    """Every llama.cpp log line while the block runs, INFO included (they are still forwarded to Python
    logging): what ``runtime.engine.Allocations`` reads llama.cpp's buffer sizes from."""
    global _RECORDED
    route_llama_logs()
    lines: list[str] = []
    _RECORDED = lines
    try:
        yield lines
    finally:
        _RECORDED = None


def restore_llama_log_routing() -> None:
    """Route llama.cpp's log lines to Python logging again after a caller installed its own callback."""
    llama_cpp.llama_log_set(_forward_log, ctypes.c_void_p(0))
