"""tap_reader: the inside edge. TAP -> classifier rings (outbound); classifier rings -> TAP.

Outbound frames go to the classifier worker chosen by a hash of the flow, so a flow never
reorders; inbound FRAME records from every classifier worker are written to this worker's
queue (a record of another kind is counted, ``unexpected_kind``). The device is opened by
``open_tap``: ``LinuxTap``, or in tests a ``MemoryTap``.

With ``stages.tap_reader.offloads`` the TAP is asked for virtio-net headers and TSO
(``LinuxTap``: a ladder of fallbacks down to none). Then every read is one record with
``FLAG_VNET``, its header first: a TCP super-frame of up to 64 KiB is one record, read
straight into the ring. A FRAME with ``FLAG_VNET`` is written as it is; one without it (an
ARP reply, a frame from control) after a zero header. On a TAP the kernel gave no header, a
FRAME with ``FLAG_VNET`` (a peer's coalesced segments) is cut into whole packets with their
checksums computed in software (``tso.segment``: slow, the fallback) and written one by one.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from pipeline.config import Settings
from pipeline.records import FLAG_VNET, RecordKind
from pipeline.shm_ring import Producer, RingSpec
from pipeline.tap_reader.device import LinuxTap, OpenTap, TapDevice
from pipeline.topology import Stage, worker_for_flow
from pipeline.wire import tso, vnet
from pipeline.worker import Worker

ETH_HEADER = 14
SUPER_FRAME = 0xFFFF + ETH_HEADER + 4  # an IP packet of 64 KiB, Ethernet, a VLAN tag
_FRAME = int(RecordKind.FRAME)
_ZERO_VNET = vnet.ZERO


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
        self.tap: TapDevice = self.open_tap(
            s.network.device, multi_queue=queues > 1, offloads=s.stages.tap_reader.offloads
        )
        self.vnet = self.tap.vnet
        self.read_flags = FLAG_VNET if self.vnet else 0
        self.flow_at = ETH_HEADER + (vnet.LEN if self.vnet else 0)  # the IP header of a read
        if self.vnet:
            self.frame_max = vnet.LEN + SUPER_FRAME
        else:
            self.frame_max = s.network.mtu + ETH_HEADER + 4  # room for an 802.1Q tag
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
        self.segmented = 0  # frames with FLAG_VNET cut in software for a TAP without headers
        self.drops: Counter[str] = Counter()
        self.log.info(
            "tap_opened",
            device=s.network.device,
            queues=queues,
            mtu=s.network.mtu,
            vnet=self.vnet,
            offloads=f"{self.tap.offloads:#x}",
            refused=list(getattr(self.tap, "refused", [])),
        )

    def work(self) -> int:
        self.blocked = False
        return self._read_tap() + self._write_tap()

    def _read_tap(self) -> int:
        producers = self.to_classifier
        n = len(producers)
        if n == 1:
            return self._read_tap_in_place(producers[0])
        count = 0
        nbytes = 0
        read = self.tap.read
        flags = self.read_flags
        at = self.flow_at
        frame_max = self.frame_max
        for _ in range(self.batch):
            if not all(p.fits(frame_max) for p in producers):
                self.blocked = True  # back-pressure: the frame waits in the TAP's queue
                break
            frame = read()
            if frame is None:
                break
            target = producers[worker_for_flow(memoryview(frame)[at:], n)]
            target.push(frame, _FRAME, 0, flags)
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
        flags = self.read_flags
        for _ in range(self.batch):
            view = producer.reserve(self.frame_max)
            if view is None:  # ring full: back-pressure, the frame waits in the TAP's queue
                self.blocked = True
                break
            length = read_into(view)
            if length is None:
                producer.unreserve()
                break
            producer.commit(length, _FRAME, 0, flags)
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
        write_parts = self.tap.write_parts
        tap_vnet = self.vnet
        for consumer in self.from_classifier:
            records = consumer.pop_batch(self.batch)
            if not records:
                continue
            for kind, _, flags, data in records:
                if kind != _FRAME:
                    self.drops["unexpected_kind"] += 1
                    continue
                if flags & FLAG_VNET:
                    if tap_vnet:
                        done = write(data)
                    else:
                        self._write_segments(data)
                        continue
                elif tap_vnet:
                    done = write_parts([_ZERO_VNET, data])
                else:
                    done = write(data)
                if done:
                    self.frames_written += 1
                    self.bytes_written += len(data)
                else:
                    self.write_drops += 1
            consumer.release()
            count += len(records)
        return count

    def _write_segments(self, data: memoryview) -> None:
        """A FRAME with a virtio-net header for a TAP without: whole packets, checksums done."""
        header = vnet.parse(vnet.shift(data, -ETH_HEADER))
        frame = data[vnet.LEN :]
        ethernet = frame[:ETH_HEADER]
        self.segmented += 1
        for packet in tso.segment(header, frame[ETH_HEADER:]):
            if self.tap.write_parts([ethernet, packet]):
                self.frames_written += 1
                self.bytes_written += ETH_HEADER + len(packet)
            else:
                self.write_drops += 1

    def stats(self) -> dict[str, Any]:
        return {
            "frames_read": self.frames_read,
            "bytes_read": self.bytes_read,
            "frames_written": self.frames_written,
            "bytes_written": self.bytes_written,
            "write_drops": self.write_drops,
            "vnet": self.vnet,
            "segmented_in_software": self.segmented,
            "drops": dict(self.drops),
        }

    def teardown(self) -> None:
        if hasattr(self, "tap"):
            self.tap.close()
