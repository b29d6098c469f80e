"""Cross-turn prefix reuse: each conversation's settled keys and values, kept between its requests.

When a request that names a `conversation` finishes, the keys and values of its settled positions
are copied out of its KV-cache slot (`Prefix.of_sequence`); the next request of that conversation
loads the longest common token prefix back into its own slot (`Prefix.load_into`) instead of
recomputing it. For a `turn_blocks` model this is exact: only the previous prompt's whole turns
are kept, whose keys never saw anything after them; for a token-causal prompt (`causal_prompt`, an
AR checkpoint converted) too: the previous prompt is kept, every position of which saw only those
before it, and the reply as well where it was decoded token-causally. Being exact, such keys serve
any conversation whose prompt starts with the same tokens, so a request may take another
conversation's longer prefix (`PrefixCache.longest`): a call's first turn reuses the system prompt
of those before it. For any other model it is an approximation (their keys saw the rest of the
prompt, or the canvas; see decoding.py), so callers ask for it only when they accept that.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping

import torch

from .decoding import Sequence
from .model import KVCache


class Prefix:
    """A conversation's cached prefix: token ids and their keys/values (per layer). `turn_ends`
    (a turn-blocks model's): the positions after each of its turns, the only places a reused prefix
    may end, since a turn's keys are the same in every prompt that repeats it up to its end."""

    def __init__(self, ids: list[int], k: list[torch.Tensor], v: list[torch.Tensor], turn_ends: list[int] | None = None) -> None:
        self.ids, self.k, self.v, self.turn_ends = ids, k, v, turn_ends

    @classmethod
    def of_sequence(cls, seq: Sequence, cache: KVCache, end_of_turn: int | None, prompt_only: bool = False) -> "Prefix":
        """What a finished sequence leaves for its conversation's next request: its settled
        positions, or with `end_of_turn` (a turn-blocks model) only its prompt's whole turns, or with
        `prompt_only` (a token-causal prompt) its prompt, unless its reply was decoded token-causally
        too (`Sequence.token_causal`: one token a block, or verify): a reply decoded in larger blocks
        than the next prompt will put it in has other keys there."""
        ids = seq.ids[: seq.prompt_len if prompt_only and not seq.token_causal else seq.settled].tolist()
        turn_ends = None
        if end_of_turn is not None:
            turn_ends = [i + 1 for i, t in enumerate(ids[: seq.prompt_len]) if t == end_of_turn]
            ids = ids[: max(turn_ends, default=0)]
        return cls(ids, *cache.save(seq.slot, len(ids)), turn_ends)

    def reusable(self, ids: list[int]) -> int:
        """How many leading positions of a prompt with these ids may take the cached keys."""
        n = 0
        for a, b in zip(self.ids, ids):
            if a != b:
                break
            n += 1
        if self.turn_ends is None:
            return n
        return max((e for e in self.turn_ends if e <= n), default=0)

    def load_into(self, seq: Sequence, cache: KVCache) -> None:
        """Give a newly admitted sequence the keys of the prompt positions it shares with this prefix."""
        seq.reused = self.reusable(seq.ids[: seq.prompt_len].tolist())
        cache.load(seq.slot, self.k, self.v, seq.reused)


class PrefixCache(Mapping[str, Prefix]):
    """Prefixes by conversation, at most `capacity`, the least recently stored dropped first.

    Not locked itself: the engine changes it under the same lock as its request table, so that a
    conversation forgotten while one of its requests runs is not stored again when that one ends."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._prefixes: OrderedDict[str, Prefix] = OrderedDict()  # least recent first

    def __getitem__(self, conversation: str) -> Prefix:
        return self._prefixes[conversation]

    def __iter__(self) -> Iterator[str]:
        return iter(self._prefixes)

    def __len__(self) -> int:
        return len(self._prefixes)

    def put(self, conversation: str, prefix: Prefix) -> None:
        self._prefixes[conversation] = prefix
        self._prefixes.move_to_end(conversation)
        while len(self._prefixes) > self.capacity:
            self._prefixes.popitem(last=False)

    def forget(self, conversation: str) -> None:
        self._prefixes.pop(conversation, None)

    def longest(self, ids: list[int], conversation: str) -> Prefix | None:
        """The prefix that serves most of a prompt with these ids: the conversation's own, unless
        another's serves more (for a model whose keys depend only on the tokens before them, keys
        are keys: one call's system prompt is every call's)."""
        best = self._prefixes.get(conversation)
        n = best.reusable(ids) if best is not None else 0
        for prefix in self._prefixes.values():
            if (m := prefix.reusable(ids)) > n:
                best, n = prefix, m
        return best
