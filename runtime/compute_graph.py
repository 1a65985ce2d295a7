"""The compute buffer llama.cpp reserves for a Gemma 3 text context, computed by replaying its allocator.

llama.cpp sizes a context's compute buffer once, when the context is created (``sched_reserve`` in
src/llama-context.cpp): it builds the worst-case graph — one micro-batch of ``n_tokens = min(n_ctx,
n_ubatch)`` tokens spread over ``n_seq_max`` sequences, ``min(n_tokens, n_outputs_max)`` output rows, every
KV cell of every stream in view — and lets ggml's graph allocator (ggml/src/ggml-alloc.c) place each
intermediate tensor. The buffer is the highest offset the allocator reached. That number depends on the
order the graph visits its nodes, on which results can overwrite their input in place and on which freed
blocks are re-used, so no closed formula matches it across shapes; this module rebuilds the graph and
replays the allocator instead:

* ``gemma3_text_graph`` builds the node list of ``llama_model_gemma3::graph`` (src/models/gemma3.cpp) with
  the helpers it calls — ``build_inp_embd`` (token rows, plus the unused embedding input that
  ``ggml_build_forward_select`` keeps in the graph), ``build_attn_inp_kv_iswa`` (K/V row indices, one KQ
  mask per cache: f32, or f16 with flash attention; the V indices cover every value of a token when the V
  cache is transposed, i.e. without flash attention), ``build_attn`` (the Hadamard rotations a quantized
  K or V cache gets when the head size is a multiple of 64, ``llama_kv_cache::build_input_k_rot``),
  ``build_attn_mha`` (KQ, in-place soft-max, KQV and a copy — or one ``flash_attn_ext``), the GELU-gated
  FFN, the rows of the output tokens taken in the last layer, and the logits — in the order
  ``ggml_build_forward_expand`` visits them (depth first, sources in order).
* ``replay_allocator`` is ``ggml_gallocr_alloc_graph_impl`` with ``ggml_dyn_tallocr``: graph inputs are
  placed first in the order the graph met them; a node may take over its only consumer-free source when
  ``ggml_op_can_inplace`` allows it and the layouts agree (never through a view, never an output); a
  tensor is freed after its last consumer and its last view's consumer; free blocks are merged, the best
  fitting block other than the last is taken, else the last one grows the buffer; sizes are aligned to the
  buffer type's alignment (32 bytes on the CPU, 128 with CUDA).

``text_compute_bytes`` runs both graphs llama.cpp reserves (prompt and single-token) and returns the
larger buffer — the number llama.cpp prints as ``compute buffer size``. The tests compare it with
llama.cpp's own report for every setting on the fixtures, and on header-only GGUFs with MedGemma 4B's and
27B's real shapes. It describes a context on one backend (the CPU, or a whole model on one GPU: the same
graph on the GPU's buffer); a partial offload splits the graph between devices (see ``runtime.offload``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# ggml element sizes of the types that appear in the compute graph
_TYPE_SIZE = {"f32": 4, "f16": 2, "i32": 4, "i64": 8}
# ops for which ggml_op_can_inplace (ggml/src/ggml-alloc.c) is true, of those this graph uses
_INPLACE_OPS = frozenset({"SCALE", "ADD", "MUL", "ROPE", "RMS_NORM", "SOFT_MAX"})
_VIEW_OPS = frozenset({"VIEW", "RESHAPE", "PERMUTE", "TRANSPOSE"})  # ggml_impl_is_view

CPU_ALIGNMENT = 32  # TENSOR_ALIGNMENT, ggml/src/ggml-impl.h
CUDA_ALIGNMENT = 128  # ggml_backend_cuda_buffer_type_get_alignment


@dataclass(eq=False)
class Tensor:
    """One graph tensor: what the allocator needs to know about it."""

    op: str
    shape: tuple[int, ...]
    dtype: str = "f32"
    src: tuple[Tensor, ...] = ()
    view_src: Tensor | None = None  # the tensor whose memory a view (or a cache write) uses
    external: bool = False  # weights and KV cache: memory outside the compute buffer
    is_input: bool = False
    is_output: bool = False

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * _TYPE_SIZE[self.dtype]

    @property
    def is_view(self) -> bool:
        return self.op in _VIEW_OPS


@dataclass
class Graph:
    """Nodes and leafs in the order ``ggml_visit_parents_graph`` records them."""

    nodes: list[Tensor] = field(default_factory=list)
    leafs: list[Tensor] = field(default_factory=list)
    _seen: set[int] = field(default_factory=set)

    def expand(self, tensor: Tensor) -> None:
        """``ggml_build_forward_expand``: visit the sources depth first, then record the tensor."""
        stack: list[tuple[Tensor, int]] = [(tensor, 0)]
        while stack:
            node, index = stack.pop()
            if index == 0:
                if id(node) in self._seen:
                    continue
                self._seen.add(id(node))
            if index < len(node.src):
                stack.append((node, index + 1))
                stack.append((node.src[index], 0))
                continue
            (self.leafs if node.op == "NONE" else self.nodes).append(node)


def _external(shape: tuple[int, ...], dtype: str = "f16") -> Tensor:
    return Tensor("NONE", shape, dtype, external=True)


def _input(shape: tuple[int, ...], dtype: str) -> Tensor:
    return Tensor("NONE", shape, dtype, is_input=True)


def _op(op: str, shape: tuple[int, ...], *src: Tensor, dtype: str = "f32") -> Tensor:
    return Tensor(op, shape, dtype, src=src)


def _view(op: str, source: Tensor, shape: tuple[int, ...]) -> Tensor:
    base = source.view_src if source.view_src is not None else source
    return Tensor(op, shape, source.dtype, src=(source,), view_src=base, external=base.external)


@dataclass(frozen=True)
class TextGraphShape:
    """The numbers that decide Gemma 3's reserved compute graph."""

    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    sliding: tuple[bool, ...]  # per layer
    n_tokens: int
    n_seqs: int
    n_outputs: int
    cells_full: int  # KV cells per stream of the full-attention cache
    cells_swa: int  # ... of the sliding-window cache
    flash_attn: bool
    k_quantized: bool
    v_quantized: bool


def _rot_size(head_dim: int, key: bool) -> int | None:
    """The Hadamard matrix side for a quantized K (largest power of two >= 64 dividing the head size) or V (64)."""
    if head_dim % 64:
        return None
    if not key:
        return 64
    size = 64
    while head_dim % (size * 2) == 0:
        size *= 2
    return size


def _hadamard(cur: Tensor, rot: Tensor) -> Tensor:
    """``llama_mul_mat_hadamard`` on a contiguous tensor."""
    n = rot.shape[0]
    count = cur.nbytes // _TYPE_SIZE[cur.dtype]
    flat = _view("RESHAPE", cur, (n, count // n))
    product = _op("MUL_MAT", (n, count // n), rot, flat)
    return _view("RESHAPE", product, cur.shape)


def gemma3_text_graph(s: TextGraphShape) -> Graph:
    """The graph ``llama_model_gemma3::graph<iswa>`` builds for one reserved micro-batch (module docstring)."""
    graph = Graph()
    t, e, d = s.n_tokens, s.n_embd, s.head_dim
    hd, kvd = s.n_head * d, s.n_head_kv * d
    mask_type = "f16" if s.flash_attn else "f32"

    tokens = _input((t,), "i32")
    embd_input = _input((e, t), "f32")
    token_embd = _external((e, s.n_vocab))
    embd = _op("GET_ROWS", (e, t), token_embd, tokens)
    graph.expand(embd)  # ggml_build_forward_select keeps both inputs in the graph
    graph.expand(embd_input)
    inp = _op("SCALE", (e, t), embd)
    pos = _input((t,), "i32")

    def cache_inputs(cells: int) -> dict[str, Any]:
        k_rot = _rot_size(d, True) if s.k_quantized else None
        v_rot = _rot_size(d, False) if s.v_quantized else None
        return {"k_idxs": _input((t,), "i64"),
                "v_idxs": _input((t,) if s.flash_attn else (t * kvd,), "i64"),
                "mask": _input((cells, t), mask_type), "cells": cells,
                "k_rot": _input((k_rot, k_rot), "f32") if k_rot else None,
                "v_rot": _input((v_rot, v_rot), "f32") if v_rot else None}

    caches = {False: cache_inputs(s.cells_full), True: cache_inputs(s.cells_swa)}
    out_ids = _input((s.n_outputs,), "i32")

    def norm(cur: Tensor) -> Tensor:
        return _op("MUL", cur.shape, _op("RMS_NORM", cur.shape, cur), _external((cur.shape[0],), "f32"))

    n_layers = len(s.sliding)
    for il, sliding in enumerate(s.sliding):
        cache = caches[sliding]
        cells: int = cache["cells"]
        cur = norm(inp)
        q = _view("RESHAPE", _op("MUL_MAT", (hd, t), _external((e, hd)), cur), (d, s.n_head, t))
        k = _view("RESHAPE", _op("MUL_MAT", (kvd, t), _external((e, kvd)), cur), (d, s.n_head_kv, t))
        v = _view("RESHAPE", _op("MUL_MAT", (kvd, t), _external((e, kvd)), cur), (d, s.n_head_kv, t))
        q = _op("ROPE", q.shape, norm(q), pos)
        k = _op("ROPE", k.shape, norm(k), pos)
        q = _op("SCALE", q.shape, q)
        if cache["k_rot"] is not None:
            q = _hadamard(q, cache["k_rot"])
            k = _hadamard(k, cache["k_rot"])
        if cache["v_rot"] is not None:
            v = _hadamard(v, cache["v_rot"])
        graph.expand(q)
        graph.expand(k)
        graph.expand(v)
        cache_k, cache_v = _external((kvd, cells)), _external((kvd, cells))
        graph.expand(_op("SET_ROWS", cache_k.shape, _view("VIEW", k, (kvd, t)), cache["k_idxs"], cache_k))
        if s.flash_attn:
            v_rows = _view("VIEW", v, (kvd, t))
            graph.expand(_op("SET_ROWS", cache_v.shape, v_rows, cache["v_idxs"], cache_v))
        else:
            v_rows = _view("RESHAPE", _view("RESHAPE", v, (kvd, t)), (1, kvd * t))
            graph.expand(_op("SET_ROWS", (1, kvd * cells), v_rows, cache["v_idxs"],
                             _view("RESHAPE", cache_v, (1, kvd * cells))))
        q_heads = _view("PERMUTE", _view("VIEW", q, q.shape), (d, t, s.n_head))
        k_heads = _view("PERMUTE", _view("VIEW", cache_k, (d, s.n_head_kv, cells)), (d, cells, s.n_head_kv))
        if s.flash_attn:
            v_heads = _view("PERMUTE", _view("VIEW", cache_v, (d, s.n_head_kv, cells)), (d, cells, s.n_head_kv))
            attn = _op("FLASH_ATTN_EXT", (d, s.n_head, t), q_heads, k_heads, v_heads, cache["mask"])
            cur = _view("RESHAPE", attn, (hd, t))
        else:
            v_heads = _view("PERMUTE", _view("VIEW", cache_v, (cells, s.n_head_kv, d)), (cells, d, s.n_head_kv))
            kq = _op("MUL_MAT", (cells, t, s.n_head), k_heads, q_heads)
            kq = _op("SOFT_MAX", kq.shape, kq, cache["mask"])
            kqv = _op("MUL_MAT", (d, t, s.n_head), v_heads, kq)
            cur = _op("CONT", (hd, t), _view("PERMUTE", kqv, (d, s.n_head, t)))
        graph.expand(cur)
        if cache["v_rot"] is not None:
            cur = _hadamard(cur, cache["v_rot"])
        cur = _op("MUL_MAT", (e, t), _external((hd, e)), cur)
        rows = t
        if il == n_layers - 1:
            rows = s.n_outputs
            cur = _op("GET_ROWS", (e, rows), cur, out_ids)
            inp = _op("GET_ROWS", (e, rows), inp, out_ids)
        sa_out = _op("ADD", (e, rows), norm(cur), inp)
        cur = norm(sa_out)
        gate = _op("MUL_MAT", (s.n_ff, rows), _external((e, s.n_ff)), cur)
        up = _op("MUL_MAT", (s.n_ff, rows), _external((e, s.n_ff)), cur)
        glu = _op("GLU", (s.n_ff, rows), gate, up)
        cur = _op("MUL_MAT", (e, rows), _external((s.n_ff, e)), glu)
        inp = _op("ADD", (e, rows), norm(cur), sa_out)
    result = norm(inp)
    result.is_output = True
    logits = _op("MUL_MAT", (s.n_vocab, s.n_outputs), token_embd, result)
    logits.is_output = True
    graph.expand(logits)
    return graph


@dataclass
class _Slot:
    n_children: int = 0
    n_views: int = 0
    allocated: bool = False
    offset: int = 0


class _DynamicAllocator:
    """``ggml_dyn_tallocr`` with one chunk: sorted free blocks, best fit, merging on free."""

    def __init__(self, alignment: int):
        self.alignment = alignment
        self.blocks: list[list[int]] = [[0, 1 << 62]]
        self.max_size = 0

    def _align(self, size: int) -> int:
        return (size + self.alignment - 1) // self.alignment * self.alignment

    def alloc(self, size: int) -> int:
        size = self._align(size)
        best, best_size = -1, None
        for i, (_, block_size) in enumerate(self.blocks[:-1]):
            if block_size >= size and (best_size is None or block_size <= best_size):
                best, best_size = i, block_size
        if best < 0:
            best = len(self.blocks) - 1
        block = self.blocks[best]
        offset = block[0]
        block[0] += size
        block[1] -= size
        if block[1] == 0:
            del self.blocks[best]
        self.max_size = max(self.max_size, offset + size)
        return offset

    def free(self, offset: int, size: int) -> None:
        size = self._align(size)
        blocks = self.blocks
        for i, block in enumerate(blocks):
            if block[0] + block[1] == offset:
                block[1] += size
                if i + 1 < len(blocks) and block[0] + block[1] == blocks[i + 1][0]:
                    block[1] += blocks[i + 1][1]
                    del blocks[i + 1]
                return
            if offset + size == block[0]:
                block[0] = offset
                block[1] += size
                if i > 0 and blocks[i - 1][0] + blocks[i - 1][1] == block[0]:
                    blocks[i - 1][1] += block[1]
                    del blocks[i]
                return
        position = 0
        while position < len(blocks) and blocks[position][0] < offset:
            position += 1
        blocks.insert(position, [offset, size])


def replay_allocator(graph: Graph, alignment: int = CPU_ALIGNMENT) -> int:
    """The buffer ``ggml_gallocr_alloc_graph_impl`` needs for ``graph`` (module docstring)."""
    allocator = _DynamicAllocator(alignment)
    slots: dict[int, _Slot] = {}

    def slot(tensor: Tensor) -> _Slot:
        found = slots.get(id(tensor))
        if found is None:
            found = slots[id(tensor)] = _Slot()
        return found

    def allocate(node: Tensor) -> None:
        info = slot(node)
        if node.external or info.allocated or node.is_view or node.op == "SET_ROWS":
            return
        info.allocated = True
        if node.op in _INPLACE_OPS:
            for parent in node.src:
                parent_info = slot(parent)
                if not parent_info.allocated or parent.is_output:
                    continue
                if parent.shape != node.shape or parent.dtype != node.dtype:
                    continue
                if parent_info.n_children == 1 and parent_info.n_views == 0:
                    info.offset = parent_info.offset
                    parent_info.allocated = False
                    return
        info.offset = allocator.alloc(node.nbytes)

    def release(tensor: Tensor) -> None:
        if tensor.is_output:
            return
        info = slot(tensor)
        allocator.free(info.offset, tensor.nbytes)
        info.allocated = False

    for leaf in graph.leafs:
        allocate(leaf)
    for node in graph.nodes:
        if node.is_view:
            slot(node.view_src).n_views += 1  # type: ignore[arg-type]
        if node.is_input:
            allocate(node)
        for source in node.src:
            slot(source).n_children += 1
            if source.is_input:
                allocate(source)
    for node in graph.nodes:
        for source in node.src:
            allocate(source)
        allocate(node)
        for parent in node.src:
            info = slot(parent)
            info.n_children -= 1
            if info.n_children or info.n_views:
                continue
            if parent.is_view:
                base = parent.view_src
                base_info = slot(base)  # type: ignore[arg-type]
                base_info.n_views -= 1
                if base_info.n_views == 0 and base_info.n_children == 0 and base_info.allocated:
                    release(base)  # type: ignore[arg-type]
            elif info.allocated:
                release(parent)
    return allocator.max_size


def text_compute_bytes(*, n_embd: int, n_ff: int, n_head: int, n_head_kv: int, head_dim: int, n_vocab: int,
                       sliding: Sequence[bool], n_ctx: int, n_ubatch: int, n_seqs: int, n_outputs_max: int,
                       cells_full: int, cells_swa: int, flash_attn: bool, k_quantized: bool, v_quantized: bool,
                       alignment: int = CPU_ALIGNMENT) -> int:
    """The compute buffer llama.cpp reserves (bytes): the larger of its prompt and single-token graphs.

    ``n_ctx`` is the context's total (all sequences), ``n_outputs_max`` llama.cpp's context parameter
    (0 = ``n_batch``), ``cells_*`` the cells per stream of each cache.
    """
    n_tokens = min(n_ctx, n_ubatch)
    if n_tokens % n_seqs:
        n_tokens = (n_tokens + n_seqs - 1) // n_seqs * n_seqs
    outputs_max = n_outputs_max or n_ubatch
    sizes = []
    for tokens, outputs in ((n_tokens, min(n_tokens, outputs_max)), (n_seqs, n_seqs)):
        shape = TextGraphShape(n_embd=n_embd, n_ff=n_ff, n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim,
                               n_vocab=n_vocab, sliding=tuple(sliding), n_tokens=tokens, n_seqs=n_seqs,
                               n_outputs=max(1, outputs), cells_full=cells_full, cells_swa=cells_swa,
                               flash_attn=flash_attn, k_quantized=k_quantized, v_quantized=v_quantized)
        sizes.append(replay_allocator(gemma3_text_graph(shape), alignment))
    return max(sizes)
