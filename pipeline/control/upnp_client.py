"""control's UPnP IGD client: miniupnpc's blocking calls, in a thread off the event loop.

``PortMapper`` (``pipeline/control/nat/portmap.py``) decides what to ask; this runs it. The
control worker hands each ``UpnpMap`` / ``UpnpDelete`` (``nat/upnp.py``) to ``submit``; a
daemon thread, started with the first, runs them in order, one at a time, and puts each
one's ``UpnpResult`` in a queue, then writes a byte to a socketpair whose other end the
worker watches (``fileno``): when it is readable the worker takes the results
(``results``) into its core. The event loop never waits on the network: SSDP discovery
waits ``DISCOVERY_MS`` for answers, and a SOAP call can hang for seconds on a gateway that
went away, both in the thread.

The thread keeps the IGD it found (discovery from the node's LAN address, miniupnpc's
choice among the devices that answered) until a call fails for a reason that says it is
gone (``nat.upnp.igd_gone``): the next command discovers again (a delete when nothing was
ever mapped does not: the node stops behind a gateway without an IGD at once). Any
exception of a call becomes a failed result with a reason, never the thread's end.
``close(timeout)`` lets the thread finish the commands it has (the delete of the mapping
when the node stops), waiting at most ``timeout`` seconds, and gives back the results that
came: the thread is a daemon, and one stuck in a call does not keep the process.

``upnp_factory`` makes the miniupnpc ``UPnP`` object (``miniupnpc.UPnP`` by default): tests
pass a fake.
"""

from __future__ import annotations

import contextlib
import ipaddress
import queue
import socket
import threading
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from pipeline.control.nat.upnp import (
    DISCOVERY_MS,
    NO_EXTERNAL_ADDRESS,
    NO_IGD,
    NOT_OURS,
    UpnpCommand,
    UpnpDelete,
    UpnpMap,
    UpnpResult,
    igd_gone,
    reason,
)


class UpnpFailure(Exception):
    """A command failed for ``reason`` (a short word: "no_igd", ...)."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.reason = why


def _miniupnpc(multicastif: str) -> Any:
    import miniupnpc  # a compiled module; imported in the thread that uses it

    return miniupnpc.UPnP(multicastif=multicastif, discoverdelay=DISCOVERY_MS)


class UpnpClient:
    def __init__(self, upnp_factory: Callable[[str], Any] | None = None) -> None:
        self._factory = upnp_factory or _miniupnpc
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        self._commands: queue.SimpleQueue[UpnpCommand | None] = queue.SimpleQueue()
        self._results: deque[UpnpResult] = deque()
        self._thread: threading.Thread | None = None
        self._igd: Any = None  # the thread's: a UPnP object with an IGD selected
        self._igd_from: str | None = None  # the LAN address it was discovered from
        self.counters: Counter[str] = Counter()  # written by the thread, read for stats
        self._closed = False

    def fileno(self) -> int:
        """Readable when results are waiting."""
        return self._reader.fileno()

    def submit(self, command: UpnpCommand) -> None:
        if self._closed:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="upnp", daemon=True)
            self._thread.start()
        self._commands.put(command)

    def results(self) -> list[UpnpResult]:
        """The results that came since the last call (drains the wake-up bytes)."""
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while self._reader.recv(4096):
                pass
        out = []
        while self._results:
            out.append(self._results.popleft())
        return out

    def close(self, timeout: float) -> list[UpnpResult]:
        """Let the thread finish the commands it has, for at most ``timeout`` seconds; the
        results that came meanwhile (and were not taken yet)."""
        self._closed = True
        if self._thread is not None:
            self._commands.put(None)
            self._thread.join(timeout)
            if self._thread.is_alive():
                self.counters["unfinished_at_close"] += 1
        out = self.results()
        self._reader.close()
        self._writer.close()
        return out

    def statistics(self) -> dict[str, int]:
        return dict(self.counters)

    # -- the thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            command = self._commands.get()
            if command is None:
                return
            self.counters["commands"] += 1
            try:
                result = self._execute(command)
            except UpnpFailure as exc:
                result = UpnpResult(command.id, False, error=exc.reason)
            except Exception as exc:  # miniupnpc raises bare Exceptions
                result = UpnpResult(command.id, False, error=reason(str(exc)))
            if not result.ok:
                self.counters[f"failed_{result.error}"] += 1
                if igd_gone(result.error):
                    self._igd = None
            self._results.append(result)
            with contextlib.suppress(OSError):  # full: a wake-up is pending anyway; closed
                self._writer.send(b"\x01")

    def _execute(self, command: UpnpCommand) -> UpnpResult:
        host, port = command.internal
        if isinstance(command, UpnpDelete) and self._igd is None and not self.counters["mapped"]:
            raise UpnpFailure(NO_IGD)  # nothing was ever mapped: no discovery to delete nothing
        igd = self._find_igd(host)
        if isinstance(command, UpnpMap):
            external = str(igd.externalipaddress() or "")
            try:
                if ipaddress.IPv4Address(external).is_unspecified:
                    raise UpnpFailure(NO_EXTERNAL_ADDRESS)
            except ValueError:
                raise UpnpFailure(NO_EXTERNAL_ADDRESS) from None
            igd.addportmapping(
                command.external_port, "UDP", host, port, command.description, "", command.lease_s
            )
            self.counters["mapped"] += 1
            entry = igd.getspecificportmapping(command.external_port, "UDP")
            lease = None
            if entry is not None and (entry[0], entry[1]) == (host, port):
                lease = int(entry[4])
            return UpnpResult(command.id, True, external, lease)
        assert isinstance(command, UpnpDelete)
        entry = igd.getspecificportmapping(command.external_port, "UDP")
        if entry is None:
            return UpnpResult(command.id, True)  # already gone
        if (entry[0], entry[1]) != (host, port):
            raise UpnpFailure(NOT_OURS)
        igd.deleteportmapping(command.external_port, "UDP", "")
        self.counters["deleted"] += 1
        return UpnpResult(command.id, True)

    def _find_igd(self, host: str) -> Any:
        if self._igd is not None and self._igd_from == host:
            return self._igd
        self._igd = None
        self.counters["discoveries"] += 1
        upnp = self._factory(host)
        try:
            found = upnp.discover()
        except Exception:  # miniupnpc: no device answered (its message is not telling)
            raise UpnpFailure(NO_IGD) from None
        if not found:
            raise UpnpFailure(NO_IGD)
        try:
            upnp.selectigd()
        except Exception:
            raise UpnpFailure(NO_IGD) from None
        self._igd, self._igd_from = upnp, host
        return upnp
