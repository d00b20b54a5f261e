"""Kinds of records that travel through the shm rings (the ``kind`` byte of a ring record)."""

from __future__ import annotations

import enum


class RecordKind(enum.IntEnum):
    IP_PACKET = 1  # an IPv4 packet without Ethernet header (classifier <-> overlay_io)
    FRAME = 2  # an Ethernet frame (tap_reader <-> classifier)
    OVERLAY = 3  # an overlay message, opaque to overlay_io (overlay_io <-> control)
