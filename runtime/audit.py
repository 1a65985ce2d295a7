"""The server's audit log (``serve --audit-log FILE``): one JSON line per HTTP request, no content.

Each line: ``time`` (arrival, UTC ISO 8601), ``request_id`` (the ``X-Request-Id`` the client got), ``client``
(address), ``method``, ``path`` (no query string), ``key_id`` (``sha256:`` and the first 12 hex digits of the
API key's SHA-256 when the request presented the server's key; null without one — never the key),
``model`` (the id the reply ran with), ``prompt_tokens``, ``completion_tokens``, ``status`` and
``duration_ms`` (to the last byte of the reply, streams included). Never a prompt, a reply, an image or a
file name.

The file is opened append-only (``O_APPEND``, mode 0600 when created) and rotated by size like
``logging.handlers.RotatingFileHandler``: when a line would take it past ``max_bytes`` it becomes
``FILE.1`` (``FILE.1`` becomes ``FILE.2``, ... up to ``backups`` files; the oldest is deleted).
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from medgemma_gguf.errors import UserError, setting

DEFAULT_AUDIT_MAX_BYTES = 10 * 1024**2
DEFAULT_AUDIT_BACKUPS = 5
AUDIT_STATE_KEY = "audit"  # request.scope["state"][AUDIT_STATE_KEY]: what the endpoint adds (model, tokens)


def key_id(api_key: str) -> str:
    """The audit log's name for an API key: not the key, not enough to recover it."""
    return "sha256:" + hashlib.sha256(api_key.encode()).hexdigest()[:12]


class AuditLog:
    """An append-only JSON-lines file rotated by size (module docstring); safe to write from any thread."""

    def __init__(self, path: Path, *, max_bytes: int = DEFAULT_AUDIT_MAX_BYTES, backups: int = DEFAULT_AUDIT_BACKUPS):
        if max_bytes < 1024:
            raise UserError(f"the audit log's size limit must be at least 1024 bytes, got {max_bytes}")
        if backups < 0:
            raise UserError(f"the audit log's backups must be 0 or more, got {backups}")
        self.path = Path(path).expanduser()
        self.max_bytes = max_bytes
        self.backups = backups
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._open()

    def _open(self) -> None:
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        except OSError as exc:
            folder = Path(self.path).parent
            if not folder.is_dir():
                raise UserError(f"cannot open the audit log {self.path}: its folder {folder} does not exist; create "
                                f"it (mkdir -p {folder}) or choose another file for {setting('audit_log')}") from exc
            raise UserError(f"cannot open the audit log {self.path} ({exc.strerror}); choose a writable file for "
                            f"{setting('audit_log')}") from exc

    def _rotate(self) -> None:
        assert self._fd is not None
        os.close(self._fd)
        self._fd = None
        if self.backups == 0:
            os.truncate(self.path, 0)  # nothing kept: start the file again
        else:
            for index in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{index}")
                if older.exists():
                    os.replace(older, self.path.with_name(f"{self.path.name}.{index + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._open()

    def write(self, entry: dict[str, Any]) -> None:
        line = (json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        with self._lock:
            if self._fd is None:
                return
            size = os.fstat(self._fd).st_size
            if size and size + len(line) > self.max_bytes:
                self._rotate()
            os.write(self._fd, line)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


class AuditMiddleware:
    """ASGI middleware writing one ``AuditLog`` line per HTTP request (module docstring)."""

    def __init__(self, app: Any, log: AuditLog, api_key: str | None):
        self.app = app
        self.log = log
        self.api_key = api_key
        self.key_id = key_id(api_key) if api_key else None

    def _key_of(self, scope: dict[str, Any]) -> str | None:
        if self.api_key is None:
            return None
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                    return self.key_id
        return None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        arrived = datetime.datetime.now(datetime.UTC)
        started = time.monotonic()
        status: list[int] = []

        async def watched(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status.append(int(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            state = scope.get("state") or {}
            extra = state.get(AUDIT_STATE_KEY) or {}
            client = scope.get("client")
            self.log.write({
                "time": arrived.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "request_id": state.get("request_id"),
                "client": client[0] if client else None,
                "method": scope.get("method"),
                "path": scope.get("path"),
                "key_id": self._key_of(scope),
                "model": extra.get("model"),
                "prompt_tokens": extra.get("prompt_tokens"),
                "completion_tokens": extra.get("completion_tokens"),
                "status": status[0] if status else None,  # None: the client left before any answer
                "duration_ms": round((time.monotonic() - started) * 1000, 1),
            })
