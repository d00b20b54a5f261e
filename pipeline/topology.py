"""The shape of a node's pipeline: its stages, their workers, the rings between them and how
frames are sharded over workers. Pure: the one place that says it, read by the supervisor
(which creates the rings and starts the workers) and by every worker (which attaches to its
own). No stage package imports another; what they share about each other is here.

The ring graph (T TAP queues, M classifier workers, K overlay_io workers, one control)::

    tap_reader[t]  ⇄  classifier[c]       every t, c: a ring each way      (2·T·M)
    classifier[c]  ⇄  overlay_io[k]       every c, k: a ring each way      (2·M·K)
    overlay_io[k]  ⇄  control             every k: a ring each way         (2·K)
    overlay_io[k]  →  control             every k: a handshake lane        (K)
    classifier[c]  ⇄  control             every c: a ring each way         (2·M)

A *lane* is a second ring between the same two workers, for records that must never hold
up the others: overlay_io's screened handshake datagrams go to control on the HANDSHAKE
lane, so a handshake flood that fills it leaves overlay messages their own ring.

A ring has one producer and one consumer worker, and is sized by its consumer's stage
(``stages.<stage>.ring_bytes``). Its name, ``<producer stage><index>><consumer stage><index>``
(``classifier0>overlay_io1``; a lane's with ``+<lane>``: ``overlay_io0>control0+handshake``),
is how the supervisor hands its file descriptors to the two
workers. ``pipeline/records.py`` says which record kinds travel on each edge.

Sharding keeps a flow on one worker, so it never reorders: frames of one peer go to the
worker ``worker_for_peer(slot, n)``, frames from the TAP to the worker ``worker_for_flow``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator

import msgspec

__all__ = [
    "EDGES",
    "Lane",
    "START_ORDER",
    "RingEdge",
    "Stage",
    "Topology",
    "WorkerId",
    "worker_for_flow",
    "worker_for_peer",
]


class Stage(enum.StrEnum):
    """One kind of process of a node (``python -m pipeline.<stage>`` runs one worker)."""

    TAP_READER = "tap_reader"
    CLASSIFIER = "classifier"
    OVERLAY_IO = "overlay_io"
    CONTROL = "control"


START_ORDER = (Stage.CONTROL, Stage.OVERLAY_IO, Stage.CLASSIFIER, Stage.TAP_READER)
"""Stages are spawned from the brain outwards, all at once (a frame that enters before the
next stage is up waits in its ring), and stop in the reverse order, so that no frame
enters a pipeline whose next stage is gone; but control stops first of all, so that the
overlay's Closes it hands overlay_io as it leaves are still sent."""


class Lane(enum.StrEnum):
    """Which of the rings between two workers: most pairs have only the MAIN one."""

    MAIN = ""
    HANDSHAKE = "handshake"


EDGES: tuple[tuple[Stage, Stage, Lane], ...] = (
    (Stage.TAP_READER, Stage.CLASSIFIER, Lane.MAIN),
    (Stage.CLASSIFIER, Stage.TAP_READER, Lane.MAIN),
    (Stage.CLASSIFIER, Stage.OVERLAY_IO, Lane.MAIN),
    (Stage.OVERLAY_IO, Stage.CLASSIFIER, Lane.MAIN),
    (Stage.OVERLAY_IO, Stage.CONTROL, Lane.MAIN),
    (Stage.OVERLAY_IO, Stage.CONTROL, Lane.HANDSHAKE),
    (Stage.CONTROL, Stage.OVERLAY_IO, Lane.MAIN),
    (Stage.CLASSIFIER, Stage.CONTROL, Lane.MAIN),
    (Stage.CONTROL, Stage.CLASSIFIER, Lane.MAIN),
)
"""Every (producer stage, consumer stage, lane) joined by rings: between every worker of the
one and every worker of the other."""


class WorkerId(msgspec.Struct, frozen=True, order=True):
    stage: Stage
    index: int

    def __str__(self) -> str:
        return f"{self.stage}:{self.index}"


class RingEdge(msgspec.Struct, frozen=True):
    """One ring: its producer, its consumer and its size in bytes."""

    producer: WorkerId
    consumer: WorkerId
    size: int
    lane: Lane = Lane.MAIN

    @property
    def name(self) -> str:
        p, c = self.producer, self.consumer
        lane = f"+{self.lane}" if self.lane else ""
        return f"{p.stage}{p.index}>{c.stage}{c.index}{lane}"


class Topology(msgspec.Struct, frozen=True):
    """The workers and rings of a node with these scaling knobs."""

    tap_queues: int = 1
    classifiers: int = 1
    overlay_ios: int = 1
    ring_bytes: tuple[tuple[Stage, int], ...] = ()  # the consumer stage's ring size

    def __post_init__(self) -> None:
        for count in (self.tap_queues, self.classifiers, self.overlay_ios):
            if count < 1:
                raise ValueError(f"a stage runs at least one worker, not {count}")

    def count(self, stage: Stage) -> int:
        """How many workers ``stage`` runs."""
        return {
            Stage.TAP_READER: self.tap_queues,
            Stage.CLASSIFIER: self.classifiers,
            Stage.OVERLAY_IO: self.overlay_ios,
            Stage.CONTROL: 1,
        }[stage]

    def workers(self) -> list[WorkerId]:
        """Every worker, in start order."""
        return [WorkerId(stage, i) for stage in START_ORDER for i in range(self.count(stage))]

    def rings(self) -> list[RingEdge]:
        """Every ring of the node."""
        sizes = dict(self.ring_bytes)
        out = []
        for producer, consumer, lane in EDGES:
            size = sizes.get(consumer, 1 << 20)
            for p in range(self.count(producer)):
                for c in range(self.count(consumer)):
                    out.append(RingEdge(WorkerId(producer, p), WorkerId(consumer, c), size, lane))
        return out

    def rings_of(self, worker: WorkerId) -> list[RingEdge]:
        """The rings ``worker`` reads or writes (the ones the supervisor hands it)."""
        return [r for r in self.rings() if worker in (r.producer, r.consumer)]

    def inputs(self, worker: WorkerId, source: Stage, lane: Lane = Lane.MAIN) -> list[RingEdge]:
        """The rings into ``worker`` from every worker of ``source``, by that worker's index."""
        return [
            self._edge(WorkerId(source, i), worker, worker.stage, lane)
            for i in range(self.count(source))
        ]

    def outputs(self, worker: WorkerId, target: Stage, lane: Lane = Lane.MAIN) -> list[RingEdge]:
        """The rings from ``worker`` to every worker of ``target``, by that worker's index."""
        return [
            self._edge(worker, WorkerId(target, i), target, lane) for i in range(self.count(target))
        ]

    def _edge(
        self, producer: WorkerId, consumer: WorkerId, sized_by: Stage, lane: Lane
    ) -> RingEdge:
        if (producer.stage, consumer.stage, lane) not in EDGES:
            raise ValueError(f"no {lane or 'main'} rings from {producer.stage} to {consumer.stage}")
        for worker in (producer, consumer):
            if not 0 <= worker.index < self.count(worker.stage):
                raise ValueError(f"no worker {worker}")
        size = dict(self.ring_bytes).get(sized_by, 1 << 20)
        return RingEdge(producer, consumer, size, lane)

    def __iter__(self) -> Iterator[RingEdge]:
        return iter(self.rings())


_MASK64 = (1 << 64) - 1
_GOLDEN64 = 0x9E3779B97F4A7C15  # odd multiplier for Fibonacci hashing


def worker_for_peer(slot: int, workers: int) -> int:
    """The worker (0..workers-1) that handles every frame of peer ``slot``: the only
    overlay_io worker that seals for that peer (its send counter lives there), and the
    classifier worker that checks what the peer sends."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    return slot % workers


def worker_for_flow(packet: bytes | bytearray | memoryview, workers: int) -> int:
    """A worker (0..workers-1) from a stable hash of the IPv4 (src, dst, protocol); 0 if
    not IPv4.

    Ports are left out on purpose so that all fragments of a datagram go to the same worker.
    The hash is arithmetic on the packed bytes, so it is the same in every process (unlike
    ``hash()``, which is salted per process).
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return 0
    key = int.from_bytes(packet[12:20], "big") ^ packet[9]
    mixed = ((key * _GOLDEN64) & _MASK64) >> 32  # the well-mixed high half
    return (mixed * workers) >> 32
