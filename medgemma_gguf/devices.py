"""The compute devices llama.cpp's ggml backends registered (which are GPUs, their memory) and which llama.cpp
build runs.

``llama_supports_gpu_offload()`` is also True for a CPU-only build with the RPC backend compiled in
(llama.cpp's ``llama_supports_gpu_offload`` counts ``llama_supports_rpc()``), so it cannot tell whether
this machine has a GPU. ggml's device registry can: ``ggml_backend_dev_type`` says CPU, GPU, IGPU
(integrated) or ACCEL. llama-cpp-python does not bind the registry, so it is called through ctypes on
the ``libggml`` it ships.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

# enum ggml_backend_dev_type (ggml/include/ggml-backend.h)
DEVICE_TYPES = ("CPU", "GPU", "IGPU", "ACCEL", "META")
GPU_TYPES = ("GPU", "IGPU")  # dedicated or integrated: what llama.cpp offloads layers to


@dataclass(frozen=True)
class Device:
    """One ggml backend device."""

    name: str
    description: str
    type: str  # one of DEVICE_TYPES
    free_bytes: int
    total_bytes: int

    @property
    def is_gpu(self) -> bool:
        return self.type in GPU_TYPES


def _shipped_library(stem: str) -> ctypes.CDLL:
    """One of the ggml libraries llama-cpp-python ships (``libggml``, ``libggml-base``)."""
    import llama_cpp

    folder = Path(llama_cpp.__file__).parent / "lib"
    candidates = sorted(folder.glob(f"lib{stem}.so*")) + sorted(folder.glob(f"lib{stem}.dylib")) + sorted(
        folder.glob(f"{stem}.dll"))
    if not candidates:
        raise OSError(f"lib{stem} not found in {folder}")
    return ctypes.CDLL(str(candidates[0]))


@cache
def libggml() -> ctypes.CDLL:
    """llama-cpp-python's libggml with the device functions typed (``runtime.rpc`` adds its own)."""
    lib = _shipped_library("ggml")
    lib.ggml_backend_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    lib.ggml_backend_dev_get.restype = ctypes.c_void_p
    for name in ("ggml_backend_dev_name", "ggml_backend_dev_description"):
        getattr(lib, name).argtypes = [ctypes.c_void_p]
        getattr(lib, name).restype = ctypes.c_char_p
    lib.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_type.restype = ctypes.c_int
    lib.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                                            ctypes.POINTER(ctypes.c_size_t)]
    lib.ggml_backend_dev_memory.restype = None
    return lib


def device_handles() -> Iterator[tuple[int, str]]:
    """Each registered device's ``ggml_backend_dev_t`` handle and type (one of ``DEVICE_TYPES``), in llama.cpp's
    order (loads llama.cpp's backends first). Cheap: no memory query, which is a network round trip to an RPC
    worker's device (``describe_device`` makes it)."""
    import llama_cpp

    llama_cpp.llama_backend_init()
    lib = libggml()
    for index in range(lib.ggml_backend_dev_count()):
        handle = lib.ggml_backend_dev_get(index)
        kind = lib.ggml_backend_dev_type(handle)
        yield handle, DEVICE_TYPES[kind] if 0 <= kind < len(DEVICE_TYPES) else str(kind)


def describe_device(handle: int, kind: str) -> Device:
    """The device behind a handle from ``device_handles``: name, description and memory
    (``ggml_backend_dev_memory``, a round trip for an RPC device)."""
    lib = libggml()
    free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
    lib.ggml_backend_dev_memory(handle, ctypes.byref(free), ctypes.byref(total))
    return Device(name=(lib.ggml_backend_dev_name(handle) or b"").decode(),
                  description=(lib.ggml_backend_dev_description(handle) or b"").decode(),
                  type=kind, free_bytes=free.value, total_bytes=total.value)


def list_devices() -> list[Device]:
    """Every device the installed llama.cpp build registered (loads llama.cpp's backends first)."""
    return [describe_device(handle, kind) for handle, kind in device_handles()]


def gpu_devices() -> list[Device]:
    """The GPUs (dedicated or integrated) llama.cpp can offload to; empty on a CPU-only build."""
    return [device for device in list_devices() if device.is_gpu]


@dataclass(frozen=True)
class LlamaBuild:
    """Which llama.cpp runs: llama-cpp-python's version, ggml's version and commit, the CPU features compiled in."""

    llama_cpp_python: str
    ggml_version: str
    ggml_commit: str
    system_info: str


@cache
def llama_build() -> LlamaBuild:
    """The installed llama.cpp build: ``ggml_version``/``ggml_commit`` (libggml-base), ``llama_print_system_info``."""
    import llama_cpp

    version = commit = "unknown"
    try:
        base = _shipped_library("ggml-base")
        for name in ("ggml_version", "ggml_commit"):
            getattr(base, name).restype = ctypes.c_char_p
        version = (base.ggml_version() or b"unknown").decode()
        commit = (base.ggml_commit() or b"unknown").decode()
    except (OSError, AttributeError):  # an older build without the two functions
        pass
    info = (llama_cpp.llama_print_system_info() or b"").decode(errors="replace").strip().rstrip("|").strip()
    return LlamaBuild(llama_cpp_python=str(getattr(llama_cpp, "__version__", "unknown")), ggml_version=version,
                      ggml_commit=commit, system_info=info)
