"""A model split across RPC workers, run in a child process: ``load(..., rpc=["host:port", ...]) -> RpcChatModel``.

llama.cpp's RPC client ends its process when a worker dies mid-request or stops answering (``runtime.rpc``),
so the model that uses workers lives in a child process (``multiprocessing``, spawned) and the caller talks
to it through a pipe: ``RpcChatModel.chat`` sends the messages and settings and receives the reply's pieces
as they come. When the child ends unexpectedly the request fails with ``UnavailableError`` naming the
workers that no longer answer, and the calling process carries on (a chat session, a server, a notebook).

Before anything is loaded each worker is probed from this process (a TCP connection, the protocol's HELLO and
version check, its devices' memory), and the split is planned from the memory they report
(``runtime.offload.plan_split``: layers in proportion to each device's free memory, the output layer on the
last device, the input layer and the mmproj local). The child registers the workers (``ggml_backend_rpc_add_server``),
and loads the model with llama.cpp's device list and ``tensor_split`` (RPC devices first, then local GPUs, as
llama.cpp orders them).

``load`` here is the public ``medgemma_gguf.load``: without ``rpc`` it is ``runtime.chat.load``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from medgemma_gguf import errors
from medgemma_gguf.errors import InputError, UnavailableError, UserError, setting
from medgemma_gguf.runtime.chat import (
    ChatModel,
    ChatResult,
    ChatStream,
    ModelFiles,
    _gpu_layers,
    context_settings,
    resolve_model_files,
)
from medgemma_gguf.runtime.chat import load as load_local
from medgemma_gguf.runtime.images import DEFAULT_MAX_PIXELS
from medgemma_gguf.runtime.lora import LoraFile, LoraSpec
from medgemma_gguf.runtime.offload import SplitPlan, SplitTarget, plan_split, read_vision_model
from medgemma_gguf.runtime.reply import Delta
from medgemma_gguf.runtime.rpc import Endpoint, WorkerInfo, parse_endpoints, probe, probe_all
from medgemma_gguf.sizes import parse_size

log = logging.getLogger(__name__)

LOAD_TIMEOUT_S = 3600.0  # sending a 27B model's weights over a slow link takes a while


def load(model: str | Path, mmproj: str | Path | None = None, *, rpc: str | Sequence[str] | None = None,
         **options: Any) -> ChatModel | RpcChatModel:
    """``runtime.chat.load`` (same arguments), or with ``rpc`` (``"host:port"`` strings, comma-separated or a
    list) a model split across those workers and this machine's devices, in a child process
    (``RpcChatModel``). Every worker is checked first: one unreachable, of another protocol version or not a
    llama.cpp worker is an ``UnavailableError`` / ``MismatchError`` before anything loads."""
    endpoints = parse_endpoints(rpc)
    if not endpoints:
        return load_local(model, mmproj, **options)
    return RpcChatModel(model, mmproj, endpoints=endpoints, **options)


# --- planning and loading (shared by the engine process and serve's) -------------------------------------


@dataclass(frozen=True)
class SplitSetup:
    """The checked workers, the files and the split, decided in the calling process before anything loads."""

    endpoints: tuple[Endpoint, ...]
    workers: tuple[WorkerInfo, ...]
    files: ModelFiles
    plan: SplitPlan


def prepare_split(model: str | Path, mmproj: str | Path | None, endpoints: Sequence[Endpoint], *,
                  n_gpu_layers: str | int = "auto", n_ctx: int = 4096, vram: str | int | None = None,
                  quant: str | None = None, n_parallel: int = 1, **context: Any) -> SplitSetup:
    """Probe every worker (``runtime.rpc.probe``), choose the files, and plan the split from the memory the
    workers and this machine's GPUs report (RPC devices first, local GPUs last, as llama.cpp orders them).
    ``context``: ``load``'s context arguments (``swa_full``, ``kv_type``, ``kv_type_k``, ``kv_type_v``,
    ``flash_attn``, ``n_ubatch``); ``n_ctx="auto"`` is refused (the workers' memory is not this machine's)."""
    if n_ctx == "auto":
        raise InputError(f"{setting('n_ctx')} auto plans for this machine's memory; with {setting('rpc')} give the "
                         "context as a number of tokens")
    settings = context_settings(n_ctx, n_parallel=n_parallel, **context)
    n_gpu = _gpu_layers(n_gpu_layers)
    workers = probe_all(endpoints)
    vram_bytes = parse_size(vram) if isinstance(vram, str) else vram
    files = resolve_model_files(model, mmproj, quant=quant, n_ctx=settings.n_ctx, vram_bytes=vram_bytes,
                                settings=settings)
    from medgemma_gguf.devices import gpu_devices

    local = gpu_devices()
    remote = [(w, d) for w in workers for d in w.devices]
    targets = [SplitTarget(f"RPC{k} on {d.endpoint}" + (f" (device {d.index})" if len(w.devices) > 1 else ""),
                           d.free_bytes, remote=True) for k, (w, d) in enumerate(remote)]
    if local and vram_bytes is not None and len(local) == 1:
        targets.append(SplitTarget(f"{local[0].name} (local)", vram_bytes))
    else:
        targets += [SplitTarget(f"{d.name} (local)", d.free_bytes) for d in local]
    if files.mmproj_path is not None and not context.get("n_ubatch"):  # as load() does: an image in one micro-batch
        image_tokens = read_vision_model(files.mmproj_path).n_image_tokens or 0
        settings = settings.with_(n_ubatch=max(settings.n_ubatch, image_tokens))
    plan = plan_split(files.model_path, targets, mmproj_path=files.mmproj_path, local_gpu=bool(local),
                      n_gpu_layers=None if n_gpu == "auto" else int(n_gpu), settings=settings)
    log.info("split plan:\n%s", plan.describe())
    return SplitSetup(tuple(endpoints), tuple(workers), files, plan)


def load_split(setup: SplitSetup, **options: Any) -> ChatModel:
    """Register the workers and load the model split across them IN THIS PROCESS (``runtime.chat.load``'s other
    options): a worker that dies later ends this process (llama.cpp aborts). ``RpcChatModel`` and
    ``serve --rpc`` call it in a process of its own."""
    from medgemma_gguf.devices import gpu_devices
    from medgemma_gguf.runtime.rpc import local_gpu_handles, register_workers

    os.environ["GGML_NO_BACKTRACE"] = "1"  # llama.cpp's abort: one line, no debugger attached
    local = local_gpu_handles()
    remote = register_workers(setup.endpoints, probed=True)
    n_gpu_layers = setup.plan.n_gpu_layers
    model = load_local(setup.files.model_path, setup.files.mmproj_path, n_gpu_layers=n_gpu_layers,
                       devices=remote + local, tensor_split=setup.plan.tensor_split,
                       mmproj_gpu=bool(gpu_devices()) and n_gpu_layers > 0, **options)
    model.name, model.choice_note, model.mmproj_note = setup.files.name, setup.files.choice_note, \
        setup.files.mmproj_note
    model.plan = setup.plan
    return model


# --- the child ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Ready:
    """What the parent needs to know of the loaded model."""

    n_ctx: int
    has_vision: bool
    image_size: int | None
    image_tokens: int
    adapters: tuple[LoraFile, ...]


def _error_payload(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, UserError):
        return type(exc).__name__, exc.template
    return "", f"{type(exc).__name__}: {exc}"


def _child_main(conn: Connection, setup: SplitSetup, options: dict[str, Any]) -> None:
    """Runs in the engine process (``runtime.rpc_engine``): load the split model, then answer requests until
    told to close. Its stderr goes to a file the parent quotes when the process ends."""
    try:
        model = load_split(setup, **options)
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the parent as one line
        conn.send(("error", *_error_payload(exc)))
        return
    conn.send(("ready", _Ready(model.n_ctx, model.has_vision, model.image_size, model.image_tokens,
                               tuple(model.adapters))))
    with model:
        while True:
            try:
                request = conn.recv()
            except EOFError:
                return
            kind = request[0]
            if kind == "close":
                return
            if kind == "reset":
                model.reset()
                conn.send(("done",))
                continue
            if kind == "cancel":  # arrived after its reply ended
                continue
            _, messages, chat_options = request
            try:
                stream = model.chat(messages, stream=True, **chat_options)
                assert isinstance(stream, ChatStream)
                for channel, text in stream.deltas():
                    conn.send(("delta", channel, text))
                    if conn.poll():  # the parent stopped reading
                        message = conn.recv()
                        if message[0] == "cancel":
                            stream.close()
                            break
                conn.send(("result", stream.result))
            except BaseException as exc:  # noqa: BLE001
                conn.send(("error", *_error_payload(exc)))


def _rebuild_error(kind: str, template: str) -> Exception:
    cls = getattr(errors, kind, None) if kind else None
    if isinstance(cls, type) and issubclass(cls, UserError):
        return cls(template)
    return RuntimeError(template)


# --- the parent -----------------------------------------------------------------------------------------


class RpcChatModel:
    """A model split across RPC workers, running in a child process; ``chat`` as ``ChatModel.chat``.

    ``plan`` is the split (``describe()`` prints it); ``workers`` what each worker reported. When a worker dies
    the request raises ``UnavailableError``, ``alive`` turns False, and the model must be loaded again.
    """

    def __init__(self, model: str | Path, mmproj: str | Path | None = None, *, endpoints: Sequence[Endpoint],
                 n_gpu_layers: str | int = "auto", n_ctx: int = 4096, vram: str | int | None = None,
                 n_threads: int | None = None, quant: str | None = None, allow_local_files: bool = True,
                 max_image_pixels: int = DEFAULT_MAX_PIXELS, window: tuple[float, float] | None = None,
                 lora: Sequence[LoraSpec] | None = None, n_parallel: int = 1, **context: Any):
        self.endpoints = list(endpoints)
        context.pop("lazy_context", None)  # the engine process creates its context at load
        setup = prepare_split(model, mmproj, self.endpoints, n_gpu_layers=n_gpu_layers, n_ctx=n_ctx, vram=vram,
                              quant=quant, n_parallel=n_parallel, **context)
        self.workers, self.plan, files = list(setup.workers), setup.plan, setup.files
        self.name, self.choice_note, self.mmproj_note = files.name, files.choice_note, files.mmproj_note
        self.model_path, self.mmproj_path = files.model_path, files.mmproj_path
        self.allow_local_files, self.max_image_pixels, self.window = allow_local_files, max_image_pixels, window
        options = {"n_ctx": n_ctx, "n_threads": n_threads, "allow_local_files": allow_local_files,
                   "max_image_pixels": max_image_pixels, "window": window, "lora": lora, "n_parallel": n_parallel,
                   **context}
        handle, self._stderr_path = tempfile.mkstemp(prefix="medgemma-gguf-rpc-", suffix=".log")
        parent_socket, child_socket = socket.socketpair()
        env = dict(os.environ, GGML_NO_BACKTRACE="1")
        self._closed = False
        self._busy = False
        self.alive = True
        with child_socket:  # a fresh interpreter: no re-import of the caller's __main__ (multiprocessing's spawn does)
            self._process = subprocess.Popen(
                [sys.executable, "-m", "medgemma_gguf.runtime.rpc_engine", str(child_socket.fileno())],
                pass_fds=(child_socket.fileno(),), stdin=subprocess.DEVNULL, stdout=handle, stderr=handle, env=env)
        os.close(handle)
        self._conn = Connection(parent_socket.detach())
        self._conn.send((setup, options))
        try:
            ready = self._receive(LOAD_TIMEOUT_S, during="while loading the model")
        except BaseException:
            self.close()
            raise
        if ready[0] == "error":
            self.close()
            raise _rebuild_error(ready[1], ready[2])
        info: _Ready = ready[1]
        self.n_ctx, self.has_vision = info.n_ctx, info.has_vision
        self.image_size, self.image_tokens, self.adapters = info.image_size, info.image_tokens, list(info.adapters)

    # the child's pipe --------------------------------------------------------------------------------
    def _child_output(self) -> str:
        """llama.cpp's last error line from the child's stderr (its abort reason)."""
        try:
            lines = [line.strip() for line in Path(self._stderr_path).read_text(errors="replace").splitlines()]
        except OSError:
            return ""
        meaningful = [line for line in lines if line and not line.startswith(("#", "[New LWP", "ptrace"))]
        for words in (("RPC", "GGML_ABORT", "GGML_ASSERT"), ("error", "failed")):  # ggml_abort's line first
            for line in reversed(meaningful):
                if any(word in line or word in line.lower() for word in words):
                    return re.sub(r"^\S+:\d+: ", "", line)  # ggml_abort's file:line prefix
        return meaningful[-1] if meaningful else ""

    def _lost(self, during: str) -> UnavailableError:
        self.alive = False
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(timeout=5)
        down = []
        for endpoint in self.endpoints:
            try:
                probe(endpoint, timeout=2.0)
            except UserError:
                down.append(str(endpoint))
        reason = self._child_output()
        who = (f"RPC worker {', '.join(down)} stopped answering" if down else
               "the engine process using the RPC workers ended")
        return UnavailableError(
            f"{who} {during} (llama.cpp's RPC client ended the engine: exit code {self._process.returncode}"
            + (f", '{reason}'" if reason else "") + "); restart the worker and load the model again")

    def _receive(self, timeout: float | None, *, during: str) -> tuple:
        try:
            if not self._conn.poll(timeout):
                raise UnavailableError(f"the RPC engine did not answer within {timeout:g} s {during}")
            return self._conn.recv()
        except (EOFError, ConnectionError, OSError):
            raise self._lost(during) from None

    def _check_usable(self) -> None:
        if self._closed:
            raise UserError("this model was closed; load it again")
        if not self.alive:
            raise UnavailableError("an RPC worker of this model stopped answering earlier; restart the worker and "
                                   f"load the model again ({setting('rpc')})")

    # ChatModel's interface ---------------------------------------------------------------------------
    image_options = ChatModel.image_options
    no_vision_error = ChatModel.no_vision_error

    def chat(self, messages: Sequence[Mapping[str, Any]], *, stream: bool = False,
             **options: Any) -> ChatResult | ChatStream:
        """``ChatModel.chat`` run in the engine process; a worker that dies ends it with ``UnavailableError``."""
        self._check_usable()
        if self._busy:
            raise UserError("this model is answering another request; finish or close that stream first")
        try:
            self._conn.send(("chat", list(messages), options))
        except (BrokenPipeError, OSError):
            raise self._lost("while sending a request") from None
        replies = ChatStream(self._deltas())
        return replies if stream else replies.collect()

    def _deltas(self) -> Generator[Delta, None, ChatResult]:
        self._busy = True
        finished = False
        try:
            while True:
                message = self._receive(None, during="during a reply")
                if message[0] == "delta":
                    yield message[1], message[2]
                elif message[0] == "result":
                    finished = True
                    return message[1]
                else:
                    finished = True
                    raise _rebuild_error(message[1], message[2])
        finally:
            if not finished and self.alive:  # closed early: stop the child and drain what it sent meanwhile
                try:
                    self._conn.send(("cancel",))
                    while (message := self._receive(None, during="during a reply"))[0] == "delta":
                        pass
                except UserError:
                    pass
            self._busy = False

    def reset(self) -> None:
        """Forget the cached conversation."""
        self._check_usable()
        try:
            self._conn.send(("reset",))
        except (BrokenPipeError, OSError):
            raise self._lost("while resetting") from None
        self._receive(None, during="while resetting")

    def close(self) -> None:
        """Stop the engine process (the workers free this client's buffers when it disconnects)."""
        if self._closed:
            return
        self._closed = True
        if self._process.poll() is None:
            with contextlib.suppress(BrokenPipeError, OSError):
                self._conn.send(("close",))
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._conn.close()
        with contextlib.suppress(OSError):
            os.unlink(self._stderr_path)

    def __enter__(self) -> RpcChatModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if hasattr(self, "_process"):
            self.close()



def serve_parent(fd: int) -> None:
    """The engine process's main: read the load request from ``fd`` and run ``_child_main``."""
    conn = Connection(fd)
    try:
        request = conn.recv()
    except EOFError:
        return
    _child_main(conn, *request)
