"""The route table as classifier and overlay_io workers receive it from control.

Control publishes whole ``RouteSnapshot``s (PUB/SUB) on every change and periodically. A
subscriber asks for the current one when it starts (DEALER -> control's ROUTER), so a
restarted worker resyncs at once; later it applies a snapshot only if it is newer (a
higher version in the same epoch, or any version of a new epoch after control restarted).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import zmq

from pipeline import messages
from pipeline.worker import CONTROL_PUB_SOCKET, CONTROL_SOCKET, Worker, endpoint

RECONNECT_MS = 10  # a first connect to control before it has bound: tried again this soon


class RouteFeed:
    def __init__(
        self,
        worker: Worker,
        on_snapshot: Callable[[messages.RouteSnapshot], None],
        on_message: Callable[[messages.Message], None] | None = None,
    ) -> None:
        self.worker = worker
        self.on_snapshot = on_snapshot
        self.on_message = on_message
        self.current: messages.RouteSnapshot | None = None
        runtime = worker.settings.node.runtime_dir
        self.sub = worker.zmq.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.RCVHWM, 100)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.req = worker.zmq.socket(zmq.DEALER)
        self.req.setsockopt(zmq.LINGER, 0)
        self.req.setsockopt(zmq.SNDHWM, 100)
        self.req.setsockopt(zmq.IDENTITY, f"{worker.stage}:{worker.index}".encode())
        for sock in (self.sub, self.req):
            # control starts beside us: its sockets may not be bound yet. ZeroMQ tries
            # again after RECONNECT_IVL (100 ms by default, a tenth of a node's start);
            # 10 ms, doubling up to 1 s while control stays away (a restart)
            sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_MS)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        self.sub.connect(endpoint(runtime, CONTROL_PUB_SOCKET))
        self.req.connect(endpoint(runtime, CONTROL_SOCKET))
        worker.watch(self.sub, lambda: self._drain(self.sub))
        worker.watch(self.req, lambda: self._drain(self.req))
        self.request()

    def request(self) -> None:
        ask = messages.SnapshotRequest(self.worker.stage, self.worker.index, os.getpid())
        try:
            self.req.send(messages.encode(ask), zmq.NOBLOCK)
        except zmq.Again:
            pass

    def _drain(self, sock: zmq.Socket[bytes]) -> None:
        while sock.poll(0):
            try:
                msg = messages.decode(sock.recv())
            except ValueError:
                self.worker.log.warning("message_dropped", reason="undecodable", source="control")
                continue
            if isinstance(msg, messages.RouteSnapshot):
                if self.current is not None and msg.epoch != self.current.epoch:
                    self.request()  # control restarted: register again (session keys)
                if self._is_newer(msg):
                    self.current = msg
                    self.on_snapshot(msg)
                    self.worker.log.debug("routes_applied", epoch=msg.epoch, version=msg.version)
            elif self.on_message is not None:
                self.on_message(msg)

    def tell(self, msg: messages.Message) -> None:
        """Send control a message on the request socket (dropped if control is not keeping up)."""
        try:
            self.req.send(messages.encode(msg), zmq.NOBLOCK)
        except zmq.Again:
            self.worker.log.warning("message_dropped", reason="control_busy", source="control")

    def _is_newer(self, msg: messages.RouteSnapshot) -> bool:
        cur = self.current
        return cur is None or msg.epoch != cur.epoch or msg.version > cur.version

    def close(self) -> None:
        self.sub.close(0)
        self.req.close(0)
