"""Node identity: one Ed25519 key, its X25519 Noise key and its node id; the key files in the
state directory (0600, made on first use, refused when exposed or malformed); `key show`."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import nacl.bindings
import nacl.public
import nacl.signing
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.crypto.identity import (
    Identity,
    node_id,
    parse_node_id,
    verify_signature,
    x25519_public_from_ed25519,
)
from supervisor.keys import KeyFileError, add_commands, load_or_create_identity

ROOT = Path(__file__).resolve().parent.parent
# RFC 8032, section 7.1, test 1
RFC_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
RFC_SIG_EMPTY = bytes.fromhex(
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
)


class TestIdentity:
    def test_rfc8032_vector(self) -> None:
        ident = Identity.from_seed(RFC_SEED)
        assert ident.public_key == RFC_PUBLIC
        assert ident.sign(b"") == RFC_SIG_EMPTY

    def test_derived_fields(self) -> None:
        ident = Identity.from_seed(bytes(range(32)))
        assert ident.public_key == bytes(nacl.signing.SigningKey(bytes(range(32))).verify_key)
        assert ident.node_id == hashlib.blake2b(ident.public_key, digest_size=20).digest()
        assert len(ident.node_id) == 20 and ident.node_id_hex == ident.node_id.hex()
        # the X25519 private key really belongs to the X25519 public key
        assert bytes(nacl.public.PrivateKey(ident.x25519_private).public_key) == (
            ident.x25519_public
        )
        assert x25519_public_from_ed25519(ident.public_key) == ident.x25519_public

    def test_x25519_keys_agree(self) -> None:
        """Two nodes that know only each other's Ed25519 public key get the same DH secret."""
        a, b = Identity.from_seed(b"a" * 32), Identity.from_seed(b"b" * 32)
        ab = nacl.bindings.crypto_scalarmult(
            a.x25519_private, x25519_public_from_ed25519(b.public_key)
        )
        ba = nacl.bindings.crypto_scalarmult(
            b.x25519_private, x25519_public_from_ed25519(a.public_key)
        )
        assert ab == ba

    def test_frozen_and_secret_free_repr(self) -> None:
        ident = Identity.from_seed(RFC_SEED)
        with pytest.raises(AttributeError):
            ident.seed = b"x" * 32  # type: ignore[misc]
        assert RFC_SEED.hex() not in repr(ident)
        assert ident.x25519_private.hex() not in repr(ident)
        assert "public_key=" in repr(ident)
        shown = dict(ident.__rich_repr__())  # what rich's pretty print and tracebacks show
        assert shown.keys() == {"public_key", "x25519_public", "node_id"}

    def test_equal_seeds_equal_identities(self) -> None:
        assert Identity.from_seed(RFC_SEED) == Identity.from_seed(bytes(RFC_SEED))

    @pytest.mark.parametrize("length", [0, 31, 33, 64])
    def test_seed_length(self, length: int) -> None:
        with pytest.raises(ValueError, match="32 bytes"):
            Identity.from_seed(b"\x01" * length)

    @given(st.binary(max_size=200), st.integers(0, 63), st.integers(1, 255))
    def test_signatures(self, data: bytes, pos: int, mask: int) -> None:
        ident = Identity.from_seed(RFC_SEED)
        sig = ident.sign(data)
        assert verify_signature(ident.public_key, data, sig)
        bad = bytearray(sig)
        bad[pos] ^= mask
        assert not verify_signature(ident.public_key, data, bytes(bad))
        assert not verify_signature(Identity.from_seed(b"z" * 32).public_key, data, sig)
        assert not verify_signature(ident.public_key, data + b"!", sig)

    def test_verify_signature_odd_inputs(self) -> None:
        assert not verify_signature(b"\x00" * 31, b"", b"\x00" * 64)
        assert not verify_signature(RFC_PUBLIC, b"", b"\x00" * 63)
        assert not verify_signature(b"\x00" * 32, b"", b"\x00" * 64)  # small-order key


class TestNodeId:
    def test_node_id_of_public_key(self) -> None:
        assert node_id(RFC_PUBLIC).hex() == hashlib.blake2b(RFC_PUBLIC, digest_size=20).hexdigest()

    def test_node_id_needs_a_32_byte_key(self) -> None:
        with pytest.raises(ValueError):
            node_id(b"x" * 31)

    def test_parse_round_trip(self) -> None:
        nid = node_id(RFC_PUBLIC)
        assert parse_node_id(nid.hex()) == nid
        assert parse_node_id(nid.hex().upper()) == nid

    @pytest.mark.parametrize("text", ["", "ab", "g" * 40, "a" * 39, "a" * 42])
    def test_parse_rejects(self, text: str) -> None:
        with pytest.raises(ValueError, match="node id"):
            parse_node_id(text)

    def test_invalid_ed25519_point(self) -> None:
        with pytest.raises(ValueError, match="not a usable"):
            x25519_public_from_ed25519(b"\x00" * 32)
        with pytest.raises(ValueError):
            x25519_public_from_ed25519(b"\x01" * 5)


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


class TestKeyFiles:
    def test_created_on_first_use(self, tmp_path: Path) -> None:
        state = tmp_path / "state" / "alpha"
        ident = load_or_create_identity(state)
        assert mode(state) == 0o700
        assert mode(state / "node.key") == 0o600
        assert (state / "node.key").read_text() == ident.seed.hex() + "\n"
        assert (state / "node.pub").read_text() == ident.public_key.hex() + "\n"
        assert mode(state / "node.pub") == 0o644
        assert sorted(p.name for p in state.iterdir()) == ["node.key", "node.pub"]

    def test_loaded_after(self, tmp_path: Path) -> None:
        first = load_or_create_identity(tmp_path)
        assert load_or_create_identity(tmp_path) == first

    def test_different_nodes_different_keys(self, tmp_path: Path) -> None:
        assert load_or_create_identity(tmp_path / "a") != load_or_create_identity(tmp_path / "b")

    @pytest.mark.parametrize("bits", [0o644, 0o640, 0o604, 0o660, 0o620])
    def test_exposed_key_refused(self, tmp_path: Path, bits: int) -> None:
        load_or_create_identity(tmp_path)
        os.chmod(tmp_path / "node.key", bits)
        with pytest.raises(KeyFileError, match="chmod 600") as info:
            load_or_create_identity(tmp_path)
        assert f"{bits:04o}" in str(info.value)
        assert mode(tmp_path / "node.key") == bits  # never "fixed" behind the admin's back

    @pytest.mark.parametrize(
        "content", [b"", b"abc\n", b"zz" * 32 + b"\n", b"\x01" * 32, b"ab" * 33 + b"\n"]
    )
    def test_malformed_key_refused(self, tmp_path: Path, content: bytes) -> None:
        key = tmp_path / "node.key"
        key.write_bytes(content)
        key.chmod(0o600)
        with pytest.raises(KeyFileError, match="malformed key file"):
            load_or_create_identity(tmp_path)
        assert key.read_bytes() == content

    def test_key_that_is_a_directory(self, tmp_path: Path) -> None:
        (tmp_path / "node.key").mkdir(mode=0o700)
        with pytest.raises(KeyFileError, match="not a regular file"):
            load_or_create_identity(tmp_path)

    def test_hand_written_key_accepted(self, tmp_path: Path) -> None:
        key = tmp_path / "node.key"
        key.write_text(RFC_SEED.hex().upper() + "\n")
        key.chmod(0o400)
        assert load_or_create_identity(tmp_path).public_key == RFC_PUBLIC

    def test_stale_public_key_file_rewritten(self, tmp_path: Path) -> None:
        ident = load_or_create_identity(tmp_path)
        (tmp_path / "node.pub").write_text("00" * 32 + "\n")
        load_or_create_identity(tmp_path)
        assert (tmp_path / "node.pub").read_text() == ident.public_key.hex() + "\n"


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="supervisor")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    rc = args.fn(args)
    out, err = capsys.readouterr()
    return rc, out, err


def write_config(tmp_path: Path) -> Path:
    config = tmp_path / "node.toml"
    config.write_text(
        f"""
[node]
name = "alpha"
state_dir = "{tmp_path / "state"}"
runtime_dir = "{tmp_path / "run"}"
[network]
namespace = "lab"
subnet = "100.64.0.0/24"
address = "100.64.0.1"
[security]
ca_certificate = "{tmp_path / "ca.crt"}"
"""
    )
    return config


class TestKeyShow:
    def test_creates_and_prints(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        config = write_config(tmp_path)
        rc, out, err = run_cli(["key", "show", str(config)], capsys)
        assert rc == 0
        assert "created" in err
        ident = load_or_create_identity(tmp_path / "state")
        assert ident.public_key.hex() in out and ident.node_id.hex() in out
        rc, out2, err2 = run_cli(["key", "show", str(config), "--json"], capsys)
        assert rc == 0 and err2 == ""
        data = json.loads(out2)
        assert data["public_key"] == ident.public_key.hex()
        assert data["node_id"] == ident.node_id.hex()
        assert data["name"] == "alpha"

    def test_bad_config(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        config = tmp_path / "bad.toml"
        config.write_text("[node]\nname = 3\n")
        rc, out, err = run_cli(["key", "show", str(config)], capsys)
        assert rc == 1 and out == ""
        assert "node.name: must be a string" in err and "Traceback" not in err

    def test_missing_config(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        rc, _, err = run_cli(["key", "show", str(tmp_path / "none.toml")], capsys)
        assert rc == 1 and "cannot read" in err

    def test_exposed_key(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        config = write_config(tmp_path)
        run_cli(["key", "show", str(config)], capsys)
        (tmp_path / "state" / "node.key").chmod(0o644)
        rc, out, err = run_cli(["key", "show", str(config)], capsys)
        assert rc == 1 and out == ""
        assert err.startswith("error: ") and "chmod 600" in err
