"""Smart Turn v3.2: has the speaker finished their turn? Judged from the sound of it (intonation,
rhythm, a trailing "and…"), which a silence timer and a transcript cannot hear.

The model is the int8 CPU build shipped inside the `pipecat-ai` wheel (BSD-2-Clause), installed with
`pip install --no-deps pipecat-ai==1.14.0` for the file alone: a Whisper-tiny encoder with a linear
head. Its input, as Pipecat feeds it: the turn's 16 kHz audio (from a little before the speech
started), the last 8 s of it, zero-padded at the start; Whisper log-mel features of an 8 s window,
normalized → (1, 80, 800); out: the probability that the turn is complete.
"""

from __future__ import annotations

import importlib.metadata
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort

SAMPLE_RATE = 16000
WINDOW_S = 8
MODEL_FILE = "smart-turn-v3.2-cpu.onnx"
PACKAGE = "pipecat-ai"
INSTALL = f"pip install --no-deps {PACKAGE}==1.14.0"


class TurnModelError(RuntimeError):
    """The end-of-turn model file is missing or is not one."""


def default_model_path() -> Path:
    """The model file inside the installed pipecat-ai wheel, found without importing pipecat (its
    package imports dependencies that a --no-deps install leaves out)."""
    try:
        files = importlib.metadata.files(PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == MODEL_FILE:
            return Path(f.locate())
    raise TurnModelError(f"the end-of-turn model {MODEL_FILE} ships in the {PACKAGE} wheel: {INSTALL} (or turn it off: turn_model=False)")


class TurnModel:
    """One model shared by all sessions; `__call__` blocks (~tens of ms), so call it from a worker thread."""

    def __init__(self, path: str | Path | None = None, threads: int = 1) -> None:
        from transformers import WhisperFeatureExtractor

        self.path = Path(path) if path else default_model_path()
        if not self.path.is_file():
            raise TurnModelError(f"end-of-turn model {self.path}: no such file")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's errors name neither the file nor what it should be
            raise TurnModelError(f"end-of-turn model {self.path}: not an ONNX model onnxruntime can load ({e})") from None
        names = [i.name for i in self.session.get_inputs()]
        if names != ["input_features"]:
            raise TurnModelError(f"end-of-turn model {self.path}: expected one input 'input_features' (Smart Turn v3), found {names}")
        self.features = WhisperFeatureExtractor(chunk_length=WINDOW_S, feature_size=80, sampling_rate=SAMPLE_RATE)
        self._lock = threading.Lock()  # one inference at a time: the session's threads are its budget

    def input_features(self, audio: np.ndarray) -> np.ndarray:
        """(1, 80, 800) float32 for 16 kHz mono float audio: the last 8 s, zero-padded at the start."""
        n = WINDOW_S * SAMPLE_RATE
        audio = np.asarray(audio, dtype=np.float32)[-n:]
        audio = np.pad(audio, (n - len(audio), 0))
        return self.features(audio, sampling_rate=SAMPLE_RATE, return_tensors="np", do_normalize=True)["input_features"].astype(np.float32)

    def __call__(self, audio: np.ndarray) -> float:
        """The probability that the speaker has finished (> 0.5: complete)."""
        features = self.input_features(audio)
        with self._lock:
            (out,) = self.session.run(None, {"input_features": features})
        return float(np.asarray(out).reshape(-1)[0])
