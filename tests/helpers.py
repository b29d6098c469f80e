"""Small reusable builders for tests: tiny configs, random-weight models and on-disk model dirs.

Everything is deterministic: weights come from a private `torch.Generator` seeded by the caller,
so the global RNG is neither consumed nor relied on, and the BPE is trained on fixed sentences.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import types
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agent import events as ev
from dllm_engine.config import LLaDAConfig
from dllm_engine.decoding import Runner, Sequence
from dllm_engine.loading import save_model
from dllm_engine.model import DiffusionLM
from dllm_engine.tokenizer import Tokenizer
from training.bpe import train_tokenizer
from training.config import TrainConfig
from training.loop import export, train

WAIT = 60.0  # generous bound on any single wait in a test: only a hang fails it, never slowness

SENTENCES = [
    "hello there, how are you today?",
    "hi! good morning, the weather is nice.",
    "tell me about your weekend.",
    "I went hiking with my dog in the hills, and we saw a lake.",
    "What do you like to do? I like to read and to cook.",
    "tell me a story about a dog and a cat who were friends.",
    "Thanks, that was a good story. See you tomorrow!",
    "héllo wörld — ok ✓ 😀",
]

# Small enough for a 2-core CPU, large enough to have real heads, MLP and several layers.
TINY = dict(d_model=64, n_layers=2, n_heads=4, mlp_hidden_size=96, max_sequence_length=1024, rope_theta=10000.0)


def tiny_config(**overrides: Any) -> LLaDAConfig:
    """A tiny config; `vocab_size` defaults to 64 when no tokenizer is involved."""
    return LLaDAConfig(**{**TINY, "vocab_size": 64, **overrides})


def randomize_(model: DiffusionLM, seed: int = 0) -> DiffusionLM:
    """Overwrite every parameter in place from a seeded generator (norm gains too, not just ones).

    Linear weights ~ N(0, 1/fan_in), embeddings ~ N(0, 1), norm gains ~ 1 + N(0, 0.1^2).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.ndim == 1:
                value = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
            elif name.endswith("wte.weight"):
                value = torch.randn(p.shape, generator=gen)
            else:
                value = torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5
            p.copy_(value.to(p.dtype))
    return model


def random_model(cfg: LLaDAConfig, seed: int = 0) -> DiffusionLM:
    """A float32 eval-mode DiffusionLM with deterministic random weights."""
    with torch.random.fork_rng(devices=[]):
        model = DiffusionLM(cfg)
    return randomize_(model, seed).eval().requires_grad_(False)


def train_tiny_tokenizer(directory: str | Path, vocab_size: int = 384) -> int:
    """Train the project's BPE on `SENTENCES` into `directory`; returns its vocabulary size."""
    return train_tokenizer(SENTENCES * 4, vocab_size, directory).get_vocab_size()


def make_model_dir(
    path: str | Path,
    cfg_overrides: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    shard_bytes: int = 2**40,
    seed: int = 0,
) -> Path:
    """A model directory in the real layout: tokenizer files, config.json and random weights.

    The vocabulary size is the trained tokenizer's unless `cfg_overrides` names one.
    """
    path = Path(path)
    vocab = train_tiny_tokenizer(path)
    cfg = LLaDAConfig(**{**TINY, "vocab_size": vocab, **(cfg_overrides or {})})
    save_model(random_model(cfg, seed), path, dtype=dtype, max_shard_bytes=shard_bytes)
    return path


def edit_json(path: str | Path, **changes: Any) -> dict[str, Any]:
    """Update keys of a JSON object file (a value of `...` deletes the key); returns the result."""
    path = Path(path)
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is ...:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data, indent=2) + "\n")
    return data


def llada_8b_instruct_config(**overrides: Any) -> dict[str, Any]:
    """The full field set of LLaDA-8B-Instruct's config.json (its real values), with `overrides`."""
    raw = {
        "activation_type": "silu",
        "alibi": False,
        "alibi_bias_max": 8.0,
        "architectures": ["LLaDAModelLM"],
        "attention_dropout": 0.0,
        "attention_layer_norm": False,
        "attention_layer_norm_with_affine": True,
        "auto_map": {
            "AutoConfig": "configuration_llada.LLaDAConfig",
            "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
            "AutoModel": "modeling_llada.LLaDAModelLM",
        },
        "bias_for_layer_norm": False,
        "block_group_size": 1,
        "block_type": "llama",
        "d_model": 4096,
        "embedding_dropout": 0.0,
        "embedding_size": 126464,
        "eos_token_id": 126081,
        "flash_attention": False,
        "include_bias": False,
        "include_qkv_bias": False,
        "init_cutoff_factor": None,
        "init_device": "meta",
        "init_fn": "mitchell",
        "init_std": 0.02,
        "input_emb_norm": False,
        "layer_norm_type": "rms",
        "layer_norm_with_affine": True,
        "mask_token_id": 126336,
        "max_sequence_length": 4096,
        "mlp_hidden_size": 12288,
        "mlp_ratio": 4,
        "model_type": "llada",
        "multi_query_attention": None,
        "n_heads": 32,
        "n_kv_heads": 32,
        "n_layers": 32,
        "pad_token_id": 126081,
        "precision": "amp_bf16",
        "residual_dropout": 0.0,
        "rms_norm_eps": 1e-05,
        "rope": True,
        "rope_full_precision": True,
        "rope_theta": 500000.0,
        "scale_logits": False,
        "transformers_version": "4.46.3",
        "use_cache": False,
        "vocab_size": 126464,
        "weight_tying": False,
    }
    raw.update(overrides)
    return raw


# SmolLM2's template: a conversation that has no system turn gets a default one.
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|startoftext|>system\nbe kind<|eot_id|>\n' }}{% endif %}"
    "{{ '<|startoftext|>' + message['role'] + '\n' + message['content'] + '<|eot_id|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|startoftext|>assistant\n' }}{% endif %}"
)

# Six (prompt, reply) pairs a tiny model memorizes in seconds (`tiny_model`).
PAIRS = [
    ("hello, how are you?", "I am fine, thank you."),
    ("what is your name?", "My name is Tiny."),
    ("do you like dogs?", "Yes, dogs are great."),
    ("what do you eat?", "I eat pizza every day."),
    ("where do you live?", "I live in a small house."),
    ("tell me a joke.", "Why did the cat sit on the computer?"),
]


TINY_MODEL = dict(d_model=64, n_layers=2, n_heads=4, mlp_hidden_size=128, max_sequence_length=256)


def tiny_model(out_dir: str | Path, pairs: list[tuple[str, str]], steps: int = 600, **overrides: Any) -> Path:
    """Train a tiny model on fixed (prompt, reply) pairs and export it; returns the model directory.

    Deterministic (fixed seed); after 600 steps six short pairs are answered verbatim with greedy
    threshold/dual-cache decoding and end with <|eot_id|>.
    The pairs are both train and eval data; reply_len 32 (decode with block_size 32,
    max_new_tokens 32). `overrides` are TrainConfig keys (e.g. seed, lr, model).
    Layout under out_dir: data/ (corpus + tokenizer), run/ (checkpoints), model/ (the fp32 export).
    """
    out_dir = Path(out_dir)
    data = out_dir / "data"
    data.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"messages": [{"role": "user", "content": q}], "reply": a}) for q, a in pairs]
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    (data / "eval.jsonl").write_text("\n".join(lines) + "\n")
    (data / "utterances.txt").write_text("\n".join(t for p in pairs for t in p) + "\n")
    train_tokenizer([t for p in pairs for t in p] * 4, 512, data / "tokenizer")
    full = dict(out_dir=str(out_dir / "run"), batch_tokens=2048, max_batch_size=16, warmup_steps=20, max_steps=steps,
                eval_interval=max(1, steps // 4), log_interval=max(1, steps // 10))
    cfg = tiny_train_config(out_dir, **{**full, **overrides})
    train(cfg, resume=True, progress=False, log=lambda *a: None)
    return export(cfg.out_dir, out_dir / "model", which="last", dtype=torch.float32)


def run_to_end(runner: Runner, seqs: list[Sequence], record: list | None = None) -> list:
    """Step until every sequence finishes; returns the final outputs in input order."""
    for i, s in enumerate(seqs):
        s.slot = i
    finals = {}
    active = list(seqs)
    while active:
        before = {s.id: s.ids.clone() for s in active}
        outs = runner.step(active)
        for out in outs:
            s = next(s for s in active if s.id == out.request_id)
            if record is not None:
                record.append((before[s.id], s.ids.clone(), out))
            if out.finished:
                finals[s.id] = out
        active = [s for s in active if s.id not in finals]
    return [finals[s.id] for s in seqs]


def prompt_ids(tok: Tokenizer, text: str) -> list[int]:
    """A one-message chat prompt, as the engine renders it."""
    return tok.apply_chat_template([{"role": "user", "content": text}])


def tiny_train_config(tmp: Path, **overrides: Any) -> TrainConfig:
    """A short training config over the tiny corpus `tiny_model` wrote under `tmp` (its data dir), in a fresh out_dir."""
    raw = dict(
        data_dir=str(tmp / "data"),
        out_dir=str(tmp / "run2"),
        model=dict(TINY_MODEL),
        reply_len=32,
        batch_tokens=512,
        max_batch_size=4,
        lr=3e-3,
        warmup_steps=5,
        max_steps=20,
        eval_interval=10,
        log_interval=5,
        threads=0,
        autocast_bf16=False,
    )
    raw.update(overrides)
    return TrainConfig.from_dict(raw)


def silence(seconds: float, rate: int = 16000):
    return np.zeros(int(seconds * rate), dtype=np.float32)


def espeak(text: str, rate: int = 16000):
    """A second, different synthetic voice (Debian's espeak-ng) at `rate` Hz, float32."""
    import io
    import shutil
    import subprocess
    import wave

    from audio.codec import resample

    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError("espeak-ng is not installed (apt-get install espeak-ng; .ci/run does it)")
    wav = subprocess.run([exe, "--stdout", "-s", "160", text], check=True, capture_output=True).stdout
    with wave.open(io.BytesIO(wav)) as w:
        audio = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float32) / 32768
        return resample(audio, w.getframerate(), rate)


def trim(audio, level: float = 0.01):
    """Cut a clip's leading and trailing near-silence (piper pads sentences with a random stretch of silence)."""
    from audio.codec import trim as trim_quiet

    return trim_quiet(audio, level)


# ---- shared by several test modules ---------------------------------------------------------


def words(text: str) -> list[str]:
    import re

    return re.findall(r"[a-z0-9']+", text.lower())


def similarity(a: str, b: str) -> float:
    """How alike two transcripts are, word by word (0..1): ASR output is compared, never matched exactly."""
    import difflib

    return difflib.SequenceMatcher(None, words(a), words(b)).ratio()


def missing(what: str) -> None:
    """A tool a test needs is not installed: skip locally, but fail where `CI` is set (CI installs them all)."""
    import os

    import pytest

    if os.environ.get("CI"):
        pytest.fail(f"{what} (CI must install it: a skip there would hide the test)", pytrace=False)
    pytest.skip(what)


class ManualClock:
    """A `agent.clock.Clock` that moves only when the test says so: `advance(seconds)`.

    `sleep` waits until the clock has been advanced past its deadline, so real-time pacing can be
    stepped through exactly, whatever the machine's speed.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        import asyncio

        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.now + seconds, fut))
        await fut

    @property
    def sleeping(self) -> int:
        return sum(not f.done() for _, f in self._sleepers)

    def advance(self, seconds: float) -> None:
        self.now += seconds
        due = [f for t, f in self._sleepers if t <= self.now + 1e-12]
        self._sleepers = [(t, f) for t, f in self._sleepers if t > self.now + 1e-12]
        for f in due:
            if not f.done():
                f.set_result(None)


class BatchSizes:
    """Rows in each forward of `model` while in use (`with BatchSizes(model) as sizes:`): proof that
    requests really shared forwards, which equal outputs alone cannot give."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.sizes: list[int] = []

    def __enter__(self) -> list[int]:
        self._hook = self.model.register_forward_hook(lambda _m, args, _out: self.sizes.append(args[0].shape[0]))
        return self.sizes

    def __exit__(self, *exc: object) -> None:
        self._hook.remove()


async def stream_turn(engine, messages, params, conversation: str | None = None) -> tuple[list[int], object]:
    """One request through `engine.stream`: its committed token ids and its last stats."""
    outs = [o async for o in engine.stream(messages, params, conversation=conversation)]
    return [t for o in outs for t in o.token_ids], outs[-1].stats


async def reused_as_recomputed(engine, messages, params) -> tuple[list[int], object]:
    """A conversation's turn reusing its prefix ("kept") and the same prompt recomputed ("fresh"):
    the same token ids, which it returns with the kept turn's stats."""
    reused, stats = await stream_turn(engine, messages, params, "kept")
    engine.forget("fresh")
    engine.share_prefixes, shares = False, engine.share_prefixes  # nothing borrowed from "kept"
    try:
        fresh, _ = await stream_turn(engine, messages, params, "fresh")
    finally:
        engine.share_prefixes = shares
    assert reused == fresh
    return reused, stats


async def eventually(condition, what: str, timeout: float = WAIT) -> None:
    """Poll `condition()` until it holds; only a hang (past `timeout`) fails, with `what`."""
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.01)


class ListDialogue:
    """The history as a Reply sees it: `add` and `turns`."""

    def __init__(self) -> None:
        self.turns: list[dict[str, str]] = []

    def add(self, role: str, text: str) -> None:
        self.turns.append({"role": role, "content": text})


class ReplyHost:
    """A session as far as a Reply sees one (`agent.reply.Host`): a list for a history, a manual clock."""

    agent = None
    config = None

    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock
        self.dialogue = ListDialogue()
        self.events: list = []

    def emit(self, event) -> None:
        self.events.append(event)

    def engine_request(self, reply):
        return "req", None

    def transcribed(self, reply) -> None:
        pass

    def finished(self, reply) -> None:
        pass


def spoken_reply(clock: ManualClock, sentences: list[str], seconds: list[float], rate: int = 48000, done: bool = True):
    """A confirmed reply to turn 1 whose sentences (`seconds` of audio each) have all gone out, recorded in
    its host's history as heard; returns (reply, its AgentAudio events)."""
    from agent.metrics import TurnTimeline
    from agent.reply import Reply

    reply = Reply(1, TurnTimeline(1, clock=clock), ReplyHost(clock), confirmed=True, user_text="hi", sample_rate=rate, done=done)
    audio = [ev.AgentAudio(1, np.full(round(s * rate), 0.1, np.float32), rate, text, i) for i, (text, s) in enumerate(zip(sentences, seconds), 1)]
    for a in audio:
        reply.audio_samples += len(a.samples)
        reply.sent(a)
    reply.record()
    return reply, audio


def heard_prefix(sent: list[tuple[int, str, int]], seconds: float, rate: int) -> str:
    """The oracle for the history after a reply was cut, from the audio sent — (sentence index, its text,
    samples) per chunk — and the time heard: whole sentences while the heard samples cover them, then
    the share of the next one's words they cover."""
    sentences: dict[int, tuple[str, int]] = {}
    for index, text, n in sent:
        sentences[index] = (text, sentences.get(index, (text, 0))[1] + n)
    budget, heard = int(seconds * rate), []
    for text, n in sentences.values():
        heard += text.split()[: len(text.split()) * min(budget, n) // n]
        budget -= n
        if budget < 0:
            break
    return " ".join(heard)

# transformers' classes per architecture of the Hugging Face families (tests/test_families.py).
HF_ARCHS = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}


def hf_checkpoint(path: str | Path, arch: str, config_edits: dict[str, Any] | None = None, tied: bool = False, seed: int = 0):
    """A tiny random checkpoint written by transformers' own `save_pretrained` (Llama, Qwen2 or Qwen3
    names and config.json), with the project's tiny tokenizer (mask <|mdm_mask|> = 2, EOS 1) and
    `config_edits` made to its config.json (a dLLM family's model_type and block size). Returns
    (directory, the transformers model). Weights as `randomize_` draws them (tied embeddings
    N(0, 0.1^2)); biases N(0, 0.1^2)."""
    import transformers

    path = Path(path)
    vocab = train_tiny_tokenizer(path)
    config_cls, model_cls = (getattr(transformers, name) for name in HF_ARCHS[arch])
    cfg = config_cls(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=24 if arch == "qwen3" else 16, rms_norm_eps=1e-6, max_position_embeddings=256, tie_word_embeddings=tied,
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0}, bos_token_id=0, eos_token_id=1, pad_token_id=1, attn_implementation="eager",
    )
    with torch.random.fork_rng(devices=[]):
        model = model_cls(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("bias"):
                value = 0.1 * torch.randn(p.shape, generator=gen)
            elif p.ndim == 1:
                value = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
            elif "embed_tokens" in name:  # small when tied: else the head finds the last input token and repeats it
                value = torch.randn(p.shape, generator=gen) * (0.1 if tied else 1.0)
            else:
                value = torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5
            p.copy_(value)
    model.eval().requires_grad_(False)
    model.save_pretrained(path)
    if config_edits:
        edit_json(path / "config.json", **config_edits)
    return path, model


class ScriptedSocket:
    """Starlette's WebSocket as a connection uses it: hands out the queued client messages, then the
    client hangs up (or, `silent`, says nothing more); keeps what the server sent and how it closed."""

    def __init__(self, messages: Iterable[str | bytes] = (), silent: bool = False) -> None:
        self.messages, self.silent = list(messages), silent
        self.accepted = False
        self.sent: list[dict] = []
        self.closed: tuple[int, str] | None = None

    async def accept(self) -> None:
        self.accepted = True

    async def send_text(self, text: str) -> None:
        self.sent.append(json.loads(text))

    async def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    async def receive(self) -> dict:
        if not self.messages:
            if self.silent:
                await asyncio.Future()
            return {"type": "websocket.disconnect", "code": 1000}
        m = self.messages.pop(0)
        return {"type": "websocket.receive", **({"bytes": m} if isinstance(m, bytes) else {"text": m})}


class RecordingSession:
    """What a transport calls on its session, recorded: caller audio in `audio`, every other call in `calls`.
    Blank instructions are refused, as the real session refuses bad ones."""

    def __init__(self) -> None:
        self.audio: list[tuple] = []
        self.calls: list[tuple] = []

    async def send_audio(self, samples, rate: int) -> None:  # noqa: ANN001
        self.audio.append((samples, rate))

    async def commit(self, rate: int) -> None:
        self.calls.append(("commit", rate))

    def flush(self) -> None:
        self.calls.append(("flush",))

    def played(self, turn: int, seconds: float) -> None:
        self.calls.append(("played", turn, seconds))

    def update(self, instructions: str | None = None, **live: object) -> None:
        if instructions is not None and not instructions.strip():
            raise ValueError("instructions must not be blank")
        self.calls.append(("update", instructions, live))


async def settle() -> None:
    """Let every ready task run until it waits again (on a manual clock, a queue or a socket)."""
    for _ in range(50):
        await asyncio.sleep(0)


LOUD, QUIET = 0.5, 0.01  # frame levels LoudnessVAD hears as speech and as silence


class LoudnessVAD:
    """A stand-in for Silero: speech probability 0.9 for a loud frame, 0 for a quiet one; notes the
    thread that scored each frame."""

    def __init__(self) -> None:
        self.threads: list[str] = []

    def __call__(self, frame: np.ndarray) -> float:
        import threading

        self.threads.append(threading.current_thread().name)
        return 0.9 if np.abs(frame).max() >= LOUD else 0.0


class StubAgent:
    """The one thing a Hub asks of its agent: sessions (RealtimeSession, recorded), and the voice's sample rate."""

    tts = types.SimpleNamespace(sample_rate=22050)

    def __init__(self) -> None:
        self.sessions: list[RealtimeSession] = []

    @contextlib.asynccontextmanager
    async def session(self):  # noqa: ANN201
        s = RealtimeSession()
        self.sessions.append(s)
        yield s


def stub_hub(**settings: object):  # noqa: ANN201
    """A real `agent.hub.Hub` (slots, connections, limits) over a StubAgent: no models."""
    from agent.hub import Hub, ServerSettings

    return Hub(StubAgent(), ServerSettings(**settings))


class RealtimeSession(RecordingSession):
    """What a Realtime connection reads of its session besides the calls it makes; `events` yields
    what the test puts in `outgoing` (an exception there is raised, as a failing session would)."""

    def __init__(self) -> None:
        from agent.voice_agent import AgentConfig
        from dllm_engine.decoding import SPOKEN

        super().__init__()
        self.instructions = "Be brief."
        self.config = AgentConfig(decode=SPOKEN)  # as an Agent resolves it for its sessions
        decode = types.SimpleNamespace(max_new_tokens=48)
        self.agent = types.SimpleNamespace(model_names=lambda: {"llm": "llm-x", "tts": "tts-y"}, config=types.SimpleNamespace(decode=decode))
        self.outgoing: asyncio.Queue = asyncio.Queue()

    def live_settings(self) -> dict:
        from agent.session import Session

        return Session.live_settings(self)  # it reads only `config`

    async def events(self):  # noqa: ANN201
        while True:
            e = await self.outgoing.get()
            if isinstance(e, Exception):
                raise e
            yield e


# ---- conversations with a voice session -----------------------------------------------------


async def converse(session, audio: np.ndarray, rate: int = 16000, chunk_ms: int = 20, until=ev.TurnMetrics, timeout: float = 60.0) -> list[ev.Event]:
    """Feed `audio` in chunks, then collect events until one of type `until` (or a hang-up) arrives."""
    got: list[ev.Event] = []

    async def collect() -> None:
        async for e in session.events():
            got.append(e)
            if isinstance(e, (until, ev.HangUp)):
                return

    reader = asyncio.create_task(collect())
    step = rate * chunk_ms // 1000
    for i in range(0, len(audio), step):
        await session.send_audio(audio[i : i + step], rate)
        await asyncio.sleep(0)
    try:
        await asyncio.wait_for(reader, timeout)
    except TimeoutError:
        raise AssertionError(f"no {until.__name__} within {timeout} s; got {got}") from None
    return got


def of(events: list[ev.Event], kind: type) -> list:
    return [e for e in events if isinstance(e, kind)]


def utterance(speech: np.ndarray, rate: int = 16000) -> np.ndarray:
    return np.concatenate([silence(0.5, rate), speech, silence(1.2, rate)])
