"""A thin, exact layer over llama-cpp-python's C API for Gemma 3: a text model, optional mmproj, and
evaluation that returns logits for the positions asked for.

Prompts are evaluated as a list of parts — token ids, or images — so that callers control the exact
token sequence (the runtime builds it to match the Hugging Face processor's; the evaluator and tests
feed the processor's own ids).  Images go through libmtmd: encoded by the mmproj and decoded into the
text model with Gemma 3's non-causal attention over the image block, as ``mtmd_helper`` does it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp
import llama_cpp.mtmd_cpp as mtmd
import numpy as np

from medgemma_gguf.errors import MismatchError, ResourceError, UserError, setting
from medgemma_gguf.runtime.context_settings import ContextSettings
from medgemma_gguf.runtime.kv_reuse import keep_prefix
from medgemma_gguf.runtime.llama_log import record_log, route_llama_logs
from medgemma_gguf.runtime.reply import ReasoningMarkers
from medgemma_gguf.runtime.sampling import Sampler, SamplingSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KvCacheReport:
    """One ``llama_kv_cache: size = ...`` line: a cache llama.cpp allocated (sizes in MiB as printed)."""

    mib: float
    cells: int
    layers: int
    streams: int
    k_type: str
    k_mib: float
    v_type: str
    v_mib: float


@dataclass(frozen=True)
class Allocations:
    """What llama.cpp reported allocating when the context was created (its INFO log lines, MiB with two
    decimals as printed): the KV caches (for Gemma 3 the full-attention one, then the sliding-window one),
    the compute and output buffers per buffer type, and whether flash attention ended up on."""

    kv_caches: tuple[KvCacheReport, ...] = ()
    compute_mib: dict[str, float] = field(default_factory=dict)
    output_mib: dict[str, float] = field(default_factory=dict)
    flash_attn: bool | None = None

    @classmethod
    def parse(cls, lines: Sequence[str], flash_attn_requested: str) -> Allocations:
        caches: list[KvCacheReport] = []
        compute: dict[str, float] = {}
        output: dict[str, float] = {}
        flash = {"on": True, "off": False}.get(flash_attn_requested)
        for line in lines:
            found = _KV_LINE.search(line)
            if found:
                mib, cells, layers, _seqs, streams, k_type, k_mib, v_type, v_mib = found.groups()
                caches.append(KvCacheReport(float(mib), int(cells), int(layers), int(streams), k_type, float(k_mib),
                                            v_type, float(v_mib)))
            elif (found := _BUFFER_LINE.search(line)) is not None:
                target = compute if found.group(2) == "compute" else output
                target[found.group(1)] = target.get(found.group(1), 0.0) + float(found.group(3))
            elif "Flash Attention enabled" in line:
                flash = True
            elif "Flash Attention not supported" in line or "enabling flash_attn since it is required" in line:
                flash = "enabling" in line
        return cls(tuple(caches), compute, output, flash)


_KV_LINE = re.compile(r"llama_kv_cache: size = +([\d.]+) MiB \( *(\d+) cells, +(\d+) layers, +(\d+)/(\d+) seqs\), "
                      r"K \((\w+)\): +([\d.]+) MiB, V \((\w+)\): +([\d.]+) MiB")
_BUFFER_LINE = re.compile(r"(\S+) +(compute|output) buffer size = +([\d.]+) MiB")


def dry_run_allocations(model_path: Path, settings: Sequence[ContextSettings], *,
                        n_gpu_layers: int = 0) -> list[Allocations]:
    """What llama.cpp would allocate for each of ``settings`` without allocating it: the model's metadata is
    read once (``no_alloc``, no weights loaded) and each context reserved as a dry run — how llama.cpp's own
    ``fit`` measures (common/fit.cpp). The KV and compute sizes are the real run's; the tests and
    ``bench/bench_kv.py`` check ``runtime.offload``'s plan against them."""
    route_llama_logs()
    llama_cpp.llama_backend_init()
    model_params = llama_cpp.llama_model_default_params()
    model_params.no_alloc = True
    model_params.load_mode = 0  # LLAMA_LOAD_MODE_NONE: with mmap, no_alloc aborts (llama-model.cpp)
    model_params.n_gpu_layers = n_gpu_layers
    model = llama_cpp.llama_model_load_from_file(str(_check_file(model_path, "model")).encode(), model_params)
    if not model:
        raise UserError(f"llama.cpp could not read {model_path}; the file is damaged or not a text model")
    try:
        found = []
        for one in settings:
            params = llama_cpp.llama_context_default_params()
            one.apply(params)
            params.n_threads = params.n_threads_batch = 1
            with record_log() as lines:
                context = llama_cpp.llama_init_from_model(model, params)
            if not context:
                raise ResourceError(f"llama.cpp refused the context ({one.describe()}) for {model_path}")
            llama_cpp.llama_free(context)
            found.append(Allocations.parse(lines, one.flash_attn))
        return found
    finally:
        llama_cpp.llama_model_free(model)


@dataclass(frozen=True)
class ImagePart:
    """An RGB image to place in the prompt (uint8 array of shape [height, width, 3])."""

    pixels: np.ndarray


PromptPart = Sequence[int] | ImagePart


def _check_file(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} not found; check the path")
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise UserError(f"{path} is not a GGUF file; pass a .gguf {what} made by medgemma-gguf convert")
    return path


class Engine:
    """A loaded text model (+ optional mmproj) with one context; its own evaluation methods use sequence 0."""

    def __init__(
        self,
        model_path: Path,
        mmproj_path: Path | None = None,
        *,
        n_ctx: int = 4096,
        n_gpu_layers: int = 0,
        n_threads: int | None = None,
        n_batch: int = 512,
        n_ubatch: int = 512,
        vocab_only: bool = False,
        eval_callback: object | None = None,
        n_seq_max: int = 1,
        devices: Sequence[int] | None = None,
        tensor_split: Sequence[float] | None = None,
        mmproj_gpu: bool | None = None,
        settings: ContextSettings | None = None,
        create_context: bool = True,
    ):
        """Load ``model_path`` (and ``mmproj_path``).

        ``settings`` (``runtime.context_settings``): the context — per-sequence ``n_ctx``, sequences, KV
        cache types, sliding-window cache size, flash attention, micro-batch, output rows; without it,
        ``n_ctx``/``n_batch``/``n_ubatch``/``n_seq_max`` with the defaults there (small SWA cache, f16 KV,
        flash attention auto, logits for every token). What llama.cpp then allocated is in ``allocations``.
        ``n_ctx`` is per sequence: ``n_seq_max`` sequences (the server's parallel slots, ``runtime.batching``)
        each get a KV stream of ``n_ctx`` cells (llama.cpp's non-unified cache, ``kv_unified=False``; llama.cpp
        pads it to 256). This engine's own evaluation methods use sequence 0.

        ``eval_callback``: a ``llama_cpp.ggml_backend_sched_eval_callback`` called for every graph node
        (how llama.cpp's imatrix tool observes activations); the caller keeps it alive.

        ``devices``: the ``ggml_backend_dev_t`` handles the offloaded layers go to, in order (llama.cpp's
        ``llama_model_params.devices``; RPC workers' devices come from ``runtime.rpc.register_workers``); None =
        every GPU llama.cpp registered. ``tensor_split``: each device's share of the offloaded layers (llama.cpp
        splits by the devices' free memory when None). ``mmproj_gpu``: let libmtmd run the vision encoder on a GPU
        (default: when layers are offloaded); libmtmd takes the first GPU llama.cpp registered, which is an RPC
        worker's when no local GPU exists, so callers that use workers decide.
        ``create_context=False``: load the files only; ``create_context`` makes the context later (its size
        can then depend on a prompt tokenized with this engine).
        """
        if settings is None:
            settings = ContextSettings(n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_ubatch, n_seq=n_seq_max)
        route_llama_logs()
        llama_cpp.llama_backend_init()
        self.model_path = _check_file(model_path, "model")
        self.mmproj_path = _check_file(mmproj_path, "mmproj") if mmproj_path else None
        self.n_threads = n_threads or max(1, os.cpu_count() or 1)
        self.settings = settings
        self.n_batch = settings.batch
        self.allocations = Allocations()
        self._model = self._ctx = self._mtmd = None
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = n_gpu_layers
        model_params.vocab_only = vocab_only
        self._device_array = self._split_array = None  # kept alive while llama.cpp reads them
        if devices is not None:
            self._device_array = (ctypes.c_void_p * (len(devices) + 1))(*devices, None)
            model_params.devices = ctypes.addressof(self._device_array)
        if tensor_split is not None:
            if devices is None or len(tensor_split) != len(devices):
                raise ValueError("tensor_split needs one share per device")
            self._split_array = (ctypes.c_float * llama_cpp.llama_max_devices())(*tensor_split)
            model_params.tensor_split = self._split_array
        self._model = llama_cpp.llama_model_load_from_file(str(self.model_path).encode(), model_params)
        if not self._model:
            raise UserError(
                f"llama.cpp could not load {self.model_path}; the file is damaged or not a text "
                f"model (an mmproj goes in {setting('mmproj')})"
            )
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self.n_past = 0
        self._pieces: dict[int, bytes] = {}
        self._eog: dict[int, bool] = {}
        self._one: Any = None  # a one-token batch for decode_next
        if vocab_only:
            return
        self._eval_callback = eval_callback
        self.n_ctx = settings.n_ctx
        self.n_seq_max = settings.n_seq
        self.n_ubatch = settings.n_ubatch
        self.n_embd = llama_cpp.llama_model_n_embd(self._model)
        self.n_swa = 0 if settings.swa_full else llama_cpp.llama_model_n_swa(self._model)
        if create_context:
            try:
                self.create_context(settings)
            except BaseException:
                self.close()
                raise
        if self.mmproj_path is not None:
            self._init_mtmd(n_gpu_layers > 0 if mmproj_gpu is None else mmproj_gpu)

    def create_context(self, settings: ContextSettings) -> None:
        """(Re)create the context with ``settings`` (the evaluated prompt and LoRA adapters are dropped);
        ResourceError when llama.cpp cannot create it."""
        n_layers = llama_cpp.llama_model_n_layer(self._model)
        head_k = self.n_embd // max(1, llama_cpp.llama_model_n_head(self._model))
        settings.check_model(*self._head_sizes(head_k, n_layers))
        if self._ctx:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if self._one is not None:
            llama_cpp.llama_batch_free(self._one)
            self._one = None
        ctx_params = llama_cpp.llama_context_default_params()
        settings.apply(ctx_params)
        ctx_params.n_threads = ctx_params.n_threads_batch = self.n_threads
        if self._eval_callback is not None:
            ctx_params.cb_eval = self._eval_callback
            ctx_params.cb_eval_user_data = None
        with record_log() as lines:
            self._ctx = llama_cpp.llama_init_from_model(self._model, ctx_params)
        if not self._ctx:
            many = f" for each of {settings.n_seq} parallel slots" if settings.n_seq > 1 else ""
            smaller = f", use a quantized KV cache ({setting('kv_type')} q8_0)" if settings.type_k == "f16" else ""
            raise ResourceError(f"llama.cpp could not create a context of {settings.n_ctx} tokens{many} "
                                f"({settings.describe()}) for {self.model_path.name}; lower {setting('n_ctx')}"
                                + smaller + (f" or lower {setting('parallel')}" if settings.n_seq > 1 else ""))
        self.settings = settings
        self.allocations = Allocations.parse(lines, settings.flash_attn)
        self.n_batch = settings.batch
        self.n_ubatch = settings.n_ubatch
        self.n_seq_max = llama_cpp.llama_n_seq_max(self._ctx)
        self.n_ctx = llama_cpp.llama_n_ctx_seq(self._ctx)  # per sequence (llama.cpp pads it to 256)
        self.n_swa = 0 if settings.swa_full else llama_cpp.llama_model_n_swa(self._model)
        self.n_past = 0
        self._one = llama_cpp.llama_batch_init(1, 0, 1)
        self._one.n_tokens = 1
        self._one.n_seq_id[0] = 1
        self._one.seq_id[0][0] = 0
        self._one.logits[0] = True

    @property
    def has_context(self) -> bool:
        return bool(self._ctx)

    def _head_sizes(self, fallback: int, n_layers: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Per-layer K and V head sizes from the GGUF metadata (``<arch>.attention.key_length``/``value_length``)."""
        values = []
        for key in ("key_length", "value_length"):
            buffer = ctypes.create_string_buffer(64)
            arch = ctypes.create_string_buffer(64)
            llama_cpp.llama_model_meta_val_str(self._model, b"general.architecture", arch, len(arch))
            name = arch.value + b".attention." + key.encode()
            found = llama_cpp.llama_model_meta_val_str(self._model, name, buffer, len(buffer))
            values.append(int(buffer.value) if found > 0 and buffer.value.isdigit() else fallback)
        return (values[0],) * n_layers, (values[1],) * n_layers

    def _init_mtmd(self, use_gpu: bool) -> None:
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.n_threads = self.n_threads
        params.print_timings = False
        params.warmup = False
        self._mtmd = mtmd.mtmd_init_from_file(str(self.mmproj_path).encode(), self._model, params)
        if not self._mtmd:
            self.close()
            raise UserError(
                f"llama.cpp could not load the mmproj {self.mmproj_path}; it does not belong to "
                f"{self.model_path.name} (embedding width or projector type differ) or is damaged"
            )
        if not mtmd.mtmd_support_vision(self._mtmd):
            self.close()
            raise UserError(f"{self.mmproj_path} has no vision encoder; pass the model's image mmproj")

    # lifecycle -------------------------------------------------------------------------------------
    def close(self) -> None:
        """Free the native objects (also done on garbage collection)."""
        if self._mtmd:
            mtmd.mtmd_free(self._mtmd)
            self._mtmd = None
        if self._one is not None:
            llama_cpp.llama_batch_free(self._one)
            self._one = None
        if self._ctx:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    @property
    def has_vision(self) -> bool:
        return self._mtmd is not None

    # LoRA adapters (see runtime.lora) -----------------------------------------------------------------
    def load_lora(self, path: Path) -> ctypes.c_void_p:
        """Load a GGUF LoRA adapter onto the model (freed with it); the caller checked it (``runtime.lora``).

        llama.cpp answers a file it cannot use with NULL (llama-cpp-python's ``Llama`` misses that and
        crashes later): refused here.
        """
        adapter = llama_cpp.llama_adapter_lora_init(self._model, str(path).encode())
        if not adapter:
            raise MismatchError(f"llama.cpp could not apply the LoRA adapter {path} to {self.model_path.name}: it "
                                "was made for another base model or is damaged")
        return adapter

    def set_loras(self, adapters: Sequence[tuple[ctypes.c_void_p, float]], *, clear_cache: bool = True) -> None:
        """Replace the context's adapter set (``llama_set_adapters_lora``) and clear the KV cache, which
        llama.cpp keeps although it was computed with the previous set.

        ``clear_cache=False``: keep it — for a caller that tracks which set each sequence's cache was
        computed with (``runtime.batching``: the set applies to the next decodes only)."""
        count = len(adapters)
        handles = (llama_cpp.llama_adapter_lora_p_ctypes * count)(*(a for a, _ in adapters)) if count else None  # type: ignore[misc]
        scales = (ctypes.c_float * count)(*(s for _, s in adapters)) if count else None
        llama_cpp.llama_set_adapters_lora(self._ctx, handles, count, scales)
        if clear_cache:
            self.reset()

    # tokens ----------------------------------------------------------------------------------------
    def tokenize(self, text: str, *, add_special: bool = False, parse_special: bool = True) -> list[int]:
        """llama.cpp's tokenization of ``text`` (special tokens such as ``<start_of_turn>`` parsed)."""
        data = text.encode("utf-8")
        capacity = len(data) + 16
        buffer = (llama_cpp.llama_token * capacity)()
        count = llama_cpp.llama_tokenize(self._vocab, data, len(data), buffer, capacity, add_special, parse_special)
        if count < 0:
            capacity = -count
            buffer = (llama_cpp.llama_token * capacity)()
            count = llama_cpp.llama_tokenize(self._vocab, data, len(data), buffer, capacity, add_special, parse_special)
        return list(buffer[:count])

    def token_piece(self, token: int, *, special: bool = False) -> bytes:
        """The bytes a token stands for (control tokens are empty unless ``special``)."""
        buffer = ctypes.create_string_buffer(256)
        count = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, special)
        if count < 0:
            buffer = ctypes.create_string_buffer(-count)
            count = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, special)
        return buffer.raw[:count]

    def piece(self, token: int) -> bytes:
        """``token_piece(token)``, remembered per token (the decode loop asks for every generated token)."""
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self.token_piece(token)
        return piece

    def is_end_of_generation(self, token: int) -> bool:
        """Whether llama.cpp counts ``token`` as an end of generation (remembered per token)."""
        eog = self._eog.get(token)
        if eog is None:
            eog = self._eog[token] = bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))
        return eog

    def single_token(self, text: str) -> int | None:
        """The id of the one vocabulary token whose text is ``text`` (special tokens parsed), else None."""
        ids = self.tokenize(text)
        if len(ids) != 1 or self.token_piece(ids[0], special=True) != text.encode("utf-8"):
            return None
        return ids[0]

    def new_sampler(self, settings: SamplingSettings, *, reasoning: ReasoningMarkers | None = None) -> Sampler:
        """llama.cpp's sampler chain for ``settings`` (resolved) over this context's logits."""
        return Sampler(self._ctx, self._vocab, settings, n_vocab=self.n_vocab, n_ctx=self.n_ctx, reasoning=reasoning)

    @property
    def bos_token(self) -> int:
        return llama_cpp.llama_vocab_bos(self._vocab)

    def image_marker_tokens(self) -> tuple[int, int]:
        """Ids of ``<start_of_image>`` and ``<end_of_image>``."""
        start, end = self.tokenize("<start_of_image>"), self.tokenize("<end_of_image>")
        if len(start) != 1 or len(end) != 1:
            raise UserError(
                f"{self.model_path.name} does not parse Gemma's image markers as single tokens; "
                "re-convert it with medgemma-gguf convert"
            )
        return start[0], end[0]

    # evaluation ------------------------------------------------------------------------------------
    @property
    def llama_vocab(self) -> ctypes.c_void_p:
        """The raw ``llama_vocab`` pointer (sampler chains and grammars are built on it)."""
        return self._vocab

    @property
    def llama_context(self) -> ctypes.c_void_p:
        """The raw ``llama_context`` pointer, for callers that drive llama.cpp's C API directly (imatrix)."""
        if not self._ctx:
            raise RuntimeError("this Engine has no context (closed, or loaded vocab_only)")
        return self._ctx

    def reset(self) -> None:
        """Forget the evaluated prompt (clear the KV cache)."""
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx), True)
        self.n_past = 0

    def truncate(self, n_positions: int) -> bool:
        """Keep the first ``n_positions`` evaluated positions when they can be continued exactly — with the
        small SWA cache, only while the window behind them is still cached (``runtime.kv_reuse``); otherwise
        clear the cache and return False (evaluate from the start)."""
        if not 0 <= n_positions <= self.n_past:
            raise ValueError(f"cannot keep {n_positions} positions of {self.n_past}")
        if keep_prefix(self._ctx, 0, n_positions, self.n_swa):
            self.n_past = n_positions
            return True
        self.reset()
        return False

    def _check_room(self, n_new: int) -> None:
        if self.n_past + n_new > self.n_ctx:
            raise UserError(
                f"the prompt needs {self.n_past + n_new} tokens but the context holds {self.n_ctx}; "
                f"raise {setting('n_ctx')} or shorten the conversation"
            )

    def eval_tokens(self, tokens: Sequence[int], *, logits: str | Sequence[bool] | np.ndarray = "last") -> np.ndarray:
        """Decode ``tokens`` after what was evaluated so far (in decodes of ``n_batch`` tokens; of
        ``n_outputs_max`` when every token's logits are asked for and the context returns fewer rows than that).

        ``logits``: "all" returns float32 [len(tokens), n_vocab], "last" returns [1, n_vocab], "none" [0, n_vocab];
        "context" computes the last token's logits but leaves them in the context for a sampler (returns
        [0, n_vocab]); a boolean mask (one flag a token) returns the rows of the flagged tokens only, in order —
        llama.cpp computes no others (as ``llama-perplexity`` asks only for the positions it scores).
        """
        tokens = list(tokens)
        self._check_room(len(tokens))
        if isinstance(logits, str):
            want = np.zeros(len(tokens), dtype=bool)
            if logits == "all":
                want[:] = True
            elif logits in ("last", "context") and tokens:
                want[-1] = True
        else:
            want = np.asarray(logits, dtype=bool)
            if want.shape != (len(tokens),):
                raise ValueError(f"the logits mask has shape {want.shape}; pass one flag for each of the "
                                 f"{len(tokens)} tokens")
        copy = not (isinstance(logits, str) and logits == "context")
        # a context made for chat returns n_outputs_max logits rows per decode (runtime.context_settings):
        # tokens whose logits are all wanted then take decodes of that many tokens
        many = not isinstance(logits, str) or logits == "all"
        step = min(self.n_batch, self.settings.n_outputs_max or self.n_batch) if many else self.n_batch
        out = np.empty((int(want.sum()) if copy else 0, self.n_vocab), dtype=np.float32)
        filled = 0
        batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        try:
            for start in range(0, len(tokens), step):
                chunk = tokens[start : start + step]
                batch.n_tokens = len(chunk)
                for i, token in enumerate(chunk):
                    batch.token[i] = token
                    batch.pos[i] = self.n_past + i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = bool(want[start + i])
                status = llama_cpp.llama_decode(self._ctx, batch)
                if status != 0:
                    raise RuntimeError(f"llama_decode failed with status {status}")
                for i in range(len(chunk) if copy else 0):
                    if want[start + i]:
                        pointer = llama_cpp.llama_get_logits_ith(self._ctx, i)
                        out[filled] = np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))
                        filled += 1
                self.n_past += len(chunk)
        finally:
            llama_cpp.llama_batch_free(batch)
        return out

    def decode_next(self, token: int) -> None:
        """Decode one generated token after the others; its logits stay in the context for the sampler."""
        if self.n_past >= self.n_ctx:
            self._check_room(1)
        batch = self._one
        batch.token[0] = token
        batch.pos[0] = self.n_past
        status = llama_cpp.llama_decode(self._ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status}")
        self.n_past += 1

    def _image_chunks(self, image: ImagePart):
        """libmtmd's chunks for one image: [text <start_of_image>], image, [text <end_of_image>]."""
        if self._mtmd is None:
            raise UserError(f"this model was loaded without an mmproj; pass {setting('mmproj')} to use images")
        pixels = np.ascontiguousarray(image.pixels, dtype=np.uint8)
        if pixels.ndim != 3 or pixels.shape[2] != 3:
            raise ValueError("ImagePart.pixels must be uint8 [height, width, 3]")
        height, width = pixels.shape[:2]
        bitmap = mtmd.mtmd_bitmap_init(width, height, pixels.ctypes.data_as(ctypes.POINTER(ctypes.c_ubyte)))
        chunks = mtmd.mtmd_input_chunks_init()
        marker = mtmd.mtmd_default_marker()
        text = mtmd.mtmd_input_text()
        text.text = marker
        text.text_len = len(marker)
        text.add_special = False
        text.parse_special = True
        bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
        status = mtmd.mtmd_tokenize(self._mtmd, chunks, ctypes.byref(text), bitmaps, 1)
        mtmd.mtmd_bitmap_free(bitmap)
        if status != 0:
            mtmd.mtmd_input_chunks_free(chunks)
            raise UserError(f"libmtmd could not prepare the image (status {status}); use an RGB image")
        return chunks

    def _image_chunk(self, chunks):
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            if mtmd.mtmd_input_chunk_get_type(chunk) != 0:  # 0 = text
                return chunk
        raise RuntimeError("libmtmd produced no image chunk")

    def image_token_count(self, image: ImagePart) -> int:
        """How many embedding positions the image occupies in the prompt."""
        chunks = self._image_chunks(image)
        try:
            return mtmd.mtmd_input_chunk_get_n_tokens(self._image_chunk(chunks))
        finally:
            mtmd.mtmd_input_chunks_free(chunks)

    def encode_image(self, image: ImagePart) -> np.ndarray:
        """The projected image embeddings, float32 [n_image_tokens, n_embd]."""
        chunks = self._image_chunks(image)
        try:
            chunk = self._image_chunk(chunks)
            n_tokens = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
            if mtmd.mtmd_encode_chunk(self._mtmd, chunk) != 0:
                raise RuntimeError("mtmd_encode_chunk failed")
            pointer = mtmd.mtmd_get_output_embd(self._mtmd)
            return np.ctypeslib.as_array(pointer, shape=(n_tokens * self.n_embd,)).reshape(n_tokens, -1).copy()
        finally:
            mtmd.mtmd_input_chunks_free(chunks)

    def eval_image(self, image: ImagePart) -> int:
        """Encode and decode one image's embeddings (only the image block; the caller adds the markers).

        The whole image must fit in one micro-batch (``n_ubatch``): Gemma 3 attends to the image block
        non-causally, and splitting it silently degrades quality.
        """
        self.n_past, n_tokens = self.eval_image_at(image, seq_id=0, n_past=self.n_past)
        return n_tokens

    def eval_image_at(self, image: ImagePart, *, seq_id: int, n_past: int) -> tuple[int, int]:
        """Encode ``image`` and decode it into sequence ``seq_id`` at position ``n_past``, in decodes of its
        own (libmtmd switches the whole context to non-causal attention for them, so no other sequence's
        tokens may share them); returns (the next position, the image's positions)."""
        chunks = self._image_chunks(image)
        try:
            chunk = self._image_chunk(chunks)
            n_tokens = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
            if n_tokens > self.n_ubatch or n_tokens > self.n_batch:
                raise UserError(
                    f"an image takes {n_tokens} positions but the micro-batch is {self.n_ubatch}; "
                    "raise n_ubatch/n_batch to at least the image size"
                )
            if n_past + n_tokens > self.n_ctx:
                raise UserError(f"the prompt needs {n_past + n_tokens} tokens but the context holds {self.n_ctx}; "
                                f"raise {setting('n_ctx')} or shorten the conversation")
            new_n_past = llama_cpp.llama_pos(0)
            status = mtmd.mtmd_helper_eval_chunk_single(
                self._mtmd, self._ctx, chunk, n_past, seq_id, self.n_batch, False, ctypes.byref(new_n_past)
            )
            if status != 0:
                raise RuntimeError(f"mtmd_helper_eval_chunk_single failed with status {status}")
            return new_n_past.value, n_tokens
        finally:
            mtmd.mtmd_input_chunks_free(chunks)

    def eval_parts(self, parts: Sequence[PromptPart], *, logits: str | Sequence[bool] | np.ndarray = "all"
                   ) -> np.ndarray:
        """Evaluate token runs and images in order; returns logits of the token positions (see eval_tokens).

        Image positions produce no logits; with ``logits="last"`` only the final token's row is returned; a
        boolean mask has one flag for each token of the token runs (image positions excluded), in order.
        """
        mask = None if isinstance(logits, str) else np.asarray(logits, dtype=bool)
        n_text = sum(len(part) for part in parts if not isinstance(part, ImagePart))
        if mask is not None and mask.shape != (n_text,):
            raise ValueError(f"the logits mask has shape {mask.shape}; pass one flag for each of the {n_text} "
                             "text tokens")
        rows = []
        at = 0
        for index, part in enumerate(parts):
            if isinstance(part, ImagePart):
                self.eval_image(part)
                continue
            is_last = index == len(parts) - 1
            mode: str | np.ndarray
            if mask is not None:
                mode = mask[at : at + len(part)]
            else:
                mode = "all" if logits == "all" else (logits if logits in ("last", "context") and is_last else "none")
            at += len(part)
            rows.append(self.eval_tokens(part, logits=mode))
        if len(rows) == 1:
            return rows[0]
        return np.concatenate(rows) if rows else np.zeros((0, self.n_vocab), dtype=np.float32)
