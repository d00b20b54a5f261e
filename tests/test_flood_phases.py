"""The flood tool's own parts (``supervisor/testbed/flood.py``): the phased order, each
phase's throughput from sampled byte counts, each cycle's ratios, and the flooder itself on
loopback, a ``sendto`` or a ``sendmmsg`` at a time, aimed at two ports in turn."""

from __future__ import annotations

import socket

import pytest

from supervisor.testbed.flood import cycle_ratios, flood, phase_rates, phased_order

CLOSED, NODE = 4796, 4789


def test_the_phased_order_puts_each_case_once_in_each_position() -> None:
    order = phased_order(CLOSED, NODE)
    cycles = [order[i : i + 3] for i in range(0, len(order), 3)]
    assert all(sorted(c) == [0, NODE, CLOSED] for c in cycles)
    for position in range(3):
        assert sorted(c[position] for c in cycles) == [0, NODE, CLOSED]


def test_each_phase_gets_the_rate_of_its_settled_part_inside_the_window() -> None:
    # 1 s phases from t=100: 80, 40, 20 Mbit/s (10, 5, 2.5 MB/s), sampled every 10 ms
    per_s = [10e6, 5e6, 2.5e6, 10e6, 5e6, 2.5e6]
    samples, total = [], 0.0
    for k in range(601):
        t = 100 + k / 100
        samples.append((t, int(total)))
        total += per_s[min(int(k / 100), 5)] / 100
    phases = [[100.0 + i, port] for i, port in enumerate([0, CLOSED, NODE] * 2)]
    rates = phase_rates(samples, phases, 1.0, (100.7, 106.0), 0.3)
    # the window leaves 0.3 s of the first phase's settled 0.7 s: under half, not measured
    assert [(i, p) for i, p, _ in rates] == [(1, CLOSED), (2, NODE), (3, 0), (4, CLOSED), (5, NODE)]
    assert [round(m) for _, _, m in rates] == [40, 20, 80, 40, 20]
    (cycle,) = cycle_ratios(rates, CLOSED, NODE)  # only the second cycle is whole
    assert cycle["node_of_base"] == pytest.approx(0.25, rel=0.02)
    assert cycle["node_of_closed"] == pytest.approx(0.5, rel=0.02)


@pytest.mark.parametrize("per_call", [1, 32])
def test_the_flooder_paces_and_aims_at_each_port_in_turn(per_call: int) -> None:
    receivers = []
    for _ in range(2):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        receivers.append(sock)
    ports = [0, *(s.getsockname()[1] for s in receivers)]
    out = [bytes([i]) * 60 for i in range(64)]
    try:
        report = flood(
            out, "127.0.0.1", ports, 1000, 1.5, ["127.0.0.1", "127.0.0.2"], per_call, 0.5
        )
        got = []
        for sock in receivers:
            sock.setblocking(False)
            n = 0
            while True:
                try:
                    sock.recv(2048)
                except BlockingIOError:
                    break
                n += 1
            got.append(n)
    finally:
        for sock in receivers:
            sock.close()
    assert [p for _, p in report["phases"]] == ports
    assert report["blocked"] == 0
    assert report["sent"] == sum(got)
    assert report["sent_by_port"] == dict(zip(ports[1:], got, strict=True))
    # 0.5 s at 1,000 a second, each; a flooder starved of CPU catches up within its phase
    assert all(400 <= n <= 500 for n in got), got
