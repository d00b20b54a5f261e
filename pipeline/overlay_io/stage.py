"""overlay_io: the outside edge. Rings -> UDP (outbound) and UDP -> rings (inbound).

Outbound, a classifier's IP packet or a control message gets the overlay header and goes
to its peer's endpoint. Inbound, the header is checked, the source endpoint names the peer,
DATA goes to the classifier worker of that peer and OVERLAY to control, unread. Anything
else (junk, unknown sources) is a counted drop.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from pipeline import messages
from pipeline.classifier.routes import worker_for_peer
from pipeline.errors import RemoteProtocolError
from pipeline.overlay_io.udp import Address, UdpPort
from pipeline.records import RecordKind
from pipeline.route_feed import RouteFeed
from pipeline.shm_ring import Consumer, Producer
from pipeline.wire.overlay import HEADER_LEN, DatagramType, build_header, parse_header
from pipeline.worker import Worker, ring_name

_DATA = build_header(DatagramType.DATA)
_OVERLAY = build_header(DatagramType.OVERLAY)


class OverlayIoWorker(Worker):
    stage = "overlay_io"

    def setup(self) -> None:
        s = self.settings
        cfg = s.stages.overlay_io
        self.batch = cfg.batch
        self.port = UdpPort(
            str(s.overlay.listen_address),
            s.overlay.listen_port,
            buffer_bytes=cfg.socket_buffer_bytes,
        )
        classifiers = s.stages.classifier.workers
        me = self.index
        self.from_classifier = [
            self.consumer(ring_name("classifier", c, "overlay_io", me)) for c in range(classifiers)
        ]
        self.to_classifier = [
            self.producer(ring_name("overlay_io", me, "classifier", c)) for c in range(classifiers)
        ]
        self.from_control = self.consumer(ring_name("control", 0, "overlay_io", me))
        self.to_control = self.producer(ring_name("overlay_io", me, "control", 0))
        self.producers: list[Producer] = [*self.to_classifier, self.to_control]
        self.endpoints: dict[int, Address] = {}
        self.slots: dict[Address, int] = {}
        self.sent = self.sent_bytes = self.received = self.received_bytes = 0
        self.no_endpoint = 0
        self.drops: Counter[str] = Counter()
        self.watch(self.port.fileno(), lambda: None)  # wakes the loop; work() reads
        self.routes = RouteFeed(self, self._apply)
        self.log.info("port_bound", address=f"{s.overlay.listen_address}:{s.overlay.listen_port}")

    def _apply(self, snap: messages.RouteSnapshot) -> None:
        endpoints = {}
        for peer in snap.peers:
            host, _, port = peer.endpoint.rpartition(":")
            endpoints[peer.slot] = (host, int(port))
        self.endpoints = endpoints
        self.slots = {addr: slot for slot, addr in endpoints.items()}

    def work(self) -> int:
        done = self._receive()
        for consumer in self.from_classifier:
            done += self._send(consumer, _DATA)
        done += self._send(self.from_control, _OVERLAY)
        return done

    def _send(self, consumer: Consumer, header: bytes) -> int:
        records = consumer.pop_batch(self.batch)
        if not records:
            return 0
        endpoints = self.endpoints
        send = self.port.send
        for rec in records:
            address = endpoints.get(rec.peer)
            if address is None:
                self.no_endpoint += 1
            elif send([header, rec.data], address):
                self.sent += 1
                self.sent_bytes += HEADER_LEN + len(rec.data)
        consumer.release()
        return len(records)

    def _receive(self) -> int:
        port = self.port
        view = port.view
        slots = self.slots
        to_classifier = self.to_classifier
        n = len(to_classifier)
        count = 0
        for _ in range(self.batch):
            got = port.recv()
            if got is None:
                break
            count += 1
            length, source = got
            slot = slots.get(source)
            if slot is None:
                self.drops["unknown_source"] += 1
                continue
            try:
                header = parse_header(view[:length])
            except RemoteProtocolError as exc:
                self.drops[exc.reason] += 1
                continue
            payload = view[HEADER_LEN:length]
            self.received += 1
            self.received_bytes += length
            if header.type is DatagramType.DATA:
                to_classifier[worker_for_peer(slot, n)].push(payload, RecordKind.IP_PACKET, slot)
            else:
                self.to_control.push(payload, RecordKind.OVERLAY, slot)
        if count:
            for p in self.producers:
                p.flush()
        return count

    def stats(self) -> dict[str, Any]:
        return {
            "datagrams_sent": self.sent,
            "bytes_sent": self.sent_bytes,
            "datagrams_received": self.received,
            "bytes_received": self.received_bytes,
            "send_errors": self.port.send_errors,
            "no_endpoint": self.no_endpoint,
            "drops": dict(self.drops),
        }

    def teardown(self) -> None:
        if hasattr(self, "port"):
            self.port.close()
