"""overlay_io: the outside edge. Rings -> UDP (outbound) and UDP -> rings (inbound).

This file is the driver: it moves bytes between the rings and the port, messages between
control and the session table, and reads the clock once per batch. Every decision is in
the pure cores beside it: ``sessions.py`` (``SessionTable``: which session seals for a peer
and where to, which opens a datagram, what to tell control) and ``relay.py`` (relay
payloads, the greedy next hop).

Outbound, a classifier's IP packet (DATA) or a control message (OVERLAY) is sealed with the
peer's send entry (``seal``: ``[header, body]``, the two buffers of one ``sendmsg``) and sent
to its endpoint; a peer without a direct endpoint gets its datagram sealed end to end,
wrapped in a relay payload and sealed as RELAY for the entry's ``hop``: here if this worker
owns the hop's slot, else through control to the worker that does. Handshake datagrams that
control made go out as they are.

Control's PROBE records (shortcut probes and their answers) are sealed with the link's
session, direct or end to end, and sent to the endpoint the record names, not the link's
own; its STUN records (binding requests) go out as they are, from the node's port.

Inbound, a datagram's header is checked (short, version, type); HANDSHAKE and COOKIE
datagrams go to control with their source endpoint; a STUN answer (it looks like DATA, but
its session index is STUN's magic cookie, which no session has, so it is recognised only
when the index lookup misses) goes to control as a STUN record; PROBE datagrams opened with
their link's session go to control with their source endpoint (where a probe came from is
its point); DATA, OVERLAY and RELAY ones are opened
with the receive entry their header's index names (``open``: the replay window and the tag
checked), or, when the index names none, with the entry of their source endpoint
(plaintext mode). DATA goes to the classifier worker of that peer, OVERLAY to control; a
RELAY payload is delivered (its inner datagram handled as if from the network), passed on
with its TTL taken down, or dropped (``relay.on_relay``). A relay never opens an inner
datagram. Every failure is a drop counted by its reason, before any expensive work where
possible.

What the table queues for control (``SessionConfirmed``, ``UnknownSession``,
``RekeyRequest``) is sent after each batch. With ``security.insecure_plaintext`` the
table holds null sessions (no keys, no handshakes; ``sessions.py``) and this file does not
change.

The port is a ``udp.Port``: ``UdpPort`` in a node, a ``MemoryPort`` when a test or benchmark
hands one to the constructor.
"""

from __future__ import annotations

import struct
import time
from collections import Counter
from typing import Any

from pipeline import messages
from pipeline.config import Settings
from pipeline.crypto.datapath import ReadableBuffer
from pipeline.errors import RemoteProtocolError
from pipeline.overlay_io.relay import RelayAction, on_relay, pack_relay
from pipeline.overlay_io.sessions import Address, SendEntry, SessionTable
from pipeline.overlay_io.udp import Port, UdpPort
from pipeline.records import ENDPOINT_LEN, RecordKind, pack_endpoint, unpack_endpoint
from pipeline.route_feed import RouteFeed
from pipeline.shm_ring import Consumer, Producer, RingSpec
from pipeline.topology import Stage
from pipeline.wire.overlay import HEADER_LEN, RELAY_TTL, VERSION, DatagramType
from pipeline.wire.stun import is_stun
from pipeline.worker import Worker

# plain ints, not the IntEnum members: Python 3.11 specializes int compares and indexing
_DATA = int(DatagramType.DATA)
_OVERLAY = int(DatagramType.OVERLAY)
_RELAY = int(DatagramType.RELAY)
_PROBE = int(DatagramType.PROBE)
_INDEX = struct.Struct("!I")
_monotonic = time.monotonic


class OverlayIoWorker(Worker):
    stage = Stage.OVERLAY_IO

    def __init__(
        self,
        settings: Settings,
        index: int,
        rings: dict[str, RingSpec],
        *,
        port: Port | None = None,
    ) -> None:
        """``port``: the port to use (a ``MemoryPort`` in tests); by default ``setup`` binds
        a ``UdpPort`` at ``overlay.listen_address:listen_port``."""
        super().__init__(settings, index, rings)
        self._given_port = port

    def setup(self) -> None:
        s = self.settings
        cfg = s.stages.overlay_io
        self.batch = cfg.batch
        plaintext = s.security.insecure_plaintext
        self.port: Port = self._given_port or UdpPort(
            str(s.overlay.listen_address),
            s.overlay.listen_port,
            buffer_bytes=cfg.socket_buffer_bytes,
        )
        self.from_classifier = self.inputs(Stage.CLASSIFIER)
        self.to_classifier = self.outputs(Stage.CLASSIFIER)
        (self.from_control,) = self.inputs(Stage.CONTROL)
        (self.to_control,) = self.outputs(Stage.CONTROL)
        self.producers: list[Producer] = [*self.to_classifier, self.to_control]
        self.sessions = SessionTable(
            worker=self.index,
            workers=cfg.workers,
            classifiers=len(self.to_classifier),
            plaintext=plaintext,
            rekey_after_bytes=s.security.rekey_after_bytes,
        )
        # the table's dicts, updated in place: read per datagram without an attribute hop
        self.send = self.sessions.send
        self.recv = self.sessions.recv
        self.by_source = self.sessions.by_source
        self.handshake_types = self.sessions.handshake_types
        self.sent = self.sent_bytes = self.received = self.received_bytes = 0
        self.relay_sent = self.relay_forwarded = self.relay_delivered = 0
        self.control_pending = False  # RELAY records pushed to control since the last flush
        self.drops: Counter[str] = Counter()
        self.watch(self.port.fileno(), lambda: None)  # wakes the loop; work() reads
        self.routes = RouteFeed(self, self.sessions.install_routes, self._on_control)
        self.log.info(
            "port_bound",
            address=f"{s.overlay.listen_address}:{s.overlay.listen_port}",
            encrypted=not plaintext,
        )

    def _on_control(self, msg: messages.Message) -> None:
        if isinstance(msg, messages.SessionKeys):
            self.sessions.install_keys(msg)

    # -- the loop ----------------------------------------------------------------------------------

    def work(self) -> int:
        now = _monotonic()
        done = self._receive(now)
        outbound = 0
        for consumer in self.from_classifier:
            outbound += self._seal_and_send(consumer, _DATA)
        if outbound:
            self.sessions.check_rekeys(now)
        done += outbound + self._from_control()
        if done:
            for msg in self.sessions.reports_to_send():
                self.routes.tell(msg)
        return done

    def _seal_and_send(self, consumer: Consumer, dtype: int) -> int:
        records = consumer.pop_batch(self.batch)
        if not records:
            return 0
        sessions = self.send
        send = self.port.send
        sent = sent_bytes = 0  # counted here, added once per batch
        for rec in records:
            out = sessions.get(rec.peer)
            if out is None:
                self._send_relayed(rec.peer, dtype, rec.data)
                continue
            parts = out.seal(dtype, rec.data)
            if send(parts, out.endpoint):
                sent += 1
                sent_bytes += len(parts[1])
        self.sent += sent
        self.sent_bytes += sent_bytes + HEADER_LEN * sent
        consumer.release()
        self._flush_control()
        return len(records)

    def _from_control(self) -> int:
        """Overlay messages and held IP packets to seal for a peer, relay payloads of other
        workers, and handshake datagrams to send as they are."""
        records = self.from_control.pop_batch(self.batch)
        if not records:
            return 0
        for rec in records:
            kind = rec.kind
            if kind == RecordKind.HANDSHAKE or kind == RecordKind.STUN:
                to = unpack_endpoint(rec.data)
                if self.port.send([rec.data[ENDPOINT_LEN:]], to):
                    self.sent += 1
                continue
            if kind == RecordKind.PROBE:
                self._probe(rec.peer, rec.data)
                continue
            out = self.send.get(rec.peer)
            if rec.kind == RecordKind.RELAY:
                # another worker's relay payload for a hop of ours; never back to control
                if out is None:
                    self.drops["no_session"] += 1
                else:
                    self._seal_to(out, _RELAY, rec.data)
                continue
            # an overlay message, or an IP packet that waited for its route in control
            dtype = _DATA if rec.kind == RecordKind.IP_PACKET else _OVERLAY
            if out is None:
                self._send_relayed(rec.peer, dtype, rec.data)
            else:
                self._seal_to(out, dtype, rec.data)
        self.from_control.release()
        self._flush_control()
        return len(records)

    def _probe(self, slot: int, data: memoryview) -> None:
        """A shortcut probe (or its answer) of control's: sealed with the link's session,
        direct or end to end, and sent to the endpoint control names, not the link's own."""
        out = self.send.get(slot) or self.sessions.relayed.get(slot)
        if out is None:
            self.drops["probe_no_session"] += 1
            return
        parts = out.seal(_PROBE, data[ENDPOINT_LEN:])
        if self.port.send(parts, unpack_endpoint(data)):
            self.sent += 1
            self.sent_bytes += HEADER_LEN + len(parts[1])

    def _seal_to(self, out: SendEntry, dtype: int, data: ReadableBuffer) -> None:
        parts = out.seal(dtype, data)
        if self.port.send(parts, out.endpoint):
            self.sent += 1
            self.sent_bytes += HEADER_LEN + len(parts[1])

    # -- relaying ----------------------------------------------------------------------------------

    def _send_relayed(self, slot: int, dtype: int, data: memoryview) -> None:
        """Seal for a peer without a direct endpoint and send it as a relay payload."""
        e2e = self.sessions.relay_route(slot)
        if isinstance(e2e, str):
            self.drops[e2e] += 1
            return
        inner = b"".join(e2e.seal(dtype, data))
        self.relay_sent += 1
        self._to_hop(e2e.hop, pack_relay(e2e.dest, RELAY_TTL, inner))

    def _to_hop(self, hop: int, payload: bytes) -> None:
        """Send a relay payload to a direct link: sealed here if this worker owns the slot,
        else through control to the worker that does."""
        out = self.send.get(hop)
        if out is not None:
            self._seal_to(out, _RELAY, payload)
        elif not self.sessions.owns(hop):
            self.to_control.push(payload, RecordKind.RELAY, hop)
            self.control_pending = True
        else:
            self.drops["no_session"] += 1

    def _flush_control(self) -> None:
        if self.control_pending:
            self.control_pending = False
            self.to_control.flush()

    def _relay(self, payload: ReadableBuffer, source: Address, now: float) -> None:
        """A relay payload opened from a RELAY datagram: deliver, pass on, or drop."""
        step = on_relay(self.sessions.relay_table, payload)
        if step.action is RelayAction.DELIVER:
            self.relay_delivered += 1
            self._open(memoryview(step.data), source, now, True)  # DATA or OVERLAY only
        elif step.action is RelayAction.FORWARD:
            self.relay_forwarded += 1
            self._to_hop(step.hop, bytes(step.data))
        else:
            self.drops[step.reason] += 1

    # -- inbound -----------------------------------------------------------------------------------

    def _receive(self, now: float) -> int:
        port = self.port
        view = port.view
        count = 0
        for _ in range(self.batch):
            got = port.recv()
            if got is None:
                break
            count += 1
            length, source = got
            self._open(view[:length], source, now)
        if count:
            for p in self.producers:
                p.flush()
        return count

    def _open(
        self, datagram: memoryview, source: Address, now: float, relayed: bool = False
    ) -> None:
        if len(datagram) < HEADER_LEN or datagram[0] != VERSION:
            self.drops["short_datagram" if len(datagram) < HEADER_LEN else "bad_version"] += 1
            return
        kind = datagram[1]
        if kind in self.handshake_types:
            self.to_control.push(pack_endpoint(*source) + datagram, RecordKind.HANDSHAKE)
            return
        if kind != _DATA and kind != _OVERLAY and kind != _RELAY and kind != _PROBE:
            if not relayed and is_stun(datagram):  # a STUN error answer (0x0111)
                self.to_control.push(pack_endpoint(*source) + datagram, RecordKind.STUN)
            else:
                self.drops["bad_type"] += 1
            return
        entry = self.recv.get(_INDEX.unpack_from(datagram, 4)[0])
        if entry is None:
            entry = self.by_source.get(source)  # plaintext: peers by endpoint, index 0
            if entry is None:
                # a STUN answer looks like DATA (0x01 0x01) but names the magic cookie as
                # its session index, which no session has: checked only on this miss
                if not relayed and is_stun(datagram):
                    self.to_control.push(pack_endpoint(*source) + datagram, RecordKind.STUN)
                    return
                self.drops[self.sessions.unknown(None if relayed else source, now)] += 1
                return
        try:
            payload = entry.open(datagram)
        except RemoteProtocolError as exc:
            self.drops[exc.reason] += 1
            return
        if not entry.confirmed:
            self.sessions.confirm(entry)
        self.received += 1
        self.received_bytes += len(datagram)
        if kind == _DATA:
            target = self.to_classifier[entry.classifier]
            target.push(payload, RecordKind.IP_PACKET, entry.slot)
        elif kind == _OVERLAY:
            self.to_control.push(payload, RecordKind.OVERLAY, entry.slot)
        elif kind == _RELAY:
            self._relay(payload, source, now)
        elif relayed:
            self.drops["probe_relayed"] += 1  # where a probe came from is its point
        else:
            self.to_control.push(pack_endpoint(*source) + payload, RecordKind.PROBE, entry.slot)

    def stats(self) -> dict[str, Any]:
        return {
            "datagrams_sent": self.sent,
            "bytes_sent": self.sent_bytes,
            "datagrams_received": self.received,
            "bytes_received": self.received_bytes,
            "send_errors": self.port.send_errors,
            "encrypted": not self.sessions.plaintext,
            "sessions": self.sessions.statistics(),
            # relay payloads this node originated, passed on for others, and took for itself
            # (a delivered inner datagram counts in datagrams_received too)
            "relay_sent": self.relay_sent,
            "relay_forwarded": self.relay_forwarded,
            "relay_delivered": self.relay_delivered,
            "drops": dict(self.drops),
        }

    def teardown(self) -> None:
        if hasattr(self, "port"):
            self.port.close()
