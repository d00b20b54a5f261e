"""What the node knows of its own endpoints, and how it keeps knowing: local addresses, STUN
answers and a port mapping, as one sans-I/O object. Pure.

Theory of operation:

- **Local.** The driver tells the addresses of the node's interfaces (``set_local``; again
  whenever they change: roaming). Each, with the node's UDP port, is a *local* candidate.
- **Reflexive.** ``StunProbe`` asks the configured STUN servers, from the node's own UDP
  port (its datagrams go out through overlay_io: ``stun_to_send``; the answers come back
  the same way: ``receive_stun``), where they see it. One reflexive address when they
  agree; when they do not, the NAT maps per destination (``varies``: a hard NAT, which
  punching alone will not cross). Asked at start, every ``STUN_EVERY_S`` and at once when
  the local addresses change.
- **Mapped.** With ``port_mapping`` and a default gateway, ``PortMapper`` asks it for a UDP
  port mapping of the node's port (the protocols of ``portmap.protocols`` in turn: PCP,
  NAT-PMP, UPnP IGD by default), renews it, and deletes it on ``stop``. Its datagrams go
  out of the driver's own socket (``portmap_to_send``, ``receive_portmap``), its UPnP
  commands to the driver's UPnP thread (``upnp_to_run``, ``receive_upnp``). A granted
  mapping is a *mapped* candidate.
- Its events are log events (``pipeline/control/events.py``); ``candidates_version``
  changes with the candidate set, so the owner hands them to the shortcut logic;
  ``picture()`` is what ``supervisor netcheck`` prints.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from pipeline.control import events as ev
from pipeline.control.nat.portmap import (
    MappingChanged,
    MappingDeleted,
    MappingFailed,
    MappingLost,
    PortMapper,
    PortMapSettings,
)
from pipeline.control.nat.stun_probe import MappingObserved, ProbeDone, StunProbe
from pipeline.control.nat.upnp import UpnpCommand, UpnpResult
from pipeline.control.shortcuts import Candidate, CandidateKind

Address = tuple[str, int]

STUN_EVERY_S = 300.0


class NatDiscovery:
    def __init__(
        self,
        *,
        port: int,
        stun_servers: Sequence[Address],
        port_mapping: bool,
        rng: random.Random,
        now: float,
        portmap: PortMapSettings | None = None,
    ) -> None:
        self.port = port
        self._servers = tuple(stun_servers)
        self._port_mapping = port_mapping
        self._portmap_settings = portmap or PortMapSettings()
        self._rng = rng
        self._local: tuple[str, ...] = ()
        self._settled: tuple[str, ...] = ()  # the last addresses that were not none
        self._gateway: str | None = None
        self._probe: StunProbe | None = None
        self._next_probe = now
        self._report: dict[str, Any] = {}
        self._reflexive: Address | None = None
        self.mapper: PortMapper | None = None
        self._mapped: Candidate | None = None
        self._mapper_protocol: str | None = None
        self._candidates: tuple[Candidate, ...] = ()
        self._told: tuple[object, ...] = ()  # candidates, varies, reflexive: last version's
        self._stun_out: list[tuple[bytes, Address]] = []
        self._portmap_out: list[tuple[bytes, Address]] = []
        self._upnp_out: list[UpnpCommand] = []
        self._events: list[ev.LogEvent] = []
        self.candidates_version = 0

    # -- outputs ---------------------------------------------------------------------------------

    def stun_to_send(self) -> list[tuple[bytes, Address]]:
        if self._probe is not None:
            self._stun_out += self._probe.datagrams_to_send()
        out, self._stun_out = self._stun_out, []
        return out

    def portmap_to_send(self) -> list[tuple[bytes, Address]]:
        if self.mapper is not None:
            self._portmap_out += self.mapper.datagrams_to_send()
        out, self._portmap_out = self._portmap_out, []
        return out

    def upnp_to_run(self) -> list[UpnpCommand]:
        """UPnP IGD commands for the driver's UPnP thread, in order."""
        if self.mapper is not None:
            self._upnp_out += self.mapper.upnp_to_run()
        out, self._upnp_out = self._upnp_out, []
        return out

    def events(self) -> list[ev.LogEvent]:
        out, self._events = self._events, []
        return out

    def candidates(self) -> tuple[Candidate, ...]:
        return self._candidates

    @property
    def mapping_varies(self) -> bool:
        """The STUN servers saw this node at different addresses: its NAT maps per
        destination, so no reflexive address is worth advertising (the overlay's HelloAck
        address neither)."""
        return bool(self._report.get("varies"))

    @property
    def public_ip(self) -> str | None:
        """The address STUN saw the node at (behind a NAT that maps per destination, its
        ports differ but its address does not: birthday probing aims at it), or None."""
        return self._reflexive[0] if self._reflexive is not None else None

    def next_deadline(self) -> float | None:
        times = []
        if self._servers:
            times.append(self._next_probe if self._probe is None else None)
            if self._probe is not None:
                times.append(self._probe.next_deadline())
        if self.mapper is not None:
            times.append(self.mapper.next_deadline())
        due = [t for t in times if t is not None]
        return min(due) if due else None

    def picture(self) -> dict[str, Any]:
        """The node's NAT picture, for ``supervisor netcheck``."""
        return {
            "local": [f"{a}:{self.port}" for a in self._local],
            "gateway": self._gateway,
            "stun": self._report,
            "reflexive": _text(self._reflexive) if self._reflexive else None,
            "mapping_varies": self._report.get("varies"),
            "port_mapping": self.port_mapping(),
            "candidates": [f"{_text(c.endpoint)} {c.kind}" for c in self._candidates],
        }

    def port_mapping(self) -> dict[str, Any]:
        """The port mapping: which protocol answered, the external endpoint, its lifetime
        (0: permanent), the mapper's phase and counters (``PortMapper.statistics``)."""
        mapper = self.mapper
        mapping = mapper.mapping if mapper is not None else None
        return {
            "enabled": self._port_mapping,
            "protocols": [p.value for p in self._portmap_settings.protocols],
            "protocol": mapping.protocol.value if mapping else self._mapper_protocol,
            "external": _text(mapping.external) if mapping else None,
            "lifetime_s": mapping.lifetime_s if mapping else None,
            "phase": mapper.phase.value if mapper is not None else None,
            "statistics": mapper.statistics() if mapper is not None else {},
        }

    # -- inputs ----------------------------------------------------------------------------------

    def set_local(self, addresses: Sequence[str], gateway: str | None, now: float) -> bool:
        """The node's interface addresses (not the TAP's, not loopback) and its default
        gateway. A change (the node moved) asks STUN again and remakes the port mapping.
        True if the node moved (it had addresses, and they changed)."""
        addresses = tuple(dict.fromkeys(addresses))
        if addresses == self._local and gateway == self._gateway:
            return False
        # Moved: addresses again, and not the ones it had (an address taken away before the
        # new one comes is a step of the move, not a move: nothing could be sent from it).
        moved = bool(addresses) and bool(self._settled) and addresses != self._settled
        if addresses:
            self._settled = addresses
        self._local, self._gateway = addresses, gateway
        if self._servers and (moved or self._probe is None):
            self._next_probe = now
        if self._port_mapping:
            self._remap(now)
        self._changed()
        return moved

    def receive_stun(self, datagram: bytes, source: Address, now: float) -> bool:
        """A STUN datagram that came to the node's port. True if it was an answer of ours."""
        if self._probe is None or not self._probe.receive(datagram, source, now):
            return False
        self._probe_events()
        return True

    def receive_portmap(self, datagram: bytes, source: Address, now: float) -> bool:
        if self.mapper is None or not self.mapper.receive(datagram, source, now):
            return False
        self._mapper_events(now)
        return True

    def receive_upnp(self, result: UpnpResult, now: float) -> bool:
        """A UPnP command's result from the driver. True if it was the mapper's."""
        if self.mapper is None or not self.mapper.receive_upnp(result, now):
            return False
        self._mapper_events(now)
        return True

    def handle_timer(self, now: float) -> None:
        if self._servers and self._probe is None and now >= self._next_probe:
            self._probe = StunProbe(self._servers, now, random.Random(self._rng.getrandbits(64)))
        if self._probe is not None:
            self._probe.handle_timer(now)
            self._probe_events()
            if self._probe is not None and self._probe.done:
                self._probe = None
                self._next_probe = now + STUN_EVERY_S
        if self.mapper is not None:
            self.mapper.handle_timer(now)
            self._mapper_events(now)

    def stop(self, now: float) -> None:
        """The node stops: delete the port mapping (its datagrams still go out)."""
        if self.mapper is not None:
            self.mapper.stop(now)
            self._mapper_events(now)

    # -- the parts -------------------------------------------------------------------------------

    def _remap(self, now: float) -> None:
        if self.mapper is not None:
            self.mapper.stop(now)
            self._portmap_out += self.mapper.datagrams_to_send()
            self._upnp_out += self.mapper.upnp_to_run()
            self.mapper = None
            self._mapped = None
        if self._gateway is None or not self._local:
            return
        client = (self._local[0], self.port)
        self.mapper = PortMapper(
            self._gateway,
            client,
            now,
            random.Random(self._rng.getrandbits(64)),
            self._portmap_settings,
        )

    def _probe_events(self) -> None:
        assert self._probe is not None
        for event in self._probe.events():
            if isinstance(event, MappingObserved):
                self._events.append(
                    ev.StunAnswered(
                        _text(event.server), _text(event.reflexive), round(event.rtt_s * 1000, 3)
                    )
                )
            elif isinstance(event, ProbeDone):
                report = event.report
                self._report = {
                    "answers": {_text(o.server): _text(o.reflexive) for o in report.observations},
                    "failed": {_text(a): why for a, why in report.failed},
                    "varies": report.varies,
                }
                if report.varies:
                    self._events.append(ev.NatVaries(dict(self._report["answers"])))
                reflexive = report.reflexive
                if reflexive is None and report.observations:
                    reflexive = report.observations[0].reflexive  # varies: one of them
                self._reflexive = reflexive
                self._changed()

    def _mapper_events(self, now: float) -> None:
        assert self.mapper is not None
        for event in self.mapper.events():
            if isinstance(event, MappingChanged):
                mapping = event.mapping
                self._mapper_protocol = mapping.protocol.value
                self._mapped = Candidate(mapping.external, CandidateKind.MAPPED)
                self._events.append(
                    ev.PortMapped(
                        mapping.protocol.value, _text(mapping.external), mapping.lifetime_s
                    )
                )
                self._changed()
            elif isinstance(event, MappingLost):
                self._mapped = None
                self._events.append(ev.PortMappingLost(event.protocol.value, event.reason))
                self._changed()
            elif isinstance(event, MappingFailed):
                reasons = {p.value: why for p, why in event.reasons}
                self._events.append(ev.PortMappingFailed(reasons))
            elif isinstance(event, MappingDeleted):
                self._events.append(ev.PortUnmapped(event.protocol.value, event.confirmed))

    def _changed(self) -> None:
        candidates = [Candidate((a, self.port), CandidateKind.LOCAL) for a in self._local]
        if self._mapped is not None:
            candidates.append(self._mapped)
        if self._reflexive is not None and not self.mapping_varies:
            # a NAT that maps per destination gives every peer another port: the one STUN saw
            # would only cost the peer's probes (netcheck and status still show it)
            candidates.append(Candidate(self._reflexive, CandidateKind.REFLEXIVE))
        unique = tuple(dict.fromkeys(candidates))
        told = (unique, self.mapping_varies, self._reflexive)
        if told != self._told:  # whether the mapping varies is news too, with no new candidate
            self._told = told
            self.candidates_version += 1
        if unique != self._candidates:
            self._candidates = unique
            text = tuple(f"{_text(c.endpoint)} {c.kind}" for c in unique)
            self._events.append(ev.CandidatesChanged(text))


def _text(endpoint: Address) -> str:
    return f"{endpoint[0]}:{endpoint[1]}"
