"""Tokenizer, chat template and special token ids, read from a Hugging Face-layout directory.

Uses the `tokenizers` library and a sandboxed Jinja environment (as transformers does) rather than
transformers' tokenizer classes: it loads in milliseconds and behaves the same for LLaDA's files
and the project's own.
"""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path
from typing import Any, Iterable

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from .config import ConfigError, LLaDAConfig, read_json

# Token strings tried, in order, when the config does not name an id.
MASK_TOKENS = ("<|mdm_mask|>", "<|mask|>", "[MASK]", "<mask>", "|<MASK>|", "<|MASK|>")  # LLaDA, Dream, ..., Fast-dLLM v2, SDAR
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|im_end|>", "<end_of_turn>", "<|end_of_turn|>")


def _token_str(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as strings or AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    mask: int
    eos: int
    pad: int
    bos: int | None
    end_of_turn: int | None
    extra_eos: tuple[int, ...] = ()  # the rest of a list-valued eos_token_id in config.json

    @property
    def stop(self) -> frozenset[int]:
        """Tokens after which nothing more belongs to the reply."""
        return frozenset(t for t in (self.eos, self.end_of_turn, *self.extra_eos) if t is not None)


class Tokenizer:
    def __init__(self, directory: str | Path, config: LLaDAConfig) -> None:
        directory = Path(directory)
        path = directory / "tokenizer.json"
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on missing/corrupt files
            raise ConfigError(f"cannot load tokenizer {path}: {e}") from None
        tc_path = directory / "tokenizer_config.json"
        tc: dict[str, Any] = read_json(tc_path) if tc_path.exists() else {}
        self.bos_token = _token_str(tc.get("bos_token"))
        self.eos_token = _token_str(tc.get("eos_token"))
        # Newer HF checkpoints keep the template in its own file, which then wins (as in transformers).
        jinja_path = directory / "chat_template.jinja"
        template = jinja_path.read_text() if jinja_path.exists() else tc.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self.chat_template: str | None = template
        self._compiled = _jinja().from_string(template) if template else None
        self._check_vocab(config)
        self.special = self._resolve_special(config, generation_eos(directory))

    def _check_vocab(self, cfg: LLaDAConfig) -> None:
        """Ids past the embedding table would fail deep inside a forward (or index out of bounds on GPU)."""
        n_ids = max(self._tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        if n_ids > cfg.embedding_size:
            raise ConfigError(f"tokenizer has token ids up to {n_ids - 1} ({n_ids} ids) but the model's embedding has only {cfg.embedding_size} rows")

    def _resolve_special(self, cfg: LLaDAConfig, more_eos: list[int]) -> SpecialTokens:
        def tid(token: str | None) -> int | None:
            return None if token is None else self._tok.token_to_id(token)

        def first(tokens: Iterable[str]) -> int | None:
            return next((i for i in map(tid, tokens) if i is not None), None)

        mask = cfg.mask_token_id if cfg.mask_token_id is not None else first(MASK_TOKENS)
        eos_ids = cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id]
        eos = eos_ids[0] if eos_ids[0] is not None else tid(self.eos_token)
        if mask is None:
            raise ConfigError(f"no mask token: set mask_token_id in config.json or add one of {MASK_TOKENS}")
        if eos is None:
            raise ConfigError("no EOS token: set eos_token_id in config.json or eos_token in tokenizer_config.json")
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else eos
        bos = cfg.bos_token_id if cfg.bos_token_id is not None else tid(self.bos_token)
        extra_eos = tuple(dict.fromkeys(t for t in eos_ids[1:] + more_eos if t != eos))
        for name, value in (("mask", mask), ("eos", eos), ("pad", pad), *(("eos", t) for t in extra_eos)):
            if not 0 <= value < cfg.vocab_size:
                raise ConfigError(f"{name} token id {value} is outside the vocabulary of {cfg.vocab_size}")
        end_of_turn = cfg.end_of_turn_token_id if cfg.end_of_turn_token_id is not None else first(END_OF_TURN_TOKENS)
        if end_of_turn is not None and not 0 <= end_of_turn < cfg.vocab_size:
            raise ConfigError(f"end-of-turn token id {end_of_turn} is outside the vocabulary of {cfg.vocab_size}")
        if cfg.turn_blocks and end_of_turn is None:
            raise ConfigError(f"turn_blocks: no end-of-turn token to end the prompt's blocks (set end_of_turn_token_id in config.json or add one of {END_OF_TURN_TOKENS})")
        return SpecialTokens(mask=mask, eos=eos, pad=pad, bos=bos, end_of_turn=end_of_turn, extra_eos=extra_eos)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @property
    def has_system_role(self) -> bool:
        return bool(self.chat_template) and "system" in self.chat_template

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if self._compiled is None:
            raise ConfigError("this model has no chat template (tokenizer_config.json or chat_template.jinja)")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"a chat message must be {{'role': str, 'content': str}}, got {m!r}")
        try:
            return self._compiled.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except TemplateError as e:
            raise ValueError(f"chat template rejected the conversation: {e}") from None

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True, max_tokens: int | None = None) -> list[int]:
        """With `max_tokens`, the oldest turns after a leading system message are dropped, a
        user/assistant pair at a time, until the rendering fits; the last turn always stays."""
        head = messages[:1] if messages and messages[0].get("role") == "system" else []
        turns = messages[len(head):]
        while True:
            ids = self.encode(self.render_chat(head + turns, add_generation_prompt))
            if max_tokens is None or len(ids) <= max_tokens or len(turns) <= 1:
                return ids
            turns = turns[2:] if len(turns) > 2 else turns[1:]


def generation_eos(directory: Path) -> list[int]:
    """The ids generation_config.json stops at: an instruct checkpoint may list its end of turn
    there (Qwen2.5-Instruct: `<|im_end|>` and `<|endoftext|>`) and only one in config.json."""
    path = directory / "generation_config.json"
    value = read_json(path).get("eos_token_id") if path.exists() else None
    ids = value if isinstance(value, list) else [] if value is None else [value]
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise ConfigError(f"{path}: eos_token_id must be an id or a list of ids, got {value!r}")
    return ids


def _raise(message: str) -> None:
    raise TemplateError(message)


def _jinja() -> ImmutableSandboxedEnvironment:
    # As transformers renders templates: Qwen3's uses {% break %} and some templates the date.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env


class IncrementalDetokenizer:
    """Turns a growing token list into text deltas that never split a UTF-8 character.

    Byte-level BPE can end a token in the middle of a multi-byte character; the decoded text then
    ends in U+FFFD until the next token completes it, so such text is held back.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def push(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        text = self._tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        delta, self.text = text[len(self.text) :], text
        return delta

    def flush(self) -> str:
        """Whatever was held back, once no more tokens will come."""
        text = self._tokenizer.decode(self.ids)
        delta, self.text = text[len(self.text) :], text
        return delta
