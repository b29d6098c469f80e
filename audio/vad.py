"""Silero VAD v6 (the ONNX file shipped inside faster-whisper), streaming, on onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

SAMPLE_RATE = 16000
FRAME = 512  # new samples per call (32 ms)
CONTEXT = 64  # samples of the previous frame the model sees again


def default_model_path() -> Path:
    import faster_whisper

    return Path(faster_whisper.__file__).parent / "assets" / "silero_vad_v6.onnx"


def load_session(path: str | Path | None = None) -> ort.InferenceSession:
    """One intra-op thread: a frame is tiny, and the other cores belong to ASR, TTS and the dLLM."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path or default_model_path()), opts, providers=["CPUExecutionProvider"])


class SileroVAD:
    """Speech probability per 32 ms frame of 16 kHz audio; one instance per audio stream.

    The session is shared (load it once per process); the recurrent state and context are per stream.
    """

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.reset()

    def reset(self) -> None:
        self._h = np.zeros((1, 1, 128), dtype=np.float32)
        self._c = np.zeros((1, 1, 128), dtype=np.float32)
        self._context = np.zeros(CONTEXT, dtype=np.float32)

    def __call__(self, frame: np.ndarray) -> float:
        if frame.shape != (FRAME,):
            raise ValueError(f"Silero VAD takes frames of {FRAME} samples at 16 kHz, got shape {frame.shape}")
        x = np.concatenate([self._context, frame])[None, :].astype(np.float32, copy=False)
        prob, self._h, self._c = self.session.run(None, {"input": x, "h": self._h, "c": self._c})
        self._context = frame[-CONTEXT:].copy()
        return float(prob.reshape(-1)[0])
