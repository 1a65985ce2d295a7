"""The text of a reply as it is generated: UTF-8 decoding, stop strings, and the reasoning block apart.

``ReplyText.push(token)`` returns the text that can be shown now, as ``(channel, text)`` pieces:

* UTF-8: token pieces are bytes; a character split over several byte tokens comes out whole
  (``Utf8Decoder``), an incomplete one at the end as U+FFFD.
* Reasoning: MedGemma thinks in a block ``<unused94>thought\n … <unused95>`` before its answer (MedGemma
  1.5 4B unasked; 27B when the system prompt starts with ``THINK_SYSTEM_PREFIX`` — ``runtime.prompt``).
  ``ReasoningMarkers.from_engine`` finds the two marker tokens in the model's vocabulary (no fixed ids;
  a model without them has no reasoning channel). The block opens only at the start of the reply (nothing
  but whitespace before it) and closes at the end marker; its text, without the markers and the leading
  ``thought\n`` label, goes to the ``reasoning`` channel, the rest to ``content`` (leading whitespace after
  the block dropped). Markers are single tokens, so a stream never shows half of one; elsewhere in a
  reply a marker token is ordinary text.
* Stop strings (at most ``MAX_STOP``) apply to the content, not inside the reasoning block: the reply
  ends where the first of them appears, which may be spread over several tokens; the stop string itself
  and everything after it are never shown. While the content's last characters could still be the start
  of a stop string they are held back, and only those: a streamed reply is the same text as the finished
  one, piece by piece.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

CONTENT = "content"
REASONING = "reasoning"
MAX_STOP = 4  # OpenAI's limit, and llama-server's practice
THINK_START, THINK_END = "<unused94>", "<unused95>"  # MedGemma's reasoning block
THOUGHT_LABEL = "thought\n"  # how MedGemma opens its reasoning text

Delta = tuple[str, str]  # (channel, text)
OPENAI_DELTA_KEYS = {CONTENT: "content", REASONING: "reasoning_content"}  # stream delta keys, as llama-server


class Utf8Decoder:
    """Turns token byte pieces into text as they arrive; a character split over pieces comes out whole."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, piece: bytes) -> str:
        """The text completed by ``piece`` (may be empty while a character is incomplete)."""
        return self._decoder.decode(piece)

    def finish(self) -> str:
        """What is left: U+FFFD for an incomplete trailing character, else empty."""
        return self._decoder.decode(b"", final=True)


class StopStrings:
    """Cuts text at the first stop string, holding back only a suffix that could still become one."""

    def __init__(self, stop: Sequence[str]):
        self.stop = tuple(stop)
        self.stopped = False
        self._held = ""

    def push(self, text: str) -> str:
        """The part of ``text`` (after what was held back) that is safe to show; sets ``stopped`` at a match."""
        text = self._held + text
        first = -1
        for stop in self.stop:
            at = text.find(stop)
            if at != -1 and (first == -1 or at < first):
                first = at
        if first != -1:
            self.stopped, self._held = True, ""
            return text[:first]
        keep = 0
        for stop in self.stop:  # the longest end of the text that begins some stop string
            for size in range(min(len(stop) - 1, len(text)), keep, -1):
                if text.endswith(stop[:size]):
                    keep = size
                    break
        self._held = text[len(text) - keep:]
        return text[:len(text) - keep]

    def flush(self) -> str:
        """What was held back (the reply ended without completing a stop string)."""
        held, self._held = self._held, ""
        return held


@dataclass(frozen=True)
class ReasoningMarkers:
    """The token ids that open and close a reasoning block."""

    start: int
    end: int

    @classmethod
    def from_engine(cls, engine: Any) -> ReasoningMarkers | None:
        """The model's ``<unused94>``/``<unused95>`` tokens, or None when its vocabulary lacks either."""
        start, end = engine.single_token(THINK_START), engine.single_token(THINK_END)
        return None if start is None or end is None else cls(start, end)


class ReplyText:
    """The reply's text from its tokens (module docstring). ``piece(token)`` gives a token's bytes."""

    def __init__(self, piece: Callable[[int], bytes], *, stop: Sequence[str] = (),
                 markers: ReasoningMarkers | None = None):
        self._piece = piece
        self._decoder = Utf8Decoder()
        self._stops = StopStrings(stop) if stop else None
        self._markers = markers
        self.parts: dict[str, list[str]] = {CONTENT: [], REASONING: []}
        self.reasoning_tokens = 0
        self._thinking = False
        self._label: str | None = None  # reasoning text held while it could still be the "thought\n" label
        self._started = False  # content other than whitespace was shown: no reasoning block can open
        self._after_block = False  # drop the whitespace that follows a reasoning block

    @property
    def stopped(self) -> bool:
        """A stop string appeared: the reply ends here."""
        return self._stops is not None and self._stops.stopped

    @property
    def text(self) -> str:
        return "".join(self.parts[CONTENT])

    @property
    def reasoning(self) -> str:
        return "".join(self.parts[REASONING])

    def push(self, token: int) -> list[Delta]:
        """The text of one more token that can be shown now."""
        markers = self._markers
        if markers is not None:
            if self._thinking:
                self.reasoning_tokens += 1
                if token == markers.end:
                    out = self._flush_reasoning()
                    self._thinking, self._after_block = False, True
                    return out
                text = self._decoder.push(self._piece(token))
                return self._reasoning(text) if text else []
            if token == markers.start and not self._started:
                out = self._content(self._decoder.finish())
                if self._stops is not None and not self._stops.stopped:
                    out += self._emit(CONTENT, self._stops.flush())
                self._thinking, self._label = True, ""
                self.reasoning_tokens += 1
                return out
        text = self._decoder.push(self._piece(token))
        return self._content(text) if text else []

    def finish(self) -> list[Delta]:
        """The text still held back once the reply has ended."""
        if self._thinking:
            out = self._reasoning(self._decoder.finish())
            return out + self._flush_reasoning()
        out = self._content(self._decoder.finish()) if not self.stopped else []
        if self._stops is not None and not self._stops.stopped:
            out += self._emit(CONTENT, self._stops.flush())
        return out

    def _reasoning(self, text: str) -> list[Delta]:
        if self._label is not None:
            held = self._label + text
            if held.startswith(THOUGHT_LABEL):
                text, self._label = held[len(THOUGHT_LABEL):], None
            elif THOUGHT_LABEL.startswith(held):
                self._label = held
                return []
            else:
                text, self._label = held, None
        return self._emit(REASONING, text)

    def _flush_reasoning(self) -> list[Delta]:
        out = self._reasoning(self._decoder.finish())
        held, self._label = self._label, None
        return out + self._emit(REASONING, held or "")

    def _content(self, text: str) -> list[Delta]:
        if self._after_block:
            text = text.lstrip()
            if not text:
                return []
            self._after_block = False
        if not self._started and text.strip():
            self._started = True
        if self._stops is not None:
            if self._stops.stopped:
                return []
            text = self._stops.push(text)
        return self._emit(CONTENT, text)

    def _emit(self, channel: str, text: str) -> list[Delta]:
        if not text:
            return []
        self.parts[channel].append(text)
        return [(channel, text)]
