"""The tokenizer of a Gemma 3 checkpoint as GGUF vocabulary: pieces, scores, types, special ids, template.

The SentencePiece model gives every piece with its score and type.  Added and special tokens are
collected from every place a checkpoint may list them — ``added_tokens.json``,
``tokenizer_config.json`` (``added_tokens_decoder`` as published, ``extra_special_tokens`` and the
named special tokens as transformers 5.x writes), ``special_tokens_map.json`` and ``tokenizer.json`` —
so that Gemma's turn and image markers are typed CONTROL and llama.cpp parses each as one token.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

from medgemma_gguf.errors import UserError

# Markers llama.cpp must parse as single tokens in a Gemma 3 chat prompt.
GEMMA_MARKERS = ("<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>")


class TokenType(IntEnum):
    """GGUF token types (the same numbering as SentencePiece's piece types)."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


@dataclass
class Vocab:
    """Everything the GGUF ``tokenizer.*`` keys hold."""

    tokens: list[str]
    scores: list[float]
    types: list[TokenType]
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad, eot
    add_bos: bool = True
    add_eos: bool = False
    chat_template: str | None = None

    def id_of(self, text: str) -> int | None:
        try:
            return self.tokens.index(text)
        except ValueError:
            return None


def _load_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); re-download it") from exc


def _read_sentencepiece(path: Path) -> tuple[list[str], list[float], list[TokenType]]:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()  # type: ignore[attr-defined]
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as exc:  # protobuf raises its own DecodeError
        raise UserError(f"{path} is not a SentencePiece model ({exc}); re-download it") from exc
    if not proto.pieces:
        raise UserError(f"{path} holds no pieces; re-download tokenizer.model")
    tokens = [p.piece for p in proto.pieces]
    scores = [float(p.score) for p in proto.pieces]
    types = [TokenType(p.type) for p in proto.pieces]
    return tokens, scores, types


def _read_tokenizer_json(path: Path) -> tuple[list[str], list[float], list[TokenType]]:
    """Pieces, scores and types from a ``tokenizer.json`` whose model is Gemma's byte-fallback BPE.

    transformers 5.x saves only ``tokenizer.json``.  llama.cpp's SentencePiece tokenizer merges the
    adjacent pair whose result has the highest score, which reproduces BPE when every piece's score is
    minus the rank of the merge that creates it; pieces no merge creates (characters, bytes) score 0.
    """
    if not path.is_file():
        raise UserError(f"{path.parent} has neither tokenizer.model nor tokenizer.json; copy the tokenizer files "
                        "of the base model (e.g. google/medgemma-4b-it) into the checkpoint folder")
    data = _load_json(path)
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        raise UserError(f"{path} holds a {model.get('type')} tokenizer without byte fallback; Gemma 3 uses a "
                        "byte-fallback BPE (SentencePiece) tokenizer — is this a Gemma 3 checkpoint?")
    vocab: dict[str, int] = model["vocab"]
    tokens = [""] * len(vocab)
    for piece, token_id in vocab.items():
        tokens[token_id] = piece
    scores = [0.0] * len(tokens)
    for rank, merge in enumerate(model.get("merges") or []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        merged_id = vocab.get(left + right)
        if merged_id is not None and scores[merged_id] == 0.0:
            scores[merged_id] = -float(rank + 1)
    types = [TokenType.NORMAL] * len(tokens)
    for token_id, piece in enumerate(tokens):
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            types[token_id] = TokenType.BYTE
    unk = model.get("unk_token")
    if unk in vocab:
        types[vocab[unk]] = TokenType.UNKNOWN
    return tokens, scores, types


def _token_content(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _special_contents(tok_config: dict[str, Any], special_map: dict[str, Any]) -> dict[str, str]:
    """Named special tokens (bos_token, boi_token, …) from tokenizer_config and special_tokens_map."""
    named: dict[str, str] = {}
    for source in (special_map, tok_config):
        for key, value in source.items():
            if key.endswith("_token") and (content := _token_content(value)):
                named[key] = content
        extra = source.get("extra_special_tokens") or source.get("additional_special_tokens") or {}
        items: Iterable[tuple[Any, Any]] = extra.items() if isinstance(extra, dict) else enumerate(extra)
        for name, value in items:
            if content := _token_content(value):
                named[str(name)] = content
    return named


def _added_tokens(folder: Path, tok_config: dict[str, Any]) -> dict[int, tuple[str, bool]]:
    """id -> (content, special) from added_tokens.json, tokenizer_config and tokenizer.json."""
    added: dict[int, tuple[str, bool]] = {}
    for content, token_id in _load_json(folder / "added_tokens.json").items():
        added[int(token_id)] = (content, False)
    tokenizer_json = _load_json(folder / "tokenizer.json")
    for row in tokenizer_json.get("added_tokens", []) or []:
        added[int(row["id"])] = (row["content"], bool(row.get("special")))
    for token_id, row in (tok_config.get("added_tokens_decoder") or {}).items():
        added[int(token_id)] = (row["content"], bool(row.get("special")))
    return added


def _chat_template(folder: Path, tok_config: dict[str, Any]) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = _load_json(folder / "chat_template.json").get("chat_template") or tok_config.get("chat_template")
    if isinstance(template, list):  # named templates: use the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


def read_vocab(folder: Path, vocab_size: int) -> Vocab:
    """Build the GGUF vocabulary of the checkpoint in ``folder``, padded to ``vocab_size`` entries."""
    folder = Path(folder)
    if (folder / "tokenizer.model").is_file():
        tokens, scores, types = _read_sentencepiece(folder / "tokenizer.model")
    else:
        tokens, scores, types = _read_tokenizer_json(folder / "tokenizer.json")
    tok_config = _load_json(folder / "tokenizer_config.json")
    named = _special_contents(tok_config, _load_json(folder / "special_tokens_map.json"))

    for token_id, (content, special) in sorted(_added_tokens(folder, tok_config).items()):
        if token_id >= vocab_size:
            raise UserError(f"added token {content!r} has id {token_id} beyond the embedding's {vocab_size} rows; "
                            "the tokenizer files do not belong to this model")
        while len(tokens) <= token_id:
            tokens.append(f"[PAD{len(tokens)}]")
            scores.append(-1000.0)
            types.append(TokenType.UNUSED)
        if tokens[token_id] != content:
            scores[token_id] = -1000.0
        tokens[token_id] = content
        types[token_id] = TokenType.CONTROL if special else TokenType.USER_DEFINED

    if len(tokens) > vocab_size:
        raise UserError(f"the tokenizer has {len(tokens)} tokens but the model's embedding has {vocab_size} rows; "
                        "the tokenizer files do not belong to this model")
    while len(tokens) < vocab_size:
        tokens.append(f"[PAD{len(tokens)}]")
        scores.append(-1000.0)
        types.append(TokenType.UNUSED)

    index = {text: i for i, text in enumerate(tokens)}
    for content in {*named.values(), *GEMMA_MARKERS, "<image_soft_token>"}:
        marker_id = index.get(content)
        if marker_id is not None and types[marker_id] in (TokenType.NORMAL, TokenType.USER_DEFINED):
            types[marker_id] = TokenType.CONTROL
    missing = [m for m in GEMMA_MARKERS if m not in index]
    if missing:
        raise UserError(f"the tokenizer has no {', '.join(missing)} token; this is not a Gemma 3 tokenizer")

    special_ids: dict[str, int] = {}
    for role, default in (("bos", "<bos>"), ("eos", "<eos>"), ("unk", "<unk>"), ("pad", "<pad>")):
        content = named.get(f"{role}_token", default)
        if content in index:
            special_ids[role] = index[content]
    special_ids["eot"] = index["<end_of_turn>"]
    return Vocab(tokens=tokens, scores=scores, types=types, special_ids=special_ids,
                 add_bos=bool(tok_config.get("add_bos_token", True)),
                 add_eos=bool(tok_config.get("add_eos_token", False)),
                 chat_template=_chat_template(folder, tok_config))
