"""The engine behind the OpenAI-compatible API (`dllm serve`), driven by the official `openai` client
against a real server on loopback."""

from __future__ import annotations

import json
import time
import urllib.request

import openai
import pytest

from dllm_engine.decoding import DecodeParams
from dllm_engine.engine import Engine
from tests.servers import WAIT, api_server

QUESTION, ANSWER = "hello, how are you?", "I am fine, thank you."
KNOBS = {"block_size": 32, "threshold": 0.9, "policy": "threshold", "cache": "dual"}


@pytest.fixture(scope="module")
def chat_engine(tiny_chat):
    engine = Engine.from_pretrained(tiny_chat / "model", dtype="float32", max_batch=4)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def chat_api(chat_engine):
    with api_server(chat_engine, decode=DecodeParams(block_size=32, max_new_tokens=32)) as (url, api):
        yield url, api


def client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=WAIT)


def test_chat_streamed_and_not_with_the_openai_client(chat_api):
    url, api = chat_api
    c = client(url)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    messages = [{"role": "user", "content": QUESTION}]
    whole = c.chat.completions.create(model="tiny", messages=messages, max_tokens=32, temperature=0, extra_body=KNOBS)
    assert whole.choices[0].message.content == ANSWER and whole.choices[0].finish_reason == "stop"
    assert whole.usage.completion_tokens > 0 and whole.usage.prompt_tokens > 0

    chunks = list(c.chat.completions.create(model="tiny", messages=messages, stream=True, stream_options={"include_usage": True}, extra_body={"conversation": "c1"}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == ANSWER
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    # The legacy endpoint takes the prompt as token ids: the chat template rendered by the client.
    ids = api.engine.tokenizer.apply_chat_template(messages)
    assert c.completions.create(model="tiny", prompt=ids, max_tokens=32).choices[0].text == ANSWER
    assert "".join(ch.choices[0].text for ch in c.completions.create(model="tiny", prompt=ids, stream=True)) == ANSWER
    assert api.in_flight == 0 and api.engine.active_requests == 0


@pytest.mark.parametrize("extra, param", [
    ({"threshold": 2}, "threshold"),
    ({"block_size": "big"}, "block_size"),
    ({"policy": "random"}, "policy"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": -1}, "temperature"),
    ({"n": 2}, "n"),
    ({"tools": []}, "tools"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"max_tokens": 1000}, "messages"),  # past the model's context
])
def test_bad_requests_get_openai_shaped_400s(chat_api, extra, param):
    url, _ = chat_api
    body = {"model": "tiny", "messages": [{"role": "user", "content": QUESTION}]}
    messages = extra.pop("messages", body["messages"])
    with pytest.raises(openai.BadRequestError) as e:
        client(url).chat.completions.create(**{**body, "messages": messages}, extra_body=extra)
    err = e.value.body
    assert e.value.status_code == 400 and err["type"] == "invalid_request_error" and err["param"] == param and err["message"]


def test_unknown_model_bad_json_and_wrong_route(chat_api):
    url, _ = chat_api
    with pytest.raises(openai.NotFoundError) as e:
        client(url).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found"
    req = urllib.request.Request(url + "/chat/completions", data=b"{not json", headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as h:
        urllib.request.urlopen(req, timeout=WAIT)
    assert h.value.code == 400 and json.load(h.value)["error"]["type"] == "invalid_request_error"


@pytest.fixture(scope="module")
def babbler(random_model_dir):
    """Random weights: replies run to the canvas one token a step, far longer than a test waits."""
    engine = Engine.from_pretrained(random_model_dir, dtype="float32", max_batch=2)
    yield engine
    engine.close()


LONG = {"max_tokens": 900, "extra_body": {"block_size": 4, "threshold": 1.0}}


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_a_client_that_leaves_mid_stream_frees_its_engine_slot(babbler):
    cancelled = []
    cancel = babbler.cancel
    babbler.cancel = lambda rid: cancelled.append(rid) or cancel(rid)  # engine.stream cancels what it leaves unfinished
    try:
        with api_server(babbler) as (url, api):
            stream = client(url).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], stream=True, **LONG)
            next(iter(stream))  # the first chunk is sent once the engine has taken the request
            assert babbler.active_requests == 1
            stream.close()
            wait_for(lambda: babbler.active_requests == 0 and api.in_flight == 0, "the engine slot was not freed")
            assert len(cancelled) == 1 and cancelled[0].startswith("chatcmpl-")
    finally:
        del babbler.cancel


def test_token_and_request_limit(babbler):
    with api_server(babbler, token="s3cret", max_requests=1) as (url, api):
        with pytest.raises(openai.AuthenticationError) as e:
            client(url, "wrong").models.list()
        assert e.value.body["code"] == "invalid_api_key"
        c = client(url, "s3cret")
        stream = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], stream=True, **LONG)
        next(iter(stream))
        with pytest.raises(openai.RateLimitError) as e:  # the one request slot is taken
            c.completions.create(model="tiny", prompt="hi", max_tokens=4)
        assert e.value.body["type"] == "rate_limit_error"
        stream.close()
        wait_for(lambda: api.in_flight == 0, "the request slot was not released")
        assert c.completions.create(model="tiny", prompt="hi", max_tokens=4).choices[0].finish_reason == "length"


def test_dllm_serve_off_loopback_needs_a_token(monkeypatch):
    from cli.dllm import main

    monkeypatch.delenv("DLLM_API_TOKEN", raising=False)
    with pytest.raises(SystemExit, match="--token"):
        main(["serve", "--host", "0.0.0.0"])


@pytest.mark.parametrize("flags, shared", [([], True), (["--own-prefixes"], False)])
def test_serve_shares_exact_prefixes_between_conversations_unless_told_not_to(flags, shared):
    """`dllm serve` on the shipped (turn-blocks, exact) model: /v1/models says whether one conversation may
    load another's matching prefix, and --own-prefixes turns that off."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "cli.dllm", "serve", "--port", str(port), *flags],
                            cwd=Path(__file__).parent.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 3 * WAIT
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() is not None else "no /v1/models"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as r:
                    card = json.load(r)["data"][0]["dllm"]
                break
            except OSError:
                time.sleep(0.2)
        assert card["exact_prefix_reuse"] is True and card["shared_prefixes"] is shared
    finally:
        proc.terminate()
        proc.wait(30)
