"""The node's UDP port, and its in-memory twin.

``Port`` is what overlay_io's driver needs of a port: a file descriptor its epoll loop waits
on, ``recv`` of one datagram into the port's buffer (``view``), ``send`` of one datagram
given as a list of buffers (``sendmsg``: the header and the sealed body are never joined),
``close`` and a count of failed sends. And the batches of the kernel's UDP offloads:

- ``send_segments``: many datagrams to one address in one ``sendmsg`` with a ``UDP_SEGMENT``
  control message (GSO: every datagram but the last of one size; at most ``GSO_SEGMENTS``
  and ``GSO_BYTES`` a call, so a 64 KiB super-frame's segments, sealed, take two). The
  first ``EIO`` (a kernel or device that cannot, e.g. without checksum offload before 6.x)
  turns GSO off for good, and that batch and every later one go a datagram a call.
- ``recv_batch``: with ``UDP_GRO`` the kernel hands over consecutive datagrams of one source
  in one read (it batches what was sent as GSO), their size in a control message:
  ``(length, source, segment)``, the datagrams ``segment`` bytes apart in ``view`` (the last
  may be shorter); without, one datagram (``segment`` = ``length``).

Both are asked for at bind (``gso``, ``gro``) and probed: ``getsockopt(UDP_SEGMENT)`` must
work, ``UDP_GRO`` must read back as set; ``gso`` and ``gro`` say what the port got.

- ``UdpPort``: the real one. Every overlay_io worker binds the same port with
  SO_REUSEPORT; the kernel spreads incoming datagrams over the workers by their 4-tuple.
  With ``handshake_socket`` (a node with one overlay_io worker) it binds the port twice and
  gives the group a classic BPF program (``SO_ATTACH_REUSEPORT_CBPF``) that steers
  HANDSHAKE and COOKIE datagrams (the payload's second byte) to the second socket: a
  flood of them fills that socket's small buffer (the kernel drops the rest, counted with
  ``SO_RXQ_OVFL`` as ``handshake_overflows``), never the one overlay traffic arrives on.
  ``recv_handshake`` reads it into ``handshake_view``; ``handshake_fd`` is None without it
  (several workers: the program would pick sockets across them by index, so they share
  one socket each as before).
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

import ctypes
import errno
import os
import socket
import struct
import threading
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
SO_RXQ_OVFL = 40
SO_ATTACH_REUSEPORT_CBPF = 51
HANDSHAKE_BUFFER_BYTES = 1 << 18
# classic BPF, run on the UDP payload: ldb [1]; jeq #3 -> 1; jeq #4 -> 1; ret #0; ret #1
_STEER_HANDSHAKES = (
    (0x30, 0, 0, 1),
    (0x15, 2, 0, 3),
    (0x15, 1, 0, 4),
    (0x06, 0, 0, 0),
    (0x06, 0, 0, 1),
)
RECV_SIZE = 65536 + 64
SOL_UDP = 17  # linux/udp.h: Python 3.11's socket module has none of these
UDP_SEGMENT = 103
UDP_GRO = 104
GSO_SEGMENTS = 64  # UDP_MAX_SEGMENTS of older kernels (128 since 6.x)
GSO_BYTES = 65507  # one UDP send carries at most this much, GSO or not
_GRO_CMSG = socket.CMSG_SPACE(4)
_U16 = struct.Struct("=H")
_INT = struct.Struct("=i")
_U32 = struct.Struct("=I")
_OVFL_CMSG = socket.CMSG_SPACE(4)

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
    gso: bool  # send_segments sends a batch in one call (else one call a datagram)
    gro: bool  # recv_batch may return many datagrams of one source

    def fileno(self) -> int:
        """A descriptor that polls readable while a datagram is waiting."""
        ...

    def recv(self) -> tuple[int, Address] | None:
        """One datagram into ``view``: (length, source), or None when none is waiting."""
        ...

    def send(self, parts: Sequence[ReadableBuffer], address: Address) -> bool:
        """One datagram made of ``parts`` to ``address``; False (counted) if it failed."""
        ...

    def recv_batch(self) -> tuple[int, Address, int] | None:
        """One read: (length, source, segment), or None when none is waiting."""
        ...

    handshake_fd: int | None  # the handshake socket's descriptor, if the port has one
    handshake_view: memoryview  # where ``recv_handshake`` puts a datagram
    handshake_overflows: int  # datagrams the kernel dropped at the handshake socket

    def recv_handshake(self) -> tuple[int, Address] | None:
        """One datagram from the handshake socket, or None (always, without one)."""
        ...

    def send_segments(self, parts: list[ReadableBuffer], size: int, address: Address) -> int:
        """Datagrams of ``size`` bytes (the last may be shorter), each the concatenation of
        two of ``parts`` (header, body), to ``address``; how many went."""
        ...

    def close(self) -> None: ...


class UdpPort:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        buffer_bytes: int,
        gso: bool = False,
        gro: bool = False,
        handshake_socket: bool = False,
        buffer: bytearray | None = None,
    ) -> None:
        """``buffer``: the receive buffer (RECV_SIZE bytes) to read into, shared with other
        ports read one at a time by the same loop (a socket pool's); else one of its own."""
        sock = _bound(host, port, buffer_bytes)
        sock.setblocking(False)
        self.sock = sock
        self.buffer = buffer if buffer is not None else bytearray(RECV_SIZE)
        self.view = memoryview(self.buffer)
        self.send_errors = 0
        self.gso = gso and _probe_gso(sock)
        self.gro = gro and _set_gro(sock)
        self.gso_failed = ""  # why GSO was turned off while running (an EIO)
        self._gso_cmsg: dict[int, list[tuple[int, int, bytes]]] = {}
        bound_port = sock.getsockname()[1]  # ``port`` may be 0: the second socket joins this
        self.handshake_sock = (
            _handshake_socket(sock, host, bound_port) if handshake_socket else None
        )
        self.handshake_fd = None if self.handshake_sock is None else self.handshake_sock.fileno()
        # without a handshake socket nothing is ever read into it: no 64 KiB of its own
        self.handshake_buffer = self.buffer if self.handshake_sock is None else bytearray(RECV_SIZE)
        self.handshake_view = memoryview(self.handshake_buffer)
        self.handshake_overflows = 0

    def recv_handshake(self) -> tuple[int, Address] | None:
        if self.handshake_sock is None:
            return None
        got = _recvmsg(self.handshake_sock, self.handshake_buffer, _OVFL_CMSG)
        if got is None:
            return None
        length, ancillary, source = got
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_RXQ_OVFL and len(data) >= 4:
                self.handshake_overflows = _U32.unpack_from(data)[0]
        return length, source

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

    def recv_batch(self) -> tuple[int, Address, int] | None:
        if not self.gro:
            got = self.recv()
            return None if got is None else (got[0], got[1], got[0])
        read = _recvmsg(self.sock, self.buffer, _GRO_CMSG)
        if read is None:
            return None
        length, ancillary, source = read
        segment = length
        for level, kind, data in ancillary:
            if level == SOL_UDP and kind == UDP_GRO and len(data) >= 4:
                segment = _INT.unpack_from(data)[0] or length
        return length, source, segment

    def send_segments(self, parts: list[ReadableBuffer], size: int, address: Address) -> int:
        sent = 0
        if self.gso:
            per = min(GSO_SEGMENTS, GSO_BYTES // size) * 2
            cmsg = self._gso_cmsg.get(size)
            if cmsg is None:
                cmsg = self._gso_cmsg[size] = [(SOL_UDP, UDP_SEGMENT, _U16.pack(size))]
            for at in range(0, len(parts), per):
                chunk = parts[at : at + per]
                try:
                    self.sock.sendmsg(chunk, cmsg, 0, address)
                    sent += len(chunk) // 2
                    continue
                except BlockingIOError:
                    self.send_errors += 1
                    continue
                except OSError as exc:
                    if exc.errno == errno.EIO:  # the kernel cannot: never again
                        self.gso = False
                        self.gso_failed = str(exc)
                        return sent + self._send_each(parts[at:], address)
                    if exc.errno in _TRANSIENT:
                        self.send_errors += 1
                        continue
                    raise StageIOError(f"UDP send failed: {exc}") from exc
            return sent
        return self._send_each(parts, address)

    def _send_each(self, parts: list[ReadableBuffer], address: Address) -> int:
        sent = 0
        for at in range(0, len(parts), 2):
            sent += self.send(parts[at : at + 2], address)
        return sent

    def close(self) -> None:
        self.sock.close()
        if self.handshake_sock is not None:
            self.handshake_sock.close()


def _recvmsg(
    sock: socket.socket, buffer: bytearray, cmsg_size: int
) -> tuple[int, list[tuple[int, int, bytes]], Address] | None:
    """One datagram into ``buffer``: (length, control messages, source); None if none is
    waiting or a transient error (an ICMP error from an earlier send) surfaced instead."""
    try:
        length, ancillary, _flags, source = sock.recvmsg_into([buffer], cmsg_size)
    except BlockingIOError:
        return None
    except OSError as exc:
        if exc.errno in _TRANSIENT:
            return None
        raise StageIOError(f"UDP receive failed: {exc}") from exc
    return length, ancillary, source


def _bound(host: str, port: int, buffer_bytes: int) -> socket.socket:
    """A UDP socket bound to ``host:port`` with SO_REUSEPORT and ``buffer_bytes`` buffers."""
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
    return sock


def _handshake_socket(main: socket.socket, host: str, port: int) -> socket.socket | None:
    """The port's second socket, and the program that steers handshake datagrams to it
    (``main`` joined the group first: index 0; this one: 1); None if the kernel refuses."""
    sock = _bound(host, port, HANDSHAKE_BUFFER_BYTES)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
        program = (_SockFilter * len(_STEER_HANDSHAKES))(
            *(_SockFilter(*op) for op in _STEER_HANDSHAKES)
        )
        fprog = _SockFprog(len(_STEER_HANDSHAKES), program)
        main.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, bytes(fprog))
    except OSError:
        sock.close()
        return None
    sock.setblocking(False)
    return sock


class _SockFilter(ctypes.Structure):
    _fields_ = (
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    )


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter)))


def _probe_gso(sock: socket.socket) -> bool:
    """Can this socket send with UDP_SEGMENT? (wireguard-go's probe: the option reads.)"""
    try:
        sock.getsockopt(SOL_UDP, UDP_SEGMENT)
        return True
    except OSError:
        return False


def _set_gro(sock: socket.socket) -> bool:
    """Ask for UDP_GRO; True if it reads back as set."""
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
        return sock.getsockopt(SOL_UDP, UDP_GRO) == 1
    except OSError:
        return False


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

    def port(self, host: str, port: int, *, gso: bool = True, gro: bool = True) -> MemoryPort:
        """A new port bound at ``host:port`` (beside any bound there already)."""
        bound = MemoryPort(self, (host, port), gso=gso, gro=gro)
        self.ports.setdefault(bound.address, []).append(bound)
        return bound

    def deliver(self, datagram: bytes, source: Address, to: Address, segment: int = 0) -> None:
        """``datagram`` from ``source`` to the port at ``to``; with ``segment``, a GSO batch
        of datagrams ``segment`` bytes apart: one read for a port with ``gro``, else each
        its own (``sent`` records each datagram either way)."""
        if segment and segment < len(datagram):
            pieces = [datagram[i : i + segment] for i in range(0, len(datagram), segment)]
            if self.sent is not None:
                self.sent += [(piece, source, to) for piece in pieces]
            port = self._port(source, to)
            if port is not None and port.gro:
                self._queue(port, GroBatch(datagram, segment), source)
            elif port is not None:
                for piece in pieces:
                    self._queue(port, piece, source)
            return
        if self.sent is not None:
            self.sent.append((datagram, source, to))
        port = self._port(source, to)
        if port is not None:
            self._queue(port, datagram, source)

    def _port(self, source: Address, to: Address) -> MemoryPort | None:
        group = self.ports.get(to)
        if not group:
            self.lost += 1
            return None
        return group[self.spread(source, len(group)) if len(group) > 1 else 0]

    def _queue(self, port: MemoryPort, datagram: bytes, source: Address) -> None:
        if len(port.queue) >= self.queue_max:
            self.dropped += 1
        else:
            with port.lock:
                port.queue.append((datagram, source))
                if len(port.queue) == 1:
                    os.eventfd_write(port.fd, 1)


class GroBatch(bytes):
    """Datagrams of one source joined as a read with UDP_GRO gives them, ``segment`` apart."""

    segment: int

    def __new__(cls, data: bytes, segment: int) -> GroBatch:
        batch = super().__new__(cls, data)
        batch.segment = segment
        return batch


class MemoryPort:
    """A ``Port`` on a ``MemoryNetwork`` (see the module docstring). ``gso`` and ``gro``
    stand for the kernel's offloads: a GSO batch sent arrives as one read at a port with
    ``gro``, as separate datagrams at one without."""

    def __init__(
        self, network: MemoryNetwork, address: Address, *, gso: bool = True, gro: bool = True
    ) -> None:
        self.network = network
        self.address = address
        self.gso = gso
        self.gro = gro
        self.queue: deque[tuple[bytes, Address]] = deque()
        self.buffer = bytearray(RECV_SIZE)
        self.view = memoryview(self.buffer)
        self.send_errors = 0
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        # the fd is readable exactly while the queue is not empty: the sender's append and
        # write and the reader's pop and read happen under this lock (nodes on threads)
        self.lock = threading.Lock()
        self.handshake_fd: int | None = None  # one queue: handshakes come by ``recv``
        self.handshake_view = self.view
        self.handshake_overflows = 0

    def recv_handshake(self) -> tuple[int, Address] | None:
        return None

    def fileno(self) -> int:
        return self.fd

    def recv(self) -> tuple[int, Address] | None:
        queue = self.queue
        if not queue:
            return None
        with self.lock:
            datagram, source = queue.popleft()
            if not queue:
                os.eventfd_read(self.fd)  # not readable until the next datagram
        size = min(len(datagram), RECV_SIZE)  # a longer one is truncated, as recvfrom does
        self.view[:size] = datagram[:size]
        return size, source

    def send(self, parts: Sequence[ReadableBuffer], address: Address) -> bool:
        self.network.deliver(b"".join(parts), self.address, address)
        return True

    def recv_batch(self) -> tuple[int, Address, int] | None:
        queue = self.queue
        segment = queue[0][0].segment if queue and isinstance(queue[0][0], GroBatch) else 0
        got = self.recv()
        return None if got is None else (got[0], got[1], segment or got[0])

    def send_segments(self, parts: list[ReadableBuffer], size: int, address: Address) -> int:
        if not self.gso:
            for at in range(0, len(parts), 2):
                self.send(parts[at : at + 2], address)
            return len(parts) // 2
        per = min(GSO_SEGMENTS, GSO_BYTES // size) * 2
        for at in range(0, len(parts), per):
            self.network.deliver(b"".join(parts[at : at + per]), self.address, address, size)
        return len(parts) // 2

    def close(self) -> None:
        group = self.network.ports.get(self.address, [])
        if self in group:
            group.remove(self)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
