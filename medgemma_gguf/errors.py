"""The errors users see: one line naming the problem and the fix, worded for the interface it reaches.

Every error a user can cause is a ``UserError`` (or a subclass saying what kind it is). Its message names
a setting with ``setting(name)``, ``name`` a key of ``SETTINGS``; each interface renders it in its own
words, so a Python caller reads ``n_ctx``, a shell user ``--ctx`` and an HTTP client the request field or
"the server's context size" — never a flag it cannot pass:

    raise ResourceError(f"the prompt needs {n} positions but the context holds {m}; raise {setting('n_ctx')}")

* ``str(error)`` / ``error.for_python()``: the Python API's words (what ``load()`` and ``chat()`` raise);
* ``error.for_cli()``: the command line's (``medgemma-gguf`` prints ``error: <line>``, exits ``exit_code``);
* ``error.for_http()``: an HTTP client's (the server answers ``http_status`` with it).

``setting`` returns a marker made of private-use characters, so text the user typed (a file name, a
value) is never mistaken for a setting. A message without markers reads the same everywhere.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Spelling:
    """How one setting is named on each interface."""

    cli: str
    python: str
    http: str


# setting -> its name per interface (CLI flag, Python argument, HTTP request field or server-side wording)
SETTINGS: dict[str, Spelling] = {
    "n_ctx": Spelling("--ctx", "n_ctx", "the server's context size (serve --ctx)"),
    "mmproj": Spelling("--mmproj", "mmproj", "the server's mmproj (serve --mmproj)"),
    "quant": Spelling("--quant", "quant", "the server's quant (serve --quant)"),
    "vram": Spelling("--vram", "vram", "the server's GPU memory budget (serve --vram)"),
    "n_gpu_layers": Spelling("--n-gpu-layers", "n_gpu_layers", "the server's GPU layers (serve --n-gpu-layers)"),
    "n_threads": Spelling("--threads", "n_threads", "the server's threads (serve --threads)"),
    "window": Spelling("--window", "window", "'window'"),
    "allow_local_files": Spelling("--allow-local-files", "allow_local_files",
                                  "local files (start serve with --allow-local-files)"),
    "max_tokens": Spelling("--max-tokens", "max_tokens", "'max_tokens'"),
    "max_completion_tokens": Spelling("--max-tokens", "max_tokens", "'max_completion_tokens'"),
    "temperature": Spelling("--temperature", "temperature", "'temperature'"),
    "top_p": Spelling("--top-p", "top_p", "'top_p'"),
    "top_k": Spelling("--top-k", "top_k", "'top_k'"),
    "min_p": Spelling("--min-p", "min_p", "'min_p'"),
    "repeat_penalty": Spelling("--repeat-penalty", "repeat_penalty", "'repeat_penalty'"),
    "repeat_last_n": Spelling("--repeat-last-n", "repeat_last_n", "'repeat_last_n'"),
    "presence_penalty": Spelling("--presence-penalty", "presence_penalty", "'presence_penalty'"),
    "frequency_penalty": Spelling("--frequency-penalty", "frequency_penalty", "'frequency_penalty'"),
    "logit_bias": Spelling("--logit-bias", "logit_bias", "'logit_bias'"),
    "seed": Spelling("--seed", "seed", "'seed'"),
    "stop": Spelling("--stop", "stop", "'stop'"),
    "json_schema": Spelling("--json-schema", "json_schema", "the JSON schema ('response_format')"),
    "grammar": Spelling("--grammar", "grammar", "'grammar'"),
    "response_format": Spelling("--json-schema", "json_schema", "'response_format'"),
    "think": Spelling("--think", "think=True", "'reasoning_effort'"),
    "system": Spelling("--system", "system", "the system message"),
    "preset": Spelling("--preset", "preset", "'preset'"),
    "image": Spelling("--image", "an image content part", "an image content part"),
    "outdir": Spelling("--outdir", "outdir", "'outdir'"),
    "force": Spelling("--force", "force=True", "'force'"),
    "imatrix": Spelling("--imatrix", "imatrix", "'imatrix'"),
    "no_imatrix": Spelling("--no-imatrix", "imatrix=\"none\"", "'imatrix': 'none'"),
    "split_max_size": Spelling("--split-max-size", "split_max_size", "'split_max_size'"),
    "quants": Spelling("--quants", "quants", "'quants'"),
    "recipe": Spelling("--recipe", "recipe_files", "'recipe'"),
    "token": Spelling("--token", "token", "a Hugging Face token"),
    "revision": Spelling("--revision", "revision", "'revision'"),
    "target_bpw": Spelling("--target-bpw", "target_bpw", "'target_bpw'"),
    "target_size": Spelling("--target-size", "target_size", "'target_size'"),
    "cache_dir": Spelling("--cache-dir", "cache_dir", "'cache_dir'"),
    "report": Spelling("--report", "report", "'report'"),
    "auto_ctx": Spelling("--ctx", "ctx", "'ctx'"),
    "vram_budget": Spelling("--vram", "vram", "'vram'"),
    "max_chunks": Spelling("--chunks", "max_chunks", "'chunks'"),
    "imatrix_chunks": Spelling("--imatrix-chunks", "imatrix_chunks", "'imatrix_chunks'"),
    "slices": Spelling("--slice", "slices", "'slices'"),
    "max_items": Spelling("--max-items", "max_items", "'max_items'"),
    "eval_outdir": Spelling("--out", "outdir", "'outdir'"),
    "reference_mmproj": Spelling("--reference-mmproj", "reference_mmproj", "'reference_mmproj'"),
    "volume_slices": Spelling("--slices", "slices", "the volume item's 'slices'"),
    "windows": Spelling("--windows", "windows", "the volume item's 'windows'"),
    "modality": Spelling("--modality", "modality", "the volume item's 'modality'"),
    "series": Spelling("--series", "series", "the volume item's 'series'"),
    "patches": Spelling("--patches", "patches", "the slide item's 'patches'"),
    "magnification": Spelling("--magnification", "magnification", "the slide item's 'magnification'"),
    "mpp": Spelling("--mpp", "mpp", "the slide item's 'mpp'"),
    "max_images": Spelling("--max-images", "max_images", "the server's image limit (serve --max-images)"),
    "max_image_pixels": Spelling("--max-image-pixels", "max_image_pixels",
                                 "the server's pixel limit (serve --max-image-pixels)"),
    "allow_dir": Spelling("--allow-dir", "allowed_roots", "a folder the server allows (serve --allow-dir)"),
    "prior": Spelling("--prior", "prior", "the longitudinal item's 'prior'"),
    "coverage": Spelling("--coverage", "coverage", "'coverage'"),
    "full_vocab": Spelling("--full-vocab", "full_vocab=True", "'full_vocab'"),
    "data_dir": Spelling("--data-dir", "data_dir (or local_dir)", "'data_dir'"),
    "adapter": Spelling("--adapter", "adapter", "'adapter'"),
    "adapter_revision": Spelling("--adapter-revision", "adapter_revision", "'adapter_revision'"),
    "base": Spelling("--base", "base", "'base'"),
    "adapter_outtype": Spelling("--outtype", "outtype", "'outtype'"),
    "lora": Spelling("--lora", "lora", "the server's adapters (serve --lora)"),
    "model_id": Spelling("--lora", "adapters", "'model'"),
    "api_key": Spelling("--api-key", "api_key", "the server's API key (serve --api-key)"),
    "insecure_no_auth": Spelling("--insecure-no-auth", "insecure_no_auth=True",
                                 "the server's --insecure-no-auth"),
    "check_memory": Spelling("--memory", "memory_bytes", "'memory'"),
    "greedy_tokens": Spelling("--greedy-tokens", "greedy_tokens", "'greedy_tokens'"),
    "header_timeout": Spelling("--header-timeout", "header_timeout_s", "the server's header timeout"),
    "body_timeout": Spelling("--body-timeout", "body_timeout_s", "the server's body timeout"),
    "parallel": Spelling("--parallel", "n_parallel", "the server's parallel slots (serve --parallel)"),
    "batch_parallel": Spelling("--parallel", "parallel", "batch's parallel lines (batch --parallel)"),
    "queue": Spelling("--queue", "queue_size", "the server's queue (serve --queue)"),
    "request_timeout": Spelling("--request-timeout", "request_timeout", "the server's time limit per request "
                                "(serve --request-timeout)"),
    "audit_log": Spelling("--audit-log", "audit_log", "the server's audit log (serve --audit-log)"),
    "logprobs": Spelling("--logprobs", "logprobs", "'logprobs'"),
    "top_logprobs": Spelling("--top-logprobs", "top_logprobs", "'top_logprobs'"),
    "rpc": Spelling("--rpc", "rpc", "the server's RPC workers (serve --rpc)"),
    "insecure_network": Spelling("--insecure-network", "insecure_network=True", "the worker's --insecure-network"),
    "worker_port": Spelling("--port", "port", "the worker's port"),
    "swa_full": Spelling("--swa-full", "swa_full=True", "the server's SWA cache (serve --swa-full)"),
    "kv_type": Spelling("--kv-type", "kv_type", "the server's KV cache type (serve --kv-type)"),
    "kv_type_k": Spelling("--kv-type-k", "kv_type_k", "the server's K cache type (serve --kv-type-k)"),
    "kv_type_v": Spelling("--kv-type-v", "kv_type_v", "the server's V cache type (serve --kv-type-v)"),
    "flash_attn": Spelling("--flash-attn", "flash_attn", "the server's flash attention (serve --flash-attn)"),
}

_OPEN, _CLOSE = "\ue000", "\ue001"
_MARKER = re.compile(f"{_OPEN}([a-z_]+){_CLOSE}")


def setting(name: str) -> str:
    """A setting's name inside an error message, rendered per interface (see the module docstring)."""
    if name not in SETTINGS:
        raise ValueError(f"unknown setting {name!r}; add it to medgemma_gguf.errors.SETTINGS")
    return f"{_OPEN}{name}{_CLOSE}"


def render(text: str, interface: str = "python") -> str:
    """``text`` with its ``setting()`` markers worded for ``interface`` ("python", "cli" or "http"): for notes
    that are not errors (what a command chose and how to change it)."""
    return _MARKER.sub(lambda match: getattr(SETTINGS[match.group(1)], interface), text)


class UserError(Exception):
    """A problem with the user's input or environment, with the fix, worded per interface (module docstring).

    ``exit_code`` is the CLI's exit status; ``http_status`` the server's answer.
    """

    exit_code = 2
    http_status = 400

    def __init__(self, message: str):
        self.template = " ".join(str(message).split())
        super().__init__(self.for_python())

    def _render(self, interface: str) -> str:
        return render(self.template, interface)

    def for_python(self) -> str:
        return self._render("python")

    def for_cli(self) -> str:
        return self._render("cli")

    def for_http(self) -> str:
        return self._render("http")


def unknown_fields(fields: Mapping[Any, Any], known: Collection[str]) -> list[str]:
    """The keys of ``fields`` not in ``known``, sorted; a null value counts as absent (as in llama-server). The
    refuse-unknown policy's one test: callers refuse what this returns, naming the field, never drop it."""
    return sorted(str(key) for key in fields if key not in known and fields[key] is not None)


class InputError(UserError):
    """A value given is not acceptable (out of range, malformed, unknown name)."""


class NotFoundError(UserError):
    """A file, folder, repository, quant or other named thing does not exist."""

    http_status = 404


class MismatchError(UserError):
    """Inputs that must belong together do not (an mmproj of another model, an imatrix of another model)."""


class ExistsError(UserError):
    """An output already exists and would be overwritten."""

    http_status = 409


class NeedsImatrixError(UserError):
    """A quant type that llama.cpp writes only with an importance matrix was asked for without one."""


class ResourceError(UserError):
    """Something does not fit: the context, the memory, a size limit."""

    http_status = 413


class IntegrityError(UserError):
    """A file is damaged, truncated or not what its manifest records."""

    http_status = 422


class AccessError(UserError):
    """Access was refused: a gated or private repository, a missing token, a path outside the allowed roots."""

    http_status = 403


class UnavailableError(UserError):
    """A service the model needs cannot be reached or stopped answering (an RPC worker)."""

    http_status = 503
