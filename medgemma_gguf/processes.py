"""Child processes and loopback ports: the RPC server's engine process, and the servers and workers that
``bench/`` and the tests start.

``stop_process`` is what a terminal's Ctrl-C then ``kill -9`` does: SIGTERM (uvicorn and llama-server shut
down cleanly on it), a grace period, then SIGKILL, and the child is always reaped.
"""

from __future__ import annotations

import socket
import subprocess


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the kernel's choice for port 0), for a child to bind."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def stop_process(process: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM, up to ``timeout`` seconds to exit, then SIGKILL; reaped either way (nothing to do if it exited)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
