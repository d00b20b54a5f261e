"""The data cipher each link agrees on, between two real nodes in namespaces this test makes:
a node that allows only chacha20-poly1305 links with a default one (which prefers
aes-256-gcm) and they seal with chacha20-poly1305; two default nodes seal with aes-256-gcm.
``supervisor status`` shows the cipher of each link (control's) and of overlay_io's send
sessions, the log's ``session_established`` names it, and ping crosses both ways."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.testbed import Node, Testbed, start_all, two_nodes

pytestmark = pytest.mark.netns


def allow_only(node: Node, cipher: str) -> None:
    """``[security] ciphers = [cipher]`` in ``node``'s config."""
    text = node.config.read_text()
    assert text.count("[security]\n") == 1
    node.config.write_text(text.replace("[security]\n", f'[security]\nciphers = ["{cipher}"]\n'))


def ciphers_shown(node: Node) -> tuple[str, list[str], str]:
    """The cipher of the static peer, of each link in the link table (``status --json``),
    and the text ``supervisor status`` prints."""
    st = node.status()
    assert st is not None
    (peer,) = st["peers"]
    links = [lk["cipher"] for lk in st["link_table"] if lk["up"]]
    text = node.cli("status", str(node.config), timeout=10).stdout
    return peer["cipher"], links, text


def overlay_io_stats(node: Node) -> dict[str, object]:
    st = node.status()
    assert st is not None
    (stats,) = [w["stats"] for w in st["workers"] if w["stage"] == "overlay_io"]
    assert isinstance(stats, dict)
    return stats


@pytest.mark.parametrize(
    ("peer_keys", "chacha_only", "expected"),
    [
        pytest.param(True, "alpha", "chacha20-poly1305", id="IK-chacha-only-initiator-side"),
        pytest.param(False, "beta", "chacha20-poly1305", id="XX-chacha-only-other-side"),
        pytest.param(True, None, "aes-256-gcm", id="IK-defaults"),
    ],
)
def test_linked_nodes_seal_with_the_cipher_they_agreed_on(
    tmp_path: Path, peer_keys: bool, chacha_only: str | None, expected: str
) -> None:
    with Testbed("avcph") as tb:
        a, b = two_nodes(tb, tmp_path, start=False, peer_keys=peer_keys)
        for node in (a, b):
            if node.name == chacha_only:
                allow_only(node, "chacha20-poly1305")
        start_all((a, b), peers_up=True)
        assert a.ping(b.address, count=3)
        assert b.ping(a.address, count=3)
        for node in (a, b):
            peer, links, text = ciphers_shown(node)
            assert peer == expected and links == [expected], (node.name, peer, links)
            assert expected in text and "cipher" in text
            stats = overlay_io_stats(node)  # what overlay_io seals with, not only control's
            assert stats["send_ciphers"] == {expected: 1}, stats["send_ciphers"]
            drops = stats["drops"]
            assert isinstance(drops, dict) and "bad_tag" not in drops, drops
            records = node.log_records()
            logged = [r["cipher"] for r in records if r["event"] == "session_established"]
            assert logged and set(logged) == {expected}, logged  # the log names it too
