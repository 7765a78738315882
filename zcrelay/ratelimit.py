"""--rate-limit: a pacer that keeps splice and caps throughput (policy layer).

Throughput is capped without copying: each splice or sendfile call is bounded to `chunk` bytes
(about a tenth of a second's worth) and the loop sleeps after a call that got ahead of the rate.
The mover's loops call `spent(n)` after every call (zcrelay.direct.Pacer).
"""

from __future__ import annotations

from zcrelay import waits

# How far ahead of the rate a stream may run before it sleeps: one chunk's worth of time, so a
# short burst after an idle spell is allowed but the average over any second stays at the rate.
_SLICE = 0.1
_MIN_CHUNK = 4096
_MAX_CHUNK = 1 << 20


class RateLimit:
    """Bytes per second for one direction of one stream."""

    def __init__(self, rate: int) -> None:
        if rate <= 0:
            raise ValueError("a rate limit must be positive")
        self.rate = rate
        self.chunk = max(_MIN_CHUNK, min(int(rate * _SLICE), _MAX_CHUNK))
        self._due: float | None = None  # when the bytes spent so far are paid for

    async def spent(self, n: int) -> None:
        now = waits.current_time()
        if self._due is None or self._due < now - _SLICE:
            self._due = now  # idle: no credit beyond one slice
        self._due += n / self.rate
        if self._due > now:
            await waits.sleep_until(self._due)
        else:
            await waits.checkpoint()
