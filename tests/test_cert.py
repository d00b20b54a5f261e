"""Certificates: the format, issuing, every rejection reason, fuzzing of the decoder, the text
form, revocation lists, and the `ca init`, `cert issue`, `cert show` commands."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from ipaddress import IPv4Address
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.crypto.cert import (
    HEADER,
    MAX_CERT_LEN,
    Certificate,
    CertificateError,
    RevocationList,
    check_key,
    decode_certificate,
    from_pem,
    issue,
    key_id,
    make_ca,
    to_pem,
    verify,
)
from pipeline.crypto.identity import Identity, node_id
from pipeline.errors import RemoteProtocolError
from supervisor.keys import add_commands

ROOT = Path(__file__).resolve().parent.parent
T0 = 1_700_000_000
DAY = 86400
CA = Identity.from_seed(b"C" * 32)
NODE = Identity.from_seed(b"N" * 32)
OTHER_CA = Identity.from_seed(b"O" * 32)
EMPTY = RevocationList.empty()
DECODE_REASONS = {"malformed", "bad_version"}


def make_ca_cert(ca: Identity = CA) -> Certificate:
    return make_ca(ca, name="lab-ca", not_before=T0, not_after=T0 + 3650 * DAY, serial=7)


CA_CERT = make_ca_cert()


def node_cert(**overrides: object) -> Certificate:
    kwargs: dict[str, object] = {
        "public_key": NODE.public_key,
        "name": "beta",
        "networks": ["lab", "prod"],
        "addresses": [IPv4Address("100.64.0.2"), "100.64.0.3"],
        "not_before": T0,
        "not_after": T0 + 365 * DAY,
        "serial": 0xDEADBEEF12345678,
    }
    kwargs.update(overrides)
    return issue(CA, CA_CERT, **kwargs)  # type: ignore[arg-type]


CERT = node_cert()
NOW = T0 + DAY


def reason(cert: Certificate, **kw: object) -> str:
    args: dict[str, object] = {"now": NOW, "network": "lab", "revoked": EMPTY}
    args.update(kw)
    ca_cert = args.pop("ca_cert", CA_CERT)
    with pytest.raises(CertificateError) as info:
        verify(cert, ca_cert, **args)  # type: ignore[arg-type]
    return info.value.reason


class TestFormat:
    def test_round_trip(self) -> None:
        data = CERT.encode()
        assert data.startswith(b"AVNC\x01")
        back = decode_certificate(data)
        assert back == CERT
        assert back.encode() == data
        assert back.fingerprint == CERT.fingerprint and len(CERT.fingerprint) == 40
        assert len(data) < 256  # compact

    def test_repr_leaves_out_the_signature(self) -> None:
        assert repr(CERT).startswith("Certificate(serial=") and "name='beta'" in repr(CERT)
        assert repr(CERT.signature) not in repr(CERT) and "signature" not in repr(CERT)

    def test_fields(self) -> None:
        assert CERT.name == "beta"
        assert CERT.public_key == NODE.public_key
        assert CERT.node_id == NODE.node_id == node_id(NODE.public_key)
        assert CERT.networks == ("lab", "prod")
        assert CERT.addresses == (IPv4Address("100.64.0.2"), IPv4Address("100.64.0.3"))
        assert (CERT.not_before, CERT.not_after) == (T0, T0 + 365 * DAY)
        assert CERT.issuer == key_id(CA.public_key)
        assert CERT.issuer == CA_CERT.key_id and len(CERT.issuer) == 8
        assert not CERT.is_ca and CERT.serial == 0xDEADBEEF12345678

    def test_ca_is_self_signed(self) -> None:
        assert CA_CERT.is_ca and CA_CERT.issuer == CA_CERT.key_id
        assert CA_CERT.networks == () and CA_CERT.addresses == ()
        verify(CA_CERT, CA_CERT, now=NOW, network=None, revoked=EMPTY)
        assert decode_certificate(CA_CERT.encode()) == CA_CERT

    def test_issue_is_deterministic(self) -> None:
        assert node_cert().encode() == CERT.encode()
        assert node_cert(serial=1).fingerprint != CERT.fingerprint

    def test_certificate_error_is_a_remote_protocol_error(self) -> None:
        assert issubclass(CertificateError, RemoteProtocolError)

    def test_bad_version(self) -> None:
        data = bytearray(CERT.encode())
        data[4] = 2
        with pytest.raises(CertificateError) as info:
            decode_certificate(bytes(data))
        assert info.value.reason == "bad_version"

    def test_non_canonical_body_refused_even_if_signed(self) -> None:
        """The serial 1 written as uint8 (0xcc 0x01) instead of a fixint: one certificate,
        one encoding."""
        cert = node_cert(serial=1)
        signed = cert.signed_bytes()
        assert signed[5:7] == b"\x99\x01"
        wide = signed[:6] + b"\xcc\x01" + signed[7:]
        with pytest.raises(CertificateError, match="canonical") as info:
            decode_certificate(wide + CA.sign(wide))
        assert info.value.reason == "malformed"

    def test_trailing_bytes_refused(self) -> None:
        body = msgspec.msgpack.decode(CERT.signed_bytes()[5:])
        extra = HEADER + msgspec.msgpack.encode([*body, 1])
        with pytest.raises(CertificateError, match="malformed"):
            decode_certificate(extra + CA.sign(extra))

    def test_too_long(self) -> None:
        with pytest.raises(CertificateError, match="at most"):
            decode_certificate(b"AVNC\x01" + bytes(MAX_CERT_LEN))

    def test_bytearray_and_memoryview_accepted(self) -> None:
        assert decode_certificate(bytearray(CERT.encode())) == CERT  # type: ignore[arg-type]
        assert decode_certificate(memoryview(CERT.encode())) == CERT  # type: ignore[arg-type]


class TestIssue:
    def test_not_a_ca(self) -> None:
        with pytest.raises(CertificateError) as info:
            issue(
                NODE,
                CERT,
                public_key=CA.public_key,
                name="x",
                networks=["lab"],
                not_before=T0,
                not_after=T0 + 1,
                serial=1,
            )
        assert info.value.reason == "not_a_ca"

    def test_key_mismatch(self) -> None:
        with pytest.raises(CertificateError) as info:
            issue(
                OTHER_CA,
                CA_CERT,
                public_key=NODE.public_key,
                name="x",
                networks=["lab"],
                not_before=T0,
                not_after=T0 + 1,
                serial=1,
            )
        assert info.value.reason == "key_mismatch"

    @pytest.mark.parametrize(
        ("overrides", "match"),
        [
            ({"networks": []}, "at least one network"),
            ({"networks": ["lab", "lab"]}, "repeat"),
            ({"networks": ["bad name"]}, "network name"),
            ({"addresses": ["100.64.0.2", "100.64.0.2"]}, "repeat"),
            ({"addresses": ["not-an-ip"]}, "IPv4"),
            ({"name": ""}, "name must be"),
            ({"name": "x" * 65}, "name must be"),
            ({"name": "a/b"}, "name must be"),
            ({"serial": -1}, "serial"),
            ({"serial": 1 << 64}, "serial"),
            ({"not_before": T0 + 2, "not_after": T0 + 1}, "before not_before"),
            ({"not_after": T0 + 3651 * DAY}, "after the CA certificate expires"),
            ({"not_before": -5}, "unix seconds"),
            ({"public_key": b"\x00" * 32}, "not a usable"),
            ({"public_key": b"\x01" * 31}, "32 bytes"),
            ({"networks": [f"n{i}" for i in range(33)]}, "at most 32"),
        ],
    )
    def test_bad_fields(self, overrides: dict[str, object], match: str) -> None:
        with pytest.raises(ValueError, match=match):
            node_cert(**overrides)

    def test_check_key(self) -> None:
        check_key(CERT, NODE.public_key)
        with pytest.raises(CertificateError) as info:
            check_key(CERT, CA.public_key)
        assert info.value.reason == "key_mismatch"


class TestVerify:
    def test_valid(self) -> None:
        verify(CERT, CA_CERT, now=NOW, network="lab", revoked=EMPTY)
        verify(CERT, CA_CERT, now=NOW, network="prod", revoked=EMPTY)
        verify(CERT, CA_CERT, now=NOW, network=None, revoked=EMPTY)
        verify(CERT, CA_CERT, now=T0, network=None, revoked=EMPTY)  # bounds are inclusive
        verify(CERT, CA_CERT, now=T0 + 365 * DAY, network=None, revoked=EMPTY)

    def test_foreign_ca(self) -> None:
        other = make_ca_cert(OTHER_CA)
        assert reason(CERT, ca_cert=other) == "foreign_ca"

    def test_foreign_ca_claiming_our_issuer_id(self) -> None:
        forged = msgspec.structs.replace(CERT, name="evil")
        forged = msgspec.structs.replace(forged, signature=OTHER_CA.sign(forged.signed_bytes()))
        assert reason(forged) == "bad_signature"

    def test_expired(self) -> None:
        assert reason(CERT, now=T0 + 365 * DAY + 1) == "expired"

    def test_not_yet_valid(self) -> None:
        assert reason(CERT, now=T0 - 0.5) == "not_yet_valid"

    def test_wrong_network(self) -> None:
        assert reason(CERT, network="other") == "wrong_network"

    def test_revoked_by_serial(self) -> None:
        revoked = RevocationList.parse(f"serial {CERT.serial}\n")
        assert reason(CERT, revoked=revoked) == "revoked"
        assert reason(CERT, revoked=revoked, now=T0 + 400 * DAY) == "revoked"

    def test_revoked_by_node_id(self) -> None:
        revoked = RevocationList.parse(f"node {NODE.node_id.hex()}\n")
        assert reason(CERT, revoked=revoked) == "revoked"
        assert reason(node_cert(serial=99), revoked=revoked) == "revoked"  # every cert of it

    def test_not_revoked_by_others(self) -> None:
        revoked = RevocationList.parse(f"serial 5\nnode {CA.node_id.hex()}\n")
        verify(CERT, CA_CERT, now=NOW, network="lab", revoked=revoked)

    def test_node_cert_as_ca(self) -> None:
        assert reason(CERT, ca_cert=CERT) == "not_a_ca"

    def test_ca_certificate_must_be_self_signed(self) -> None:
        tampered = msgspec.structs.replace(CA_CERT, not_after=CA_CERT.not_after + DAY)
        assert reason(CERT, ca_cert=tampered) == "bad_signature"

    def test_expired_ca(self) -> None:
        assert reason(CERT, now=T0 + 3651 * DAY) == "expired"

    def test_tampered_field(self) -> None:
        assert (
            reason(msgspec.structs.replace(CERT, networks=("lab", "prod", "x"))) == "bad_signature"
        )
        assert reason(msgspec.structs.replace(CERT, public_key=CA.public_key)) == "bad_signature"

    @settings(max_examples=25, deadline=None)
    @given(st.integers(1, 255))
    def test_any_flipped_byte_of_the_signed_region(self, mask: int) -> None:
        """A flipped byte anywhere in magic, version, body or signature: never accepted; once it
        decodes and still names our CA, the reason is bad_signature."""
        data = CERT.encode()
        for pos in range(len(data)):
            bad = bytearray(data)
            bad[pos] ^= mask
            try:
                cert = decode_certificate(bytes(bad))
            except CertificateError as exc:
                assert exc.reason in DECODE_REASONS
                continue
            with pytest.raises(CertificateError) as info:
                verify(cert, CA_CERT, now=NOW, network=None, revoked=EMPTY)
            if cert.issuer == CERT.issuer:
                assert info.value.reason == "bad_signature", pos
            else:
                assert info.value.reason == "foreign_ca", pos


def only_certificate_errors(data: bytes) -> None:
    try:
        decode_certificate(data)
    except CertificateError as exc:
        assert exc.reason in DECODE_REASONS


class TestFuzz:
    @settings(max_examples=500, deadline=None)
    @given(st.binary(max_size=600))
    def test_random_bytes(self, data: bytes) -> None:
        only_certificate_errors(data)

    @settings(max_examples=500, deadline=None)
    @given(st.binary(max_size=600))
    def test_random_body(self, body: bytes) -> None:
        only_certificate_errors(HEADER + body)
        only_certificate_errors(HEADER + body + bytes(64))

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(
            st.recursive(
                st.none()
                | st.booleans()
                | st.integers(-(1 << 63), (1 << 64) - 1)
                | st.floats()
                | st.text(max_size=70)
                | st.binary(max_size=40),
                lambda children: st.lists(children, max_size=5),
                max_leaves=20,
            ),
            max_size=11,
        )
    )
    def test_random_msgpack_body(self, items: list[object]) -> None:
        signed = HEADER + msgspec.msgpack.encode(items)
        only_certificate_errors(signed + CA.sign(signed))

    @pytest.mark.parametrize(
        "body",
        [
            b"\x91" * 3000,
            b"\x99" + b"\x91" * 3000,
            b"\x99\x01\xa4\xff\xfe\xfd\xfc",
            b"\xdd\xff\xff\xff\xff",
            b"\xc4\xff",
        ],
    )
    def test_hostile_bodies(self, body: bytes) -> None:
        only_certificate_errors((HEADER + body)[: MAX_CERT_LEN - 64] + bytes(64))

    def test_every_truncation_and_extension(self) -> None:
        data = CERT.encode()
        for n in range(len(data)):
            with pytest.raises(CertificateError):
                decode_certificate(data[:n])
            only_certificate_errors(data[n:])
        for tail in (b"\x00", b"\xff" * 64):
            with pytest.raises(CertificateError):
                decode_certificate(data + tail)

    @settings(max_examples=300, deadline=None)
    @given(st.data())
    def test_mutations(self, data: st.DataObject) -> None:
        buf = bytearray(CERT.encode())
        for _ in range(data.draw(st.integers(1, 4))):
            pos = data.draw(st.integers(0, len(buf)))
            op = data.draw(st.sampled_from(["insert", "delete", "set"]))
            if op == "insert":
                buf[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
            elif pos < len(buf):
                if op == "delete":
                    del buf[pos]
                else:
                    buf[pos] = data.draw(st.integers(0, 255))
        only_certificate_errors(bytes(buf))

    @settings(max_examples=300, deadline=None)
    @given(st.text(max_size=300))
    def test_from_pem_random_text(self, text: str) -> None:
        for candidate in (
            text,
            f"-----BEGIN AUTOVN CERTIFICATE-----\n{text}\n-----END AUTOVN CERTIFICATE-----\n",
        ):
            try:
                from_pem(candidate)
            except CertificateError as exc:
                assert exc.reason in DECODE_REASONS


class TestPem:
    def test_round_trip(self) -> None:
        pem = to_pem(CERT)
        lines = pem.splitlines()
        assert lines[0] == "-----BEGIN AUTOVN CERTIFICATE-----"
        assert lines[-1] == "-----END AUTOVN CERTIFICATE-----"
        assert all(len(line) <= 64 for line in lines[1:-1])
        assert from_pem(pem) == CERT
        assert from_pem(to_pem(CA_CERT)) == CA_CERT

    def test_pasted_with_noise(self) -> None:
        pem = to_pem(CERT)
        pasted = "here is beta's cert:\r\n\r\n" + pem.replace("\n", "\r\n    ") + "\nthanks\n"
        assert from_pem(pasted) == CERT

    @pytest.mark.parametrize(
        "text",
        [
            "",
            "-----BEGIN AUTOVN CERTIFICATE-----\n",
            "-----END AUTOVN CERTIFICATE-----\n-----BEGIN AUTOVN CERTIFICATE-----\n",
            "-----BEGIN AUTOVN CERTIFICATE-----\n!!!!\n-----END AUTOVN CERTIFICATE-----\n",
            "-----BEGIN AUTOVN CERTIFICATE-----\nQUJD\n-----END AUTOVN CERTIFICATE-----\n",
            "-----BEGIN AUTOVN CERTIFICATE-----\néé\n-----END AUTOVN CERTIFICATE-----\n",
        ],
    )
    def test_malformed(self, text: str) -> None:
        with pytest.raises(CertificateError) as info:
            from_pem(text)
        assert info.value.reason == "malformed"

    def test_two_blocks_refused(self) -> None:
        with pytest.raises(CertificateError, match="exactly one"):
            from_pem(to_pem(CERT) + to_pem(CA_CERT))


class TestRevocationList:
    def test_parse(self) -> None:
        nid = NODE.node_id.hex()
        text = f"""# revoked by the lab admin

serial 42
serial 18446744073709551615   # the largest serial
node {nid.upper()}
   # indented comment
"""
        rl = RevocationList.parse(text)
        assert rl.serials == {42, (1 << 64) - 1}
        assert rl.node_ids == {NODE.node_id}
        assert len(rl) == 3
        assert rl.contains(CERT)
        assert not RevocationList.parse("serial 42\n").contains(CERT)

    def test_empty(self) -> None:
        assert len(RevocationList.empty()) == 0
        assert not RevocationList.empty().contains(CERT)
        assert RevocationList.parse("\n# nothing\n\n") == RevocationList.empty()

    @pytest.mark.parametrize(
        ("text", "line"),
        [
            ("serial x", 1),
            ("# ok\nserial -1", 2),
            ("serial 1\n\nserial 18446744073709551616", 3),
            ("serial 1 2", 1),
            ("serial", 1),
            ("\n\n\nnode abc", 4),
            ("node " + "g" * 40, 1),
            ("key 12", 1),
            ("serial 0x10", 1),
        ],
    )
    def test_malformed_lines_named(self, text: str, line: int) -> None:
        with pytest.raises(ValueError, match=f"^line {line}: "):
            RevocationList.parse(text)


# -- the commands ------------------------------------------------------------------------------


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="supervisor")
    add_commands(parser.add_subparsers(dest="command", required=True))
    try:
        args = parser.parse_args(argv)
        rc = args.fn(args)
    except SystemExit as exc:  # argparse's usage errors
        rc = int(exc.code or 0)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.fixture
def ca_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    ca = tmp_path / "ca"
    rc, out, err = run_cli(["ca", "init", str(ca), "--name", "lab-ca", "--days", "30"], capsys)
    assert rc == 0, err
    return ca


class TestCommands:
    def test_ca_init(self, ca_dir: Path) -> None:
        assert mode(ca_dir) == 0o700
        assert mode(ca_dir / "ca.key") == 0o600
        assert mode(ca_dir / "ca.crt") == 0o644
        ca_cert = from_pem((ca_dir / "ca.crt").read_text())
        ca = Identity.from_seed(bytes.fromhex((ca_dir / "ca.key").read_text()))
        assert ca_cert.is_ca and ca_cert.name == "lab-ca" and ca_cert.public_key == ca.public_key
        now = time.time()
        verify(ca_cert, ca_cert, now=now, network=None, revoked=EMPTY)
        assert abs(ca_cert.not_after - (now + 30 * DAY)) < 60

    def test_ca_init_refuses_to_overwrite(
        self, ca_dir: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        before = (ca_dir / "ca.key").read_bytes(), (ca_dir / "ca.crt").read_bytes()
        rc, out, err = run_cli(["ca", "init", str(ca_dir)], capsys)
        assert rc == 1 and "refusing to overwrite" in err and err.startswith("error: ")
        assert before == ((ca_dir / "ca.key").read_bytes(), (ca_dir / "ca.crt").read_bytes())
        (ca_dir / "ca.key").unlink()  # a lone certificate is still a CA to protect
        rc, _, err = run_cli(["ca", "init", str(ca_dir)], capsys)
        assert rc == 1 and "ca.crt exists" in err

    def test_issue_and_show(
        self, tmp_path: Path, ca_dir: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        out_file = tmp_path / "beta.crt"
        argv = ["cert", "issue", "--ca", str(ca_dir), "--public-key", NODE.public_key.hex()]
        argv += ["--name", "beta", "--network", "lab", "--network", "prod"]
        argv += ["--address", "100.64.0.2", "--days", "10", "--out", str(out_file)]
        rc, out, err = run_cli(argv, capsys)
        assert rc == 0, err
        assert mode(out_file) == 0o644
        cert = from_pem(out_file.read_text())
        ca_cert = from_pem((ca_dir / "ca.crt").read_text())
        now = time.time()
        verify(cert, ca_cert, now=now, network="prod", revoked=EMPTY)
        assert cert.name == "beta" and cert.networks == ("lab", "prod")
        assert cert.addresses == (IPv4Address("100.64.0.2"),)
        assert cert.public_key == NODE.public_key and not cert.is_ca
        assert cert.not_before <= now - 200 and abs(cert.not_after - (now + 10 * DAY)) < 60
        assert cert.fingerprint in out and "valid now    yes" in out
        assert to_pem(cert) in out  # ready to paste

        rc, out, err = run_cli(["cert", "show", str(out_file)], capsys)
        assert rc == 0 and err == ""
        for text in [
            "beta",
            NODE.node_id.hex(),
            NODE.public_key.hex(),
            "lab, prod",
            "100.64.0.2",
            ca_cert.key_id.hex(),
            str(cert.serial),
            cert.fingerprint,
            "Z",
        ]:
            assert text in out, text
        assert "valid now    not known: signature not checked (give --ca)" in out
        assert "valid now    yes" not in out
        assert "not checked  signature (give --ca), issuer, revocation list, network" in out
        for label in ["not before", "not after", "valid now", "issuer", "serial", "is CA"]:
            assert label in out
        rc, out, err = run_cli(["cert", "show", str(out_file), "--json"], capsys)
        assert rc == 0 and json.loads(out)["valid_now"] is None
        assert json.loads(out)["checked"] == ["validity window"]

        rc, out, err = run_cli(
            ["cert", "show", str(out_file), "--json", "--ca", str(ca_dir)], capsys
        )
        assert rc == 0
        data = json.loads(out)
        assert data["valid_now"] is True and data["signature_checked"] is True
        assert data["node_id"] == NODE.node_id.hex()
        assert data["networks"] == ["lab", "prod"] and data["addresses"] == ["100.64.0.2"]
        assert data["serial"] == cert.serial and data["fingerprint"] == cert.fingerprint
        assert data["not_after"].endswith("Z") and data["issuer"] == ca_cert.key_id.hex()

    def test_issue_from_node_pub_and_not_after(
        self, tmp_path: Path, ca_dir: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        (tmp_path / "node.pub").write_text(NODE.public_key.hex() + "\n")
        until = time.strftime("%Y-%m-%d", time.gmtime(time.time() + 5 * DAY))
        argv = ["cert", "issue", "--ca", str(ca_dir), "--public-key", str(tmp_path / "node.pub")]
        argv += ["--name", "beta", "--network", "lab", "--not-after", until]
        argv += ["--out", str(tmp_path / "b.crt")]
        rc, _, err = run_cli(argv, capsys)
        assert rc == 0, err
        cert = from_pem((tmp_path / "b.crt").read_text())
        assert cert.public_key == NODE.public_key
        assert time.strftime("%Y-%m-%d", time.gmtime(cert.not_after)) == until

    def test_show_other_ca_and_expired(
        self, tmp_path: Path, ca_dir: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        (tmp_path / "old.crt").write_text(to_pem(CERT))  # by another CA, expired long ago
        rc, out, _ = run_cli(["cert", "show", str(tmp_path / "old.crt")], capsys)
        assert rc == 2 and "NO: expired" in out
        rc, out, _ = run_cli(
            ["cert", "show", str(tmp_path / "old.crt"), "--ca", str(ca_dir / "ca.crt")], capsys
        )
        assert rc == 2 and "NO: foreign_ca" in out
        (tmp_path / "old.bin").write_bytes(CERT.encode())  # the binary form is read too
        rc, out, _ = run_cli(["cert", "show", str(tmp_path / "old.bin"), "--json"], capsys)
        assert rc == 2 and json.loads(out)["invalid_reason"] == "expired"

    def test_show_valid_but_foreign_exits_non_zero(
        self, tmp_path: Path, ca_dir: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Within its window but signed by another CA: `--ca` must fail, text and JSON."""
        now = int(time.time())
        fresh = node_cert(not_before=now - 60, not_after=now + DAY)
        (tmp_path / "fresh.crt").write_text(to_pem(fresh))
        argv = ["cert", "show", str(tmp_path / "fresh.crt"), "--ca", str(ca_dir)]
        rc, out, _ = run_cli(argv, capsys)
        assert rc == 2 and "NO: foreign_ca" in out
        rc, out, _ = run_cli([*argv, "--json"], capsys)
        data = json.loads(out)
        assert rc == 2 and data["valid_now"] is False and data["signature_checked"] is True
        rc, out, _ = run_cli(["cert", "show", str(tmp_path / "fresh.crt")], capsys)
        assert rc == 0 and "valid now    yes" not in out and "not known" in out

    @pytest.mark.parametrize(
        ("extra", "match"),
        [
            (["--public-key", "abcd"], "neither 64 hex digits nor a file"),
            (["--public-key", "00" * 32], "not a usable"),
            (["--days", "3000"], "outlive the CA"),
            (["--not-after", "2001-01-01"], "in the past"),
            (["--not-after", "tomorrow"], "ISO 8601"),
            (["--address", "100.64.0.999"], "IPv4"),
            (["--name", "has space"], "letters, digits"),
            (["--days", "0"], "between 1 and"),
            (["--days", "1", "--not-after", "2030-01-01"], "not allowed with"),
        ],
    )
    def test_issue_bad_input(
        self,
        tmp_path: Path,
        ca_dir: Path,
        capsys: pytest.CaptureFixture[str],
        extra: list[str],
        match: str,
    ) -> None:
        argv = ["cert", "issue", "--ca", str(ca_dir), "--public-key", NODE.public_key.hex()]
        argv += ["--name", "beta", "--network", "lab", "--out", str(tmp_path / "x.crt")]
        rc, out, err = run_cli(argv + extra, capsys)
        assert rc != 0 and match in err, err
        assert not (tmp_path / "x.crt").exists()

    def test_issue_refuses_exposed_ca_key(
        self, tmp_path: Path, ca_dir: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        (ca_dir / "ca.key").chmod(0o644)
        argv = ["cert", "issue", "--ca", str(ca_dir), "--public-key", NODE.public_key.hex()]
        argv += ["--name", "beta", "--network", "lab", "--out", str(tmp_path / "x.crt")]
        rc, _, err = run_cli(argv, capsys)
        assert rc == 1 and "chmod 600" in err and "0644" in err

    def test_issue_refuses_mismatched_ca(
        self, tmp_path: Path, ca_dir: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        (ca_dir / "ca.crt").write_text(to_pem(CA_CERT))
        argv = ["cert", "issue", "--ca", str(ca_dir), "--public-key", NODE.public_key.hex()]
        argv += ["--name", "beta", "--network", "lab", "--out", str(tmp_path / "x.crt")]
        rc, _, err = run_cli(argv, capsys)
        assert rc == 1 and "key_mismatch" in err

    def test_issue_without_ca(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        argv = ["cert", "issue", "--ca", str(tmp_path / "nope"), "--public-key", "00" * 32]
        argv += ["--name", "beta", "--network", "lab", "--out", str(tmp_path / "x.crt")]
        rc, _, err = run_cli(argv, capsys)
        assert rc == 1 and "no such CA directory" in err

    @pytest.mark.parametrize(
        "content", [b"", b"hello", b"AVNC\x01garbage", b"AVNC\x07" + bytes(80)]
    )
    def test_show_bad_file(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes
    ) -> None:
        (tmp_path / "c.crt").write_bytes(content)
        rc, out, err = run_cli(["cert", "show", str(tmp_path / "c.crt")], capsys)
        assert rc == 1 and out == "" and "not a usable certificate" in err

    @pytest.mark.parametrize("argv", [["ca"], ["cert"], ["key"], ["cert", "issue"]])
    def test_usage_errors(self, capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
        rc, out, err = run_cli(argv, capsys)
        assert rc == 2 and "usage:" in err and "_command" not in err

    def test_show_endless_file(self, capsys: pytest.CaptureFixture[str]) -> None:
        rc, _, err = run_cli(["cert", "show", "/dev/zero"], capsys)
        assert rc == 1 and "more than" in err

    def test_show_missing_file(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        rc, _, err = run_cli(["cert", "show", str(tmp_path / "none.crt")], capsys)
        assert rc == 1 and "cannot read" in err

    def test_in_a_real_process(self, tmp_path: Path) -> None:
        """The commands as a process: exit status and stderr, never a traceback."""

        def run(*argv: str) -> subprocess.CompletedProcess[str]:
            cmd = [sys.executable, "-m", "supervisor.keys", *argv]
            return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)

        ok = run("ca", "init", str(tmp_path / "ca"))
        assert ok.returncode == 0, ok.stderr
        again = run("ca", "init", str(tmp_path / "ca"))
        assert again.returncode == 1 and "refusing" in again.stderr
        assert "Traceback" not in again.stderr
        bad = run("cert", "show", os.devnull)
        assert bad.returncode == 1 and "Traceback" not in bad.stderr
