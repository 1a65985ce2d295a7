"""The reference side of the quant evaluation: what the unquantized model predicts, computed once and cached.

The reference is the Hugging Face checkpoint run in transformers (bf16 by default, the true reference;
``f32`` on request; never f16, where Gemma 3's activations overflow), or a BF16/F32 GGUF run in llama.cpp.

An evaluation is split into *parts*: the held-out prose (perplexity) and each task slice. For every part
the reference builds the exact token sequences (prompts rendered from the model's chat template; image
prompts laid out as the HF processor lays them out: ``\\n\\n<start_of_image>`` + N image positions +
``<end_of_image>\\n\\n``) and stores, per scored text position, the reference's distribution by mass — the
smallest set of most likely tokens covering 1 - ε with the exact log-sum-exp of the whole row and the tail
mass (:class:`quant_eval.metrics.CoveredLogProbs`; every logit with ``full_vocab``) — the log-probability of
the actual next token, and per task item the log-likelihood of each option. Candidates replay the stored
token ids, so every model is scored on the same positions. :func:`llama_perplexity_chunks` lays a token
stream out as ``llama-perplexity`` does (chunks of ``n_ctx``, BOS first, the second half scored).

Multiple-choice items are asked with lettered options ("A. …", "B. …") and scored by the log-likelihood
of each option's letter as the first answer token (one forward pass per item), never by parsing text.

Images are resized (bicubic) to the vision tower's native square size before either model sees them, so
the reference and the candidates get identical pixels and only the model differs.

Cache: ``<cache_dir>/<reference sha256[:16]>/<part>-<key[:16]>.npz``, where the key hashes the reference
hash, the slice hash, the coverage (ε, set size floor and cap), the dtype, the prompt format and the cache
format. Files of an older cache format (1: top-K log-probabilities, which bound the KL only loosely; 2: sets
capped at 65,536 tokens, whose bracket a flat tail left wide — format 3 stores such positions whole) are
refused: ``ReferencePart.load`` raises :class:`StaleCacheError`, and the cache recomputes the part and
removes the old file, saying so. A file's sha256 is itself cached by
path + size + mtime in ``<cache_dir>/file-hashes.json``, so GB-sized weights are hashed once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from medgemma_gguf.atomic import atomic_output
from medgemma_gguf.cache import cache_root
from medgemma_gguf.errors import UserError, setting
from medgemma_gguf.gguf_info import read_gguf_info
from medgemma_gguf.hashing import cached_file_sha256, folder_sha256
from medgemma_gguf.hub import resolve_source
from medgemma_gguf.manifest import MMPROJ_PRECISION_ORDER, Manifest
from medgemma_gguf.quant_eval.items import Item
from medgemma_gguf.quant_eval.metrics import (
    DEFAULT_COVERAGE,
    MAX_STORED_TOKENS,
    MIN_STORED_TOKENS,
    CoveredLogProbs,
    cover_from_logits,
    log_softmax,
)
from medgemma_gguf.quant_eval.slices import Slice, TextChunk, slice_hash
from medgemma_gguf.runtime.prompt import IMAGE_START, render_template, split_at_images
from medgemma_gguf.sizes import format_size

log = logging.getLogger(__name__)

PROMPT_FORMAT_VERSION = "v1"  # bump when the prompt layout below changes: it invalidates every cache
CACHE_FORMAT_VERSION = 3  # 1: top-K (refused); 2: coverage by mass, capped sets (refused); 3: + rows stored whole
MAX_SEQUENCE_TOKENS = 512
REFERENCE_DTYPES = ("bf16", "f32")
HELDOUT_PART = "heldout"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
TEXT_SYSTEM_PROMPT = "You are a helpful medical assistant."
IMAGE_SYSTEM_PROMPT = "You are an expert radiologist."
ANSWER_INSTRUCTION = "Answer with the letter of the correct option."


class StaleCacheError(UserError):
    """A reference cache file in an older format that cannot give what this version computes."""


# The default ε per model family, (architecture, vocabulary) -> ε. A covered position keeps tokens until
# P_T · max(1, ln(m / p_min)) <= ε (metrics.cover_from_logits), so its bracket — at most
# P_T (ln m - ln min_T q + ln(Q_T / P_T)) wide (metrics.kl_divergence_covered) — is about ε nats or less unless the
# candidate's tail is far more extreme than the reference's; a position whose set would pass the cap or half the
# vocabulary is stored whole and is exact. Gemma 3 (MedGemma 4B, 27B, 1.5 4B; 262,208 tokens): ε = 1e-6 keeps the
# bracket under 0.1 % of a Q4-class KL (1e-3 nats and up) and about 1 % of a Q8_0-class one (~1e-4), so quants whose
# KL differs by 5 % rank. Other models: DEFAULT_COVERAGE. The report says when two quants' brackets overlap.
# Measured bracket widths, positions stored whole and bytes per ε: BENCHMARKS.md (bench/bench_eval_vs_llama.py).
MODEL_COVERAGE: dict[tuple[str, int], float] = {("gemma3", 262208): 1e-6}


def model_coverage(signature: ModelSignature | None) -> float:
    """The default ε for the reference ``signature`` (:data:`MODEL_COVERAGE`, else :data:`DEFAULT_COVERAGE`)."""
    if signature is None:
        return DEFAULT_COVERAGE
    return MODEL_COVERAGE.get((signature.architecture, signature.n_vocab), DEFAULT_COVERAGE)


@dataclass(frozen=True)
class CoverageSpec:
    """How much of the reference's distribution the cache keeps per position.

    ``epsilon``: keep the most likely tokens until the rest holds at most this probability (``0``: every
    token, llama.cpp's full-vocabulary method); at least ``min_tokens`` and at most ``max_tokens`` of them.
    """

    epsilon: float = DEFAULT_COVERAGE
    min_tokens: int = MIN_STORED_TOKENS
    max_tokens: int = MAX_STORED_TOKENS

    @classmethod
    def make(cls, coverage: float | None = None, full_vocab: bool = False,
             model: ModelSignature | None = None) -> CoverageSpec:
        """The spec for ``coverage`` (ε; default: the one chosen for ``model``, :func:`model_coverage`) or
        ``full_vocab``; a clear error for a bad value."""
        if full_vocab:
            if coverage is not None and coverage != 0:
                raise UserError(f"{setting('full_vocab')} keeps every token; drop {setting('coverage')}")
            return cls(epsilon=0.0)
        if coverage is None:
            return cls(epsilon=model_coverage(model))
        if isinstance(coverage, bool) or not isinstance(coverage, int | float) or not 0 < coverage < 0.5:
            raise UserError(f"{setting('coverage')} must be a probability in (0, 0.5) such as 1e-4 (the reference "
                            f"mass left out per position), got {coverage!r}; for every token use "
                            f"{setting('full_vocab')}")
        return cls(epsilon=float(coverage))

    @property
    def full_vocab(self) -> bool:
        return self.epsilon == 0.0

    def key(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon, "min_tokens": self.min_tokens, "max_tokens": self.max_tokens}


@dataclass
class ReferencePart:
    """The reference outputs of one part (held-out text or one slice), as stored in the cache.

    Sequences: ``seq_offsets[s]:seq_offsets[s+1]`` of ``seq_tokens`` are sequence s's token ids;
    ``image_start/end[s]`` its image positions (-1: none); ``seq_item[s]`` its item index (-1: prose).
    Positions (every scored text position of every sequence, in order): ``pos_seq``, ``pos_token`` (index in
    the sequence), ``after_image`` (text after an image), ``next_token`` (-1 where the next position is not a
    text token), ``next_logprob`` (the reference's ln p of it, NaN where none), ``dist`` (the reference's
    distribution there, by coverage). Items: ``option_tokens`` / ``option_logprobs`` ([items, max options],
    -1 / NaN padded), ``answer_index``.
    """

    name: str
    kind: str  # "text" | "task"
    key: str
    seq_tokens: NDArray[np.int32]
    seq_offsets: NDArray[np.int64]
    image_start: NDArray[np.int32]
    image_end: NDArray[np.int32]
    seq_item: NDArray[np.int32]
    pos_seq: NDArray[np.int32]
    pos_token: NDArray[np.int32]
    after_image: NDArray[np.bool_]
    next_token: NDArray[np.int32]
    next_logprob: NDArray[np.float64]
    dist: CoveredLogProbs
    item_ids: NDArray[np.str_]
    answer_index: NDArray[np.int32]
    option_tokens: NDArray[np.int32]
    option_logprobs: NDArray[np.float64]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_sequences(self) -> int:
        return int(self.seq_offsets.size - 1)

    def sequence(self, index: int) -> NDArray[np.int32]:
        return self.seq_tokens[self.seq_offsets[index] : self.seq_offsets[index + 1]]

    def positions_of(self, index: int) -> NDArray[np.int64]:
        """Indices into the position arrays that belong to sequence ``index`` (in token order)."""
        return np.flatnonzero(self.pos_seq == index)

    @property
    def closed(self) -> NDArray[np.bool_]:
        """Which items are closed questions (free-text items have no options and answer_index -1)."""
        return self.answer_index >= 0

    def reference_correct(self) -> NDArray[np.bool_]:
        """Whether the reference's highest-scoring option is the right one, per closed item."""
        closed = self.closed
        if self.option_logprobs.shape[1] == 0:
            return np.zeros(0, dtype=bool)
        return option_choices(self.option_logprobs[closed]) == self.answer_index[closed]

    @property
    def file_bytes(self) -> int | None:
        """Size of the cache file this part was read from or written to (None when not cached)."""
        value = self.meta.get("file_bytes")
        return int(value) if value is not None else None

    def save(self, path: Path) -> None:
        """Write the part atomically as an ``.npz``."""
        arrays = {name: getattr(self, name) for name in _ARRAY_FIELDS}
        arrays.update(cov_offsets=self.dist.offsets, cov_logits=self.dist.logits, cov_lse=self.dist.lse,
                      cov_tail=self.dist.tail_mass, cov_dense=self.dist.dense_rows)
        if self.dist.ids is not None:
            arrays["cov_ids"] = self.dist.ids
        meta = {**{k: v for k, v in self.meta.items() if k != "file_bytes"}, "name": self.name, "kind": self.kind,
                "key": self.key, "cache_format": CACHE_FORMAT_VERSION, "vocab_size": self.dist.vocab_size,
                "epsilon": self.dist.epsilon}
        arrays["meta_json"] = np.array(json.dumps(meta, sort_keys=True))
        with atomic_output(Path(path), force=True) as tmp, open(tmp, "wb") as handle:
            _write_npz(handle, arrays, stored=("cov_logits",))
        self.meta["file_bytes"] = Path(path).stat().st_size

    @classmethod
    def load(cls, path: Path) -> ReferencePart:
        """Read a part written by :meth:`save` (ValueError / OSError / KeyError if damaged; StaleCacheError for
        an older format)."""
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta_json"]))
            version = meta.get("cache_format")
            if version != CACHE_FORMAT_VERSION:
                raise StaleCacheError(
                    f"the reference cache {path} is in cache format {version} ({_OLD_FORMATS.get(version, 'unknown')}"
                    f"); this version reads format {CACHE_FORMAT_VERSION}: delete the file, or run medgemma-gguf "
                    f"eval again to recompute it")
            dist = CoveredLogProbs(offsets=data["cov_offsets"], ids=data.get("cov_ids"),
                                   logits=data["cov_logits"], lse=data["cov_lse"], tail_mass=data["cov_tail"],
                                   vocab_size=int(meta["vocab_size"]), epsilon=float(meta["epsilon"]),
                                   dense_rows=data["cov_dense"])
            arrays = {name: data[name] for name in _ARRAY_FIELDS}
        meta["file_bytes"] = Path(path).stat().st_size
        return cls(name=meta["name"], kind=meta["kind"], key=meta["key"], dist=dist, meta=meta, **arrays)


# What the refused formats kept, for the message that refuses them.
_OLD_FORMATS = {1: "format 1 kept the top-K log-probabilities, which bound the KL only loosely",
                2: "format 2 capped each position's set at 65,536 tokens, so a flat tail left the KL bracket wide; "
                   "format 3 stores such positions whole"}


def _write_npz(handle: Any, arrays: dict[str, Any], stored: Sequence[str] = ()) -> None:
    """An ``.npz`` (what ``np.load`` reads) with ``stored`` entries written plainly and the others deflated.

    The float32 logits barely compress (their low mantissa bits are noise) and are the bulk of the file — a
    row stored whole is 1 MiB at Gemma 3's vocabulary — so deflating them costs CPU for a few per cent; the
    token ids (ascending within a row) and the small arrays compress well.
    """
    with zipfile.ZipFile(handle, "w", allowZip64=True) as archive:
        for name, value in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED if name in stored else zipfile.ZIP_DEFLATED
            with archive.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)


_ARRAY_FIELDS = ("seq_tokens", "seq_offsets", "image_start", "image_end", "seq_item", "pos_seq", "pos_token",
                 "after_image", "next_token", "next_logprob", "item_ids", "answer_index", "option_tokens",
                 "option_logprobs")


def option_choices(option_logprobs: NDArray[np.float64]) -> NDArray[np.int64]:
    """The chosen option per item: argmax of the option log-likelihoods (NaN padding never wins)."""
    filled = np.where(np.isnan(option_logprobs), -np.inf, option_logprobs)
    return np.argmax(filled, axis=1)


# ----------------------------------------------------------------------------------------------------
# prompts


@dataclass
class PromptSequence:
    """Token ids of one sequence; ``image_span`` = (start, end) of its image positions, if any; ``scored`` =
    [start, end) of the token positions whose predictions are scored (None: every text position)."""

    tokens: list[int]
    image_span: tuple[int, int] | None = None
    item_index: int = -1
    option_tokens: list[int] = field(default_factory=list)
    scored: tuple[int, int] | None = None

    def scored_positions(self) -> NDArray[np.int64]:
        """The text positions that are scored, in order."""
        positions = text_positions(len(self.tokens), self.image_span)
        if self.scored is None:
            return positions
        return positions[(positions >= self.scored[0]) & (positions < self.scored[1])]


def llama_perplexity_chunks(tokens: Sequence[int], n_ctx: int, bos_token: int | None) -> list[PromptSequence]:
    """A token stream laid out as ``llama-perplexity`` lays it out, to score the same positions.

    ``n_chunk = len(tokens) // n_ctx`` non-overlapping chunks of ``n_ctx`` tokens; the first token of each is
    replaced by BOS (when the model adds one); scored: positions ``n_ctx/2 … n_ctx-2``, each predicting the
    next token of the chunk (``perplexity.cpp``: ``first = n_ctx/2``, ``n_ctx - 1 - first`` tokens a chunk).
    """
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or not 4 <= n_ctx <= MAX_SEQUENCE_TOKENS:
        raise UserError(f"the chunk size must be an integer in [4, {MAX_SEQUENCE_TOKENS}], got {n_ctx!r}")
    n_chunk = len(tokens) // n_ctx
    if n_chunk < 1:
        raise UserError(f"the text has {len(tokens)} tokens, fewer than one chunk of {n_ctx}; give a longer text")
    chunks = []
    for c in range(n_chunk):
        chunk = [int(t) for t in tokens[c * n_ctx : (c + 1) * n_ctx]]
        if bos_token is not None:
            chunk[0] = int(bos_token)
        chunks.append(PromptSequence(tokens=chunk, scored=(n_ctx // 2, n_ctx - 1)))
    return chunks


def item_user_text(item: Item) -> str:
    """The user turn of a multiple-choice item: question, lettered options, instruction; of a free-text item:
    the question as written."""
    if item.free_text:
        return item.question.strip()
    if len(item.options) > len(LETTERS):
        raise UserError(f"item {item.id!r} has {len(item.options)} options; at most {len(LETTERS)} are supported")
    options = "\n".join(f"{LETTERS[i]}. {option}" for i, option in enumerate(item.options))
    return f"{item.question.strip()}\n\nOptions:\n{options}\n\n{ANSWER_INSTRUCTION}"


def item_messages(item: Item, image: Any = None) -> list[dict[str, Any]]:
    """Chat messages for an item (image first, as in Google's MedGemma examples)."""
    system = IMAGE_SYSTEM_PROMPT if item.image is not None else TEXT_SYSTEM_PROMPT
    content: list[dict[str, Any]] = []
    if item.image is not None:
        content.append({"type": "image", "image": image} if image is not None else {"type": "image"})
    content.append({"type": "text", "text": item_user_text(item)})
    return [{"role": "system", "content": [{"type": "text", "text": system}]}, {"role": "user", "content": content}]


def native_pixels(item: Item, size: int) -> NDArray[np.uint8]:
    """The item's image as RGB uint8 [size, size, 3], resized (bicubic) to the vision tower's native size."""
    from PIL import Image

    if item.image is None:
        raise ValueError(f"item {item.id} has no image")
    image = item.image.load().convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8).copy()


def _first_tokens(tokenize, item: Item) -> list[int]:
    """The first token of each option letter (none for a free-text item)."""
    ids = []
    for letter in LETTERS[: len(item.options)]:
        pieces = tokenize(letter)
        if not pieces:
            raise UserError(f"the tokenizer turns the option letter {letter!r} into no tokens; cannot score choices")
        ids.append(pieces[0])
    if len(set(ids)) != len(ids):
        raise UserError("the tokenizer gives two option letters the same first token; cannot score choices")
    return ids


def _item_sequence(item: Item, index: int, prompt: list[int], image_span: tuple[int, int] | None,
                   option_tokens: list[int], tokenize: Callable[[str], list[int]]) -> PromptSequence:
    """An item's sequence: its prompt, then its reference answer (teacher-forced) when it has one."""
    tokens = prompt + tokenize(item.reference_answer) if item.reference_answer else prompt
    _check_length(tokens, f"item {item.id}")
    return PromptSequence(tokens=tokens, image_span=image_span, item_index=index, option_tokens=option_tokens)


def _check_length(tokens: Sequence[int], where: str) -> None:
    if len(tokens) > MAX_SEQUENCE_TOKENS:
        raise UserError(f"{where} takes {len(tokens)} tokens, over the {MAX_SEQUENCE_TOKENS} evaluated per "
                        "sequence; shorten the question")


# ----------------------------------------------------------------------------------------------------
# reference runners


@dataclass(frozen=True)
class ModelSignature:
    """What must agree between the reference and a candidate for them to be the same model."""

    architecture: str
    n_vocab: int
    n_embd: int
    n_layer: int

    def differences(self, other: ModelSignature) -> list[str]:
        return [f"{name} {getattr(other, name)} vs reference {getattr(self, name)}"
                for name in ("architecture", "n_vocab", "n_embd", "n_layer")
                if getattr(self, name) != getattr(other, name)]


def gguf_signature(info) -> ModelSignature:
    """The :class:`ModelSignature` of a text GGUF from its header (``runtime.gguf_info.GgufInfo``)."""
    arch = info.architecture
    embd = info.tensor("token_embd.weight")
    if not arch or embd is None or len(embd.shape) != 2:
        raise UserError(f"{info.path} has no token embedding or architecture; pass a text model GGUF, not an mmproj")
    layers = info.metadata.get(f"{arch}.block_count")
    return ModelSignature(architecture=arch, n_vocab=int(embd.shape[1]), n_embd=int(embd.shape[0]),
                          n_layer=int(layers) if layers is not None else -1)


class Reference:
    """Base of the two reference runners. Subclasses build sequences and compute logits."""

    kind = ""
    dtype = ""

    def __init__(self, source: str, cache_dir: Path):
        self.source = source
        self.cache_dir = Path(cache_dir)
        self._hash: str | None = None

    # identity ------------------------------------------------------------------------------------
    @property
    def content_hash(self) -> str:
        if self._hash is None:
            self._hash = self._compute_hash()
        return self._hash

    def _compute_hash(self) -> str:
        raise NotImplementedError

    @property
    def signature(self) -> ModelSignature:
        raise NotImplementedError

    @property
    def has_vision(self) -> bool:
        raise NotImplementedError

    @property
    def image_size(self) -> int:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        sig = self.signature
        return {"kind": self.kind, "source": self.source, "dtype": self.dtype, "sha256": self.content_hash,
                "architecture": sig.architecture, "n_vocab": sig.n_vocab, "n_embd": sig.n_embd,
                "n_layer": sig.n_layer, "vision": self.has_vision}

    # computation ----------------------------------------------------------------------------------
    def text_sequence(self, chunk: TextChunk) -> PromptSequence:
        raise NotImplementedError

    def item_sequence(self, item: Item, index: int) -> PromptSequence:
        raise NotImplementedError

    def sequence_logits(self, sequence: PromptSequence, pixels: NDArray[np.uint8] | None,
                        rows: NDArray[np.bool_] | None = None) -> NDArray[np.float32]:
        """Logits [n_text_positions, vocab] for the sequence's text positions (image positions left out); with
        ``rows`` (one flag per text position) only the flagged positions' rows, in order."""
        raise NotImplementedError

    def close(self) -> None:
        """Free the loaded model."""

    def compute_part(self, name: str, kind: str, key: str, chunks: Sequence[TextChunk] = (),
                     items: Sequence[Item] = (), coverage: CoverageSpec | None = None,
                     sequences: Sequence[PromptSequence] = (), progress: bool = False) -> ReferencePart:
        """Run the reference over a part's sequences (``sequences`` as given, then ``chunks``' and ``items'``)
        and collect what the cache stores."""
        from tqdm import tqdm

        coverage = coverage or CoverageSpec()
        sequences = [*sequences, *(self.text_sequence(c) for c in chunks),
                     *(self.item_sequence(it, i) for i, it in enumerate(items))]
        if coverage.full_vocab:
            n_scored = sum(seq.scored_positions().size for seq in sequences)

            log.warning("--full-vocab keeps every logit: %d positions x %d tokens x 4 bytes = %s of reference cache "
                        "for %s", n_scored, self.signature.n_vocab, format_size(n_scored * self.signature.n_vocab * 4),
                        name)
        parts: dict[str, list[Any]] = {k: [] for k in ("pos_seq", "pos_token", "after", "next_tok", "next_lp", "dist")}
        max_options = max((len(it.options) for it in items), default=0)
        option_tokens = np.full((len(items), max_options), -1, dtype=np.int32)
        option_lps = np.full((len(items), max_options), np.nan)
        for s, seq in enumerate(tqdm(sequences, desc=f"reference {name}", disable=not progress, leave=False)):
            item = items[seq.item_index] if seq.item_index >= 0 else None
            pixels = native_pixels(item, self.image_size) if item is not None and item.image is not None else None
            all_positions = text_positions(len(seq.tokens), seq.image_span)
            positions = seq.scored_positions()
            # logits only where they are used (as llama-perplexity asks only for the positions it scores): the
            # scored positions, and an item's last position (its options' log-likelihoods)
            wanted = np.isin(all_positions, positions)
            if item is not None:
                wanted[-1] = True
            logits = self.sequence_logits(seq, pixels, wanted)
            if logits.shape[0] != int(wanted.sum()):
                raise RuntimeError(f"reference returned {logits.shape[0]} rows for {int(wanted.sum())} text positions")
            if item is not None:
                last = log_softmax(logits[-1].astype(np.float64))
                option_tokens[seq.item_index, : len(seq.option_tokens)] = seq.option_tokens
                option_lps[seq.item_index, : len(seq.option_tokens)] = last[seq.option_tokens]
            logits = rows_at(logits, all_positions[wanted], positions)
            nxt = next_tokens(seq.tokens, positions, seq.image_span)
            next_lp = np.full(positions.size, np.nan)
            has_next = nxt >= 0
            parts["pos_seq"].append(np.full(positions.size, s, dtype=np.int32))
            parts["pos_token"].append(positions.astype(np.int32))
            parts["after"].append(positions >= seq.image_span[1] if seq.image_span else np.zeros(positions.size, bool))
            parts["next_tok"].append(nxt.astype(np.int32))
            parts["next_lp"].append(next_lp)
            if positions.size:
                covered = cover_from_logits(logits, coverage.epsilon, min_tokens=coverage.min_tokens,
                                            max_tokens=coverage.max_tokens)
                parts["dist"].append(covered)
                # ln p of the next token from the cover's exact normaliser (the same float64 steps as
                # token_logprobs, without a second log-softmax of every row)
                at = np.flatnonzero(has_next)
                next_lp[at] = logits[at, nxt[at]].astype(np.float64) - covered.lse[at]
        if not parts["dist"]:
            raise UserError(f"the part {name} has no scored position; give it longer sequences")
        lengths = [len(seq.tokens) for seq in sequences]
        dist = CoveredLogProbs.concatenate(parts["dist"])
        return ReferencePart(
            name=name, kind=kind, key=key,
            seq_tokens=np.concatenate([np.asarray(seq.tokens, dtype=np.int32) for seq in sequences]),
            seq_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            image_start=np.array([seq.image_span[0] if seq.image_span else -1 for seq in sequences], dtype=np.int32),
            image_end=np.array([seq.image_span[1] if seq.image_span else -1 for seq in sequences], dtype=np.int32),
            seq_item=np.array([seq.item_index for seq in sequences], dtype=np.int32),
            pos_seq=np.concatenate(parts["pos_seq"]), pos_token=np.concatenate(parts["pos_token"]),
            after_image=np.concatenate(parts["after"]), next_token=np.concatenate(parts["next_tok"]),
            next_logprob=np.concatenate(parts["next_lp"]), dist=dist,
            item_ids=np.array([it.id for it in items], dtype=np.str_),
            answer_index=np.array([it.answer_index for it in items], dtype=np.int32),
            option_tokens=option_tokens, option_logprobs=option_lps,
            meta={"reference": self.describe(), "coverage": coverage.key(),
                  "image_size": self.image_size if self.has_vision else 0},
        )


def rows_at(logits: NDArray[np.float32], have: NDArray[np.integer], positions: NDArray[np.integer]) -> NDArray:
    """The rows of ``logits`` (one per position in ``have``, ascending) at ``positions`` — a view when they are
    the first rows in order (no copy of 1 MiB rows)."""
    index = np.searchsorted(have, positions)
    if index.size and np.array_equal(index, np.arange(index.size)):
        return logits[: index.size]
    return logits[index]


def text_positions(length: int, image_span: tuple[int, int] | None) -> NDArray[np.int64]:
    """Token indices of a sequence that get logits: every position outside the image block."""
    positions = np.arange(length)
    if image_span is None:
        return positions
    return positions[(positions < image_span[0]) | (positions >= image_span[1])]


def next_tokens(tokens: Sequence[int], positions: NDArray[np.int64],
                image_span: tuple[int, int] | None) -> NDArray[np.int64]:
    """The next text token after each position (-1 at the end and where an image position follows)."""
    following = positions + 1
    out = np.full(positions.size, -1, dtype=np.int64)
    valid = following < len(tokens)
    if image_span is not None:
        valid &= (following < image_span[0]) | (following >= image_span[1])
    out[valid] = np.asarray(tokens, dtype=np.int64)[following[valid]]
    return out


class HFReference(Reference):
    """A Hugging Face checkpoint (Hub id or folder) run in transformers at bf16 or f32."""

    kind = "hf"

    def __init__(self, source: str, cache_dir: Path, dtype: str = "bf16", token: str | None = None):
        super().__init__(source, cache_dir)

        if dtype not in REFERENCE_DTYPES:
            raise UserError(f"reference dtype {dtype!r} is not supported; use bf16 or f32 (f16 overflows in Gemma 3)")
        self.dtype = dtype
        self.folder = resolve_source(source, token=token).folder
        config_path = self.folder / "config.json"
        if not config_path.is_file():
            raise UserError(f"{self.folder} has no config.json; pass a Hugging Face checkpoint folder or repo id")
        self.config = json.loads(config_path.read_text(encoding="utf-8"))
        self.text_config = self.config.get("text_config", self.config)
        self._model: Any = None
        self._processor: Any = None
        self._tokenizer: Any = None

    def _compute_hash(self) -> str:
        return folder_sha256(self.folder, self.cache_dir)

    @property
    def signature(self) -> ModelSignature:
        model_type = str(self.config.get("model_type", ""))
        arch = "gemma3" if model_type.startswith("gemma3") else model_type
        return ModelSignature(architecture=str(arch), n_vocab=int(self.text_config["vocab_size"]),
                              n_embd=int(self.text_config["hidden_size"]),
                              n_layer=int(self.text_config["num_hidden_layers"]))

    @property
    def has_vision(self) -> bool:
        return "vision_config" in self.config

    @property
    def image_size(self) -> int:
        return int(self.config["vision_config"]["image_size"]) if self.has_vision else 0

    def _load(self):
        if self._model is None:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            torch_dtype = torch.bfloat16 if self.dtype == "bf16" else torch.float32
            if self.has_vision:
                from transformers import AutoProcessor, Gemma3ForConditionalGeneration

                model_class: Any = Gemma3ForConditionalGeneration
                self._processor = AutoProcessor.from_pretrained(self.folder)
            else:
                model_class = AutoModelForCausalLM
            self._tokenizer = AutoTokenizer.from_pretrained(self.folder)
            model = model_class.from_pretrained(self.folder, dtype=torch_dtype, attn_implementation="eager")
            self._model = model.eval()
        return self._model

    def _encode(self, text: str) -> list[int]:
        return list(self._tokenizer(text, add_special_tokens=False).input_ids)

    def text_sequence(self, chunk: TextChunk) -> PromptSequence:
        self._load()
        tokens = list(self._tokenizer(chunk.text).input_ids)[:MAX_SEQUENCE_TOKENS]
        return PromptSequence(tokens=tokens)

    def item_sequence(self, item: Item, index: int) -> PromptSequence:
        self._load()
        option_tokens = _first_tokens(self._encode, item)
        if item.image is not None:
            if self._processor is None:
                raise UserError(f"the reference {self.source} is text-only; item {item.id} has an image")
            from PIL import Image

            pixels = native_pixels(item, self.image_size)
            inputs = self._processor.apply_chat_template(
                item_messages(item, Image.fromarray(pixels)), add_generation_prompt=True, tokenize=True,
                return_dict=True, return_tensors="np")
            tokens = [int(t) for t in inputs["input_ids"][0]]
            image_token = int(self.config["image_token_index"])
            where = [i for i, t in enumerate(tokens) if t == image_token]
            if not where or where != list(range(where[0], where[-1] + 1)):
                raise UserError(f"the processor of {self.source} did not lay out one image block for item {item.id}")
            span: tuple[int, int] | None = (where[0], where[-1] + 1)
        else:
            text = self._tokenizer.apply_chat_template(item_messages(item), add_generation_prompt=True, tokenize=False)
            tokens, span = self._encode(text), None
        return _item_sequence(item, index, tokens, span, option_tokens, self._encode)

    def sequence_logits(self, sequence: PromptSequence, pixels: NDArray[np.uint8] | None,
                        rows: NDArray[np.bool_] | None = None) -> NDArray[np.float32]:
        import torch

        model = self._load()
        input_ids = torch.tensor([sequence.tokens])
        kwargs: dict[str, Any] = {"input_ids": input_ids}
        if sequence.image_span is not None:
            from PIL import Image

            if pixels is None:
                raise ValueError("an image sequence needs its pixels")
            image_inputs = self._processor.image_processor(Image.fromarray(pixels), return_tensors="pt")
            kwargs["pixel_values"] = image_inputs.pixel_values.to(model.dtype)
            token_type = torch.zeros_like(input_ids)
            token_type[0, sequence.image_span[0] : sequence.image_span[1]] = 1
            kwargs["token_type_ids"] = token_type
        with torch.no_grad():
            logits = model(**kwargs).logits[0].float().numpy()
        text = logits[text_positions(len(sequence.tokens), sequence.image_span)]
        return text if rows is None else text[rows]

    def close(self) -> None:
        self._model = self._processor = self._tokenizer = None


class GGUFReference(Reference):
    """A BF16/F32 text GGUF (+ its mmproj for images) run in llama.cpp."""

    kind = "gguf"
    REFERENCE_TYPES = ("F32", "BF16")

    def __init__(self, source: str, cache_dir: Path, mmproj: Path | None = None, n_threads: int | None = None):
        super().__init__(source, cache_dir)

        self.path = Path(source)
        self.info = read_gguf_info(self.path)
        types = {t.ggml_type.name for t in self.info.tensors if len(t.shape) >= 2}
        if not types <= set(self.REFERENCE_TYPES):
            raise UserError(f"the reference {self.path.name} holds {', '.join(sorted(types))} tensors; a reference "
                            "must be unquantized (a BF16 or F32 GGUF, or the Hugging Face checkpoint)")
        self.dtype = "f32" if types == {"F32"} else "bf16"
        self.mmproj = Path(mmproj) if mmproj else None
        self.mmproj_info = read_gguf_info(self.mmproj) if self.mmproj else None
        self.n_threads = n_threads
        self._engine: Any = None

    def _compute_hash(self) -> str:
        digest = hashlib.sha256(b"medgemma-gguf gguf reference v1\n")
        digest.update(cached_file_sha256(self.path, self.cache_dir).encode())
        if self.mmproj is not None:
            digest.update(b"+" + cached_file_sha256(self.mmproj, self.cache_dir).encode())
        return digest.hexdigest()

    @property
    def signature(self) -> ModelSignature:
        return gguf_signature(self.info)

    @property
    def has_vision(self) -> bool:
        return self.mmproj is not None

    @property
    def image_size(self) -> int:
        if self.mmproj_info is None:
            return 0
        return int(self.mmproj_info.metadata.get("clip.vision.image_size") or 0)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "mmproj": str(self.mmproj) if self.mmproj else None}

    def _load(self):
        if self._engine is None:
            from medgemma_gguf.runtime.engine import Engine

            self._engine = Engine(self.path, self.mmproj, n_ctx=MAX_SEQUENCE_TOKENS + 64, n_threads=self.n_threads)
        return self._engine

    @property
    def bos_token(self) -> int:
        """The BOS id this reference starts every sequence with (llama-perplexity writes it into each chunk)."""
        return int(self._load().bos_token)

    def text_sequence(self, chunk: TextChunk) -> PromptSequence:
        engine = self._load()
        return PromptSequence(tokens=[engine.bos_token, *engine.tokenize(chunk.text)][:MAX_SEQUENCE_TOKENS])

    def _render(self, messages: list[dict[str, Any]]) -> str:
        template = self.info.metadata.get("tokenizer.chat_template")
        if not template:
            raise UserError(f"{self.path.name} has no tokenizer.chat_template; re-convert it with "
                            "medgemma-gguf convert")
        return render_template(template, messages, bos_token="", add_generation_prompt=True)

    def item_sequence(self, item: Item, index: int) -> PromptSequence:
        engine = self._load()
        option_tokens = _first_tokens(engine.tokenize, item)
        text = self._render(item_messages(item))
        if item.image is None:
            tokens, span = [engine.bos_token, *engine.tokenize(text)], None
        else:
            if not engine.has_vision:
                raise UserError(f"item {item.id} has an image but the reference has no mmproj; pass "
                                f"{setting('reference_mmproj')}")
            runs = split_at_images(text)
            if len(runs) != 2:
                raise UserError(f"the chat template of {self.path.name} did not place one {IMAGE_START}")
            n_image = engine.image_token_count(_image_part(native_pixels(item, self.image_size)))
            head = [engine.bos_token, *engine.tokenize(runs[0])]
            tail = engine.tokenize(runs[1])
            soft = engine.tokenize("<image_soft_token>")
            placeholder = soft[0] if len(soft) == 1 else 0
            tokens, span = head + [placeholder] * n_image + tail, (len(head), len(head) + n_image)
        return _item_sequence(item, index, tokens, span, option_tokens, engine.tokenize)

    def sequence_logits(self, sequence: PromptSequence, pixels: NDArray[np.uint8] | None,
                        rows: NDArray[np.bool_] | None = None) -> NDArray[np.float32]:
        engine = self._load()
        engine.reset()
        return engine.eval_parts(sequence_parts(sequence.tokens, sequence.image_span, pixels),
                                 logits="all" if rows is None else rows)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None


def _image_part(pixels: NDArray[np.uint8]):
    from medgemma_gguf.runtime.engine import ImagePart

    return ImagePart(pixels)


def sequence_parts(tokens: Sequence[int] | np.ndarray, image_span: tuple[int, int] | None,
                   pixels: NDArray[np.uint8] | None) -> list[Any]:
    """``Engine.eval_parts`` input for a stored sequence: tokens, then the image in place of its positions."""
    tokens = [int(t) for t in tokens]
    if image_span is None:
        return [tokens]
    if pixels is None:
        raise ValueError("an image sequence needs its pixels")
    start, end = image_span
    return [tokens[:start], _image_part(pixels), tokens[end:]]


def open_reference(source: str, *, cache_dir: Path, dtype: str | None = None, mmproj: Path | None = None,
                   token: str | None = None, n_threads: int | None = None) -> Reference:
    """The reference runner for ``source``: a ``.gguf`` file, or a checkpoint folder / Hub repo id."""
    if source.lower().endswith(".gguf") or Path(source).is_file():
        if dtype is not None and dtype not in REFERENCE_DTYPES:
            raise UserError(f"reference dtype {dtype!r} is not supported; use bf16 or f32")
        if mmproj is None:
            mmproj = mmproj_from_manifest(Path(source))
        return GGUFReference(source, cache_dir, mmproj=mmproj, n_threads=n_threads)
    if mmproj is not None:
        raise UserError(f"{setting('reference_mmproj')} applies to a GGUF reference; a checkpoint carries its own "
                        "vision tower")
    return HFReference(source, cache_dir, dtype=dtype or "bf16", token=token)




def mmproj_from_manifest(text_gguf: Path) -> Path | None:
    """The most precise mmproj beside ``text_gguf`` that fits it: ``Manifest.mmproj_for`` with the precision
    order (the folder's manifest, else its mmproj GGUFs read from their headers); None without one."""

    folder = Path(text_gguf).parent
    try:
        return Manifest.for_folder(folder).mmproj_for(folder, Path(text_gguf), MMPROJ_PRECISION_ORDER).path
    except UserError:
        return None


# ----------------------------------------------------------------------------------------------------
# the cache


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:60] or "part"


def heldout_hash(chunks: Iterable[TextChunk]) -> str:
    digest = hashlib.sha256(b"medgemma-gguf heldout v1\n")
    for chunk in chunks:
        digest.update(json.dumps({"id": chunk.id, "text": chunk.text}, sort_keys=True).encode() + b"\n")
    return digest.hexdigest()


class ReferenceCache:
    """Reference outputs on disk, keyed by the reference's hash and the part's content hash."""

    def __init__(self, cache_dir: Path | None = None):
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create the reference cache {self.cache_dir}: {exc.strerror}; pass "
                            f"{setting('cache_dir')} with a writable folder") from exc
        self.hits = 0
        self.misses = 0
        self.stale_removed = 0

    def part_key(self, reference: Reference, content_hash: str, coverage: CoverageSpec) -> str:
        material = json.dumps({"reference": reference.content_hash, "kind": reference.kind, "dtype": reference.dtype,
                               "content": content_hash, "coverage": coverage.key(), "prompt": PROMPT_FORMAT_VERSION,
                               "max_tokens": MAX_SEQUENCE_TOKENS, "cache": CACHE_FORMAT_VERSION}, sort_keys=True)
        return hashlib.sha256(material.encode()).hexdigest()

    def path_for(self, reference: Reference, name: str, key: str) -> Path:
        return self.cache_dir / reference.content_hash[:16] / f"{_safe_name(name)}-{key[:16]}.npz"

    def _remove_stale(self, reference: Reference, name: str, keep: Path) -> None:
        """Remove this part's files of an older cache format (they can no longer be read), saying so."""
        for other in sorted(keep.parent.glob(f"{_safe_name(name)}-*.npz")):
            if other == keep:
                continue
            try:
                with np.load(other, allow_pickle=False) as data:
                    version = json.loads(str(data["meta_json"])).get("cache_format")
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
                continue  # damaged: left for the run of its own key to replace
            if version != CACHE_FORMAT_VERSION:
                log.warning("the reference cache %s is in cache format %s (%s); removing it: this run recomputes %s "
                            "in format %d", other, version, _OLD_FORMATS.get(version, "unknown"), name,
                            CACHE_FORMAT_VERSION)
                other.unlink(missing_ok=True)
                self.stale_removed += 1

    def get(self, reference: Reference, *, name: str, kind: str, content_hash: str,
            coverage: CoverageSpec | None = None, chunks: Sequence[TextChunk] = (), items: Sequence[Item] = (),
            sequences: Sequence[PromptSequence] = (), progress: bool = False) -> ReferencePart:
        """The cached part, or compute it with the reference and store it (atomically)."""
        coverage = coverage or CoverageSpec()
        key = self.part_key(reference, content_hash, coverage)
        path = self.path_for(reference, name, key)
        if path.is_file():
            try:
                part = ReferencePart.load(path)
                if part.key == key:
                    self.hits += 1
                    return part
                log.warning("reference cache %s belongs to another key; recomputing", path)
            except StaleCacheError as exc:
                log.warning("%s; recomputing it", exc)
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, UserError) as exc:
                log.warning("reference cache %s is unreadable (%s); recomputing", path, exc)
        self.misses += 1
        if path.parent.is_dir():
            self._remove_stale(reference, name, path)
        part = reference.compute_part(name, kind, key, chunks=chunks, items=items, sequences=sequences,
                                      coverage=coverage, progress=progress)
        part.meta.update({"content_hash": content_hash})
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            part.save(path)
        except (OSError, UserError) as exc:
            log.warning("cannot write the reference cache %s (%s); continuing without it", path, exc)
        return part


def reference_parts(reference: Reference, cache: ReferenceCache, *, heldout: Sequence[TextChunk],
                    slices: Sequence[Slice], coverage: CoverageSpec | None = None,
                    progress: bool = False) -> list[ReferencePart]:
    """Every part of an evaluation (held-out text first, then the slices), from the cache or computed."""
    coverage = coverage or CoverageSpec()
    if not isinstance(coverage, CoverageSpec):
        raise UserError(f"{setting('coverage')} must be given as a CoverageSpec (CoverageSpec.make(1e-4)), got "
                        f"{type(coverage).__name__}")
    for slice_ in slices:
        if slice_.has_images and not reference.has_vision:
            raise UserError(f"slice {slice_.spec} has images but the reference has no vision tower; drop the "
                            f"slice or pass {setting('reference_mmproj')}")
    parts = []
    if heldout:
        parts.append(cache.get(reference, name=HELDOUT_PART, kind="text", content_hash=heldout_hash(heldout),
                               coverage=coverage, chunks=heldout, progress=progress))
    for slice_ in slices:
        parts.append(cache.get(reference, name=slice_.spec, kind="task", content_hash=slice_hash(slice_),
                               coverage=coverage, items=slice_.items, progress=progress))
    return parts


def token_stream_hash(tokens: Sequence[int], n_ctx: int, bos_token: int | None) -> str:
    """Content hash of a :func:`llama_perplexity_chunks` part."""
    digest = hashlib.sha256(f"medgemma-gguf llama-perplexity chunks v1 {n_ctx} {bos_token}\n".encode())
    digest.update(np.asarray(tokens, dtype=np.int32).tobytes())
    return digest.hexdigest()


def coverage_summary(parts: Sequence[ReferencePart]) -> dict[str, Any]:
    """What the reference cache kept over ``parts``: set sizes, tail, positions stored whole, bytes."""
    dists = [p.dist for p in parts]
    sizes = np.concatenate([d.set_sizes for d in dists])
    tails = np.concatenate([d.tail_mass for d in dists])
    spec = parts[0].meta.get("coverage") or {}
    cap = spec.get("max_tokens")
    vocab = dists[0].vocab_size
    files = [p.file_bytes for p in parts]
    cache_bytes = sum(b for b in files if b is not None) if all(b is not None for b in files) else None
    dense = np.concatenate([d.dense_rows for d in dists])
    return {"epsilon": dists[0].epsilon, "full_vocab": dists[0].epsilon == 0.0, "min_tokens": spec.get("min_tokens"),
            "max_tokens": cap, "mean_set_size": float(sizes.mean()), "max_tail_mass": float(tails.max()),
            "positions_at_cap": 0,  # format 3: a set that would pass the cap is stored whole (dense_positions)
            "dense_positions": int(dense.sum()),
            "n_positions": int(sizes.size), "vocab_size": vocab, "cache_bytes": cache_bytes,
            "cache_bytes_per_position": cache_bytes / sizes.size if cache_bytes is not None else None}


def default_cache_dir() -> Path:
    """``<cache root>/reference`` (``medgemma_gguf.cache.cache_root``: ``$MEDGEMMA_GGUF_CACHE`` or ~/.cache/...)."""

    return cache_root() / "reference"
