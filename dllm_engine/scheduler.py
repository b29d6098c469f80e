"""Admission and batching: which requests share the next denoising step, and in which KV-cache slot.

The engine thread asks the scheduler, between steps, to drop cancelled requests and to admit
waiting ones into free slots; every running request then takes part in the next step, so requests
join and leave at their own block boundaries while sharing forwards with the others.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, Protocol, TypeVar

from .decoding import Sequence


class Scheduled(Protocol):
    """What the scheduler needs of a request: its decoding state and whether it was cancelled."""

    seq: Sequence
    cancelled: bool


R = TypeVar("R", bound=Scheduled)


class Scheduler(Generic[R]):
    """Waiting requests in arrival order, running ones in their slots; `max_batch` slots in all."""

    def __init__(self, max_batch: int) -> None:
        self.waiting: deque[R] = deque()
        self.running: list[R] = []
        self._free_slots = list(range(max_batch))

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting

    def add(self, req: R) -> None:
        self.waiting.append(req)

    def take_cancelled(self) -> list[R]:
        """Remove the cancelled requests, waiting or running; their slots stay theirs until `free`."""
        gone = [r for r in (*self.waiting, *self.running) if r.cancelled]
        for req in gone:
            self.remove(req)
        return gone

    def admit(self) -> list[R]:
        """Move waiting requests into free slots (lowest first), oldest first; returns them."""
        admitted = []
        while self.waiting and self._free_slots:
            req = self.waiting.popleft()
            req.seq.slot = self._free_slots.pop(0)
            self.running.append(req)
            admitted.append(req)
        return admitted

    def take_running(self) -> list[R]:
        """Remove every running request (their step failed); their slots stay theirs until `free`."""
        gone, self.running = self.running, []
        return gone

    def remove(self, req: R) -> None:
        """Take a request out of the queue it is in (a finished or cancelled one)."""
        (self.waiting if req in self.waiting else self.running).remove(req)

    def free(self, req: R) -> None:
        """Give a removed request's slot back, once what the engine keeps of it was copied out."""
        if req.seq.slot is not None:
            self._free_slots.append(req.seq.slot)
            self._free_slots.sort()
            req.seq.slot = None
