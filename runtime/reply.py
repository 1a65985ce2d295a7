"""The text of a reply as it is generated: UTF-8 decoding and stop strings.

``ReplyText.push(token)`` returns the text that can be shown now, as ``(channel, text)`` pieces:

* UTF-8: token pieces are bytes; a character split over several byte tokens comes out whole
  (``Utf8Decoder``), an incomplete one at the end as U+FFFD.
* Stop strings (at most ``MAX_STOP``): the reply ends where the first of them appears, which may be
  spread over several tokens; the stop string itself and everything after it are never shown. While the
  reply's last characters could still be the start of a stop string they are held back, and only those:
  a streamed reply is the same text as the finished one, piece by piece.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence

CONTENT = "content"
MAX_STOP = 4  # OpenAI's limit, and llama-server's practice

Delta = tuple[str, str]  # (channel, text)


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


class ReplyText:
    """The reply's text from its tokens (module docstring). ``piece(token)`` gives a token's bytes."""

    def __init__(self, piece: Callable[[int], bytes], *, stop: Sequence[str] = ()):
        self._piece = piece
        self._decoder = Utf8Decoder()
        self._stops = StopStrings(stop) if stop else None
        self.parts: dict[str, list[str]] = {CONTENT: []}

    @property
    def stopped(self) -> bool:
        """A stop string appeared: the reply ends here."""
        return self._stops is not None and self._stops.stopped

    @property
    def text(self) -> str:
        return "".join(self.parts[CONTENT])

    def push(self, token: int) -> list[Delta]:
        """The text of one more token that can be shown now."""
        text = self._decoder.push(self._piece(token))
        return self._content(text) if text else []

    def finish(self) -> list[Delta]:
        """The text still held back once the reply has ended."""
        out = self._content(self._decoder.finish()) if not self.stopped else []
        if self._stops is not None and not self._stops.stopped:
            out += self._emit(self._stops.flush())
        return out

    def _content(self, text: str) -> list[Delta]:
        if self._stops is not None:
            if self._stops.stopped:
                return []
            text = self._stops.push(text)
        return self._emit(text)

    def _emit(self, text: str) -> list[Delta]:
        if not text:
            return []
        self.parts[CONTENT].append(text)
        return [(CONTENT, text)]
