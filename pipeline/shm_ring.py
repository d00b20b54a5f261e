"""Single-producer single-consumer ring of variable-length records in shared memory.

Theory of operation
===================

Memory. The supervisor calls :func:`create_ring`: an anonymous ``memfd`` of
``HEADER_SIZE + capacity`` bytes (size sealed, so no worker can shrink it under the others)
and a non-blocking ``eventfd`` doorbell. Workers inherit both fds (``pass_fds``) and
:meth:`Ring.attach` maps them. A memfd has no name in ``/dev/shm``: when every holder dies,
even by ``kill -9``, the kernel frees it; nothing can leak. The supervisor keeps its own
mapping of every ring for :func:`read_stats`.

Layout. A 256-byte header, then ``capacity`` data bytes (a power of two). The header is
little-endian u64 slots, each its own aligned 8-byte word, read and written one element at a
time through ``memoryview(mmap).cast("Q")`` (one ``mov`` each, atomic on x86-64)::

    bytes   0..63   magic, version, capacity, header size      (written once, read-only)
    bytes  64..127  producer-owned: write index, frames_in, bytes_in, drops, drop_bytes,
                    batches_in
    bytes 128..191  consumer-owned: read index, frames_out, bytes_out, batches_out
    bytes 192..255  reserved

The two owned lines are 128 bytes apart: adjacent-line prefetch pairs (0,64) and (128,192)
so the producer and the consumer never share a line pair. Indices are monotonically
increasing u64 byte counts; ``position = index & (capacity - 1)``; ``used = write - read``.

Records. An 8-byte header ``length u32 | kind u8 | flags u8 | peer u16`` then ``length``
bytes, padded so that each record starts 8-aligned. A record never wraps: if it does not fit
before the end of the data area the producer writes a PAD header (kind 255) there and puts the
record at position 0; the pad counts as used space. A push that finds no room for pad+record
is a *drop*: counted (``drops``, ``drop_bytes``), ``False`` returned, never blocking.
``capacity >= 2 * (largest record slot)`` so an empty ring always accepts any legal record
(a back-pressure producer retrying on :meth:`Producer.fits` cannot livelock).

Ordering (x86-64 only). The producer writes the record bytes first and the write index last;
the consumer loads the write index, then reads records. x86 TSO keeps stores in order and
loads in order, so a consumer that sees an index sees the bytes behind it; likewise the
producer never overwrites bytes until it sees the consumer's read index move past them. On
ARM/POWER this is not enough: the index store would need release semantics (``stlr`` or a
``dmb ish`` before it) and the index load acquire semantics (``ldar`` or ``dmb ish`` after
it), on both indices; pure Python cannot emit those, so a port needs a tiny C helper.

Doorbell (no lost wake-up). Producer, in :meth:`Producer.flush`: publish the new write index,
then load the read index; if it equals the write index *before* this flush, the consumer had
drained everything and may be asleep, so ``eventfd_write(bell, 1)``. Consumer, in
:meth:`Consumer.wait_ready`, before it may sleep: (1) publish its read index, (2) read the
eventfd non-blocking (a syscall that takes a spinlock: a locked instruction, a full fence),
(3) reload the write index; only if the ring is still empty may it ``poll`` on the bell.
Why no wake-up is lost: the eventfd counter is sticky, so a ring that lands anywhere after (2)
makes the poll return at once. A ring before (2) is consumed by (2), but the producer's
index store preceded its eventfd write (itself a locked instruction), so (3) sees the data and
we do not sleep. The
remaining case is the producer *not* ringing because its read-index load was satisfied before
its own index store drained from its store buffer (store->load reordering, which TSO allows),
racing a consumer that stored its read index and re-checked in that same window. The window
is the producer's store-buffer drain, nanoseconds, against a consumer that re-checks after a
syscall; callers still pass a poll timeout (e.g. 50-100 ms) as a backstop.

Batching. Push many then flush once (one index store, at most one eventfd write); pop_batch
many then release once. Counters live in the owning process and are published by
flush()/release(), so the supervisor's stats lag by at most one batch.

Lifetimes and restarts. ``RingRecord.data`` is a view into the ring, valid until ``release()``;
copy it to keep it. ``Ring.close()`` with such views alive defers the unmap until they are
dropped. Producer and
Consumer load their indices and counters from the header when built, so a restarted worker
resumes where its predecessor's last flush/release left off (records popped but not released
are delivered again).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
from typing import NamedTuple

from pipeline.errors import StageIOError

__all__ = [
    "HEADER_SIZE",
    "MAX_CAPACITY",
    "MAX_RECORD",
    "MIN_CAPACITY",
    "PAD_KIND",
    "Consumer",
    "Producer",
    "RingRecord",
    "Ring",
    "RingError",
    "RingSpec",
    "RingStats",
    "close_spec",
    "create_ring",
    "read_stats",
]

MAX_RECORD = 65536 + 64
"""Largest record payload: a 64 KiB super-frame plus a virtio-net header and our headers."""
HEADER_SIZE = 256
REC_HDR = 8
MAX_SLOT = (MAX_RECORD + REC_HDR + 7) & -8
"""Ring bytes the largest record takes."""
PAD_KIND = 255
"""Reserved record kind marking padding up to the end of the data area."""
MIN_CAPACITY = 1 << 18
"""Smallest power of two >= 2 * (REC_HDR + MAX_RECORD): an empty ring takes any record."""
MAX_CAPACITY = 1 << 30

MAGIC = int.from_bytes(b"AVNRING\x00", "little")
VERSION = 1

# u64 slot numbers in the header.
_MAGIC, _VERSION, _CAPACITY, _HDRSIZE = 0, 1, 2, 3
_W, _FRAMES_IN, _BYTES_IN, _DROPS, _DROP_BYTES, _BATCHES_IN = 8, 9, 10, 11, 12, 13
_R, _FRAMES_OUT, _BYTES_OUT, _BATCHES_OUT = 16, 17, 18, 19

_REC = struct.Struct("<IBBH")  # length, kind, flags, peer
_pack_rec = _REC.pack_into
_unpack_rec = _REC.unpack_from
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


class RingError(StageIOError):
    """A ring is missing, not a ring, of another version, or corrupt."""


class RingSpec(NamedTuple):
    """How a ring is identified to a worker (JSON-friendly: a list of three)."""

    name: str
    mem_fd: int
    bell_fd: int


class RingRecord(NamedTuple):
    """One record read in place: ``data`` is a (writable) view into the ring, valid until
    ``Consumer.release()``; the producer may overwrite it after that."""

    kind: int
    peer: int
    flags: int
    data: memoryview


class RingStats(NamedTuple):
    """A snapshot of a ring's counters, as last published by flush() and release().

    ``used_bytes``: published minus released bytes, record headers and pads included.
    ``bytes_*``/``drop_bytes``: payload bytes. ``batches_in``: flushes that published at
    least one record; ``batches_out``: releases that freed at least one record.
    """

    name: str
    capacity: int
    used_bytes: int
    frames_in: int
    bytes_in: int
    drops: int
    drop_bytes: int
    frames_out: int
    bytes_out: int
    batches_in: int
    batches_out: int


_new_record = tuple.__new__  # skips NamedTuple's Python-level __new__ on the hot path


def slot_bytes(length: int) -> int:
    """Ring bytes a record of ``length`` payload bytes takes (header and 8-byte padding):
    what :meth:`Producer.room` and ``Consumer.pop_batch(max_bytes=...)`` count."""
    return (length + REC_HDR + 7) & -8


def _check_capacity(capacity: int) -> None:
    if not MIN_CAPACITY <= capacity <= MAX_CAPACITY or capacity & (capacity - 1):
        raise ValueError(
            f"ring capacity must be a power of two in [{MIN_CAPACITY}, {MAX_CAPACITY}],"
            f" got {capacity}"
        )


def create_ring(name: str, capacity: int) -> RingSpec:
    """Create a ring's memfd (header written) and doorbell; both fds are non-inheritable."""
    _check_capacity(capacity)
    mem_fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(mem_fd, HEADER_SIZE + capacity)
        fcntl.fcntl(mem_fd, fcntl.F_ADD_SEALS, _SEALS)
        with mmap.mmap(mem_fd, HEADER_SIZE) as mm, memoryview(mm) as raw, raw.cast("Q") as q:
            q[_VERSION] = VERSION
            q[_CAPACITY] = capacity
            q[_HDRSIZE] = HEADER_SIZE
            q[_MAGIC] = MAGIC
        bell_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    except BaseException:
        os.close(mem_fd)
        raise
    return RingSpec(name, mem_fd, bell_fd)


def close_spec(spec: RingSpec) -> None:
    """Close both fds of a spec (the memory is freed once every mapping is gone too)."""
    os.close(spec.mem_fd)
    os.close(spec.bell_fd)


def _map(spec: RingSpec) -> mmap.mmap:
    try:
        size = os.fstat(spec.mem_fd).st_size
    except OSError as exc:
        raise RingError(f"ring {spec.name!r}: mem_fd {spec.mem_fd} unusable: {exc}") from exc
    if size < HEADER_SIZE + MIN_CAPACITY:
        raise RingError(f"ring {spec.name!r}: mem_fd {spec.mem_fd} too small ({size} bytes)")
    return mmap.mmap(spec.mem_fd, size)


def _validate(name: str, q: memoryview, size: int) -> None:
    if q[_MAGIC] != MAGIC:
        raise RingError(f"ring {name!r}: bad magic {q[_MAGIC]:#018x}, not a ring")
    if q[_VERSION] != VERSION or q[_HDRSIZE] != HEADER_SIZE:
        raise RingError(f"ring {name!r}: version {q[_VERSION]}, expected {VERSION}")
    capacity = q[_CAPACITY]
    if capacity != size - HEADER_SIZE or capacity & (capacity - 1):
        raise RingError(f"ring {name!r}: capacity {capacity} does not match size {size}")


class Ring:
    """A mapped view of one ring (header + data). Build with :meth:`attach`."""

    __slots__ = ("name", "capacity", "bell_fd", "spec", "_mm", "_mv", "_q")

    def __init__(self, spec: RingSpec, mm: mmap.mmap) -> None:
        self.spec = spec
        self.name = spec.name
        self.bell_fd = spec.bell_fd
        self._mm = mm
        self._mv = memoryview(mm)
        self._q = self._mv[:HEADER_SIZE].cast("Q")
        try:
            _validate(spec.name, self._q, len(mm))
        except RingError:
            self.close()
            raise
        self.capacity: int = self._q[_CAPACITY]

    @classmethod
    def attach(cls, spec: RingSpec) -> Ring:
        """Map the ring behind ``spec``; raises :class:`RingError` if it is not a valid ring."""
        return cls(spec, _map(spec))

    def close(self) -> None:
        """Unmap; Producer/Consumer of this Ring fail from now on. Never raises: if
        ``RingRecord.data`` views are still alive (say, held by a traceback in a ``finally``),
        the unmap happens when the last one is dropped."""
        self._q.release()
        self._mv.release()
        try:
            self._mm.close()
        except BufferError:
            pass  # the views keep the mmap object alive; its deallocation unmaps

    def __enter__(self) -> Ring:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> RingStats:
        """Counters as last published; usable from any process that attached the ring."""
        q = self._q
        r = q[_R]  # read before write: then used_bytes can't go negative
        used = min(q[_W] - r, self.capacity)
        return RingStats(
            self.name, self.capacity, used,
            q[_FRAMES_IN], q[_BYTES_IN], q[_DROPS], q[_DROP_BYTES],
            q[_FRAMES_OUT], q[_BYTES_OUT], q[_BATCHES_IN], q[_BATCHES_OUT],
        )  # fmt: skip


def read_stats(ring: Ring) -> RingStats:
    """Same as ``ring.stats()``: for the supervisor, which maps every ring."""
    return ring.stats()


class Producer:
    """The writing end. Exactly one per ring at a time; not thread-safe."""

    __slots__ = (
        "_ring", "_mv", "_q", "_cap", "_mask", "_bell", "_w", "_published", "_r",
        "_frames", "_bytes", "_drops", "_drop_bytes", "_batches", "_reserved",
    )  # fmt: skip

    def __init__(self, ring: Ring) -> None:
        q = ring._q
        self._ring = ring
        self._mv = ring._mv
        self._q = q
        self._cap = ring.capacity
        self._mask = ring.capacity - 1
        self._bell = ring.bell_fd
        self._w: int = q[_W]
        self._published = self._w
        self._r: int = q[_R]
        self._frames: int = q[_FRAMES_IN]
        self._bytes: int = q[_BYTES_IN]
        self._drops: int = q[_DROPS]
        self._drop_bytes: int = q[_DROP_BYTES]
        self._batches: int = q[_BATCHES_IN]
        self._reserved = -1  # payload capacity of the outstanding reserve(), or -1

    def push(
        self, data: bytes | bytearray | memoryview, kind: int = 0, peer: int = 0, flags: int = 0
    ) -> bool:
        """Copy one record in (unpublished until flush()). False: ring full, counted drop.

        ``data`` must be byte-formatted; kind in 0..254, peer in 0..65535, flags in 0..255.
        """
        n = len(data)
        if n > MAX_RECORD or kind >= PAD_KIND:
            raise ValueError(f"record of {n} bytes / kind {kind} is not allowed")
        slot = (n + 15) & -8
        w = self._w
        cap = self._cap
        pos = w & self._mask
        tail = cap - pos
        need = slot if slot <= tail else tail + slot
        if w + need - self._r > cap:
            self._r = r = self._q[_R]
            if w + need - r > cap:
                self._drops += 1
                self._drop_bytes += n
                return False
        mv = self._mv
        off = HEADER_SIZE if slot > tail else HEADER_SIZE + pos
        try:
            _pack_rec(mv, off, n, kind, flags, peer)
        except struct.error as exc:
            raise ValueError(f"bad record header kind={kind} peer={peer} flags={flags}") from exc
        if slot > tail:
            _pack_rec(mv, HEADER_SIZE + pos, tail - REC_HDR, PAD_KIND, 0, 0)
        mv[off + REC_HDR : off + REC_HDR + n] = data
        self._w = w + need
        self._frames += 1
        self._bytes += n
        return True

    def push_parts(
        self,
        parts: list[bytes | bytearray | memoryview],
        kind: int = 0,
        peer: int = 0,
        flags: int = 0,
    ) -> bool:
        """``push`` of the concatenation of ``parts`` (copied straight into the ring, never
        joined first): a header and a packet, a super-frame's header and its payloads."""
        return self.push_cut(parts, [], 0, kind, peer, flags)

    def push_cut(
        self,
        lead: list[bytes | bytearray | memoryview],
        parts: list[bytes | bytearray | memoryview],
        skip: int,
        kind: int = 0,
        peer: int = 0,
        flags: int = 0,
    ) -> bool:
        """``push`` of ``lead``'s parts, then each of ``parts`` but its first ``skip`` bytes (a
        super-frame's headers, then the payloads of its segments), without a view of each:
        ``parts`` are copied whole, last to first, so each one's first ``skip`` bytes land
        where the one before it (or ``lead``) goes, and are overwritten by it. ``lead`` must
        be ``skip`` bytes at least, and so must each of ``parts``."""
        n = 0
        for part in lead:
            n += len(part)
        assert n >= skip, (n, skip)
        for part in parts:
            n += len(part) - skip
        if n > MAX_RECORD or kind >= PAD_KIND:
            raise ValueError(f"record of {n} bytes / kind {kind} is not allowed")
        view = self._reserve_or_drop(n)
        if view is None:
            return False
        end = n
        for part in reversed(parts):
            start = end - len(part)
            assert end - start >= skip, (end - start, skip)
            view[start:end] = part
            end = start + skip
        at = 0
        for part in lead:
            end = at + len(part)
            view[at:end] = part
            at = end
        self.commit(n, kind, peer, flags)
        return True

    def _reserve_or_drop(self, n: int) -> memoryview | None:
        """``reserve(n)``, or None and a counted drop when the ring is full."""
        view = self.reserve(n)
        if view is None:
            self._drops += 1
            self._drop_bytes += n
        return view

    def fits(self, length: int) -> bool:
        """True if a record of ``length`` bytes would be accepted now (reloads the read index).

        For lossless (back-pressure) producers: wait on this instead of retrying push(),
        which would count a drop each time. Flush before waiting, or the consumer never sees
        the records that fill the ring.
        """
        if length > MAX_RECORD:
            raise ValueError(f"record of {length} bytes exceeds MAX_RECORD")
        self._r = self._q[_R]
        return self._room(length) >= 0

    def room(self) -> int:
        """Payload bytes that surely fit now as one batch of records of at most ``MAX_RECORD``
        bytes each, counting each record's slot (:func:`slot_bytes`); reloads the read index.

        For back-pressure across a hop: a stage that pops at most this much from its input
        (``Consumer.pop_batch(..., max_bytes=room)``) never drops on this ring. One largest
        slot is kept back for the pad a wrap may cost."""
        self._r = self._q[_R]
        return self._cap - (self._w - self._r) - MAX_SLOT

    def _room(self, length: int) -> int:
        """Position of a ``length`` record if it fits given the cached read index, else -1."""
        slot = slot_bytes(length)
        pos = self._w & self._mask
        tail = self._cap - pos
        need = slot if slot <= tail else tail + slot
        if self._w + need - self._r > self._cap:
            return -1
        return pos if slot <= tail else 0

    def reserve(self, max_len: int) -> memoryview | None:
        """A writable view of ``max_len`` payload bytes in the ring, or None if full.

        Zero-copy push: read a frame straight into the view, then commit(n, ...). A None
        counts nothing (fall back to push() from a scratch buffer, which counts drops). The
        view is invalid after commit(); only one reservation may be outstanding.
        """
        if not 0 <= max_len <= MAX_RECORD:
            raise ValueError(f"reserve of {max_len} bytes exceeds MAX_RECORD")
        assert self._reserved < 0, "reserve() while a reservation is outstanding"
        pos = self._room(max_len)
        if pos < 0:
            self._r = self._q[_R]
            pos = self._room(max_len)
            if pos < 0:
                return None
        self._reserved = max_len
        off = HEADER_SIZE + pos + REC_HDR
        return self._mv[off : off + max_len]

    def unreserve(self) -> None:
        """Give up the outstanding reservation (nothing was read into it)."""
        self._reserved = -1

    def commit(self, length: int, kind: int = 0, peer: int = 0, flags: int = 0) -> None:
        """Turn the outstanding reservation into a record of ``length`` bytes."""
        if not 0 <= length <= self._reserved or kind >= PAD_KIND:
            raise ValueError(f"commit of {length} bytes / kind {kind} (reserved {self._reserved})")
        slot, reserved_slot = slot_bytes(length), slot_bytes(self._reserved)
        pos = self._w & self._mask
        tail = self._cap - pos
        off = HEADER_SIZE if reserved_slot > tail else HEADER_SIZE + pos
        try:
            _pack_rec(self._mv, off, length, kind, flags, peer)
        except struct.error as exc:
            raise ValueError(f"bad record header kind={kind} peer={peer} flags={flags}") from exc
        if reserved_slot > tail:
            _pack_rec(self._mv, HEADER_SIZE + pos, tail - REC_HDR, PAD_KIND, 0, 0)
            self._w += tail
        self._w += slot
        self._reserved = -1
        self._frames += 1
        self._bytes += length

    def flush(self) -> None:
        """Publish counters and every record pushed since the last flush; ring iff needed."""
        q = self._q
        q[_FRAMES_IN] = self._frames
        q[_BYTES_IN] = self._bytes
        q[_DROPS] = self._drops
        q[_DROP_BYTES] = self._drop_bytes
        old = self._published
        w = self._w
        if w == old:
            return
        self._batches += 1
        q[_BATCHES_IN] = self._batches
        q[_W] = w  # the publishing store: after every byte of the batch
        self._published = w
        self._r = r = q[_R]
        if r == old:  # consumer had drained everything: it may be asleep
            os.eventfd_write(self._bell, 1)


class Consumer:
    """The reading end. Exactly one per ring at a time; not thread-safe."""

    __slots__ = (
        "_ring", "_mv", "_q", "_cap", "_mask", "_bell", "_r", "_released",
        "_frames", "_bytes", "_batches",
    )  # fmt: skip

    def __init__(self, ring: Ring) -> None:
        q = ring._q
        self._ring = ring
        self._mv = ring._mv
        self._q = q
        self._cap = ring.capacity
        self._mask = ring.capacity - 1
        self._bell = ring.bell_fd
        self._r: int = q[_R]
        self._released = self._r
        self._frames: int = q[_FRAMES_OUT]
        self._bytes: int = q[_BYTES_OUT]
        self._batches: int = q[_BATCHES_OUT]

    @property
    def bell_fd(self) -> int:
        """The doorbell eventfd, to register for POLLIN."""
        return self._bell

    def pending(self) -> bool:
        """True if published records wait beyond those popped."""
        return self._q[_W] != self._r

    def pop_batch(self, max_records: int, max_bytes: int | None = None) -> list[RingRecord]:
        """Up to ``max_records`` published records, read in place (valid until release()).

        ``max_bytes``: stop before the record that would take the batch's slots
        (:func:`slot_bytes`) beyond it — what the next hop has room for (back-pressure: the
        rest waits here, nothing is dropped)."""
        r = self._r
        w: int = self._q[_W]
        out: list[RingRecord] = []
        if r == w:
            return out
        mv, mask, cap = self._mv, self._mask, self._cap
        append = out.append
        nbytes = 0
        budget = (1 << 62) if max_bytes is None else max_bytes
        while r < w and len(out) < max_records:
            pos = r & mask
            n, kind, flags, peer = _unpack_rec(mv, HEADER_SIZE + pos)
            if kind == PAD_KIND:
                r += cap - pos
                continue
            budget -= (n + REC_HDR + 7) & -8
            if budget < 0:
                break
            start = HEADER_SIZE + REC_HDR + pos
            append(_new_record(RingRecord, (kind, peer, flags, mv[start : start + n])))
            nbytes += n
            r += (n + 15) & -8
        if r > w:
            raise RingError(f"ring {self._ring.name!r}: corrupt record at index {self._r}")
        self._r = r
        self._frames += len(out)
        self._bytes += nbytes
        return out

    def release(self) -> None:
        """Publish the read index: every record popped so far may now be overwritten."""
        r = self._r
        if r == self._released:
            return
        q = self._q
        self._batches += 1
        q[_FRAMES_OUT] = self._frames
        q[_BYTES_OUT] = self._bytes
        q[_BATCHES_OUT] = self._batches
        q[_R] = r
        self._released = r

    def clear_bell(self) -> None:
        """Reset the doorbell (non-blocking eventfd read; nothing pending is fine)."""
        try:
            os.eventfd_read(self._bell)
        except BlockingIOError:
            pass

    def wait_ready(self) -> bool:
        """Pre-sleep protocol. True: records are pending, do NOT sleep; False: poll bell_fd.

        Releases the read index, clears the bell (a syscall: a full fence), then re-checks
        the write index. Use with a poll timeout as a backstop (see module docstring).
        """
        self.release()
        self.clear_bell()
        return self._q[_W] != self._r
