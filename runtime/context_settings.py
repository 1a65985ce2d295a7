"""How a llama.cpp context is set up — KV cache (sliding window, K and V types), flash attention, micro-batch,
sequences, output rows — checked against llama.cpp's own rules before anything is loaded.

Defaults, and why:

* ``swa_full=False``: the small sliding-window cache. Gemma 3's local layers (5 of every 6) attend to the
  last ``n_swa`` positions only (1024 for MedGemma); llama.cpp then keeps ``pad(min(n_ctx, n_swa + n_ubatch),
  256)`` cells for them per sequence instead of the whole context (src/llama-kv-cache-iswa.cpp) — 1536
  instead of 131072 at MedGemma's full context. llama-server defaults to it (PR 13194); the C default
  ``llama_context_default_params().swa_full`` is true and llama-cpp-python's ``Llama`` keeps that, so this
  runtime sets it explicitly. ``swa_full=True`` restores the full-size cache (``--swa-full``). What the
  small cache means for re-using a cached conversation: ``runtime.kv_reuse``.
* ``type_k = type_v = "f16"``: llama.cpp's default. ``q8_0`` halves the cache, ``q4_0`` quarters it (their KL
  against an f16 cache on the trained fixture: ``bench/bench_kv.py --parts kl``). A quantized V needs flash
  attention (llama.cpp reads quantized V only inside ``flash_attn_ext``); a quantized K or V needs the head size
  to be a multiple of the type's block (32 for both), with flash attention on. When the head size is a multiple
  of 64, llama.cpp rotates quantized K/V with a Hadamard matrix (``attn_rot_k``/``attn_rot_v``), which costs a
  little compute-buffer memory (``runtime.compute_graph``).
* ``flash_attn="auto"``: llama.cpp's own default (``LLAMA_FLASH_ATTN_TYPE_AUTO``): on when every layer's
  device runs ``flash_attn_ext`` (the CPU and CUDA do for Gemma 3's head sizes), and forced on for a
  quantized V. ``"off"`` is llama-cpp-python's ``Llama(flash_attn=False)`` — not "auto" — and refuses a
  quantized V; here that is refused before loading, with the fix.
* ``n_outputs_max``: the logits rows one decode may return. llama.cpp reserves its compute buffer for
  ``min(n_ubatch, n_outputs_max)`` rows of ``n_vocab`` floats — 512 MiB at MedGemma's 262,208-token vocabulary
  and ``n_ubatch`` 512 when left at 0 (= ``n_batch``). Chat and serving need one row per sequence (the prompt's
  last token; one token per slot per batch), as llama-server sets it; evaluation (logits for every
  position) keeps 0.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from medgemma_gguf.errors import InputError, setting

# the KV cache types offered, with their ggml type ids (ggml/include/ggml.h) and block sizes
KV_TYPES: dict[str, tuple[int, int]] = {"f16": (1, 1), "q8_0": (8, 32), "q4_0": (2, 32)}
# --flash-attn values -> llama_flash_attn_type (LLAMA_FLASH_ATTN_TYPE_AUTO / ENABLED / DISABLED)
FLASH_ATTN_MODES: dict[str, int] = {"auto": -1, "on": 1, "off": 0}
DEFAULT_N_UBATCH = 512
MAX_PARALLEL = 256  # sequences one context may hold: llama.cpp's LLAMA_MAX_SEQ (src/llama-cparams.h)


def parse_kv_type(value: str, what: str = "kv_type") -> str:
    """``value`` as one of ``KV_TYPES`` (case-insensitive); InputError naming the setting otherwise."""
    name = str(value).strip().lower()
    if name not in KV_TYPES:
        raise InputError(f"{setting(what)} must be one of {', '.join(KV_TYPES)}, got {value!r}")
    return name


def parse_flash_attn(value: str | bool) -> str:
    """``value`` as one of ``FLASH_ATTN_MODES`` (True/False accepted as on/off)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    name = str(value).strip().lower()
    if name not in FLASH_ATTN_MODES:
        raise InputError(f"{setting('flash_attn')} must be auto, on or off, got {value!r}")
    return name


@dataclass(frozen=True)
class ContextSettings:
    """One llama.cpp context's settings (module docstring). ``n_ctx`` is per sequence (the room one
    conversation has); the context holds ``n_ctx × n_seq`` positions, one KV stream per sequence."""

    n_ctx: int = 4096
    n_seq: int = 1
    n_ubatch: int = DEFAULT_N_UBATCH
    n_batch: int = 0  # 0: the same as n_ubatch
    swa_full: bool = False
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: str = "auto"
    n_outputs_max: int = 0  # 0: n_batch (logits for every token); chat and serving pass n_seq

    def __post_init__(self) -> None:
        for name, value, least in (("n_ctx", self.n_ctx, 16), ("n_seq", self.n_seq, 1),
                                   ("n_ubatch", self.n_ubatch, 1), ("n_batch", self.n_batch, 0),
                                   ("n_outputs_max", self.n_outputs_max, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise InputError(f"{setting(name) if name == 'n_ctx' else name} must be a whole number >= {least}, "
                                 f"got {value!r}")
        object.__setattr__(self, "type_k", parse_kv_type(self.type_k, "kv_type_k"))
        object.__setattr__(self, "type_v", parse_kv_type(self.type_v, "kv_type_v"))
        object.__setattr__(self, "flash_attn", parse_flash_attn(self.flash_attn))
        if KV_TYPES[self.type_v][1] > 1 and self.flash_attn == "off":
            raise InputError(f"a quantized V cache ({self.type_v}, from {setting('kv_type')} or "
                             f"{setting('kv_type_v')}) needs flash attention, which {setting('flash_attn')} off "
                             f"disables; use {setting('flash_attn')} auto or on, or an f16 V cache "
                             f"({setting('kv_type_v')} f16)")

    def with_(self, **changes: object) -> ContextSettings:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)  # type: ignore[arg-type]

    @property
    def batch(self) -> int:
        return self.n_batch or self.n_ubatch

    @property
    def n_ctx_total(self) -> int:
        return self.n_ctx * self.n_seq

    @property
    def k_quantized(self) -> bool:
        return KV_TYPES[self.type_k][1] > 1

    @property
    def v_quantized(self) -> bool:
        return KV_TYPES[self.type_v][1] > 1

    @property
    def flash_attn_planned(self) -> bool:
        """Whether llama.cpp will run flash attention: "auto" resolves to on for Gemma 3 on the CPU and on CUDA
        (and is forced on by a quantized V)."""
        return self.flash_attn != "off"

    def check_model(self, head_dims_k: tuple[int, ...], head_dims_v: tuple[int, ...]) -> None:
        """llama.cpp's rules for the model (``llama_init_from_model``): with flash attention, a quantized K (V)
        type's block must divide every layer's K (V) head size."""
        if not self.flash_attn_planned:
            return
        for name, type_name, dims in (("kv_type_k", self.type_k, head_dims_k), ("kv_type_v", self.type_v, head_dims_v)):
            block = KV_TYPES[type_name][1]
            bad = sorted({d for d in dims if d % block})
            if block > 1 and bad:
                raise InputError(f"{setting(name)} {type_name} stores blocks of {block} values, which do not divide "
                                 f"this model's head size {bad[0]}; use {setting(name)} f16")

    def apply(self, params: object) -> None:
        """Set these values on a ``llama_cpp.llama_context_params``."""
        params.n_ctx = self.n_ctx_total  # type: ignore[attr-defined]
        params.n_seq_max = self.n_seq  # type: ignore[attr-defined]
        params.kv_unified = False  # type: ignore[attr-defined]  # one KV stream per sequence
        params.n_batch = self.batch  # type: ignore[attr-defined]
        params.n_ubatch = self.n_ubatch  # type: ignore[attr-defined]
        params.swa_full = self.swa_full  # type: ignore[attr-defined]
        params.type_k = KV_TYPES[self.type_k][0]  # type: ignore[attr-defined]
        params.type_v = KV_TYPES[self.type_v][0]  # type: ignore[attr-defined]
        params.flash_attn_type = FLASH_ATTN_MODES[self.flash_attn]  # type: ignore[attr-defined]
        params.n_outputs_max = self.n_outputs_max  # type: ignore[attr-defined]

    def describe(self) -> str:
        """One line for plans and logs."""
        swa = "full-size SWA cache" if self.swa_full else "small SWA cache"
        kv = self.type_k if self.type_k == self.type_v else f"K {self.type_k} / V {self.type_v}"
        slots = f" x {self.n_seq} slots" if self.n_seq > 1 else ""
        return (f"context {self.n_ctx}{slots}, KV {kv}, {swa}, flash attention {self.flash_attn}, "
                f"micro-batch {self.n_ubatch}")
