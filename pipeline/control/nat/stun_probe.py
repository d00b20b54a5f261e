"""Reflexive addresses from STUN servers, and whether the NAT maps per destination. Sans-I/O.

Theory of operation:

- ``StunProbe(servers, now, rng)`` asks each server once, at once: a Binding request
  (``pipeline/wire/stun.py``) with its own random 96-bit transaction id, sent again on RFC
  8489's timer cut short (``Retransmission``: RTO 500 ms doubling, 4 sends, given up 7.5 s
  after the first), all from the one socket the driver owns: the socket whose mapping the
  node wants to know.
- A datagram the driver hands to ``receive`` (it tells STUN apart with ``stun.is_stun``)
  answers the server whose transaction id it carries. A success gives the server's view of
  this socket (XOR-MAPPED-ADDRESS, or MAPPED-ADDRESS from an RFC 3489 server) with the time
  and round trip; an error response, a success without an address or with a
  comprehension-required attribute this codec does not know (RFC 8489 section 7.3.3) fails
  that server; silence until the timer gives up fails it too. Answers to transaction ids it
  does not hold (another probe's, a late duplicate) are not its (``receive`` returns False);
  malformed STUN raises ``RemoteProtocolError`` for the driver's drop counter.
- When every server has answered or failed, the probe is ``done`` and ``report()`` says what
  it saw: each server's reflexive address, and ``varies``: whether two servers saw different
  ones (a NAT that maps per destination, e.g. ``masquerade fully-random``; None with fewer
  than two answers). A probe asks once: a node probes again with a new ``StunProbe``.

Outputs: ``datagrams_to_send()``, ``events()`` (``MappingObserved``, ``ServerFailed``,
``ProbeDone``), ``next_deadline()``, ``report()``, ``statistics()``. Times are the driver's
monotonic clock in seconds.
"""

from __future__ import annotations

import enum
import random
from collections import Counter
from collections.abc import Sequence

import msgspec

from pipeline.control.nat.retransmit import Retransmission
from pipeline.wire import stun

Address = tuple[str, int]


class ProbeSettings(msgspec.Struct, frozen=True):
    rto_s: float = 0.5
    tries: int = 4
    software: str | None = None  # the SOFTWARE attribute of requests; None: none


class ServerState(enum.StrEnum):
    ASKING = "asking"
    ANSWERED = "answered"
    FAILED = "failed"


class MappingObserved(msgspec.Struct, frozen=True):
    """``server`` saw this socket as ``reflexive`` at ``at`` (answered after ``rtt_s``, from
    the first request sent)."""

    server: Address
    reflexive: Address
    at: float
    rtt_s: float


class ServerFailed(msgspec.Struct, frozen=True):
    server: Address
    reason: str  # "timeout", "error_<code>", "no_address", "unknown_attribute"


class Observation(msgspec.Struct, frozen=True):
    server: Address
    reflexive: Address
    at: float
    rtt_s: float


class NatReport(msgspec.Struct, frozen=True):
    """What one probe saw: the answers in the order they came, and the servers that failed."""

    observations: tuple[Observation, ...]
    failed: tuple[tuple[Address, str], ...]

    @property
    def varies(self) -> bool | None:
        """True if two servers saw different reflexive addresses (the mapping depends on the
        destination); None with fewer than two answers."""
        if len(self.observations) < 2:
            return None
        return len({o.reflexive for o in self.observations}) > 1

    @property
    def reflexive(self) -> Address | None:
        """The reflexive address when every answer agrees on it, else None."""
        seen = {o.reflexive for o in self.observations}
        return seen.pop() if len(seen) == 1 else None


class ProbeDone(msgspec.Struct, frozen=True):
    report: NatReport


ProbeEvent = MappingObserved | ServerFailed | ProbeDone


class _Server(msgspec.Struct):
    address: Address
    transaction_id: bytes
    request: Retransmission
    state: ServerState = ServerState.ASKING


class StunProbe:
    def __init__(
        self,
        servers: Sequence[Address],
        now: float,
        rng: random.Random,
        settings: ProbeSettings | None = None,
    ) -> None:
        self.settings = settings or ProbeSettings()
        self._servers: dict[bytes, _Server] = {}
        for address in dict.fromkeys(servers):
            transaction_id = rng.randbytes(stun.TRANSACTION_ID_LEN)
            request = stun.binding_request(transaction_id, software=self.settings.software)
            retransmission = Retransmission(
                request, self.settings.rto_s, self.settings.tries, next_at=now
            )
            self._servers[transaction_id] = _Server(address, transaction_id, retransmission)
        self._observations: list[Observation] = []
        self._failed: list[tuple[Address, str]] = []
        self._out: list[tuple[bytes, Address]] = []
        self._events: list[ProbeEvent] = []
        self._stats: Counter[str] = Counter()
        self.done = False
        self.handle_timer(now)

    # -- inputs --------------------------------------------------------------------------------

    def handle_timer(self, now: float) -> None:
        """Send what is due; fail the servers whose timer gave up."""
        for server in self._asking():
            if not server.request.due(now):
                continue
            payload = server.request.fire(now)
            if payload is None:
                self._fail(server, "timeout")
            else:
                self._out.append((payload, server.address))
                self._stats["requests_sent"] += 1
        self._check_done()

    def receive(self, datagram: bytes, source: Address, now: float) -> bool:
        """Take a STUN datagram; True if it answered one of this probe's requests.

        Raises ``RemoteProtocolError`` if it is not a well-formed STUN message.
        """
        message = stun.parse(datagram)
        server = self._servers.get(message.transaction_id)
        if server is None or message.method != stun.Method.BINDING:
            return False
        if message.cls not in (stun.Class.SUCCESS, stun.Class.ERROR):
            return False
        self._stats["responses_received"] += 1
        if server.state is not ServerState.ASKING:
            self._stats["responses_late"] += 1
            return True
        if message.cls is stun.Class.ERROR:
            code = message.error[0] if message.error else 0
            self._fail(server, f"error_{code}")
        elif message.unknown_required():
            self._fail(server, "unknown_attribute")
        elif message.reflexive is None:
            self._fail(server, "no_address")
        else:
            self._answer(server, message.reflexive, now)
        self._check_done()
        return True

    # -- outputs -------------------------------------------------------------------------------

    def datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        out, self._out = self._out, []
        return out

    def events(self) -> list[ProbeEvent]:
        events, self._events = self._events, []
        return events

    def next_deadline(self) -> float | None:
        pending = [s.request.next_at for s in self._asking()]
        return min(pending) if pending else None

    def report(self) -> NatReport:
        return NatReport(tuple(self._observations), tuple(self._failed))

    def statistics(self) -> dict[str, int]:
        """``requests_sent``, ``responses_received``, ``responses_late``, ``answered``,
        ``failed_<reason>``."""
        return dict(self._stats)

    # -- internals -----------------------------------------------------------------------------

    def _asking(self) -> list[_Server]:
        return [s for s in self._servers.values() if s.state is ServerState.ASKING]

    def _answer(self, server: _Server, reflexive: Address, now: float) -> None:
        server.state = ServerState.ANSWERED
        first = server.request.first_sent_at
        assert first is not None  # every server's first request goes out in __init__
        observation = Observation(server.address, reflexive, now, now - first)
        self._observations.append(observation)
        self._events.append(MappingObserved(server.address, reflexive, now, now - first))
        self._stats["answered"] += 1

    def _fail(self, server: _Server, reason: str) -> None:
        server.state = ServerState.FAILED
        self._failed.append((server.address, reason))
        self._events.append(ServerFailed(server.address, reason))
        self._stats[f"failed_{reason}"] += 1

    def _check_done(self) -> None:
        if not self.done and not self._asking():
            self.done = True
            self._events.append(ProbeDone(self.report()))
