"""configs/autovn.service: systemd reads every line of it (``systemd-analyze verify``), and
it asks for what the node needs and no more."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "configs/autovn.service"


def service() -> dict[str, str]:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return dict(parser["Service"])


def test_systemd_reads_every_line(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze missing under CI (scripts/install --test installs it)")
        pytest.skip("systemd-analyze not installed")
    # ExecStart must name a program that exists here: this interpreter, the same arguments
    text = UNIT.read_text().replace(
        "/opt/autovn/venv/bin/supervisor start", f"{sys.executable} -m supervisor start"
    )
    unit = tmp_path / "autovn.service"
    unit.write_text(text)
    res = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, cwd=tmp_path, check=False
    )
    assert res.returncode == 0 and res.stderr.strip() == "", res.stderr


def test_what_the_node_needs() -> None:
    s = service()
    assert s["Type"] == "notify" and s["NotifyAccess"] == "main"
    assert s["ExecStart"] == "/opt/autovn/venv/bin/supervisor start /etc/autovn/node.toml"
    assert int(s["WatchdogSec"]) > 0
    assert s["CapabilityBoundingSet"] == "CAP_NET_ADMIN"
    assert s["DeviceAllow"] == "/dev/net/tun rw" and s["DevicePolicy"] == "closed"
    assert set(s["RestrictAddressFamilies"].split()) == {
        "AF_INET",
        "AF_INET6",
        "AF_UNIX",
        "AF_NETLINK",
    }
    assert s["ProtectSystem"] == "strict" and s["ProtectHome"] == "yes"
    assert s["PrivateTmp"] == "yes" and s["NoNewPrivileges"] == "yes"
    assert (s["StateDirectory"], s["RuntimeDirectory"], s["LogsDirectory"]) == ("autovn",) * 3


def test_example_config_lives_in_the_unit_s_directories() -> None:
    """configs/interface.toml's state and runtime directories are below the unit's."""
    import tomllib

    node = tomllib.loads((ROOT / "configs/interface.toml").read_text())["node"]
    assert node["state_dir"].startswith("/var/lib/autovn/")
    assert node["runtime_dir"].startswith("/run/autovn/")
