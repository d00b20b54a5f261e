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
own; its STUN records (binding requests) go out as they are, from the node's port. Its
POOL records (birthday probing, where this node's NAT maps per destination) are sealed the
same way and sent from every socket of the link's socket pool (``pool.py``: opened at the
first, closed by an empty POOL record or ``POOL_TTL_S`` after its last use). Pool sockets
are read like the port (handshakes screened, the rest opened by session index); the first
authentic datagram of the pool's link on one of them pins that socket: everything sent to
that datagram's source goes from it from then on (``SocketPools.pinned``), and the rest of
the pool is closed.

Inbound, a datagram's header is checked (short, version, type); HANDSHAKE and COOKIE
datagrams (which the kernel steers to a socket of their own when the node runs one
overlay_io worker, ``udp.py``; read after the overlay traffic, a batch at a time, at most
the screen's read budget a second: the rest of a flood stays in the kernel) are
screened (``pipeline/crypto/screen.py``: a bucket per source, mac1, cookies under load; what
fails is a counted drop, a cookie reply goes out from here) and what passes goes to control
with its source endpoint, on the handshake lane, a ring of its own, so a flood never holds
up overlay messages; a STUN answer (it looks like DATA, but
its session index is STUN's magic cookie, which no session has, so it is recognised only
when the index lookup misses) goes to control as a STUN record; PROBE datagrams opened with
their link's session go to control with their source endpoint (where a probe came from is
its point); DATA, OVERLAY and RELAY ones are opened
with the receive entry their header's index names (``open``: the replay window and the tag
checked), or, when the index names none, with the entry of their source endpoint
(plaintext mode); an index that names none is a counted drop, and the screen may answer
its source with a resync hint (never a handshake: the source may be forged). DATA goes to
the classifier worker of that peer, OVERLAY to control; a
RELAY payload is delivered (its inner datagram handled as if from the network), passed on
with its TTL taken down, or dropped (``relay.on_relay``). A relay never opens an inner
datagram. Every failure is a drop counted by its reason, before any expensive work where
possible.

What the table queues for control (``SessionConfirmed``, ``PeerMoved``, ``RekeyRequest``)
is sent after each batch. With ``security.insecure_plaintext`` the table holds null sessions
(no keys, no handshakes, no screen; ``sessions.py``) and this file does not change.

The port is a ``udp.Port``: ``UdpPort`` in a node, a ``MemoryPort`` when a test or benchmark
hands one to the constructor.

Super-frames (``FLAG_VNET`` records, ``pipeline/wire/tso.py``). An IP_PACKET whose virtio-net
header says TSO (or USO) is cut into real segments in place in its ring record
(``tso.segments``), each sealed with one AEAD call into its own DATA datagram with
``FLAG_PARTIAL`` (its checksum is the receiver's to finish; ``seal_each`` cuts and seals in
one loop), and a peer's segments go out in one ``sendmsg`` with ``UDP_SEGMENT``
(``Port.send_segments``; a datagram a call where the kernel cannot, from its first ``EIO``
on). So the wire is unchanged, and one lost datagram costs one TCP segment, never a
super-frame. Inbound, a ``UDP_GRO`` read is cut into its datagrams, each opened on its own
(a run of one session in one loop: ``open_run``), and consecutive segments of one flow are
coalesced (``tso.Coalescer.add_all``) into one IP_PACKET record per super-frame, with the
virtio-net header its TAP should get; the coalescer is flushed at the end of every batch,
never held across a sleep. A packet with ``FLAG_PARTIAL`` that joins nothing goes with
``NEEDS_CSUM``; one without goes as before, no header. Without TAP offloads
(``stages.tap_reader.offloads`` false) nothing is merged, since the tap_reader would only
have to cut it again.

Bytes per peer (``peer_bytes`` in the stats: slot -> [sent, received], only slots with
traffic): the datagrams this worker sent to a slot and opened from it, headers included,
one dict update a record (a GSO batch, a GRO run). A relayed peer's bytes are its
end-to-end datagrams, counted for its own slot; RELAY datagrams are no peer's (what they
carry for this node is counted when sealed and when delivered), so neither is what this
node passes on for others. Handshakes and STUN are no peer's either. A slot's counts go when
control's sessions (or, in plaintext, its routes) no longer hold it, and start again from
zero when the slot is given to another peer.
"""

from __future__ import annotations

import functools
import os
import select
import struct
import time
from collections import Counter
from typing import Any

from pipeline import messages
from pipeline.config import Settings
from pipeline.crypto.datapath import ReadableBuffer
from pipeline.crypto.keyfiles import KeyFileError, read_certificate
from pipeline.crypto.screen import HandshakeScreen, ScreenSettings
from pipeline.errors import RemoteProtocolError, StageIOError
from pipeline.overlay_io.pool import SocketPools
from pipeline.overlay_io.relay import RelayAction, on_relay, pack_relay
from pipeline.overlay_io.sessions import Address, RecvEntry, SendEntry, SessionTable
from pipeline.overlay_io.udp import RECV_SIZE, MemoryPort, Port, UdpPort
from pipeline.records import (
    ENDPOINT_LEN,
    FLAG_VNET,
    RecordKind,
    pack_endpoint,
    unpack_endpoint,
)
from pipeline.route_feed import RouteFeed
from pipeline.shm_ring import MAX_SLOT, Consumer, Producer, RingSpec
from pipeline.topology import Lane, Stage
from pipeline.wire import tso, vnet
from pipeline.wire.overlay import FLAG_PARTIAL, HEADER_LEN, RELAY_TTL, VERSION, DatagramType
from pipeline.wire.stun import is_stun
from pipeline.worker import Worker

# plain ints, not the IntEnum members: Python 3.11 specializes int compares and indexing
_DATA = int(DatagramType.DATA)
_OVERLAY = int(DatagramType.OVERLAY)
_RELAY = int(DatagramType.RELAY)
_PROBE = int(DatagramType.PROBE)
_INDEX = struct.Struct("!I")
_monotonic = time.monotonic
_IP_PACKET = int(RecordKind.IP_PACKET)
_VNET = vnet.LEN
_ZERO_VNET = vnet.ZERO
_GSO_TYPES = frozenset((vnet.GSO_TCPV4, vnet.GSO_UDP_L4))
_NEEDS_CSUM = vnet.NEEDS_CSUM
_GSO_SIZE = struct.Struct("<H")
_RECV_ROOM = 2 * MAX_SLOT  # what one read may emit to a classifier's ring, at most
_POOL = int(RecordKind.POOL)


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
            gso=cfg.offloads,
            gro=cfg.offloads,
            handshake_socket=cfg.workers == 1 and not plaintext,
        )
        self.plaintext = plaintext
        self.coalescer = tso.Coalescer(self._to_classifier, merge=s.stages.tap_reader.offloads)
        self._target: Producer | None = None  # where the coalescer's output goes, for whom
        self._target_slot = -1
        self.run_opened: list[tuple[bytes, int]] = []  # a GRO read's run, for the coalescer
        self.gso_sends = self.segments_sent = self.gro_reads = self.segments_received = 0
        self.from_classifier = self.inputs(Stage.CLASSIFIER)
        self.to_classifier = self.outputs(Stage.CLASSIFIER)
        (self.from_control,) = self.inputs(Stage.CONTROL)
        (self.to_control,) = self.outputs(Stage.CONTROL)
        (self.handshakes_to_control,) = self.outputs(Stage.CONTROL, Lane.HANDSHAKE)
        self.producers: list[Producer] = [
            *self.to_classifier,
            self.to_control,
            self.handshakes_to_control,
        ]
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
        self.heard = self.sessions.heard
        self.suspect_hops = self.sessions.suspect_hops  # a set changed in place
        self.now = 0.0  # the clock of the current pass of work()
        self.handshake_types = self.sessions.handshake_types
        self.sent = self.sent_bytes = self.received = self.received_bytes = 0
        self.relay_sent = self.relay_forwarded = self.relay_delivered = 0
        # bytes per slot, sent and opened (relayed peers under their own slot, not the hop's)
        self.peer_sent: dict[int, int] = {}
        self.peer_received: dict[int, int] = {}
        self.peer_of_slot: dict[int, bytes] = {}  # who each counted slot belongs to
        self.control_pending = False  # RELAY records pushed to control since the last flush
        self.drops: Counter[str] = Counter()
        self.screen = None if plaintext else self._screen()
        self.watch(self.port.fileno(), lambda: None)  # wakes the loop; work() reads
        self.pools: SocketPools[Port] = SocketPools(
            self._open_pool_port, self._close_pool_port, size=s.nat.pool_sockets
        )
        self.pinned = self.pools.pinned  # endpoint -> the pool socket that sends to it
        self._memory_ports = 0  # pool ports made on a given MemoryPort's network
        self._pool_buffer: bytearray | None = None  # every pool socket reads into it
        self.every(1.0, self.pools.expire)
        self.handshakes_paused = False  # the read budget is spent: not watched till then
        if self.port.handshake_fd is not None:
            self.watch(self.port.handshake_fd, lambda: None)
        self.routes = RouteFeed(self, self._on_routes, self._on_control)
        self.log.info(
            "port_bound",
            address=f"{s.overlay.listen_address}:{s.overlay.listen_port}",
            encrypted=not plaintext,
            gso=self.port.gso,
            gro=self.port.gro,
        )

    def _screen(self) -> HandshakeScreen:
        sec = self.settings.security
        try:
            if sec.ca_certificate is None:
                raise KeyFileError("security.ca_certificate is not set")
            ca = read_certificate(sec.ca_certificate)
        except KeyFileError as exc:
            raise StageIOError(f"cannot screen handshakes: {exc}") from exc
        settings = ScreenSettings(load_threshold=sec.handshake_load_threshold)
        return HandshakeScreen(ca.public_key, os.urandom, _monotonic(), settings, self.drops)

    def _open_pool_port(self) -> Port:
        """A pool socket: on an ephemeral port of the node's address, watched; with GSO and
        GRO as the node's port (the one that wins carries the link's data), and all of the
        worker's pool sockets read into one buffer (they are read one at a time)."""
        given = self._given_port
        port: Port
        if isinstance(given, MemoryPort):
            self._memory_ports += 1
            port = given.network.port(
                given.address[0], 40000 + self._memory_ports, gso=given.gso, gro=given.gro
            )
        else:
            if self._pool_buffer is None:
                self._pool_buffer = bytearray(RECV_SIZE)
            port = UdpPort(
                str(self.settings.overlay.listen_address),
                0,
                buffer_bytes=self.settings.stages.overlay_io.socket_buffer_bytes,
                gso=self.port.gso,
                gro=self.port.gro,
                buffer=self._pool_buffer,
            )
        self.watch(port.fileno(), functools.partial(self._receive_pool, port))
        return port

    def _close_pool_port(self, port: Port) -> None:
        self.unwatch(port.fileno())
        port.close()

    def _port_to(self, endpoint: Address) -> Port:
        """The port that sends to ``endpoint``: a pool socket pinned to it, else the node's."""
        pinned = self.pinned
        return pinned.get(endpoint, self.port) if pinned else self.port

    def _on_routes(self, snapshot: messages.RouteSnapshot) -> None:
        self.sessions.install_routes(snapshot)
        if self.plaintext:
            self._forget_closed_slots({p.slot: p.name.encode() for p in snapshot.peers})

    def _on_control(self, msg: messages.Message) -> None:
        if isinstance(msg, messages.SessionKeys):
            self.sessions.install_keys(msg)
            self._forget_closed_slots({e.slot: e.node_id for e in msg.entries})

    def _forget_closed_slots(self, live: dict[int, bytes]) -> None:
        """Byte counts only for the slots control still holds, each for the peer that holds
        it now: a closed link's counts go (they would grow the heartbeat for ever), and a
        slot given to another peer starts from zero."""
        sent, received = self.peer_sent, self.peer_received
        for slot in list(sent.keys() | received.keys()):
            if slot not in live or self.peer_of_slot.get(slot, live[slot]) != live[slot]:
                sent.pop(slot, None)
                received.pop(slot, None)
        self.peer_of_slot = dict(live)

    # -- the loop ----------------------------------------------------------------------------------

    def work(self) -> int:
        self.blocked = False
        now = self.now = _monotonic()
        done = self._receive(now) + self._receive_handshakes(now)
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
        pinned = self.pinned  # birthday probing's pinned sockets: empty as a rule
        peer_sent = self.peer_sent
        sent = sent_bytes = 0  # counted here, added once per batch
        for rec in records:
            peer = rec.peer
            out = sessions.get(peer)
            if rec.flags & FLAG_VNET:
                self._send_vnet(peer, out, rec.data)
                continue
            if out is None:
                self._send_relayed(peer, dtype, rec.data)
                continue
            parts = out.seal(dtype, rec.data)
            to = out.endpoint
            if (pinned[to].send if pinned and to in pinned else send)(parts, to):
                n = HEADER_LEN + len(parts[1])
                sent += 1
                sent_bytes += n
                peer_sent[peer] = peer_sent.get(peer, 0) + n
        self.sent += sent
        self.sent_bytes += sent_bytes
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
                # a handshake to a peer whose traffic goes from a pool socket goes from it too
                port = self._port_to(to) if kind == RecordKind.HANDSHAKE else self.port
                if port.send([rec.data[ENDPOINT_LEN:]], to):
                    self.sent += 1
                continue
            if kind == RecordKind.PROBE:
                self._probe(rec.peer, rec.data)
                continue
            if kind == _POOL:
                self._pool_probe(rec.peer, rec.data)
                continue
            out = self.send.get(rec.peer)
            if rec.kind == RecordKind.RELAY:
                # another worker's relay payload for a hop of ours; never back to control
                if out is None:
                    self.drops["no_session"] += 1
                else:
                    self._seal_to(out, _RELAY, rec.data)  # no peer's bytes: counted at its source
                continue
            # an overlay message, or an IP packet that waited for its route in control
            dtype = _DATA if rec.kind == RecordKind.IP_PACKET else _OVERLAY
            if out is None:
                self._send_relayed(rec.peer, dtype, rec.data)
            else:
                self._seal_to(out, dtype, rec.data, slot=rec.peer)
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
        to = unpack_endpoint(data)
        parts = out.seal(_PROBE, data[ENDPOINT_LEN:])
        if self._port_to(to).send(parts, to):
            n = HEADER_LEN + len(parts[1])
            self.sent += 1
            self.sent_bytes += n
            self.peer_sent[slot] = self.peer_sent.get(slot, 0) + n

    def _pool_probe(self, slot: int, data: memoryview) -> None:
        """Birthday probing: control's probe sealed and sent from every socket of the link's
        pool (or its pinned one); an empty record closes the pool."""
        if not data:
            self.pools.close(slot)
            return
        out = self.send.get(slot) or self.sessions.relayed.get(slot)
        if out is None:
            self.drops["probe_no_session"] += 1
            return
        to = unpack_endpoint(data)
        payload = data[ENDPOINT_LEN:]
        for port in self.pools.ports_for(slot, self.now):
            parts = out.seal(_PROBE, payload)
            if port.send(parts, to):
                n = HEADER_LEN + len(parts[1])
                self.sent += 1
                self.sent_bytes += n
                self.peer_sent[slot] = self.peer_sent.get(slot, 0) + n

    def _send_vnet(self, slot: int, out: SendEntry | None, data: memoryview) -> None:
        """An IP packet after its virtio-net header: a super-frame is cut in place into
        segments, each sealed on its own with ``FLAG_PARTIAL`` and all sent in one GSO
        batch; a packet whose checksum is left to finish is sealed with ``FLAG_PARTIAL``."""
        packet = data[_VNET:]
        gso_size = _GSO_SIZE.unpack_from(data, 4)[0]
        partial = FLAG_PARTIAL if data[0] & _NEEDS_CSUM else 0
        if not (data[1] & 0x7F in _GSO_TYPES and gso_size):
            if out is None:
                self._send_relayed(slot, _DATA, packet, partial)
            else:
                self._seal_to(out, _DATA, packet, partial, slot)
            return
        try:
            views = tso.segments(packet, 0, len(packet), gso_size)
        except ValueError:  # not TCP or UDP, IP options, a header cut short: no segments
            # tso.segment cuts with the same split, so what split refuses cannot be sent in
            # software either: a counted drop (the kernel's TSO never makes such a frame; a
            # broken record might), never an exception out of the worker
            self.drops["gso_unsplittable"] += 1
            return
        if out is None:  # relayed: each segment kept (the next one's headers overwrite its
            # view), sealed end to end, wrapped, sealed per hop
            for piece in [bytes(view) for view in views]:
                self._send_relayed(slot, _DATA, piece, FLAG_PARTIAL)
            return
        pieces: list[ReadableBuffer] = []
        n = out.seal_each(pieces, _DATA, views, FLAG_PARTIAL)  # each segment cut, then sealed
        port = self._port_to(out.endpoint)
        sent = port.send_segments(pieces, len(pieces[0]) + len(pieces[1]), out.endpoint)
        self.gso_sends += 1
        self.segments_sent += len(pieces) // 2
        self.sent += sent
        self.sent_bytes += n
        self.peer_sent[slot] = self.peer_sent.get(slot, 0) + n

    def _seal_to(
        self, out: SendEntry, dtype: int, data: ReadableBuffer, flags: int = 0, slot: int = -1
    ) -> None:
        """Seal and send to ``out``'s endpoint; the bytes count for ``slot`` unless it is -1
        (RELAY datagrams: no peer's)."""
        parts = out.seal(dtype, data, flags)
        if self._port_to(out.endpoint).send(parts, out.endpoint):
            n = HEADER_LEN + len(parts[1])
            self.sent += 1
            self.sent_bytes += n
            if slot >= 0:
                self.peer_sent[slot] = self.peer_sent.get(slot, 0) + n

    # -- relaying ----------------------------------------------------------------------------------

    def _send_relayed(self, slot: int, dtype: int, data: ReadableBuffer, flags: int = 0) -> None:
        """Seal for a peer without a direct endpoint and send it as a relay payload."""
        e2e = self.sessions.relay_route(slot)
        if isinstance(e2e, str):
            self.drops[e2e] += 1
            return
        inner = b"".join(e2e.seal(dtype, data, flags))
        self.relay_sent += 1
        self.peer_sent[slot] = self.peer_sent.get(slot, 0) + len(inner)  # the peer's, not the hop's
        self._to_hop(e2e.hop, pack_relay(e2e.dest, RELAY_TTL, inner))

    def _to_hop(self, hop: int, payload: bytes) -> None:
        """Send a relay payload to a direct link: sealed here if this worker owns the slot,
        else through control to the worker that does."""
        out = self.send.get(hop)
        if out is not None:
            self._seal_to(out, _RELAY, payload)
            self.sessions.relayed_over(hop, self.now)
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
        recv_batch = port.recv_batch
        open_ = self._open
        plaintext = self.plaintext
        count = 0
        targets = self.to_classifier
        for _ in range(self.batch):
            # back-pressure: a read (a GRO batch: up to a super-frame, plus the one the
            # coalescer holds) waits in the socket until the classifier's rings have room;
            # what the kernel drops there meanwhile is single datagrams, never super-frames
            if any(t.room() < _RECV_ROOM for t in targets):
                self.blocked = True
                break
            got = recv_batch()
            if got is None:
                break
            count += 1
            length, source, segment = got
            if segment >= length:
                open_(view[:length], source, now)
            else:
                self.gro_reads += 1
                self.segments_received += -(-length // segment)
                self._open_batch(view[:length], segment, source, now)
            if plaintext:  # what it opened is a view of the buffer the next read overwrites
                self.coalescer.flush()
        if count:
            self.coalescer.flush()
            for p in self.producers:
                p.flush()
            self._send_screen_replies()
        return count

    def _receive_pool(self, port: Port) -> None:
        """A pool socket is readable: a batch of its datagrams, each opened as from the
        port, and taken only if the pool lets it (``SocketPools.arrived``)."""
        now = self.now = _monotonic()
        view = port.view
        count = 0
        for _ in range(self.batch):
            if any(t.room() < _RECV_ROOM for t in self.to_classifier):
                break  # the rest waits in the socket (the loop comes back: it stays readable)
            got = port.recv_batch()
            if got is None:
                break
            count += 1
            length, source, segment = got
            if segment >= length:
                self._open(view[:length], source, now, pool=port)
            else:
                self.gro_reads += 1
                self.segments_received += -(-length // segment)
                if self.pinned.get(source) is port:
                    # the won socket, from the peer it is pinned to: as the port's reads
                    self._open_batch(view[:length], segment, source, now)
                else:  # not pinned yet (or another source): each datagram asks the pool
                    for at in range(0, length, segment):
                        self._open(view[at : min(at + segment, length)], source, now, pool=port)
                        if port.fileno() < 0:
                            break
            self.coalescer.flush()  # the next read (of any pool socket) overwrites the buffer
            if port.fileno() < 0:
                break  # the pool closed this socket (another won): the rest is not ours
        if count:
            for p in self.producers:
                p.flush()
            self._send_screen_replies()
            for msg in self.sessions.reports_to_send():
                self.routes.tell(msg)

    def _receive_handshakes(self, now: float) -> int:
        """At most a batch from the handshake socket (if the port has one), after the
        overlay traffic: a flood waits there, or the kernel drops it, never the rest."""
        screen = self.screen
        fd = self.port.handshake_fd
        if screen is None or fd is None or self.handshakes_paused:
            return 0
        budget = screen.read_budget(now, self.batch)
        if not budget:  # the rest waits in the kernel (or is dropped there) until then
            self.handshakes_paused = True
            self.epoll.modify(fd, 0)
            self.arm(screen.next_read(now))
            return 0
        recv, view = self.port.recv_handshake, self.port.handshake_view
        lane = self.handshakes_to_control
        count = 0
        for _ in range(budget):
            got = recv()
            if got is None:
                screen.unread(budget - count)
                break
            count += 1
            length, source = got
            datagram = view[:length]
            if length >= 2 and datagram[1] in self.handshake_types:
                if screen.screen(datagram, source, now):
                    lane.push_parts([pack_endpoint(*source), datagram], RecordKind.HANDSHAKE)
            else:  # the kernel's program steers only these here
                self.drops["bad_type"] += 1
        if count:
            lane.flush()
            self._send_screen_replies()
        return count

    def on_deadline(self, now: float) -> None:
        """The handshake read budget has tokens again: watch the socket again."""
        if self.handshakes_paused and self.port.handshake_fd is not None:
            self.handshakes_paused = False
            self.epoll.modify(self.port.handshake_fd, select.EPOLLIN)

    def _send_screen_replies(self) -> None:
        if self.screen is not None:
            for datagram, to in self.screen.datagrams_to_send():
                # to a peer whose traffic goes from a won pool socket, from that socket: its
                # NAT lets in nothing from the node's port
                if self._port_to(to).send([datagram], to):
                    self.sent += 1

    def _open_batch(self, batch: memoryview, segment: int, source: Address, now: float) -> None:
        """A GRO read: datagrams of one source ``segment`` bytes apart. The run of DATA
        datagrams of one session (a peer's GSO batch: all of them, as a rule) is opened
        and coalesced in a tight loop; anything else goes through ``_open`` one by one."""
        length = len(batch)
        at = 0
        while at < length:
            first = batch[at : at + segment]
            entry = None
            if first[0] == VERSION and first[1] == _DATA and len(first) > HEADER_LEN:
                entry = self.recv.get(_INDEX.unpack_from(first, 4)[0])
            if entry is None:
                if first[1] in self.handshake_types and self._blocked(source, now):
                    at = self._drop_handshakes(batch, at, segment)  # a flood: O(1) a datagram
                    continue
                self._open(first, source, now)
                at += segment
                continue
            if entry.slot != self._target_slot:
                self.coalescer.flush()
                self._target_slot = entry.slot
                self._target = self.to_classifier[entry.classifier]
            start = at
            got = self.run_opened
            at, opened_bytes = entry.session.open_run(batch, at, segment, _DATA, got, self.drops)
            if at == start:  # opened nothing and moved on: one by one
                self._open(first, source, now)
                at += segment
                continue
            opened = len(got)
            if opened:
                self.coalescer.add_all(got)
                got.clear()
                self.heard[entry.slot] = now
                if self.suspect_hops and entry.slot in self.suspect_hops:
                    self.sessions.hop_heard(entry.slot)
                if not entry.confirmed:
                    self.sessions.confirm(entry)
                if source != entry.seen:  # a GRO read is never relayed: roaming as in _open
                    self.sessions.moved(entry, source)
            self.received += opened
            self.received_bytes += opened_bytes
            slot = entry.slot
            self.peer_received[slot] = self.peer_received.get(slot, 0) + opened_bytes

    def _blocked(self, source: Address, now: float) -> bool:
        return self.screen is not None and self.screen.blocked(source[0], now)

    def _drop_handshakes(self, batch: memoryview, at: int, segment: int) -> int:
        """The handshake datagrams of a GRO read from a source over its bucket, from ``at``
        on: dropped as the screen would (counted), unread; returns where the rest begins."""
        length = len(batch)
        types = self.handshake_types
        dropped = 0
        while at < length and batch[at + 1 : at + 2] and batch[at + 1] in types:
            dropped += 1
            at += segment
        self.drops["handshake_rate_limited"] += dropped
        return at

    def _deliver(self, entry: RecvEntry, payload: ReadableBuffer, partial: int) -> None:
        """An opened DATA packet for the classifier: through the coalescer, which merges
        what it can and keeps every packet of a peer in order."""
        if entry.slot != self._target_slot:
            self.coalescer.flush()
            self._target_slot = entry.slot
            self._target = self.to_classifier[entry.classifier]
        if partial:
            self.coalescer.add(payload, True)
        elif self.coalescer.empty:  # as before offloads: one packet, one record, no header
            self.to_classifier[entry.classifier].push(payload, _IP_PACKET, entry.slot)
        else:
            self.coalescer.add(payload, False)

    def _to_classifier(
        self, header: bytes, head: ReadableBuffer, packets: list[ReadableBuffer], skip: int
    ) -> None:
        """What the coalescer emits (``tso.Emit``): one IP_PACKET record, with its virtio-net
        header unless that is all zero (a packet as it came)."""
        target = self._target
        assert target is not None
        if header is _ZERO_VNET:
            target.push(head, _IP_PACKET, self._target_slot)
        else:
            target.push_cut([header, head], packets, skip, _IP_PACKET, self._target_slot, FLAG_VNET)

    def _open(
        self,
        datagram: memoryview,
        source: Address,
        now: float,
        relayed: bool = False,
        pool: Port | None = None,
    ) -> None:
        """``pool``: the pool socket it came to (None: the node's port, or a relay)."""
        if len(datagram) < HEADER_LEN or datagram[0] != VERSION:
            self.drops["short_datagram" if len(datagram) < HEADER_LEN else "bad_version"] += 1
            return
        kind = datagram[1]
        if kind in self.handshake_types:
            screen = self.screen
            if screen is not None and screen.screen(datagram, source, now):
                self.handshakes_to_control.push_parts(
                    [pack_endpoint(*source), datagram], RecordKind.HANDSHAKE
                )
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
                if self.screen is not None and not relayed:
                    self.screen.unknown_session(_INDEX.unpack_from(datagram, 4)[0], source, now)
                self.drops["unknown_source" if self.plaintext else "unknown_session"] += 1
                return
        try:
            payload = entry.open(datagram)
        except RemoteProtocolError as exc:
            self.drops[exc.reason] += 1
            return
        if pool is not None and not self.pools.arrived(pool, entry.slot, source):
            self.drops["pool_other_link"] += 1
            return
        if not entry.confirmed:
            self.sessions.confirm(entry)
        if source != entry.seen and not relayed:
            self.sessions.moved(entry, source)
        self.heard[entry.slot] = now
        if self.suspect_hops and entry.slot in self.suspect_hops:
            self.sessions.hop_heard(entry.slot)
        self.received += 1
        self.received_bytes += len(datagram)
        if kind != _RELAY:  # a RELAY datagram is no peer's: what it delivers is counted inside
            slot = entry.slot
            self.peer_received[slot] = self.peer_received.get(slot, 0) + len(datagram)
        if kind == _DATA:
            self._deliver(entry, payload, datagram[3] & FLAG_PARTIAL)
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
            "gso": self.port.gso,
            "gro": self.port.gro,
            "gso_sends": self.gso_sends,
            "segments_sent": self.segments_sent,
            "gro_reads": self.gro_reads,
            "segments_received": self.segments_received,
            "coalesced": {"packets": self.coalescer.packets, "frames": self.coalescer.frames},
            "encrypted": not self.sessions.plaintext,
            "sessions": self.sessions.statistics(),
            "send_ciphers": self.sessions.send_ciphers(),
            # relay payloads this node originated, passed on for others, and took for itself
            # (a delivered inner datagram counts in datagrams_received too)
            "relay_sent": self.relay_sent,
            "relay_forwarded": self.relay_forwarded,
            "relay_delivered": self.relay_delivered,
            # relay hops left out as silent (they did not answer control's ping), and now
            "relay_hops_suspected": self.sessions.hops_suspected,
            "relay_hops_suspect": len(self.suspect_hops),
            "drops": self._drops(),
            "screen": self.screen.statistics() if self.screen is not None else {},
            "handshake_socket": self.port.handshake_fd is not None,
            "pools": self.pools.statistics(),
            "peer_bytes": self.peer_bytes(),
        }

    def _drops(self) -> dict[str, int]:
        drops = dict(self.drops)
        if self.port.handshake_overflows:  # the kernel's, at the handshake socket's buffer
            drops["handshake_overflow"] = self.port.handshake_overflows
        return drops

    def peer_bytes(self) -> dict[int, list[int]]:
        """Slot -> [bytes sent, bytes received], for the slots with traffic."""
        sent, received = self.peer_sent, self.peer_received
        return {slot: [sent.get(slot, 0), received.get(slot, 0)] for slot in sent.keys() | received}

    def teardown(self) -> None:
        if hasattr(self, "pools"):
            self.pools.close_all()
        if hasattr(self, "port"):
            self.port.close()
