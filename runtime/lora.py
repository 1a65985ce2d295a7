"""GGUF LoRA adapters at run time: check a file against the base model before llama.cpp sees it, and
choose which adapters a request runs with.

Checking. ``llama_adapter_lora_init`` returns NULL for an adapter it cannot use (and llama-cpp-python's
``Llama`` then crashes at the first decode), so every file is read here first, header only: GGUF LoRA
(``general.type = adapter``, ``adapter.type = lora``), the base's architecture, ``.lora_a``/``.lora_b``
pairs, each naming a base tensor, with llama.cpp's shape rules (``base.ne[0] == a.ne[0]``,
``base.ne[1] == b.ne[1]``, ``a.ne[1] == b.ne[0]``). Vision-tower tensors (``v.*``, ``mm.*``) are refused:
libmtmd runs the mmproj and cannot apply LoRA, so such an adapter must be merged (``convert --adapter``).
The engine still checks llama.cpp's answer for NULL.

Applying. llama.cpp computes ``W·x + scale · alpha / r · B·(A·x)`` per adapted matrix; adapters stack.
Scale 0 leaves the base model (llama.cpp drops zero-scale adapters). The set belongs to the context and
is replaced whole (``llama_set_adapters_lora``); the KV cache is not invalidated by llama.cpp, so the
engine clears it on every change (a cached prefix was computed with the previous set).

Model ids (the server's ``model`` field, ``GET /v1/models``): with a model named ``M`` and adapters
``a``, ``b`` loaded (each at its scale):

* ``M`` — the default set: every adapter given at load time (``--lora``), at its scale; the base when none;
* ``M+a``, ``M+a+b`` — exactly those adapters;
* ``M+base`` — no adapter.

Any other id (OpenAI clients send their own) gets the default set; an id ``M+x`` naming an adapter that
is not loaded is refused (404) with the list. Requests are served one at a time, each with its own set;
a server that batches requests must batch only those with the same set, as llama-server does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from medgemma_gguf.errors import InputError, MismatchError, NotFoundError, setting
from medgemma_gguf.gguf_info import GgufInfo, read_gguf_info

BASE_ID = "base"
SEPARATOR = "+"
VISION_PREFIXES = ("v.", "mm.")


@dataclass(frozen=True)
class LoraFile:
    """A checked GGUF LoRA adapter: ``name`` (its ``general.name``, else the file name), the scale it is
    applied with by default, and its ``adapter.lora.alpha``."""

    name: str
    path: Path
    scale: float
    alpha: float
    n_pairs: int


LoraSpec = str | Path | tuple[str | Path, float]


def parse_lora_specs(lora: Sequence[LoraSpec] | None) -> list[tuple[Path, float]]:
    """``lora`` as given to ``load``: paths (scale 1) or ``(path, scale)`` pairs."""
    if lora is None:
        return []
    if isinstance(lora, str | Path) or (isinstance(lora, tuple) and len(lora) == 2
                                        and isinstance(lora[1], int | float) and not isinstance(lora[1], bool)):
        lora = [lora]
    specs = []
    for item in lora:
        path, scale = (item if isinstance(item, tuple) else (item, 1.0))
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
            raise InputError(f"{setting('lora')}: the scale of {path} must be a finite number, got {scale!r}")
        specs.append((Path(path), float(scale)))
    return specs


def _pairs(info: GgufInfo) -> dict[str, dict[str, tuple[int, ...]]]:
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    for tensor in info.tensors:
        base, _, half = tensor.name.rpartition(".")
        if half in ("lora_a", "lora_b"):
            pairs.setdefault(base, {})[half] = tensor.shape
        elif not tensor.name.endswith("_norm.weight"):  # llama.cpp skips norm vectors in adapters
            raise MismatchError(f"{info.path} holds {tensor.name}, which is not a LoRA tensor (.lora_a/.lora_b); "
                                "it is not a llama.cpp LoRA adapter")
    return pairs


def check_lora_file(path: Path, scale: float, base: GgufInfo) -> LoraFile:
    """The adapter at ``path`` if llama.cpp can apply it to ``base`` (the text GGUF's header); one clear
    error otherwise, before anything is loaded."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"LoRA adapter {path} not found; check the path given to {setting('lora')}")
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise InputError(f"{path} is not a GGUF file; convert a PEFT adapter with `medgemma-gguf convert-adapter` "
                             f"and pass the .gguf to {setting('lora')}")
    info = read_gguf_info(path)
    meta = info.metadata
    if meta.get("general.type") != "adapter" or meta.get("adapter.type") != "lora":
        kind = meta.get("adapter.type") or meta.get("general.type") or info.architecture or "unknown"
        raise MismatchError(f"{path} is not a LoRA adapter (it is a {kind} GGUF); {setting('lora')} takes files "
                            "written by `medgemma-gguf convert-adapter` (or llama.cpp's convert_lora_to_gguf.py)")
    if info.architecture != base.architecture:
        raise MismatchError(f"{path} is a LoRA adapter for {info.architecture or 'an unknown architecture'}, but "
                            f"{base.path.name} is {base.architecture}; use an adapter made for this base model")
    if meta.get("adapter.alora.invocation_tokens"):
        raise InputError(f"{path} is an activated LoRA (aLoRA), which this runtime does not apply; merge the "
                         "adapter with `medgemma-gguf convert BASE --adapter ADAPTER`")
    pairs = _pairs(info)
    if not pairs:
        raise MismatchError(f"{path} holds no LoRA tensors; re-convert the adapter")
    vision = sorted(name for name in pairs if name.startswith(VISION_PREFIXES))
    if vision:
        raise InputError(f"{path} adapts the vision tower ({vision[0]}, …); llama.cpp cannot apply LoRA to the mmproj "
                         "at run time: merge the adapter instead, with `medgemma-gguf convert BASE --adapter ADAPTER`")
    for name, halves in sorted(pairs.items()):
        if set(halves) != {"lora_a", "lora_b"}:
            raise MismatchError(f"{path} has only {next(iter(halves))} for {name}; the adapter file is damaged, "
                                "re-convert it")
        target = base.tensor(name)
        if target is None:
            raise MismatchError(f"{path} adapts {name}, which {base.path.name} does not have; the adapter was made "
                                "for another base model")
        a, b = halves["lora_a"], halves["lora_b"]
        if len(a) != 2 or len(b) != 2 or target.shape[0] != a[0] or target.shape[1] != b[1] or a[1] != b[0]:
            raise MismatchError(f"{path}: {name} is {list(target.shape)} in {base.path.name} but the adapter's "
                                f"matrices are {list(a)} and {list(b)}; the adapter was made for another base model")
    name = str(meta.get("general.name") or path.stem)
    return LoraFile(name, path, scale, float(meta.get("adapter.lora.alpha") or 0.0), len(pairs))


def check_lora_files(specs: Sequence[tuple[Path, float]], model_path: Path) -> list[LoraFile]:
    """Every adapter checked against the text GGUF at ``model_path``; names must differ (they are ids)."""
    if not specs:
        return []
    base = read_gguf_info(model_path)
    files = [check_lora_file(path, scale, base) for path, scale in specs]
    names = [f.name for f in files]
    for name in names:
        if names.count(name) > 1:
            raise InputError(f"two LoRA adapters are named {name!r}; each needs its own name (re-convert one with "
                             "`convert-adapter --name`)")
        if name == BASE_ID or SEPARATOR in name:
            raise InputError(f"a LoRA adapter cannot be named {name!r} (reserved in model ids); re-convert it with "
                             "`convert-adapter --name`")
    return files


class ModelIds:
    """The model ids of one loaded model and its adapters (see the module docstring)."""

    def __init__(self, model_name: str, adapters: Sequence[LoraFile], default: Sequence[str] | None = None):
        self.model_name = model_name
        self.adapters = {a.name: a for a in adapters}
        self.default = tuple(default) if default is not None else tuple(self.adapters)

    def listed(self) -> list[str]:
        """``M``, then ``M+base`` and ``M+<adapter>`` for each adapter (only ``M`` without adapters)."""
        if not self.adapters:
            return [self.model_name]
        return [self.model_name, *(SEPARATOR.join((self.model_name, n)) for n in (BASE_ID, *self.adapters))]

    def reply_id(self, requested: str | None) -> str:
        """The id a reply names: the requested one when it chose adapters (``M+…``), else ``M``."""
        prefix = self.model_name + SEPARATOR
        return requested if isinstance(requested, str) and requested.startswith(prefix) else self.model_name

    def resolve(self, requested: str | None) -> tuple[str, ...]:
        """The adapter names a request's ``model`` id selects."""
        prefix = self.model_name + SEPARATOR
        if not isinstance(requested, str) or not requested.startswith(prefix):
            return self.default
        names = requested[len(prefix):].split(SEPARATOR)
        if names == [BASE_ID]:
            return ()
        unknown = [n for n in names if n not in self.adapters]
        if unknown or len(set(names)) != len(names):
            raise NotFoundError(f"model {requested!r} is not served: {', '.join(unknown) or 'an adapter'} "
                                f"{'is' if len(unknown) == 1 else 'are'} not a loaded adapter (or named twice); "
                                f"use one of {', '.join(self.listed())}")
        return tuple(names)
