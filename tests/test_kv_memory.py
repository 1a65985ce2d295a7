"""Long context: what llama.cpp allocates equals what the planner says, for every KV / flash-attention / SWA /
micro-batch / slot setting; invalid combinations are refused before anything loads; the small sliding-window
cache gives the full cache's replies over chats longer than the window, re-using what it can, and where it
cannot, the reply a fresh context gives."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from test_offload import MEDGEMMA_4B, MEDGEMMA_27B, write_text_gguf

from medgemma_gguf.errors import InputError, UserError
from medgemma_gguf.runtime.chat import load
from medgemma_gguf.runtime.context_settings import ContextSettings
from medgemma_gguf.runtime.engine import Engine, dry_run_allocations
from medgemma_gguf.runtime.kv_reuse import keep_prefix
from medgemma_gguf.runtime.offload import MemoryModel, largest_context, plan_offload, read_text_model

MiB = 1024**2
VARIANT = "mm-k256"  # 6 layers (5 sliding, window 32), 2 KV heads x 64


def mib(n_bytes: int) -> float:
    return round(n_bytes / MiB, 2)  # llama.cpp prints MiB with two decimals


def assert_plan_equals_allocations(plan, found, settings: ContextSettings, backend: str = "CPU") -> None:
    """The planner's KV caches (cells, layers, streams, bytes per K and V), compute and logits buffers equal
    what llama.cpp reported for the same context."""
    kv = plan.kv
    full_layers = sum(not s for s in kv.sliding)
    assert len(found.kv_caches) == 2
    full, swa = found.kv_caches
    assert (full.cells, full.layers, full.streams) == (kv.cells_full, full_layers, settings.n_seq)
    assert (swa.cells, swa.layers, swa.streams) == (kv.cells_swa, len(kv.sliding) - full_layers, settings.n_seq)
    assert (full.mib, swa.mib) == (mib(kv.full_bytes), mib(kv.swa_bytes))
    assert (full.k_type, full.v_type) == (settings.type_k, settings.type_v)
    assert found.compute_mib[backend] == mib(plan.text_compute), settings.describe()
    # logits: one row per sequence when created; a context asked for every token's logits grows it at its first
    # decode to n_batch rows, which the plan counts
    created = plan.cpu_output if settings.n_outputs_max else settings.n_seq * plan.cpu_output // plan.kv.n_ubatch
    assert found.output_mib[backend] == mib(created)
    assert found.flash_attn == settings.flash_attn_planned


def settings_grid(n_ctx: int, *, slots=(1, 3), ubatches=(64, 512)):
    types = [("f16", "f16"), ("q8_0", "q8_0"), ("q4_0", "q4_0"), ("q8_0", "f16"), ("q4_0", "q8_0")]
    for ub, swa_full, (k, v), fa, n_seq, all_logits in itertools.product(ubatches, (False, True), types,
                                                                        ("auto", "on", "off"), slots, (False, True)):
        if v != "f16" and fa == "off":
            continue
        yield ContextSettings(n_ctx=n_ctx, n_seq=n_seq, n_ubatch=ub, swa_full=swa_full, type_k=k, type_v=v,
                              flash_attn=fa, n_outputs_max=0 if all_logits else n_seq)


# --- the planner equals llama.cpp ------------------------------------------------------------------------


def test_planner_equals_llama_cpp_allocations_on_the_fixture(files):
    """Real contexts on the converted fixture, one per setting: KV per cache, compute, logits — equal."""
    engine = Engine(files.text_path, n_threads=1, create_context=False)
    try:
        checked = 0
        for settings in settings_grid(1000):
            engine.create_context(settings)
            plan = plan_offload(files.text_path, gpu_available=False, settings=settings)
            assert_plan_equals_allocations(plan, engine.allocations, settings)
            checked += 1
        assert checked >= 100
    finally:
        engine.close()


@pytest.mark.integration
@pytest.mark.parametrize("shape", ["4b", "27b"])
def test_planner_equals_llama_cpp_on_medgemma_shapes(tmp_path, shape):
    """Dry runs (no weights) of header-only GGUFs with MedGemma 4B's and 27B's real shapes and vocabulary."""
    dims = MEDGEMMA_4B if shape == "4b" else MEDGEMMA_27B
    path = write_text_gguf(tmp_path / f"{shape}.gguf", vocabulary=True, **dims)
    grid = [s for s in settings_grid(8192, slots=(1, 2), ubatches=(512,)) if s.type_k == s.type_v or s.n_seq == 1]
    grid += [ContextSettings(n_ctx=32768, n_ubatch=1024, n_outputs_max=1, flash_attn=fa) for fa in ("on", "off")]
    for settings, found in zip(grid, dry_run_allocations(path, grid), strict=True):
        plan = plan_offload(path, gpu_available=False, settings=settings)
        assert_plan_equals_allocations(plan, found, settings)


def test_output_rows_shrink_the_compute_buffer(tmp_path):
    """One logits row per sequence (chat) instead of one per micro-batch token: MedGemma 4B's 262,208-token
    vocabulary costs 512 MiB of compute buffer at n_ubatch 512 otherwise."""
    path = write_text_gguf(tmp_path / "4b.gguf", **MEDGEMMA_4B)
    model = read_text_model(path)
    chat = MemoryModel(model, None, ContextSettings(n_ctx=4096, n_outputs_max=1), False, 0)
    every = MemoryModel(model, None, ContextSettings(n_ctx=4096, n_outputs_max=0), False, 0)
    assert every.text_compute - chat.text_compute > 400 * MiB
    assert chat.text_compute < 100 * MiB


# --- refused before loading --------------------------------------------------------------------------------


def test_quantized_v_without_flash_attention_is_refused_before_loading(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not read at all")
    for kwargs in ({"kv_type": "q8_0"}, {"kv_type_v": "q4_0"}):
        with pytest.raises(InputError, match="needs flash attention") as caught:
            load(junk, flash_attn="off", **kwargs)
        assert "flash_attn auto or on" in str(caught.value) and "kv_type_v f16" in str(caught.value)
    with pytest.raises(InputError, match="kv_type_k must be one of f16, q8_0, q4_0"):
        ContextSettings(type_k="q5_1")
    with pytest.raises(InputError, match="flash_attn must be auto, on or off"):
        ContextSettings(flash_attn="maybe")
    # a quantized K without flash attention is what llama.cpp allows
    assert ContextSettings(type_k="q8_0", flash_attn="off").k_quantized


def test_block_size_that_does_not_divide_the_head_is_refused_before_loading(tmp_path):
    odd = dict(n_layers=6, n_embd=512, n_ff=768, n_head=16, n_head_kv=2, head_dim=48, n_vocab=1024)
    path = write_text_gguf(tmp_path / "odd.gguf", **odd)
    with pytest.raises(InputError, match="blocks of 32 values, which do not divide this model's head size 48"):
        load(path, kv_type_k="q8_0", n_gpu_layers=0)
    with pytest.raises(UserError, match="head size 48"):
        plan_offload(path, n_ctx=1024, gpu_available=False, kv_type="q4_0")
    # without flash attention llama.cpp stores a quantized K as whole rows: allowed
    plan_offload(path, gpu_available=False, settings=ContextSettings(n_ctx=1024, type_k="q4_0", flash_attn="off"))


def test_cli_refuses_bad_combinations_with_flag_names(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF but nothing else")
    run = subprocess.run([sys.executable, "-m", "medgemma_gguf.cli", "chat", str(junk), "--prompt", "hi",
                          "--kv-type", "q4_0", "--flash-attn", "off"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "--flash-attn off" in run.stderr and "--kv-type" in run.stderr and "--kv-type-v f16" in run.stderr


# --- re-use with the small sliding-window cache --------------------------------------------------------------

WORDS = ["the", "patient", "reports", "chest", "pain", "fever", "cough", "for", "three", "days", "with", "blood",
         "pressure", "heart", "rate", "normal", "and", "a", "history", "of", "asthma", "treated", "inhaled",
         "steroids"]


def user_turns(n: int, seed: int = 1) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, 40)) for _ in range(n)]


def converse(model, turns, *, reuse: bool = True, max_tokens: int = 40):
    """A multi-turn chat; the replies' token ids and how many prompt positions each re-used."""
    conversation, replies, reused = [], [], []
    for text in turns:
        conversation.append({"role": "user", "content": text})
        if not reuse:
            model.reset()
        reply = model.chat(conversation, max_tokens=max_tokens)
        replies.append(reply.token_ids)
        reused.append(reply.timings["prompt_positions_reused"])
        conversation.append({"role": "assistant", "content": reply.text})
    return conversation, replies, reused


def small_and_full(files, **kwargs):
    # n_ubatch 64: the sliding layers keep pad256(32 + 64) = 256 cells, a sixth of these conversations
    common = dict(n_ctx=1024, n_threads=1, n_gpu_layers=0, n_ubatch=64) | kwargs
    return load(files.text_path, swa_full=False, **common), load(files.text_path, swa_full=True, **common)


@pytest.mark.parametrize("flash_attn", ["auto", "off"])
def test_small_and_full_sliding_window_caches_give_the_same_greedy_chat(files, flash_attn):
    small, full = small_and_full(files, flash_attn=flash_attn)
    with small, full:
        assert small.engine.allocations.kv_caches[1].cells == 256 and full.engine.allocations.kv_caches[1].cells == 1024
        turns = user_turns(5)
        conversation, full_replies, full_reused = converse(full, turns)
        _, small_replies, small_reused = converse(small, turns)
        assert small.plan is None and len(conversation) == 10
        assert small.engine.n_past > 2 * 256  # the chat is over twice as long as the sliding layers' cells
        assert small_replies == full_replies  # greedy tokens, with prefix re-use
        assert small_reused == full_reused and all(n > 0 for n in small_reused[1:])  # appending re-used everything
        _, fresh_replies, _ = converse(small, turns, reuse=False)
        assert fresh_replies == full_replies  # and without re-use


def test_truncation_into_the_past_re_evaluates_like_a_fresh_context(files):
    small, full = small_and_full(files)
    with small, full:
        conversation, _, _ = converse(small, user_turns(5))
        converse(full, user_turns(5))
        edited = [{"role": "user", "content": "a new first question about asthma"}, *conversation[1:-1]]
        memory = llama_cpp.llama_get_memory(small.engine.llama_context)
        assert llama_cpp.llama_memory_seq_pos_min(memory, 0) > 64  # the first positions' window is gone
        again = small.chat(edited, max_tokens=40)
        assert again.timings["prompt_positions_reused"] == 0  # re-evaluated from the start
        kept = full.chat(edited, max_tokens=40)
        assert kept.timings["prompt_positions_reused"] > 0  # the full cache re-uses the common start
        with load(files.text_path, n_ctx=1024, n_threads=1, n_gpu_layers=0, n_ubatch=64) as fresh:
            reference = fresh.chat(edited, max_tokens=40)
            prompt = fresh.prompt(edited)
            assert np.array_equal(small.next_token_logits(prompt), fresh.next_token_logits(prompt))
        assert again.token_ids == reference.token_ids == kept.token_ids


def test_a_short_trim_keeps_the_window_and_re_uses(files):
    small, _ = small_and_full(files)
    with small:
        conversation, _, _ = converse(small, user_turns(4))
        # the last reply again (regenerate): the cache is trimmed by the reply, inside the cache's slack
        again = small.chat(conversation[:-1], max_tokens=40)
        assert again.timings["prompt_positions_reused"] == again.prompt_tokens - 1


def test_keep_prefix_works_per_sequence(files):
    """Two sequences in one context (the server's slots): trimming one leaves the other alone, and a prefix
    whose window was evicted is refused (sequence cleared) while a recent one is kept."""
    settings = ContextSettings(n_ctx=1024, n_seq=2, n_ubatch=64, n_outputs_max=2)
    engine = Engine(files.text_path, n_threads=1, settings=settings)
    try:
        context = engine.llama_context
        memory = llama_cpp.llama_get_memory(context)
        batch = llama_cpp.llama_batch_init(64, 0, 1)
        lengths = {0: 600, 1: 200}
        try:
            for seq, length in lengths.items():
                for start in range(0, length, 64):
                    count = min(64, length - start)
                    batch.n_tokens = count
                    for i in range(count):
                        batch.token[i] = 20 + (start + i + 7 * seq) % 900
                        batch.pos[i] = start + i
                        batch.n_seq_id[i] = 1
                        batch.seq_id[i][0] = seq
                        batch.logits[i] = i == count - 1
                    assert llama_cpp.llama_decode(context, batch) == 0
        finally:
            llama_cpp.llama_batch_free(batch)
        n_swa = engine.n_swa
        assert n_swa == 32
        assert keep_prefix(context, 1, 190, n_swa)  # seq 1 never wrapped: everything is there
        assert llama_cpp.llama_memory_seq_pos_max(memory, 1) == 189
        assert llama_cpp.llama_memory_seq_pos_max(memory, 0) == 599  # the other slot untouched
        assert keep_prefix(context, 0, 590, n_swa)  # recent: the window behind 590 is cached
        assert not keep_prefix(context, 0, 100, n_swa)  # evicted: refused, and the sequence cleared
        assert llama_cpp.llama_memory_seq_pos_max(memory, 0) == -1
        assert llama_cpp.llama_memory_seq_pos_max(memory, 1) == 189
    finally:
        engine.close()


# --- --ctx auto --------------------------------------------------------------------------------------------------


def test_largest_context_is_the_last_one_that_fits(tmp_path):
    path = write_text_gguf(tmp_path / "4b.gguf", **MEDGEMMA_4B)
    settings = ContextSettings(n_outputs_max=1)
    model = read_text_model(path)
    budget = 4 * 1024**3
    n_ctx = largest_context(path, memory_bytes=budget, gpu=False, settings=settings, headroom_bytes=0)
    assert n_ctx is not None and n_ctx % 256 == 0

    def need(n: int) -> int:
        return MemoryModel(model, None, settings.with_(n_ctx=n), False, 0).plan(0, None).cpu_bytes

    assert need(n_ctx) <= budget < need(n_ctx + 256)
    quantized = largest_context(path, memory_bytes=budget, gpu=False, settings=settings.with_(type_k="q8_0",
                                type_v="q8_0"), headroom_bytes=0)
    assert quantized > n_ctx  # a q8_0 cache holds more positions in the same memory
    assert largest_context(path, memory_bytes=10**12, gpu=False, settings=settings) == 131072  # the model's own
    assert largest_context(path, memory_bytes=1024**3, gpu=False, settings=settings) is None  # not even the weights


def test_one_shot_auto_context_is_what_the_prompt_needs(files):
    with load(files.text_path, n_ctx="auto", n_threads=1, n_gpu_layers=0, lazy_context=True) as model:
        assert not model.engine.has_context
        prompt = model.prompt([{"role": "user", "content": "hello there"}])
        model.allocate_context(prompt.n_positions + 100)
        assert model.n_ctx == 256 and model.engine.allocations.kv_caches[0].cells == 256
        assert model.chat([{"role": "user", "content": "hello there"}], max_tokens=4).completion_tokens <= 4
        with pytest.raises(UserError, match="fit"):
            load(files.text_path, n_ctx=512, n_threads=1, n_gpu_layers=0, lazy_context=True).allocate_context(100_000)


def test_the_readme_long_context_commands_use_real_options():
    import re
    import shlex

    from medgemma_gguf.runtime.cli import chat_command, fit_command

    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Fit a memory budget"):readme.index("## Evaluate the quants")]
    commands = [shlex.split(line.split("#")[0]) for line in re.findall(r"^medgemma-gguf (?:chat|fit) [^\n]*", section,
                                                                       flags=re.MULTILINE)]
    assert len(commands) == 9
    for words in commands:
        command = chat_command if words[1] == "chat" else fit_command
        known = {opt for param in command.params for opt in param.opts}
        assert {w for w in words if w.startswith("--")} <= known
        context = command.make_context(words[1], words[2:])
        assert context.params["n_ctx"] in ("auto", 4096, 8192, 131072, 32768)
