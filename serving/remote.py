"""The engine surface the voice agent uses (`stream`, `generate`, `tokenizer`, `forget`, ...), served by
a `dllm serve` elsewhere: `voice-agent serve --llm-url URL`.

The agent renders its prompts itself, with the model's tokenizer and chat template from a local copy
of the model directory (only its tokenizer and config files are read), exactly as it does in process:
its history budget counts real tokens, and the engine gets the same token ids, so cross-turn prefix
reuse stays exact. The ids go to `POST /v1/completions` (OpenAI's legacy endpoint takes a prompt as
token ids); at connect the server's tokenizer fingerprint must match the local one. Leaving a
`stream` early (barge-in) closes its HTTP connection, which cancels the request on the server.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2

from dllm_engine.config import ConfigError, LLaDAConfig
from dllm_engine.decoding import DecodeParams, Output
from dllm_engine.engine import Prompt, RequestError, joined
from dllm_engine.tokenizer import Tokenizer

from .protocol import KNOBS, tokenizer_fingerprint

CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0  # between two chunks of one reply: longer means the server is stuck


class RemoteEngine:
    """An OpenAI-compatible dLLM server, seen as an in-process Engine (no denoising-step events)."""

    def __init__(self, url: str, model_dir: str | Path, token: str | None = None) -> None:
        """Check the server and that it renders prompts as `model_dir`'s tokenizer does (sync: at start-up)."""
        self.url = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        model_dir = Path(model_dir)
        self.tokenizer = Tokenizer(model_dir, LLaDAConfig.from_file(model_dir / "config.json"))
        try:
            r = httpx2.get(f"{self.url}/models", headers=self._headers, timeout=CONNECT_TIMEOUT_S)
        except httpx2.HTTPError as e:
            raise ConfigError(f"cannot reach the engine at {self.url}: {e}") from None
        if r.status_code != 200:
            raise ConfigError(f"the engine at {self.url} refused /models: {r.status_code} {_message(r.text)}")
        card = r.json()["data"][0]
        info: dict[str, Any] = card.get("dllm") or {}
        if info.get("tokenizer_sha256") != tokenizer_fingerprint(model_dir):
            raise ConfigError(f"the engine at {self.url} serves {card['id']!r} with another tokenizer or chat template than {model_dir}: "
                              "point --model at a copy of the served model directory")
        self.model_name: str = card["id"]
        self.max_new_tokens: int | None = info.get("max_new_tokens")
        self.max_prompt_tokens: int | None = info.get("max_prompt_tokens")
        self.exact_prefix_reuse: bool = bool(info.get("exact_prefix_reuse"))
        # Conversation names are this process's own: several voice servers share one engine.
        self._namespace = secrets.token_hex(6)

    def _ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
            return self.tokenizer.apply_chat_template(prompt)
        return list(prompt)

    async def stream(self, prompt: Prompt, params: DecodeParams | None = None, request_id: str | None = None,
                     step_events: bool = False, conversation: str | None = None) -> AsyncIterator[Output]:
        """As Engine.stream; `request_id` names the request only here (the server picks its own)."""
        params = (params or DecodeParams()).resolved(self.max_new_tokens)
        body = {"model": self.model_name, "prompt": self._ids(prompt), "stream": True, "stream_options": {"include_usage": True},
                "max_tokens": params.max_new_tokens, "temperature": params.temperature, **{k: getattr(params, k) for k in KNOBS}}
        if params.seed is not None:
            body["seed"] = params.seed
        if conversation is not None:
            body["conversation"] = f"{self._namespace}-{conversation}"
        rid = request_id or "remote"
        timeout = httpx2.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
        # A client per request: leaving the loop closes its connection, and the server cancels the request.
        async with httpx2.AsyncClient(timeout=timeout, headers=self._headers) as client:
            try:
                async with client.stream("POST", f"{self.url}/completions", json=body) as r:
                    if r.status_code != 200:
                        raise RequestError(f"the engine refused the request: {r.status_code} {_message((await r.aread()).decode())}")
                    finish: str | None = None
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            raise RequestError(chunk["error"].get("message", "engine error"))
                        for choice in chunk.get("choices", []):
                            finish = choice.get("finish_reason") or finish
                            if choice.get("text"):
                                yield Output(rid, text=choice["text"])
                    if finish is None:
                        raise RequestError("the engine's stream ended without a finish reason")
                    yield Output(rid, finished=True, finish_reason=finish)
            except httpx2.HTTPError as e:
                raise RequestError(f"the engine at {self.url} failed: {type(e).__name__}: {e}") from None

    async def generate(self, prompt: Prompt, params: DecodeParams | None = None, request_id: str | None = None,
                       conversation: str | None = None) -> tuple[str, Output]:
        return await joined(self.stream(prompt, params, request_id, conversation=conversation))

    def forget(self, conversation: str) -> None:
        """Nothing to do: the server keeps a bounded set of conversations and drops the oldest."""

    def close(self) -> None:
        """Nothing held between requests."""


def _message(text: str) -> str:
    try:
        return json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return text[:200]
