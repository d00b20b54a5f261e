"""classifier: the driver of the classifier core. It only moves ring records.

- outbound: a tap_reader ring -> ``from_inside`` -> an IP_PACKET to the overlay_io worker of
  the peer (by its slot), a FRAME back to the tap_reader it came from (an ARP reply), or a
  FRAME, RESOLVE or CLAIM to control;
- inbound: an overlay_io ring -> ``from_outside`` -> a FRAME to a tap_reader (by flow hash),
  or a VERIFY to control;
- from control: FRAMEs for the TAP (DHCP and DNS answers, ICMP errors, verified packets).

The core is chosen once, at setup, from ``network.mode``: an ``InterfaceClassifier`` or a
``RouterClassifier``; it decides every frame and counts its drops by reason. A record of a
kind its ring does not carry (``pipeline/records.py``) is counted here (``unexpected_kind``).

A record with ``FLAG_VNET`` (a virtio-net header first: maybe a TSO super-frame of 64 KiB)
gets one verdict for all its segments, since they share every header the core reads. The
header travels on with the frame: shifted by -14 as Ethernet is stripped (to overlay_io) or
+14 as it is prepended (to a tap_reader). Control takes only whole packets with final
checksums, so what goes there from such a record is first cut and checksummed in software
(``tso.segment``: rare, small packets: DHCP, DNS, the first packets to an address without a
route).
"""

from __future__ import annotations

from collections import Counter
from ipaddress import IPv4Address
from typing import Any

import msgspec

from pipeline import messages
from pipeline.classifier.classify import Classifier, FrameAction
from pipeline.classifier.interface import InterfaceClassifier
from pipeline.classifier.router import LocalHosts, RouterClassifier
from pipeline.classifier.routes import Routes
from pipeline.config import GATEWAY_MAC, Mode
from pipeline.records import FLAG_VNET, RecordKind
from pipeline.route_feed import RouteFeed
from pipeline.shm_ring import Consumer, Producer, RingRecord
from pipeline.topology import Stage, worker_for_flow, worker_for_peer
from pipeline.wire import tso, vnet
from pipeline.worker import Worker

_TO_PEER = FrameAction.TO_PEER
_TO_TAP = FrameAction.TO_TAP
_TO_CONTROL = FrameAction.TO_CONTROL
_RESOLVE = FrameAction.RESOLVE
_VERIFY = FrameAction.VERIFY
_CLAIM = FrameAction.CLAIM
_FRAME = int(RecordKind.FRAME)  # plain ints: the loops compare kinds with them, per record
_IP_PACKET = int(RecordKind.IP_PACKET)
_VNET = vnet.LEN
_ETH = 14
_GROWTH = 16  # an Ethernet header, rounded up to the ring's 8-byte slots
_shift = vnet.shift


class ClassifierWorker(Worker):
    stage = Stage.CLASSIFIER

    def setup(self) -> None:
        s = self.settings
        net = s.network
        self.batch = s.stages.classifier.batch
        self.interface: InterfaceClassifier | None = None
        self.router: RouterClassifier | None = None
        self.core: Classifier
        if net.mode is Mode.ROUTER:
            self.core = self.router = RouterClassifier(
                subnet=net.subnet,
                gateway_mac=GATEWAY_MAC,
                gateway=s.gateway_address,
                dhcp_port=net.dhcp_port,
                allow_static=net.allow_static,
            )
        else:
            self.core = self.interface = InterfaceClassifier(
                subnet=net.subnet,
                address=net.address,
                tap_mac=s.tap_mac,
                gateway_mac=GATEWAY_MAC,
                gateway=s.gateway_address,
                dhcp_port=net.dhcp_port,
            )
        self.from_tap = self.inputs(Stage.TAP_READER)
        self.to_tap = self.outputs(Stage.TAP_READER)
        self.from_io = self.inputs(Stage.OVERLAY_IO)
        self.to_io = self.outputs(Stage.OVERLAY_IO)
        (self.to_control,) = self.outputs(Stage.CONTROL)
        (self.from_control,) = self.inputs(Stage.CONTROL)
        self.producers: list[Producer] = [*self.to_tap, *self.to_io, self.to_control]
        self.drops: Counter[str] = Counter()
        self.routes = RouteFeed(self, self._apply)

    def _apply(self, snap: messages.RouteSnapshot) -> None:
        if self.interface is not None:
            self._apply_address(self.interface, snap)
        if self.router is not None:
            self._apply_local(self.router, snap)
        peers = [(p.slot, [IPv4Address(a) for a in p.addresses]) for p in snap.peers]
        self.core.apply_routes(Routes.from_peers(snap.version, peers))

    def _apply_address(self, core: InterfaceClassifier, snap: messages.RouteSnapshot) -> None:
        address = IPv4Address(snap.address) if snap.address else None
        if address == core.address:
            return
        try:
            core.set_address(address)
        except ValueError as exc:
            self.log.error("address_rejected", address=snap.address, error=str(exc))
        else:
            self.log.info("address_applied", address=snap.address or None)

    def _apply_local(self, core: RouterClassifier, snap: messages.RouteSnapshot) -> None:
        try:
            local = LocalHosts.from_leases(
                snap.version, [(IPv4Address(a), bytes.fromhex(m)) for a, m in snap.local]
            )
            core.apply_local(local)
        except ValueError as exc:
            self.log.error("machines_rejected", error=str(exc))

    def work(self) -> int:
        self.blocked = False
        done = 0
        for t, consumer in enumerate(self.from_tap):
            done += self._outbound(consumer, self.to_tap[t])
        for consumer in self.from_io:
            done += self._inbound(consumer)
        done += self._from_control()
        if done:
            for p in self.producers:
                p.flush()
        return done

    def _take(self, consumer: Consumer, targets: list[Producer]) -> list[RingRecord]:
        """A batch from ``consumer`` that the ``targets`` (the rings its records go on to)
        have room for, records as large as they come; none if they are full, and then
        ``blocked`` (back-pressure: the records wait in their ring, none is dropped). A
        record grows by at most ``_GROWTH`` bytes here (an Ethernet header)."""
        room = min(p.room() for p in targets)
        records = consumer.pop_batch(self.batch, room - self.batch * _GROWTH)
        if not records and consumer.pending():
            self.blocked = True
        return records

    def _outbound(self, consumer: Consumer, back: Producer) -> int:
        records = self._take(consumer, self.to_io)
        if not records:
            return 0
        to_io = self.to_io
        n = len(to_io)
        to_control = self.to_control
        from_inside = self.core.from_inside
        for kind, _, flags, data in records:
            if kind != _FRAME:
                self.drops["unexpected_kind"] += 1
                continue
            if flags & FLAG_VNET:
                header = data[:_VNET]
                action, peer, out = from_inside(data[_VNET:])
                if action is _TO_PEER:
                    to_io[worker_for_peer(peer, n)].push_parts(
                        [_shift(header, -_ETH), out], _IP_PACKET, peer, FLAG_VNET
                    )
                elif action is _TO_TAP:
                    back.push(out, _FRAME)  # an ARP reply: the tap_reader adds a zero header
                elif action is not _DROP:
                    at = 0 if action is _RESOLVE else _ETH  # a packet, or a frame
                    for whole in _whole(_shift(header, -_ETH), out, at):
                        to_control.push(whole, _CONTROL_KINDS[action])
                continue
            action, peer, out = from_inside(data)
            if action is _TO_PEER:
                to_io[worker_for_peer(peer, n)].push(out, _IP_PACKET, peer)
            elif action is _TO_TAP:
                back.push(out, _FRAME)
            elif action is _TO_CONTROL:
                to_control.push(out, _FRAME)
            elif action is _RESOLVE:
                to_control.push(out, RecordKind.RESOLVE)
            elif action is _CLAIM:
                to_control.push(out, RecordKind.CLAIM)
        consumer.release()
        return len(records)

    def _inbound(self, consumer: Consumer) -> int:
        records = self._take(consumer, self.to_tap)
        if not records:
            return 0
        to_tap = self.to_tap
        n = len(to_tap)
        from_outside = self.core.from_outside
        for kind, peer, flags, data in records:
            if kind != _IP_PACKET:
                self.drops["unexpected_kind"] += 1
                continue
            if flags & FLAG_VNET:
                header = data[:_VNET]
                data = data[_VNET:]
                action, slot, out = from_outside(peer, data)
                if action is _TO_TAP:
                    to_tap[worker_for_flow(data, n) if n > 1 else 0].push_parts(
                        [_shift(header, _ETH), out], _FRAME, 0, FLAG_VNET
                    )
                elif action is _VERIFY:
                    for whole in _whole(header, out, 0):
                        self.to_control.push(whole, RecordKind.VERIFY, slot)
                continue
            action, slot, out = from_outside(peer, data)
            if action is _TO_TAP:
                to_tap[worker_for_flow(data, n) if n > 1 else 0].push(out, _FRAME)
            elif action is _VERIFY:
                self.to_control.push(out, RecordKind.VERIFY, slot)
        consumer.release()
        return len(records)

    def _from_control(self) -> int:
        """Frames control made for the TAP: DHCP and DNS answers, ICMP errors."""
        records = self.from_control.pop_batch(self.batch)
        if not records:
            return 0
        for rec in records:
            if rec.kind == _FRAME:
                self.to_tap[0].push(rec.data, _FRAME)
            else:
                self.drops["unexpected_kind"] += 1
        self.from_control.release()
        return len(records)

    def stats(self) -> dict[str, Any]:
        st = self.core.statistics()
        return {"classifier": _plain(st), "drops": dict(self.drops)}


_DROP = FrameAction.DROP
_CONTROL_KINDS = {
    _TO_CONTROL: _FRAME,
    _RESOLVE: int(RecordKind.RESOLVE),
    _CLAIM: int(RecordKind.CLAIM),
    _VERIFY: int(RecordKind.VERIFY),
}


def _whole(header: bytes | memoryview, out: bytes | memoryview, at: int) -> list[bytes]:
    """What control may take of a verdict's bytes from a record with a virtio-net header
    (``header``: offsets from the IP packet, which starts at ``at`` in ``out``): whole
    packets with final checksums, each behind ``out``'s first ``at`` bytes (Ethernet)."""
    parsed = vnet.parse(header)
    if not parsed.gso_type and not parsed.flags & vnet.NEEDS_CSUM:
        return [bytes(out)]
    lead = bytes(out[:at])
    return [lead + packet for packet in tso.segment(parsed, out[at:])]


def _plain(value: Any) -> Any:
    """A statistics record as JSON-friendly data."""
    if isinstance(value, msgspec.Struct):
        return {k: _plain(getattr(value, k)) for k in value.__struct_fields__}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value
