"""overlay_io's socket pools for birthday probing (``pipeline/overlay_io/pool.py``), on memory
ports: bounded opening, the first authentic datagram of the pool's link pins its socket and
closes the rest, a pin follows its peer, closing and expiring, and a failed open counted."""

from __future__ import annotations

from pipeline.errors import StageIOError
from pipeline.overlay_io.pool import SocketPools
from pipeline.overlay_io.udp import MemoryNetwork, MemoryPort, Port

PEER = ("198.18.90.12", 4789)


class Opener:
    """Memory ports at 198.19.1.2:50000 and up; ``fail_after``: then StageIOError."""

    def __init__(self, net: MemoryNetwork, fail_after: int | None = None) -> None:
        self.net = net
        self.made: list[MemoryPort] = []
        self.closed: list[MemoryPort] = []
        self.fail_after = fail_after

    def open(self) -> Port:
        if self.fail_after is not None and len(self.made) >= self.fail_after:
            raise StageIOError("cannot bind UDP 198.19.1.2:0: too many open files")
        port = self.net.port("198.19.1.2", 50000 + len(self.made), gso=False, gro=False)
        self.made.append(port)
        return port

    def close(self, port: Port) -> None:
        assert isinstance(port, MemoryPort)
        self.closed.append(port)
        port.close()


def pools(opener: Opener, size: int = 16, limit: int = 24) -> SocketPools[Port]:
    return SocketPools(opener.open, opener.close, size=size, limit=limit, ttl_s=10.0)


def test_a_pool_opens_once_and_its_first_authentic_datagram_pins_the_socket() -> None:
    opener = Opener(MemoryNetwork())
    p = pools(opener)
    ports = p.ports_for(7, 0.0)
    assert len(ports) == 16 and p.ports_for(7, 1.0) == ports  # opened once
    winner = ports[5]
    assert p.arrived(winner, 7, PEER)
    assert p.pinned == {PEER: winner}
    assert p.ports_for(7, 2.0) == [winner]  # later probes go from the winner only
    assert len(opener.closed) == 15 and winner not in opener.closed
    assert all(port.fileno() < 0 for port in opener.closed)
    assert p.open_sockets == 1
    assert p.arrived(winner, 7, PEER)  # and it keeps taking the link's datagrams
    stats = p.statistics()
    assert stats["pools_won"] == 1 and stats["pinned"] == 1 and stats["sockets"] == 1


def test_a_datagram_of_another_link_wins_nothing() -> None:
    opener = Opener(MemoryNetwork())
    p = pools(opener)
    ports = p.ports_for(7, 0.0)
    assert not p.arrived(ports[0], 8, PEER)  # authentic, but link 8's: refused
    assert not p.pinned and p.open_sockets == 16
    other = opener.net.port("198.19.1.2", 4789)
    assert not p.arrived(other, 7, PEER)  # not a pool socket at all


def test_the_pin_follows_its_peer_and_closing_removes_it() -> None:
    opener = Opener(MemoryNetwork())
    p = pools(opener)
    winner = p.ports_for(7, 0.0)[3]
    p.arrived(winner, 7, PEER)
    moved = ("198.18.90.12", 5000)
    assert p.arrived(winner, 7, moved)  # the peer's NAT remapped it
    assert p.pinned == {moved: winner} and p.statistics()["pool_peer_moved"] == 1
    p.close(7)
    assert not p.pinned and not p.pools and p.open_sockets == 0
    assert winner.fileno() < 0 and len(opener.closed) == 16
    p.close(7)  # twice: nothing
    assert p.statistics()["pools_closed"] == 1


def test_pools_are_bounded_and_a_failed_open_is_counted() -> None:
    opener = Opener(MemoryNetwork())
    p = pools(opener, size=16, limit=24)
    assert len(p.ports_for(1, 0.0)) == 16
    assert len(p.ports_for(2, 0.0)) == 8  # the limit leaves 8 for a second link
    assert len(p.ports_for(3, 0.0)) == 0  # and none for a third
    assert p.open_sockets == 24 and p.statistics()["pool_sockets_short"] == 8 + 16
    failing = Opener(MemoryNetwork(), fail_after=5)
    q = pools(failing)
    assert len(q.ports_for(1, 0.0)) == 5
    assert q.statistics()["pool_open_failed"] == 1 and q.open_sockets == 5


def test_an_unused_pool_expires_and_a_won_one_does_not() -> None:
    opener = Opener(MemoryNetwork())
    p = pools(opener, size=4, limit=8)
    p.ports_for(1, 0.0)
    won = p.ports_for(2, 0.0)
    p.arrived(won[0], 2, PEER)
    p.ports_for(1, 5.0)  # used again: lives 10 s from here
    p.expire(14.0)
    assert set(p.pools) == {1, 2}
    p.expire(15.0)
    assert set(p.pools) == {2} and p.statistics()["pools_expired"] == 1
    assert p.pinned == {PEER: won[0]} and p.open_sockets == 1
    p.close_all()
    assert p.open_sockets == 0 and not p.pinned
