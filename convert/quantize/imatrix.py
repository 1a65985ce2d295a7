"""Importance matrices (imatrix) for llama.cpp's quantizer, computed on chat prompts that include images.

What is collected is what llama.cpp's ``llama-imatrix`` collects (tools/imatrix/imatrix.cpp): through the
scheduler's eval callback, for every ``MUL_MAT`` (and ``MUL_MAT_ID``) whose weight ``src0`` is a layer
tensor (name starting ``blk.``), the sum over all activation rows of ``src1`` of the squared value of each
input column, and the number of rows. Choices, where llama-imatrix has options or rules:

* the output projection is not collected (llama-imatrix needs ``--process-output`` for it; Gemma 3 ties
  it to ``token_embd.weight``, which is not a ``blk.`` tensor either);
* llama-imatrix ignores batches of fewer than 16 rows (meant to skip token-by-token generation); this
  tool never generates, every calibration position is evaluated in one batch per prompt part, so all
  rows are counted, including short text runs between images;
* rows at image-embedding positions are counted: they are inputs to the same decoder matmuls. Every
  position requests its output row, as llama-imatrix does for text, so that the last layer's feed-forward
  matmuls see every row (llama.cpp otherwise drops non-output rows before them);
* sums are accumulated in float64 (llama-imatrix uses float32) and stored as float32;
* the vision tower and projector (mmproj) are not part of the imatrix: libmtmd runs them in its own
  graph, and llama.cpp's quantizer only applies an imatrix to the text model.

Prompts are rendered like the Hugging Face Gemma 3 processor renders them: the chat template stored in
the GGUF (``tokenizer.chat_template``), each image expanded to ``\\n\\n<start_of_image>`` + the image's
embeddings + ``<end_of_image>\\n\\n``. Each calibration item is evaluated from an empty KV cache.
"""

from __future__ import annotations

import ctypes
import logging
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGUFValueType

from medgemma_gguf.atomic import atomic_output
from medgemma_gguf.convert.quantize.calibration import CalibrationSet, load_calibration, render_image, without_images
from medgemma_gguf.errors import UserError, setting
from medgemma_gguf.gguf_info import read_gguf_info
from medgemma_gguf.runtime.prompt import render_template, split_at_images

log = logging.getLogger(__name__)

KEY_TYPE = "general.type"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
KEY_CALIBRATION = "imatrix.calibration."  # our own keys (llama.cpp ignores them): name, items, sha256, ...
SUM_SUFFIX = ".in_sum2"
COUNT_SUFFIX = ".counts"


@dataclass
class Imatrix:
    """Per-weight activation statistics: raw Σx² per input column and the number of rows summed.

    ``sums[name]`` is float32 of length n_mat × n_cols (n_mat = 1 for dense weights; the expert count for
    ``MUL_MAT_ID`` weights), ``counts[name]`` float32 of length n_mat.
    """

    sums: dict[str, np.ndarray]
    counts: dict[str, np.ndarray]
    datasets: list[str]
    chunk_count: int
    chunk_size: int
    calibration: dict[str, Any] | None = field(default=None)

    @property
    def tensor_names(self) -> list[str]:
        """The weight names covered, sorted."""
        return sorted(self.sums)

    def mean_squares(self, name: str) -> np.ndarray:
        """Σx² / count per column: the values llama-quantize passes to ``llama_model_quantize``.

        As llama-quantize does, an expert with a zero count gets ones.
        """
        counts = np.asarray(self.counts[name], dtype=np.float64)
        sums = np.asarray(self.sums[name], dtype=np.float64).reshape(len(counts), -1)
        safe = np.where(counts > 0, counts, 1.0)
        values = np.where(counts[:, None] > 0, sums / safe[:, None], 1.0)
        return values.astype(np.float32).reshape(-1)


# --- ggml tensors seen from the eval callback ---------------------------------------------------------------
GGML_MAX_DIMS = 4
GGML_MAX_SRC = 10
GGML_MAX_OP_PARAMS = 64
GGML_MAX_NAME = 64
GGML_TYPE_F32 = 0
GGML_OBJECT_SIZE = 32  # sizeof(struct ggml_object) in ggml.c: offs, size, next, type + 4 bytes padding


class GgmlTensor(ctypes.Structure):
    """ctypes mirror of ``struct ggml_tensor`` (ggml/include/ggml.h)."""


GgmlTensor._fields_ = [
    ("type", ctypes.c_int),
    ("buffer", ctypes.c_void_p),
    ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
    ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
    ("op", ctypes.c_int),
    ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
    ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(GgmlTensor) * GGML_MAX_SRC),
    ("view_src", ctypes.POINTER(GgmlTensor)),
    ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p),
    ("name", ctypes.c_char * GGML_MAX_NAME),
    ("extra", ctypes.c_void_p),
    ("padding", ctypes.c_char * 8),
]


class _Ggml:
    """The few libggml-base functions the collector needs, and the op numbers looked up by name."""

    def __init__(self) -> None:
        import llama_cpp

        lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
        lib.ggml_op_name.restype, lib.ggml_op_name.argtypes = ctypes.c_char_p, [ctypes.c_int]
        lib.ggml_tensor_overhead.restype = ctypes.c_size_t
        lib.ggml_nbytes.restype, lib.ggml_nbytes.argtypes = ctypes.c_size_t, [ctypes.c_void_p]
        lib.ggml_backend_buffer_is_host.restype = ctypes.c_bool
        lib.ggml_backend_buffer_is_host.argtypes = [ctypes.c_void_p]
        lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
        if lib.ggml_tensor_overhead() != GGML_OBJECT_SIZE + ctypes.sizeof(GgmlTensor):
            raise RuntimeError("this llama-cpp-python's struct ggml_tensor differs from convert.imatrix.GgmlTensor")
        self.lib = lib
        names: dict[str, int] = {}
        for op in range(256):
            name = lib.ggml_op_name(op)
            if not name or name in (b"COUNT",):
                break
            names[name.decode()] = op
        self.mul_mat = names["MUL_MAT"]
        self.mul_mat_id = names["MUL_MAT_ID"]

    def array(self, tensor: GgmlTensor, dtype: type) -> np.ndarray:
        """The tensor's values as a numpy array of shape [ne3, ne2, ne1, ne0] (copied off-device if needed)."""
        address = ctypes.addressof(tensor)
        nbytes = self.lib.ggml_nbytes(address)
        if tensor.buffer and not self.lib.ggml_backend_buffer_is_host(tensor.buffer):
            buffer = np.empty(nbytes, dtype=np.uint8)
            self.lib.ggml_backend_tensor_get(address, buffer.ctypes.data, 0, nbytes)
        else:
            buffer = (ctypes.c_char * nbytes).from_address(tensor.data)
        shape = tuple(int(tensor.ne[i]) for i in reversed(range(GGML_MAX_DIMS)))
        strides = tuple(int(tensor.nb[i]) for i in reversed(range(GGML_MAX_DIMS)))
        return np.ndarray(shape, dtype=dtype, buffer=buffer, strides=strides)


def weight_name(node_name: str) -> str:
    """The weight's GGUF name from a graph name (``CUDA0#blk.0.attn_k.weight#0`` → ``blk.0.attn_k.weight``)."""
    if "#" in node_name:
        return node_name.split("#")[1]
    return node_name


def accumulate_mul_mat(sums: np.ndarray, counts: np.ndarray, x: np.ndarray, weight_ne: Sequence[int]) -> None:
    """Add one MUL_MAT's activations ``x`` [ne3, ne2, ne1, ne0] to ``sums`` [n_mat, ne0] and ``counts`` [n_mat].

    ``weight_ne`` is src0's ne: a 3D/4D weight holds n_mat = ne2 × ne3 matrices, activation slice (i3, i2)
    going to matrix (i3 mod ne3) × ne2 + (i2 mod ne2), as llama-imatrix maps them.
    """
    ne2, ne3 = int(weight_ne[2]), int(weight_ne[3])
    n_mat = ne2 * ne3
    if n_mat == 1:
        rows = x.reshape(-1, x.shape[-1]).astype(np.float64)
        sums[0] += np.einsum("ij,ij->j", rows, rows)
    else:
        for i3 in range(x.shape[0]):
            for i2 in range(x.shape[1]):
                rows = x[i3, i2].astype(np.float64)
                sums[(i3 % ne3) * ne2 + (i2 % ne2)] += np.einsum("ij,ij->j", rows, rows)
    counts += x.shape[0] * x.shape[1] * x.shape[2] // n_mat


def accumulate_mul_mat_id(sums: np.ndarray, counts: np.ndarray, x: np.ndarray, ids: np.ndarray) -> None:
    """Add one MUL_MAT_ID's activations: ``x`` [n_tokens, n_x, ne0], ``ids`` [n_tokens, n_ids] expert ids.

    Row (token t, slot k) reads ``x[t, k mod n_x]`` and goes to expert ``ids[t, k]``; each adds one count.
    """
    n_tokens, n_ids = ids.shape
    slots = np.arange(n_ids) % x.shape[1]
    rows = x[:, slots, :].reshape(n_tokens * n_ids, -1).astype(np.float64)
    experts = ids.reshape(-1).astype(np.int64)
    if experts.size and (experts.min() < 0 or experts.max() >= len(counts)):
        raise RuntimeError("MUL_MAT_ID routed to an expert id outside the weight's experts")
    np.add.at(sums, experts, rows * rows)
    counts += np.bincount(experts, minlength=len(counts))


class ActivationCollector:
    """The eval callback: accumulates Σx² and row counts per weight. Keep the object alive while in use."""

    def __init__(self) -> None:
        import llama_cpp

        self.ggml = _Ggml()
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, np.ndarray] = {}
        self.error: BaseException | None = None
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._on_node)

    def _wants(self, node: GgmlTensor) -> bool:
        if node.op not in (self.ggml.mul_mat, self.ggml.mul_mat_id) or not node.src[0] or not node.src[1]:
            return False
        weight, activations = node.src[0].contents, node.src[1].contents
        return weight_name(weight.name.decode()).startswith("blk.") and activations.type == GGML_TYPE_F32

    def _storage(self, name: str, n_mat: int, n_cols: int) -> tuple[np.ndarray, np.ndarray]:
        if name not in self.sums:
            self.sums[name] = np.zeros((n_mat, n_cols), dtype=np.float64)
            self.counts[name] = np.zeros(n_mat, dtype=np.int64)
        sums, counts = self.sums[name], self.counts[name]
        if sums.shape != (n_mat, n_cols):
            raise RuntimeError(f"{name}: activation width changed from {sums.shape} to {(n_mat, n_cols)}")
        return sums, counts

    def _collect(self, node: GgmlTensor) -> None:
        weight, activations = node.src[0].contents, node.src[1].contents
        name = weight_name(weight.name.decode())
        x = self.ggml.array(activations, np.float32)
        if node.op == self.ggml.mul_mat_id:
            if x.shape[0] != 1:
                raise RuntimeError(f"{name}: MUL_MAT_ID activations with more than 3 dimensions")
            ids = self.ggml.array(node.src[2].contents, np.int32)[0, 0]  # [n_tokens, n_ids]
            sums, counts = self._storage(name, int(weight.ne[2]), x.shape[-1])
            accumulate_mul_mat_id(sums, counts, x[0], ids)
        else:
            sums, counts = self._storage(name, int(weight.ne[2] * weight.ne[3]), x.shape[-1])
            accumulate_mul_mat(sums, counts, x, list(weight.ne))

    def _on_node(self, tensor: Any, ask: bool, _user_data: Any) -> bool:
        try:
            node = ctypes.cast(tensor, ctypes.POINTER(GgmlTensor)).contents
            if ask:
                return self._wants(node)
            self._collect(node)
            return True
        except BaseException as exc:  # never let an exception unwind through C; re-raised after decode
            self.error = exc
            return False

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"activation collection failed: {self.error}") from self.error

    def result(self, datasets: list[str], chunk_count: int, chunk_size: int,
               calibration: dict[str, Any] | None = None) -> Imatrix:
        bad = [name for name, sums in self.sums.items() if not np.isfinite(sums).all()]
        if bad:
            raise UserError(f"non-finite activations in {bad[0]}; the model overflows (never use F16 for Gemma 3) "
                            "or is damaged — compute the imatrix on the F32 or BF16 GGUF")
        return Imatrix(
            sums={name: sums.astype(np.float32).reshape(-1) for name, sums in self.sums.items()},
            counts={name: counts.astype(np.float32) for name, counts in self.counts.items()},
            datasets=datasets, chunk_count=chunk_count, chunk_size=chunk_size, calibration=calibration)


# --- prompts ------------------------------------------------------------------------------------------------
@dataclass
class PromptPlan:
    """One calibration item ready to evaluate: token runs and images alternating, starting with tokens."""

    item_id: str
    token_runs: list[list[int]]
    images: list[np.ndarray]
    image_positions: int

    @property
    def text_tokens(self) -> int:
        return sum(len(run) for run in self.token_runs)

    @property
    def positions(self) -> int:
        return self.text_tokens + self.image_positions


# --- decoding every row ---------------------------------------------------------------------------------------
def _decode_all_rows(engine: Any, tokens: Sequence[int] | None = None, embeddings: np.ndarray | None = None) -> None:
    """Decode a token run or a block of image embeddings with every row an output row.

    Image blocks are decoded with non-causal attention (Gemma 3 attends bidirectionally within an image),
    as libmtmd's helper does; asking for every row keeps the last layer's rows for the statistics.
    """
    import llama_cpp

    context = engine.llama_context
    if tokens is not None:
        n_rows = len(tokens)
    elif embeddings is not None:
        n_rows = embeddings.shape[0]
    else:
        raise ValueError("pass tokens or embeddings")
    if engine.n_past + n_rows > engine.n_ctx:
        raise RuntimeError(f"{engine.n_past + n_rows} positions do not fit the context of {engine.n_ctx}")
    width = embeddings.shape[1] if embeddings is not None else 0
    batch = llama_cpp.llama_batch_init(n_rows, width, 1)
    try:
        batch.n_tokens = n_rows
        if embeddings is not None:
            data = np.ascontiguousarray(embeddings, dtype=np.float32)
            ctypes.memmove(batch.embd, data.ctypes.data, data.nbytes)
        for i in range(n_rows):
            if tokens is not None:
                batch.token[i] = tokens[i]
            batch.pos[i] = engine.n_past + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = True
        if embeddings is not None:
            llama_cpp.llama_set_causal_attn(context, False)
        try:
            status = llama_cpp.llama_decode(context, batch)
        finally:
            if embeddings is not None:
                llama_cpp.llama_set_causal_attn(context, True)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status}")
        engine.n_past += n_rows
    finally:
        llama_cpp.llama_batch_free(batch)


# --- computing --------------------------------------------------------------------------------------------------
def _native_image_size(mmproj_path: Path) -> int:
    size = read_gguf_info(mmproj_path).metadata.get("clip.vision.image_size")
    if not isinstance(size, int) or size <= 0:
        raise UserError(f"{mmproj_path} has no clip.vision.image_size; pass the model's image mmproj")
    return size


def _plan_item(engine: Any, item: Any, template: str, bos: str, image_size: int | None,
               chunk_size: int) -> PromptPlan:
    from medgemma_gguf.runtime.engine import ImagePart

    texts = split_at_images(render_template(template, item.messages, bos_token=bos, add_generation_prompt=False))
    runs = [engine.tokenize(text) for text in texts]
    images = [render_image(spec, image_size) for spec in item.image_specs] if image_size else []
    counts = [engine.image_token_count(ImagePart(image)) for image in images]
    plan = PromptPlan(item.id, runs, images, sum(counts))
    if plan.positions > chunk_size:
        fixed = plan.positions - len(runs[-1])
        if fixed + 1 > chunk_size:
            raise UserError(f"calibration item {item.id!r} needs {fixed + 1} positions before its last text; "
                            f"raise the chunk size above {chunk_size}")
        runs[-1] = runs[-1][: chunk_size - fixed]
        log.info("calibration item %s truncated to %d positions", item.id, chunk_size)
    return plan


def _chunks(plans: list[PromptPlan], chunk_size: int) -> list[list[PromptPlan]]:
    """Pack consecutive items greedily into chunks of at most ``chunk_size`` positions."""
    chunks: list[list[PromptPlan]] = []
    used = chunk_size + 1
    for plan in plans:
        if used + plan.positions > chunk_size:
            chunks.append([])
            used = 0
        chunks[-1].append(plan)
        used += plan.positions
    return chunks


def compute_imatrix(model_path: Path | str, mmproj_path: Path | str | None = None, *,
                    calibration: Path | str | Any | None = None, chunk_size: int = 512,
                    max_chunks: int | None = None, progress: bool = True,
                    n_threads: int | None = None) -> Imatrix:
    """Run the calibration set through the text model (+ mmproj for image turns) and collect the imatrix.

    ``calibration``: a JSONL path, a loaded ``CalibrationSet``, or None for the bundled set. Items are
    packed in order into chunks of at most ``chunk_size`` positions (an item longer than that is cut at
    the end of its text); ``max_chunks`` stops after that many chunks. Without ``mmproj_path`` image
    entries are left out of the prompts (a text-only model).
    """
    from tqdm import tqdm

    from medgemma_gguf.runtime.engine import Engine

    if chunk_size < 16:
        raise UserError(f"chunk size {chunk_size} is too small; use at least 16 (llama-imatrix uses 512)")
    if max_chunks is not None and max_chunks < 1:
        raise UserError(f"{setting('max_chunks')} must be at least 1, got {max_chunks}")
    calib = calibration if isinstance(calibration, CalibrationSet) else load_calibration(calibration)
    model_path = Path(model_path)
    template = read_gguf_info(model_path).metadata.get("tokenizer.chat_template")
    if not isinstance(template, str) or not template:
        raise UserError(f"{model_path} has no tokenizer.chat_template; re-convert it with medgemma-gguf convert")
    image_size = _native_image_size(Path(mmproj_path)) if mmproj_path else None
    if image_size is None and calib.images:
        log.warning("no mmproj given: the calibration's %d image turns are evaluated as text only", calib.images)
        calib = without_images(calib)

    collector = ActivationCollector()
    with Engine(model_path, Path(mmproj_path) if mmproj_path else None, n_ctx=chunk_size, n_batch=chunk_size,
                n_ubatch=chunk_size, n_threads=n_threads, eval_callback=collector.callback) as engine:
        bos = engine.token_piece(engine.bos_token, special=True).decode("utf-8")
        plans = [_plan_item(engine, item, template, bos, image_size, chunk_size) for item in calib.items]
        chunks = _chunks(plans, chunk_size)[:max_chunks]
        chosen = [plan for chunk in chunks for plan in chunk]
        for plan in tqdm(chosen, desc="imatrix", unit="item", disable=not progress):
            _evaluate_plan(engine, plan, collector)
    description = {
        "name": calib.name, "file": calib.path.name, "sha256": calib.sha256, "items": len(chosen),
        "image_items": sum(1 for plan in chosen if plan.images), "images": sum(len(p.images) for p in chosen),
        "tokens": sum(plan.text_tokens for plan in chosen),
        "image_positions": sum(plan.image_positions for plan in chosen),
        "positions": sum(plan.positions for plan in chosen),
    }
    return collector.result([calib.name], len(chunks), chunk_size, description)


def _evaluate_plan(engine: Any, plan: PromptPlan, collector: ActivationCollector) -> None:
    from medgemma_gguf.runtime.engine import ImagePart

    engine.reset()
    for index, run in enumerate(plan.token_runs):
        if index > 0:
            _decode_all_rows(engine, embeddings=engine.encode_image(ImagePart(plan.images[index - 1])))
            collector.raise_if_failed()
        if run:
            _decode_all_rows(engine, tokens=run)
            collector.raise_if_failed()


def calibration_description(calibration: Path | str | None = None, *,
                            model_path: Path | str | None = None) -> dict[str, Any]:
    """What the calibration set is, for manifests: name, file, items, image items, images, sha256, tokens.

    ``tokens`` is the number of text tokens of all items under ``model_path``'s tokenizer (image
    embedding positions not included), or None without a model.
    """
    calib = load_calibration(calibration)
    description: dict[str, Any] = {
        "name": calib.name, "file": calib.path.name, "sha256": calib.sha256, "items": len(calib.items),
        "image_items": calib.image_items, "images": calib.images, "tokens": None,
    }
    if model_path is not None:
        from medgemma_gguf.runtime.engine import Engine

        template = read_gguf_info(Path(model_path)).metadata.get("tokenizer.chat_template") or ""
        with Engine(Path(model_path), vocab_only=True) as engine:
            bos = engine.token_piece(engine.bos_token, special=True).decode("utf-8")
            description["tokens"] = sum(
                len(engine.tokenize(text)) for item in calib.items
                for text in split_at_images(render_template(template, item.messages, bos_token=bos,
                                                            add_generation_prompt=False)))
    return description


# --- files ----------------------------------------------------------------------------------------------------
def write_imatrix_gguf(imatrix: Imatrix, path: Path | str, force: bool = False,
                       on_written: Callable[[Path], Any] | None = None) -> Path:
    """Write ``imatrix`` in llama.cpp's GGUF imatrix format (atomically: nothing is left on failure).

    ``on_written(temporary_path)`` runs when the file is complete, before it is renamed to ``path``.
    """
    path = Path(path)
    writer = gguf.GGUFWriter(path=None, arch="imatrix")
    writer.kv_data[0].pop("general.architecture", None)  # llama-imatrix writes no architecture
    writer.add_string(KEY_TYPE, "imatrix")
    writer.add_array(KEY_DATASETS, list(imatrix.datasets) or ["unknown"])
    writer.add_uint32(KEY_CHUNK_COUNT, int(imatrix.chunk_count))
    writer.add_uint32(KEY_CHUNK_SIZE, int(imatrix.chunk_size))
    for key, value in (imatrix.calibration or {}).items():
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int):
            writer.add_uint64(KEY_CALIBRATION + key, value)
        elif isinstance(value, str) and value:
            writer.add_string(KEY_CALIBRATION + key, value)
    for name in imatrix.tensor_names:  # sorted, in_sum2 then counts, as llama-imatrix writes them
        counts = np.asarray(imatrix.counts[name], dtype=np.float32).reshape(-1)
        sums = np.asarray(imatrix.sums[name], dtype=np.float32).reshape(-1)
        if sums.size % counts.size:
            raise ValueError(f"{name}: {sums.size} sums do not split into {counts.size} matrices")
        n_mat = counts.size
        # ggml drops trailing dimensions of size 1: a dense weight's entries are 1-D [n_cols] and [1]
        writer.add_tensor(name + SUM_SUFFIX, sums if n_mat == 1 else sums.reshape(n_mat, -1))
        writer.add_tensor(name + COUNT_SUFFIX, counts if n_mat == 1 else counts.reshape(n_mat, 1))
    with atomic_output(path, force=force) as tmp:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        if on_written is not None:
            on_written(tmp)
    return path


def _field_value(reader: Any, key: str) -> Any:
    field_ = reader.fields.get(key)
    if field_ is None:
        return None
    if field_.types and field_.types[0] == GGUFValueType.ARRAY:
        return [bytes(field_.parts[i]).decode("utf-8") for i in field_.data]
    value = field_.parts[field_.data[0]]
    if field_.types and field_.types[0] == GGUFValueType.STRING:
        return bytes(value).decode("utf-8")
    return value[0].item()


def _read_gguf(path: Path) -> Imatrix:
    kind = read_gguf_info(path).metadata.get(KEY_TYPE)
    if kind is not None and kind != "imatrix":
        raise UserError(f"{path} is a GGUF {kind}, not an imatrix; pass a file made by medgemma-gguf imatrix "
                        "or llama-imatrix")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, KeyError, IndexError, OSError, struct.error) as exc:
        raise UserError(f"cannot read imatrix {path} ({exc}); the file is truncated or corrupt") from exc
    pairs: dict[str, dict[str, Any]] = {}
    for tensor in reader.tensors:
        for suffix in (SUM_SUFFIX, COUNT_SUFFIX):
            if tensor.name.endswith(suffix):
                if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
                    raise UserError(f"{path}: {tensor.name} is not F32; the imatrix file is corrupt")
                pairs.setdefault(tensor.name[: -len(suffix)], {})[suffix] = np.array(tensor.data, np.float32)
    if not pairs:
        raise UserError(f"{path} holds no imatrix entries (no *.in_sum2 tensors); pass an imatrix file")
    sums, counts = {}, {}
    for name, pair in pairs.items():
        if set(pair) != {SUM_SUFFIX, COUNT_SUFFIX} or pair[SUM_SUFFIX].size % max(pair[COUNT_SUFFIX].size, 1):
            raise UserError(f"{path}: the sums and counts of {name} do not match; the imatrix file is corrupt")
        sums[name], counts[name] = pair[SUM_SUFFIX].reshape(-1), pair[COUNT_SUFFIX].reshape(-1)
    datasets, chunk_count, chunk_size = (_field_value(reader, key)
                                         for key in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE))
    if datasets is None or chunk_count is None or chunk_size is None:
        raise UserError(f"{path} lacks the imatrix.* metadata that llama-quantize requires; recompute it")
    calibration = {key[len(KEY_CALIBRATION):]: _field_value(reader, key)
                   for key in reader.fields if key.startswith(KEY_CALIBRATION)}
    return Imatrix(sums, counts, list(datasets), int(chunk_count), int(chunk_size), calibration or None)


MAX_LEGACY_NAME = 1024


def _read_legacy(path: Path, data: bytes) -> Imatrix:
    """llama.cpp's legacy ``.dat``: int32 n_entries; per entry int32 name length, name, int32 ncall,
    int32 nval, float32[nval] = Σx²/count × ncall; then optionally int32 chunk count, int32 length, dataset."""
    def corrupt(what: str) -> UserError:
        return UserError(f"{path} is neither a GGUF nor a legacy .dat imatrix ({what}); pass an imatrix file")

    offset = 0

    def read_i32() -> int:
        nonlocal offset
        if offset + 4 > len(data):
            raise corrupt("it ends early")
        (value,) = struct.unpack_from("<i", data, offset)
        offset += 4
        return value

    n_entries = read_i32()
    if not 1 <= n_entries <= len(data) // 12:
        raise corrupt(f"entry count {n_entries}")
    sums, counts = {}, {}
    for _ in range(n_entries):
        length = read_i32()
        if not 1 <= length <= MAX_LEGACY_NAME or offset + length > len(data):
            raise corrupt(f"a name length of {length}")
        try:
            name = data[offset: offset + length].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise corrupt("a name is not text") from exc
        offset += length
        ncall, nval = read_i32(), read_i32()
        if nval < 1 or offset + 4 * nval > len(data):
            raise corrupt(f"{name} has {nval} values")
        values = np.frombuffer(data, dtype="<f4", count=nval, offset=offset).astype(np.float32)
        offset += 4 * nval
        # quantize divides by ncall (or uses the values as they are when ncall is 0): counts = [ncall or 1]
        sums[name], counts[name] = values, np.array([ncall if ncall > 0 else 1], dtype=np.float32)
    chunk_count, datasets = 0, []
    if offset + 4 <= len(data):
        chunk_count = read_i32()
        if offset + 4 <= len(data):
            length = read_i32()
            if 0 < length <= len(data) - offset:
                datasets.append(data[offset: offset + length].decode("utf-8", errors="replace"))
    return Imatrix(sums, counts, datasets, chunk_count, 0)


def read_imatrix(path: Path | str) -> Imatrix:
    """Read an imatrix in llama.cpp's GGUF format or its legacy ``.dat`` format."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise UserError(f"imatrix file {path} not found; check the path") from exc
    except OSError as exc:
        raise UserError(f"cannot read imatrix file {path}: {exc.strerror}; check its permissions") from exc
    if data[:4] == b"GGUF":
        return _read_gguf(path)
    return _read_legacy(path, data)


def check_imatrix_matches(imatrix: Imatrix, model_path: Path | str) -> None:
    """UserError unless ``imatrix`` covers exactly the model's layer matrices with the model's widths."""
    model_path = Path(model_path)
    tensors = {info.name: info for info in read_gguf_info(model_path).tensors}
    problems = []
    for name in imatrix.tensor_names:
        info = tensors.get(name)
        if info is None:
            problems.append(f"{name} is not in the model")
            continue
        expected = info.shape[0] * math.prod(info.shape[2:])
        if imatrix.sums[name].size != expected:
            problems.append(f"{name} has {imatrix.sums[name].size} columns, the model {expected}")
    missing = [name for name, info in tensors.items()
               if name.startswith("blk.") and len(info.shape) >= 2 and name not in imatrix.sums]
    if missing:
        problems.append(f"{len(missing)} model matrices have no entry (e.g. {missing[0]})")
    if problems:
        raise UserError(f"the imatrix does not belong to {model_path.name}: {problems[0]}"
                        f"{f' (and {len(problems) - 1} more problems)' if len(problems) > 1 else ''}; "
                        "compute one for this model with medgemma-gguf imatrix")

