"""Continuous batching: several requests decoded together in one llama.cpp context (``serve --parallel N``).

``Batcher(model, n_slots)`` owns the model's context while a server runs. Each slot is one llama.cpp
sequence (``seq_id`` = slot number) with its own KV stream of ``n_ctx`` positions (``--ctx`` is per slot:
the room one conversation has, as in ``chat``; the cache holds ``n_slots × n_ctx`` positions in all —
llama-server's ``-c`` is the total instead), its own prefix cache and its own sampler chain. One worker
thread makes every llama.cpp call, in steps modelled on llama-server's ``update_slots``:

1. Queued requests take free slots — the free slot whose cached tokens share the longest prefix with the
   request's prompt (same LoRA set), as llama-server picks by similarity; the rest of that slot's cache is
   removed (``runtime.kv_reuse.keep_prefix``: a cache that cannot continue there exactly — the sliding
   window behind the kept prefix is gone — is cleared and the prompt evaluated from the start).
2. Cancelled and timed-out requests leave their slots (``Job.cancelled``: a client that went away).
3. At most one image of one slot is encoded and decoded (libmtmd) in decodes of its own: Gemma 3 attends to
   an image block non-causally, a switch that holds for the whole context, so no other sequence may share
   those decodes (``Engine.eval_image_at``).
4. One batch: one token for every generating slot, then prompt tokens of the slots still reading their
   prompts, up to ``n_batch`` tokens — fewer (``prefill_chunk``) while other slots are generating, so a
   long prompt does not stall them for long — and one ``llama_decode``. Only slots with the same LoRA
   adapter set share a batch (adapters belong to the context, as in llama-server); sets take turns.
5. Each slot with logits in the batch samples its next token from its own row (``Sampler.sample(index)``)
   and its reply text advances (``runtime.reply``: stop strings, reasoning block).

A batch lists its tokens in sequence-id order: with a KV stream per sequence, llama.cpp puts only
sequences with consecutive ids into one micro-batch (``llama_batch_allocr::split_equal``, ``sequential``),
and every micro-batch runs the whole graph — four slots' tokens in the order 2, 3, 0, 1 cost two graph runs,
in the order 0, 1, 2, 3 one (measured: 166 against 96 ms per step on MedGemma 4B's widths, 2 CPU threads).
A prompt that arrives while other slots are generating joins their step whole, its last token included
(llama-server does the same); a prompt with no other slot busy is decoded without its last token, which
then gets a step of its own, as ``runtime.chat`` does: a request that runs alone computes the same logits as
``ChatModel.chat`` — and, seeded, gives the same reply.

Run together with others, a request shares batches whose shape changes the last bits of the
logits, so a seeded (or greedy) reply under load reproduces the solo reply only up to the first position
where two candidates are within rounding of each other; a seeded server request reproduces only when run
alone.

Events (``Job.emit``, called on the worker thread): ``("started", None)`` when the job gets a slot,
``("token", TokenEvent)`` per generated token, ``("done", ChatResult)`` at the end (``finish_reason``
"stop", "length" or "cancelled"), ``("error", exception)`` when the job failed (a ``UserError`` for
something the request asked for). Requests beyond the slots wait in a bounded queue (``QueueFull`` when
it is full). ``stats()`` gives the counters ``/metrics`` exposes.
"""

from __future__ import annotations

import collections
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

import llama_cpp
import numpy as np

from medgemma_gguf.errors import UserError
from medgemma_gguf.runtime.chat import ChatModel, ChatResult
from medgemma_gguf.runtime.engine import ImagePart
from medgemma_gguf.runtime.kv_reuse import keep_prefix
from medgemma_gguf.runtime.prompt import Prompt, PromptImage
from medgemma_gguf.runtime.reply import Delta, ReplyText
from medgemma_gguf.runtime.sampling import Sampler, SamplingSettings

log = logging.getLogger(__name__)

MAX_TOP_LOGPROBS = 20  # OpenAI's limit
DEFAULT_PREFILL_CHUNK = 256  # prompt tokens per step while other slots are generating

Unit = int | tuple[str, str, int]


class QueueFull(Exception):
    """Every slot is busy and the queue is full; ``retry_after`` estimates when to try again (seconds)."""

    def __init__(self, retry_after: int):
        super().__init__(f"all slots are busy and the queue is full; retry after {retry_after} s")
        self.retry_after = retry_after


@dataclass
class Job:
    """One request for the batcher. ``sampler`` was built for it (and is closed by the batcher)."""

    prompt: Prompt
    settings: SamplingSettings
    sampler: Sampler
    emit: Callable[[str, Any], object]
    adapters: tuple[str, ...] = ()
    top_logprobs: int | None = None  # None: no logprobs; 0..20: alternatives listed per token
    ignore_eos: bool = False
    deadline: float | None = None  # time.monotonic() after which the reply ends ("length")
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model's logits before sampling, and the most likely
    alternatives (OpenAI's definition: no temperature, penalties, bias or grammar applied)."""

    token: int
    piece: bytes
    logprob: float
    top: tuple[tuple[int, bytes, float], ...] = ()


@dataclass(frozen=True)
class TokenEvent:
    """One generated token: the text it completes (``deltas``) and, when asked, its log-probabilities."""

    token: int
    deltas: tuple[Delta, ...]
    logprob: TokenLogprob | None


@dataclass
class _Slot:
    seq_id: int
    cached: list[Unit] = field(default_factory=list)  # what the sequence's KV holds, in order
    cached_adapters: tuple[str, ...] = ()
    last_used: float = 0.0
    job: Job | None = None
    pending: collections.deque = field(default_factory=collections.deque)  # ("text", ids, final) / ("image", img)
    n_past: int = 0
    next_token: int | None = None  # sampled, decoded in the next batch
    batch_index: int | None = None
    reply: ReplyText | None = None
    tokens: list[int] = field(default_factory=list)
    started: float = 0.0
    first_token_at: float | None = None
    evaluated: int = 0  # prompt positions evaluated (not re-used)
    reused: int = 0

    @property
    def generating(self) -> bool:
        return self.job is not None and not self.pending

    def positions(self) -> int:
        return sum(u[2] if isinstance(u, tuple) else 1 for u in self.cached)


@dataclass
class Stats:
    """Counters since the batcher started (``/metrics``)."""

    requests_started: int = 0
    finished: dict[str, int] = field(default_factory=lambda: collections.Counter())
    failed: int = 0
    rejected: int = 0
    prompt_tokens: int = 0  # positions evaluated
    prompt_tokens_cached: int = 0  # positions re-used from a slot's cache
    prompt_seconds: float = 0.0
    tokens_predicted: int = 0
    decode_seconds: float = 0.0
    n_decode: int = 0
    n_images: int = 0
    batch_tokens: int = 0
    busy_slots_per_decode: float = 0.0  # sum over decodes of the slots in them


def _positions(units: Sequence[Unit]) -> int:
    return sum(u[2] if isinstance(u, tuple) else 1 for u in units)


def _common_prefix(cached: Sequence[Unit], units: Sequence[Unit]) -> int:
    common = 0
    for a, b in zip(cached, units, strict=False):
        if a != b:
            break
        common += 1
    return common


class Batcher:
    """N parallel slots over ``model``'s context, driven by one worker thread (module docstring)."""

    def __init__(self, model: ChatModel, *, n_slots: int | None = None, queue_size: int = 32,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK):
        engine = model.engine
        n_slots = engine.n_seq_max if n_slots is None else n_slots
        if not 1 <= n_slots <= engine.n_seq_max:
            raise UserError(f"the model was loaded with {engine.n_seq_max} sequences; it cannot serve {n_slots} "
                            "parallel slots (load it with n_parallel)")
        if queue_size < 0:
            raise UserError("the queue size must be >= 0")
        self.model = model
        self.engine = engine
        self.n_slots = n_slots
        self.queue_size = queue_size
        self.prefill_chunk = max(1, min(prefill_chunk, engine.n_batch))
        self.n_ctx = engine.n_ctx
        self.n_swa = engine.n_swa  # 0 with the full-size sliding-window cache
        self.stats = Stats()
        self._slots = [_Slot(i) for i in range(n_slots)]
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._context_adapters: tuple[str, ...] | None = None
        self._turn = 0
        self._special_pieces: dict[int, bytes] = {}
        self._recent_seconds: collections.deque[float] = collections.deque(maxlen=32)
        self._batch = llama_cpp.llama_batch_init(max(engine.n_batch, n_slots), 0, 1)
        model.serve_with(self)
        self._mem = llama_cpp.llama_get_memory(engine.llama_context)
        llama_cpp.llama_memory_clear(self._mem, True)
        self._thread = threading.Thread(target=self._run, name="medgemma-batcher", daemon=True)
        self._thread.start()

    # --- the HTTP side ---------------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue ``job``; ``QueueFull`` when every slot is busy and ``queue_size`` jobs already wait."""
        with self._cond:
            if self._closing:
                raise RuntimeError("the server is shutting down")
            self._drop_cancelled()
            free = sum(slot.job is None for slot in self._slots)
            if len(self._queue) >= self.queue_size + free:
                self.stats.rejected += 1
                raise QueueFull(self.retry_after())
            self._queue.append(job)
            self._cond.notify()

    def generate(self, prompt: Prompt, settings: SamplingSettings, sampler: Sampler, *, adapters: tuple[str, ...] = (),
                 ignore_eos: bool = False, should_stop: Callable[[], bool] | None = None
                 ) -> Generator[Delta, None, ChatResult]:
        """A reply run in a slot for a caller on another thread (``ChatModel.generate`` while serving): its
        text pieces, then the result. It waits in the queue regardless of the bound; closing the generator
        or ``should_stop`` returning True cancels it."""
        events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        job = Job(prompt, settings, sampler, lambda kind, value: events.put((kind, value)), adapters=tuple(adapters),
                  ignore_eos=ignore_eos)
        with self._cond:
            if self._closing:
                sampler.close()
                raise UserError("the server on this model is stopping; try again once it has stopped")
            self._queue.append(job)
            self._cond.notify()
        try:
            while True:
                try:
                    kind, value = events.get(timeout=0.05 if should_stop is not None else None)
                except queue.Empty:
                    if should_stop is not None and should_stop():
                        job.cancelled.set()
                    continue
                if kind == "token":
                    yield from value.deltas
                elif kind == "done":
                    if value is None:  # cancelled before it got a slot
                        return ChatResult("", prompt.n_positions, 0, {}, "cancelled")
                    return value
                elif kind == "error":
                    raise value
        finally:
            job.cancelled.set()

    def retry_after(self) -> int:
        """Seconds a refused client should wait: recent requests' mean duration × the queue per slot."""
        mean = sum(self._recent_seconds) / len(self._recent_seconds) if self._recent_seconds else 1.0
        waves = (len(self._queue) + self.n_slots) / self.n_slots
        return max(1, min(300, math.ceil(mean * waves)))

    def queue_depth(self) -> int:
        return len(self._queue)

    def busy_slots(self) -> int:
        return sum(slot.job is not None for slot in self._slots)

    def close(self) -> None:
        """Stop the worker (running and queued jobs end as cancelled) and give the context back to the model."""
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._cond.notify()
        self._thread.join()
        for job in self._queue:
            job.sampler.close()
            job.emit("error", RuntimeError("the server stopped"))
        self._queue.clear()
        llama_cpp.llama_batch_free(self._batch)
        self.model.serve_with(None)

    # --- the worker --------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closing and not self._queue and all(s.job is None for s in self._slots):
                    self._cond.wait()
                if self._closing:
                    break
                self._drop_cancelled()
                self._assign()
            try:
                self._step()
            except Exception as exc:  # noqa: BLE001 - the worker must survive; the jobs hear of it
                log.exception("batch step failed")
                for slot in self._slots:
                    if slot.job is not None:
                        self._fail(slot, exc)
        for slot in self._slots:
            if slot.job is not None:
                self._finish(slot, "cancelled")

    def _drop_cancelled(self) -> None:
        """Queued jobs whose client left, or whose time ran out, never take a slot (called with the lock)."""
        now = time.monotonic()
        kept: collections.deque[Job] = collections.deque()
        for job in self._queue:
            if job.cancelled.is_set():
                job.sampler.close()
                self.stats.finished["cancelled"] += 1
                job.emit("done", None)
            elif job.deadline is not None and now > job.deadline:
                job.sampler.close()
                self.stats.finished["timeout"] += 1
                job.emit("error", TimeoutError("the request waited in the queue past the server's time limit"))
            else:
                kept.append(job)
        self._queue = kept

    def _assign(self) -> None:
        """Give queued jobs free slots, the best cached prefix first (called with the lock)."""
        while self._queue:
            free = [slot for slot in self._slots if slot.job is None]
            if not free:
                return
            job = self._queue.popleft()
            slot = max(free, key=lambda s: (_common_prefix(s.cached, job.prompt.units)
                                            if s.cached_adapters == job.adapters else 0, -s.last_used))
            try:
                self._start(slot, job)
            except Exception as exc:  # noqa: BLE001
                self._fail(slot, exc)

    def _start(self, slot: _Slot, job: Job) -> None:
        slot.job = job
        slot.started = time.monotonic()
        slot.first_token_at = None
        slot.tokens = []
        slot.next_token = slot.batch_index = None
        slot.reply = ReplyText(self.engine.piece, stop=job.settings.stop, markers=self.model.reasoning_markers)
        self.stats.requests_started += 1
        units = job.prompt.units
        if not units or isinstance(units[-1], tuple):
            raise UserError("the prompt must end with text; the chat template produced none after the last image")
        common = _common_prefix(slot.cached, units) if slot.cached_adapters == job.adapters else 0
        common = min(common, len(units) - 1)  # the last token is evaluated again, for its logits
        reused = _positions(units[:common])
        if not self._trim(slot.seq_id, reused):
            common = reused = 0
        slot.cached = list(units[:common])
        slot.cached_adapters = job.adapters
        slot.n_past = reused
        slot.reused, slot.evaluated = reused, 0
        slot.pending.clear()
        position = 0
        for part in job.prompt.parts:
            size = 1 if isinstance(part, PromptImage) else len(part)
            if position + size > common:
                if isinstance(part, PromptImage):
                    slot.pending.append(("image", part))
                else:
                    slot.pending.append(("text", list(part[max(0, common - position):]), False))
            position += size
        kind, ids, _ = slot.pending.pop()  # the prompt ends with text (checked above)
        if len(ids) > 1:
            slot.pending.append(("text", ids[:-1], False))
        slot.pending.append(("text", ids[-1:], True))
        job.emit("started", None)

    def _trim(self, seq_id: int, keep: int) -> bool:
        """Keep positions [0, keep) of a sequence; False (sequence cleared) when llama.cpp cannot continue them
        exactly afterwards — a sliding-window cache that lost the window (``runtime.kv_reuse.keep_prefix``)."""
        return keep_prefix(self.engine.llama_context, seq_id, keep, self.n_swa)

    def _set_adapters(self, adapters: tuple[str, ...]) -> None:
        if adapters != self._context_adapters:
            self.engine.set_loras(self.model.adapter_set(adapters), clear_cache=False)
            self._context_adapters = adapters

    def _step(self) -> None:
        now = time.monotonic()
        active = [slot for slot in self._slots if slot.job is not None]
        for slot in active:
            job = slot.job
            assert job is not None
            if job.cancelled.is_set():
                self._finish(slot, "cancelled")
            elif job.deadline is not None and now > job.deadline:
                log.info("a request reached the server's time limit after %d tokens", len(slot.tokens))
                self._finish(slot, "length", timed_out=True)
        active = sorted((s for s in self._slots if s.job is not None), key=lambda s: s.started)
        if not active:
            return
        sets = list(dict.fromkeys(slot.job.adapters for slot in active))  # type: ignore[union-attr]
        adapters = sets[self._turn % len(sets)]
        self._turn += 1
        group = [slot for slot in active if slot.job.adapters == adapters]  # type: ignore[union-attr]
        self._set_adapters(adapters)
        # 3. one image, decoded alone
        for slot in group:
            if slot.pending and slot.pending[0][0] == "image":
                _, image = slot.pending.popleft()
                try:
                    slot.n_past, n_tokens = self.engine.eval_image_at(ImagePart(image.pixels), seq_id=slot.seq_id,
                                                                      n_past=slot.n_past)
                except Exception as exc:  # noqa: BLE001
                    self._fail(slot, exc)
                    continue
                slot.cached.append(("image", image.key, n_tokens))
                slot.evaluated += n_tokens
                self.stats.n_images += 1
                break
        # 4. the batch: each slot's tokens, then written in sequence-id order (below)
        entries: dict[int, list[tuple[int, int, bool]]] = {}  # seq_id -> (token, position, logits)
        by_seq: dict[int, _Slot] = {}  # the slots with tokens in this batch
        n = 0
        for slot in group:
            if slot.job is not None and slot.generating and slot.next_token is not None:
                entries[slot.seq_id] = [(slot.next_token, slot.n_past, True)]
                by_seq[slot.seq_id] = slot
                slot.cached.append(slot.next_token)
                slot.n_past += 1
                slot.next_token = None
                n += 1
        decoding = n > 0
        budget = self.engine.n_batch if not decoding else max(n + 1, min(self.engine.n_batch, n + self.prefill_chunk))
        for slot in group:  # prompts in arrival order: the oldest gets the budget first
            added = 0
            while slot.job is not None and slot.pending and slot.pending[0][0] == "text" and n < budget:
                _, ids, final = slot.pending[0]
                if final and added and not decoding:
                    break  # alone, the last prompt token gets a step of its own, as in ChatModel.chat
                take = ids[:budget - n]
                entries.setdefault(slot.seq_id, []).extend(
                    (token, slot.n_past + i, final) for i, token in enumerate(take))
                by_seq[slot.seq_id] = slot
                n += len(take)
                slot.cached.extend(take)
                slot.n_past += len(take)
                slot.evaluated += len(take)
                added += len(take)
                if len(take) == len(ids):
                    slot.pending.popleft()
                else:
                    slot.pending[0] = ("text", ids[len(take):], final)
        rows: list[tuple[_Slot, int]] = []
        i = 0
        for seq_id in sorted(entries):  # llama.cpp's per-sequence KV takes consecutive ids into one ubatch
            for token, pos, logits in entries[seq_id]:
                self._add(i, token, pos, seq_id, logits)
                if logits:
                    rows.append((by_seq[seq_id], i))
                i += 1
        if n == 0:
            return
        self._batch.n_tokens = n
        status = llama_cpp.llama_decode(self.engine.llama_context, self._batch)
        self.stats.n_decode += 1
        self.stats.batch_tokens += n
        in_batch = list(by_seq.values())
        self.stats.busy_slots_per_decode += len(in_batch)
        if status != 0:
            error = RuntimeError(f"llama_decode failed with status {status}")
            for slot in in_batch:
                self._fail(slot, error)
            return
        for slot, row in rows:
            if slot.job is not None:
                try:
                    self._sampled(slot, row)
                except Exception as exc:  # noqa: BLE001
                    self._fail(slot, exc)

    def _add(self, i: int, token: int, pos: int, seq_id: int, logits: bool) -> None:
        batch = self._batch
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq_id
        batch.logits[i] = logits

    def _sampled(self, slot: _Slot, row: int) -> None:
        job, reply = slot.job, slot.reply
        assert job is not None and reply is not None
        token = job.sampler.sample(row)
        now = time.monotonic()
        if slot.first_token_at is None:
            slot.first_token_at = now
        if token < 0:  # the grammar allows no further token
            log.warning("the reply's grammar allows no token after %d tokens; the reply ends here", len(slot.tokens))
            self._finish(slot, "length")
            return
        if not job.ignore_eos and self.engine.is_end_of_generation(token):
            self._finish(slot, "stop")
            return
        logprob = self._logprob(row, token, job.top_logprobs) if job.top_logprobs is not None else None
        slot.tokens.append(token)
        job.emit("token", TokenEvent(token, tuple(reply.push(token)), logprob))
        if reply.stopped:
            self._finish(slot, "stop")
        elif len(slot.tokens) >= job.settings.max_tokens or slot.n_past + 1 > self.n_ctx:
            self._finish(slot, "length")
        else:
            slot.next_token = token

    def _piece(self, token: int) -> bytes:
        piece = self._special_pieces.get(token)
        if piece is None:
            piece = self._special_pieces[token] = self.engine.token_piece(token, special=True)
        return piece

    def _logprob(self, row: int, token: int, top: int) -> TokenLogprob:
        pointer = llama_cpp.llama_get_logits_ith(self.engine.llama_context, row)
        logits = np.ctypeslib.as_array(pointer, shape=(self.engine.n_vocab,))
        peak = float(logits.max())
        log_total = peak + math.log(float(np.exp(logits - peak, dtype=np.float32).sum(dtype=np.float64)))
        best: tuple[tuple[int, bytes, float], ...] = ()
        if top:
            ids = np.argpartition(-logits, top)[:top] if top < len(logits) else np.arange(len(logits))
            ids = ids[np.argsort(-logits[ids], kind="stable")]
            best = tuple((int(i), self._piece(int(i)), float(logits[i]) - log_total) for i in ids)
        return TokenLogprob(token, self._piece(token), float(logits[token]) - log_total, best)

    def _finish(self, slot: _Slot, finish: str, *, timed_out: bool = False) -> None:
        job, reply = slot.job, slot.reply
        assert job is not None and reply is not None
        now = time.monotonic()
        tail = tuple(reply.finish())
        if tail:
            job.emit("token", TokenEvent(-1, tail, None))
        first = slot.first_token_at or now
        prompt_seconds, decode_seconds = first - slot.started, now - first
        n_tokens = len(slot.tokens)
        timings = {"prompt_ms": prompt_seconds * 1e3, "prompt_positions_evaluated": slot.evaluated,
                   "prompt_positions_reused": slot.reused,
                   "time_to_first_token_ms": (first - job.submitted) * 1e3,
                   "queue_ms": (slot.started - job.submitted) * 1e3,
                   "decode_ms": decode_seconds * 1e3,
                   "decode_tokens_per_s": (n_tokens - 1) / decode_seconds if n_tokens > 1 and decode_seconds else 0.0,
                   "total_ms": (now - job.submitted) * 1e3}
        if timed_out:
            timings["timed_out"] = True
        result = ChatResult(reply.text, job.prompt.n_positions, n_tokens, timings, finish, list(slot.tokens),
                            reply.reasoning, reply.reasoning_tokens)
        stats = self.stats
        stats.finished["timeout" if timed_out else finish] += 1
        stats.prompt_tokens += slot.evaluated
        stats.prompt_tokens_cached += slot.reused
        stats.prompt_seconds += prompt_seconds
        stats.tokens_predicted += n_tokens
        stats.decode_seconds += decode_seconds
        self._recent_seconds.append(now - slot.started)
        self._release(slot)
        job.emit("done", result)

    def _fail(self, slot: _Slot, exc: BaseException) -> None:
        job = slot.job
        log.debug("slot %d: the request failed: %r", slot.seq_id, exc)  # its caller reports it (one log line)
        self.stats.failed += 1
        llama_cpp.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
        slot.cached = []
        self._release(slot)
        if job is not None:
            job.emit("error", exc)

    def _release(self, slot: _Slot) -> None:
        if slot.job is not None:
            slot.job.sampler.close()
        slot.job = None
        slot.reply = None
        slot.pending.clear()
        slot.next_token = slot.batch_index = None
        slot.last_used = time.monotonic()
        # the cache holds the prompt and the decoded reply tokens (the last sampled one was never decoded)
        del slot.cached[_cached_units_for(slot.cached, slot.n_past):]


def _cached_units_for(units: list[Unit], n_past: int) -> int:
    """How many of ``units`` fill ``n_past`` positions (all of them, unless evaluation stopped early)."""
    total = 0
    for i, unit in enumerate(units):
        total += unit[2] if isinstance(unit, tuple) else 1
        if total > n_past:
            return i
    return len(units)


