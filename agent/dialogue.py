"""Conversation history rendered with the model's own chat template, within a token budget."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dllm_engine.tokenizer import Tokenizer

if TYPE_CHECKING:
    from dllm_engine.engine import Engine


# Past the budget, the oldest exchanges go until the prompt is down to this share of it, not just
# under it: the next turns then start as this prompt does, so the engine reuses its keys and values
# (a conversation's prefix) for several turns instead of recomputing a shifted history every turn.
TRIM_TO = 0.5


class Dialogue:
    """User/assistant turns; `prompt()` renders them, dropping the oldest exchanges past the budget."""

    def __init__(self, tokenizer: Tokenizer, system_prompt: str | None = None, max_history_tokens: int = 512) -> None:
        if system_prompt and not tokenizer.has_system_role:
            raise ValueError("this model's chat template has no system role; drop the system prompt")
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.max_history_tokens = max_history_tokens
        self.turns: list[dict[str, str]] = []
        self.dropped = 0  # turns[:dropped] no longer fit the budget

    @classmethod
    def for_engine(cls, engine: Engine, system_prompt: str | None, max_history_tokens: int) -> Dialogue:
        """A dialogue whose budget is also the prompt length the model was trained on, where its
        generation_config.json says it: the shipped 8M model saw prompts of <= 48 tokens and after a
        200-token history writes non-words and runs to its cap."""
        return cls(engine.tokenizer, system_prompt, min(max_history_tokens, engine.max_prompt_tokens or max_history_tokens))

    def add(self, role: str, text: str) -> None:
        self.turns.append({"role": role, "content": text.strip()})

    def prompt(self, pending: list[dict[str, str]] | None = None) -> list[int]:
        """Token ids ending in the assistant header; always keeps the last user turn.

        `pending` turns are rendered after the history without joining it (a speculative reply's
        user turn, kept only if the user really finished).
        """
        head = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        pending = list(pending or [])
        render = lambda: self.tokenizer.apply_chat_template(head + self.turns[self.dropped :] + pending)  # noqa: E731
        ids = render()
        if len(ids) > self.max_history_tokens:
            while len(ids) > TRIM_TO * self.max_history_tokens and (left := len(self.turns) - self.dropped) and left + len(pending) > 1:
                self.dropped += min(left, 2 if left + len(pending) > 2 else 1)  # a user/assistant pair at a time
                ids = render()
        return ids
