"""The measured-sensitivity allocator: budgets, exactness against brute force, errors, recipe output."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from medgemma_gguf.convert.quantize.auto import (
    BpwBudget,
    Capacity,
    Infeasible,
    SensitivityTable,
    SizeBudget,
    TensorGroup,
    VramBudget,
    allocate,
    mix_to_recipe_toml,
    model_facts,
    parse_budget,
    parse_sensitivity_table,
    read_sensitivity_table,
    recipe_tensor_types,
    solve_knapsack,
)
from medgemma_gguf.errors import UserError

T = GGMLQuantizationType
CANDIDATES = (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0, T.BF16)
KIND_SHAPES = {"attn_q": (256, 256), "attn_k": (256, 128), "attn_v": (256, 128), "attn_output": (256, 256),
               "ffn_gate": (256, 768), "ffn_up": (256, 768), "ffn_down": (768, 256)}


def brute_force(options, capacity):
    best = math.inf
    for combo in itertools.product(*(range(len(o)) for o in options)):
        if sum(options[g][i][0] for g, i in enumerate(combo)) <= capacity:
            best = min(best, math.fsum(options[g][i][1] for g, i in enumerate(combo)))
    return best


def random_options(rng: random.Random, n_groups: int, n_types: int):
    return [[(rng.randint(1, 40) * rng.choice((1, 2, 7)), rng.random()) for _ in range(n_types)]
            for _ in range(n_groups)]


def synthetic_table(rng: random.Random, n_layers: int = 3, row_mismatch: bool = False) -> SensitivityTable:
    """Gemma-shaped groups; ΔKL falls with bits, times a per-group sensitivity (some layers matter more)."""
    groups = []
    for layer in range(n_layers):
        for kind, shape in KIND_SHAPES.items():
            if row_mismatch and kind == "ffn_down":
                shape = (304, 256)  # 304 = 16 * 19: only 1-element-block types fit
            sensitivity = rng.uniform(0.2, 3.0) * (3.0 if layer == 0 else 1.0)
            delta = {t: sensitivity * 2.0 ** (-8 * GGML_QUANT_SIZES[t][1] / GGML_QUANT_SIZES[t][0])
                     for t in CANDIDATES}
            delta[T.BF16] = 0.0
            groups.append(TensorGroup(f"blk.{layer}.{kind}", ((f"blk.{layer}.{kind}.weight", shape),), delta))
    embd = {t: rng.uniform(0.01, 0.1) * 2.0 ** (-8 * GGML_QUANT_SIZES[t][1] / GGML_QUANT_SIZES[t][0])
            for t in CANDIDATES}
    groups.append(TensorGroup("token_embd", (("token_embd.weight", (256, 1088)),), embd))
    return SensitivityTable(T.BF16, tuple(groups))


def full_capacity(table: SensitivityTable, capacity: int) -> Capacity:
    return Capacity(capacity, frozenset(g.name for g in table.groups), 0, f"{capacity} bytes")


# --- the knapsack ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(8))
def test_dp_matches_brute_force_and_greedy_fits(seed):
    rng = random.Random(seed)
    for _ in range(15):
        options = random_options(rng, rng.randint(1, 6), rng.randint(1, 4))
        low = sum(min(b for b, _ in o) for o in options)
        high = sum(max(b for b, _ in o) for o in options)
        capacity = rng.randint(low, high)
        best = brute_force(options, capacity)
        for method in ("auto", "dp"):
            solution = solve_knapsack(options, capacity, method)
            assert solution.total_bytes <= capacity
            assert solution.total_cost == pytest.approx(best, abs=1e-12), (options, capacity, method)
            assert solution.method in ("dp-exact", "unconstrained")
        greedy = solve_knapsack(options, capacity, "greedy")
        assert greedy.total_bytes <= capacity
        assert greedy.total_cost >= best - 1e-12


def test_bucketed_dp_fits_exact_budget_and_stays_close():
    """A table too big for the exact DP is rounded into buckets; the result still fits and is near optimal."""
    rng = random.Random(5)
    options = []
    for _ in range(40):  # more bytes, less cost (as with real types), with noise; odd sizes: gcd 1
        sizes = [rng.randint(1000, 9000) * 3 + 1 for _ in range(4)]
        options.append([(b, rng.uniform(0.5, 1.5) * 1e4 / b) for b in sizes])
    low = sum(min(b for b, _ in o) for o in options)
    high = sum(max(b for b, _ in o) for o in options)
    capacity = low + (high - low) // 3
    exact = solve_knapsack(options, capacity, "dp", max_cells=10**8)
    assert exact.method == "dp-exact"
    rounded = solve_knapsack(options, capacity, "dp", max_cells=40 * 300)
    assert rounded.method == "dp-bucketed"
    assert rounded.total_bytes <= capacity
    assert exact.total_cost <= rounded.total_cost <= exact.total_cost * 1.02
    auto = solve_knapsack(options, capacity, "auto", max_cells=40 * 300)
    assert auto.total_bytes <= capacity
    assert auto.total_cost <= rounded.total_cost
    with pytest.raises(UserError, match="DP table"):
        solve_knapsack(options, capacity, "dp", max_cells=40 * 10)
    greedy_only = solve_knapsack(options, capacity, "auto", max_cells=40 * 10)
    assert greedy_only.method == "greedy" and greedy_only.total_bytes <= capacity


def test_infeasible_capacity_and_unknown_method():
    options = [[(10, 1.0), (20, 0.5)], [(5, 2.0)]]
    with pytest.raises(Infeasible) as info:
        solve_knapsack(options, 14)
    assert info.value.minimum == 15
    assert solve_knapsack(options, 15).choice == (0, 0)
    assert solve_knapsack(options, 1000).method == "unconstrained"
    with pytest.raises(UserError, match="allocation method"):
        solve_knapsack(options, 100, "annealing")


# --- tables and budgets ----------------------------------------------------------------------------------
def test_allocation_respects_budgets_and_matches_brute_force_on_real_shapes():
    rng = random.Random(11)
    table = synthetic_table(rng, n_layers=3)
    small = SensitivityTable(T.BF16, table.groups[:4])  # 4 groups x 7 types: brute force is cheap
    sizes = [[g.n_bytes(t) for t in g.candidates] for g in small.groups]
    low, high = sum(map(min, sizes)), sum(map(max, sizes))
    for fraction in (0.0, 0.1, 0.35, 0.6, 0.9):
        capacity = int(low + fraction * (high - low))
        mix = allocate(small, full_capacity(small, capacity))
        options = [[(g.n_bytes(t), g.delta_kl[t]) for t in g.candidates] for g in small.groups]
        assert mix.counted_bytes == sum(g.n_bytes(mix.types[g.name]) for g in small.groups) <= capacity
        assert mix.predicted_delta_kl == pytest.approx(brute_force(options, capacity), abs=1e-12)
    # more bytes never predicts worse
    results = [allocate(table, BpwBudget(bpw).capacity(table, None)) for bpw in (3.0, 4.5, 6.0)]
    assert results[0].predicted_delta_kl >= results[1].predicted_delta_kl >= results[2].predicted_delta_kl
    elements = sum(g.n_elements for g in table.groups)
    for bpw, mix in zip((3.0, 4.5, 6.0), results, strict=True):
        assert 8 * mix.counted_bytes / elements <= bpw
    # the most sensitive layer (layer 0 weighs 3x in the synthetic table) gets more bits than the others
    def bits(mix, layers):
        chosen = [g for g in table.groups if g.layer in layers]
        return sum(8 * mix.group_bytes[g.name] for g in chosen) / sum(g.n_elements for g in chosen)

    assert bits(results[1], {0}) > bits(results[1], {1, 2})


def test_block_size_limits_candidates():
    table = synthetic_table(random.Random(2), n_layers=1, row_mismatch=True)
    group = table.group("blk.0.ffn_down")
    assert group.candidates == (T.BF16,)
    mix = allocate(table, BpwBudget(5.0).capacity(table, None))
    assert mix.types["blk.0.ffn_down"] is T.BF16
    with pytest.raises(UserError, match="no candidate type"):
        SensitivityTable(T.BF16, (TensorGroup("blk.0.attn_q", (("blk.0.attn_q.weight", (300, 8)),),
                                              {T.Q4_K: 0.1}),))


def test_infeasible_budget_names_the_feasible_range():
    table = synthetic_table(random.Random(3), n_layers=2)
    with pytest.raises(UserError, match=r"feasible range 2\.6\d\d bpw .*\.\. 16\.000 bpw \(unquantized BF16\)"):
        allocate(table, BpwBudget(2.0).capacity(table, None))
    table_bytes = sum(g.n_bytes(T.Q2_K) for g in table.groups)
    with pytest.raises(UserError, match="feasible range"):
        allocate(table, full_capacity(table, table_bytes - 1))
    assert allocate(table, full_capacity(table, table_bytes)).counted_bytes == table_bytes


def test_table_json_round_trip_and_errors(tmp_path):
    table = synthetic_table(random.Random(4), n_layers=1)
    path = tmp_path / "table.json"
    path.write_text(table.to_json())
    again = read_sensitivity_table(path)
    assert again == table
    data = json.loads(table.to_json())
    with pytest.raises(UserError, match="not a medgemma-gguf-sensitivity"):
        parse_sensitivity_table({"format": "other"})
    with pytest.raises(UserError, match="version"):
        parse_sensitivity_table({**data, "version": 99})
    bad = json.loads(table.to_json())
    bad["groups"][0]["delta_kl"]["Q4_K"] = float("nan")
    with pytest.raises(UserError, match="finite"):
        parse_sensitivity_table(bad)
    bad = json.loads(table.to_json())
    bad["groups"][0]["delta_kl"] = {"Q9_Z": 0.1}
    with pytest.raises(UserError, match="unknown ggml type 'Q9_Z'"):
        parse_sensitivity_table(bad)
    bad = json.loads(table.to_json())
    del bad["groups"][1]["tensors"]
    with pytest.raises(UserError, match="malformed"):
        parse_sensitivity_table(bad)
    bad = json.loads(table.to_json())
    bad["groups"][1] = bad["groups"][0]
    with pytest.raises(UserError, match="twice"):
        parse_sensitivity_table(bad)
    with pytest.raises(UserError, match="not found"):
        read_sensitivity_table(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(UserError, match="as JSON"):
        read_sensitivity_table(tmp_path / "broken.json")


def test_parse_budget():
    assert parse_budget(target_size="2.6GB") == SizeBudget(2_600_000_000)
    assert parse_budget(target_bpw=4.5) == BpwBudget(4.5)
    assert parse_budget(vram="6GiB", ctx=8192) == VramBudget(6 * 1024**3, 8192)
    for kwargs, message in (({}, "exactly one"), ({"target_size": "1GB", "target_bpw": 4.0}, "exactly one"),
                            ({"vram": "6GiB"}, "needs ctx"), ({"target_bpw": 4.0, "ctx": 10}, "only applies"),
                            ({"target_bpw": 0}, "above 0"), ({"target_bpw": 40}, "at most 32"),
                            ({"vram": "6GiB", "ctx": 0}, "positive"), ({"target_size": "big"}, "cannot read")):
        with pytest.raises(UserError, match=message):
            parse_budget(**kwargs)


# --- budgets on a converted GGUF -------------------------------------------------------------------------
def gguf_table(facts_info, rng: random.Random) -> SensitivityTable:
    """A synthetic table over every matrix of a converted text GGUF."""
    groups = []
    for tensor in facts_info.tensors:
        if len(tensor.shape) < 2:
            continue
        name = tensor.name.removesuffix(".weight")
        delta = {t: rng.uniform(0.5, 2) * 2.0 ** (-8 * GGML_QUANT_SIZES[t][1] / GGML_QUANT_SIZES[t][0])
                 for t in CANDIDATES}
        delta[T.F32] = 0.0
        groups.append(TensorGroup(name, ((tensor.name, tensor.shape),), delta))
    return SensitivityTable(T.F32, tuple(groups))


def test_size_and_vram_budgets_on_converted_model(converted):
    from medgemma_gguf.gguf_info import read_gguf_info
    from medgemma_gguf.runtime.offload import plan_offload

    result = converted("mm-k256", "f32", "f32")
    info = read_gguf_info(result.text_path)
    table = gguf_table(info, random.Random(6))
    facts = model_facts(result.text_path, table)
    assert facts.tied_embeddings
    assert {n.split(".")[-2] for n in facts.fixed_tensors} >= {"attn_norm", "ffn_norm"}
    file_size = result.text_path.stat().st_size
    assert 0 <= facts.header_bytes - (file_size - info.total_tensor_bytes) <= 64 * 1024

    # size budget: the unquantized size (as estimated) is feasible and keeps everything at F32; above it is not
    f32_bytes = sum(g.n_bytes(T.F32) for g in table.groups)
    unquantized = SizeBudget(f32_bytes + facts.fixed_bytes() + facts.header_bytes).capacity(table, facts)
    assert all(t is T.F32 for t in allocate(table, unquantized).types.values())
    with pytest.raises(UserError, match=r"above the unquantized size; feasible range \d"):
        allocate(table, SizeBudget(f32_bytes + facts.fixed_bytes() + facts.header_bytes + 1).capacity(table, facts))
    budget = SizeBudget(file_size // 4).capacity(table, facts)
    mix = allocate(table, budget)
    estimated = mix.counted_bytes + facts.fixed_bytes() + facts.header_bytes
    assert estimated <= file_size // 4
    with pytest.raises(UserError, match="feasible range"):
        allocate(table, SizeBudget(file_size // 20).capacity(table, facts))

    # VRAM budget: agrees with the offload planner — at the exact need everything fits, one byte less not
    vram = VramBudget(1, n_ctx=1024, mmproj_path=result.mmproj_path)
    overhead = sum(vram.breakdown(facts).values())
    counted_f32 = sum(g.n_bytes(T.F32) for g in table.groups if g.name in vram.capacity(table, facts).counted)
    need = overhead + counted_f32
    plan = plan_offload(result.text_path, n_ctx=1024, vram_bytes=need, mmproj_path=result.mmproj_path,
                        gpu_available=True)
    assert plan.fits_fully and plan.gpu_bytes + plan.headroom_bytes == need
    assert not plan_offload(result.text_path, n_ctx=1024, vram_bytes=need - 1, mmproj_path=result.mmproj_path,
                            gpu_available=True).fits_fully
    counted = VramBudget(need, 1024, result.mmproj_path).capacity(table, facts).counted
    assert "token_embd" in counted  # tied output: llama.cpp puts a copy of token_embd on the GPU
    tight = allocate(table, VramBudget(overhead + counted_f32 // 3, 1024, result.mmproj_path).capacity(table, facts))
    assert tight.counted_bytes <= counted_f32 // 3
    with pytest.raises(UserError, match="feasible range"):
        allocate(table, VramBudget(overhead, 1024, result.mmproj_path).capacity(table, facts))


def test_model_facts_rejects_mismatched_tables(converted):
    from medgemma_gguf.gguf_info import read_gguf_info

    result = converted("mm-k256", "f32", "f32")
    table = gguf_table(read_gguf_info(result.text_path), random.Random(7))
    with pytest.raises(UserError, match="lacks the matrix"):
        model_facts(result.text_path, SensitivityTable(T.F32, table.groups[1:]))
    first = table.groups[0]
    wrong_shape = TensorGroup(first.name, ((first.tensors[0][0], (first.tensors[0][1][0], 7)),), first.delta_kl)
    with pytest.raises(UserError, match="measure the table on this model"):
        model_facts(result.text_path, SensitivityTable(T.F32, (wrong_shape, *table.groups[1:])))
    with pytest.raises(UserError, match="mmproj"):
        model_facts(result.mmproj_path, table)


# --- recipe output ---------------------------------------------------------------------------------------
def test_recipe_round_trip():
    table = synthetic_table(random.Random(8), n_layers=2)
    mix = allocate(table, BpwBudget(4.5).capacity(table, None))
    assert len(set(mix.types.values())) > 1  # a real mix, not one type everywhere
    text = mix_to_recipe_toml(mix, "AUTO-4.5bpw")
    assert recipe_tensor_types(text) == mix.tensor_types
    import tomllib

    data = tomllib.loads(text)
    assert data["name"] == "AUTO-4.5bpw"
    by_bytes: dict[GGMLQuantizationType, int] = {}
    for group, qtype in mix.types.items():
        by_bytes[qtype] = by_bytes.get(qtype, 0) + mix.group_bytes[group]
    assert data["base"] == max(by_bytes, key=by_bytes.get).name
    assert mix_to_recipe_toml(mix, "x", base_type=T.Q8_0).count('base = "Q8_0"') == 1
