"""Cut streamed reply text into sentences, so each goes to TTS the moment it is complete."""

from __future__ import annotations

import re

# End punctuation (with closing quotes/brackets) followed by whitespace; the whitespace proves the
# sentence is over ("3.5" or "..." mid-stream are not ends until a space follows).
_END = re.compile(r"[.!?…]+[\"')\]]*\s+|\n+")
_CLAUSE = re.compile(r"[,;:—]\s+")
_WORD = re.compile(r"\S+\s+")  # a word the stream has moved past


class SentenceSplitter:
    """Sentences, with two exceptions that keep the listener from waiting on a long one:
    the reply's first chunk may end at a clause (",", ";", ":") once it has `clause_words` words,
    and no chunk grows past `max_words` words (`first_max_words` for the first one): a run-on
    reply is cut between words, since its first words are worth more now than its prosody later.
    """

    def __init__(self, min_chars: int = 2, clause_words: int = 4, first_max_words: int = 8, max_words: int = 16) -> None:
        self.min_chars = min_chars
        self.clause_words = clause_words
        self.first_max_words = first_max_words
        self.max_words = max_words
        self._buf = ""
        self._first = True

    def push(self, text: str) -> list[str]:
        self._buf += text
        out = []
        while (cut := self._next_cut()) is not None:
            chunk, self._buf = self._buf[:cut].strip(), self._buf[cut:]
            if chunk:
                out.append(chunk)
                self._first = False
        return out

    def _next_cut(self) -> int | None:
        """Where the next chunk ends in the buffer, if it is decided yet."""
        for m in _END.finditer(self._buf):
            if len(self._buf[: m.end()].strip()) >= self.min_chars:
                return m.end()
        if self._first:
            for m in _CLAUSE.finditer(self._buf):
                if len(self._buf[: m.start()].split()) >= self.clause_words:
                    return m.end()
        words = list(_WORD.finditer(self._buf))
        limit = self.first_max_words if self._first else self.max_words
        if len(words) >= limit and self._buf[words[limit - 1].end() :].strip():
            return words[limit - 1].end()  # a word past the limit has begun
        return None

    def flush(self) -> list[str]:
        rest, self._buf = self._buf.strip(), ""
        return [rest] if rest else []
