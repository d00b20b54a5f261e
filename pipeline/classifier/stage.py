"""classifier: parses each frame once and sends it where it belongs.

outbound: tap_reader ring -> ``Classifier.from_inside`` -> an overlay_io ring (chosen by a hash
of the peer) or, for an ARP reply, straight back to the tap_reader ring it came from.
inbound: overlay_io ring -> ``Classifier.from_outside`` -> a tap_reader ring (by flow hash).
The decisions are in the sans-I/O ``Classifier``; this file only moves records.
"""

from __future__ import annotations

from ipaddress import IPv4Address
from typing import Any

from pipeline import messages
from pipeline.classifier.classify import Action, Classifier, LocalHosts
from pipeline.classifier.routes import Routes
from pipeline.config import GATEWAY_MAC, Mode
from pipeline.records import RecordKind
from pipeline.route_feed import RouteFeed
from pipeline.shm_ring import Consumer, Producer
from pipeline.topology import Stage, worker_for_flow, worker_for_peer
from pipeline.worker import Worker


class ClassifierWorker(Worker):
    stage = Stage.CLASSIFIER

    def setup(self) -> None:
        s = self.settings
        self.batch = s.stages.classifier.batch
        self.core = Classifier(
            subnet=s.network.subnet,
            address=s.network.address,
            tap_mac=s.tap_mac,
            gateway_mac=GATEWAY_MAC,
            gateway=s.gateway_address,
            mode=s.network.mode.value,
            dhcp_port=s.network.dhcp_port,
            allow_static=s.network.allow_static,
        )
        self.router = s.network.mode is Mode.ROUTER
        self.from_tap = self.inputs(Stage.TAP_READER)
        self.to_tap = self.outputs(Stage.TAP_READER)
        self.from_io = self.inputs(Stage.OVERLAY_IO)
        self.to_io = self.outputs(Stage.OVERLAY_IO)
        (self.to_control,) = self.outputs(Stage.CONTROL)
        (self.from_control,) = self.inputs(Stage.CONTROL)
        self.producers: list[Producer] = [*self.to_tap, *self.to_io, self.to_control]
        self.routes = RouteFeed(self, self._apply)

    def _apply(self, snap: messages.RouteSnapshot) -> None:
        address = IPv4Address(snap.address) if snap.address else None
        if address != self.core.address:
            try:
                self.core.set_address(address)
            except ValueError as exc:
                self.log.error("address_rejected", address=snap.address, error=str(exc))
            else:
                self.log.info("address_applied", address=snap.address or None)
        if self.router:
            try:
                local = LocalHosts.from_leases(
                    snap.version, [(IPv4Address(a), bytes.fromhex(m)) for a, m in snap.local]
                )
                self.core.apply_local(local)
            except ValueError as exc:
                self.log.error("machines_rejected", error=str(exc))
        peers = [(p.slot, [IPv4Address(a) for a in p.addresses]) for p in snap.peers]
        self.core.apply_routes(Routes.from_peers(snap.version, peers))

    def work(self) -> int:
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

    def _outbound(self, consumer: Consumer, back: Producer) -> int:
        records = consumer.pop_batch(self.batch)
        if not records:
            return 0
        to_io = self.to_io
        n = len(to_io)
        from_inside = self.core.from_inside
        for rec in records:
            action, peer, out = from_inside(rec.data)
            if action is Action.TO_PEER:
                to_io[worker_for_peer(peer, n)].push(out, RecordKind.IP_PACKET, peer)  # type: ignore[arg-type]
            elif action is Action.TO_TAP:
                back.push(out, RecordKind.FRAME)  # type: ignore[arg-type]
            elif action is Action.TO_CONTROL:
                self.to_control.push(out, RecordKind.FRAME)  # type: ignore[arg-type]
            elif action is Action.RESOLVE:
                self.to_control.push(out, RecordKind.RESOLVE)  # type: ignore[arg-type]
            elif action is Action.CLAIM:
                self.to_control.push(out, RecordKind.CLAIM)  # type: ignore[arg-type]
        consumer.release()
        return len(records)

    def _from_control(self) -> int:
        """Frames control made for the TAP: DHCP and DNS answers, ICMP errors."""
        records = self.from_control.pop_batch(self.batch)
        if not records:
            return 0
        for rec in records:
            if rec.kind == RecordKind.FRAME:
                self.to_tap[0].push(rec.data, RecordKind.FRAME)
        self.from_control.release()
        return len(records)

    def _inbound(self, consumer: Consumer) -> int:
        records = consumer.pop_batch(self.batch)
        if not records:
            return 0
        to_tap = self.to_tap
        n = len(to_tap)
        from_outside = self.core.from_outside
        for rec in records:
            action, peer, out = from_outside(rec.peer, rec.data)
            if action is Action.TO_TAP:
                target = to_tap[worker_for_flow(rec.data, n) if n > 1 else 0]
                target.push(out, RecordKind.FRAME)  # type: ignore[arg-type]
            elif action is Action.VERIFY:
                self.to_control.push(out, RecordKind.VERIFY, peer)  # type: ignore[arg-type]
        consumer.release()
        return len(records)

    def stats(self) -> dict[str, Any]:
        st = self.core.statistics()
        return {"classifier": _plain(st)}


def _plain(value: Any) -> Any:
    """A statistics record as JSON-friendly data."""
    if hasattr(value, "__dataclass_fields__"):
        return {k: _plain(getattr(value, k)) for k in value.__dataclass_fields__}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value
