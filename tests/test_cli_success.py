"""The success paths of the two interactive commands, in process on the shipped model:
`dllm generate --show-steps` prints every denoising step of what it streams, and `voice-agent chat`
keeps a conversation (each reply is decoded after the turns before it)."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import re

from cli.dllm import main as dllm_main
from cli.voice_agent import main as agent_main
from dllm_engine.decoding import SPOKEN
from dllm_engine.engine import Engine
from dllm_engine.options import default_model_path

STEP = re.compile(r"\[block (\d+) step (\d+): \+(\d+), (\d+) masked\]")


def test_generate_show_steps_prints_each_step_of_the_reply(capsys):
    dllm_main(["generate", "--show-steps", "--block-size", "4", "--max-new-tokens", "16", "Hi, how are you?"])
    out = capsys.readouterr()
    steps = [tuple(map(int, m)) for m in STEP.findall(out.err)]
    assert steps, out.err
    for (block, step, added, left), nxt in zip(steps, steps[1:] + [None]):
        assert 1 <= added <= 4 and 0 <= left < 4
        if nxt is not None and nxt[0] == block:  # within a block: steps count up, masks count down
            assert nxt[1] == step + 1 and nxt[3] == left - nxt[2]
        elif nxt is not None:  # a new block starts only when the last one has no mask left
            assert left == 0 and nxt[0] == block + 1 and nxt[1] == 0
    assert [s[1] for s in steps if s[0] == 0][0] == 0
    assert re.search(r"\d+ tokens in \d+ ms .* \d+ forwards", out.err)
    # what was streamed between the step lines is the reply the engine gives for that prompt
    text = STEP.sub("", out.out).replace("\n", "").strip()
    assert text == reply_to([{"role": "user", "content": "Hi, how are you?"}], 16).replace("\n", "") and text


def test_chat_keeps_the_conversation(monkeypatch, capsys):
    """Two turns, then /quit: the second reply is the engine's reply to the whole conversation so far."""
    turns = ["I just got a new puppy!", "What should I name him?"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(turns) + "\n/quit\n"))
    agent_main(["chat", "--max-new-tokens", "24"])
    out = capsys.readouterr()
    replies = [r.strip() for r in re.findall(r"agent> (.*)", out.out)]
    assert len(replies) == 2 and all(replies), out.out
    assert "model loaded" in out.err
    history = [{"role": "user", "content": turns[0]}, {"role": "assistant", "content": replies[0]}, {"role": "user", "content": turns[1]}]
    assert replies[1] == reply_to(history, 24)
    assert reply_to(history[:1], 24) == replies[0]


def reply_to(messages: list[dict[str, str]], max_new_tokens: int) -> str:
    engine = Engine.from_pretrained(default_model_path(), max_batch=1)
    try:
        text, _ = asyncio.run(engine.generate(engine.tokenizer.apply_chat_template(messages), dataclasses.replace(SPOKEN, max_new_tokens=max_new_tokens)))
    finally:
        engine.close()
    return text.strip()
