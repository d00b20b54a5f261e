"""The node's UDP port, and its in-memory twin.

``Port`` is what overlay_io's driver needs of a port: a file descriptor its epoll loop waits
on, ``recv`` of one datagram into the port's buffer (``view``), ``send`` of one datagram
given as a list of buffers (``sendmsg``: the header and the sealed body are never joined),
``close`` and a count of failed sends.

- ``UdpPort``: the real one. Every overlay_io worker binds the same port with
  SO_REUSEPORT; the kernel spreads incoming datagrams over the workers by their 4-tuple.
- ``MemoryPort``: ports joined by a ``MemoryNetwork`` and keyed by address, for tests and
  benchmarks that run whole workers in one process (wireguard-go's ``conn/bindtest``). A
  datagram sent to an address is queued, copied as the kernel would, at a port bound there:
  several may be (as every worker binds the node's port), and ``spread`` picks one by the
  datagram's source, like SO_REUSEPORT's hash. Each port has an eventfd that is readable
  while its queue is not empty, so an epoll loop wakes up exactly as for a socket. Nothing
  bound at an address: the datagram is lost (counted); a full queue drops it (counted), as
  a socket buffer does.
"""

from __future__ import annotations

import errno
import os
import socket
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol

from pipeline.crypto.datapath import ReadableBuffer
from pipeline.errors import StageIOError
from pipeline.overlay_io.sessions import Address

__all__ = [
    "RECV_SIZE",
    "Address",
    "MemoryNetwork",
    "MemoryPort",
    "Port",
    "UdpPort",
    "spread_by_source",
]

SO_RCVBUFFORCE = 33
SO_SNDBUFFORCE = 32
RECV_SIZE = 65536 + 64

_TRANSIENT = frozenset(
    {
        errno.ECONNREFUSED,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENOBUFS,
        errno.EPERM,
        errno.EMSGSIZE,
        errno.EAGAIN,
        errno.EHOSTDOWN,
    }
)


class Port(Protocol):
    """What overlay_io's driver needs of its UDP port."""

    view: memoryview  # the receive buffer: ``recv`` puts each datagram at its start
    send_errors: int  # sends that failed (transient errors, a full buffer)

    def fileno(self) -> int:
        """A descriptor that polls readable while a datagram is waiting."""
        ...

    def recv(self) -> tuple[int, Address] | None:
        """One datagram into ``view``: (length, source), or None when none is waiting."""
        ...

    def send(self, parts: Sequence[ReadableBuffer], address: Address) -> bool:
        """One datagram made of ``parts`` to ``address``; False (counted) if it failed."""
        ...

    def close(self) -> None: ...


class UdpPort:
    def __init__(self, host: str, port: int, *, buffer_bytes: int) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            for force, plain in (
                (SO_RCVBUFFORCE, socket.SO_RCVBUF),
                (SO_SNDBUFFORCE, socket.SO_SNDBUF),
            ):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, force, buffer_bytes)
                except OSError:
                    sock.setsockopt(socket.SOL_SOCKET, plain, buffer_bytes)
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise StageIOError(f"cannot bind UDP {host}:{port}: {exc}") from exc
        sock.setblocking(False)
        self.sock = sock
        self.buffer = bytearray(RECV_SIZE)
        self.view = memoryview(self.buffer)
        self.send_errors = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv(self) -> tuple[int, Address] | None:
        try:
            return self.sock.recvfrom_into(self.buffer)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno in _TRANSIENT:  # ICMP errors from earlier sends surface here
                return None
            raise StageIOError(f"UDP receive failed: {exc}") from exc

    def send(self, parts: Sequence[ReadableBuffer], address: Address) -> bool:
        try:
            self.sock.sendmsg(parts, (), 0, address)
            return True
        except BlockingIOError:
            self.send_errors += 1
            return False
        except OSError as exc:
            if exc.errno in _TRANSIENT:
                self.send_errors += 1
                return False
            raise StageIOError(f"UDP send failed: {exc}") from exc

    def close(self) -> None:
        self.sock.close()


def spread_by_source(source: Address, ports: int) -> int:
    """Which of ``ports`` ports bound at one address gets a datagram from ``source``: a
    stable hash, the same in every process (SO_REUSEPORT hashes the 4-tuple)."""
    return zlib.crc32(f"{source[0]}:{source[1]}".encode()) % ports


class MemoryNetwork:
    """Memory ports by address. ``record``: keep every datagram sent, as
    ``(datagram, source, destination)``, in ``sent`` (tests read the wire from it).
    ``spread``: which of the ports bound at an address receives from a source."""

    def __init__(
        self,
        *,
        queue_max: int = 4096,
        record: bool = False,
        spread: Callable[[Address, int], int] = spread_by_source,
    ) -> None:
        self.queue_max = queue_max
        self.spread = spread
        self.ports: dict[Address, list[MemoryPort]] = {}
        self.sent: list[tuple[bytes, Address, Address]] | None = [] if record else None
        self.lost = 0  # sent to an address where no port is bound
        self.dropped = 0  # arrived at a full queue

    def port(self, host: str, port: int) -> MemoryPort:
        """A new port bound at ``host:port`` (beside any bound there already)."""
        bound = MemoryPort(self, (host, port))
        self.ports.setdefault(bound.address, []).append(bound)
        return bound

    def deliver(self, datagram: bytes, source: Address, to: Address) -> None:
        if self.sent is not None:
            self.sent.append((datagram, source, to))
        group = self.ports.get(to)
        if not group:
            self.lost += 1
            return
        port = group[self.spread(source, len(group)) if len(group) > 1 else 0]
        if len(port.queue) >= self.queue_max:
            self.dropped += 1
        else:
            port.queue.append((datagram, source))
            if len(port.queue) == 1:
                os.eventfd_write(port.fd, 1)


class MemoryPort:
    """A ``Port`` on a ``MemoryNetwork`` (see the module docstring)."""

    def __init__(self, network: MemoryNetwork, address: Address) -> None:
        self.network = network
        self.address = address
        self.queue: deque[tuple[bytes, Address]] = deque()
        self.buffer = bytearray(RECV_SIZE)
        self.view = memoryview(self.buffer)
        self.send_errors = 0
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def fileno(self) -> int:
        return self.fd

    def recv(self) -> tuple[int, Address] | None:
        queue = self.queue
        if not queue:
            return None
        datagram, source = queue.popleft()
        if not queue:
            os.eventfd_read(self.fd)  # not readable until the next datagram
        size = min(len(datagram), RECV_SIZE)  # a longer one is truncated, as recvfrom does
        self.view[:size] = datagram[:size]
        return size, source

    def send(self, parts: Sequence[ReadableBuffer], address: Address) -> bool:
        self.network.deliver(b"".join(parts), self.address, address)
        return True

    def close(self) -> None:
        group = self.network.ports.get(self.address, [])
        if self in group:
            group.remove(self)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
