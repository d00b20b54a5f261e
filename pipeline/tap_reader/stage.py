"""tap_reader: the inside edge. TAP -> classifier rings (outbound); classifier rings -> TAP.

Outbound frames go to the classifier worker chosen by a hash of the flow, so a flow never
reorders; inbound FRAME records from every classifier worker are written to this worker's
queue (a record of another kind is counted, ``unexpected_kind``). The device is opened by
``open_tap``: ``LinuxTap``, or in tests a ``MemoryTap``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from pipeline.config import Settings
from pipeline.records import RecordKind
from pipeline.shm_ring import Producer, RingSpec
from pipeline.tap_reader.device import LinuxTap, OpenTap, TapDevice
from pipeline.topology import Stage, worker_for_flow
from pipeline.worker import Worker

ETH_HEADER = 14
_FRAME = int(RecordKind.FRAME)


class TapReaderWorker(Worker):
    stage = Stage.TAP_READER

    def __init__(
        self,
        settings: Settings,
        index: int,
        rings: dict[str, RingSpec],
        *,
        open_tap: OpenTap = LinuxTap,
    ) -> None:
        super().__init__(settings, index, rings)
        self.open_tap = open_tap

    def setup(self) -> None:
        s = self.settings
        queues = s.stages.tap_reader.queues
        self.batch = s.stages.tap_reader.batch
        self.frame_max = s.network.mtu + ETH_HEADER + 4  # room for an 802.1Q tag
        self.tap: TapDevice = self.open_tap(s.network.device, multi_queue=queues > 1)
        self.tap.configure(
            mac=s.tap_mac, mtu=s.network.mtu, address=s.network.address, subnet=s.network.subnet
        )
        if s.network.bridge is not None:  # router mode: a port of the segment's bridge
            made = self.tap.attach_to_bridge(s.network.bridge, create=s.network.create_bridge)
            self.log.info("tap_bridged", bridge=s.network.bridge, bridge_made=made)
        self.to_classifier: list[Producer] = self.outputs(Stage.CLASSIFIER)
        self.from_classifier = self.inputs(Stage.CLASSIFIER)
        self.watch(self.tap.fileno(), lambda: None)  # wakes the loop; work() reads
        self.frames_read = self.bytes_read = 0
        self.frames_written = self.bytes_written = self.write_drops = 0
        self.drops: Counter[str] = Counter()
        self.log.info("tap_opened", device=s.network.device, queues=queues, mtu=s.network.mtu)

    def work(self) -> int:
        return self._read_tap() + self._write_tap()

    def _read_tap(self) -> int:
        producers = self.to_classifier
        n = len(producers)
        if n == 1:
            return self._read_tap_in_place(producers[0])
        count = 0
        nbytes = 0
        read = self.tap.read
        for _ in range(self.batch):
            frame = read()
            if frame is None:
                break
            target = producers[worker_for_flow(memoryview(frame)[ETH_HEADER:], n) if n > 1 else 0]
            target.push(frame, kind=RecordKind.FRAME)
            count += 1
            nbytes += len(frame)
        if count:
            for p in producers:
                p.flush()
            self.frames_read += count
            self.bytes_read += nbytes
        return count

    def _read_tap_in_place(self, producer: Producer) -> int:
        """With one classifier, frames are read straight into its ring: no copy."""
        count = nbytes = 0
        read_into = self.tap.read_into
        for _ in range(self.batch):
            view = producer.reserve(self.frame_max)
            if view is None:  # ring full: read and drop (push counts the drop)
                frame = self.tap.read()
                if frame is None:
                    break
                producer.push(frame, kind=RecordKind.FRAME)
                continue
            length = read_into(view)
            if length is None:
                producer.unreserve()
                break
            producer.commit(length, kind=RecordKind.FRAME)
            count += 1
            nbytes += length
        if count:
            producer.flush()
            self.frames_read += count
            self.bytes_read += nbytes
        return count

    def _write_tap(self) -> int:
        count = 0
        write = self.tap.write
        for consumer in self.from_classifier:
            records = consumer.pop_batch(self.batch)
            if not records:
                continue
            for kind, _, _, data in records:
                if kind != _FRAME:
                    self.drops["unexpected_kind"] += 1
                elif write(data):
                    self.frames_written += 1
                    self.bytes_written += len(data)
                else:
                    self.write_drops += 1
            consumer.release()
            count += len(records)
        return count

    def stats(self) -> dict[str, Any]:
        return {
            "frames_read": self.frames_read,
            "bytes_read": self.bytes_read,
            "frames_written": self.frames_written,
            "bytes_written": self.bytes_written,
            "write_drops": self.write_drops,
            "drops": dict(self.drops),
        }

    def teardown(self) -> None:
        if hasattr(self, "tap"):
            self.tap.close()
