"""How ``runtime.batching`` composes its ``llama_decode`` batches: tokens in sequence-id order (llama.cpp's
per-sequence KV puts only consecutive ids in one micro-batch), and a prompt that arrives while another slot
generates joins that slot's step whole, its last token included — while a prompt alone keeps its last
token for a step of its own (as ``ChatModel.chat`` does)."""

from __future__ import annotations

import queue
import threading
import time

import llama_cpp
import pytest
from test_runtime_chat import VARIANT  # noqa: F401 (what conftest.files converts)


@pytest.fixture(scope="module")
def model(files):
    from medgemma_gguf.runtime.chat import load

    with load(files.text_path, None, n_gpu_layers=0, n_ctx=512, n_threads=1, n_parallel=4) as chat_model:
        yield chat_model


def _record_batches(monkeypatch) -> list[list[tuple[int, int, bool]]]:
    """Wrap llama_decode: each call's tokens as (seq_id, position, logits), in batch order."""
    calls: list[list[tuple[int, int, bool]]] = []
    real = llama_cpp.llama_decode

    def decode(ctx, batch):
        calls.append([(batch.seq_id[i][0], batch.pos[i], bool(batch.logits[i])) for i in range(batch.n_tokens)])
        return real(ctx, batch)

    monkeypatch.setattr(llama_cpp, "llama_decode", decode)
    return calls


def _job(model, text: str, max_tokens: int):
    from medgemma_gguf.runtime.batching import Job
    from medgemma_gguf.runtime.sampling import sampling_settings

    settings = sampling_settings(temperature=0, max_tokens=max_tokens)
    prompt = model.prompt([{"role": "user", "content": text}])
    sampler = model.engine.new_sampler(settings.resolve(model.sampling_defaults), reasoning=model.reasoning_markers)
    events: queue.SimpleQueue = queue.SimpleQueue()
    tokens: list[int] = []
    done = threading.Event()

    def emit(kind, value):
        if kind == "token":
            tokens.append(value.token)
        elif kind in ("done", "error"):
            events.put((kind, value))
            done.set()

    return Job(prompt, settings, sampler, emit, ignore_eos=True), tokens, done, events


def _wait(condition, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the batcher did not get there in time"
        time.sleep(0.005)


def _run(batcher, job, done, events) -> tuple[str, object]:
    """Submit ``job`` and wait for its end: its last event (kind, value)."""
    batcher.submit(job)
    _wait(done.is_set)
    return events.get()


def _cancel(job, done) -> None:
    job.cancelled.set()
    _wait(done.is_set)


def test_batches_list_sequences_in_order_and_a_prompt_joins_running_slots_whole(model, monkeypatch):
    from medgemma_gguf.runtime.batching import Batcher

    calls = _record_batches(monkeypatch)
    batcher = Batcher(model, n_slots=4, queue_size=4)
    try:
        # x (slot 0) and y (slot 1) arrive together, with no slot generating
        x, x_tokens, x_done, _ = _job(model, "Describe the chest radiograph.", 400)
        y, y_tokens, y_done, _ = _job(model, "List three causes of anemia.", 400)
        batcher.submit(x)
        batcher.submit(y)
        _wait(lambda: len(x_tokens) >= 2 and len(y_tokens) >= 2)
        _cancel(x, x_done)  # slot 0 frees while slot 1 keeps generating
        # z takes slot 0 (its cached chat-template prefix is the longest) and starts after y: arrival order 1, 0
        z, z_tokens, z_done, z_events = _job(model, "Describe the chest radiograph again, briefly.", 3)
        n_before = len(calls)
        assert _run(batcher, z, z_done, z_events)[0] == "done" and len(z_tokens) == 3
        _cancel(y, y_done)
    finally:
        batcher.close()
    for batch in calls:
        seq_ids = [seq for seq, _, _ in batch]
        assert seq_ids == sorted(seq_ids), f"a batch lists its sequences out of order: {seq_ids}"
    # alone, the two prompts were decoded without their last tokens, which then had a step of their own
    assert not any(logits for _, _, logits in calls[0]) and {seq for seq, _, _ in calls[0]} == {0, 1}
    assert [(seq, logits) for seq, _, logits in calls[1]] == [(0, True), (1, True)]
    # z's prompt (what its slot's cache did not hold) went in one step with y's token, its last token with logits
    z_steps = [batch for batch in calls[n_before:] if sum(seq == 0 for seq, _, _ in batch) > 1]
    assert len(z_steps) == 1, z_steps
    step = z_steps[0]
    assert step[0][0] == 0 and step[-1][0] == 1 and step[-1][2]  # z's tokens first (seq 0), then y's
    z_part = [entry for entry in step if entry[0] == 0]
    assert [logits for _, _, logits in z_part] == [False] * (len(z_part) - 1) + [True]
    assert [pos for _, pos, _ in z_part] == list(range(z_part[0][1], z_part[0][1] + len(z_part)))


def test_a_long_prompt_is_fed_in_chunks_beside_a_generating_slot(model, monkeypatch):
    from medgemma_gguf.runtime.batching import Batcher

    calls = _record_batches(monkeypatch)
    chunk = 32
    batcher = Batcher(model, n_slots=4, queue_size=4, prefill_chunk=chunk)
    try:
        x, x_tokens, x_done, _ = _job(model, "Describe the chest radiograph.", 400)
        batcher.submit(x)
        _wait(lambda: len(x_tokens) >= 2)
        x_seq = calls[-1][0][0]
        long_text = "Summarise: " + " ".join(f"finding {i} is stable" for i in range(40))
        z, z_tokens, z_done, z_events = _job(model, long_text, 2)
        n_before = len(calls)
        assert _run(batcher, z, z_done, z_events)[0] == "done" and len(z_tokens) == 2
        _cancel(x, x_done)
    finally:
        batcher.close()
    prompt_steps = [batch for batch in calls[n_before:] if sum(seq != x_seq for seq, _, _ in batch) > 1]
    z_counts = [sum(seq != x_seq for seq, _, _ in batch) for batch in prompt_steps]
    assert len(prompt_steps) >= 4 and sum(z_counts) > 3 * chunk, z_counts  # a prompt of well over 3 chunks ...
    assert max(z_counts) <= chunk, z_counts  # ... never more than a chunk a step ...
    for batch in prompt_steps:  # ... each step also decoding x's next token
        assert [(seq, logits) for seq, _, logits in batch if seq == x_seq] == [(x_seq, True)], batch


def test_a_request_whose_time_runs_out_in_the_queue_never_takes_a_slot_and_answers_503(model):
    from medgemma_gguf.runtime.batching import Batcher
    from medgemma_gguf.runtime.server import _job_error

    batcher = Batcher(model, n_slots=1, queue_size=4)
    try:
        x, x_tokens, x_done, _ = _job(model, "Describe the chest radiograph.", 480)  # no time limit
        batcher.submit(x)
        _wait(lambda: len(x_tokens) >= 2)
        late, late_tokens, late_done, late_events = _job(model, "List three causes of anemia.", 3)
        late.deadline = time.monotonic() + 0.02  # waits behind x, the only slot, past its limit
        kind, value = _run(batcher, late, late_done, late_events)
        assert kind == "error" and isinstance(value, TimeoutError) and late_tokens == []
        assert batcher.stats.finished["timeout"] == 1 and len(x_tokens) < 480, len(x_tokens)  # x kept its slot
        _cancel(x, x_done)
    finally:
        batcher.close()
    error = _job_error(kind, value, "rid-1")
    assert error.status == 503 and error.headers == {"Retry-After": "5"} and "time limit" in error.message
