"""sd_notify without systemd: the datagram, abstract socket names, the watchdog period."""

from __future__ import annotations

import os
import socket

from supervisor.sdnotify import Notifier, socket_address


def test_one_datagram_to_an_abstract_socket() -> None:
    name = f"autovn-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        notifier = Notifier.from_environment({"NOTIFY_SOCKET": f"@{name}"})
        assert notifier is not None and notifier.watchdog_s is None
        assert notifier.send(READY=1, STATUS="address 100.64.0.1, 1 link(s) up")
        sock.settimeout(5)
        assert sock.recv(4096) == b"READY=1\nSTATUS=address 100.64.0.1, 1 link(s) up"
        notifier.close()


def test_a_path_and_the_watchdog() -> None:
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@x") == b"\0x"
    env = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "30000000"}
    notifier = Notifier.from_environment(env, pid=42)
    assert notifier is not None and notifier.watchdog_s == 30.0
    notifier.close()
    notifier = Notifier.from_environment(env | {"WATCHDOG_PID": "41"}, pid=42)  # not ours
    assert notifier is not None and notifier.watchdog_s is None
    notifier.close()


def test_not_under_systemd() -> None:
    assert Notifier.from_environment({}) is None
    assert Notifier.from_environment({"NOTIFY_SOCKET": "relative"}) is None


def test_a_failed_send_is_reported_not_raised(tmp_path: object) -> None:
    notifier = Notifier("/nonexistent/autovn-notify")
    assert not notifier.send(WATCHDOG=1)
    assert isinstance(notifier.error, OSError)
    notifier.close()
