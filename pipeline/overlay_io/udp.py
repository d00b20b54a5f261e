"""The node's UDP port. Every overlay_io worker binds the same port with SO_REUSEPORT; the
kernel spreads incoming datagrams over the workers by their 4-tuple."""

from __future__ import annotations

import errno
import socket

from pipeline.errors import StageIOError

SO_RCVBUFFORCE = 33
SO_SNDBUFFORCE = 32
RECV_SIZE = 65536 + 64
Address = tuple[str, int]

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
        """One datagram into ``self.buffer``: (length, source), or None when none is waiting."""
        try:
            return self.sock.recvfrom_into(self.buffer)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno in _TRANSIENT:  # ICMP errors from earlier sends surface here
                return None
            raise StageIOError(f"UDP receive failed: {exc}") from exc

    def send(self, parts: list[bytes | memoryview], address: Address) -> bool:
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
