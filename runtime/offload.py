"""Plan how many layers of a Gemma 3 GGUF fit on the GPU (llama.cpp's ``n_gpu_layers``).

Everything is computed from the GGUF headers (no weights are read) and the llama.cpp source that
llama-cpp-python 0.3.36 vendors. What llama.cpp does, and what this planner assumes:

Layer placement (src/llama-model.cpp, ``load_tensors``): with ``n_gpu_layers = n`` and ``L`` repeating
layers, layer index ``il`` in ``0..L`` (index ``L`` is the *output layer*: ``output_norm`` + ``output``)
goes to the GPU when ``il >= L + 1 - n``. So the output layer is the FIRST thing offloaded (``n = 1``), then
the repeating layers from the last one backwards; ``n = L + 1`` offloads everything. The input layer
(``token_embd``, used only through get_rows) always stays on the CPU. A model with tied embeddings has no
``output.weight``: llama.cpp loads ``token_embd`` a second time as the output matrix, so an offloaded
output layer costs the full ``token_embd`` bytes on the GPU while the CPU copy stays.

Context (``runtime.context_settings``, this runtime's defaults unless given): ``n_ctx`` per sequence, one
KV stream per sequence (``n_seq``, the server's slots), small sliding-window cache, f16 K and V, flash
attention "auto" (planned as on: llama.cpp resolves it so for Gemma 3 on the CPU and on CUDA), one logits row
per sequence.

KV cache (``kv_cache_layout``; src/llama-context.cpp, llama-kv-cache-iswa.cpp, llama-kv-cache.cpp): the total
``n_ctx × n_seq`` is padded to 256 and each stream gets ``n_ctx_seq = pad(total / n_seq, 256)`` cells in the
full-attention layers and ``pad(min(n_ctx_seq, n_swa + n_ubatch), 256)`` in the sliding ones (``n_ctx_seq``
with ``swa_full``). Per layer, K and V are each ``n_head_kv × head_dim`` values per cell in their own type
(``ggml_row_size``: a q8_0 block of 32 values is 34 bytes, q4_0 18). With ``offload_kqv`` (default) a
layer's cache lives on the layer's device. Which layers slide: the per-layer bool array
``gemma3.attention.sliding_window_pattern`` when present, else an integer pattern ``p`` (default 6 for
gemma3: layer ``il`` slides unless ``il % p == p - 1``); no ``sliding_window`` key means no sliding layers.
The tests compare every one of these with llama.cpp's own ``llama_kv_cache: size = …`` lines.

Compute buffers:

* text graph: exactly what llama.cpp reserves on one backend — ``runtime.compute_graph`` rebuilds Gemma 3's
  worst-case graph for the chosen micro-batch, cache sizes, flash attention, K/V types and output rows and
  replays ggml's allocator on it (checked against llama.cpp for every setting on the fixtures and on MedGemma
  4B's and 27B's shapes). With a whole model on the GPU that buffer is on the GPU (CUDA's 128-byte
  alignment) and the token rows are gathered in a small host buffer. With ``op_offload`` (default) the CUDA
  backend also runs big-batch matmuls whose weights stay on the CPU, copying each weight into its compute
  buffer, so while any layer stays on the CPU the largest CPU-resident matmul weight is added, and the
  layers left on the CPU get a CPU buffer; both are upper bounds (the real graph is split between devices).
* logits (host): ``n_vocab × 4`` bytes per output row, one per sequence (``output buffer size``).
* vision encoder (tools/mtmd/clip.cpp warm-up on one ``image_size²`` image, its own buffer), an ESTIMATE:
  ``n_head_v × P² × 4`` (attention without flash attention) ``+ P × (n_ff_v + 3·width_v) × 4``,
  ``P = (image_size / patch_size)²``. For Gemma 3's SigLIP (896 px, patch 14, width 1152, 16 heads, ff 4304)
  that is 1145 MiB, or 121 MiB with flash attention, against 1132 / 121 MiB reported by llama.cpp
  (gpustack/gguf-parser-go issue #44). The runtime creates the vision context with the text context's flash
  attention setting.
* ``headroom`` (default 1 GiB, llama.cpp's own ``--fit-target`` default) is kept free for the CUDA context,
  cuBLAS workspaces and the CUDA memory pool, which no llama.cpp buffer report includes.

The mmproj (vision encoder + projector) is loaded whole onto the GPU whenever llama-cpp-python can
offload (its multimodal handlers create the mtmd context with ``use_gpu = True``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from medgemma_gguf.errors import UserError
from medgemma_gguf.gguf_info import GgufInfo, TensorInfo, read_gguf_info, tensor_nbytes
from medgemma_gguf.runtime.compute_graph import CPU_ALIGNMENT, CUDA_ALIGNMENT
from medgemma_gguf.runtime.compute_graph import text_compute_bytes as graph_compute_bytes
from medgemma_gguf.runtime.context_settings import KV_TYPES, ContextSettings, parse_kv_type
from medgemma_gguf.sizes import GiB, MiB, format_size

DEFAULT_HEADROOM_BYTES = 1 * GiB
KV_CELL_PADDING = 256
DEFAULT_SWA_PATTERN = {"gemma3": 6}
_LAYER_NAME = re.compile(r"^blk\.(\d+)\.")

def _pad(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


# ---------------------------------------------------------------------------------------------------
# What the headers say


@dataclass(frozen=True)
class TextModel:
    """The parts of a Gemma 3 text GGUF that decide its memory use."""

    path: Path
    n_layers: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: tuple[int, ...]
    key_length: int
    value_length: int
    n_vocab: int
    context_length: int
    n_swa: int
    sliding_layers: tuple[bool, ...]
    layer_bytes: tuple[int, ...]
    layer_largest_tensor_bytes: tuple[int, ...]
    input_bytes: int
    output_bytes: int
    output_matrix_bytes: int
    tied_embeddings: bool


@dataclass(frozen=True)
class VisionModel:
    """The parts of an mmproj GGUF that decide its memory use."""

    path: Path
    weight_bytes: int
    n_patches: int
    width: int
    n_ff: int
    n_head: int
    n_image_tokens: int | None


def _metadata_int(info: GgufInfo, key: str, default: int | None = None) -> int:
    value = info.metadata.get(key)
    if value is None:
        if default is None:
            raise UserError(f"{info.path} lacks the metadata key {key}; re-convert the model with this tool")
        return default
    if isinstance(value, list):
        raise UserError(f"{info.path}: {key} is an array; only a single value is supported here")
    return int(value)


def _per_layer(info: GgufInfo, key: str, n_layers: int, default: int | None = None) -> tuple[int, ...]:
    value = info.metadata.get(key)
    if isinstance(value, list):
        if len(value) != n_layers:
            raise UserError(f"{info.path}: {key} has {len(value)} entries for {n_layers} layers; the file is corrupt")
        return tuple(int(item) for item in value)
    return (_metadata_int(info, key, default),) * n_layers


def sliding_layers(info: GgufInfo, arch: str, n_layers: int) -> tuple[int, tuple[bool, ...]]:
    """(sliding window, per layer: True = sliding-window attention) as llama.cpp's ``load_swa_pattern`` reads
    them: none without ``<arch>.attention.sliding_window``; else the per-layer
    ``<arch>.attention.sliding_window_pattern`` array (UserError when its length is not ``n_layers``: a corrupt
    file), else its period (every n-th layer global; 0: all sliding), else the architecture's default period
    (``DEFAULT_SWA_PATTERN``; unknown: every layer full). The one reader of the pattern: the planner and the
    fast sensitivity's global layers (``convert.quantize.fast_sensitivity.global_layers``) use it."""
    n_swa = _metadata_int(info, f"{arch}.attention.sliding_window", 0)
    if n_swa <= 0:
        return 0, (False,) * n_layers
    pattern = info.metadata.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, list):
        if len(pattern) != n_layers:
            raise UserError(
                f"{info.path}: {arch}.attention.sliding_window_pattern has {len(pattern)} entries for "
                f"{n_layers} layers; the file is corrupt — re-convert it"
            )
        return n_swa, tuple(bool(item) for item in pattern)
    if pattern is None:
        period = DEFAULT_SWA_PATTERN.get(arch)
        if period is None:  # unknown default: size every layer's cache as full (never too small)
            return n_swa, (False,) * n_layers
    else:
        period = int(pattern)
    return n_swa, tuple(period == 0 or il % period < period - 1 for il in range(n_layers))


def read_text_model(path: Path | str) -> TextModel:
    """Shapes, sliding-window layout and per-layer weight bytes of the text GGUF at ``path``."""
    info = read_gguf_info(path)
    arch = info.architecture
    if not arch:
        raise UserError(f"{info.path} has no general.architecture; it is not a llama.cpp model GGUF")
    if arch == "clip":
        raise UserError(f"{info.path} is an mmproj (vision) file; pass the text model GGUF, and the mmproj separately")
    n_layers = _metadata_int(info, f"{arch}.block_count")
    n_embd = _metadata_int(info, f"{arch}.embedding_length")
    n_head = _metadata_int(info, f"{arch}.attention.head_count")
    token_embd = info.tensor("token_embd.weight")
    if token_embd is None:
        raise UserError(f"{info.path} has no token_embd.weight tensor; it is not a complete text model")
    n_vocab = token_embd.shape[1] if len(token_embd.shape) > 1 else 0
    gate = info.tensor("blk.0.ffn_gate.weight")
    n_ff = _metadata_int(info, f"{arch}.feed_forward_length", gate.shape[1] if gate is not None else None)

    layer_tensors: list[list[TensorInfo]] = [[] for _ in range(n_layers)]
    input_bytes = 0
    output_norm_bytes = 0
    output_matrix: TensorInfo | None = None
    for tensor in info.tensors:
        match = _LAYER_NAME.match(tensor.name)
        if match is not None:
            index = int(match.group(1))
            if index >= n_layers:
                raise UserError(
                    f"{info.path}: tensor {tensor.name} is beyond block_count {n_layers}; the file is corrupt"
                )
            layer_tensors[index].append(tensor)
        elif tensor.name == "output.weight":
            output_matrix = tensor
        elif tensor.name.startswith("output_norm."):
            output_norm_bytes += tensor.n_bytes
        else:  # token_embd and any other non-layer tensor: loaded with the input layer, on the CPU
            input_bytes += tensor.n_bytes
    tied = output_matrix is None
    output_matrix_bytes = token_embd.n_bytes if output_matrix is None else output_matrix.n_bytes

    n_swa, sliding = sliding_layers(info, arch, n_layers)
    return TextModel(
        path=info.path,
        n_layers=n_layers,
        n_embd=n_embd,
        n_ff=n_ff,
        n_head=n_head,
        n_head_kv=_per_layer(info, f"{arch}.attention.head_count_kv", n_layers, n_head),
        key_length=_metadata_int(info, f"{arch}.attention.key_length", n_embd // n_head),
        value_length=_metadata_int(info, f"{arch}.attention.value_length", n_embd // n_head),
        n_vocab=n_vocab,
        context_length=_metadata_int(info, f"{arch}.context_length", 0),
        n_swa=n_swa,
        sliding_layers=sliding,
        layer_bytes=tuple(sum(t.n_bytes for t in tensors) for tensors in layer_tensors),
        layer_largest_tensor_bytes=tuple(max((t.n_bytes for t in tensors), default=0) for tensors in layer_tensors),
        input_bytes=input_bytes,
        output_bytes=output_norm_bytes + output_matrix_bytes,
        output_matrix_bytes=output_matrix_bytes,
        tied_embeddings=tied,
    )


def read_vision_model(path: Path | str) -> VisionModel:
    """Weight bytes and encoder shape of the mmproj GGUF at ``path``."""
    info = read_gguf_info(path)
    if info.architecture != "clip":
        raise UserError(
            f"{info.path} is not an mmproj file (general.architecture is {info.architecture!r}, not 'clip'); "
            "pass the mmproj-*.gguf written next to the model"
        )
    image_size = _metadata_int(info, "clip.vision.image_size")
    patch_size = _metadata_int(info, "clip.vision.patch_size")
    if patch_size <= 0 or image_size <= 0:
        raise UserError(f"{info.path}: clip.vision.image_size/patch_size must be positive; the file is corrupt")
    projector = info.metadata.get("clip.vision.projector_type") or info.metadata.get("clip.projector_type")
    n_image_tokens = None
    if projector == "gemma3":  # clip.cpp pools the patch grid by scale_factor (default 4) per side
        merge = _metadata_int(info, "clip.vision.projector.scale_factor", 4)
        n_image_tokens = (image_size // patch_size // max(merge, 1)) ** 2
    return VisionModel(
        path=info.path,
        weight_bytes=info.total_tensor_bytes,
        n_patches=(image_size // patch_size) ** 2,
        width=_metadata_int(info, "clip.vision.embedding_length"),
        n_ff=_metadata_int(info, "clip.vision.feed_forward_length"),
        n_head=_metadata_int(info, "clip.vision.attention.head_count"),
        n_image_tokens=n_image_tokens,
    )


# ---------------------------------------------------------------------------------------------------
# Sizes


@dataclass(frozen=True)
class KvCacheLayout:
    """Cells and bytes of llama.cpp's KV cache for one context (every sequence's stream together)."""

    n_ctx_seq: int  # cells per stream of the full-attention cache (n_ctx per sequence, padded to 256)
    n_seq: int  # streams: one per sequence
    n_ubatch: int  # the micro-batch llama.cpp uses (n_ubatch, at most n_batch and the context)
    cells_full: int  # per stream
    cells_swa: int  # per stream
    layer_bytes: tuple[int, ...]  # K+V bytes of each layer, all streams
    sliding: tuple[bool, ...]

    @property
    def full_bytes(self) -> int:
        return sum(b for b, s in zip(self.layer_bytes, self.sliding, strict=True) if not s)

    @property
    def swa_bytes(self) -> int:
        return sum(b for b, s in zip(self.layer_bytes, self.sliding, strict=True) if s)


def kv_cache_layout(model: TextModel, settings: ContextSettings) -> KvCacheLayout:
    """Cells and per-layer K+V bytes of the KV cache llama.cpp allocates (``llama_context`` and
    ``llama_kv_cache_iswa`` constructors): ``n_ctx × n_seq`` padded to 256, one stream per sequence of
    ``n_ctx_seq = pad(total / n_seq, 256)`` cells for the full-attention layers and ``pad(min(n_ctx_seq, n_swa +
    n_ubatch), 256)`` for the sliding ones (``n_ctx_seq`` with ``swa_full``); K and V rows in their types."""
    n_ctx_total = _pad(settings.n_ctx_total, KV_CELL_PADDING)
    n_ctx_seq = _pad(n_ctx_total // settings.n_seq, KV_CELL_PADDING)
    n_batch = min(n_ctx_total, settings.batch)
    n_ubatch = min(n_batch, settings.n_ubatch)
    sliding = model.sliding_layers if model.n_swa > 0 else (False,) * model.n_layers
    cells_swa = n_ctx_seq if settings.swa_full else _pad(min(n_ctx_seq, model.n_swa + n_ubatch), KV_CELL_PADDING)
    type_k = gguf.GGMLQuantizationType(KV_TYPES[settings.type_k][0])
    type_v = gguf.GGMLQuantizationType(KV_TYPES[settings.type_v][0])
    layer_bytes = []
    for il in range(model.n_layers):
        cells = (cells_swa if sliding[il] else n_ctx_seq) * settings.n_seq
        layer_bytes.append(tensor_nbytes(type_k, (model.n_head_kv[il] * model.key_length, cells))
                           + tensor_nbytes(type_v, (model.n_head_kv[il] * model.value_length, cells)))
    return KvCacheLayout(n_ctx_seq, settings.n_seq, n_ubatch, n_ctx_seq, cells_swa, tuple(layer_bytes), sliding)


def text_compute_bytes(model: TextModel, kv: KvCacheLayout, settings: ContextSettings,
                       alignment: int = CPU_ALIGNMENT) -> int:
    """The compute buffer llama.cpp reserves for the text graph on one backend (``runtime.compute_graph``)."""
    return graph_compute_bytes(n_embd=model.n_embd, n_ff=model.n_ff, n_head=model.n_head,
                               n_head_kv=max(model.n_head_kv), head_dim=model.key_length, n_vocab=model.n_vocab,
                               sliding=kv.sliding, n_ctx=kv.n_ctx_seq * kv.n_seq, n_ubatch=kv.n_ubatch,
                               n_seqs=kv.n_seq, n_outputs_max=settings.n_outputs_max, cells_full=kv.cells_full,
                               cells_swa=kv.cells_swa, flash_attn=settings.flash_attn_planned,
                               k_quantized=settings.k_quantized, v_quantized=settings.v_quantized, alignment=alignment)


def output_buffer_bytes(model: TextModel, settings: ContextSettings) -> int:
    """The host buffer for logits: ``n_vocab`` floats per output row, reserved for one row per sequence
    (``llama_context::output_reserve``); a decode asking for more rows (evaluation) grows it to ``n_batch``."""
    rows = settings.n_seq if settings.n_outputs_max else max(settings.n_seq, min(settings.batch, settings.n_ctx_total))
    return rows * model.n_vocab * 4


def vision_compute_bytes(vision: VisionModel, flash_attn: bool) -> int:
    """Estimated compute buffer of the vision encoder for one image (module docstring)."""
    patches = vision.n_patches
    scores = 0 if flash_attn else vision.n_head * patches * patches * 4
    return scores + patches * (vision.n_ff + 3 * vision.width) * 4


# ---------------------------------------------------------------------------------------------------
# Free memory


def gpu_offload_supported() -> tuple[bool, str]:
    """Whether the installed llama-cpp-python can offload to a GPU, and a line saying why not."""
    try:
        import llama_cpp
    except ImportError:
        return False, "llama-cpp-python is not installed: planning for CPU only"
    from medgemma_gguf.devices import gpu_devices

    if llama_cpp.llama_supports_gpu_offload() and gpu_devices():
        return True, ""
    return False, (
        "this llama-cpp-python build has no GPU device to offload to: everything runs on the CPU; "
        "reinstall it with CUDA (LLAMA_CMAKE_ARGS=-DGGML_CUDA=on bash scripts/setup.sh) to use a GPU"
    )


def query_free_vram() -> int:
    """Free memory of GPU 0 in bytes, from pynvml or ``nvidia-smi``; UserError if neither can tell."""
    fix = "pass the GPU memory to use with --vram (e.g. --vram 6GiB)"
    try:
        import pynvml
    except ImportError:
        pynvml = None
    if pynvml is not None:
        try:
            pynvml.nvmlInit()
            try:
                return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).free)
            finally:
                pynvml.nvmlShutdown()
        except pynvml.NVMLError:  # no driver or no device: try nvidia-smi, which says why
            pass
    executable = shutil.which("nvidia-smi")
    if executable is None:
        raise UserError(
            f"cannot determine free GPU memory: nvidia-smi is not on PATH and "
            f"{'pynvml is not installed' if pynvml is None else 'NVML found no GPU'}; {fix}"
        )
    try:
        result = subprocess.run(
            [executable, "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UserError(f"cannot determine free GPU memory: running nvidia-smi failed ({exc}); {fix}") from exc
    first_line = result.stdout.strip().splitlines()[0].strip() if result.stdout.strip() else ""
    if result.returncode != 0 or not first_line.isdigit():
        detail = (result.stderr or result.stdout).strip().splitlines()
        reason = detail[0] if detail else f"exit status {result.returncode}"
        raise UserError(f"cannot determine free GPU memory: nvidia-smi said {reason!r}; {fix}")
    return int(first_line) * MiB


# ---------------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class OffloadPlan:
    """Where a model's memory goes for one ``n_gpu_layers`` value and one context (bytes)."""

    n_gpu_layers: int
    n_layers: int
    n_ctx: int
    gpu_available: bool
    budget_bytes: int | None
    headroom_bytes: int
    gpu_weights: int
    gpu_kv: int
    gpu_mmproj: int
    gpu_compute: int
    cpu_weights: int
    cpu_kv: int
    cpu_mmproj: int
    notes: tuple[str, ...] = field(default=())
    cpu_compute: int = 0
    cpu_output: int = 0
    settings: ContextSettings = field(default_factory=ContextSettings)
    kv: KvCacheLayout | None = None
    text_compute: int = 0
    vision_compute: int = 0

    @property
    def max_gpu_layers(self) -> int:
        """The ``n_gpu_layers`` that offloads everything: all repeating layers plus the output layer."""
        return self.n_layers + 1

    @property
    def fits_fully(self) -> bool:
        return self.n_gpu_layers >= self.max_gpu_layers

    @property
    def repeating_layers_on_gpu(self) -> int:
        return max(0, min(self.n_gpu_layers - 1, self.n_layers))

    @property
    def output_on_gpu(self) -> bool:
        return self.n_gpu_layers >= 1

    @property
    def gpu_bytes(self) -> int:
        return self.gpu_weights + self.gpu_kv + self.gpu_mmproj + self.gpu_compute

    @property
    def cpu_bytes(self) -> int:
        return self.cpu_weights + self.cpu_kv + self.cpu_mmproj + self.cpu_compute + self.cpu_output

    def kv_lines(self) -> list[str]:
        """The KV cache per kind of layer: layers x cells (x sequences) and bytes."""
        kv = self.kv
        if kv is None:
            return []
        types = self.settings.type_k if self.settings.type_k == self.settings.type_v else \
            f"K {self.settings.type_k}, V {self.settings.type_v}"
        streams = f" x {kv.n_seq} sequences" if kv.n_seq > 1 else ""
        full = sum(not s for s in kv.sliding)
        parts = [f"{full} full-attention layers x {kv.cells_full} cells{streams} = {format_size(kv.full_bytes)}"]
        if any(kv.sliding):
            which = "full-size" if self.settings.swa_full else "window"
            parts.append(f"{len(kv.sliding) - full} sliding-window layers x {kv.cells_swa} cells ({which}){streams} = "
                         f"{format_size(kv.swa_bytes)}")
        return [f"  KV cache ({types}): " + "; ".join(parts)]

    def describe(self) -> str:
        """A human-readable account of the plan, with the breakdown of every buffer."""
        lines = [f"n_gpu_layers = {self.n_gpu_layers} (of {self.max_gpu_layers}: {self.n_layers} layers + output)"]
        vision = f", vision {format_size(self.vision_compute)}" if self.vision_compute else ""
        compute = f"  compute buffers: text {format_size(self.text_compute)} (micro-batch " \
                  f"{self.kv.n_ubatch if self.kv else self.settings.n_ubatch}){vision}"
        if self.gpu_available:
            if self.fits_fully:
                where = "whole model on the GPU"
            elif self.n_gpu_layers == 0:
                where = "no layer on the GPU"
            elif self.repeating_layers_on_gpu == 0:
                where = "only the output layer on the GPU"
            else:
                where = f"output layer and the last {self.repeating_layers_on_gpu} of {self.n_layers} layers on the GPU"
            lines.append(f"{where}; {self.settings.describe()}")
            lines.append(
                f"GPU: {format_size(self.gpu_bytes)} = weights {format_size(self.gpu_weights)} + KV "
                f"{format_size(self.gpu_kv)} + mmproj {format_size(self.gpu_mmproj)} + compute "
                f"{format_size(self.gpu_compute)}"
            )
            if self.budget_bytes is not None:
                lines.append(
                    f"budget {format_size(self.budget_bytes)}, of which {format_size(self.headroom_bytes)} "
                    "kept free for the CUDA runtime"
                )
        else:
            lines.append(f"CPU only; {self.settings.describe()}")
        lines.append(
            f"CPU: {format_size(self.cpu_bytes)} = weights {format_size(self.cpu_weights)} + KV "
            f"{format_size(self.cpu_kv)}" + (f" + mmproj {format_size(self.cpu_mmproj)}" if self.cpu_mmproj else "")
            + (f" + compute {format_size(self.cpu_compute)}" if self.cpu_compute else "")
            + f" + logits {format_size(self.cpu_output)}"
        )
        lines.extend(self.kv_lines())
        lines.append(compute)
        lines.extend(self.notes)
        return "\n".join(lines)


def kv_cache_type(name: str) -> gguf.GGMLQuantizationType:
    """The ggml type of a KV cache type name (f16, q8_0, q4_0)."""
    return gguf.GGMLQuantizationType(KV_TYPES[parse_kv_type(name)][0])


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"{name} must be a positive whole number, got {value!r}")


def plan_offload(
    gguf_path: Path | str,
    *,
    n_ctx: int | None = None,
    vram_bytes: int | None = None,
    mmproj_path: Path | str | None = None,
    n_ubatch: int | None = None,
    gpu_available: bool | None = None,
    flash_attn: bool | str | None = None,
    swa_full: bool | None = None,
    kv_type: str | None = None,
    headroom_bytes: int = DEFAULT_HEADROOM_BYTES,
    settings: ContextSettings | None = None,
) -> OffloadPlan:
    """The largest ``n_gpu_layers`` whose weights, KV cache, mmproj and compute buffers fit in the GPU budget.

    ``settings`` (``runtime.context_settings``) describe the context as it will be created — this runtime's
    defaults unless given; the keywords ``n_ctx``, ``n_ubatch``, ``flash_attn``, ``swa_full`` and ``kv_type``
    (both K and V) override single fields. ``n_ctx=0`` means the model's training context.
    ``vram_bytes=None`` asks pynvml / nvidia-smi for GPU 0's free memory. ``gpu_available=None`` asks
    llama-cpp-python whether it can offload at all; without offload the plan is CPU-only (0 layers).
    """
    model = read_text_model(gguf_path)
    vision = read_vision_model(mmproj_path) if mmproj_path is not None else None
    settings = _settings(model, settings, n_ctx=n_ctx, n_ubatch=n_ubatch, flash_attn=flash_attn, swa_full=swa_full,
                         kv_type=kv_type)
    if vram_bytes is not None and (not isinstance(vram_bytes, int) or vram_bytes < 1):
        raise UserError(f"the GPU memory budget must be a positive number of bytes, got {vram_bytes!r}")
    if headroom_bytes < 0:
        raise UserError(f"headroom_bytes must not be negative, got {headroom_bytes}")
    notes: list[str] = []
    if vision is not None and vision.n_image_tokens and min(settings.n_ubatch, settings.n_ctx_total) < \
            vision.n_image_tokens:
        notes.append(
            f"warning: n_ubatch {min(settings.n_ubatch, settings.n_ctx_total)} is below the {vision.n_image_tokens} "
            "tokens of one image; an image must fit in one micro-batch, so raise n_ubatch (and n_batch)"
        )
    if model.context_length and settings.n_ctx > model.context_length:
        notes.append(f"note: n_ctx {settings.n_ctx} is beyond the model's training context {model.context_length}")

    if gpu_available is None:
        gpu_available, reason = gpu_offload_supported()
        if reason:
            notes.append(reason)
    elif not gpu_available:
        notes.append("no GPU offload requested: everything runs on the CPU")

    costs = MemoryModel(model, vision, settings, gpu_available, headroom_bytes)
    if not gpu_available:
        return costs.plan(0, None, notes)

    if vram_bytes is None:
        budget = query_free_vram()
        notes.append(f"budget: {format_size(budget)} free on GPU 0 now (pass --vram to plan for another amount)")
    else:
        budget = vram_bytes
    usable = budget - headroom_bytes
    for n_gpu in range(model.n_layers + 1, -1, -1):
        candidate = costs.plan(n_gpu, budget, notes)
        if candidate.gpu_bytes <= usable:
            if n_gpu < model.n_layers + 1:
                needed_all = costs.plan(model.n_layers + 1, budget, notes).gpu_bytes + headroom_bytes
                hint = "lower n_ctx, use a quantized KV cache or a smaller quant to offload more"
                if settings.swa_full and any(model.sliding_layers):
                    hint += " (or drop swa_full: sliding layers then keep only their window)"
                notes.append(f"the whole model needs about {format_size(needed_all)} of GPU memory; {hint}")
                candidate = costs.plan(n_gpu, budget, notes)
            return candidate
    notes.append(
        f"warning: the budget {format_size(budget)} is below the "
        f"{format_size(costs.plan(0, budget, notes).gpu_bytes + headroom_bytes)} needed before any layer is offloaded "
        "(mmproj, compute buffers, headroom): offloading no layer; the GPU may still run out of memory — use a "
        "smaller n_ubatch or n_ctx, or a CPU-only build"
    )
    return costs.plan(0, budget, notes)


def _settings(model: TextModel, settings: ContextSettings | None, *, n_ctx: int | None = None,
              n_ubatch: int | None = None, flash_attn: bool | str | None = None, swa_full: bool | None = None,
              kv_type: str | None = None) -> ContextSettings:
    settings = settings if settings is not None else ContextSettings(n_outputs_max=1)
    changes: dict[str, object] = {}
    if n_ctx is not None:
        if n_ctx == 0:
            n_ctx = model.context_length
        _check_positive("n_ctx", n_ctx)
        changes["n_ctx"] = n_ctx
    if n_ubatch is not None:
        _check_positive("n_ubatch", n_ubatch)
        changes["n_ubatch"] = n_ubatch
    if flash_attn is not None:
        changes["flash_attn"] = flash_attn
    if swa_full is not None:
        changes["swa_full"] = swa_full
    if kv_type is not None:
        changes["type_k"] = changes["type_v"] = kv_type
    return settings.with_(**changes) if changes else settings


class MemoryModel:
    """What one context of a model costs, computed once; ``plan(n_gpu_layers, ...)`` places it (``plan_offload``)."""

    def __init__(self, model: TextModel, vision: VisionModel | None, settings: ContextSettings,
                 gpu_available: bool, headroom_bytes: int):
        settings.check_model((model.key_length,), (model.value_length,))
        self.model, self.vision, self.settings = model, vision, settings
        self.gpu_available, self.headroom = gpu_available, headroom_bytes
        self.kv = kv_cache_layout(model, settings)
        self.text_compute = text_compute_bytes(model, self.kv, settings,
                                               CUDA_ALIGNMENT if gpu_available else CPU_ALIGNMENT)
        self.vision_compute = vision_compute_bytes(vision, settings.flash_attn_planned) if vision is not None else 0
        self.output = output_buffer_bytes(model, settings)

    def plan(self, n_gpu: int, budget: int | None, notes: list[str] | tuple[str, ...] = ()) -> OffloadPlan:
        model, kv = self.model, self.kv
        gpu_start = max(model.n_layers + 1 - n_gpu, 0)
        on_gpu = range(gpu_start, model.n_layers)
        gpu_weights = sum(model.layer_bytes[il] for il in on_gpu) + (model.output_bytes if n_gpu >= 1 else 0)
        gpu_kv = sum(kv.layer_bytes[il] for il in on_gpu)
        cpu_weights = model.input_bytes + sum(model.layer_bytes[:gpu_start])
        if n_gpu < 1:  # output layer on the CPU; a tied output matrix is token_embd itself, not a copy
            cpu_weights += model.output_bytes - (model.output_matrix_bytes if model.tied_embeddings else 0)
        vision_weights = self.vision.weight_bytes if self.vision is not None else 0
        gpu_compute = cpu_compute = 0
        if self.gpu_available:
            # with op_offload the GPU also runs big-batch matmuls of CPU-resident weights, staging each weight in
            # its compute buffer (an upper bound for partial offloads: the graph itself is split between devices)
            cpu_layers = range(0, min(gpu_start, model.n_layers))
            staging = max((model.layer_largest_tensor_bytes[il] for il in cpu_layers), default=0)
            if n_gpu < 1:
                staging = max(staging, model.output_matrix_bytes)
            gpu_compute = self.text_compute + staging + self.vision_compute
            # the token rows are gathered on the CPU (token_embd stays there); layers left on the CPU run there
            n_rows = kv.n_ubatch
            cpu_compute = self.text_compute if n_gpu < model.n_layers + 1 else model.n_embd * n_rows * 4
        else:
            cpu_compute = self.text_compute + self.vision_compute
        return OffloadPlan(
            n_gpu_layers=n_gpu,
            n_layers=model.n_layers,
            n_ctx=self.settings.n_ctx,
            gpu_available=self.gpu_available,
            budget_bytes=budget,
            headroom_bytes=self.headroom if self.gpu_available else 0,
            gpu_weights=gpu_weights,
            gpu_kv=gpu_kv,
            gpu_mmproj=vision_weights if self.gpu_available else 0,
            gpu_compute=gpu_compute,
            cpu_weights=cpu_weights,
            cpu_kv=sum(kv.layer_bytes) - gpu_kv,
            cpu_mmproj=0 if self.gpu_available else vision_weights,
            notes=tuple(notes),
            cpu_compute=cpu_compute,
            cpu_output=self.output,
            settings=self.settings,
            kv=kv,
            text_compute=self.text_compute,
            vision_compute=self.vision_compute,
        )


def largest_context(gguf_path: Path | str, *, memory_bytes: int, gpu: bool, settings: ContextSettings,
                    mmproj_path: Path | str | None = None, headroom_bytes: int = DEFAULT_HEADROOM_BYTES,
                    at_most: int | None = None) -> int | None:
    """``--ctx auto``: the largest ``n_ctx`` per sequence (a multiple of 256, at most the model's training
    context and ``at_most``) whose whole plan fits ``memory_bytes`` less the headroom — on the GPU every layer
    offloaded, on the CPU weights + KV + buffers in RAM. None when not even 256 positions fit."""
    model = read_text_model(gguf_path)
    vision = read_vision_model(mmproj_path) if mmproj_path is not None else None
    limit = model.context_length or 131072
    if at_most is not None:
        limit = min(limit, at_most)
    limit = max(KV_CELL_PADDING, limit // KV_CELL_PADDING * KV_CELL_PADDING)

    def fits(n_ctx: int) -> bool:
        plan = MemoryModel(model, vision, settings.with_(n_ctx=n_ctx), gpu, headroom_bytes).plan(
            model.n_layers + 1 if gpu else 0, memory_bytes, [])
        need = plan.gpu_bytes if gpu else plan.cpu_bytes
        return need <= memory_bytes - headroom_bytes

    if not fits(KV_CELL_PADDING):
        return None
    low, high = 1, limit // KV_CELL_PADDING  # in units of 256: low fits
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle * KV_CELL_PADDING):
            low = middle
        else:
            high = middle - 1
    return low * KV_CELL_PADDING


# ---------------------------------------------------------------------------------------------------
# Splitting across devices (local GPUs and RPC workers)


@dataclass(frozen=True)
class SplitTarget:
    """A device layers may go to: its name as printed, and the memory it reports free."""

    name: str
    free_bytes: int
    remote: bool = False


@dataclass(frozen=True)
class DeviceShare:
    """What one device holds under a split plan."""

    name: str
    layers: tuple[int, ...]  # repeating-layer indices; ``n_layers`` stands for the output layer
    weights: int
    kv: int
    compute: int
    budget: int

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.compute


def assign_layers(n_layers: int, n_gpu_layers: int, split: Sequence[float]) -> list[int | None]:
    """The device index of each layer ``0..n_layers`` (the last is the output layer; None = the CPU), exactly as
    llama.cpp's ``load_tensors`` assigns them: the last ``n_gpu_layers`` layers, cut by the cumulative normalized
    ``split`` (``upper_bound`` of ``(il - start) / n_gpu_layers``), computed in float32 as llama.cpp does."""
    import numpy as np

    shares = np.asarray(split, dtype=np.float32)
    cumulative = np.cumsum(shares, dtype=np.float32)
    cumulative = cumulative / np.float32(cumulative[-1])
    start = max(n_layers + 1 - n_gpu_layers, 0)
    active = min(n_gpu_layers, n_layers + 1)
    where: list[int | None] = []
    for il in range(n_layers + 1):
        if il < start or il - start >= active:
            where.append(None)
            continue
        fraction = np.float32(il - start) / np.float32(active)
        where.append(min(int(np.searchsorted(cumulative, fraction, side="right")), len(shares) - 1))
    return where


@dataclass(frozen=True)
class SplitPlan:
    """Layers, KV cache and compute buffers per device when a model is split across devices (llama.cpp's
    ``devices`` list and ``tensor_split``); the input layer, the layers not offloaded and the mmproj stay local."""

    n_gpu_layers: int
    n_layers: int
    n_ctx: int
    tensor_split: tuple[float, ...]
    shares: tuple[DeviceShare, ...]
    cpu_layers: tuple[int, ...]
    cpu_weights: int
    cpu_kv: int
    mmproj_bytes: int
    mmproj_where: str
    fits: bool
    notes: tuple[str, ...] = field(default=())

    def describe(self) -> str:
        def layer_list(layers: Sequence[int]) -> str:
            names = [("output" if il == self.n_layers else str(il)) for il in layers]
            repeating = [il for il in layers if il < self.n_layers]
            span = f"{repeating[0]}-{repeating[-1]}" if len(repeating) > 1 else ",".join(map(str, repeating))
            out = " + output" if self.n_layers in layers else ""
            if not names:
                return "no layer"
            return f"layers {span}{out}" if repeating else "output"

        split = ", ".join(f"{share:.3f}" for share in self.tensor_split)
        lines = [f"split across {len(self.shares)} devices: n_gpu_layers = {self.n_gpu_layers} "
                 f"(of {self.n_layers + 1}), context {self.n_ctx} tokens, tensor_split {split}"]
        for share in self.shares:
            lines.append(f"  {share.name}: {layer_list(share.layers)} ({len(share.layers)}); weights "
                         f"{format_size(share.weights)} + KV {format_size(share.kv)} + compute "
                         f"{format_size(share.compute)} (estimate) = {format_size(share.total)} of "
                         f"{format_size(share.budget)} usable")
        lines.append("  local CPU: input layer" + (f" + {layer_list(self.cpu_layers)}" if self.cpu_layers else "")
                     + f"; weights {format_size(self.cpu_weights)} + KV {format_size(self.cpu_kv)}")
        if self.mmproj_bytes:
            lines.append(f"  mmproj (vision): {format_size(self.mmproj_bytes)} on the {self.mmproj_where} "
                         "(never remote)")
        lines.extend(self.notes)
        return "\n".join(lines)


def plan_split(
    gguf_path: Path | str,
    targets: Sequence[SplitTarget],
    *,
    n_ctx: int | None = None,
    mmproj_path: Path | str | None = None,
    n_ubatch: int | None = None,
    local_gpu: bool = False,
    n_gpu_layers: int | None = None,
    flash_attn: bool | str | None = None,
    swa_full: bool | None = None,
    kv_type: str | None = None,
    headroom_bytes: int = DEFAULT_HEADROOM_BYTES,
    settings: ContextSettings | None = None,
) -> SplitPlan:
    """Split a model's layers across ``targets`` in proportion to the memory each reports free (less
    ``headroom_bytes``), as llama.cpp's ``tensor_split`` does; with ``n_gpu_layers=None`` the most layers
    whose weights, KV cache and compute buffers fit every device's share (the rest stay on the local CPU).

    The output layer (the 262,208-row output matrix) goes to the last target: list the local GPU last to keep
    it, and the logits, local. ``local_gpu``: the mmproj runs on the local GPU (else the local CPU).
    ``settings`` and the keywords describe the context as in ``plan_offload``. A device's compute buffer is
    counted as the whole graph's (``runtime.compute_graph``, CUDA's alignment): an upper bound for its part.
    """
    if not targets:
        raise UserError("plan_split needs at least one device")
    model = read_text_model(gguf_path)
    vision = read_vision_model(mmproj_path) if mmproj_path is not None else None
    settings = _settings(model, settings, n_ctx=n_ctx, n_ubatch=n_ubatch, flash_attn=flash_attn, swa_full=swa_full,
                         kv_type=kv_type)
    settings.check_model((model.key_length,), (model.value_length,))
    kv = kv_cache_layout(model, settings)
    graph_bytes = text_compute_bytes(model, kv, settings, CUDA_ALIGNMENT)
    budgets = [max(t.free_bytes - headroom_bytes, 0) for t in targets]
    total = sum(budgets)
    split = tuple(b / total if total else 1.0 / len(budgets) for b in budgets)
    notes: list[str] = []
    if any(t.remote for t in targets):
        notes.append("a CPU worker reports its machine's whole RAM as free; weights are sent to the workers at load")

    def plan_for(n_gpu: int) -> SplitPlan:
        where = assign_layers(model.n_layers, n_gpu, split)
        shares = []
        for index, target in enumerate(targets):
            layers = tuple(il for il, device in enumerate(where) if device == index)
            repeating = [il for il in layers if il < model.n_layers]
            weights = sum(model.layer_bytes[il] for il in repeating) + (
                model.output_bytes if model.n_layers in layers else 0)
            kv_bytes = sum(kv.layer_bytes[il] for il in repeating)
            compute = graph_bytes if layers else 0
            shares.append(DeviceShare(target.name, layers, weights, kv_bytes, compute, budgets[index]))
        cpu_layers = tuple(il for il, device in enumerate(where) if device is None)
        cpu_repeating = [il for il in cpu_layers if il < model.n_layers]
        cpu_weights = model.input_bytes + sum(model.layer_bytes[il] for il in cpu_repeating)
        if model.n_layers in cpu_layers:
            cpu_weights += model.output_bytes - (model.output_matrix_bytes if model.tied_embeddings else 0)
        return SplitPlan(n_gpu_layers=n_gpu, n_layers=model.n_layers, n_ctx=settings.n_ctx_total, tensor_split=split,
                         shares=tuple(shares), cpu_layers=cpu_layers, cpu_weights=cpu_weights,
                         cpu_kv=sum(kv.layer_bytes[il] for il in cpu_repeating),
                         mmproj_bytes=vision.weight_bytes if vision else 0,
                         mmproj_where="local GPU" if local_gpu else "local CPU",
                         fits=all(s.total <= s.budget for s in shares), notes=tuple(notes))

    if n_gpu_layers is not None:
        plan = plan_for(min(max(n_gpu_layers, 0), model.n_layers + 1))
        if not plan.fits:
            notes.append("warning: a device's share exceeds its memory (estimate); lower n_gpu_layers or n_ctx")
            plan = plan_for(plan.n_gpu_layers)
        return plan
    for n_gpu in range(model.n_layers + 1, -1, -1):
        plan = plan_for(n_gpu)
        if plan.fits:
            if n_gpu < model.n_layers + 1:
                notes.append(f"{model.n_layers + 1 - n_gpu} layers stay on the local CPU: the devices' memory "
                             "does not hold more (lower n_ctx, use a smaller quant, or add a worker)")
                plan = plan_for(n_gpu)
            return plan
    notes.append("warning: no layer fits the devices' memory (estimate); everything runs on the local CPU")
    return plan_for(0)
