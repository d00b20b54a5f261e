"""control: the node's brain. For now: the static peers become a route table, published to
classifier and overlay_io workers, and keepalives measure each peer's liveness and RTT.

Overlay messages arrive from overlay_io rings (the record's peer slot says who sent them) and
leave through the ring to the overlay_io worker that owns that peer.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from typing import Any

import zmq

from pipeline import messages
from pipeline.classifier.routes import worker_for_peer
from pipeline.control.peers import PeerState, PeerTable
from pipeline.records import RecordKind
from pipeline.worker import CONTROL_PUB_SOCKET, CONTROL_SOCKET, Worker, endpoint, ring_name

REPUBLISH_S = 2.0


class ControlWorker(Worker):
    stage = "control"

    def setup(self) -> None:
        s = self.settings
        ios = s.stages.overlay_io.workers
        self.batch = s.stages.control.batch
        self.from_io = [self.consumer(ring_name("overlay_io", k, "control", 0)) for k in range(ios)]
        self.to_io = [self.producer(ring_name("control", 0, "overlay_io", k)) for k in range(ios)]
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
        runtime = s.node.runtime_dir
        self.pub = self.zmq.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.setsockopt(zmq.SNDHWM, 100)
        self.pub.bind(endpoint(runtime, CONTROL_PUB_SOCKET))
        self.router = self.zmq.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.SNDHWM, 100)
        self.router.bind(endpoint(runtime, CONTROL_SOCKET))
        self.watch(self.router, self._on_request)
        self.every(REPUBLISH_S, lambda now: self._publish())
        self.every(min(0.5, s.overlay.keepalive_interval_s / 2), self._tick)
        self._publish()

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
        return messages.RouteSnapshot(self.epoch, self.version, peers)

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
            if isinstance(msg, messages.SnapshotRequest):
                self.router.send_multipart([frames[0], messages.encode(self.snapshot())])

    def _tick(self, now: float) -> None:
        for slot, ping in self.liveness.handle_timer(now):
            self._send(slot, messages.encode_overlay(ping))
        self._flush_events()

    def _send(self, slot: int, payload: bytes) -> None:
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

    def work(self) -> int:
        done = 0
        now = time.monotonic()
        for consumer in self.from_io:
            records = consumer.pop_batch(self.batch)
            for rec in records:
                if rec.kind != RecordKind.OVERLAY:
                    self.drops["unexpected_kind"] += 1
                    continue
                try:
                    msg = messages.decode_overlay(rec.data)
                except ValueError:  # msgspec's errors and UnicodeDecodeError alike
                    self.drops["undecodable_overlay"] += 1
                    continue
                reply = self.liveness.receive(rec.peer, msg, now)
                if reply is not None:
                    self._send(rec.peer, messages.encode_overlay(reply))
            if records:
                consumer.release()
                done += len(records)
        if done:
            self._flush_events()
        return done

    def stats(self) -> dict[str, Any]:
        peers = []
        for slot, p in self.static:
            live = self.liveness.peers[slot]
            peers.append(
                {
                    "name": p.name,
                    "slot": slot,
                    "endpoint": str(p.endpoint),
                    "addresses": [str(a) for a in p.addresses],
                    "state": live.state.value,
                    "rtt_ms": None if live.rtt_s is None else round(live.rtt_s * 1000, 3),
                    "last_heard_s": None
                    if live.last_heard is None
                    else round(time.monotonic() - live.last_heard, 1),
                    "pings_sent": live.pings_sent,
                    "pongs_received": live.pongs_received,
                }
            )
        return {"peers": peers, "route_version": self.version, "drops": dict(self.drops)}

    def teardown(self) -> None:
        if hasattr(self, "pub"):
            self.pub.close(0)
            self.router.close(0)
