"""What server and client of the API agree on: OpenAI-shaped errors, request fields, the tokenizer check."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import math
from pathlib import Path
from typing import Any

from dllm_engine.decoding import DecodeParams

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
# Request fields each endpoint takes besides its prompt; the decoding knobs and `conversation` are ours.
COMMON_FIELDS = {"model", "stream", "stream_options", "max_tokens", "temperature", "seed", "n", "user"}
KNOBS = ("threshold", "factor", "block_size", "policy", "cache")
EXTRA_FIELDS = {*KNOBS, "conversation"}


class ApiError(Exception):
    """A refusal in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def tokenizer_fingerprint(model_dir: str | Path) -> str:
    """A digest of the tokenizer and chat template: a client that renders prompts itself must have the same."""
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = Path(model_dir) / name
        if path.exists():
            h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


@dataclasses.dataclass
class Job:
    """One parsed request: what to decode and how to answer."""

    prompt: str | list[int] | list[dict[str, str]]
    params: DecodeParams
    stream: bool
    include_usage: bool
    conversation: str | None


def _number(body: dict, name: str, integer: bool = False) -> int | float | None:
    value = body.get(name)
    if value is None:
        return None
    ok = isinstance(value, int) if integer else isinstance(value, int | float) and math.isfinite(value)
    if not ok or isinstance(value, bool):
        raise ApiError(400, f"'{name}' must be {'an integer' if integer else 'a finite number'}, got {value!r}", name)
    return value


def parse_job(body: object, prompt_field: str, base: DecodeParams) -> Job:
    """Check a request body field by field (each error names its field) and build the Job."""
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    for name in body:
        if name not in COMMON_FIELDS | EXTRA_FIELDS | {prompt_field}:
            raise ApiError(400, f"unrecognized request argument supplied: {name}", name, "unknown_parameter")
    if prompt_field not in body:
        raise ApiError(400, f"'{prompt_field}' is required", prompt_field, "missing_required_parameter")
    prompt = body[prompt_field]
    if _number(body, "n", integer=True) not in (None, 1):
        raise ApiError(400, "only n=1 is supported", "n")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be a boolean", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise ApiError(400, "'stream_options' must be an object such as {\"include_usage\": true}", "stream_options")
    conversation = body.get("conversation")
    if conversation is not None and not (isinstance(conversation, str) and 0 < len(conversation) <= 200):
        raise ApiError(400, "'conversation' must be a string of 1 to 200 characters", "conversation")
    changes: dict[str, Any] = {
        "max_new_tokens": _number(body, "max_tokens", integer=True),
        "temperature": _number(body, "temperature"),
        "seed": _number(body, "seed", integer=True),
        "threshold": _number(body, "threshold"),
        "factor": _number(body, "factor"),
        "block_size": _number(body, "block_size", integer=True),
        "policy": body.get("policy"),
        "cache": body.get("cache"),
    }
    params = base
    for name, value in changes.items():
        if value is not None:
            try:  # one field at a time, so that the error names it
                params = dataclasses.replace(params, **{name: value})
            except (ValueError, TypeError) as e:
                raise ApiError(400, str(e), "max_tokens" if name == "max_new_tokens" else name) from None
    return Job(prompt, params, stream, options.get("include_usage", False), conversation)


def chat_messages(messages: object) -> list[dict[str, str]]:
    """OpenAI chat messages as the engine takes them: role and plain-text content (text parts joined)."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty array", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{i}] must be an object with role system, user or assistant", f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string or an array of text parts", f"messages[{i}].content")
        out.append({"role": m["role"], "content": content})
    return out


def completion_prompt(prompt: object) -> str | list[int]:
    """A completion prompt: one string, or one list of token ids (as OpenAI's legacy endpoint takes them)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    raise ApiError(400, "'prompt' must be a non-empty string or a non-empty array of token ids", "prompt")


def bearer_matches(header: str | None, token: str) -> bool:
    """`Authorization: Bearer TOKEN`, compared in constant time."""
    scheme, _, given = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())
