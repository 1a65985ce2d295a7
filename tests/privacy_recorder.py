"""An independent witness for the privacy tests: runs ``medgemma-gguf`` in a child process with an audit hook
installed before anything else is imported, recording every socket the process creates, binds or connects,
every name lookup, and every file it opens for writing, creates, renames or removes (CPython's audit events:
https://docs.python.org/3/library/audit_events.html). The product's own offline guard is another hook; this
one is installed first, so an attempt is recorded even when the guard refuses it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RECORD_ENV = "PRIVACY_RECORD"
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_SOCKET_EVENTS = {"socket.bind": 1, "socket.connect": 1, "socket.sendto": 1, "socket.sendmsg": 1}
_LOOKUPS = {"socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex", "socket.gethostbyaddr"}
_PATH_EVENTS = {"os.mkdir": 0, "os.remove": 0, "os.rmdir": 0, "os.truncate": 0, "os.symlink": 1,
                "os.link": 1, "os.rename": 1, "shutil.copyfile": 1, "shutil.make_archive": 0}


def install(record_path: str) -> None:
    out = open(record_path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - open for the process's life

    def note(**entry) -> None:
        out.write(json.dumps(entry) + "\n")

    def path_of(value) -> str | None:
        if isinstance(value, int):
            return None  # a file descriptor
        try:
            return os.path.abspath(os.fsdecode(value))
        except TypeError:
            return None

    def hook(event: str, args: tuple) -> None:
        if event == "socket.__new__":
            note(e="socket", family=int(args[1]))
        elif event in _SOCKET_EVENTS:
            address = args[_SOCKET_EVENTS[event]] if len(args) > _SOCKET_EVENTS[event] else None
            note(e=event, address=repr(address))
        elif event in _LOOKUPS:
            note(e=event, host=repr(args[0] if args else None))
        elif event == "open":
            path, mode, flags = (list(args) + [None, None])[:3]
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & _WRITE_FLAGS)
            where = path_of(path) if path is not None else None
            if writes and where is not None:
                note(e="write", path=where)
        elif event in _PATH_EVENTS:
            where = path_of(args[_PATH_EVENTS[event]]) if len(args) > _PATH_EVENTS[event] else None
            if where is not None:
                note(e=event, path=where)
        elif event == "os.replace":
            where = path_of(args[1])
            if where is not None:
                note(e=event, path=where)

    sys.addaudithook(hook)


LAUNCHER = (
    f"import os, sys; sys.path.insert(0, {str(HERE)!r}); import privacy_recorder; "
    f"privacy_recorder.install(os.environ[{RECORD_ENV!r}]); "
    "from medgemma_gguf.cli import main; sys.exit(main(sys.argv[1:]))"
)


def command(args: list[str]) -> list[str]:
    """The argv of ``medgemma-gguf ARGS`` under the recorder."""
    return [sys.executable, "-c", LAUNCHER, *args]


def run(args: list[str], record: Path, *, env: dict[str, str], cwd: Path,
        timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(command(args), cwd=cwd, env={**env, RECORD_ENV: str(record)}, capture_output=True,
                          text=True, timeout=timeout)


def events(record: Path) -> list[dict]:
    if not record.exists():
        return []
    return [json.loads(line) for line in record.read_text(encoding="utf-8").splitlines() if line.strip()]
