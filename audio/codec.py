"""Sample formats, G.711 μ-law and A-law, resampling (soxr) and fixed-size framing.

Everything inside the pipeline is mono float32 in [-1, 1]; int16 and μ-law exist only at the edges.
"""

from __future__ import annotations

import numpy as np
import soxr

SUPPORTED_RATES = (8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000)


class AudioError(ValueError):
    """Audio the pipeline cannot take: the message says what is wrong with it."""


def to_float32(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    """Validate caller audio (int16 or float, mono) and return float32 in [-1, 1]."""
    if sample_rate not in SUPPORTED_RATES:
        raise AudioError(f"unsupported sample rate {sample_rate} Hz (supported: {', '.join(map(str, SUPPORTED_RATES))})")
    a = np.asarray(samples)
    if a.ndim == 2 and 1 in a.shape:
        a = a.reshape(-1)
    if a.ndim != 1:
        raise AudioError(f"audio must be mono (1-D), got shape {a.shape}")
    if a.dtype == np.int16:
        return a.astype(np.float32) / 32768.0
    if a.dtype not in (np.float32, np.float64):
        raise AudioError(f"audio must be int16 or float32/float64, got {a.dtype}")
    if not np.isfinite(a).all():
        raise AudioError("audio contains NaN or infinite samples")
    return np.clip(a, -1.0, 1.0).astype(np.float32, copy=False)


def to_int16(samples: np.ndarray) -> np.ndarray:
    return (np.clip(samples, -1.0, 1.0) * 32767.0).astype(np.int16)


# G.711 μ-law on 14-bit magnitudes, as in the ITU reference code (and Python's old audioop).
_ULAW_DECODE = np.array(
    [(1 - 2 * (b >> 7)) * ((((b & 0x0F) << 3) + 0x84) << ((b >> 4) & 0x07)) - (1 - 2 * (b >> 7)) * 0x84 for b in (~np.arange(256) & 0xFF)],
    dtype=np.int16,
)


def ulaw_decode(data: bytes) -> np.ndarray:
    """G.711 μ-law bytes → int16 samples."""
    return _ULAW_DECODE[np.frombuffer(data, dtype=np.uint8)]


def ulaw_encode(samples: np.ndarray) -> bytes:
    """int16 samples → G.711 μ-law bytes."""
    v = samples.astype(np.int32) >> 2
    mask = np.where(v < 0, 0x7F, 0xFF)
    v = np.minimum(np.abs(v), 8159) + 33
    seg = np.clip(np.floor(np.log2(v)).astype(np.int32) - 5, 0, 8)
    u = np.where(seg >= 8, 0x7F, (seg << 4) | ((v >> (seg + 1)) & 0x0F))
    return (u ^ mask).astype(np.uint8).tobytes()


# G.711 A-law on 13-bit magnitudes, as in the ITU reference code (and Python's old audioop).
_ALAW_SEGMENT_ENDS = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF])


def _alaw_to_linear(byte: int) -> int:
    a = byte ^ 0x55
    seg = (a & 0x70) >> 4
    t = ((a & 0x0F) << 4) + (8 if seg == 0 else 0x108)
    t = t << (seg - 1) if seg > 1 else t
    return t if a & 0x80 else -t


_ALAW_DECODE = np.array([_alaw_to_linear(b) for b in range(256)], dtype=np.int16)


def alaw_decode(data: bytes) -> np.ndarray:
    """G.711 A-law bytes → int16 samples."""
    return _ALAW_DECODE[np.frombuffer(data, dtype=np.uint8)]


def alaw_encode(samples: np.ndarray) -> bytes:
    """int16 samples → G.711 A-law bytes."""
    v = samples.astype(np.int32) >> 3
    mask = np.where(v >= 0, 0xD5, 0x55)
    v = np.where(v >= 0, v, -v - 1)
    seg = np.searchsorted(_ALAW_SEGMENT_ENDS, v)
    mantissa = (v >> np.where(seg < 2, 1, seg)) & 0x0F
    a = np.where(seg >= 8, 0x7F, (np.minimum(seg, 7) << 4) | mantissa)
    return (a ^ mask).astype(np.uint8).tobytes()


class Resampler:
    """Streaming resampler for one direction of one session (keeps the filter state between chunks)."""

    def __init__(self, in_rate: int, out_rate: int) -> None:
        self.in_rate, self.out_rate = in_rate, out_rate
        self._stream = None if in_rate == out_rate else soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32", quality="HQ")

    def __call__(self, samples: np.ndarray, last: bool = False) -> np.ndarray:
        if self._stream is None:
            return samples
        return self._stream.resample_chunk(samples, last=last)


def resample(samples: np.ndarray, in_rate: int, out_rate: int) -> np.ndarray:
    """One-shot resampling of a whole float32 clip."""
    return samples if in_rate == out_rate else soxr.resample(samples, in_rate, out_rate, quality="HQ").astype(np.float32, copy=False)


class Framer:
    """Cuts a stream of arbitrary-length chunks into frames of exactly `size` samples."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._buf = np.zeros(0, dtype=np.float32)

    def push(self, samples: np.ndarray) -> list[np.ndarray]:
        buf = np.concatenate([self._buf, samples]) if self._buf.size else samples
        n = len(buf) // self.size * self.size
        self._buf = buf[n:].copy()
        return [buf[i : i + self.size] for i in range(0, n, self.size)]


def trim(samples: np.ndarray, level: float, margin: int = 0, tail: bool = True) -> np.ndarray:
    """Cut leading (and with `tail`, trailing) samples quieter than `level`, keeping `margin` samples
    before (and after) the loud part; a clip with nothing louder is kept whole."""
    loud = np.flatnonzero(np.abs(samples) > level)
    if not loud.size:
        return samples
    return samples[max(0, loud[0] - margin) : loud[-1] + 1 + margin if tail else len(samples)]
