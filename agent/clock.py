"""The wall clock, as one small object that can be swapped: the rules that follow real time
(the echo guard, 'still playing', real-time pacing) read it here, so a test can drive them with
a clock it controls instead of waiting for the machine's."""

from __future__ import annotations

import asyncio
import time


class Clock:
    """Monotonic seconds and a sleep measured on them."""

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


SYSTEM = Clock()
