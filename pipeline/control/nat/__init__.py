"""The node's view of the NATs in front of it: sans-I/O cores. Pure.

Modules:

- ``stun_probe``: ``StunProbe`` asks STUN servers where they see this node's socket
  (its reflexive address) and whether the answer depends on the server (a NAT that maps
  per destination); ``NatReport`` is what it saw.
- ``portmap``: ``PortMapper`` gets, renews and deletes a UDP port mapping on the gateway
  with PCP or NAT-PMP.
- ``retransmit``: ``Retransmission``, the doubling timer both use.

Both take datagrams, their source and the time, and give back datagrams to send, events
and their next deadline (aioquic's shape)::

    probe = StunProbe([("198.18.90.3", 3478), ("198.18.90.5", 3478)], now, rng)
    mapper = PortMapper("198.19.1.1", ("198.19.1.10", 4789), now, rng)
    # inputs
    probe.receive(datagram, source, now)      # True if it was its answer
    probe.handle_timer(now)
    mapper.stop(now)                          # delete the mapping
    # outputs
    probe.datagrams_to_send() -> list[tuple[bytes, Address]]
    probe.next_deadline() -> float | None
    probe.events()                            # MappingObserved, ServerFailed, ProbeDone
    probe.report().varies                     # True: the mapping depends on the destination
    mapper.mapping                            # Mapping(protocol, external, ...) or None

The codecs are ``pipeline/wire/stun.py``, ``pipeline/wire/pcp.py`` and
``pipeline/wire/natpmp.py``.
"""

from pipeline.control.nat.portmap import (
    Mapping,
    MappingChanged,
    MappingDeleted,
    MappingFailed,
    MappingLost,
    Phase,
    PortMapEvent,
    PortMapper,
    PortMapSettings,
    Protocol,
)
from pipeline.control.nat.stun_probe import (
    MappingObserved,
    NatReport,
    Observation,
    ProbeDone,
    ProbeEvent,
    ProbeSettings,
    ServerFailed,
    StunProbe,
)

__all__ = [
    "Mapping",
    "MappingChanged",
    "MappingDeleted",
    "MappingFailed",
    "MappingLost",
    "MappingObserved",
    "NatReport",
    "Observation",
    "Phase",
    "PortMapEvent",
    "PortMapSettings",
    "PortMapper",
    "ProbeDone",
    "ProbeEvent",
    "ProbeSettings",
    "Protocol",
    "ServerFailed",
    "StunProbe",
]
