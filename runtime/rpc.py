"""llama.cpp's RPC backend (``ggml-rpc``): workers that lend their device to a model loaded on another machine.

A worker is llama.cpp's own RPC server (``ggml_backend_rpc_start_server``, what upstream's ``rpc-server`` tool
runs) started from the ``libggml-rpc`` that llama-cpp-python ships, so the worker and the client are always
the same llama.cpp build and speak the same protocol (``PROTOCOL``, from ``ggml-rpc.h``). ``medgemma-gguf
worker`` starts one (``serve_worker``); a model is split across workers with ``load(..., rpc=[...])``,
``chat --rpc`` or ``serve --rpc``.

Upstream calls it a proof of concept: no authentication, no encryption, and a worker executes whatever a
client sends. Bind a worker to loopback or a private link only (``--insecure-network`` is needed for any
other address). A worker serves one client at a time and frees that client's buffers when it disconnects.

llama.cpp's client ends the whole process (``GGML_ABORT``) when a worker cannot be reached, speaks another
protocol version, or stops answering mid-request. So this module checks each worker from Python first —
a TCP connection and the protocol's HELLO with the version check, then its devices' memory (``probe``) —
and the model that uses workers runs in a child process (``runtime.rpc_model``) so that the caller survives
a worker that dies later.

Wire format (``ggml/src/ggml-rpc/ggml-rpc.cpp``): a request is ``cmd (1 byte) | size (uint64 LE) | data``,
a reply ``size (uint64 LE) | data``. HELLO (14) sends 24 bytes of transport capabilities (zeros: plain TCP)
and gets ``major, minor, patch, pad, caps[24]``; the client refuses ``major != 7`` or a newer minor.
DEVICE_COUNT (15) answers a uint32; GET_DEVICE_MEMORY (11) takes a uint32 device and answers free and
total bytes (uint64 each; a CPU worker reports the machine's physical memory for both).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import struct
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from medgemma_gguf.errors import InputError, MismatchError, UnavailableError, setting
from medgemma_gguf.privacy import allow_host
from medgemma_gguf.sizes import format_size

PROTOCOL = (7, 0, 0)  # RPC_PROTO_{MAJOR,MINOR,PATCH}_VERSION of the vendored ggml-rpc.h
DEFAULT_PORT = 50052
PROBE_TIMEOUT_S = 10.0
MAX_WORKERS = 16  # GGML_RPC_MAX_SERVERS
_CMD_GET_DEVICE_MEMORY, _CMD_HELLO, _CMD_DEVICE_COUNT = 11, 14, 15
_CAPS_SIZE = 24  # RPC_CONN_CAPS_SIZE (transport.h)
UPSTREAM_WARNING = ("WARNING: Host ('{host}') is != '127.0.0.1'\n"
                    "         Never expose the RPC server to an open network!\n"
                    "         This is an experimental feature and is not secure!")


@dataclass(frozen=True)
class Endpoint:
    """A worker's address."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_endpoints(values: str | Iterable[str] | None) -> list[Endpoint]:
    """``HOST:PORT`` addresses, comma-separated and/or repeated (``--rpc a:1,b:2 --rpc c:3``); duplicates refused."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    endpoints: list[Endpoint] = []
    for value in values:
        if not isinstance(value, str):
            raise InputError(f"{setting('rpc')} takes HOST:PORT strings, got {value!r}")
        for item in value.split(","):
            item = item.strip()
            host, sep, port = item.rpartition(":")
            host = host.strip("[]")
            if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
                raise InputError(f"{setting('rpc')} {item!r} is not HOST:PORT (e.g. 192.168.1.20:{DEFAULT_PORT}); "
                                 "separate several with commas")
            endpoint = Endpoint(host, int(port))
            if endpoint in endpoints:
                raise InputError(f"{setting('rpc')} names the worker {endpoint} twice; list each worker once")
            endpoints.append(endpoint)
    if len(endpoints) > MAX_WORKERS:
        raise InputError(f"{setting('rpc')} names {len(endpoints)} workers; llama.cpp takes at most {MAX_WORKERS}")
    for endpoint in endpoints:  # workers the user named stay reachable in offline mode (and only they)
        allow_host(endpoint.host)
    return endpoints


# --- probing a worker from Python (never aborts) ----------------------------------------------------------


@dataclass(frozen=True)
class RemoteDevice:
    """One device a worker offers: its index on the worker and the memory it reports."""

    endpoint: Endpoint
    index: int
    free_bytes: int
    total_bytes: int


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker answered: its protocol version and its devices."""

    endpoint: Endpoint
    version: tuple[int, int, int]
    devices: tuple[RemoteDevice, ...]

    def describe(self) -> str:
        devices = ", ".join(f"device {d.index}: {format_size(d.free_bytes)} free of {format_size(d.total_bytes)}"
                            for d in self.devices)
        return f"worker {self.endpoint} (RPC {'.'.join(map(str, self.version))}): {devices}"


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed the connection")
        data += chunk
    return data


def _command(sock: socket.socket, cmd: int, payload: bytes, reply_size: int, what: str) -> bytes:
    sock.sendall(bytes([cmd]) + struct.pack("<Q", len(payload)) + payload)
    size = struct.unpack("<Q", _recv_exact(sock, 8))[0]
    if size != reply_size:
        raise ValueError(f"answered {what} with {size} bytes instead of {reply_size}")
    return _recv_exact(sock, reply_size)


def probe(endpoint: Endpoint, timeout: float = PROBE_TIMEOUT_S) -> WorkerInfo:
    """Connect to a worker, check its protocol version and ask its devices' memory; one clear error otherwise.

    ``UnavailableError``: nothing answers, or it does not answer in ``timeout`` seconds (a worker serves one
    client at a time: a busy one does not answer); ``MismatchError``: another program, or another
    protocol version.
    """
    fix_start = f"start it with: medgemma-gguf worker --host {endpoint.host} --port {endpoint.port}"
    try:
        sock = socket.create_connection((endpoint.host, endpoint.port), timeout=timeout)
    except TimeoutError:
        raise UnavailableError(f"RPC worker {endpoint} did not accept a connection within {timeout:g} s; check the "
                               "address and the network (firewall)") from None
    except OSError as exc:
        raise UnavailableError(f"cannot reach RPC worker {endpoint} ({exc.strerror or exc}); {fix_start}, or fix "
                               f"{setting('rpc')}") from None
    try:
        with sock:
            hello = _command(sock, _CMD_HELLO, bytes(_CAPS_SIZE), 4 + _CAPS_SIZE, "HELLO")
            version = (hello[0], hello[1], hello[2])
            if version[0] != PROTOCOL[0] or version[1] > PROTOCOL[1]:
                raise MismatchError(
                    f"RPC worker {endpoint} speaks protocol {'.'.join(map(str, version))}, this llama.cpp speaks "
                    f"{'.'.join(map(str, PROTOCOL))}; run the worker from the same medgemma-gguf install "
                    "(medgemma-gguf worker) or the same llama.cpp version")
            count = struct.unpack("<I", _command(sock, _CMD_DEVICE_COUNT, b"", 4, "DEVICE_COUNT"))[0]
            if count == 0:
                raise UnavailableError(f"RPC worker {endpoint} offers no device; start it with a device")
            devices = []
            for index in range(count):
                reply = _command(sock, _CMD_GET_DEVICE_MEMORY, struct.pack("<I", index), 16, "GET_DEVICE_MEMORY")
                free, total = struct.unpack("<QQ", reply)
                devices.append(RemoteDevice(endpoint, index, free, total))
            return WorkerInfo(endpoint, version, tuple(devices))
    except TimeoutError:
        raise UnavailableError(f"RPC worker {endpoint} accepted the connection but did not answer within "
                               f"{timeout:g} s: it is serving another client (a worker serves one at a time) or "
                               "is not a llama.cpp RPC worker") from None
    except (ValueError, ConnectionError) as exc:
        raise MismatchError(f"{endpoint} is not a llama.cpp RPC worker of protocol {PROTOCOL[0]}.x (it {exc}); "
                            f"check {setting('rpc')}, or {fix_start}") from None
    except OSError as exc:
        raise UnavailableError(f"RPC worker {endpoint} failed during the handshake ({exc.strerror or exc}); "
                               f"{fix_start}") from None


def probe_all(endpoints: Sequence[Endpoint], timeout: float = PROBE_TIMEOUT_S) -> list[WorkerInfo]:
    """``probe`` each worker in order (the first failure is raised)."""
    return [probe(endpoint, timeout) for endpoint in endpoints]


# --- llama.cpp's RPC backend through ctypes (only after probing) ------------------------------------------


def _lib_folder() -> Path:
    import llama_cpp

    return Path(llama_cpp.__file__).parent / "lib"


@cache
def _libs() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """libggml (device registry) and libggml-base (proc addresses) of the installed llama-cpp-python, declared."""
    import llama_cpp

    if not llama_cpp.llama_supports_rpc():
        raise UnavailableError("this llama-cpp-python build has no RPC backend; rebuild it with bash "
                               "scripts/setup.sh (which builds with -DGGML_RPC=ON)")
    from medgemma_gguf.devices import libggml

    ggml = libggml()
    folder = _lib_folder()
    base = ctypes.CDLL(str(next(iter(sorted(folder.glob("libggml-base.so*")) + sorted(
        folder.glob("libggml-base.dylib")) + sorted(folder.glob("ggml-base.dll"))))))
    ggml.ggml_backend_reg_by_name.argtypes = [ctypes.c_char_p]
    ggml.ggml_backend_reg_by_name.restype = ctypes.c_void_p
    ggml.ggml_backend_register.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_register.restype = None
    ggml.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    ggml.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    base.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    base.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    base.ggml_backend_reg_dev_count.argtypes = [ctypes.c_void_p]
    base.ggml_backend_reg_dev_count.restype = ctypes.c_size_t
    base.ggml_backend_reg_dev_get.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    base.ggml_backend_reg_dev_get.restype = ctypes.c_void_p
    return ggml, base


def _rpc_function(name: str, prototype: Any) -> Any:
    ggml, base = _libs()
    reg = ggml.ggml_backend_reg_by_name(b"RPC")
    address = base.ggml_backend_reg_get_proc_address(reg, name.encode()) if reg else None
    if not address:
        raise UnavailableError(f"llama.cpp's RPC backend has no {name}; reinstall llama-cpp-python with "
                               "bash scripts/setup.sh")
    return prototype(address)


_REGISTERED: dict[Endpoint, tuple[int, ...]] = {}


def register_workers(endpoints: Sequence[Endpoint], *, probed: bool = False) -> list[int]:
    """Add each worker's devices to llama.cpp's device registry (``ggml_backend_rpc_add_server`` then
    ``ggml_backend_register``, what llama.cpp's ``--rpc`` does); returns their ``ggml_backend_dev_t`` handles
    in order. Each worker is probed first unless ``probed`` (an unreachable one would abort the process).
    Registering an endpoint again returns the same devices."""
    import llama_cpp

    llama_cpp.llama_backend_init()
    if not probed:
        probe_all(endpoints)
    add_server = _rpc_function("ggml_backend_rpc_add_server", ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p))
    ggml, base = _libs()
    handles: list[int] = []
    for endpoint in endpoints:
        if endpoint not in _REGISTERED:
            reg = add_server(str(endpoint).encode())
            if not reg:
                raise UnavailableError(f"RPC worker {endpoint} offers no device; start it with a device")
            ggml.ggml_backend_register(reg)
            _REGISTERED[endpoint] = tuple(base.ggml_backend_reg_dev_get(reg, i)
                                          for i in range(base.ggml_backend_reg_dev_count(reg)))
        handles.extend(_REGISTERED[endpoint])
    return handles


def local_gpu_handles() -> list[int]:
    """``ggml_backend_dev_t`` handles of this machine's GPUs (RPC devices left out), in llama.cpp's order."""
    from medgemma_gguf.devices import GPU_TYPES, device_handles

    remote = {handle for handles in _REGISTERED.values() for handle in handles}
    return [handle for handle, kind in device_handles() if kind in GPU_TYPES and handle not in remote]


# --- the worker ---------------------------------------------------------------------------------------


def worker_devices(names: Sequence[str] = ()) -> list[tuple[int, str, str, int, int]]:
    """The devices a worker offers: ``names`` (ggml device names, e.g. CUDA0), else every GPU, else the CPU —
    upstream rpc-server's default. Each as (handle, name, description, free, total)."""
    from medgemma_gguf.devices import GPU_TYPES, describe_device, device_handles

    found = [(handle, describe_device(handle, kind)) for handle, kind in device_handles()]
    if names:
        chosen = []
        for name in names:
            match = [entry for entry in found if entry[1].name.lower() == name.lower()]
            if not match:
                raise InputError(f"no device named {name!r} here; this build has "
                                 f"{', '.join(device.name for _, device in found)}")
            chosen.append(match[0])
    else:
        chosen = ([entry for entry in found if entry[1].type in GPU_TYPES]
                  or [entry for entry in found if entry[1].type == "CPU"])
    return [(handle, device.name, device.description, device.free_bytes, device.total_bytes)
            for handle, device in chosen]


def check_worker_binding(host: str, insecure_network: bool) -> None:
    """Refuse a worker address beyond loopback unless ``insecure_network`` (``--insecure-network``)."""
    from medgemma_gguf.runtime.http_limits import is_loopback

    if not is_loopback(host) and not insecure_network:
        raise InputError(f"a worker on {host} lets anyone who can reach the port run code on this machine's device "
                         "(llama.cpp's RPC has no authentication or encryption); bind to 127.0.0.1 and tunnel, or "
                         f"pass {setting('insecure_network')} on a private network you trust")


def serve_worker(host: str = "127.0.0.1", port: int = DEFAULT_PORT, *, threads: int | None = None,
                 cache_dir: Path | None = None, devices: Sequence[str] = (), insecure_network: bool = False,
                 announce: Callable[[str], object] = print) -> None:
    """Run llama.cpp's RPC server for this machine's devices until the process is stopped (never returns).

    ``cache_dir``: keep weights the client sent (by hash) so a later load sends only hashes (upstream's
    ``--cache``). Ctrl-C / SIGTERM end the process: the server loop is native code that never returns.
    """
    check_worker_binding(host, insecure_network)
    if not 1 <= port <= 65535:
        raise InputError(f"the worker port must be 1-65535, got {port}")
    chosen = worker_devices(devices)
    if cache_dir is not None:
        cache_dir = Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
    endpoint = str(Endpoint(host, port))
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as test:  # a clear error, not a silent exit
        test.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            test.bind((host, port))
        except OSError as exc:
            raise UnavailableError(f"cannot listen on {endpoint} ({exc.strerror or exc}); choose another "
                                   f"{setting('worker_port')} or stop what uses it") from None
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(UPSTREAM_WARNING.format(host=host), file=sys.stderr, flush=True)
    offered = "; ".join(f"{name}: {description} ({format_size(free)} free of {format_size(total)})"
                        for _, name, description, free, total in chosen)
    announce(f"medgemma-gguf worker on {endpoint}, RPC protocol {'.'.join(map(str, PROTOCOL))}, offering {offered}"
             + (f"; weight cache {cache_dir}" if cache_dir else ""))
    sys.stdout.flush()
    start = _rpc_function("ggml_backend_rpc_start_server", ctypes.CFUNCTYPE(
        None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p)))
    array = (ctypes.c_void_p * len(chosen))(*(d[0] for d in chosen))
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # the native loop never returns to Python's handler
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.environ.setdefault("GGML_NO_BACKTRACE", "1")
    n_threads = threads or max(1, (os.cpu_count() or 2) // 2)
    start(endpoint.encode(), str(cache_dir).encode() if cache_dir else None, n_threads, len(chosen), array)
    raise UnavailableError(f"llama.cpp's RPC server stopped on {endpoint} (see the lines above); check the address")
