"""The TAP device: open (single- or multi-queue), configure, read and write frames.

``TapDevice`` is the seam, and ``OpenTap`` how a tap_reader gets one: ``LinuxTap`` is the
real one; ``MemoryTap`` is its in-memory twin (after wireguard-go's ``tun/tuntest``), for
tests that run a tap_reader without root: frames "from the kernel" are injected, the frames
the worker writes are collected, and its descriptor wakes the worker's epoll loop as a TAP's
does. Frames are plain bytes both ways; on a device whose ``vnet`` is true every frame read
and written starts with a 10-byte virtio-net header (``pipeline/wire/vnet.py``).

Offloads (``LinuxTap(..., offloads=True)``): the TAP is opened with ``IFF_VNET_HDR``, its
header size set to 10 (``TUNSETVNETHDRSZ``), and the kernel is asked for the offloads that
let it hand over and take super-frames (``TUNSETOFFLOAD``), down a ladder of what it may
refuse: checksum, TSO4, TSO6, TSO with ECN and USO (UDP segmentation, Linux >= 6.2); then
without USO; then without ECN. Where it refuses even that, the device is opened again without
the virtio-net header: one frame per read, as without offloads. ``vnet`` and ``offloads`` (the
accepted ``TUN_F_*`` mask) say what it got; the flags are read back (``TUNGETIFF``), since a
kernel takes offloads on a TAP opened without the header too.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import struct
import subprocess
from collections import deque
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network
from typing import Protocol

import msgspec
import pytun

from pipeline.errors import StageIOError

READ_SIZE = 65536 + 64

TUNSETOFFLOAD = 0x400454D0
TUNGETIFF = 0x800454D2
TUNSETVNETHDRSZ = 0x400454D8
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40
_TCP_OFFLOADS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
OFFLOAD_LADDER = (
    _TCP_OFFLOADS | TUN_F_TSO_ECN | TUN_F_USO4 | TUN_F_USO6,
    _TCP_OFFLOADS | TUN_F_TSO_ECN,
    _TCP_OFFLOADS,
)
"""What the TAP asks for, best first (``TUN_F_*`` of linux/if_tun.h; USO needs Linux 6.2)."""
VNET_HEADER_LEN = 10
Buffers = list[bytes | bytearray | memoryview]


class TapDevice(Protocol):
    vnet: bool  # every frame read and written starts with a virtio-net header
    offloads: int  # the TUN_F_* offloads the kernel accepted (0: none)

    def configure(
        self, *, mac: bytes, mtu: int, address: IPv4Address | None, subnet: IPv4Network
    ) -> None: ...
    def attach_to_bridge(self, bridge: str, *, create: bool) -> bool: ...
    def fileno(self) -> int: ...
    def read(self) -> bytes | None: ...
    def read_into(self, buffer: memoryview) -> int | None: ...
    def write(self, frame: bytes | memoryview) -> bool: ...
    def write_parts(self, parts: Buffers) -> bool: ...
    def close(self) -> None: ...


class OpenTap(Protocol):
    """Opens the TAP queue ``name``: ``LinuxTap`` itself, or a test's stand-in."""

    def __call__(self, name: str, *, multi_queue: bool, offloads: bool) -> TapDevice: ...


class LinuxTap:
    """A TAP queue. With ``multi_queue`` every worker opens the same name and gets its own
    queue; the kernel spreads flows over them. The device lives while any queue is open."""

    def __init__(self, name: str, *, multi_queue: bool, offloads: bool = False) -> None:
        flags = pytun.IFF_TAP | pytun.IFF_NO_PI
        if multi_queue:
            flags |= pytun.IFF_MULTI_QUEUE
        self.name = name
        self.vnet = False
        self.offloads = 0
        self.refused: list[str] = []  # why the kernel said no, each step of the ladder
        self._dev = self._open(flags | (pytun.IFF_VNET_HDR if offloads else 0))
        if offloads:
            self.offloads = self._ask_offloads()
            if self.offloads:
                self.vnet = True
            else:  # no offload at all: the header would only cost
                self._dev.close()
                self._dev = self._open(flags)
        self._fd: int = self._dev.fileno()
        os.set_blocking(self._fd, False)

    def _open(self, flags: int) -> pytun.TunTapDevice:
        try:
            return pytun.TunTapDevice(name=self.name, flags=flags)
        except pytun.Error as exc:
            raise StageIOError(f"cannot open TAP {self.name}: {exc}") from exc

    def _ask_offloads(self) -> int:
        """The offload ladder on the device opened with IFF_VNET_HDR: the accepted mask, or 0
        when the device has no virtio-net header after all or the kernel refuses it all."""
        fd = self._dev.fileno()
        try:
            ifr = fcntl.ioctl(fd, TUNGETIFF, bytes(40))
            if not struct.unpack_from("H", ifr, 16)[0] & pytun.IFF_VNET_HDR:
                self.refused.append("IFF_VNET_HDR not kept")
                return 0
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HEADER_LEN))
        except OSError as exc:
            self.refused.append(f"virtio-net header: {exc}")
            return 0
        for mask in OFFLOAD_LADDER:
            try:
                fcntl.ioctl(fd, TUNSETOFFLOAD, mask)
                return mask
            except OSError as exc:
                self.refused.append(f"offloads {mask:#x}: {exc}")
        return 0

    def configure(
        self, *, mac: bytes, mtu: int, address: IPv4Address | None, subnet: IPv4Network
    ) -> None:
        """Idempotent: a restarted worker (or a second queue) leaves a configured device alone.
        Without an ``address`` the device only comes up: a DHCP client on it sets one."""
        dev = self._dev
        try:
            if dev.hwaddr != mac:
                dev.hwaddr = mac
            if dev.mtu != mtu:
                dev.mtu = mtu
            if address is not None and (
                _get(lambda: dev.addr) != str(address)
                or _get(lambda: dev.netmask) != str(subnet.netmask)
            ):
                dev.addr = str(address)
                dev.netmask = str(subnet.netmask)
            dev.up()
        except (pytun.Error, OSError) as exc:
            raise StageIOError(f"cannot configure TAP {self.name}: {exc}") from exc

    def attach_to_bridge(self, bridge: str, *, create: bool) -> bool:
        """Router mode: make the device a port of ``bridge`` (made first, up, if ``create``
        and it is missing). True if this call made the bridge. Idempotent."""
        made = False
        if not _link_exists(bridge):
            if not create:
                raise StageIOError(f"no bridge {bridge} (set network.create_bridge to make it)")
            _ip("link", "add", bridge, "type", "bridge")
            _ip("link", "set", "dev", bridge, "up")
            made = True
        _ip("link", "set", "dev", self.name, "master", bridge)
        _ip("link", "set", "dev", self.name, "up")
        return made

    def fileno(self) -> int:
        return self._fd

    def read(self) -> bytes | None:
        """One frame, or None when the queue is empty."""
        try:
            return os.read(self._fd, READ_SIZE)
        except BlockingIOError:
            return None
        except OSError as exc:
            raise StageIOError(f"TAP read failed: {exc}") from exc

    def read_into(self, buffer: memoryview) -> int | None:
        """One frame into ``buffer`` (no allocation): its length, or None if none waits."""
        try:
            return os.readv(self._fd, (buffer,))
        except BlockingIOError:
            return None
        except OSError as exc:
            raise StageIOError(f"TAP read failed: {exc}") from exc

    def write(self, frame: bytes | memoryview) -> bool:
        """False when the kernel refused the frame (queue full, device down): a counted drop."""
        return self.write_parts([frame])

    def write_parts(self, parts: Buffers) -> bool:
        """One frame gathered from ``parts`` (``writev``); False as for ``write``."""
        try:
            os.writev(self._fd, parts)
            return True
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno in _REFUSED:
                return False
            raise StageIOError(f"TAP write failed: {exc}") from exc

    def close(self) -> None:
        self._dev.close()


_REFUSED = frozenset((errno.EINVAL, errno.EIO, errno.ENOBUFS, errno.EMSGSIZE))


class TapSettings(msgspec.Struct, frozen=True):
    """What ``configure`` was asked to set (``MemoryTap`` records it)."""

    mac: bytes
    mtu: int
    address: IPv4Address | None
    subnet: IPv4Network


class MemoryTap:
    """The in-memory twin of ``LinuxTap``: a test ``inject``s the frames the kernel would
    send, and finds the frames the worker wrote in ``written``. ``fileno()`` is an eventfd
    that is readable exactly while injected frames wait to be read, as a TAP's descriptor is,
    so a worker's epoll loop wakes for them. ``configure`` and ``attach_to_bridge`` are
    recorded (``settings``, ``bridges``), not executed.

    ``inject`` may be called from another thread than the worker's. With ``vnet`` it stands
    for a TAP with virtio-net headers and TSO: injected frames and written ones carry the
    header, as the test writes and reads them.
    """

    def __init__(
        self, name: str = "memtap0", *, multi_queue: bool = False, vnet: bool = False
    ) -> None:
        self.name = name
        self.multi_queue = multi_queue
        self.vnet = vnet
        self.offloads = OFFLOAD_LADDER[0] if vnet else 0
        self.settings: list[TapSettings] = []  # every configure(), in order
        self.bridges: list[tuple[str, bool]] = []  # every attach_to_bridge(bridge, create)
        self.written: deque[bytes] = deque()  # what the worker wrote, oldest first
        self._inbox: deque[bytes] = deque()
        self._bell = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def inject(self, frame: bytes | memoryview) -> None:
        """A frame from the kernel: the next ``read`` returns it (after those before it)."""
        self._inbox.append(bytes(frame))
        os.eventfd_write(self._bell, 1)

    def configure(
        self, *, mac: bytes, mtu: int, address: IPv4Address | None, subnet: IPv4Network
    ) -> None:
        self.settings.append(TapSettings(mac, mtu, address, subnet))

    def attach_to_bridge(self, bridge: str, *, create: bool) -> bool:
        """Recorded; True (the bridge was made) the first time ``create`` names it."""
        made = create and all(name != bridge for name, _ in self.bridges)
        self.bridges.append((bridge, create))
        return made

    def fileno(self) -> int:
        return self._bell

    def read(self) -> bytes | None:
        try:
            frame = self._inbox.popleft()
        except IndexError:
            return None
        if not self._inbox:
            self._quiet()
        return frame

    def read_into(self, buffer: memoryview) -> int | None:
        """As a TAP's read: a frame longer than ``buffer`` is cut to its length."""
        frame = self.read()
        if frame is None:
            return None
        n = min(len(frame), len(buffer))
        buffer[:n] = frame[:n]
        return n

    def write(self, frame: bytes | memoryview) -> bool:
        self.written.append(bytes(frame))
        return True

    def write_parts(self, parts: Buffers) -> bool:
        self.written.append(b"".join(parts))
        return True

    def close(self) -> None:
        os.close(self._bell)

    def _quiet(self) -> None:
        """The inbox is empty: the descriptor stops being readable (unless a frame was
        injected meanwhile, which rings again)."""
        try:
            os.eventfd_read(self._bell)
        except BlockingIOError:
            pass
        if self._inbox:
            os.eventfd_write(self._bell, 1)


def _ip(*args: str) -> None:
    ip = shutil.which("ip") or "/usr/sbin/ip"
    try:
        subprocess.run([ip, *args], check=True, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        raise StageIOError(f"ip {' '.join(args)}: {detail.strip()}") from exc


def _link_exists(name: str) -> bool:
    return os.path.exists(f"/sys/class/net/{name}")


def _get(read: Callable[[], str]) -> str | None:
    """A device attribute, or None when the device has none yet (no address assigned)."""
    try:
        return read()
    except (pytun.Error, OSError):
        return None
