"""The inside of a node in one process: a tap_reader worker on a MemoryTap and a classifier
worker, on real shm rings, with a stand-in for control on real ZeroMQ sockets; the test holds
the far ends of the rings to overlay_io and control. No root, no TAP, no namespace."""

from __future__ import annotations

import functools
import os
import select
import threading
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
import structlog
import zmq

from pipeline import messages, shm_ring
from pipeline.classifier.interface import InterfaceClassifier
from pipeline.classifier.router import RouterClassifier
from pipeline.classifier.stage import ClassifierWorker
from pipeline.config import GATEWAY_MAC, Settings, settings_from_mapping
from pipeline.records import FLAG_VNET, RecordKind
from pipeline.shm_ring import Consumer, Producer, Ring, RingSpec
from pipeline.tap_reader.device import MemoryTap, TapSettings
from pipeline.tap_reader.stage import TapReaderWorker
from pipeline.topology import Stage, WorkerId
from pipeline.wire import arp, ethernet, ipv4, tso, udp, vnet
from pipeline.worker import CONTROL_PUB_SOCKET, CONTROL_SOCKET, Worker, endpoint
from tests.test_tso import reference_segments, tcp_packet, tso_frame

A = IPv4Address
ME, PEER, UNROUTED, GATEWAY = A("100.64.0.1"), A("100.64.0.2"), A("100.64.0.9"), A("100.64.0.254")
SLOT = 7  # the link slot of PEER
CLASSIFIER, TAP_READER = WorkerId(Stage.CLASSIFIER, 0), WorkerId(Stage.TAP_READER, 0)
IO, CONTROL = WorkerId(Stage.OVERLAY_IO, 0), WorkerId(Stage.CONTROL, 0)
K = RecordKind


def node_settings(tmp: Path, *, router: bool = False) -> Settings:
    network: dict[str, Any] = {"namespace": "lab", "subnet": "100.64.0.0/24"}
    if router:
        network |= {"mode": "router", "bridge": "br-lab", "create_bridge": True}
    else:
        network |= {"address": str(ME)}
    runtime = tmp / "run"
    runtime.mkdir(parents=True, exist_ok=True)
    return settings_from_mapping(
        {
            "node": {"name": "alpha", "state_dir": str(tmp / "state"), "runtime_dir": str(runtime)},
            "network": network,
            "security": {"ca_certificate": str(tmp / "ca.crt")},
        }
    )


class Control:
    """Control's side of the ZeroMQ sockets: answers a SnapshotRequest with routes."""

    def __init__(self, settings: Settings) -> None:
        runtime = settings.node.runtime_dir
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self.router = self.context.socket(zmq.ROUTER)
        self.router.bind(endpoint(runtime, CONTROL_SOCKET))
        self.pub = self.context.socket(zmq.PUB)
        self.pub.bind(endpoint(runtime, CONTROL_PUB_SOCKET))

    def answer(self, snapshot: messages.RouteSnapshot, timeout_s: float = 10.0) -> None:
        """Wait for a worker's SnapshotRequest and answer it."""
        assert self.router.poll(int(timeout_s * 1000)), "no SnapshotRequest came"
        ident, data = self.router.recv_multipart()
        assert isinstance(messages.decode(data), messages.SnapshotRequest)
        self.router.send_multipart([ident, messages.encode(snapshot)])

    def close(self) -> None:
        self.router.close(0)
        self.pub.close(0)


def snapshot(version: int = 1) -> messages.RouteSnapshot:
    peer = messages.PeerRoute(SLOT, "beta", (str(PEER),), "198.18.0.2:4789", True)
    return messages.RouteSnapshot(epoch=1, version=version, peers=(peer,), address=str(ME))


class Inside:
    """The rings of the workers in ``local`` (created here, as the supervisor would), those
    workers, and the test's ends of every ring whose other worker is not here."""

    def __init__(self, settings: Settings, local: set[WorkerId]) -> None:
        self.settings = settings
        self.specs: dict[str, RingSpec] = {}
        self.rings: list[Ring] = []
        self.push: dict[str, Producer] = {}  # ring name -> the test's producer
        self.pop: dict[str, Consumer] = {}  # ring name -> the test's consumer
        for edge in settings.stages.topology().rings():
            if not {edge.producer, edge.consumer} & local:
                continue
            spec = self.specs[edge.name] = shm_ring.create_ring(edge.name, shm_ring.MIN_CAPACITY)
            if edge.producer not in local:
                self.push[edge.name] = Producer(self._attach(spec))
            if edge.consumer not in local:
                self.pop[edge.name] = Consumer(self._attach(spec))
        self.workers: list[Worker] = []

    def _attach(self, spec: RingSpec) -> Ring:
        ring = Ring.attach(spec)
        self.rings.append(ring)
        return ring

    def start(self, worker: Worker) -> Worker:
        worker.setup()
        self.workers.append(worker)
        return worker

    def send(self, ring: str, records: list[tuple[int, int, bytes]], flags: int = 0) -> None:
        """Push (kind, peer, bytes) records into ``ring`` (with ``flags``) and flush."""
        producer = self.push[ring]
        for kind, peer, data in records:
            assert producer.push(data, kind, peer, flags)
        producer.flush()

    def received(self, ring: str) -> list[tuple[int, int, bytes]]:
        """The (kind, peer, bytes) records waiting on ``ring``."""
        return [(kind, peer, data) for kind, peer, _, data in self.records(ring)]

    def records(self, ring: str) -> list[tuple[int, int, int, bytes]]:
        """The (kind, peer, flags, bytes) records waiting on ``ring``."""
        consumer = self.pop[ring]
        got = [(r.kind, r.peer, r.flags, bytes(r.data)) for r in consumer.pop_batch(1000)]
        consumer.release()
        return got

    def pump(self) -> None:
        """Run every worker's work and ZeroMQ handlers until nothing moves."""
        for _ in range(50):
            moved = 0
            for worker in self.workers:
                for sock, _ in worker._zmq_sockets:
                    sock.used = True  # no epoll here to say a socket's FD fired: ask them all
                moved += worker.work() + worker._service_zmq()
            if not moved:
                return
        raise AssertionError("the workers never went quiet")

    def pump_until(self, what: str, done: Callable[[], bool], timeout_s: float = 10.0) -> None:
        """Pump until ``done()`` (ZeroMQ delivers on its own threads, a moment later)."""
        deadline = time.monotonic() + timeout_s
        while not done():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            self.pump()
            time.sleep(0.002)

    def close(self) -> None:
        for worker in self.workers:
            worker.teardown()
            feed = getattr(worker, "routes", None)
            if feed is not None:
                feed.close()
            for ring in worker._rings:
                ring.close()
            worker.epoll.close()
        for ring in self.rings:
            ring.close()
        for spec in self.specs.values():
            shm_ring.close_spec(spec)


@pytest.fixture(autouse=True)
def quiet_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pipeline.worker.configure_logging", lambda **kw: structlog.get_logger())


@pytest.fixture
def made(tmp_path: Path) -> Iterator[list[Inside | Control]]:
    """What a test made, closed after it."""
    things: list[Inside | Control] = []
    try:
        yield things
    finally:
        for thing in reversed(things):
            thing.close()


# -- frames ------------------------------------------------------------------------------------


def arp_request(target: IPv4Address, settings: Settings) -> bytes:
    request = arp.ArpPacket(arp.ArpOp.REQUEST, settings.tap_mac, ME, bytes(6), target)
    body = arp.build(request)
    return ethernet.build(ethernet.BROADCAST, settings.tap_mac, ethernet.ETHERTYPE_ARP, body)


def arp_reply(target: IPv4Address, settings: Settings) -> bytes:
    reply = arp.ArpPacket(arp.ArpOp.REPLY, GATEWAY_MAC, target, settings.tap_mac, ME)
    return ethernet.build(settings.tap_mac, GATEWAY_MAC, ethernet.ETHERTYPE_ARP, arp.build(reply))


def packet(src: IPv4Address, dst: IPv4Address, dport: int = 5001) -> bytes:
    payload = udp.build(40000, dport, b"payload" * 20)
    return ipv4.build(src=src, dst=dst, protocol=ipv4.Protocol.UDP, payload=payload)


def from_tap(ip_packet: bytes, settings: Settings) -> bytes:
    return ethernet.build(GATEWAY_MAC, settings.tap_mac, ethernet.ETHERTYPE_IPV4, ip_packet)


def to_tap(ip_packet: bytes, settings: Settings) -> bytes:
    return ethernet.build(settings.tap_mac, GATEWAY_MAC, ethernet.ETHERTYPE_IPV4, ip_packet)


# -- the classifier worker alone ---------------------------------------------------------------


def classifier_alone(tmp: Path, made: list[Inside | Control]) -> tuple[Inside, ClassifierWorker]:
    settings = node_settings(tmp)
    control = Control(settings)
    made.append(control)
    inside = Inside(settings, {CLASSIFIER})
    made.append(inside)
    worker = ClassifierWorker(settings, 0, inside.specs)
    inside.start(worker)
    control.answer(snapshot())
    inside.pump_until("routes", lambda: worker.core.routes.version == 1)
    return inside, worker


def test_each_verdict_becomes_the_record_its_edge_carries(
    tmp_path: Path, made: list[Inside | Control]
) -> None:
    inside, worker = classifier_alone(tmp_path, made)
    s = inside.settings
    routed, unrouted = packet(ME, PEER), packet(ME, UNROUTED)
    dhcp = from_tap(packet(A("0.0.0.0"), A("255.255.255.255"), 67), s)
    inside.send(
        "tap_reader0>classifier0",
        [
            (K.FRAME, 0, arp_request(PEER, s)),
            (K.FRAME, 0, from_tap(routed, s)),
            (K.FRAME, 0, dhcp),
            (K.FRAME, 0, from_tap(unrouted, s)),
        ],
    )
    unverified = packet(UNROUTED, ME)
    inside.send(
        "overlay_io0>classifier0",
        [(K.IP_PACKET, SLOT, packet(PEER, ME)), (K.IP_PACKET, SLOT, unverified)],
    )
    inside.send("control0>classifier0", [(K.FRAME, 0, b"an answer from control")])
    inside.pump()
    assert inside.received("classifier0>overlay_io0") == [(K.IP_PACKET, SLOT, routed)]
    assert inside.received("classifier0>tap_reader0") == [
        (K.FRAME, 0, arp_reply(PEER, s)),
        (K.FRAME, 0, to_tap(packet(PEER, ME), s)),
        (K.FRAME, 0, b"an answer from control"),
    ]
    assert inside.received("classifier0>control0") == [
        (K.FRAME, 0, dhcp),
        (K.RESOLVE, 0, unrouted),
        (K.VERIFY, SLOT, unverified),
    ]
    assert worker.stats()["drops"] == {}


def test_a_record_of_a_kind_its_ring_does_not_carry_is_a_counted_drop(
    tmp_path: Path, made: list[Inside | Control]
) -> None:
    inside, worker = classifier_alone(tmp_path, made)
    s = inside.settings
    inside.send("tap_reader0>classifier0", [(K.IP_PACKET, 0, packet(ME, PEER))])
    inside.send("overlay_io0>classifier0", [(K.FRAME, SLOT, to_tap(packet(PEER, ME), s))])
    inside.send("control0>classifier0", [(K.RESOLVE, 0, packet(ME, UNROUTED))])
    inside.pump()
    for ring in ("classifier0>overlay_io0", "classifier0>tap_reader0", "classifier0>control0"):
        assert inside.received(ring) == []
    stats = worker.stats()
    assert stats["drops"] == {"unexpected_kind": 3}
    assert stats["classifier"]["from_inside"] == stats["classifier"]["from_outside"] == 0


def test_the_stage_picks_its_classifier_once_from_network_mode(
    tmp_path: Path, made: list[Inside | Control]
) -> None:
    for router, cls in ((False, InterfaceClassifier), (True, RouterClassifier)):
        settings = node_settings(tmp_path / cls.mode, router=router)
        inside = Inside(settings, {CLASSIFIER})
        made.append(inside)
        worker = ClassifierWorker(settings, 0, inside.specs)
        inside.start(worker)
        assert type(worker.core) is cls and worker.core.mode == settings.network.mode


# -- a MemoryTap, and a tap_reader on it -------------------------------------------------------


def test_a_memory_tap_is_readable_exactly_while_frames_wait() -> None:
    tap = MemoryTap()
    poller = select.epoll()
    try:
        poller.register(tap.fileno(), select.EPOLLIN)
        assert poller.poll(0) == [] and tap.read() is None
        tap.inject(b"first")
        tap.inject(memoryview(b"second and longer"))
        assert poller.poll(0) == [(tap.fileno(), select.EPOLLIN)]
        assert tap.read() == b"first"
        assert poller.poll(0) != []  # one still waits
        buffer = bytearray(6)
        assert tap.read_into(memoryview(buffer)) == 6 and buffer == b"second"  # cut, as a TAP
        assert (
            poller.poll(0) == []
            and tap.read() is None
            and tap.read_into(memoryview(buffer)) is None
        )
        assert tap.write(memoryview(b"out")) and list(tap.written) == [b"out"]
    finally:
        poller.close()
        tap.close()


def test_a_tap_reader_on_a_memory_tap_in_router_mode(
    tmp_path: Path, made: list[Inside | Control]
) -> None:
    """configure and attach_to_bridge are recorded; frames go both ways; a record of a kind
    its ring does not carry is counted, not written."""
    settings = node_settings(tmp_path, router=True)
    inside = Inside(settings, {TAP_READER})
    made.append(inside)
    tap = MemoryTap()
    worker = TapReaderWorker(settings, 0, inside.specs, open_tap=lambda name, **kw: tap)
    inside.start(worker)
    net = settings.network
    assert tap.settings == [TapSettings(settings.tap_mac, net.mtu, None, net.subnet)]
    assert tap.bridges == [("br-lab", True)]
    frame = from_tap(packet(A("100.64.0.11"), PEER), settings)
    tap.inject(frame)
    inside.send("classifier0>tap_reader0", [(K.FRAME, 0, b"to the segment"), (K.RESOLVE, 0, b"?")])
    inside.pump()
    assert inside.received("tap_reader0>classifier0") == [(K.FRAME, 0, frame)]
    assert list(tap.written) == [b"to the segment"]
    stats = worker.stats()
    assert (stats["frames_read"], stats["frames_written"]) == (1, 1)
    assert stats["drops"] == {"unexpected_kind": 1}


class Loops:
    """Workers running their own loops, each on a thread: each sleeps in its epoll on its
    ring doorbells, its device and its ZeroMQ sockets, as it does in a process of its own."""

    def __init__(self, workers: list[Worker]) -> None:
        self.threads: list[threading.Thread] = []
        self.wakes: list[int] = []
        self.failures: list[BaseException] = []
        self.workers = workers
        for worker in workers:
            wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            worker.watch(wake, functools.partial(_drain, wake))
            self.wakes.append(wake)
            thread = threading.Thread(target=self._run, args=(worker,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _run(self, worker: Worker) -> None:
        try:
            worker._loop()
        except BaseException as exc:  # re-raised in the test by stop()
            self.failures.append(exc)

    def stop(self) -> None:
        for worker, wake in zip(self.workers, self.wakes, strict=True):
            worker.running = False
            os.eventfd_write(wake, 1)
        for thread in self.threads:
            thread.join(10)
            assert not thread.is_alive(), "a worker loop did not stop"
        for wake in self.wakes:
            os.close(wake)
        if self.failures:
            raise self.failures[0]


def _drain(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass


def wait_for(what: str, done: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def test_arp_and_packets_through_a_tap_reader_and_a_classifier(
    tmp_path: Path, made: list[Inside | Control]
) -> None:
    """The two workers of the inside run their loops; the kernel's side is a MemoryTap."""
    settings = node_settings(tmp_path)
    control = Control(settings)
    made.append(control)
    inside = Inside(settings, {TAP_READER, CLASSIFIER})
    made.append(inside)
    tap = MemoryTap()
    inside.start(TapReaderWorker(settings, 0, inside.specs, open_tap=lambda name, **kw: tap))
    classifier = inside.start(ClassifierWorker(settings, 0, inside.specs))
    assert isinstance(classifier, ClassifierWorker)
    loops = Loops(inside.workers)
    try:
        control.answer(snapshot())
        wait_for("routes", lambda: classifier.core.routes.version == 1)
        # the kernel asks for another virtual address: the classifier answers on the TAP
        tap.inject(arp_request(A("100.64.0.77"), settings))
        wait_for("the ARP reply", lambda: len(tap.written) == 1)
        assert tap.written.popleft() == arp_reply(A("100.64.0.77"), settings)
        # a packet to a routed address goes to overlay_io, for the peer's link
        outbound = packet(ME, PEER)
        tap.inject(from_tap(outbound, settings))
        got: list[tuple[int, int, bytes]] = []

        def arrived() -> bool:
            got.extend(inside.received("classifier0>overlay_io0"))
            return bool(got)

        wait_for("the packet", arrived)
        assert got == [(K.IP_PACKET, SLOT, outbound)]
        # and the peer's answer reaches the TAP, framed
        inside.send("overlay_io0>classifier0", [(K.IP_PACKET, SLOT, packet(PEER, ME))])
        wait_for("the answer", lambda: len(tap.written) == 1)
        assert tap.written.popleft() == to_tap(packet(PEER, ME), settings)
    finally:
        loops.stop()
    assert tap.settings == [
        TapSettings(settings.tap_mac, settings.network.mtu, ME, settings.network.subnet)
    ]
    assert tap.bridges == []


# -- super-frames: records with a virtio-net header ---------------------------------------------


def swapped(ip_packet: bytes) -> bytes:
    """The packet from its destination to its source (both checksums stay right: the sums
    do not care about order)."""
    return ip_packet[:12] + ip_packet[16:20] + ip_packet[12:16] + ip_packet[20:]


def vnet_inside(
    tmp: Path, made: list[Inside | Control], tap: MemoryTap
) -> tuple[Inside, TapReaderWorker, ClassifierWorker]:
    settings = node_settings(tmp)
    control = Control(settings)
    made.append(control)
    inside = Inside(settings, {TAP_READER, CLASSIFIER})
    made.append(inside)
    reader = TapReaderWorker(settings, 0, inside.specs, open_tap=lambda name, **kw: tap)
    inside.start(reader)
    classifier = ClassifierWorker(settings, 0, inside.specs)
    inside.start(classifier)
    control.answer(snapshot())
    inside.pump_until("routes", lambda: classifier.core.routes.version == 1)
    return inside, reader, classifier


TSO = vnet.build(vnet.NEEDS_CSUM, vnet.GSO_TCPV4, 66, 1360, 34, 16)  # as a TAP hands it over
CSUM = vnet.build(vnet.NEEDS_CSUM, 0, 0, 0, 34, 16)


def test_a_super_frame_crosses_the_inside_as_one_record_with_its_header(
    tmp_path: Path, made: list[Inside | Control]
) -> None:
    tap = MemoryTap(vnet=True)
    inside, reader, classifier = vnet_inside(tmp_path, made, tap)
    s = inside.settings
    frame = tso_frame(1, bytes(range(256)) * 200, 1360)
    tap.inject(TSO + from_tap(frame, s))
    inside.pump()
    shifted = vnet.build(vnet.NEEDS_CSUM, vnet.GSO_TCPV4, 52, 1360, 20, 16)
    assert inside.records("classifier0>overlay_io0") == [
        (K.IP_PACKET, SLOT, FLAG_VNET, shifted + frame)
    ]
    # the peer's coalesced segments: to the TAP with the header shifted back
    inside.send(
        "overlay_io0>classifier0", [(K.IP_PACKET, SLOT, shifted + swapped(frame))], FLAG_VNET
    )
    inside.pump()
    assert list(tap.written) == [TSO + to_tap(swapped(frame), s)]
    assert classifier.stats()["classifier"]["from_inside"] == 1
    assert reader.stats()["vnet"] is True


def test_frames_without_a_header_get_a_zero_one_on_a_vnet_tap(
    tmp_path: Path, made: list[Inside | Control]
) -> None:
    tap = MemoryTap(vnet=True)
    inside, _, _ = vnet_inside(tmp_path, made, tap)
    s = inside.settings
    tap.inject(vnet.ZERO + arp_request(A("100.64.0.77"), s))
    inside.send("control0>classifier0", [(K.FRAME, 0, b"an answer from control")])
    inside.pump()
    assert list(tap.written) == [
        vnet.ZERO + arp_reply(A("100.64.0.77"), s),
        vnet.ZERO + b"an answer from control",
    ]


def test_control_gets_whole_packets_with_final_checksums(
    tmp_path: Path, made: list[Inside | Control]
) -> None:
    """A packet to an address without a route, its checksum left to finish: RESOLVE carries
    it finished; a super-frame is cut (a rare case, in software)."""
    tap = MemoryTap(vnet=True)
    inside, _, _ = vnet_inside(tmp_path, made, tap)
    s = inside.settings
    to_unrouted = bytearray(tcp_packet(1, b"syn", check=0))
    to_unrouted[16:20] = UNROUTED.packed
    to_unrouted[10:12] = bytes(2)
    to_unrouted[10:12] = ipv4.checksum(bytes(to_unrouted[:20])).to_bytes(2, "big")
    seed = tso.pseudo_sum(to_unrouted, 0, 6, len(to_unrouted) - 20)
    to_unrouted[36:38] = seed.to_bytes(2, "big")
    final = bytearray(to_unrouted)
    tso.finish_checksum(final, 20, 16)
    tap.inject(CSUM + from_tap(bytes(to_unrouted), s))
    inside.pump()
    assert inside.records("classifier0>control0") == [(K.RESOLVE, 0, 0, bytes(final))]


def test_a_tap_without_headers_gets_the_segments_checksummed(
    tmp_path: Path, made: list[Inside | Control]
) -> None:
    """The fallback: the kernel gave no virtio-net header, a peer's super-frame arrives."""
    tap = MemoryTap(vnet=False)
    inside, reader, _ = vnet_inside(tmp_path, made, tap)
    s = inside.settings
    payload = bytes(range(256)) * 20
    frame = swapped(tso_frame(1, payload, 1000))
    shifted = vnet.build(vnet.NEEDS_CSUM, vnet.GSO_TCPV4, 52, 1000, 20, 16)
    inside.send("overlay_io0>classifier0", [(K.IP_PACKET, SLOT, shifted + frame)], FLAG_VNET)
    inside.pump()
    expected = [to_tap(swapped(p), s) for p in reference_segments(1, payload, 1000, 0x18, 7)]
    assert list(tap.written) == expected
    assert reader.stats()["segmented_in_software"] == 1
