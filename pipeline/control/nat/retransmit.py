"""One request, sent again until answered, on a doubling timer. Pure."""

from __future__ import annotations

import msgspec


class Retransmission(msgspec.Struct):
    """``payload`` sent at ``next_at`` and again after ``rto_s``, ``2·rto_s``, ``4·rto_s``, ...:
    ``tries`` sends in all; it gives up one more doubled interval after the last (RFC 8489
    section 6.2.1's schedule, with fewer tries). With rto 0.5 s and 4 tries: sends at 0,
    0.5, 1.5 and 3.5 s, given up at 7.5 s."""

    payload: bytes
    rto_s: float
    tries: int
    next_at: float
    sent: int = 0
    first_sent_at: float | None = None

    def due(self, now: float) -> bool:
        return now >= self.next_at

    @property
    def exhausted(self) -> bool:
        """True once every try was sent; past ``next_at`` it has then given up."""
        return self.sent >= self.tries

    def fire(self, now: float) -> bytes | None:
        """The payload to send now, or None if it has given up (call only when due)."""
        if self.exhausted:
            return None
        self.sent += 1
        if self.first_sent_at is None:
            self.first_sent_at = now
        self.next_at = now + self.rto_s * 2 ** (self.sent - 1)
        return self.payload
