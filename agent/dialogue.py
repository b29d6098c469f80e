"""Conversation history rendered with the model's own chat template, within a token budget."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dllm_engine.tokenizer import Tokenizer

if TYPE_CHECKING:
    from dllm_engine.engine import Engine


class Dialogue:
    """User/assistant turns; `prompt()` renders them, dropping the oldest exchanges past the budget."""

    def __init__(self, tokenizer: Tokenizer, system_prompt: str | None = None, max_history_tokens: int = 512) -> None:
        if system_prompt and not tokenizer.has_system_role:
            raise ValueError("this model's chat template has no system role; drop the system prompt")
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.max_history_tokens = max_history_tokens
        self.turns: list[dict[str, str]] = []

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
        return self.tokenizer.apply_chat_template(head + self.turns + list(pending or []), max_tokens=self.max_history_tokens)
