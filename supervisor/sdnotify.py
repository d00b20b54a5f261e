"""systemd's notification protocol (``sd_notify``), without a dependency: one datagram.

Under a unit with ``Type=notify`` systemd puts a unix datagram socket's address in
``$NOTIFY_SOCKET`` (a path, or an abstract name written with a leading ``@``) and, with
``WatchdogSec=``, the watchdog period in ``$WATCHDOG_USEC`` (and the pid it is meant for in
``$WATCHDOG_PID``). A service tells its state by sending newline-separated ``KEY=value``
lines there: ``READY=1``, ``STATUS=...``, ``WATCHDOG=1``, ``STOPPING=1``. Without
``$NOTIFY_SOCKET`` (not under systemd) a ``Notifier`` is not made and nothing is sent.

The supervisor (``supervisor/node.py``) sends READY=1 once the node has joined the overlay
(a node without an overlay: once its workers run), WATCHDOG=1 from its loop every half
period, STATUS= when what it says changes, and STOPPING=1 when shutdown starts. Workers do
not inherit these variables.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

#: what a worker must not inherit (only the supervisor talks to systemd)
VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def socket_address(name: str) -> str | bytes:
    """``$NOTIFY_SOCKET`` as ``sendto`` takes it: ``@name`` is the abstract ``\\0name``."""
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    return name


class Notifier:
    """Sends notifications to one socket; ``watchdog_s`` is the period (None: no watchdog)."""

    def __init__(self, address: str, watchdog_s: float | None = None) -> None:
        self.address = socket_address(address)
        self.watchdog_s = watchdog_s
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.error: OSError | None = None  # the last send's failure

    @classmethod
    def from_environment(
        cls, env: Mapping[str, str] | None = None, pid: int | None = None
    ) -> Notifier | None:
        """The notifier systemd asked for in ``env`` (default: this process's), or None."""
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        if not address or not (address.startswith(("/", "@"))):
            return None
        watchdog_s = None
        usec = env.get("WATCHDOG_USEC", "")
        meant_for = env.get("WATCHDOG_PID", "")
        mine = not meant_for or meant_for == str(os.getpid() if pid is None else pid)
        if usec.isdigit() and int(usec) > 0 and mine:
            watchdog_s = int(usec) / 1e6
        return cls(address, watchdog_s)

    def send(self, **fields: str | int) -> bool:
        """One datagram of ``KEY=value`` lines; False (and ``error``) if it could not go."""
        text = "\n".join(f"{key}={value}" for key, value in fields.items())
        try:
            self.sock.sendto(text.encode(), self.address)
        except OSError as exc:
            self.error = exc
            return False
        self.error = None
        return True

    def close(self) -> None:
        self.sock.close()
