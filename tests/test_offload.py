"""Tests for runtime.offload: the n_gpu_layers planner, against bytes worked out by hand from real shapes.

The GGUF files are synthetic: headers with MedGemma 4B / 27B shapes and no weights (the files are
sparse: truncated to their full length without writing the data).
"""

from __future__ import annotations

import stat
from pathlib import Path

import gguf
import pytest

from medgemma_gguf.errors import UserError
from medgemma_gguf.fixtures.shape_gguf import (
    Q4_K_M_MIX,
    ModelShape,
    SparseGGUF,
    add_text_hparams,
    add_text_tensors,
    write_siglip_mmproj,
)
from medgemma_gguf.gguf_info import read_gguf_info
from medgemma_gguf.runtime.compute_graph import CUDA_ALIGNMENT
from medgemma_gguf.runtime.compute_graph import text_compute_bytes as graph_compute_bytes
from medgemma_gguf.runtime.offload import plan_offload, query_free_vram
from medgemma_gguf.sizes import parse_size

MiB = 1024**2
GiB = 1024**3

Q4_K = gguf.GGMLQuantizationType.Q4_K
Q6_K = gguf.GGMLQuantizationType.Q6_K
F16 = gguf.GGMLQuantizationType.F16
F32 = gguf.GGMLQuantizationType.F32


# ---------------------------------------------------------------------------------------------------
# hand arithmetic: K-quants store 256 values per block, Q4_K in 144 bytes, Q6_K in 210 bytes


def q4k(n: int) -> int:
    assert n % 256 == 0
    return n // 256 * 144


def q6k(n: int) -> int:
    assert n % 256 == 0
    return n // 256 * 210


def f32(n: int) -> int:
    return 4 * n


def f16(n: int) -> int:
    return 2 * n


def pad256(n: int) -> int:
    return -(-n // 256) * 256


# ---------------------------------------------------------------------------------------------------
# synthetic files


MEDGEMMA_4B = dict(n_layers=34, n_embd=2560, n_ff=10240, n_head=8, n_head_kv=4, head_dim=256, n_vocab=262208)
MEDGEMMA_27B = dict(n_layers=62, n_embd=5376, n_ff=21504, n_head=32, n_head_kv=16, head_dim=128, n_vocab=262208)


def write_text_gguf(
    path: Path,
    *,
    n_layers: int,
    n_embd: int,
    n_ff: int,
    n_head: int,
    n_head_kv: int,
    head_dim: int,
    n_vocab: int,
    sliding_window: int | None = 1024,
    pattern: int | list[bool] | None = None,
    tied: bool = True,
    vocabulary: bool = False,
) -> Path:
    """A gemma3 GGUF header in a Q4_K_M-like mix (Q4_K, with Q6_K for attn_v, ffn_down, embeddings).

    ``vocabulary`` adds a tokenizer of ``n_vocab`` tokens, as large as a real file's."""
    shape = ModelShape(n_layers=n_layers, n_embd=n_embd, n_ff=n_ff, n_head=n_head, n_head_kv=n_head_kv,
                       head_dim=head_dim, n_vocab=n_vocab)
    sparse = SparseGGUF(path, "gemma3")
    writer = sparse.writer
    if vocabulary:
        writer.add_tokenizer_model("llama")
        writer.add_token_list([f"<tok{i}>" for i in range(n_vocab)])
        writer.add_token_scores([0.0] * n_vocab)
        writer.add_token_types([1] * n_vocab)
    add_text_hparams(writer, shape, n_layers)
    if sliding_window is not None:
        writer.add_sliding_window(sliding_window)
    if pattern is not None:
        writer.add_sliding_window_pattern(pattern)
    add_text_tensors(sparse, shape, n_layers, weight_type=Q4_K, mix=Q4_K_M_MIX, tied=tied)
    return sparse.finish()


@pytest.fixture(scope="module")
def model_4b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("m4b") / "medgemma-4b-Q4_K_M.gguf"
    return write_text_gguf(path, vocabulary=True, **MEDGEMMA_4B)


@pytest.fixture(scope="module")
def model_27b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_text_gguf(tmp_path_factory.mktemp("m27b") / "medgemma-27b-Q4_K_M.gguf", **MEDGEMMA_27B)


@pytest.fixture(scope="module")
def mmproj(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_siglip_mmproj(tmp_path_factory.mktemp("mmproj") / "mmproj-medgemma-4b-F16.gguf")


# ---------------------------------------------------------------------------------------------------
# hand-worked sizes of the two models (4B: 34 layers, 27B: 62 layers)

def layer_bytes(n_embd: int, q_width: int, kv_width: int, n_ff: int, head_dim: int) -> int:
    """One layer in the Q4_K_M-like mix: Q4_K q, k, o, gate and up, Q6_K v and down; four F32 norms of
    ``n_embd`` and two (q_norm, k_norm) of ``head_dim``."""
    return (q4k(n_embd * q_width) + q4k(n_embd * kv_width) + q6k(n_embd * kv_width) + q4k(q_width * n_embd)
            + 2 * q4k(n_embd * n_ff) + q6k(n_ff * n_embd) + 4 * f32(n_embd) + 2 * f32(head_dim))


# one 4B layer: q 2560x2048, k/v 2560x1024, o 2048x2560, gate/up 2560x10240, down 10240x2560, 6 norms
LAYER_4B = layer_bytes(2560, 2048, 1024, 10240, 256)
EMBD_4B = q6k(2560 * 262208)  # token_embd; tied: also the output matrix
OUTPUT_4B = EMBD_4B + f32(2560)  # output layer: the duplicated token_embd + output_norm
LARGEST_LAYER_TENSOR_4B = q6k(10240 * 2560)  # ffn_down

# one 27B layer: q 5376x4096, k/v 5376x2048, o 4096x5376, gate/up 5376x21504, down 21504x5376
LAYER_27B = layer_bytes(5376, 4096, 2048, 21504, 128)
EMBD_27B = q6k(5376 * 262208)
OUTPUT_27B = EMBD_27B + f32(5376)
LARGEST_LAYER_TENSOR_27B = q6k(21504 * 5376)

# SigLIP mmproj, all F16 matrices and F32 vectors
MMPROJ = (
    f16(14 * 14 * 3 * 1152)
    + f32(1152)
    + f32(1152 * 4096)
    + 27
    * (4 * (f16(1152 * 1152) + f32(1152)) + 4 * f32(1152) + f16(1152 * 4304) + f32(4304) + f16(4304 * 1152) + f32(1152))
    + 2 * f32(1152)
    + f16(2560 * 1152)
    + f32(1152)
)
# vision compute, no flash attention: 16 heads x 4096^2 patches x 4 bytes + 4096 x (4304 + 3*1152) x 4
VISION_COMPUTE = 16 * 4096 * 4096 * 4 + 4096 * (4304 + 3 * 1152) * 4
VISION_COMPUTE_FLASH = 4096 * (4304 + 3 * 1152) * 4  # flash attention (the default, "auto") has no score matrix


def test_siglip_vision_compute_is_close_to_what_llama_cpp_reports() -> None:
    # llama.cpp reports 1132 MiB for Gemma 3's vision encoder without flash attention
    assert 1132 * MiB <= VISION_COMPUTE <= 1132 * MiB * 1.02


def test_mmproj_bytes_are_the_whole_file(mmproj: Path, model_4b: Path) -> None:
    with_vision = plan_offload(model_4b, n_ctx=4096, vram_bytes=80 * GiB, mmproj_path=mmproj, gpu_available=True)
    without = plan_offload(model_4b, n_ctx=4096, vram_bytes=80 * GiB, gpu_available=True)
    assert with_vision.gpu_mmproj == MMPROJ
    assert with_vision.gpu_compute - without.gpu_compute == VISION_COMPUTE_FLASH
    no_flash = plan_offload(model_4b, n_ctx=4096, vram_bytes=80 * GiB, mmproj_path=mmproj, gpu_available=True,
                            flash_attn="off")
    assert no_flash.vision_compute == VISION_COMPUTE


def kv_4b_layer(cells: int) -> int:
    return 2 * 4 * 256 * cells * 2  # K and V, 4 kv heads x 256 dims, F16


def kv_27b_layer(cells: int) -> int:
    return 2 * 16 * 128 * cells * 2


def compute_text(shape: dict, *, n_ctx: int, cells_full: int, cells_swa: int, flash_attn: bool = True,
                 n_ubatch: int = 512) -> int:
    """The text compute buffer, from runtime.compute_graph (checked against llama.cpp in test_kv_memory.py)."""
    sliding = [(il + 1) % 6 != 0 for il in range(shape["n_layers"])]
    return graph_compute_bytes(n_embd=shape["n_embd"], n_ff=shape["n_ff"], n_head=shape["n_head"],
                               n_head_kv=shape["n_head_kv"], head_dim=shape["head_dim"], n_vocab=shape["n_vocab"],
                               sliding=sliding, n_ctx=n_ctx, n_ubatch=n_ubatch, n_seqs=1, n_outputs_max=1,
                               cells_full=cells_full, cells_swa=cells_swa, flash_attn=flash_attn, k_quantized=False,
                               v_quantized=False, alignment=CUDA_ALIGNMENT)


def expected_4b(n_gpu: int, n_ctx: int, *, swa_full: bool = False, mmproj: bool = False) -> int:
    """GPU bytes for MedGemma 4B with ``n_gpu`` layers (34 repeating + output) at ``n_ctx``, worked by hand
    (the compute graph's buffer from runtime.compute_graph)."""
    ctx = pad256(n_ctx)
    swa_cells = ctx if swa_full else pad256(min(ctx, 1024 + min(512, n_ctx)))
    global_layers = {5, 11, 17, 23, 29}  # one in six, the sixth
    on_gpu = range(max(35 - n_gpu, 0), 34)
    weights = len(on_gpu) * LAYER_4B + (OUTPUT_4B if n_gpu >= 1 else 0)
    kv = sum(kv_4b_layer(ctx if il in global_layers else swa_cells) for il in on_gpu)
    if n_gpu == 0:
        staging = EMBD_4B
    elif n_gpu < 35:
        staging = LARGEST_LAYER_TENSOR_4B
    else:
        staging = 0
    compute = compute_text(MEDGEMMA_4B, n_ctx=ctx, cells_full=ctx, cells_swa=swa_cells) + staging
    if mmproj:
        compute += VISION_COMPUTE_FLASH
    return weights + kv + compute + (MMPROJ if mmproj else 0)


def expected_27b(n_gpu: int, n_ctx: int, *, swa_full: bool = False) -> int:
    """GPU bytes for MedGemma 27B with ``n_gpu`` layers (62 repeating + output)."""
    ctx = pad256(n_ctx)
    swa_cells = ctx if swa_full else pad256(min(ctx, 1024 + min(512, n_ctx)))
    global_layers = {il for il in range(62) if il % 6 == 5}
    on_gpu = range(max(63 - n_gpu, 0), 62)
    weights = len(on_gpu) * LAYER_27B + (OUTPUT_27B if n_gpu >= 1 else 0)
    kv = sum(kv_27b_layer(ctx if il in global_layers else swa_cells) for il in on_gpu)
    staging = EMBD_27B if n_gpu == 0 else (LARGEST_LAYER_TENSOR_27B if n_gpu < 63 else 0)
    return weights + kv + compute_text(MEDGEMMA_27B, n_ctx=ctx, cells_full=ctx, cells_swa=swa_cells) + staging


def best_n(expected, max_n: int, budget: int, headroom: int = 1 * GiB) -> int:
    fitting = [n for n in range(max_n + 1) if expected(n) <= budget - headroom]
    return max(fitting) if fitting else 0


# ---------------------------------------------------------------------------------------------------
# the plans


@pytest.mark.parametrize("budget_gib", [1.5, 2, 3, 24])
def test_4b_plan_matches_hand_arithmetic(model_4b: Path, budget_gib: int) -> None:
    budget = int(budget_gib * GiB)
    plan = plan_offload(model_4b, n_ctx=8192, vram_bytes=budget, gpu_available=True)
    n = best_n(lambda k: expected_4b(k, 8192), 35, budget)
    assert plan.n_gpu_layers == n
    assert plan.n_layers == 34
    assert plan.gpu_bytes == expected_4b(n, 8192)
    assert plan.gpu_bytes <= budget - 1 * GiB or n == 0
    assert plan.fits_fully == (n == 35)
    assert plan.budget_bytes == budget


def test_4b_budgets_land_where_expected(model_4b: Path) -> None:
    """The budgets cover the interesting cases: nothing, partial, all."""
    plans = {
        gib: plan_offload(model_4b, n_ctx=8192, vram_bytes=int(gib * GiB), gpu_available=True).n_gpu_layers
        for gib in (1.5, 2, 3, 24)
    }
    assert plans[1.5] == 0
    assert 0 < plans[2] < plans[3] < 35
    assert plans[24] == 35


def test_4b_partial_plan_splits_weights_and_kv_by_hand(model_4b: Path) -> None:
    plan = plan_offload(model_4b, n_ctx=8192, vram_bytes=3 * GiB, gpu_available=True, swa_full=True)
    n = plan.n_gpu_layers
    assert 1 < n < 35
    repeating = n - 1
    assert plan.repeating_layers_on_gpu == repeating and plan.output_on_gpu
    assert plan.gpu_weights == repeating * LAYER_4B + OUTPUT_4B
    assert plan.gpu_kv == repeating * kv_4b_layer(8192)  # the full-size SWA cache: 8192 cells in every layer
    # the CPU keeps token_embd (also copied to the GPU as the tied output matrix) and the first layers
    assert plan.cpu_weights == EMBD_4B + (34 - repeating) * LAYER_4B
    assert plan.cpu_kv == (34 - repeating) * kv_4b_layer(8192)
    text = plan.describe()
    assert f"n_gpu_layers = {n}" in text and f"last {repeating} of 34 layers" in text


def test_output_layer_is_offloaded_first(model_4b: Path) -> None:
    """llama.cpp puts layer index L (the output layer) on the GPU first, then L-1, L-2, ..."""
    budget = 1 * GiB + expected_4b(1, 8192)
    assert expected_4b(2, 8192) > expected_4b(1, 8192)
    plan = plan_offload(model_4b, n_ctx=8192, vram_bytes=budget, gpu_available=True)
    assert plan.n_gpu_layers == 1 and plan.output_on_gpu and plan.repeating_layers_on_gpu == 0
    assert plan.gpu_weights == OUTPUT_4B and plan.gpu_kv == 0
    assert "only the output layer on the GPU" in plan.describe()
    plan = plan_offload(model_4b, n_ctx=8192, vram_bytes=1 * GiB + expected_4b(2, 8192), gpu_available=True)
    assert plan.n_gpu_layers == 2 and plan.gpu_weights == OUTPUT_4B + LAYER_4B
    assert plan.gpu_kv == kv_4b_layer(1536)  # the last layer (33) slides: pad256(1024 + 512) cells
    assert "the last 1 of 34 layers" in plan.describe()


def test_4b_with_mmproj_reserves_vision_first(model_4b: Path, mmproj: Path) -> None:
    for budget in (3 * GiB, 4 * GiB, 24 * GiB):
        plan = plan_offload(model_4b, n_ctx=8192, vram_bytes=budget, mmproj_path=mmproj, gpu_available=True)
        n = best_n(lambda k: expected_4b(k, 8192, mmproj=True), 35, budget)
        assert plan.n_gpu_layers == n
        assert plan.gpu_bytes == expected_4b(n, 8192, mmproj=True)
        assert plan.gpu_mmproj == MMPROJ
    assert (
        plan_offload(model_4b, n_ctx=8192, vram_bytes=3 * GiB, mmproj_path=mmproj, gpu_available=True).n_gpu_layers
        < plan_offload(model_4b, n_ctx=8192, vram_bytes=3 * GiB, gpu_available=True).n_gpu_layers
    )


def test_4b_sliding_window_cache_by_default_and_full_on_request(model_4b: Path) -> None:
    plan = plan_offload(model_4b, n_ctx=8192, vram_bytes=80 * GiB, gpu_available=True)
    # 5 global layers x 8192 cells, 29 sliding layers x pad256(1024 + 512) = 1536 cells
    assert plan.gpu_kv == 5 * kv_4b_layer(8192) + 29 * kv_4b_layer(1536)
    assert plan.gpu_bytes == expected_4b(35, 8192)
    full = plan_offload(model_4b, n_ctx=8192, vram_bytes=80 * GiB, gpu_available=True, swa_full=True)
    assert full.gpu_kv == 34 * kv_4b_layer(8192)
    assert full.gpu_bytes == expected_4b(35, 8192, swa_full=True)
    assert "29 sliding-window layers x 1536 cells (window)" in plan.describe()
    assert "29 sliding-window layers x 8192 cells (full-size)" in full.describe()


def test_short_context_pads_to_256_cells(model_4b: Path) -> None:
    plan = plan_offload(model_4b, n_ctx=1000, vram_bytes=80 * GiB, gpu_available=True, swa_full=False)
    # 1000 -> 1024 cells; sliding: min(1024, 1024 + 512) = 1024
    assert plan.gpu_kv == 34 * kv_4b_layer(1024)
    assert plan.n_ctx == 1000


@pytest.mark.parametrize("budget_gib", [2, 6, 16, 24])
def test_27b_plan_matches_hand_arithmetic(model_27b: Path, budget_gib: int) -> None:
    budget = budget_gib * GiB
    plan = plan_offload(model_27b, n_ctx=4096, vram_bytes=budget, gpu_available=True)
    n = best_n(lambda k: expected_27b(k, 4096), 63, budget)
    assert plan.n_gpu_layers == n
    assert plan.n_layers == 62
    assert plan.gpu_bytes == expected_27b(n, 4096)
    assert plan.fits_fully == (n == 63)
    if budget_gib in (6, 16):  # ~16 GiB of weights: partial offload
        assert 0 < n < 63


def test_27b_fits_on_a_large_card(model_27b: Path) -> None:
    plan = plan_offload(model_27b, n_ctx=4096, vram_bytes=40 * GiB, gpu_available=True)
    assert plan.fits_fully and plan.n_gpu_layers == 63
    assert plan.gpu_weights == 62 * LAYER_27B + OUTPUT_27B
    assert plan.gpu_kv == 10 * kv_27b_layer(4096) + 52 * kv_27b_layer(1536)
    assert plan.cpu_weights == EMBD_27B and plan.cpu_kv == 0
    assert "whole model on the GPU" in plan.describe()


def test_untied_output_matrix_is_counted_once(tmp_path: Path) -> None:
    small = dict(n_layers=4, n_embd=256, n_ff=512, n_head=2, n_head_kv=1, head_dim=256, n_vocab=1024)
    path = write_text_gguf(tmp_path / "untied.gguf", tied=False, **small)
    plan = plan_offload(path, n_ctx=512, vram_bytes=80 * GiB, gpu_available=True)
    layer = layer_bytes(256, 512, 256, 512, 256)  # q 256x512, k/v 256x256, o 512x256, ff 512
    assert plan.gpu_weights == 4 * layer + q6k(256 * 1024) + f32(256)
    assert plan.cpu_weights == q6k(256 * 1024)  # token_embd only


def test_explicit_pattern_array_and_no_sliding_window(tmp_path: Path) -> None:
    small = dict(n_layers=4, n_embd=256, n_ff=512, n_head=2, n_head_kv=1, head_dim=256, n_vocab=1024)
    with_array = write_text_gguf(
        tmp_path / "array.gguf", sliding_window=256, pattern=[True, False, True, False], **small
    )
    plan = plan_offload(with_array, n_ctx=4096, vram_bytes=80 * GiB, gpu_available=True, swa_full=False, n_ubatch=256)
    per_cell = 2 * 1 * 256 * 2
    assert plan.gpu_kv == 2 * per_cell * 4096 + 2 * per_cell * 512  # sliding: pad256(256 + 256) = 512
    no_swa = write_text_gguf(tmp_path / "noswa.gguf", sliding_window=None, **small)
    plan = plan_offload(no_swa, n_ctx=4096, vram_bytes=80 * GiB, gpu_available=True, swa_full=False)
    assert plan.gpu_kv == 4 * per_cell * 4096


def test_cpu_only_build_plans_zero_layers(model_4b: Path, mmproj: Path) -> None:
    from medgemma_gguf.devices import gpu_devices

    if gpu_devices():
        pytest.skip("needs a llama-cpp-python build without a GPU backend")
    plan = plan_offload(model_4b, n_ctx=4096, vram_bytes=None, mmproj_path=mmproj)
    assert plan.n_gpu_layers == 0 and not plan.gpu_available
    assert plan.gpu_bytes == 0
    assert plan.cpu_weights == EMBD_4B + 34 * LAYER_4B + f32(2560)
    assert plan.cpu_kv == 5 * kv_4b_layer(4096) + 29 * kv_4b_layer(1536)
    assert plan.cpu_mmproj == MMPROJ
    # the CPU runs both graphs: the text compute buffer (CPU alignment) and the vision encoder's; one logits row
    assert plan.cpu_compute == plan.text_compute + VISION_COMPUTE_FLASH
    assert plan.cpu_output == 262208 * 4
    assert "has no GPU device to offload to" in plan.describe()


def test_budget_below_compute_buffer_gives_zero_layers_and_a_warning(model_4b: Path) -> None:
    budget = 1 * GiB + 256 * MiB  # 256 MiB after headroom: less than the 512 MiB of logits alone
    plan = plan_offload(model_4b, n_ctx=8192, vram_bytes=budget, gpu_available=True)
    assert plan.n_gpu_layers == 0
    assert plan.gpu_bytes == expected_4b(0, 8192)
    assert plan.gpu_bytes > budget - 1 * GiB
    assert "warning: the budget" in plan.describe() and "offloading no layer" in plan.describe()


def test_flash_attention_drops_the_score_matrices(model_27b: Path) -> None:
    plain = plan_offload(model_27b, n_ctx=32768, vram_bytes=80 * GiB, gpu_available=True, flash_attn="off")
    flash = plan_offload(model_27b, n_ctx=32768, vram_bytes=80 * GiB, gpu_available=True, flash_attn=True)
    # without flash attention the scores of the global layers dominate: 32 heads x 512 tokens x 32768 cells x 4 B
    assert plain.gpu_compute - flash.gpu_compute >= 0.9 * 32 * 512 * 32768 * 4
    assert flash.gpu_compute < 256 * MiB


def test_n_ctx_zero_means_training_context(model_4b: Path) -> None:
    plan = plan_offload(model_4b, n_ctx=0, vram_bytes=None, gpu_available=False)
    assert plan.n_ctx == 131072
    assert plan.cpu_kv == 5 * kv_4b_layer(131072) + 29 * kv_4b_layer(1536)


# ---------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("6GiB", 6 * GiB),
        ("6GB", 6 * 10**9),
        ("6000MB", 6000 * 10**6),
        ("512MiB", 512 * MiB),
        ("1.5 gib", int(1.5 * GiB)),
        ("2048kib", 2048 * 1024),
        ("100B", 100),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "6", "GiB", "6 GiBs", "6G", "-1GiB", "0MiB", "six GiB", "6e3MB"])
def test_parse_size_rejects_bad_strings(text: str) -> None:
    with pytest.raises(UserError, match="e.g. 6GiB"):
        parse_size(text)


def test_missing_and_non_gguf_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        plan_offload(tmp_path / "absent.gguf", n_ctx=4096, vram_bytes=GiB, gpu_available=True)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    with pytest.raises(UserError, match="not a GGUF file"):
        plan_offload(junk, n_ctx=4096, vram_bytes=GiB, gpu_available=True)


def test_truncated_gguf_is_reported(tmp_path: Path, model_4b: Path) -> None:
    truncated = tmp_path / "truncated.gguf"
    with model_4b.open("rb") as source:
        truncated.write_bytes(source.read(4096))
    with pytest.raises(UserError, match="truncated or corrupt"):
        plan_offload(truncated, n_ctx=4096, vram_bytes=GiB, gpu_available=True)


def test_mmproj_and_model_swapped(model_4b: Path, mmproj: Path) -> None:
    with pytest.raises(UserError, match="mmproj"):
        plan_offload(mmproj, n_ctx=4096, vram_bytes=GiB, gpu_available=True)
    with pytest.raises(UserError, match="not an mmproj file"):
        plan_offload(model_4b, n_ctx=4096, vram_bytes=GiB, mmproj_path=model_4b, gpu_available=True)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_ctx": -5}, "n_ctx"),
        ({"n_ctx": 4096, "n_ubatch": 0}, "n_ubatch"),
        ({"n_ctx": 4096, "vram_bytes": 0}, "budget"),
        ({"n_ctx": 4096, "kv_type": "f12"}, "f16, q8_0, q4_0"),
        ({"n_ctx": 4096, "kv_type": "q8_0", "flash_attn": "off"},
         r"quantized V cache \(q8_0, from kv_type or kv_type_v\) needs flash attention"),
    ],
)
def test_bad_arguments(model_4b: Path, kwargs: dict, message: str) -> None:
    arguments = {"vram_bytes": 8 * GiB, "gpu_available": True} | kwargs
    with pytest.raises(UserError, match=message):
        plan_offload(model_4b, **arguments)


@pytest.mark.parametrize(("kv_type", "block_bytes"), [("q8_0", 34), ("q4_0", 18)])
def test_quantized_cache_types_shrink_kv(model_4b: Path, kv_type: str, block_bytes: int) -> None:
    plan = plan_offload(model_4b, n_ctx=8192, vram_bytes=80 * GiB, gpu_available=True, kv_type=kv_type)
    # 32 values per block; per layer K and V are 1024 values x cells each
    cells = 5 * 8192 + 29 * 1536
    assert plan.gpu_kv == 2 * (1024 // 32 * block_bytes) * cells


def test_k_and_v_types_apart_and_per_slot(model_4b: Path) -> None:
    from medgemma_gguf.runtime.context_settings import ContextSettings

    settings = ContextSettings(n_ctx=8192, type_k="q8_0", type_v="f16", n_seq=3, n_outputs_max=3)
    plan = plan_offload(model_4b, vram_bytes=80 * GiB, gpu_available=True, settings=settings)
    cells = 5 * 8192 + 29 * 1536  # per sequence: every slot has its own stream of n_ctx cells
    assert plan.gpu_kv == 3 * (1024 // 32 * 34 + 1024 * 2) * cells
    assert plan.cpu_output == 3 * 262208 * 4
    assert "K q8_0, V f16" in plan.describe() and "x 3 sequences" in plan.describe()


# ---------------------------------------------------------------------------------------------------
# free memory


def _fake_nvidia_smi(folder: Path, script: str) -> None:
    executable = folder / "nvidia-smi"
    executable.write_text("#!/bin/sh\n" + script)
    executable.chmod(executable.stat().st_mode | stat.S_IXUSR)


def test_free_vram_from_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model_4b: Path) -> None:
    _fake_nvidia_smi(tmp_path, 'echo "5120"\necho "20000"\n')
    monkeypatch.setenv("PATH", str(tmp_path))
    assert query_free_vram() == 5120 * MiB  # GPU 0
    plan = plan_offload(model_4b, n_ctx=8192, vram_bytes=None, gpu_available=True)
    assert plan.budget_bytes == 5120 * MiB
    assert plan.n_gpu_layers == best_n(lambda k: expected_4b(k, 8192), 35, 5120 * MiB)
    assert "5.00 GiB free on GPU 0" in plan.describe()


def test_free_vram_unknown_tells_user_to_pass_vram(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model_4b: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi here
    with pytest.raises(UserError, match="--vram"):
        plan_offload(model_4b, n_ctx=8192, vram_bytes=None, gpu_available=True)
    _fake_nvidia_smi(tmp_path, 'echo "NVIDIA-SMI has failed because it could not communicate" >&2\nexit 9\n')
    with pytest.raises(UserError, match="could not communicate.*--vram"):
        query_free_vram()


# ---------------------------------------------------------------------------------------------------
# the header reader


def test_header_reader_agrees_with_gguf_reader(tmp_path: Path) -> None:
    small = dict(n_layers=3, n_embd=256, n_ff=512, n_head=2, n_head_kv=1, head_dim=256, n_vocab=1024)
    path = write_text_gguf(tmp_path / "small.gguf", pattern=[True, True, False], vocabulary=True, **small)
    ours = read_gguf_info(path)
    theirs = gguf.GGUFReader(path)
    assert [(t.name, t.ggml_type, t.shape) for t in ours.tensors] == [
        (t.name, t.tensor_type, tuple(int(d) for d in t.shape)) for t in theirs.tensors
    ]
    assert [t.n_bytes for t in ours.tensors] == [int(t.n_bytes) for t in theirs.tensors]
    for key in (
        "general.architecture",
        "gemma3.block_count",
        "gemma3.attention.sliding_window",
        "gemma3.attention.sliding_window_pattern",
    ):
        assert ours.metadata[key] == theirs.get_field(key).contents()
    assert ours.metadata["gemma3.attention.sliding_window_pattern"] == [True, True, False]
    tokens = ours.metadata["tokenizer.ggml.tokens"]  # 1024 tokens: under the size limit, so kept
    assert tokens == theirs.get_field("tokenizer.ggml.tokens").contents() and tokens[5] == "<tok5>"
    assert ours.metadata["tokenizer.ggml.model"] == "llama"


def test_header_reader_skips_a_real_size_vocabulary(model_4b: Path) -> None:
    info = read_gguf_info(model_4b)
    assert info.metadata["tokenizer.ggml.tokens"] is None
    assert info.tensor("token_embd.weight").shape == (2560, 262208)
    assert len(info.tensors) == 2 + 34 * 13


@pytest.mark.parametrize(
    ("version", "message"), [(b"\x01\x00\x00\x00", "version 1"), (b"\x00\x00\x00\x03", "big-endian")]
)
def test_unsupported_gguf_versions(tmp_path: Path, version: bytes, message: str) -> None:
    small = dict(n_layers=1, n_embd=256, n_ff=256, n_head=1, n_head_kv=1, head_dim=256, n_vocab=256)
    path = write_text_gguf(tmp_path / "v.gguf", **small)
    with path.open("r+b") as handle:
        handle.seek(4)
        handle.write(version)
    with pytest.raises(UserError, match=message):
        read_gguf_info(path)


def test_small_ubatch_with_images_is_flagged(model_4b: Path, mmproj: Path) -> None:
    plan = plan_offload(model_4b, n_ctx=8192, vram_bytes=80 * GiB, mmproj_path=mmproj, n_ubatch=128, gpu_available=True)
    assert "below the 256 tokens of one image" in plan.describe()
    plan = plan_offload(model_4b, n_ctx=8192, vram_bytes=80 * GiB, mmproj_path=mmproj, gpu_available=True)
    assert "tokens of one image" not in plan.describe()
