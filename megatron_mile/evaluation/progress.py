"""One progress line per interval for long token loops: tokens done, share, tokens/s and time left."""

from __future__ import annotations

import time
from typing import Callable


class Progress:
    """Call ``add(tokens)`` as work completes; a line goes to ``log`` at most every ``interval``
    seconds, and when the total is reached."""

    def __init__(self, what: str, total: int, log: Callable[[str], None], interval: float = 10.0) -> None:
        self.what, self.total, self.log, self.interval = what, total, log, interval
        self.done = 0
        self.start = self.last = time.perf_counter()

    def add(self, tokens: int) -> None:
        self.done += tokens
        now = time.perf_counter()
        if now - self.last >= self.interval or self.done == self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            left = (self.total - self.done) / rate if rate else float("inf")
            self.log(f"{self.what}: {self.done:,} / {self.total:,} tokens ({100 * self.done / max(self.total, 1):.1f}%), "
                     f"{rate:,.0f} tokens/s, {left:,.0f} s left")
