"""Re-using a sequence's cached prefix with llama.cpp's small sliding-window (SWA) cache, per sequence id.

With ``swa_full=False`` (this runtime's default, ``runtime.context_settings``) Gemma 3's sliding-window
layers keep ``pad(min(n_ctx, n_swa + n_ubatch), 256)`` cells per sequence, re-used as a ring: once a
conversation is longer than that, its oldest positions are gone from those layers (the full-attention
layers keep everything). A token at position ``p`` attends, in a sliding layer, to positions ``p - n_swa + 1
.. p`` (``llama_hparams::is_masked_swa``). So a cached prefix of ``keep`` positions can be continued exactly
only while the cache still holds positions ``keep - n_swa + 1 .. keep - 1`` of it.

``keep_prefix`` is the one check, for any sequence of a context (the chat's sequence 0, a server slot's
``seq_id``): it removes the positions from ``keep`` on and keeps the rest only when the window behind
``keep`` survived — ``llama_memory_seq_pos_min`` at most ``keep - n_swa + 1`` (llama-server's own test,
``server-context.cpp``, is two positions stricter because it may re-evaluate one more token). It does not
trust ``llama_memory_seq_rm``'s answer alone: that answers True even when the SWA cells it needs were
overwritten (measured; see notes/quant-kv-rpc.md §3), and llama-cpp-python's ``Llama`` re-uses such a
prefix silently. Otherwise the sequence is cleared and the caller evaluates the prompt from position 0,
which places every cell as a fresh context does: the reply is token-for-token the one a fresh context gives.

What this means for a conversation: appending a turn never re-evaluates it (the cache ends where the new
prompt continues), and a prompt that trims the cached one by up to about ``n_ubatch`` positions — the
reply re-rendered by the chat template, a short reply regenerated — still continues from the cache. A
prompt that branches off further back (a long reply, such as MedGemma's reasoning block, that the next
prompt does not repeat; an edited earlier turn) is evaluated again from the start; ``--swa-full`` keeps
every position instead, at the memory cost in BENCHMARKS.md.

Why not llama-server's context checkpoints (copies of one sequence's SWA cells, ``llama_state_seq_get_data_ext``
with ``LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY``, restored when a prompt branches off inside a lost window):

* exactness: a restored checkpoint brings back the window's values but not the cells they sat in, and the
  order of the cells is the order in which attention sums them. The reply then differs from a fresh
  context's in the logits (3.5e-3 measured in the research notes; 1e-3 to 5e-3 on the fixture for other
  evaluation orders), so a greedy or seeded reply can change at a near tie. Re-evaluating from a cleared
  sequence gives exactly the fresh context's reply, which is what this runtime promises.
* memory: one checkpoint is the window of every sliding layer — about 116 KiB per position, up to 170 MiB
  for MedGemma 4B — and llama-server keeps up to 32 per slot. That gives back much of what the small
  cache saves, on exactly the small machines it is for.
* the case they serve is narrow here: appending turns, the common case, needs none.
"""

from __future__ import annotations

import llama_cpp


def keep_prefix(context: object, seq_id: int, keep: int, n_swa: int) -> bool:
    """Keep the first ``keep`` cached positions of sequence ``seq_id`` and drop the rest, when that prefix can
    be continued exactly (module docstring); otherwise clear the sequence and return False.

    ``context``: a ``llama_context`` pointer; ``n_swa``: the model's window (``llama_model_n_swa``), 0 when
    the cache holds every position (``swa_full``) or the model has no sliding layers. ``keep`` 0 clears.
    """
    memory = llama_cpp.llama_get_memory(context)
    if keep > 0 and llama_cpp.llama_memory_seq_rm(memory, seq_id, keep, -1):
        pos_min = llama_cpp.llama_memory_seq_pos_min(memory, seq_id)
        pos_max = llama_cpp.llama_memory_seq_pos_max(memory, seq_id)
        window_start = max(0, keep - n_swa + 1) if n_swa > 0 else 0
        if pos_max == keep - 1 and 0 <= pos_min <= window_start:
            return True
    llama_cpp.llama_memory_seq_rm(memory, seq_id, -1, -1)
    return False
