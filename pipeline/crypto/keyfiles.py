"""Key, certificate, CA and revocation-list files: read, check, create (impure: file I/O).

Key files hold a 32-byte Ed25519 seed as 64 hex digits and a newline, mode 0600; a key file
that group or others can read is refused, never silently fixed. Certificates are read in
their text form (``-----BEGIN AUTOVN CERTIFICATE-----``) or binary encoding.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from pipeline.crypto.cert import (
    Certificate,
    CertificateError,
    RevocationList,
    check_key,
    decode_certificate,
    from_pem,
    verify,
)
from pipeline.crypto.identity import SEED_LEN, Identity
from pipeline.statefiles import write_atomic, write_new

if TYPE_CHECKING:
    from pipeline.config import Settings

NODE_KEY = "node.key"
NODE_PUB = "node.pub"
CA_KEY = "ca.key"
CA_CERT = "ca.crt"
MAX_FILE_BYTES = 1 << 16


class KeyFileError(Exception):
    """A key, certificate or CA file (or an argument naming one) is unusable; the message
    names the file and says what to do."""


# -- files -------------------------------------------------------------------------------------


def read_seed(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"{path}: not a regular file")
        if st.st_mode & 0o077:
            raise KeyFileError(
                f"{path}: readable or writable by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}"
            )
        raw = os.read(fd, 4096)
    finally:
        os.close(fd)
    text = raw.decode("ascii", errors="replace").strip()
    if len(text) != 2 * SEED_LEN or not is_hex(text):
        raise KeyFileError(
            f"{path}: malformed key file (expected {2 * SEED_LEN} hex digits, got {len(raw)} bytes)"
        )
    return bytes.fromhex(text)


def is_hex(text: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in text)


def make_dir(path: Path) -> None:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot create directory: {exc.strerror}") from None
    if not path.is_dir():
        raise KeyFileError(f"{path}: not a directory")


def seed_text(seed: bytes) -> bytes:
    return seed.hex().encode() + b"\n"


def load_or_create_identity(state_dir: Path) -> Identity:
    """The node's identity from ``state_dir/node.key``, made (0600, ``os.urandom``) on first
    use; ``node.pub`` is written next to it. Raises KeyFileError for an unreadable, exposed
    (group/world readable) or malformed key file."""
    make_dir(state_dir)
    key_path = state_dir / NODE_KEY
    if not key_path.exists() and not key_path.is_symlink():
        try:
            write_new(key_path, seed_text(os.urandom(SEED_LEN)), 0o600)
        except OSError as exc:
            raise KeyFileError(f"{key_path}: cannot create: {exc.strerror}") from None
    identity = Identity.from_seed(read_seed(key_path))
    pub_path = state_dir / NODE_PUB
    pub_text = identity.public_key.hex().encode() + b"\n"
    try:
        if not pub_path.exists() or pub_path.read_bytes() != pub_text:
            write_atomic(pub_path, pub_text, 0o644)
    except OSError as exc:
        raise KeyFileError(f"{pub_path}: cannot write: {exc.strerror}") from None
    return identity


def read_certificate(path: Path) -> Certificate:
    """A certificate file: the text form, or the binary encoding. KeyFileError if unusable."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read: {exc.strerror}") from None
    if len(data) > MAX_FILE_BYTES:
        raise KeyFileError(f"{path}: not a certificate (more than {MAX_FILE_BYTES} bytes)")
    try:
        if data.startswith(b"AVNC"):
            return decode_certificate(data)
        return from_pem(data.decode("utf-8", errors="replace"))
    except CertificateError as exc:
        raise KeyFileError(f"{path}: not a usable certificate ({exc})") from None


def load_ca(ca_dir: Path) -> tuple[Identity, Certificate]:
    """The CA's key and certificate from ``ca_dir``; KeyFileError unless they belong together."""
    if not ca_dir.is_dir():
        raise KeyFileError(f"{ca_dir}: no such CA directory (make one with: supervisor ca init)")
    ca = Identity.from_seed(read_seed(ca_dir / CA_KEY))
    ca_cert = read_certificate(ca_dir / CA_CERT)
    if not ca_cert.is_ca:
        raise KeyFileError(f"{ca_dir / CA_CERT}: not a CA certificate")
    if ca_cert.public_key != ca.public_key:
        raise KeyFileError(f"{ca_dir}: {CA_KEY} is not the key of {CA_CERT} (key_mismatch)")
    return ca, ca_cert


def read_revocation_list(path: Path | None) -> RevocationList:
    """The revocation list at ``path`` (empty if None); KeyFileError naming the bad line."""
    if path is None:
        return RevocationList.empty()
    try:
        return RevocationList.parse(path.read_text())
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read: {exc.strerror}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"{path}: {exc}") from None


class Membership(msgspec.Struct, frozen=True):
    """What a node needs to take part in a network, loaded and checked."""

    identity: Identity
    ca: Certificate
    certificate: Certificate
    revoked: RevocationList


def load_membership(
    *,
    state_dir: Path,
    ca_path: Path,
    certificate_path: Path,
    revocation_path: Path | None,
    network: str,
    now: float,
) -> Membership:
    """The node's key (made on first use), the authority, and the node's own certificate,
    which must be for this key, valid now, for ``network``, and not revoked. KeyFileError
    says what is wrong and what to do."""
    identity = load_or_create_identity(state_dir)
    ca = read_certificate(ca_path)
    if not certificate_path.exists():
        raise KeyFileError(
            f"{certificate_path}: no certificate yet. Give the network authority this node's "
            f"public key {identity.public_key.hex()} (`supervisor key show`), and put the "
            f"certificate it issues (`supervisor cert issue`) there"
        )
    certificate = read_certificate(certificate_path)
    revoked = read_revocation_list(revocation_path)
    try:
        check_key(certificate, identity.public_key)
        verify(certificate, ca, now=now, network=network, revoked=revoked)
    except CertificateError as exc:
        raise KeyFileError(f"{certificate_path}: {exc.reason}: {exc.detail}") from None
    return Membership(identity, ca, certificate, revoked)


def node_membership(settings: Settings, now: float) -> Membership:
    """``load_membership`` with the files and network of a node's settings (checked by
    ``supervisor start`` before it starts the node, and loaded by control)."""
    sec = settings.security
    if sec.ca_certificate is None:
        raise KeyFileError("security.ca_certificate is not set (and insecure_plaintext is off)")
    return load_membership(
        state_dir=settings.node.state_dir,
        ca_path=sec.ca_certificate,
        certificate_path=settings.certificate_file,
        revocation_path=sec.revocation_list,
        network=settings.network.namespace,
        now=now,
    )
