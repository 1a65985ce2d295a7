"""Patient data stays on this machine: the offline guard and the logging policy (README "Privacy").

Offline mode (``--offline``, ``MEDGEMMA_GGUF_OFFLINE=1``, ``enable_offline()``; ``serve`` always):

* sets the Hugging Face libraries' switches — ``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE``,
  ``HF_DATASETS_OFFLINE``, ``HF_HUB_DISABLE_TELEMETRY``, ``HF_HUB_DISABLE_UPDATE_CHECK``, ``DO_NOT_TRACK`` —
  in the environment (child processes inherit them) and in ``huggingface_hub.constants`` when it is already
  imported (it reads the environment once, at import), so a Hub id not in the cache is a clear error;
* installs a socket-level guard for the whole process: a ``sys.addaudithook`` hook on CPython's socket
  audit events (``socket.connect``, ``socket.sendto``, ``socket.sendmsg``, ``socket.getaddrinfo``,
  ``socket.gethostbyname``, ...) that raises ``OfflineError`` for any destination that is not this machine
  (loopback addresses, ``localhost``, Unix sockets) or a host the caller allowed (``allow_host``; exported
  in ``MEDGEMMA_GGUF_OFFLINE_ALLOW`` for child processes that turn offline mode on), and for
  any name lookup that would ask a DNS server. Every Python library goes through these calls, so no
  download, telemetry ping or update check can leave the process. Accepting connections (``serve``) is
  not affected. What the guard cannot see: sockets opened by native code directly (llama.cpp's own RPC
  client), and other programs on the machine.

Logging (``content_log``, ``SafeFormatter``): nothing a user sent or the model wrote — prompt text, reply
text, image bytes, file names of images — is logged at INFO or above. ``serve --log-content`` turns on the
``medgemma_gguf.content`` logger at DEBUG (prompts and replies); without it that logger is off whatever the
level. ``SafeFormatter`` writes a failure's traceback as file, line and function of each frame and the
exception's type, without the exception's message (which may quote a request), unless content logging is on.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import sys
import threading
import traceback
from collections.abc import Iterable
from typing import Any

from medgemma_gguf.errors import UserError

OFFLINE_ENV = "MEDGEMMA_GGUF_OFFLINE"
ALLOW_ENV = "MEDGEMMA_GGUF_OFFLINE_ALLOW"  # hosts allowed in offline mode, comma-separated (child processes)
# what each library reads (huggingface_hub, transformers, datasets; https://donottrack.sh)
OFFLINE_SWITCHES = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_UPDATE_CHECK": "1",
    "DO_NOT_TRACK": "1",
}
CONTENT_LOGGER = "medgemma_gguf.content"
_TRUE = ("1", "true", "yes", "on")
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}
# audit events whose arguments name a destination: (event, index of the address argument)
_ADDRESS_EVENTS = {"socket.connect": 1, "socket.sendto": 1, "socket.sendmsg": 1}
_NAME_EVENTS = {"socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex", "socket.gethostbyaddr"}


class OfflineError(UserError):
    """A network connection was attempted while offline mode is on."""

    http_status = 503


class _Guard:
    enforced = False
    installed = False
    allowed: set[str] = set()
    saved_env: dict[str, str | None] = {}
    lock = threading.Lock()


def offline_requested(environ: dict[str, str] | None = None) -> bool:
    """True when ``MEDGEMMA_GGUF_OFFLINE`` is set to 1/true/yes/on."""
    return (environ if environ is not None else os.environ).get(OFFLINE_ENV, "").strip().lower() in _TRUE


def is_offline() -> bool:
    """True while the guard is enforced in this process."""
    return _Guard.enforced


def enable_offline(allow: Iterable[str] = ()) -> None:
    """Turn offline mode on for this process (module docstring); ``allow``: hosts that may still be reached
    (e.g. RPC workers on the local network). Idempotent."""
    with _Guard.lock:
        inherited = [h for h in os.environ.get(ALLOW_ENV, "").split(",") if h.strip()]
        for host in [*inherited, *allow]:
            _Guard.allowed.add(_normal_host(host))
        if _Guard.enforced:
            _export_allowed()
            return
        _Guard.saved_env = {name: os.environ.get(name) for name in (*OFFLINE_SWITCHES, OFFLINE_ENV, ALLOW_ENV)}
        _export_allowed()
        os.environ.update(OFFLINE_SWITCHES)
        os.environ[OFFLINE_ENV] = "1"
        constants = sys.modules.get("huggingface_hub.constants")
        if constants is not None:  # read from the environment once, at import: set them where they live
            for name in ("HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY", "HF_HUB_DISABLE_UPDATE_CHECK"):
                if hasattr(constants, name):
                    setattr(constants, name, True)
        if not _Guard.installed:
            sys.addaudithook(_audit)  # audit hooks cannot be removed; ``disable_offline`` makes it inert
            _Guard.installed = True
        _Guard.enforced = True


def disable_offline() -> None:
    """Turn offline mode off again (the environment as it was before ``enable_offline``)."""
    with _Guard.lock:
        if not _Guard.enforced:
            return
        _Guard.enforced = False
        _Guard.allowed = set()
        for name, value in _Guard.saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        constants = sys.modules.get("huggingface_hub.constants")
        if constants is not None:
            for name in ("HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY", "HF_HUB_DISABLE_UPDATE_CHECK"):
                if hasattr(constants, name):
                    setattr(constants, name, os.environ.get(name, "").strip().lower() in _TRUE)


def allow_host(host: str) -> None:
    """Let offline mode reach ``host`` (a name or address), e.g. an RPC worker the user named; child processes
    that turn offline mode on inherit it (``MEDGEMMA_GGUF_OFFLINE_ALLOW``)."""
    with _Guard.lock:
        _Guard.allowed.add(_normal_host(host))
        if _Guard.enforced:
            _export_allowed()


def _export_allowed() -> None:
    if _Guard.allowed:
        os.environ[ALLOW_ENV] = ",".join(sorted(_Guard.allowed))


def _normal_host(host: Any) -> str:
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    return str(host).strip().strip("[]").lower().split("%")[0]


def _local(host: Any) -> bool:
    """True for this machine: loopback addresses and names, the unspecified address, allowed hosts."""
    if host is None:
        return True
    name = _normal_host(host)
    if name in ("", "0.0.0.0", "::") or name in _LOOPBACK_NAMES or name in _Guard.allowed:
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def _literal_address(host: Any) -> bool:
    try:
        ipaddress.ip_address(_normal_host(host))
        return True
    except ValueError:
        return False


def _audit(event: str, args: tuple[Any, ...]) -> None:
    """The offline guard (module docstring): refuse any destination beyond this machine."""
    if not _Guard.enforced or not event.startswith("socket."):
        return
    if event in _ADDRESS_EVENTS:
        address = args[_ADDRESS_EVENTS[event]] if len(args) > _ADDRESS_EVENTS[event] else None
        if address is None or isinstance(address, str | bytes):  # no address, or a Unix socket path
            return
        if isinstance(address, tuple) and address and not _local(address[0]):
            raise OfflineError(f"offline mode: refused a network connection to {address[0]} port "
                               f"{address[1] if len(address) > 1 else '?'}; nothing leaves this machine while "
                               f"--offline (or {OFFLINE_ENV}=1, or serve) is on")
    elif event in _NAME_EVENTS:
        host = args[0] if args else None
        if event == "socket.gethostbyaddr":
            if not _local(host):
                raise OfflineError(f"offline mode: refused a reverse DNS lookup of {_normal_host(host)}")
            return
        if _literal_address(host) or _local(host) or _normal_host(host) == socket.gethostname().lower():
            return  # no query leaves the machine (a literal address, this machine's own names)
        raise OfflineError(f"offline mode: refused to look up the address of {_normal_host(host)} (a DNS query "
                           f"leaves this machine); while --offline (or {OFFLINE_ENV}=1, or serve) is on, use local "
                           "files only")


# --- logging ---------------------------------------------------------------------------------------------


class _Content:
    enabled = False


def set_content_logging(enabled: bool) -> None:
    """Turn the content logger (``CONTENT_LOGGER``: prompts and replies, DEBUG) on or off for this process."""
    _Content.enabled = bool(enabled)
    logging.getLogger(CONTENT_LOGGER).setLevel(logging.DEBUG if enabled else logging.CRITICAL + 1)


def content_logging() -> bool:
    return _Content.enabled


def content_log(message: str, *args: Any) -> None:
    """Log request or reply content at DEBUG — only when ``set_content_logging(True)`` (``--log-content``)."""
    if _Content.enabled:
        logging.getLogger(CONTENT_LOGGER).debug(message, *args)


set_content_logging(False)


def loggable(value: Any, max_chars: int = 2000) -> str:
    """``value`` as one JSON-ish line for a content log: base64 data and data URIs replaced by their size."""
    import json

    def shrink(item: Any) -> Any:
        if isinstance(item, dict):
            return {key: shrink(child) for key, child in item.items()}
        if isinstance(item, list):
            return [shrink(child) for child in item]
        if isinstance(item, str) and (item.startswith("data:") or len(item) > 512 and " " not in item):
            return f"<{len(item)} characters of data>"
        return item

    text = json.dumps(shrink(value), ensure_ascii=False) if not isinstance(value, str) else value
    return text if len(text) <= max_chars else text[:max_chars] + f"... ({len(text)} characters)"


class ContentFilter(logging.Filter):
    """Drops content records (``CONTENT_LOGGER``) unless content logging is on — a handler-level backstop."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _Content.enabled or not record.name.startswith(CONTENT_LOGGER)


def describe_exception(exc_info: Any) -> str:
    """A traceback without any exception's message: each frame's file, line and function, the types (chained
    exceptions too). Messages may quote what a user sent; the frames are what a developer needs."""
    exc = exc_info[1] if isinstance(exc_info, tuple) else exc_info
    parts: list[str] = []
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        frames = traceback.extract_tb(exc.__traceback__)
        lines = [f'  File "{f.filename}", line {f.lineno}, in {f.name}' for f in frames]
        parts.insert(0, "\n".join(["Traceback (most recent call last):", *lines,
                                   f"{type(exc).__module__}.{type(exc).__qualname__} (message withheld: it may "
                                   "quote a request; serve --log-content shows it)"]))
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return "\n\nThe above exception led to the one below:\n\n".join(parts)


class SafeFormatter(logging.Formatter):
    """A formatter whose tracebacks carry no exception messages unless content logging is on. It never reuses
    or leaves behind ``record.exc_text`` (logging's cache, which another handler may have filled)."""

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_text
        record.exc_text = None
        try:
            return super().format(record)
        finally:
            record.exc_text = saved

    def formatException(self, ei: Any) -> str:  # noqa: N802 - logging's name
        return super().formatException(ei) if _Content.enabled else describe_exception(ei)


def safe_formatter_class(base: type[logging.Formatter]) -> type[logging.Formatter]:
    """``base`` (e.g. uvicorn's coloured formatter) with ``SafeFormatter``'s tracebacks."""
    return type(f"Safe{base.__name__}", (SafeFormatter, base), {})
