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
# Instructions (the system prompt) may take this share of the budget; the rest is the conversation's.
INSTRUCTIONS_SHARE = 0.5


def renders_system(tokenizer: Tokenizer) -> bool:
    """Whether the chat template puts a system turn into the prompt: some name the role, some render
    any role, some refuse it (an exception), so the answer comes from rendering one."""
    probe = "instructions-probe"
    try:
        return probe in tokenizer.render_chat([{"role": "system", "content": probe}, {"role": "user", "content": "hi"}])
    except Exception:  # noqa: BLE001 (no template, or one that raises on a system turn)
        return False


class Dialogue:
    """User/assistant turns; `prompt()` renders them, dropping the oldest exchanges past the budget."""

    def __init__(self, tokenizer: Tokenizer, system_prompt: str | None = None, max_history_tokens: int = 512) -> None:
        self.tokenizer = tokenizer
        self.max_history_tokens = max_history_tokens
        self.system_prompt = self.check_system_prompt(system_prompt or "")
        self.turns: list[dict[str, str]] = []
        self.dropped = 0  # turns[:dropped] no longer fit the budget

    @classmethod
    def for_engine(cls, engine: Engine, system_prompt: str | None, max_history_tokens: int) -> Dialogue:
        """A dialogue whose budget is also the prompt length the model was trained on, where its
        generation_config.json says it: the shipped 8M model saw prompts of <= 48 tokens and after a
        200-token history writes non-words and runs to its cap."""
        return cls(engine.tokenizer, system_prompt, min(max_history_tokens, engine.max_prompt_tokens or max_history_tokens))

    def check_system_prompt(self, text: object) -> str | None:
        """`text` as this dialogue's system prompt (None for ''); ValueError if the model cannot take it.

        Bounded so that the instructions never crowd the conversation out of the prompt budget."""
        if not isinstance(text, str):
            raise ValueError("instructions must be a string")
        text = text.strip()
        if not text:
            return None
        if not renders_system(self.tokenizer):
            raise ValueError("this model's chat template has no system role: it cannot take instructions")
        tokens, limit = len(self.tokenizer.encode(text)), int(INSTRUCTIONS_SHARE * self.max_history_tokens)
        if tokens > limit:
            raise ValueError(f"instructions must fit in {limit} tokens (half this model's prompt budget), got {tokens}")
        return text

    def add(self, role: str, text: str) -> dict[str, str]:
        """Append a turn; the entry returned is the handle to `remove` it by."""
        self.turns.append({"role": role, "content": text.strip()})
        return self.turns[-1]

    def remove(self, entry: dict[str, str] | None) -> None:
        """Take out the turn `add` returned (by identity: two turns may say the same)."""
        i = next((i for i, t in enumerate(self.turns) if t is entry), None)
        if i is not None:
            del self.turns[i]
            if i < self.dropped:
                self.dropped -= 1

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
