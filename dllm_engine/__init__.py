"""An in-process diffusion language model engine: LLaDA, Dream, Fast-dLLM v2, SDAR and converted
Llama/Qwen checkpoints in one model, parallel block decoding with KV caches, and an async engine
that streams, batches and cancels.

Standalone: nothing here imports the voice agent.
"""

from .config import ConfigError, LLaDAConfig
from .decoding import DecodeParams, Output, Stats, StepInfo
from .engine import Engine, RequestError
from .loading import load_model, save_model
from .model import DiffusionLM, KVCache
from .tokenizer import Tokenizer

__all__ = [
    "ConfigError", "DecodeParams", "DiffusionLM", "Engine", "KVCache", "LLaDAConfig", "Output",
    "RequestError", "Stats", "StepInfo", "Tokenizer", "load_model", "save_model",
]
