"""control: the driver of the node's brain. Every decision is in ``ControlCore`` (core.py);
this file moves bytes, messages and time between it and the world:

- ring records from overlay_io (OVERLAY; HANDSHAKE on the handshake lane, read after the
  others, a batch at a time, so a flood there never delays overlay messages) and from the
  classifiers (FRAME,
  RESOLVE, VERIFY, CLAIM) go into the core; what the core wants sent goes into the rings to
  overlay_io (the worker that owns the link's slot) and to the classifier; RELAY records
  pass through to the overlay_io worker that owns the hop;
- ZeroMQ: route snapshots out on PUB; on ROUTER, a worker's snapshot request, session keys
  to each overlay_io worker, the overlay_io workers' messages and the tools' requests;
- time: the core's ``next_deadline`` is the worker's one deadline, re-armed after every
  input; the revocation list's file is looked at every second (a file, so the driver's);
- the node's own addresses: its interfaces' IPv4 addresses and its default gateway, read at
  start and again when a netlink notification says they changed (roaming); a UDP socket of
  its own for the gateway's port mapping answers (PCP, NAT-PMP); UPnP IGD's blocking calls
  in a thread of their own (``upnp_client.py``), whose results come back through a
  socketpair the loop watches;
- effects: the leased address and the machines' leases are kept in the state directory
  (``pipeline/statefiles.py``), log events are logged.
"""

from __future__ import annotations

import fcntl
import os
import random
import socket
import struct
import time
from collections import Counter
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import zmq

from pipeline import messages
from pipeline.config import GATEWAY_MAC, Mode, Settings
from pipeline.control import events as ev
from pipeline.control.addressing import AddressingSettings
from pipeline.control.core import ControlCore, ControlSettings, Credentials
from pipeline.control.links import LinkSettings, PeerSpec
from pipeline.control.upnp_client import UpnpClient
from pipeline.crypto.keyfiles import KeyFileError, node_membership, read_revocation_list
from pipeline.errors import StageIOError
from pipeline.records import ENDPOINT_LEN, RecordKind, pack_endpoint, unpack_endpoint
from pipeline.statefiles import StateDir
from pipeline.topology import Lane, Stage, worker_for_peer
from pipeline.worker import CONTROL_PUB_SOCKET, CONTROL_SOCKET, Worker, endpoint

REVOCATION_CHECK_S = 1.0
NETLINK_SETTLE_S = 0.2  # quiet after the last address or route notification before reading
UPNP_STOP_WAIT_S = 2.0  # at stop, how long the UPnP thread may take to delete the mapping


class ControlWorker(Worker):
    stage = Stage.CONTROL

    def setup(self) -> None:
        s = self.settings
        self.batch = s.stages.control.batch
        self.from_io = self.inputs(Stage.OVERLAY_IO)
        self.handshakes_from_io = self.inputs(Stage.OVERLAY_IO, Lane.HANDSHAKE)
        self.to_io = self.outputs(Stage.OVERLAY_IO)
        self.from_classifier = self.inputs(Stage.CLASSIFIER)
        self.to_classifier = self.outputs(Stage.CLASSIFIER)
        self.drops: Counter[str] = Counter()
        self._addresses_due: float | None = None
        self._portmap: socket.socket | None = None  # only with nat.port_mapping
        self._upnp: UpnpClient | None = None  # the same
        self.state = StateDir(s.node.state_dir)
        credentials = None if s.security.insecure_plaintext else self._credentials()
        leases, error = self.state.held_leases() if s.network.mode is Mode.ROUTER else ([], None)
        if error is not None:
            self.log.warning("leases_not_restored", error=error)
        now = time.monotonic()
        self.core = ControlCore(
            control_settings(s),
            credentials=credentials,
            rng=random.Random(os.urandom(16)),
            entropy=os.urandom,
            epoch=int.from_bytes(os.urandom(4), "big"),
            preferred=self.state.held_address() if s.dhcp else None,
            held_leases=leases,
            now=now,
        )
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
        if credentials is not None:
            self.every(REVOCATION_CHECK_S, lambda now: self._check_revocations())
            if s.nat.port_mapping:
                self._portmap = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                self._portmap.setblocking(False)
                self._portmap.bind(("0.0.0.0", 0))
                self.watch(self._portmap.fileno(), self._on_portmap)
                self._upnp = UpnpClient()
                self.watch(self._upnp.fileno(), self._on_upnp)
            self._netlink = _netlink_socket()
            if self._netlink is not None:
                self.watch(self._netlink.fileno(), self._on_netlink)
            self._addresses_changed(now)
        self._flush(now)

    def _credentials(self) -> Credentials:
        sec = self.settings.security
        try:
            member = node_membership(self.settings, time.time())
        except KeyFileError as exc:
            raise StageIOError(f"cannot take part in the network: {exc}") from exc
        self.revocation_stamp = _stamp(sec.revocation_list)
        cert = member.certificate
        self.log.info(
            "identity_loaded",
            node_id=member.identity.node_id.hex(),
            certificate=cert.fingerprint,
            expires=cert.not_after,
        )
        return Credentials(member.identity, cert, member.ca, member.revoked)

    # -- records ---------------------------------------------------------------------------------

    def work(self) -> int:
        core = self.core
        now, wall = time.monotonic(), time.time()
        done = 0
        for consumer in self.from_io:
            records = consumer.pop_batch(self.batch)
            for rec in records:
                kind = rec.kind
                if kind == RecordKind.OVERLAY:
                    core.receive_overlay(rec.peer, bytes(rec.data), now, wall)
                elif kind == RecordKind.RELAY:
                    self._to_io(rec.peer).push(rec.data, RecordKind.RELAY, rec.peer)
                elif kind == RecordKind.PROBE:
                    payload = bytes(rec.data[ENDPOINT_LEN:])
                    core.receive_probe(rec.peer, payload, unpack_endpoint(rec.data), now, wall)
                elif kind == RecordKind.STUN:
                    datagram = bytes(rec.data[ENDPOINT_LEN:])
                    core.receive_stun(datagram, unpack_endpoint(rec.data), now, wall)
                else:
                    self.drops["unexpected_kind"] += 1
            if records:
                consumer.release()
                done += len(records)
        for consumer in self.handshakes_from_io:
            records = consumer.pop_batch(self.batch)
            for rec in records:
                if rec.kind == RecordKind.HANDSHAKE:
                    datagram = bytes(rec.data[ENDPOINT_LEN:])
                    core.receive_handshake(datagram, unpack_endpoint(rec.data), now, wall)
                else:
                    self.drops["unexpected_kind"] += 1
            if records:
                consumer.release()
                done += len(records)
        for consumer in self.from_classifier:
            records = consumer.pop_batch(self.batch)
            for rec in records:
                kind = rec.kind
                if kind == RecordKind.FRAME:
                    core.frame_from_tap(bytes(rec.data), now, wall)
                elif kind == RecordKind.RESOLVE:
                    core.packet_to_resolve(bytes(rec.data), now, wall)
                elif kind == RecordKind.VERIFY:
                    core.packet_from_unknown(rec.peer, bytes(rec.data), now, wall)
                elif kind == RecordKind.CLAIM:
                    core.claim(bytes(rec.data), now, wall)
                else:
                    self.drops["unexpected_kind"] += 1
            if records:
                consumer.release()
                done += len(records)
        if done:
            self._flush(now)
        return done

    def on_deadline(self, now: float) -> None:
        if self._addresses_due is not None and now >= self._addresses_due:
            self._addresses_due = None
            self._addresses_changed(now)
        self.core.handle_timer(now, time.time())
        self._flush(now)

    def _arm(self) -> None:
        """The worker's one deadline: the core's, or sooner the moment to read the node's
        addresses again."""
        due = self.core.next_deadline()
        if self._addresses_due is not None:
            due = min(due, self._addresses_due)
        self.arm(due)

    def _to_io(self, slot: int) -> Any:
        return self.to_io[worker_for_peer(slot, len(self.to_io))]

    def _flush(self, now: float) -> None:
        """Everything the core produced: into the rings, onto the sockets, to the log; then
        the deadline re-armed."""
        core = self.core
        for datagram, to, slot in core.handshakes_to_send():
            self._to_io(slot).push(pack_endpoint(*to) + datagram, RecordKind.HANDSHAKE)
        # a pool's probes before the overlay messages (a PathGo): out before the peer sprays
        for slot, pool_to, payload in core.pools_to_send():
            data = b"" if pool_to is None else pack_endpoint(*pool_to) + payload
            self._to_io(slot).push(data, RecordKind.POOL, slot)
        for slot, payload in core.overlay_to_send():
            self._to_io(slot).push(payload, RecordKind.OVERLAY, slot)
        for slot, to, payload in core.probes_to_send():
            self._to_io(slot).push(pack_endpoint(*to) + payload, RecordKind.PROBE, slot)
        for datagram, to in core.stun_to_send():
            self.to_io[0].push(pack_endpoint(*to) + datagram, RecordKind.STUN)
        for datagram, to in core.portmap_to_send():
            try:
                if self._portmap is None:
                    raise OSError("no port mapping socket")
                self._portmap.sendto(datagram, to)
            except OSError:
                self.drops["portmap_unsent"] += 1
        for command in core.upnp_to_run():
            if self._upnp is None:
                self.drops["upnp_unsent"] += 1
            else:
                self._upnp.submit(command)
        for slot, packet in core.packets_to_send():
            self._to_io(slot).push(packet, RecordKind.IP_PACKET, slot)
        for frame in core.frames_to_tap():
            self.to_classifier[0].push(frame, RecordKind.FRAME)
        for event in core.events():
            self._on_event(event)
        for worker, keys in core.keys_to_send():
            self._send(worker, keys)
        snapshot = core.snapshot_to_publish(now)
        if snapshot is not None:
            try:
                self.pub.send(messages.encode(snapshot), zmq.NOBLOCK)
            except zmq.Again:
                self.drops["snapshot_unsent"] += 1
        for producer in (*self.to_io, *self.to_classifier):
            producer.flush()
        self._arm()

    def _on_event(self, event: ev.ControlEvent) -> None:
        if isinstance(event, ev.LogEvent):
            getattr(self.log, event.level.value)(event.name, **event.fields())
        elif isinstance(event, ev.HoldAddress):
            try:
                self.state.hold_address(event.address)
            except OSError as exc:
                self.log.error("address_not_saved", address=event.address, error=str(exc))
        elif isinstance(event, ev.HoldLeases):
            try:
                self.state.hold_leases(list(event.leases))
            except OSError as exc:
                self.log.error("leases_not_saved", error=str(exc))
        elif isinstance(event, ev.Reply):
            self._send(event.to, event.message)

    def _send(self, to: bytes, msg: messages.Message) -> None:
        try:
            self.router.send_multipart([to, messages.encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError:
            self.drops["reply_unsent"] += 1

    # -- ZeroMQ requests -------------------------------------------------------------------------

    def _on_request(self) -> None:
        core = self.core
        now, wall = time.monotonic(), time.time()
        while self.router.poll(0):
            frames = self.router.recv_multipart()
            try:
                msg = messages.decode(frames[-1])
            except ValueError:
                self.drops["undecodable_request"] += 1
                continue
            sender = frames[0]
            if isinstance(msg, messages.SnapshotRequest):
                self._send(sender, core.snapshot())
                if msg.stage == Stage.OVERLAY_IO:
                    core.io_worker_started(sender, msg.pid, now)
            elif isinstance(msg, messages.SessionConfirmed):
                core.session_confirmed(msg.recv_index, now, wall)
            elif isinstance(msg, messages.RekeyRequest):
                core.rekey_requested(msg.slot, now, wall)
            elif isinstance(msg, messages.PeerMoved):
                core.peer_moved(msg.slot, msg.endpoint, now, wall)
            elif isinstance(msg, messages.HopSilent):
                core.hop_silent(msg.slot, now, wall)
            elif isinstance(msg, messages.DhtGetRequest):
                core.dht_get(sender, msg.key, now, wall)
            elif isinstance(msg, messages.DhtPutRequest):
                core.dht_put(sender, msg.key, msg.value, msg.lease_s, now, wall)
            elif isinstance(msg, messages.NetcheckRequest):
                core.netcheck(sender, now)
            elif isinstance(msg, messages.PingRequest):
                core.ping(sender, msg.peer, msg.seq, now, wall)
            elif isinstance(msg, messages.MapRequest):
                core.map(sender, msg.max_nodes, msg.timeout_s, now, wall)
            else:
                self.drops["unexpected_request"] += 1
        self._flush(now)

    def _on_portmap(self) -> None:
        assert self._portmap is not None
        now, wall = time.monotonic(), time.time()
        while True:
            try:
                datagram, source = self._portmap.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.drops["portmap_receive_error"] += 1
                break
            self.core.receive_portmap(datagram, (source[0], source[1]), now, wall)
        self._flush(now)

    def _on_upnp(self) -> None:
        assert self._upnp is not None
        now, wall = time.monotonic(), time.time()
        for result in self._upnp.results():
            self.core.receive_upnp(result, now, wall)
        self._flush(now)

    def _on_netlink(self) -> None:
        assert self._netlink is not None
        while True:
            try:
                self._netlink.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
        # A move is several notifications (the old address goes, the new one comes, the
        # default route follows): read the addresses once they have settled.
        now = time.monotonic()
        self._addresses_due = now + NETLINK_SETTLE_S
        self._arm()

    def _addresses_changed(self, now: float) -> None:
        s = self.settings
        if s.overlay.listen_address != IPv4Address("0.0.0.0"):
            addresses = [str(s.overlay.listen_address)]
        else:
            skip = {"lo", s.network.device, s.network.bridge or ""}
            addresses = [
                a
                for name, a in _interface_addresses()
                if name not in skip and IPv4Address(a) not in s.network.subnet
            ]
        self.core.set_local_addresses(addresses, _default_gateway(), now, time.time())
        self._flush(now)

    def _check_revocations(self) -> None:
        path = self.settings.security.revocation_list
        stamp = _stamp(path)
        if stamp == self.revocation_stamp:
            return
        self.revocation_stamp = stamp
        try:
            revoked = read_revocation_list(path)
        except KeyFileError as exc:
            self.log.error("revocation_list_rejected", error=str(exc))
            return
        now = time.monotonic()
        self.core.set_revocations(revoked, now, time.time())
        self.log.info("revocation_list_loaded", entries=len(revoked))
        self._flush(now)

    def stats(self) -> dict[str, Any]:
        out = self.core.status(time.monotonic())
        out["drops"] = {**out["drops"], **self.drops}
        upnp = getattr(self, "_upnp", None)
        if upnp is not None and "port_mapping" in out:
            out["port_mapping"]["upnp_client"] = upnp.statistics()
        return out

    def teardown(self) -> None:
        portmap = getattr(self, "_portmap", None)
        if hasattr(self, "core") and hasattr(self, "to_io"):
            # the overlay's Closes into overlay_io's rings (the supervisor stops control
            # first, so overlay_io still sends them), and the gateway gets its port back
            self.core.stop(time.monotonic(), time.time())
            self._flush(time.monotonic())
        if hasattr(self, "core") and portmap is not None:
            portmap.close()
            upnp = getattr(self, "_upnp", None)
            if upnp is not None:  # the UPnP thread deletes its mapping (2 s at most)
                for command in self.core.upnp_to_run():
                    upnp.submit(command)
                for result in upnp.close(UPNP_STOP_WAIT_S):
                    self.core.receive_upnp(result, time.monotonic(), time.time())
            for event in self.core.events():
                if isinstance(event, ev.LogEvent):  # port_unmapped
                    self._on_event(event)
        netlink = getattr(self, "_netlink", None)
        if netlink is not None:
            netlink.close()
        if hasattr(self, "pub"):
            self.pub.close(0)
            self.router.close(0)


def control_settings(s: Settings) -> ControlSettings:
    """What the core needs to know, from the node's settings."""
    peers = tuple(
        PeerSpec(
            i + 1,
            p.name,
            (str(p.endpoint.host), p.endpoint.port),
            bytes.fromhex(p.public_key) if p.public_key else None,
            tuple(str(a) for a in p.addresses),
        )
        for i, p in enumerate(s.peers)
    )
    net, sec = s.network, s.security
    addressing = AddressingSettings(
        subnet=net.subnet,
        gateway=s.gateway_address,
        domain=net.domain,
        namespace=net.namespace,
        node_name=s.node.name,
        tap_mac=s.tap_mac,
        gateway_mac=GATEWAY_MAC,
        mtu=net.mtu,
        dhcp=s.dhcp,
        router=net.mode is Mode.ROUTER,
        dhcp_port=net.dhcp_port,
        allow_static=net.allow_static,
        allowed_macs=frozenset(bytes.fromhex(m.replace(":", "")) for m in net.allowed_macs) or None,
    )
    return ControlSettings(
        node_name=s.node.name,
        namespace=net.namespace,
        subnet=net.subnet,
        address=net.address,
        peers=peers,
        bootstrap=tuple((str(e.host), e.port) for e in s.overlay.bootstrap),
        networks=tuple(s.overlay.networks),
        keepalive_interval_s=s.overlay.keepalive_interval_s,
        peer_timeout_s=s.overlay.peer_timeout_s,
        links=LinkSettings(
            rekey_after_s=sec.rekey_after_s,
            load_threshold=sec.handshake_load_threshold,
            ciphers=sec.ciphers,
        ),
        addressing=addressing,
        encrypted=not sec.insecure_plaintext,
        listen_port=s.overlay.listen_port,
        stun_servers=tuple((str(e.host), e.port) for e in s.nat.stun_servers),
        port_mapping=s.nat.port_mapping,
        port_mapping_protocols=tuple(p.value for p in s.nat.port_mapping_protocols),
        shortcuts=s.nat.shortcuts,
        pool_sockets=s.nat.pool_sockets,
        spray_probes=s.nat.spray_probes,
    )


_SIOCGIFADDR = 0x8915
_RTMGRP_IPV4_IFADDR = 0x10
_RTMGRP_IPV4_ROUTE = 0x40


def _interface_addresses() -> list[tuple[str, str]]:
    """(interface, IPv4 address) of every interface that has one."""
    out = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name[:15].encode()))
            except OSError:
                continue  # no IPv4 address
            out.append((name, socket.inet_ntoa(raw[20:24])))
    return out


def _default_gateway() -> str | None:
    """The IPv4 default route's gateway (``/proc/net/route``), if any."""
    try:
        lines = Path("/proc/net/route").read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) > 3 and fields[1] == "00000000" and int(fields[3], 16) & 0x2:
            return socket.inet_ntoa(struct.pack("<I", int(fields[2], 16)))
    return None


def _netlink_socket() -> socket.socket | None:
    """A netlink socket that hears of IPv4 address and route changes (the node moved)."""
    try:
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, 0)
        s.bind((0, _RTMGRP_IPV4_IFADDR | _RTMGRP_IPV4_ROUTE))
    except OSError:
        return None
    return s


def _stamp(path: Any) -> tuple[int, int] | None:
    try:
        st = os.stat(path) if path is not None else None
    except OSError:
        return (0, 0)
    return None if st is None else (st.st_mtime_ns, st.st_size)
