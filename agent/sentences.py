"""Cut streamed reply text into sentences, so each goes to TTS the moment it is complete."""

from __future__ import annotations

import re

# End punctuation (with closing quotes/brackets) followed by whitespace; the whitespace proves the
# sentence is over ("3.5" or "..." mid-stream are not ends until a space follows).
_END = re.compile(r"[.!?…]+[\"')\]]*\s+|\n+")


class SentenceSplitter:
    def __init__(self, min_chars: int = 2) -> None:
        self.min_chars = min_chars
        self._buf = ""

    def push(self, text: str) -> list[str]:
        self._buf += text
        out = []
        start = 0
        for m in _END.finditer(self._buf):
            sentence = self._buf[start : m.end()].strip()
            if len(sentence) >= self.min_chars:
                out.append(sentence)
                start = m.end()
        self._buf = self._buf[start:]
        return out

    def flush(self) -> list[str]:
        rest, self._buf = self._buf.strip(), ""
        return [rest] if rest else []
