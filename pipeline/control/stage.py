"""control: the node's brain: links and their session keys, the overlay and its DHT, the
route table, and keepalives. This file is the driver; the decisions are in the sans-I/O
``ControlCore`` (pipeline/control/core.py: links, overlay, DHT, routes).

- Links: Noise sessions with the configured peers and with any certified member the overlay
  links to. Handshake datagrams arrive from overlay_io rings (HANDSHAKE records, with the
  sender's endpoint) and leave through them; session keys go to each overlay_io worker over
  ZeroMQ (``SessionKeys``), each with a send counter range of its own incarnation, so a
  restarted worker never reuses a nonce. The revocation list is re-read when it changes.
- Overlay: its messages travel sealed on the links (OVERLAY records whose payload starts
  with the overlay codec's version byte); the keepalives of the static peers are msgpack
  maps in the same records. RELAY records (a relayed datagram for a hop owned by another
  overlay_io worker) are passed on to that worker.
- Routes: the static peers and the addresses resolved through the DHT (a classifier's
  ``RouteMiss``) become a versioned route table published to classifier and overlay_io
  workers (PUB), and sent to a worker that asks (ROUTER).
- Tools: ``DhtGetRequest`` on the ROUTER socket (``supervisor dht get``).
- Keepalives: ``PeerTable`` pings every linked peer through the encrypted sessions and
  measures its RTT.

With ``security.insecure_plaintext`` there are no links: overlay_io sends in the clear to
the configured endpoints (for measuring the pipeline alone).
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import Counter
from ipaddress import IPv4Address
from typing import Any

import zmq

from pipeline import messages
from pipeline.config import GATEWAY_MAC, Mode
from pipeline.control.addressing import Addressing, AddressingSettings, Machine
from pipeline.control.core import ControlCore, CoreEvent
from pipeline.control.dht import CreateResult, GetResult, key_position
from pipeline.control.links import EventKind, LinkEvent, LinkSettings, PeerSpec, Via
from pipeline.control.overlay import wire as overlay_wire
from pipeline.control.peers import PeerState, PeerTable
from pipeline.crypto.keyfiles import KeyFileError, load_membership, read_revocation_list
from pipeline.errors import StageIOError
from pipeline.nodeid import id_to_bytes
from pipeline.records import ENDPOINT_LEN, RecordKind, pack_endpoint, unpack_endpoint
from pipeline.topology import Stage, worker_for_peer
from pipeline.worker import CONTROL_PUB_SOCKET, CONTROL_SOCKET, Worker, endpoint

ADDRESS_FILE = "address"  # in state_dir: the address DHCP last granted, asked for first
LEASES_FILE = "leases.json"  # router mode: each machine's address, kept across restarts
REPUBLISH_S = 2.0
CORE_TICK_S = 0.1
REVOCATION_CHECK_S = 1.0
GENERATION_SHIFT = 40  # send counters of incarnation g start at g << 40
REFUSALS_LOGGED_PER_S = 10


class ControlWorker(Worker):
    stage = Stage.CONTROL

    def setup(self) -> None:
        s = self.settings
        self.batch = s.stages.control.batch
        self.from_io = self.inputs(Stage.OVERLAY_IO)
        self.to_io = self.outputs(Stage.OVERLAY_IO)
        self.from_classifier = self.inputs(Stage.CLASSIFIER)
        self.to_classifier = self.outputs(Stage.CLASSIFIER)
        self.epoch = int.from_bytes(os.urandom(4), "big")
        self.version = 1
        self.static = [(i + 1, p) for i, p in enumerate(s.peers)]
        self.liveness = PeerTable(
            s.node.name,
            [(slot, p.name) for slot, p in self.static],
            interval_s=s.overlay.keepalive_interval_s,
            timeout_s=s.overlay.peer_timeout_s,
        )
        self.drops: Counter[str] = Counter()
        self.io_workers: dict[bytes, int] = {}  # overlay_io DEALER identity -> its pid
        self.generations: dict[tuple[int, bytes], int] = {}  # (send index, identity) -> g
        self.keys_sent_version = -1
        self.refusal_window = 0.0
        self.refusals_logged = self.refusals_suppressed = 0
        self.core: ControlCore | None = None
        self.addressing: Addressing | None = None
        self.dht_requests: dict[int, tuple[bytes, str]] = {}  # request id -> (ROUTER id, key)
        self.routes_sent = -1
        if not s.security.insecure_plaintext:
            self._setup_core()
        runtime = s.node.runtime_dir
        self.pub = self.zmq.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.setsockopt(zmq.SNDHWM, 100)
        self.pub.bind(endpoint(runtime, CONTROL_PUB_SOCKET))
        self.router = self.zmq.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.SNDHWM, 100)
        self.router.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted worker keeps its identity
        self.router.bind(endpoint(runtime, CONTROL_SOCKET))
        self.watch(self.router, self._on_request)
        self.every(REPUBLISH_S, lambda now: self._publish())
        self.every(min(0.5, s.overlay.keepalive_interval_s / 2), self._tick)
        if self.core is not None:
            self.every(CORE_TICK_S, self._core_tick)
            self.every(REVOCATION_CHECK_S, lambda now: self._check_revocations())
        self._publish()

    @property
    def links(self) -> Any:
        return None if self.core is None else self.core.links

    def _setup_core(self) -> None:
        s = self.settings
        sec = s.security
        assert sec.ca_certificate is not None
        try:
            member = load_membership(
                state_dir=s.node.state_dir,
                ca_path=sec.ca_certificate,
                certificate_path=s.certificate_file,
                revocation_path=sec.revocation_list,
                network=s.network.namespace,
                now=time.time(),
            )
        except KeyFileError as exc:
            raise StageIOError(f"cannot take part in the network: {exc}") from exc
        identity, ca, cert = member.identity, member.ca, member.certificate
        revoked = member.revoked
        self.revocation_stamp = _stamp(sec.revocation_list)
        peers = [
            PeerSpec(
                slot,
                p.name,
                (str(p.endpoint.host), p.endpoint.port),
                bytes.fromhex(p.public_key) if p.public_key else None,
                tuple(str(a) for a in p.addresses),
            )
            for slot, p in self.static
        ]
        self.core = ControlCore(
            identity=identity,
            certificate=cert,
            ca=ca,
            namespace=s.network.namespace,
            address=s.network.address,
            peers=peers,
            bootstrap=[(str(e.host), e.port) for e in s.overlay.bootstrap],
            revoked=revoked,
            rng=random.Random(os.urandom(16)),
            entropy=os.urandom,
            link_settings=LinkSettings(
                rekey_after_s=sec.rekey_after_s, load_threshold=sec.handshake_load_threshold
            ),
            register_address=not s.dhcp,
            networks=s.overlay.networks,
        )
        self.addressing = Addressing(
            self.core,
            AddressingSettings(
                subnet=s.network.subnet,
                gateway=s.gateway_address,
                domain=s.network.domain,
                namespace=s.network.namespace,
                node_name=s.node.name,
                tap_mac=s.tap_mac,
                gateway_mac=GATEWAY_MAC,
                mtu=s.network.mtu,
                dhcp=s.dhcp,
                router=s.network.mode is Mode.ROUTER,
                dhcp_port=s.network.dhcp_port,
                allow_static=s.network.allow_static,
                allowed_macs=frozenset(
                    bytes.fromhex(m.replace(":", "")) for m in s.network.allowed_macs
                )
                or None,
            ),
            rng=random.Random(os.urandom(16)),
            preferred=self._held_address() if s.dhcp else None,
        )
        self.machines_saved = 0
        if s.network.mode is Mode.ROUTER:
            self.addressing.restore(self._held_leases())
        if not s.dhcp:
            self.addressing.register_names()
        self.log.info(
            "identity_loaded",
            node_id=identity.node_id.hex(),
            certificate=cert.fingerprint,
            expires=cert.not_after,
        )

    # -- routes -----------------------------------------------------------------------------------

    def snapshot(self) -> messages.RouteSnapshot:
        peers = tuple(
            messages.PeerRoute(
                slot=slot,
                name=p.name,
                addresses=tuple(str(a) for a in p.addresses),
                endpoint=str(p.endpoint),
                up=self.liveness.peers[slot].state is PeerState.UP,
            )
            for slot, p in self.static
        )
        if self.core is not None:
            peers += tuple(
                messages.PeerRoute(r.slot, r.name, r.addresses, r.endpoint, r.up)
                for r in self.core.routes()
            )
        address = self.core.address if self.core is not None else self.settings.network.address
        local: tuple[tuple[str, str], ...] = ()
        if self.addressing is not None and self.addressing.settings.router:
            local = tuple((str(m.address), m.mac.hex()) for m in self.addressing.machines.values())
        return messages.RouteSnapshot(
            self.epoch, self.version, peers, str(address) if address else "", local
        )

    def _publish(self) -> None:
        try:
            self.pub.send(messages.encode(self.snapshot()), zmq.NOBLOCK)
        except zmq.Again:
            pass

    def _on_request(self) -> None:
        while self.router.poll(0):
            frames = self.router.recv_multipart()
            try:
                msg = messages.decode(frames[-1])
            except ValueError:
                self.drops["undecodable_request"] += 1
                continue
            ident = frames[0]
            if isinstance(msg, messages.SnapshotRequest):
                self.router.send_multipart([ident, messages.encode(self.snapshot())])
                if msg.stage == "overlay_io":
                    self._register_io(ident, msg.pid)
            elif isinstance(msg, messages.SessionConfirmed) and self.core:
                self.core.confirm(msg.recv_index)
            elif isinstance(msg, messages.RekeyRequest) and self.core:
                self.core.links.request_rekey(msg.slot)
            elif isinstance(msg, messages.UnknownSession) and self.core:
                host, _, port = msg.endpoint.rpartition(":")
                if port.isdigit():
                    self.core.unknown_session((host, int(port)), time.monotonic(), time.time())
            elif isinstance(msg, messages.RouteMiss) and self.core:
                self._on_route_miss(msg)
            elif isinstance(msg, messages.DhtGetRequest):
                self._on_dht_get(ident, msg)
            elif isinstance(msg, messages.DhtPutRequest):
                self._on_dht_put(ident, msg)
        self._after_core()

    def _on_route_miss(self, msg: messages.RouteMiss) -> None:
        assert self.core is not None
        now, wall = time.monotonic(), time.time()
        for text in msg.addresses[:64]:
            try:
                address = IPv4Address(text)
            except ValueError:
                self.drops["bad_route_miss"] += 1
                continue
            if address in self.settings.network.subnet:
                self.core.route_miss(address, now, wall)

    def _on_dht_get(self, ident: bytes, msg: messages.DhtGetRequest) -> None:
        if self.core is None:
            reply = messages.DhtGetReply(msg.key, False, "no_overlay", (), "", ())
            self.router.send_multipart([ident, messages.encode(reply)])
            return
        rid = self.core.dht_get(msg.key.encode(), time.monotonic())
        self.dht_requests[rid] = (ident, msg.key)

    def _on_dht_put(self, ident: bytes, msg: messages.DhtPutRequest) -> None:
        if self.core is None:
            reply = messages.DhtPutReply(msg.key, False, "no_overlay", "")
            self.router.send_multipart([ident, messages.encode(reply)])
            return
        try:
            rid = self.core.dht.create(msg.key.encode(), msg.value, msg.lease_s, time.monotonic())
        except ValueError as exc:  # too long, bad lease
            reply = messages.DhtPutReply(msg.key, False, f"invalid: {exc}", "")
            self.router.send_multipart([ident, messages.encode(reply)])
            return
        self.core.pump()
        self.dht_requests[rid] = (ident, msg.key)

    def _answer_dht_put(self, result: CreateResult) -> None:
        ident, key = self.dht_requests.pop(result.request_id)
        holder = result.holder.hex() if result.holder else ""
        reply = messages.DhtPutReply(key, result.ok, result.reason, holder)
        try:
            self.router.send_multipart([ident, messages.encode(reply)], zmq.NOBLOCK)
        except zmq.ZMQError:
            self.drops["dht_reply_unsent"] += 1

    def _answer_dht_get(self, result: GetResult) -> None:
        assert self.core is not None
        ident, key = self.dht_requests.pop(result.request_id)
        position = key_position(key.encode())
        replicas = self.core.overlay.nearest(position, self.core.dht.settings.replicas)
        reply = messages.DhtGetReply(
            key,
            result.ok,
            result.reason,
            tuple(
                messages.DhtRecordSummary(r.value, r.owner_id.hex(), r.seq, r.lease_s, r.deleted)
                for r in result.records
            ),
            id_to_bytes(position).hex(),
            tuple(id_to_bytes(n).hex() for n in replicas),
        )
        try:
            self.router.send_multipart([ident, messages.encode(reply)], zmq.NOBLOCK)
        except zmq.ZMQError:
            self.drops["dht_reply_unsent"] += 1

    # -- session keys -----------------------------------------------------------------------------

    def _register_io(self, ident: bytes, pid: int) -> None:
        """A (re)started overlay_io worker: every key it sends with gets a fresh counter range."""
        if self.io_workers.get(ident) != pid:
            self.io_workers[ident] = pid
            for key in [k for k in self.generations if k[1] == ident]:
                self.generations[key] += 1
        self._send_keys(ident)

    def _send_keys(self, ident: bytes) -> None:
        if self.core is None:
            return
        links = self.core.links
        entries = []
        for sess in links.sessions():
            gen = self.generations.setdefault((sess.send_index, ident), 0)
            link = links.links[sess.slot]
            direct = isinstance(link.endpoint, tuple)
            entries.append(
                messages.KeyEntry(
                    slot=sess.slot,
                    recv_index=sess.recv_index,
                    recv_key=sess.recv_key,
                    send_index=sess.send_index,
                    send_key=sess.send_key,
                    counter_start=gen << GENERATION_SHIFT,
                    created=sess.created,
                    confirmed=sess.confirmed,
                    endpoint=_text(link.endpoint) or "" if direct else "",
                    node_id=link.certificate.node_id if link.certificate else b"",
                )
            )
        msg = messages.SessionKeys(
            links.sessions_version, tuple(entries), self.core.identity.node_id
        )
        try:
            self.router.send_multipart([ident, messages.encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError:
            self.drops["keys_unsent"] += 1

    # -- links -----------------------------------------------------------------------------------

    def _core_tick(self, now: float) -> None:
        assert self.core is not None and self.addressing is not None
        wall = time.time()
        self.core.handle_timer(now, wall)
        self.addressing.handle_timer(now, wall)
        self._after_core()

    def _held_address(self) -> IPv4Address | None:
        """The address this node held before (written at each DHCP lease), if any."""
        try:
            text = (self.settings.node.state_dir / ADDRESS_FILE).read_text().strip()
            return IPv4Address(text) if text else None
        except (OSError, ValueError):
            return None

    def _held_leases(self) -> list[Machine]:
        """Router mode: the machines that held leases before this start."""
        now = time.monotonic()
        try:
            data = json.loads((self.settings.node.state_dir / LEASES_FILE).read_text())
            return [
                Machine(
                    IPv4Address(m["address"]),
                    bytes.fromhex(m["mac"]),
                    m.get("hostname"),
                    now,
                    bytes.fromhex(m["client_id"]),
                    static=bool(m.get("static", False)),
                )
                for m in data
            ]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            if not isinstance(exc, FileNotFoundError):
                self.log.warning("leases_not_restored", error=str(exc))
            return []

    def _hold_leases(self) -> None:
        assert self.addressing is not None
        machines = self.addressing.machines.values()
        data = [
            {
                "address": str(m.address),
                "mac": m.mac.hex(),
                "hostname": m.hostname,
                "client_id": m.client_id.hex(),
                "static": m.static,
            }
            for m in machines
        ]
        path = self.settings.node.state_dir / LEASES_FILE
        try:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=1))
            os.replace(tmp, path)
        except OSError as exc:
            self.log.error("leases_not_saved", error=str(exc))

    def _hold_address(self, address: str) -> None:
        path = self.settings.node.state_dir / ADDRESS_FILE
        try:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(address + "\n")
            os.replace(tmp, path)
        except OSError as exc:
            self.log.error("address_not_saved", address=address, error=str(exc))

    def _after_core(self) -> None:
        """Send what the core produced, log its events, push changed keys and routes."""
        core = self.core
        if core is None:
            return
        links = core.links
        self._drain_core(core)
        addressing = self.addressing
        for result in core.dht_results():
            if isinstance(result, GetResult) and result.request_id in self.dht_requests:
                self._answer_dht_get(result)
            elif isinstance(result, CreateResult) and result.request_id in self.dht_requests:
                self._answer_dht_put(result)
            elif addressing is not None:
                addressing.dht_result(result, time.monotonic())
        if addressing is not None:
            for frame in addressing.frames_to_tap():
                self.to_classifier[0].push(frame, RecordKind.FRAME)
            for slot, packet in addressing.packets_to_send():
                target = self.to_io[worker_for_peer(slot, len(self.to_io))]
                target.push(packet, RecordKind.IP_PACKET, slot)
            for ev in addressing.events():
                if ev.name == "lease_granted":
                    self._hold_address(ev.fields["address"])
                self._on_core_event(ev)
            for p in self.to_classifier:
                p.flush()
            self._drain_core(core)  # what the addressing core's DHT requests made
            if addressing.machines_version != self.machines_saved:
                self.machines_saved = addressing.machines_version
                self._hold_leases()
                self.version += 1  # the classifier learns the machines with the routes
                self._publish()
        if links.sessions_version != self.keys_sent_version:
            self.keys_sent_version = links.sessions_version
            for ident in self.io_workers:
                self._send_keys(ident)
            self.version += 1  # a route's link may have come up or gone
            self._publish()
        elif core.routes_version != self.routes_sent:
            self.routes_sent = core.routes_version
            self.version += 1
            self._publish()
        for p in self.to_io:
            p.flush()

    def _drain_core(self, core: ControlCore) -> None:
        for datagram, to in core.handshakes_to_send():
            self._push_handshake(datagram, to)
        for slot, payload in core.overlay_to_send():
            self._send_overlay(slot, payload)
        for ev in core.events():
            if isinstance(ev, LinkEvent):
                self._log_link_event(ev)
            else:
                self._on_core_event(ev)

    def _push_handshake(self, datagram: bytes, to: tuple[str, int]) -> None:
        assert self.core is not None
        links = self.core.links.links
        slot = next((sl for sl, lk in links.items() if lk.endpoint == to), 0)
        target = self.to_io[worker_for_peer(slot, len(self.to_io))] if slot else self.to_io[0]
        target.push(pack_endpoint(*to) + datagram, RecordKind.HANDSHAKE)

    def _on_core_event(self, ev: CoreEvent) -> None:
        warn = ev.name in ("address_not_registered", "address_lost", "overlay_connection_removed")
        (self.log.warning if warn else self.log.info)(ev.name, **ev.fields)

    def _log_link_event(self, ev: LinkEvent) -> None:
        if ev.kind is EventKind.HANDSHAKE_REFUSED:
            self._log_refusal(ev)
        elif ev.kind is EventKind.LINK_FORMED:
            self.log.info(
                "link_formed",
                peer=ev.peer,
                slot=ev.slot,
                node_id=ev.node_id,
                pattern=ev.pattern,
                endpoint=str(ev.source) if isinstance(ev.source, Via) else _text(ev.source),
            )
        elif ev.kind is EventKind.SESSION_ESTABLISHED:
            self.log.info("session_established", peer=ev.peer, slot=ev.slot, pattern=ev.pattern)
        else:
            self.log.warning("link_closed", peer=ev.peer, slot=ev.slot, reason=ev.reason)

    def _log_refusal(self, ev: LinkEvent) -> None:
        """At most REFUSALS_LOGGED_PER_S refusals a second reach the log (a flood must not fill
        the disk); the rest are counted, in ``links.refused`` and in one summary line."""
        now = time.monotonic()
        if now - self.refusal_window >= 1.0:
            if self.refusals_suppressed:
                self.log.warning("handshake_refusals_suppressed", count=self.refusals_suppressed)
            self.refusal_window, self.refusals_logged, self.refusals_suppressed = now, 0, 0
        if self.refusals_logged >= REFUSALS_LOGGED_PER_S:
            self.refusals_suppressed += 1
            return
        self.refusals_logged += 1
        src = str(ev.source) if isinstance(ev.source, Via) else _text(ev.source)
        self.log.warning("handshake_refused", reason=ev.reason, source=src, detail=ev.detail)

    def _check_revocations(self) -> None:
        path = self.settings.security.revocation_list
        stamp = _stamp(path)
        if stamp == self.revocation_stamp or self.core is None:
            return
        self.revocation_stamp = stamp
        try:
            revoked = read_revocation_list(path)
        except KeyFileError as exc:
            self.log.error("revocation_list_rejected", error=str(exc))
            return
        self.core.set_revocations(revoked)
        self.log.info("revocation_list_loaded", entries=len(revoked))
        self._after_core()

    # -- keepalives --------------------------------------------------------------------------------

    def _tick(self, now: float) -> None:
        linked = self._linked_slots()
        for slot, ping in self.liveness.handle_timer(now):
            if linked is None or slot in linked:
                self._send_overlay(slot, messages.encode_overlay(ping))
        self._flush_events()

    def _linked_slots(self) -> set[int] | None:
        if self.links is None:
            return None
        return {s.slot for s in self.links.sessions()}

    def _send_overlay(self, slot: int, payload: bytes) -> None:
        self.to_io[worker_for_peer(slot, len(self.to_io))].push(payload, RecordKind.OVERLAY, slot)

    def _flush_events(self) -> None:
        changed = False
        for ev in self.liveness.events():
            changed = True
            rtt_ms = None if ev.rtt_s is None else round(ev.rtt_s * 1000, 3)
            if ev.state is PeerState.UP:
                self.log.info("peer_up", peer=ev.name, slot=ev.slot, rtt_ms=rtt_ms)
            else:
                self.log.warning("peer_down", peer=ev.name, slot=ev.slot)
        if changed:
            self.version += 1
            self._publish()
        for p in self.to_io:
            p.flush()

    # -- records from overlay_io ----------------------------------------------------------------

    def work(self) -> int:
        done = 0
        now = time.monotonic()
        for consumer in self.from_io:
            records = consumer.pop_batch(self.batch)
            for rec in records:
                if rec.kind == RecordKind.OVERLAY:
                    if rec.data[:1] == _OVERLAY_VERSION and self.core is not None:
                        self.core.receive_overlay(rec.peer, bytes(rec.data), now, time.time())
                    else:
                        self._on_overlay(rec.peer, rec.data, now)
                elif rec.kind == RecordKind.HANDSHAKE and self.core is not None:
                    source = unpack_endpoint(rec.data)
                    datagram = bytes(rec.data[ENDPOINT_LEN:])
                    self.core.receive_handshake(datagram, source, now, time.time())
                elif rec.kind == RecordKind.RELAY:
                    owner = self.to_io[worker_for_peer(rec.peer, len(self.to_io))]
                    owner.push(rec.data, RecordKind.RELAY, rec.peer)
                else:
                    self.drops["unexpected_kind"] += 1
            if records:
                consumer.release()
                done += len(records)
        done += self._from_classifiers(now)
        if done:
            self._after_core()
            self._flush_events()
        return done

    def _from_classifiers(self, now: float) -> int:
        """DHCP and DNS frames from the TAP, and packets waiting for their address."""
        done = 0
        for consumer in self.from_classifier:
            records = consumer.pop_batch(self.batch)
            if not records:
                continue
            addressing = self.addressing
            for rec in records:
                if addressing is None:
                    self.drops["no_addressing"] += 1  # plaintext benchmark mode
                elif rec.kind == RecordKind.CLAIM:
                    addressing.static_seen(bytes(rec.data), now)
                elif rec.kind == RecordKind.FRAME:
                    addressing.frame_from_tap(bytes(rec.data), now)
                elif rec.kind == RecordKind.VERIFY:
                    addressing.packet_from_unknown(rec.peer, bytes(rec.data), now, time.time())
                elif rec.kind == RecordKind.RESOLVE:
                    addressing.packet_to_resolve(bytes(rec.data), now, time.time())
                else:
                    self.drops["unexpected_kind"] += 1
            consumer.release()
            done += len(records)
        return done

    def _on_overlay(self, slot: int, data: memoryview, now: float) -> None:
        try:
            msg = messages.decode_overlay(data)
        except ValueError:  # msgspec's errors and UnicodeDecodeError alike
            self.drops["undecodable_overlay"] += 1
            return
        reply = self.liveness.receive(slot, msg, now)
        if reply is not None:
            self._send_overlay(slot, messages.encode_overlay(reply))

    def stats(self) -> dict[str, Any]:
        peers = []
        sessions = self.links.sessions() if self.links else []
        for slot, p in self.static:
            live = self.liveness.peers[slot]
            link = self.links.links[slot] if self.links else None
            mine = [x for x in sessions if x.slot == slot]
            peers.append(
                {
                    "name": p.name,
                    "slot": slot,
                    "endpoint": _target(link.endpoint) if link else str(p.endpoint),
                    "addresses": [str(a) for a in p.addresses],
                    "state": live.state.value,
                    "rtt_ms": None if live.rtt_s is None else round(live.rtt_s * 1000, 3),
                    "last_heard_s": None
                    if live.last_heard is None
                    else round(time.monotonic() - live.last_heard, 1),
                    "pings_sent": live.pings_sent,
                    "pongs_received": live.pongs_received,
                    "node_id": link.certificate.node_id.hex()
                    if link and link.certificate
                    else None,
                    "sessions": len(mine),
                    "session_age_s": round(time.monotonic() - mine[-1].created, 1)
                    if mine
                    else None,
                    "pattern": mine[-1].pattern.name if mine else None,
                    "handshakes": link.handshakes if link else 0,
                }
            )
        out: dict[str, Any] = {
            "peers": peers,
            "route_version": self.version,
            "drops": dict(self.drops),
        }
        address = self.core.address if self.core is not None else self.settings.network.address
        out["address"] = str(address) if address else None
        if self.addressing is not None:
            out["addressing"] = self.addressing.statistics()
        if self.core is not None:
            out["node_id"] = self.core.identity.node_id.hex()
            out["links"] = self.core.links.statistics()
            out["overlay"] = self.core.statistics()
            out["link_table"] = self.core.link_table(time.monotonic())
        return out

    def teardown(self) -> None:
        if hasattr(self, "pub"):
            self.pub.close(0)
            self.router.close(0)


_OVERLAY_VERSION = bytes([overlay_wire.VERSION])


def _target(target: Any) -> str:
    return str(target) if isinstance(target, Via) else f"{target[0]}:{target[1]}"


def _text(endpoint: Any) -> str | None:
    return None if endpoint is None else f"{endpoint[0]}:{endpoint[1]}"


def _stamp(path: Any) -> tuple[int, int] | None:
    try:
        st = os.stat(path) if path is not None else None
    except OSError:
        return (0, 0)
    return None if st is None else (st.st_mtime_ns, st.st_size)
