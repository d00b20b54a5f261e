"""Key files, the network authority's directory, and the ``ca``, ``cert`` and ``key`` commands.

Files (all text, so they can be copied and pasted):

- ``<state_dir>/node.key``: the node's secret, the 32-byte Ed25519 seed as 64 lowercase hex
  digits and a newline. Mode 0600, made with ``os.urandom`` on first use. A key file that the
  group or others may read, or that is not exactly that, is refused with an error (never
  silently replaced).
- ``<state_dir>/node.pub``: the Ed25519 public key, 64 hex digits and a newline (mode 0644).
  Derived from ``node.key`` and rewritten if it disagrees; it is what ``cert issue
  --public-key`` takes.
- ``<ca_dir>/ca.key``: the CA's seed, the same format as ``node.key``, mode 0600.
- ``<ca_dir>/ca.crt``: the CA's self-signed certificate in the text form of
  ``pipeline/crypto/cert.py`` (``-----BEGIN AUTOVN CERTIFICATE-----``), mode 0644.

Commands (each prints ``error: ...`` on stderr and exits 1 on bad input, never a traceback):

    supervisor ca init DIR [--name NAME] [--days N]
    supervisor cert issue --ca DIR --public-key HEX_OR_FILE --name NAME --network NS ...
                          [--address IP ...] [--days N | --not-after ISO] --out FILE
    supervisor cert show FILE [--ca DIR_OR_CRT] [--json]
    supervisor key show CONFIG [--json]

Certificates start ``BACKDATE_S`` seconds before they are made, so a peer whose clock is a
little behind does not see them as not yet valid.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from ipaddress import AddressValueError, IPv4Address
from pathlib import Path
from typing import Any

from pipeline.config import load_settings
from pipeline.crypto.cert import (
    Certificate,
    CertificateError,
    RevocationList,
    check_name,
    issue,
    make_ca,
    to_pem,
    verify,
)
from pipeline.crypto.identity import (
    PUBLIC_KEY_LEN,
    SEED_LEN,
    Identity,
    x25519_public_from_ed25519,
)
from pipeline.crypto.keyfiles import (
    CA_CERT,
    CA_KEY,
    NODE_KEY,
    NODE_PUB,
    KeyFileError,
    is_hex,
    load_ca,
    load_or_create_identity,
    make_dir,
    read_certificate,
    seed_text,
)
from pipeline.errors import ConfigError
from pipeline.statefiles import write_atomic, write_new

BACKDATE_S = 300
DAY_S = 86400
MAX_DAYS = 36500
DEFAULT_CERT_DAYS = 365
EXIT_ERROR = 1
EXIT_INVALID = 2  # `cert show`: the certificate was checked and is not valid


# -- presentation ------------------------------------------------------------------------------


def iso_utc(t: int) -> str:
    try:
        return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, ValueError, OSError):
        return f"{t} (unix seconds)"


def describe(cert: Certificate, *, now: float, ca_cert: Certificate | None) -> dict[str, Any]:
    """Every field, for ``cert show`` and ``cert issue``, and what was checked. With
    ``ca_cert`` the certificate is verified (the CA certificate, issuer, signature, validity
    window); without, only its validity window is, so ``valid_now`` is None (not known) unless
    the window alone shows it invalid. The revocation list and the network are never checked
    here (``supervisor start`` and every handshake check them)."""
    problem: str | None = None
    if ca_cert is not None:
        try:
            verify(cert, ca_cert, now=now, network=None, revoked=RevocationList.empty())
        except CertificateError as exc:
            problem = str(exc)
        checked = ["CA certificate", "issuer", "signature", "validity window"]
        not_checked = ["revocation list", "network"]
    else:
        if now < cert.not_before:
            problem = "not_yet_valid"
        elif now > cert.not_after:
            problem = "expired"
        checked = ["validity window"]
        not_checked = ["signature (give --ca)", "issuer", "revocation list", "network"]
    valid: bool | None = problem is None if ca_cert is not None or problem else None
    return {
        "name": cert.name,
        "node_id": cert.node_id.hex(),
        "public_key": cert.public_key.hex(),
        "networks": list(cert.networks),
        "addresses": [str(a) for a in cert.addresses],
        "not_before": iso_utc(cert.not_before),
        "not_after": iso_utc(cert.not_after),
        "not_before_unix": cert.not_before,
        "not_after_unix": cert.not_after,
        "valid_now": valid,
        "invalid_reason": problem,
        "signature_checked": ca_cert is not None,
        "checked": checked,
        "not_checked": not_checked,
        "is_ca": cert.is_ca,
        "issuer": cert.issuer.hex(),
        "serial": cert.serial,
        "fingerprint": cert.fingerprint,
    }


def format_description(d: dict[str, Any]) -> str:
    if d["valid_now"] is None:
        valid = "not known: signature not checked (give --ca); within its validity window"
    elif d["valid_now"]:
        valid = "yes"
    else:
        valid = f"NO: {d['invalid_reason']}"
    rows = [
        ("name", d["name"]),
        ("node id", d["node_id"]),
        ("public key", d["public_key"]),
        ("networks", ", ".join(d["networks"]) or "none"),
        ("addresses", ", ".join(d["addresses"]) or "none"),
        ("not before", d["not_before"]),
        ("not after", d["not_after"]),
        ("valid now", valid),
        ("checked", ", ".join(d["checked"])),
        ("not checked", ", ".join(d["not_checked"])),
        ("is CA", "yes" if d["is_ca"] else "no"),
        ("issuer", d["issuer"]),
        ("serial", str(d["serial"])),
        ("fingerprint", d["fingerprint"]),
    ]
    return "\n".join(f"{k:<12} {v}" for k, v in rows)


# -- commands ----------------------------------------------------------------------------------

Command = Callable[[argparse.Namespace], int]


def _guarded(fn: Command) -> Command:
    """Turn every expected failure into one ``error:`` line on stderr and exit status 1."""

    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (KeyFileError, CertificateError) as exc:
            print(f"error: {exc}", file=sys.stderr)
        except ConfigError as exc:
            print(f"error: {len(exc.problems)} problem(s) in the configuration", file=sys.stderr)
            for key, msg in exc.problems:
                print(f"  {key}: {msg}", file=sys.stderr)
        except BrokenPipeError:  # stdout closed early (`| head`): not worth a message
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_ERROR

    return run


def _days(text: str) -> int:
    try:
        days = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number of days, got {text!r}") from None
    if not 1 <= days <= MAX_DAYS:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_DAYS}, got {days}")
    return days


def _instant(text: str) -> int:
    """An ISO 8601 date or time; UTC unless it names an offset."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be an ISO 8601 date or time (2030-01-31 or 2030-01-31T12:00:00Z), got {text!r}"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp())


def _name_arg(text: str) -> str:
    if (msg := check_name(text)) is not None:
        raise argparse.ArgumentTypeError(msg)
    return text


def _address_arg(text: str) -> IPv4Address:
    try:
        return IPv4Address(text)
    except AddressValueError:
        raise argparse.ArgumentTypeError(f"must be an IPv4 address, got {text!r}") from None


def _public_key(value: str) -> bytes:
    """64 hex digits, or a file holding them (``node.pub``) or the 32 raw bytes."""
    if len(value) == 2 * PUBLIC_KEY_LEN and is_hex(value):
        return bytes.fromhex(value)
    path = Path(value)
    if not path.exists():
        raise KeyFileError(
            f"--public-key: {value!r} is neither {2 * PUBLIC_KEY_LEN} hex digits nor a file"
        )
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read: {exc.strerror}") from None
    text = data.decode("ascii", errors="replace").strip()
    if len(text) == 2 * PUBLIC_KEY_LEN and is_hex(text):
        return bytes.fromhex(text)
    if len(data) == PUBLIC_KEY_LEN:
        return data
    raise KeyFileError(
        f"{path}: not a public key (expected {2 * PUBLIC_KEY_LEN} hex digits, as in node.pub)"
    )


def _serial() -> int:
    return int.from_bytes(os.urandom(8), "big")


def cmd_ca_init(args: argparse.Namespace) -> int:
    ca_dir: Path = args.dir
    for name in (CA_KEY, CA_CERT):
        if (ca_dir / name).exists() or (ca_dir / name).is_symlink():
            raise KeyFileError(f"{ca_dir / name} exists: refusing to overwrite a CA")
    make_dir(ca_dir)
    seed = os.urandom(SEED_LEN)
    if not write_new(ca_dir / CA_KEY, seed_text(seed), 0o600):
        raise KeyFileError(f"{ca_dir / CA_KEY} exists: refusing to overwrite a CA")
    ca = Identity.from_seed(seed)
    now = int(time.time())
    ca_cert = make_ca(
        ca,
        name=args.name,
        not_before=now - BACKDATE_S,
        not_after=now + args.days * DAY_S,
        serial=_serial(),
    )
    if not write_new(ca_dir / CA_CERT, to_pem(ca_cert).encode(), 0o644):
        (ca_dir / CA_KEY).unlink()
        raise KeyFileError(f"{ca_dir / CA_CERT} exists: refusing to overwrite a CA")
    print(format_description(describe(ca_cert, now=now, ca_cert=ca_cert)))
    print(f"wrote {ca_dir / CA_KEY} (secret, 0600) and {ca_dir / CA_CERT}")
    return 0


def cmd_cert_issue(args: argparse.Namespace) -> int:
    ca, ca_cert = load_ca(args.ca)
    public_key = _public_key(args.public_key)
    try:
        x25519_public_from_ed25519(public_key)
    except ValueError as exc:
        raise KeyFileError(f"--public-key: {exc}") from None
    now = int(time.time())
    if now > ca_cert.not_after:
        raise KeyFileError(f"the CA certificate expired at {iso_utc(ca_cert.not_after)}")
    if args.not_after is not None:
        not_after = args.not_after
    elif args.days is not None:
        not_after = now + args.days * DAY_S
    else:
        not_after = min(now + DEFAULT_CERT_DAYS * DAY_S, ca_cert.not_after)
    if not_after <= now:
        raise KeyFileError(f"--not-after {iso_utc(not_after)} is in the past")
    if not_after > ca_cert.not_after:
        raise KeyFileError(
            f"the certificate would outlive the CA certificate (it expires "
            f"{iso_utc(ca_cert.not_after)}); give a shorter --days or --not-after"
        )
    try:
        cert = issue(
            ca,
            ca_cert,
            public_key=public_key,
            name=args.name,
            networks=args.network,
            addresses=args.address or (),
            not_before=max(now - BACKDATE_S, ca_cert.not_before),
            not_after=not_after,
            serial=_serial(),
        )
    except ValueError as exc:
        raise KeyFileError(f"cannot issue: {exc}") from None
    pem = to_pem(cert)
    write_atomic(args.out, pem.encode(), 0o644)
    print(format_description(describe(cert, now=now, ca_cert=ca_cert)))
    print(pem, end="")
    print(f"wrote {args.out}")
    return 0


def _ca_cert_arg(path: Path) -> Certificate:
    ca_cert = read_certificate(path / CA_CERT if path.is_dir() else path)
    if not ca_cert.is_ca:
        raise KeyFileError(f"{path}: not a CA certificate")
    return ca_cert


def cmd_cert_show(args: argparse.Namespace) -> int:
    cert = read_certificate(args.file)
    ca_cert = _ca_cert_arg(args.ca) if args.ca is not None else None
    d = describe(cert, now=time.time(), ca_cert=ca_cert)
    print(json.dumps(d, indent=2) if args.json else format_description(d))
    return EXIT_INVALID if d["valid_now"] is False else 0


def cmd_key_show(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    state_dir = settings.node.state_dir
    existed = (state_dir / NODE_KEY).exists()
    identity = load_or_create_identity(state_dir)
    if not existed:
        print(f"created {state_dir / NODE_KEY}", file=sys.stderr)
    d = {
        "name": settings.node.name,
        "public_key": identity.public_key.hex(),
        "node_id": identity.node_id.hex(),
        "key_file": str(state_dir / NODE_KEY),
        "public_key_file": str(state_dir / NODE_PUB),
    }
    if args.json:
        print(json.dumps(d, indent=2))
    else:
        rows = [(k.replace("_", " "), v) for k, v in d.items()]
        print("\n".join(f"{k:<16} {v}" for k, v in rows))
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``ca``, ``cert`` and ``key`` on the ``supervisor`` command's subparsers."""
    ca = sub.add_parser("ca", help="the network authority (CA)", description="Manage a CA.")
    ca_sub = ca.add_subparsers(dest="ca_command", required=True, metavar="{init}")
    init = ca_sub.add_parser(
        "init",
        help="make a new CA: DIR/ca.key (secret) and DIR/ca.crt",
        description="Make a new network authority in DIR: ca.key (mode 0600, keep it secret) "
        "and ca.crt (give it to every node). Refuses to overwrite an existing CA.",
    )
    init.add_argument("dir", type=Path, metavar="DIR", help="the CA directory (created 0700)")
    init.add_argument(
        "--name", type=_name_arg, default="autovn-ca", help="the CA's name (default: %(default)s)"
    )
    init.add_argument(
        "--days", type=_days, default=3650, help="validity in days (default: %(default)s)"
    )
    init.set_defaults(fn=_guarded(cmd_ca_init))

    cert = sub.add_parser("cert", help="issue and inspect node certificates")
    cert_sub = cert.add_subparsers(dest="cert_command", required=True, metavar="{issue,show}")
    iss = cert_sub.add_parser(
        "issue",
        help="sign a node's public key",
        description="Sign a node's public key (from `supervisor key show`) with the CA in "
        "--ca: the certificate names the node, the networks it may join and optionally fixed "
        "addresses. Written to --out (mode 0644) in the text form, and printed.",
    )
    iss.add_argument("--ca", type=Path, required=True, metavar="DIR", help="the CA directory")
    iss.add_argument(
        "--public-key",
        required=True,
        metavar="HEX_OR_FILE",
        help="the node's public key: 64 hex digits or a file such as node.pub",
    )
    iss.add_argument("--name", type=_name_arg, required=True, help="the node's name")
    iss.add_argument(
        "--network",
        type=_name_arg,
        action="append",
        required=True,
        metavar="NS",
        help="a network the node may join (repeat for more)",
    )
    iss.add_argument(
        "--address",
        type=_address_arg,
        action="append",
        metavar="IP",
        help="a fixed virtual IPv4 address (repeat for more)",
    )
    when = iss.add_mutually_exclusive_group()
    when.add_argument(
        "--days",
        type=_days,
        help=f"validity (default {DEFAULT_CERT_DAYS}, or until the CA certificate expires)",
    )
    when.add_argument(
        "--not-after", type=_instant, metavar="ISO", help="expiry, e.g. 2030-01-31 (UTC)"
    )
    iss.add_argument("--out", type=Path, required=True, metavar="FILE", help="where to write")
    iss.set_defaults(fn=_guarded(cmd_cert_issue))

    show = cert_sub.add_parser(
        "show",
        help="print every field of a certificate",
        description="Print every field of a certificate and whether it is valid now, and "
        "what was checked: without --ca only its validity window (the signature is not "
        "checked, so it cannot say 'valid'); with --ca the CA certificate, the issuer, the "
        "signature and the validity window. The revocation list and the network are not "
        "checked here. Exit status: 0 valid (or, without --ca, within its validity window), "
        f"{EXIT_INVALID} not valid, {EXIT_ERROR} unreadable.",
    )
    show.add_argument("file", type=Path, metavar="FILE", help="the certificate")
    show.add_argument(
        "--ca", type=Path, metavar="DIR_OR_CRT", help="verify against this CA (dir or ca.crt)"
    )
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(fn=_guarded(cmd_cert_show))

    key = sub.add_parser("key", help="this node's identity key")
    key_sub = key.add_subparsers(dest="key_command", required=True, metavar="{show}")
    kshow = key_sub.add_parser(
        "show",
        help="print the node's public key and node id (creating the key if absent)",
        description="Load CONFIG, create the node's key in node.state_dir if it has none, and "
        "print its public key and node id: what the CA admin needs for `cert issue`.",
    )
    kshow.add_argument("config", type=Path, metavar="CONFIG", help="the node's TOML configuration")
    kshow.add_argument("--json", action="store_true", help="print JSON")
    kshow.set_defaults(fn=_guarded(cmd_key_show))


def main(argv: list[str] | None = None) -> None:
    """``python -m supervisor.keys ...``: these commands alone (as wired into ``supervisor``)."""
    parser = argparse.ArgumentParser(prog="supervisor", description="autovn keys and certificates")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    sys.exit(args.fn(args))


if __name__ == "__main__":
    main()
