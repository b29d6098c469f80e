"""Shared fixtures: tiny random-weight models in the real on-disk layout, loaded by the real loader."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

from dllm_engine.engine import Engine
from dllm_engine.loading import load_model
from tests.helpers import make_model_dir, missing

torch.set_num_threads(2)

# Property-based tests (tests/test_fuzz.py): few derandomized examples by default, so CI is
# repeatable; `--hypothesis-profile=fuzz-long` is the long run the README quotes.
_SLOW_OK = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=25, derandomize=True, print_blob=True, **_SLOW_OK)
settings.register_profile("fuzz-long", max_examples=10_000, **_SLOW_OK)
settings.load_profile("ci")


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "needs_tool(*executables, why): skip without any of them; under CI, fail instead")


def pytest_runtest_setup(item) -> None:
    """A missing tool skips a test on a developer's machine and fails it in CI (see helpers.missing)."""
    for mark in item.iter_markers("needs_tool"):
        if not any(shutil.which(exe) for exe in mark.args):
            missing(mark.kwargs.get("why", f"needs one of {', '.join(mark.args)}"))


@pytest.fixture(scope="session")
def random_model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("random-model"))


@pytest.fixture(scope="session")
def random_model(random_model_dir):
    return load_model(random_model_dir, dtype="float32")


@pytest.fixture
def engine(request, random_model):
    """An engine on the random model (3 slots); other settings with
    `@pytest.mark.parametrize("engine", [{"max_batch": 1}], indirect=True)`."""
    model, tok = random_model
    eng = Engine(model, tok, **{"max_batch": 3, "max_len": 512, **getattr(request, "param", {})})
    yield eng
    eng.close()


@pytest.fixture(scope="session")
def eot_model(tmp_path_factory):
    """A model that ignores context and always predicts end-of-turn: it 'answers' at once.

    Blocks contribute nothing, every embedding has a large first coordinate, and only the
    end-of-turn row of the output head reads it.
    """
    model, tok = load_model(make_model_dir(tmp_path_factory.mktemp("eot-model")), dtype="float32")
    tr = model.model.transformer
    with torch.no_grad():
        for block in tr["blocks"]:
            block.attn_out.weight.zero_()
            block.ff_out.weight.zero_()
        tr["wte"].weight[:, 0] = 10.0
        tr["ff_out"].weight.zero_()
        tr["ff_out"].weight[tok.special.end_of_turn, 0] = 10.0
    return model, tok


@pytest.fixture(scope="session")
def tiny_chat(tmp_path_factory) -> Path:
    """A tiny chat model trained in seconds on tests.helpers.PAIRS, each also capitalized as a
    recognizer writes it and once more after a history, as a call sends it (else a spoken turn is a
    prompt it never saw, and its reply may be empty); returns its out_dir (model/ inside)."""
    from tests.helpers import PAIRS, tiny_model

    out = tmp_path_factory.mktemp("tiny-chat")
    tiny_model(out, PAIRS + [(q[0].upper() + q[1:], a) for q, a in PAIRS], history_copies=1)
    return out


@pytest.fixture(scope="session")
def ar_checkpoint(tmp_path_factory):
    """A tiny random Llama, as transformers writes it, with SmolLM2's kind of chat template."""
    from tests.helpers import CHATML, hf_checkpoint

    src, _ = hf_checkpoint(tmp_path_factory.mktemp("ar") / "llama", "llama", tied=True, seed=5)
    (src / "chat_template.jinja").write_text(CHATML)
    return src


@pytest.fixture(scope="session")
def converted(ar_checkpoint, tmp_path_factory):
    """The tiny Llama converted to the project's layout (shifted, token-causal prompt), fp32."""
    from dllm_engine.convert import convert
    from tests.helpers import CHATML

    out = convert(ar_checkpoint, tmp_path_factory.mktemp("converted") / "model", mask_token="<|mdm_mask|>", dtype=torch.float32)
    (out / "chat_template.jinja").write_text(CHATML)
    return out


@pytest.fixture(scope="session")
def voice_agent(tiny_chat):
    """The real voice agent (faster-whisper, piper, Silero, the engine) on the tiny chat model."""
    from agent import Agent, AgentConfig
    from dllm_engine.decoding import DecodeParams

    agent = Agent.load(AgentConfig(model=tiny_chat / "model", dtype="float32", decode=DecodeParams(block_size=32, max_new_tokens=32)))
    yield agent
    agent.close()


@pytest.fixture(scope="session")
def piper_speech(voice_agent):
    """`piper_speech(text, rate=16000)`: the text spoken by the agent's own piper voice, float32."""
    import numpy as np
    from piper.config import SynthesisConfig

    from audio.codec import resample

    still = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)  # no generator noise: the same audio every run

    def speak(text: str, rate: int = 16000) -> np.ndarray:
        tts = voice_agent.tts
        return resample(np.concatenate(list(tts.synthesize(text, still))), tts.sample_rate, rate)

    return speak


@pytest.fixture(scope="module")
def srv(voice_agent):
    """A live server on the voice agent (3 session slots), one per test module."""
    from tests.servers import live

    with live(voice_agent, max_sessions=3) as s:
        yield s


@pytest.fixture(scope="module")
def question(piper_speech):
    """`question(text, rate)`: 0.5 s silence, the spoken text, 2.5 s silence: past the longest end of
    turn (2 s, when Whisper's transcript trails off: tiny.en hears "What do you eat?" at 8 kHz as "what do you")."""
    import numpy as np

    from tests.helpers import silence

    def make(text: str, rate: int) -> np.ndarray:
        return np.concatenate([silence(0.5, rate), piper_speech(text, rate), silence(2.5, rate)])

    return make
