"""A port mapping on the gateway, by PCP, NAT-PMP or UPnP IGD: asked for, renewed, deleted.
Sans-I/O.

Theory of operation:

- ``PortMapper(gateway, client, now, rng)`` wants a UDP mapping of ``client`` (this node's
  LAN address and the port to map: its overlay socket's) on ``gateway`` (the driver finds
  it: the default route's next hop). It asks at once, with each protocol of
  ``settings.protocols`` in turn, PCP first (RFC 6887: one MAP request, with a random
  96-bit nonce kept for the mapper's life), then NAT-PMP (RFC 6886: an external address
  request and a map request; the mapping is known once both are answered), then UPnP IGD
  (below). Every PCP and NAT-PMP request is sent again on a doubling timer
  (``Retransmission``: 250 ms, 3 sends, given up 1.75 s after the first). A protocol fails
  on silence, on an error result, or, for PCP, when the gateway answers in NAT-PMP (version
  0: it speaks only that); then the next is asked. When all failed: ``MappingFailed`` and a
  new round after ``retry_s``.
- UPnP IGD is not datagrams but blocking calls (SSDP, SOAP) that the driver makes off its
  event loop: the mapper hands out commands (``upnp_to_run()``: ``UpnpMap``, ``UpnpDelete``,
  ``nat/upnp.py``) and takes their results (``receive_upnp``); one is in flight at a time,
  given up after ``upnp_timeout_s`` (a result that comes later is late: a late map that
  succeeded is deleted again unless it is the one held). The node's own port is asked for
  first; an IGD that says another host holds it ("conflict") is asked for a random port,
  ``upnp_port_tries`` times in all. The lease asked for is ``lifetime_s`` (at most IGDv2's
  week); an IGD that grants only permanent leases ("only_permanent_leases") is asked again
  with lease 0, and so for the mapper's life. A permanent mapping never expires here
  (``Mapping.lifetime_s`` 0): it is asked for again every ``lifetime_s / 2`` all the same (an
  IGD that rebooted has lost it), and deleted at stop like any other.
- A success holds the mapping (``mapping``: protocol, external address and port, lifetime):
  ``MappingChanged`` when it is new or its external endpoint changed. It is renewed at half
  its lifetime with the same request (same nonce, the held external port suggested); a
  renewal that times out is tried again halfway to the expiry; a refused renewal or an
  expiry is ``MappingLost`` and a new round starts at once. An unsolicited announcement from
  the gateway (a PCP ANNOUNCE response, a NAT-PMP external address response: it rebooted or
  its address changed; the driver passes on what it hears on 5350 too) renews at once.
- ``stop(now)`` deletes what is held (or being asked for): lifetime 0, for PCP with the
  same nonce (a gateway refuses a delete with another: miniupnpd answers NOT_AUTHORIZED),
  for NAT-PMP with external port 0, for UPnP with ``UpnpDelete`` (the driver runs commands
  in order, so it follows a map still in flight). ``MappingDeleted`` says whether the
  gateway confirmed it; then the mapper is ``done``.
- ``receive(datagram, source, now)`` takes what came from the gateway's port 5351 and says
  whether it was this mapper's; anything malformed raises ``RemoteProtocolError``.

Outputs: ``datagrams_to_send()`` (all to the gateway's port 5351), ``upnp_to_run()``,
``events()``, ``next_deadline()``, ``mapping``, ``phase``, ``statistics()``. Times are the
driver's monotonic clock in seconds. The mapper does not read the gateways' epochs: each answer to
its own request re-creates its one mapping anyway.
"""

from __future__ import annotations

import enum
import random
from collections import Counter

import msgspec

from pipeline.control.nat.retransmit import Retransmission
from pipeline.control.nat.upnp import (
    CONFLICT,
    MAX_LEASE_S,
    ONLY_PERMANENT,
    UpnpCommand,
    UpnpDelete,
    UpnpMap,
    UpnpResult,
)
from pipeline.errors import RemoteProtocolError
from pipeline.wire import natpmp, pcp

Address = tuple[str, int]
SERVER_PORT = pcp.PORT  # 5351, NAT-PMP's too
ABANDONED_KEPT = 64  # UPnP commands given up on whose late results are still recognised


class Protocol(enum.StrEnum):
    PCP = "pcp"
    NATPMP = "nat-pmp"
    UPNP = "upnp"


class Phase(enum.StrEnum):
    ASKING = "asking"  # one protocol's requests in flight, nothing held
    MAPPED = "mapped"  # a mapping is held (a renewal may be in flight)
    FAILED = "failed"  # every protocol failed; a new round at ``retry_at``
    STOPPING = "stopping"  # the delete is in flight
    STOPPED = "stopped"


class PortMapSettings(msgspec.Struct, frozen=True):
    lifetime_s: int = 7200
    rto_s: float = 0.25
    tries: int = 3
    retry_s: float = 300.0
    protocols: tuple[Protocol, ...] = (Protocol.PCP, Protocol.NATPMP)  # the node: its config
    upnp_timeout_s: float = 20.0  # one UPnP command (discovery and SOAP calls) at most
    upnp_port_tries: int = 3  # external ports asked for when the IGD says "conflict"
    description: str = "autovn"  # the UPnP mapping's description on the IGD


class Mapping(msgspec.Struct, frozen=True):
    protocol: Protocol
    external: Address
    internal_port: int
    lifetime_s: int  # 0: permanent (a UPnP IGD that grants no other)
    obtained_at: float  # when the last (re)newal was answered

    @property
    def permanent(self) -> bool:
        return self.lifetime_s == 0

    @property
    def expires_at(self) -> float:
        return float("inf") if self.permanent else self.obtained_at + self.lifetime_s


class MappingChanged(msgspec.Struct, frozen=True):
    """A new mapping, or the held one's external endpoint changed."""

    mapping: Mapping


class MappingLost(msgspec.Struct, frozen=True):
    protocol: Protocol
    reason: str  # "expired", or the gateway's refusal of a renewal ("not_authorized", ...)


class MappingFailed(msgspec.Struct, frozen=True):
    """Every protocol failed (each with its reason: "timeout", "unsupported_version", a
    result name); the next round starts at ``retry_at``."""

    reasons: tuple[tuple[Protocol, str], ...]
    retry_at: float


class MappingDeleted(msgspec.Struct, frozen=True):
    protocol: Protocol
    confirmed: bool  # the gateway answered the delete with success


PortMapEvent = MappingChanged | MappingLost | MappingFailed | MappingDeleted


class PortMapper:
    def __init__(
        self,
        gateway: str,
        client: Address,
        now: float,
        rng: random.Random,
        settings: PortMapSettings | None = None,
    ) -> None:
        self.settings = settings or PortMapSettings()
        if not self.settings.protocols:
            raise ValueError("no port mapping protocol to ask with")
        self.gateway: Address = (gateway, SERVER_PORT)
        self.client = client
        self._rng = rng
        self.nonce = rng.randbytes(pcp.NONCE_LEN)
        self.phase = Phase.ASKING
        self.mapping: Mapping | None = None
        self._round = 0  # index into settings.protocols while asking
        self._reasons: list[tuple[Protocol, str]] = []
        self._requests: dict[str, Retransmission] = {}  # "map", "address" (NAT-PMP), "delete"
        self._asking_with = self.settings.protocols[0]  # the protocol of the requests in flight
        self._natpmp_address: str | None = None
        self._natpmp_port: tuple[int, int] | None = None  # external port, lifetime
        self._renew_at = 0.0
        self._retry_at = 0.0
        # UPnP: the command in flight (id, "map" or "delete", external port, given up at)
        self._upnp: tuple[int, str, int, float] | None = None
        self._upnp_id = rng.getrandbits(32) << 16  # ids of this mapper's commands
        self._upnp_port = client[1]  # the external port to ask for
        self._upnp_conflicts = 0
        self._upnp_permanent = False  # the IGD grants only permanent leases
        # commands given up on -> a map's external port (a late success is deleted), or None
        self._upnp_abandoned: dict[int, int | None] = {}
        self._upnp_out: list[UpnpCommand] = []
        self._out: list[tuple[bytes, Address]] = []
        self._events: list[PortMapEvent] = []
        self._stats: Counter[str] = Counter()
        self._start(now)
        self._send_due(now)

    @property
    def done(self) -> bool:
        return self.phase is Phase.STOPPED

    # -- inputs --------------------------------------------------------------------------------

    def handle_timer(self, now: float) -> None:
        if self._upnp is not None and now >= self._upnp[3]:
            self._clear()
            self._stats["timeouts"] += 1
            self._gave_up(now)
        if self.phase is Phase.FAILED and now >= self._retry_at:
            self._start(now)
        elif self.phase is Phase.MAPPED and self.mapping is not None:
            if now >= self.mapping.expires_at:
                self._lose("expired", now)
            elif not self._busy and now >= self._renew_at:
                self._stats["renewals"] += 1
                self._ask(self.mapping.protocol, now)
        self._send_due(now)

    def receive(self, datagram: bytes, source: Address, now: float) -> bool:
        """Take a datagram from the network; True if it was an answer for this mapper."""
        if source != self.gateway or self.phase is Phase.STOPPED:
            return False
        if not datagram:
            raise RemoteProtocolError("portmap_empty", "empty datagram")
        version = datagram[0]
        if version == pcp.VERSION:
            return self._receive_pcp(pcp.parse_response(datagram), now)
        if version == natpmp.VERSION:
            return self._receive_natpmp(natpmp.parse_response(datagram), now)
        if self._in_flight(Protocol.PCP, "map"):  # a PCP server of another version
            self._refused("unsupported_version", now)
            return True
        raise RemoteProtocolError("portmap_bad_version", f"version {version}")

    def stop(self, now: float) -> None:
        """Delete the mapping held or asked for; ``done`` once the gateway answered or the
        delete gave up."""
        if self.phase in (Phase.STOPPING, Phase.STOPPED):
            return
        held = self.mapping
        protocol = held.protocol if held is not None else self._asking_with
        asked = self._upnp[2] if self._upnp is not None else None
        self._clear()
        if self.phase is Phase.FAILED:
            self.phase = Phase.STOPPED
            return
        if protocol is Protocol.UPNP:
            port = held.external[1] if held is not None else asked
            if port is None:  # nothing asked for: nothing to delete
                self.phase = Phase.STOPPED
                return
            self._asking_with = protocol
            self.phase = Phase.STOPPING
            self._run_upnp("delete", port, now)
            return
        if protocol is Protocol.PCP:
            external = held.external if held is not None else (pcp.NO_ADDRESS, 0)
            request = pcp.MapRequest(
                self.nonce, self.client[1], 0, self.client[0], external[1], external[0]
            ).encode()
        else:
            request = natpmp.MapRequest(self.client[1], 0, 0).encode()
        self._asking_with = protocol
        self.phase = Phase.STOPPING
        self._requests = {"delete": self._retransmission(request, now)}
        self._send_due(now)

    # -- outputs -------------------------------------------------------------------------------

    def datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        out, self._out = self._out, []
        return out

    def upnp_to_run(self) -> list[UpnpCommand]:
        """UPnP IGD commands for the driver to run, in order (``nat/upnp.py``)."""
        out, self._upnp_out = self._upnp_out, []
        return out

    def events(self) -> list[PortMapEvent]:
        events, self._events = self._events, []
        return events

    def next_deadline(self) -> float | None:
        times = [r.next_at for r in self._requests.values()]
        if self._upnp is not None:
            times.append(self._upnp[3])
        if self.phase is Phase.MAPPED and self.mapping is not None:
            if not self.mapping.permanent:
                times.append(self.mapping.expires_at)
            if not self._busy:
                times.append(self._renew_at)
        if self.phase is Phase.FAILED:
            times.append(self._retry_at)
        return min(times) if times else None

    def statistics(self) -> dict[str, int]:
        """``requests_sent``, ``answers``, ``answers_late``, ``mapped_<protocol>``,
        ``renewals``, ``refused_<reason>``, ``timeouts``, ``lost_<reason>``; for UPnP
        ``upnp_commands``, ``upnp_results``, ``upnp_late``, ``upnp_conflicts``,
        ``upnp_permanent``."""
        return dict(self._stats)

    # -- UPnP IGD ------------------------------------------------------------------------------

    def receive_upnp(self, result: UpnpResult, now: float) -> bool:
        """The driver's result of a UPnP command; True if it was this mapper's."""
        pending = self._upnp
        if pending is None or result.id != pending[0]:
            if result.id not in self._upnp_abandoned:
                return False
            late_port = self._upnp_abandoned.pop(result.id)
            self._stats["upnp_late"] += 1
            held = self.mapping  # (the same port held, by any protocol, is not deleted)
            kept = held.external[1] if held is not None else None
            if result.ok and late_port is not None and late_port != kept:
                self._upnp_out.append(UpnpDelete(self._next_upnp_id(), self.client, late_port))
            return True
        self._stats["upnp_results"] += 1
        _, kind, port, _ = pending
        self._upnp = None
        if kind == "delete":
            self._deleted(confirmed=result.ok)
            return True
        if not result.ok:
            self._upnp_failed(result.error or "unknown_error", now)
            return True
        lifetime = result.lease_s if result.lease_s is not None else self._upnp_lease()
        if self.settings.lifetime_s and lifetime > self.settings.lifetime_s:
            lifetime = self.settings.lifetime_s  # renewed as asked, whatever the IGD allows
        self._mapped(Protocol.UPNP, (result.external_address, port), lifetime, now, upnp=True)
        return True

    @property
    def _busy(self) -> bool:
        return bool(self._requests) or self._upnp is not None

    def _clear(self) -> None:
        """Nothing in flight any more (a UPnP command still running is abandoned)."""
        self._requests = {}
        if self._upnp is not None:
            ident, kind, port, _ = self._upnp
            self._upnp_abandoned[ident] = port if kind == "map" else None
            if len(self._upnp_abandoned) > ABANDONED_KEPT:  # a driver that never answers
                del self._upnp_abandoned[next(iter(self._upnp_abandoned))]
            self._upnp = None

    def _next_upnp_id(self) -> int:
        self._upnp_id += 1
        self._stats["upnp_commands"] += 1
        return self._upnp_id

    def _upnp_lease(self) -> int:
        return 0 if self._upnp_permanent else min(self.settings.lifetime_s, MAX_LEASE_S)

    def _run_upnp(self, kind: str, port: int, now: float) -> None:
        ident = self._next_upnp_id()
        if kind == "map":
            lease = self._upnp_lease()
            desc = self.settings.description
            self._upnp_out.append(UpnpMap(ident, self.client, port, lease, desc))
        else:
            self._upnp_out.append(UpnpDelete(ident, self.client, port))
            for abandoned, asked in self._upnp_abandoned.items():
                if asked == port:  # a map of this port that comes late is deleted here
                    self._upnp_abandoned[abandoned] = None
        self._upnp = (ident, kind, port, now + self.settings.upnp_timeout_s)

    def _upnp_failed(self, why: str, now: float) -> None:
        """A map the IGD refused: ask again where the reason allows, else as any refusal."""
        if why == ONLY_PERMANENT and not self._upnp_permanent:
            self._upnp_permanent = True
            self._stats["upnp_permanent"] += 1
            self._ask(Protocol.UPNP, now)
            return
        if why == CONFLICT and self.phase is Phase.ASKING:
            self._stats["upnp_conflicts"] += 1
            self._upnp_conflicts += 1
            if self._upnp_conflicts < self.settings.upnp_port_tries:
                self._upnp_port = self._rng.randrange(1024, 65536)
                self._ask(Protocol.UPNP, now)
                return
        self._refused(why, now)

    # -- asking --------------------------------------------------------------------------------

    def _retransmission(self, payload: bytes, now: float) -> Retransmission:
        return Retransmission(payload, self.settings.rto_s, self.settings.tries, next_at=now)

    def _start(self, now: float) -> None:
        self.phase = Phase.ASKING
        self._round = 0
        self._reasons = []
        self._upnp_port, self._upnp_conflicts = self.client[1], 0
        self._ask(self.settings.protocols[0], now)

    def _ask(self, protocol: Protocol, now: float) -> None:
        """Requests for a new mapping or a renewal of the held one (its port suggested)."""
        held = self.mapping
        if held is None:
            address, port = pcp.NO_ADDRESS, self.client[1]
        else:
            address, port = held.external
        lifetime = self.settings.lifetime_s
        self._asking_with = protocol
        self._natpmp_address, self._natpmp_port = None, None
        self._clear()
        if protocol is Protocol.UPNP:
            self._run_upnp("map", port if held is not None else self._upnp_port, now)
        elif protocol is Protocol.PCP:
            request = pcp.MapRequest(
                self.nonce, self.client[1], lifetime, self.client[0], port, address
            )
            self._requests = {"map": self._retransmission(request.encode(), now)}
        else:
            self._requests = {
                "address": self._retransmission(natpmp.ExternalAddressRequest().encode(), now),
                "map": self._retransmission(
                    natpmp.MapRequest(self.client[1], port, lifetime).encode(), now
                ),
            }

    def _send_due(self, now: float) -> None:
        gave_up = False
        for request in self._requests.values():
            if request.due(now):
                payload = request.fire(now)
                if payload is None:
                    gave_up = True
                else:
                    self._out.append((payload, self.gateway))
                    self._stats["requests_sent"] += 1
        if gave_up:
            self._stats["timeouts"] += 1
            self._gave_up(now)

    def _gave_up(self, now: float) -> None:
        self._clear()
        if self.phase is Phase.STOPPING:
            self._deleted(confirmed=False)
        elif self.phase is Phase.ASKING:
            self._protocol_failed("timeout", now)
        elif self.phase is Phase.MAPPED and self.mapping is not None:
            left = self.mapping.expires_at - now  # try the renewal again halfway to expiry
            if self.mapping.permanent:
                left = self.settings.lifetime_s
            self._renew_at = now + max(left / 2, self.settings.rto_s)

    def _protocol_failed(self, reason: str, now: float) -> None:
        self._reasons.append((self._asking_with, reason))
        self._round += 1
        if self._round < len(self.settings.protocols):
            self._ask(self.settings.protocols[self._round], now)
            self._send_due(now)
            return
        self._clear()
        self.phase = Phase.FAILED
        self._retry_at = now + self.settings.retry_s
        self._events.append(MappingFailed(tuple(self._reasons), self._retry_at))

    def _refused(self, reason: str, now: float) -> None:
        """The gateway said no (or cannot): to a first request the protocol failed, to a
        renewal the mapping is lost."""
        self._stats[f"refused_{reason}"] += 1
        self._clear()
        if self.phase is Phase.ASKING:
            self._protocol_failed(reason, now)
        elif self.phase is Phase.MAPPED:
            self._lose(reason, now)

    def _lose(self, reason: str, now: float) -> None:
        held = self.mapping
        assert held is not None
        self._stats[f"lost_{reason}"] += 1
        self._events.append(MappingLost(held.protocol, reason))
        self.mapping = None
        self._clear()
        self._start(now)
        self._send_due(now)

    def _mapped(
        self,
        protocol: Protocol,
        external: Address,
        lifetime_s: int,
        now: float,
        *,
        upnp: bool = False,
    ) -> None:
        """Mapped (``lifetime_s`` 0: permanent, which only a UPnP IGD grants)."""
        if lifetime_s == 0 and not upnp:
            self._refused("zero_lifetime", now)
            return
        old = self.mapping
        self.mapping = Mapping(protocol, external, self.client[1], lifetime_s, now)
        self.phase = Phase.MAPPED
        self._clear()
        self._renew_at = now + (lifetime_s or self.settings.lifetime_s) / 2
        self._stats[f"mapped_{protocol.value}"] += 1
        if old is None or old.external != external or old.protocol is not protocol:
            self._events.append(MappingChanged(self.mapping))

    def _deleted(self, confirmed: bool) -> None:
        self._events.append(MappingDeleted(self._asking_with, confirmed))
        self.mapping = None
        self._clear()
        self.phase = Phase.STOPPED

    def _in_flight(self, protocol: Protocol, name: str) -> bool:
        return self._asking_with is protocol and name in self._requests

    def _renew_now(self, now: float) -> None:
        """The gateway announced a change: renew the held mapping at once."""
        if self.phase is Phase.MAPPED and not self._requests:
            self._stats["announcements"] += 1
            self._renew_at = now
            self.handle_timer(now)

    # -- answers -------------------------------------------------------------------------------

    def _receive_pcp(self, response: pcp.Response, now: float) -> bool:
        if isinstance(response, pcp.AnnounceResponse):
            self._renew_now(now)
            return True
        if (
            response.nonce != self.nonce
            or response.internal_port != self.client[1]
            or response.protocol != pcp.PROTOCOL_UDP
        ):
            return False
        self._stats["answers"] += 1
        if self._in_flight(Protocol.PCP, "delete"):
            self._deleted(confirmed=response.result == pcp.Result.SUCCESS)
        elif not self._in_flight(Protocol.PCP, "map"):
            self._stats["answers_late"] += 1
        elif response.result != pcp.Result.SUCCESS:
            self._refused(pcp.result_name(response.result), now)
        else:
            external = (response.external_address, response.external_port)
            self._mapped(Protocol.PCP, external, response.lifetime_s, now)
        return True

    def _receive_natpmp(self, response: natpmp.Response, now: float) -> bool:
        if self._in_flight(Protocol.PCP, "map"):
            if response.result != natpmp.Result.UNSUPPORTED_VERSION:
                return False
            self._stats["answers"] += 1
            self._refused("unsupported_version", now)  # a NAT-PMP gateway answering PCP
            return True
        if isinstance(response, natpmp.ExternalAddressResponse):
            if not self._in_flight(Protocol.NATPMP, "address"):
                self._renew_now(now)  # an announcement (multicast to port 5350)
                return True
            self._stats["answers"] += 1
            del self._requests["address"]
            if response.result != natpmp.Result.SUCCESS:
                self._refused(natpmp.result_name(response.result), now)
            else:
                self._natpmp_address = response.address
                self._natpmp_complete(now)
            return True
        if response.internal_port != self.client[1] or response.opcode != natpmp.Opcode.MAP_UDP:
            return False
        self._stats["answers"] += 1
        if self._in_flight(Protocol.NATPMP, "delete"):
            self._deleted(confirmed=response.result == natpmp.Result.SUCCESS)
        elif not self._in_flight(Protocol.NATPMP, "map"):
            self._stats["answers_late"] += 1
        elif response.result != natpmp.Result.SUCCESS:
            self._refused(natpmp.result_name(response.result), now)
        else:
            del self._requests["map"]
            self._natpmp_port = (response.external_port, response.lifetime_s)
            self._natpmp_complete(now)
        return True

    def _natpmp_complete(self, now: float) -> None:
        if self._natpmp_address is None or self._natpmp_port is None:
            return
        port, lifetime = self._natpmp_port
        self._mapped(Protocol.NATPMP, (self._natpmp_address, port), lifetime, now)
