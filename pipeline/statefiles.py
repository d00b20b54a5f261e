"""What a node keeps on disk, and the one way it writes it: atomically and durably.

Every file a node writes in its state directory goes through ``write_atomic``: the bytes go
to a temporary file beside the target, are ``fsync``'d, and the temporary file replaces the
target in one ``rename``, and the directory is ``fsync``'d too. A crash or power cut leaves
the old file or the new one, never a torn one. Keys and certificates
(``pipeline/crypto/keyfiles.py``) and control's state files (below) use it alike.

Control's state files, in ``node.state_dir``:

- ``address``: the virtual address DHCP last granted this node (it asks for it first on
  its next start);
- ``leases.json``: router mode: each machine's lease (address, MAC, host name, DHCP client
  id, static or not), so that after a restart the machines keep their addresses.

Reading is forgiving: a missing or malformed file is as good as none (the reason is
returned for the log); writing raises ``OSError`` for the caller to log.
"""

from __future__ import annotations

import json
import os
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

ADDRESS_FILE = "address"
LEASES_FILE = "leases.json"


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` (file mode ``mode``), atomically and durably."""
    tmp = _write_temp(path, data, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise
    _sync_dir(path.parent)


def write_new(path: Path, data: bytes, mode: int = 0o600) -> bool:
    """Create ``path`` holding ``data`` (mode ``mode``) only if it does not exist (False
    then), atomically and durably: a crash leaves no file or the whole file."""
    tmp = _write_temp(path, data, mode)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        _unlink(tmp)
    _sync_dir(path.parent)
    return True


def _write_temp(path: Path, data: bytes, mode: int) -> Path:
    """``data`` in a new temporary file beside ``path``, synced to disk."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink(tmp)
        raise
    os.close(fd)
    return tmp


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class StateDir:
    """Control's files in a node's state directory."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def held_address(self) -> IPv4Address | None:
        """The address this node held before (written at each DHCP lease), if any."""
        try:
            text = (self.path / ADDRESS_FILE).read_text().strip()
            return IPv4Address(text) if text else None
        except (OSError, ValueError):
            return None

    def hold_address(self, address: IPv4Address | str) -> None:
        write_atomic(self.path / ADDRESS_FILE, f"{address}\n".encode())

    def held_leases(self) -> tuple[list[dict[str, Any]], str | None]:
        """Router mode: the machine leases saved before, as JSON objects, and why none could
        be read (None: read, or there was no file)."""
        try:
            data = json.loads((self.path / LEASES_FILE).read_text())
        except FileNotFoundError:
            return [], None
        except (OSError, ValueError) as exc:
            return [], str(exc)
        if not isinstance(data, list) or not all(isinstance(m, dict) for m in data):
            return [], "not a list of objects"
        return data, None

    def hold_leases(self, leases: list[dict[str, Any]]) -> None:
        write_atomic(self.path / LEASES_FILE, json.dumps(leases, indent=1).encode())
