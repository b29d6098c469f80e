"""The voice agent decoding on a `dllm serve` over loopback (`voice-agent serve --llm-url`)."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from agent import Agent
from agent import events as ev
from dllm_engine.config import ConfigError
from dllm_engine.decoding import DecodeParams
from dllm_engine.engine import Engine
from serving.protocol import tokenizer_fingerprint
from serving.remote import RemoteEngine
from tests.helpers import converse, of, utterance
from tests.servers import WAIT, api_server


@pytest.fixture(scope="module")
def remote(voice_agent, tiny_chat):
    """The voice agent's own engine behind the API, and an Agent whose dLLM is that API."""
    with api_server(voice_agent.engine, tokenizer_fingerprint=tokenizer_fingerprint(tiny_chat / "model")) as (url, api):
        engine = RemoteEngine(url, tiny_chat / "model")
        agent = Agent(dataclasses.replace(voice_agent.config, llm_url=url), engine, voice_agent.asr, voice_agent.tts, voice_agent.vad_session)
        yield agent, api
        agent.asr_pool.shutdown()
        agent.tts_pool.shutdown()


async def test_a_voice_session_on_a_remote_engine_hears_a_reply(remote, piper_speech):
    agent, api = remote
    async with agent.session() as s:
        got = await converse(s, utterance(piper_speech("Hello, how are you today?")))
        done = of(got, ev.ResponseDone)[-1]
        assert done.text.strip() and not done.interrupted and of(got, ev.AgentAudio)
        assert "".join(e.text for e in of(got, ev.AgentText)) == done.text
        again = await converse(s, utterance(piper_speech("What is your name?")))  # the history goes along
        assert of(again, ev.ResponseDone)[-1].text.strip()
        assert [t["role"] for t in s.dialogue.turns] == ["user", "assistant"] * 2
    assert api.in_flight == 0 and agent.model_names()["llm"] == "tiny"


def test_another_tokenizer_is_refused(remote, random_model_dir):
    _, api = remote
    with pytest.raises(ConfigError, match="another tokenizer"):
        RemoteEngine(f"http://127.0.0.1:{api.settings.port}/v1", random_model_dir)


async def test_a_cancelled_reply_frees_the_servers_engine_slot(random_model_dir):
    """Barge-in cancels the reply's task: its HTTP stream closes and the server cancels the request."""
    engine = Engine.from_pretrained(random_model_dir, dtype="float32", max_batch=2)
    try:
        with api_server(engine, tokenizer_fingerprint=tokenizer_fingerprint(random_model_dir)) as (url, api):
            remote = RemoteEngine(url, random_model_dir)
            params = DecodeParams(block_size=4, threshold=1.0, max_new_tokens=900)  # random weights: minutes of decoding

            async def reply() -> None:
                async for _ in remote.stream([{"role": "user", "content": "hi"}], params, conversation="c"):
                    pass

            task = asyncio.create_task(reply())
            await until(lambda: engine.active_requests == 1, "the request did not start")
            task.cancel()
            await until(lambda: engine.active_requests == 0 and api.in_flight == 0, "the engine slot was not freed")
    finally:
        engine.close()


async def until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)
