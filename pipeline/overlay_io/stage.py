"""overlay_io: the outside edge. Rings -> UDP (outbound) and UDP -> rings (inbound).

Outbound, a classifier's IP packet (DATA) or a control message (OVERLAY) is sealed with the
peer's send session and sent to the peer's endpoint; handshake datagrams that control made
go out as they are. Inbound, DATA and OVERLAY datagrams are opened with the receive session
their header names (the replay window and the AEAD tag checked) and go to the classifier
worker of that peer or to control; HANDSHAKE and COOKIE datagrams go to control with their
source endpoint. Everything else is a counted drop, before any expensive work.

Session keys come from control (``SessionKeys`` over ZeroMQ). A send session is used only
once confirmed (the peer holds its keys) and only by the worker that owns the peer, starting
at the counter control reserved for this worker's incarnation. The first datagram opened on
an unconfirmed session is reported to control (``SessionConfirmed``); a send session that
carried its volume asks for a new handshake (``RekeyRequest``).

Relaying (``relay.py``): a peer with an end-to-end session but no direct endpoint gets its
datagrams sealed with that session as usual, wrapped in a relay payload (its node id, a TTL)
and sent, sealed as a RELAY datagram with the hop session, to the direct link closest to it
(``RelayTable``). The hop slot may belong to another worker, which alone may seal for it:
then the payload goes to control as a RELAY record, and control passes it to that worker's
ring. A RELAY datagram received is opened with its hop session like DATA; its inner datagram
is handled as if it had come from the network when it is for this node, or passed on with
the TTL taken down. A relay never opens an inner datagram (it has no key for it).

With ``security.insecure_plaintext`` datagrams are neither sealed nor opened, and the peer of
an inbound datagram is known by its source endpoint (for measuring the pipeline alone); there
is no relaying (RELAY datagrams are ``bad_type``).
"""

from __future__ import annotations

import itertools
import struct
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from pipeline import messages
from pipeline.crypto.datapath import RecvSession, SendSession
from pipeline.errors import RemoteProtocolError
from pipeline.overlay_io.relay import RelayAction, RelayTable, on_relay, pack_relay
from pipeline.overlay_io.udp import Address, UdpPort
from pipeline.records import ENDPOINT_LEN, RecordKind, pack_endpoint, unpack_endpoint
from pipeline.route_feed import RouteFeed
from pipeline.shm_ring import Consumer, Producer
from pipeline.topology import Stage, worker_for_peer
from pipeline.wire.overlay import (
    HEADER_LEN,
    RELAY_TTL,
    VERSION,
    DatagramType,
    build_header,
    parse_header,
)
from pipeline.worker import Worker

_DATA = DatagramType.DATA
_OVERLAY = DatagramType.OVERLAY
_HANDSHAKE = DatagramType.HANDSHAKE
_COOKIE = DatagramType.COOKIE
_RELAY = DatagramType.RELAY
_PLAIN_DATA = build_header(_DATA)
_PLAIN_OVERLAY = build_header(_OVERLAY)
_INDEX = struct.Struct("!I")
UNKNOWN_SESSION_S = 2.0


@dataclass(slots=True)
class _Recv:
    session: RecvSession
    slot: int
    key: bytes
    confirmed: bool


@dataclass(slots=True)
class _Send:
    session: SendSession
    key: bytes
    endpoint: Address  # relayed sessions: _NO_ENDPOINT (never sent to)
    rekey_asked: bool = False
    dest: bytes = b""  # the peer's node id: the dest of relay payloads for a relayed session


_NO_ENDPOINT: Address = ("", 0)


def _address(text: str) -> Address:
    host, _, port = text.rpartition(":")
    return host, int(port)


class OverlayIoWorker(Worker):
    stage = Stage.OVERLAY_IO

    def setup(self) -> None:
        s = self.settings
        cfg = s.stages.overlay_io
        self.batch = cfg.batch
        self.secure = not s.security.insecure_plaintext
        self.rekey_bytes = s.security.rekey_after_bytes
        self.port = UdpPort(
            str(s.overlay.listen_address),
            s.overlay.listen_port,
            buffer_bytes=cfg.socket_buffer_bytes,
        )
        self.workers = cfg.workers
        self.from_classifier = self.inputs(Stage.CLASSIFIER)
        self.to_classifier = self.outputs(Stage.CLASSIFIER)
        (self.from_control,) = self.inputs(Stage.CONTROL)
        (self.to_control,) = self.outputs(Stage.CONTROL)
        self.producers: list[Producer] = [*self.to_classifier, self.to_control]
        self.endpoints: dict[int, Address] = {}
        self.slots: dict[Address, int] = {}
        self.recv: dict[int, _Recv] = {}
        self.send: dict[int, _Send] = {}  # direct sessions of the slots this worker owns
        self.relayed: dict[int, _Send] = {}  # end-to-end sessions (no endpoint) it owns
        self.relay_table = RelayTable(b"", ())
        self.keys_version = -1
        self.unknown_told: dict[Address, float] = {}
        self.sent = self.sent_bytes = self.received = self.received_bytes = 0
        self.relay_sent = self.relay_forwarded = self.relay_delivered = 0
        self.control_pending = False  # RELAY records pushed to control since the last flush
        self.drops: Counter[str] = Counter()
        self.watch(self.port.fileno(), lambda: None)  # wakes the loop; work() reads
        self.routes = RouteFeed(self, self._apply_routes, self._on_control)
        self.log.info(
            "port_bound",
            address=f"{s.overlay.listen_address}:{s.overlay.listen_port}",
            encrypted=self.secure,
        )

    # -- from control ----------------------------------------------------------------------------

    def _apply_routes(self, snap: messages.RouteSnapshot) -> None:
        if self.secure:
            return  # endpoints come with the session keys
        self.endpoints = {peer.slot: _address(peer.endpoint) for peer in snap.peers}
        self.slots = {addr: slot for slot, addr in self.endpoints.items()}

    def _on_control(self, msg: messages.Message) -> None:
        if isinstance(msg, messages.SessionKeys) and self.secure:
            self._install(msg)

    def _install(self, keys: messages.SessionKeys) -> None:
        """Take control's sessions; keep the objects (counters, replay windows) we have."""
        recv: dict[int, _Recv] = {}
        newest: dict[int, messages.KeyEntry] = {}
        for e in keys.entries:
            old = self.recv.get(e.recv_index)
            if old is not None and old.key == e.recv_key:
                old.confirmed = old.confirmed or e.confirmed
                recv[e.recv_index] = old
            else:
                opener = RecvSession(e.recv_key, index=e.recv_index, created=e.created)
                recv[e.recv_index] = _Recv(opener, e.slot, e.recv_key, e.confirmed)
            confirmed = recv[e.recv_index].confirmed
            if confirmed and (e.slot not in newest or newest[e.slot].created < e.created):
                newest[e.slot] = e
        send: dict[int, _Send] = {}
        relayed: dict[int, _Send] = {}
        hops: list[tuple[int, bytes]] = []  # every direct link, whichever worker owns it
        for slot, e in newest.items():
            if e.endpoint:
                hops.append((slot, e.node_id))
            if worker_for_peer(slot, self.workers) != self.index:
                continue
            # one session object per key, wherever it was: its counter must go on
            old_send = self.send.get(slot) or self.relayed.get(slot)
            if old_send is not None and old_send.key == e.send_key:
                out = old_send
            else:
                sealer = SendSession(
                    e.send_key,
                    index=e.send_index,
                    created=e.created,
                    counter_start=e.counter_start,
                    rekey_after_bytes=self.rekey_bytes,
                )
                out = _Send(sealer, e.send_key, _NO_ENDPOINT)
            out.dest = e.node_id
            if e.endpoint:
                out.endpoint = _address(e.endpoint)
                send[slot] = out
            else:
                out.endpoint = _NO_ENDPOINT
                relayed[slot] = out
        self.recv, self.send, self.relayed = recv, send, relayed
        self.relay_table = RelayTable(keys.node_id, hops)
        self.keys_version = keys.version

    # -- the loop ----------------------------------------------------------------------------------

    def work(self) -> int:
        done = self._receive()
        if self.secure:
            for consumer in self.from_classifier:
                done += self._seal_and_send(consumer, _DATA)
            done += self._from_control()
        else:
            for consumer in self.from_classifier:
                done += self._send_plain(consumer, _PLAIN_DATA)
            done += self._send_plain(self.from_control, _PLAIN_OVERLAY)
        return done

    def _seal_and_send(self, consumer: Consumer, dtype: int) -> int:
        records = consumer.pop_batch(self.batch)
        if not records:
            return 0
        sessions = self.send
        send = self.port.send
        for rec in records:
            out = sessions.get(rec.peer)
            if out is None:
                self._send_relayed(rec.peer, dtype, rec.data)
                continue
            header, sealed = out.session.seal(dtype, rec.data)
            if send([header, sealed], out.endpoint):
                self.sent += 1
                self.sent_bytes += HEADER_LEN + len(sealed)
        consumer.release()
        self._flush_control()
        self._ask_rekeys()
        return len(records)

    def _from_control(self) -> int:
        """Overlay messages and held IP packets to seal for a peer, relay payloads of other
        workers, and handshake datagrams to send as they are."""
        records = self.from_control.pop_batch(self.batch)
        if not records:
            return 0
        for rec in records:
            if rec.kind == RecordKind.HANDSHAKE:
                to = unpack_endpoint(rec.data)
                if self.port.send([rec.data[ENDPOINT_LEN:]], to):
                    self.sent += 1
                continue
            out = self.send.get(rec.peer)
            if rec.kind == RecordKind.RELAY:
                # another worker's relay payload for a hop of ours; never back to control
                if out is None:
                    self.drops["no_session"] += 1
                else:
                    self._seal_relay(out, rec.data)
            else:
                # an overlay message, or an IP packet that waited for its route in control
                dtype = _DATA if rec.kind == RecordKind.IP_PACKET else _OVERLAY
                if out is None:
                    self._send_relayed(rec.peer, dtype, rec.data)
                    continue
                header, sealed = out.session.seal(dtype, rec.data)
                if self.port.send([header, sealed], out.endpoint):
                    self.sent += 1
        self.from_control.release()
        self._flush_control()
        return len(records)

    # -- relaying ----------------------------------------------------------------------------------

    def _send_relayed(self, slot: int, dtype: int, data: memoryview) -> None:
        """Seal for a peer without a direct endpoint and send it as a relay payload."""
        e2e = self.relayed.get(slot)
        if e2e is None:
            self.drops["no_session"] += 1
            return
        hop = self.relay_table.next_hop(e2e.dest)
        if hop is None:
            self.drops["relay_no_route"] += 1
            return
        header, sealed = e2e.session.seal(dtype, data)
        self.relay_sent += 1
        self._to_hop(hop, pack_relay(e2e.dest, RELAY_TTL, header + sealed))

    def _to_hop(self, hop: int, payload: bytes) -> None:
        """Send a relay payload to a direct link: sealed here if this worker owns the slot,
        else through control to the worker that does."""
        out = self.send.get(hop)
        if out is not None:
            self._seal_relay(out, payload)
        elif worker_for_peer(hop, self.workers) != self.index:
            self.to_control.push(payload, RecordKind.RELAY, hop)
            self.control_pending = True
        else:
            self.drops["no_session"] += 1

    def _seal_relay(self, out: _Send, payload: bytes | memoryview) -> None:
        header, sealed = out.session.seal(_RELAY, payload)
        if self.port.send([header, sealed], out.endpoint):
            self.sent += 1
            self.sent_bytes += HEADER_LEN + len(sealed)

    def _flush_control(self) -> None:
        if self.control_pending:
            self.control_pending = False
            self.to_control.flush()

    def _relay(self, payload: bytes, source: Address) -> None:
        """A relay payload opened from a RELAY datagram: deliver, pass on, or drop."""
        step = on_relay(self.relay_table, payload)
        if step.action is RelayAction.DELIVER:
            self.relay_delivered += 1
            self._open(memoryview(step.data), source, relayed=True)  # DATA or OVERLAY only
        elif step.action is RelayAction.FORWARD:
            self.relay_forwarded += 1
            self._to_hop(step.hop, bytes(step.data))
        else:
            self.drops[step.reason] += 1

    def _unknown_session(self, source: Address) -> None:
        """A peer sends on a session we do not hold (we restarted, it did not notice): ask
        control for a handshake with it, at most once every UNKNOWN_SESSION_S a source."""
        now = time.monotonic()
        if now - self.unknown_told.get(source, -UNKNOWN_SESSION_S) < UNKNOWN_SESSION_S:
            return
        if len(self.unknown_told) >= 1024:
            self.unknown_told = {
                s: t for s, t in self.unknown_told.items() if now - t < UNKNOWN_SESSION_S
            }
        self.unknown_told[source] = now
        self.routes.tell(messages.UnknownSession(f"{source[0]}:{source[1]}"))

    def _ask_rekeys(self) -> None:
        now = time.monotonic()
        for slot, out in itertools.chain(self.send.items(), self.relayed.items()):
            if not out.rekey_asked and out.session.needs_rekey(now):
                out.rekey_asked = True
                self.routes.tell(messages.RekeyRequest(slot))

    def _send_plain(self, consumer: Consumer, header: bytes) -> int:
        records = consumer.pop_batch(self.batch)
        if not records:
            return 0
        endpoints = self.endpoints
        send = self.port.send
        for rec in records:
            address = endpoints.get(rec.peer)
            if address is None:
                self.drops["no_endpoint"] += 1
            elif send([header, rec.data], address):
                self.sent += 1
                self.sent_bytes += HEADER_LEN + len(rec.data)
        consumer.release()
        return len(records)

    def _receive(self) -> int:
        port = self.port
        view = port.view
        count = 0
        for _ in range(self.batch):
            got = port.recv()
            if got is None:
                break
            count += 1
            length, source = got
            if self.secure:
                self._open(view[:length], source)
            else:
                self._accept_plain(view[:length], source)
        if count:
            for p in self.producers:
                p.flush()
        return count

    def _open(self, datagram: memoryview, source: Address, *, relayed: bool = False) -> None:
        if len(datagram) < HEADER_LEN or datagram[0] != VERSION:
            self.drops["short_datagram" if len(datagram) < HEADER_LEN else "bad_version"] += 1
            return
        kind = datagram[1]
        if kind == _HANDSHAKE or kind == _COOKIE:
            self.to_control.push(pack_endpoint(*source) + datagram, RecordKind.HANDSHAKE)
            return
        if kind != _DATA and kind != _OVERLAY and kind != _RELAY:
            self.drops["bad_type"] += 1
            return
        entry = self.recv.get(_INDEX.unpack_from(datagram, 4)[0])
        if entry is None:
            self.drops["unknown_session"] += 1
            if not relayed:
                self._unknown_session(source)
            return
        try:
            payload = entry.session.open(datagram)
        except RemoteProtocolError as exc:
            self.drops[exc.reason] += 1
            return
        if not entry.confirmed:
            entry.confirmed = True
            self.routes.tell(messages.SessionConfirmed(entry.session.index))
        self.received += 1
        self.received_bytes += len(datagram)
        slot = entry.slot
        if kind == _DATA:
            target = self.to_classifier[worker_for_peer(slot, len(self.to_classifier))]
            target.push(payload, RecordKind.IP_PACKET, slot)
        elif kind == _OVERLAY:
            self.to_control.push(payload, RecordKind.OVERLAY, slot)
        else:
            self._relay(payload, source)

    def _accept_plain(self, datagram: memoryview, source: Address) -> None:
        slot = self.slots.get(source)
        if slot is None:
            self.drops["unknown_source"] += 1
            return
        try:
            header = parse_header(datagram)
        except RemoteProtocolError as exc:
            self.drops[exc.reason] += 1
            return
        payload = datagram[HEADER_LEN:]
        self.received += 1
        self.received_bytes += len(datagram)
        if header.type is DatagramType.DATA:
            target = self.to_classifier[worker_for_peer(slot, len(self.to_classifier))]
            target.push(payload, RecordKind.IP_PACKET, slot)
        elif header.type is DatagramType.OVERLAY:
            self.to_control.push(payload, RecordKind.OVERLAY, slot)
        else:
            self.drops["bad_type"] += 1

    def stats(self) -> dict[str, Any]:
        return {
            "datagrams_sent": self.sent,
            "bytes_sent": self.sent_bytes,
            "datagrams_received": self.received,
            "bytes_received": self.received_bytes,
            "send_errors": self.port.send_errors,
            "encrypted": self.secure,
            "sessions": {"receive": len(self.recv), "send": len(self.send) + len(self.relayed)},
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
