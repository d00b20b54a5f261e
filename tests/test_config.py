"""Configuration: TOML into frozen settings, every error by its key path, all at once."""

from __future__ import annotations

import subprocess
import sys
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import (
    Endpoint,
    Mode,
    PortMapProtocol,
    Settings,
    load_settings,
    settings_from_json,
    settings_from_mapping,
)
from pipeline.control.stage import control_settings
from pipeline.crypto.ciphers import DataCipher
from pipeline.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def minimal() -> dict[str, Any]:
    return {
        "node": {"name": "alpha", "state_dir": "/tmp/s", "runtime_dir": "/tmp/r"},
        "network": {"namespace": "lab", "subnet": "100.64.0.0/24", "address": "100.64.0.1"},
        "security": {"ca_certificate": "/tmp/ca.crt"},
    }


def problems(data: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        settings_from_mapping(data)
    return dict(info.value.problems)


class TestValid:
    def test_minimal_config_gets_defaults(self) -> None:
        s = settings_from_mapping(minimal())
        assert s.network.mode is Mode.INTERFACE
        assert s.stages.classifier.workers == 1
        assert s.overlay.listen_port == 4789
        assert s.log_file == Path("/tmp/r/node.log")

    def test_settings_are_frozen(self) -> None:
        s = settings_from_mapping(minimal())
        with pytest.raises(AttributeError):
            s.node.name = "other"  # type: ignore[misc]

    def test_json_round_trip_is_exact(self) -> None:
        data = minimal()
        data["peers"] = [
            {"name": "beta", "addresses": ["100.64.0.2"], "endpoint": "198.18.0.2:4789"}
        ]
        s = settings_from_mapping(data)
        assert settings_from_json(s.to_json()) == s
        assert s.peers[0].endpoint == Endpoint.parse("198.18.0.2:4789")

    @pytest.mark.parametrize("name", ["interface.toml", "router.toml"])
    def test_example_configs_parse(self, name: str) -> None:
        s = load_settings(ROOT / "configs" / name)
        assert isinstance(s, Settings)

    def test_router_example_says_router(self) -> None:
        assert load_settings(ROOT / "configs" / "router.toml").network.mode is Mode.ROUTER


class TestErrors:
    def test_every_problem_named_by_key_path_at_once(self) -> None:
        data = minimal()
        data["node"]["colour"] = "blue"
        data["network"]["mtu"] = "big"
        data["stages"] = {"classifier": {"workers": 0}, "overlay_io": {"ring_bytes": 1000}}
        data["peers"] = [{"name": "beta", "addresses": ["100.64.0.2"], "endpoint": "nowhere"}]
        del data["node"]["runtime_dir"]
        found = problems(data)
        assert set(found) == {
            "node.colour",
            "node.runtime_dir",
            "network.mtu",
            "stages.classifier.workers",
            "stages.overlay_io.ring_bytes",
            "peers[0].endpoint",
        }
        assert "unknown key" in found["node.colour"]
        assert "required" in found["node.runtime_dir"]
        assert "integer" in found["network.mtu"]
        assert "between 1 and 16" in found["stages.classifier.workers"]
        assert "power of two" in found["stages.overlay_io.ring_bytes"]

    def test_unknown_section_refused(self) -> None:
        data = minimal() | {"extras": {"a": 1}}
        assert "unknown key" in problems(data)["extras"]

    def test_address_outside_subnet(self) -> None:
        data = minimal()
        data["network"]["address"] = "100.65.0.1"
        assert "not in network.subnet" in problems(data)["network.address"]

    def test_peer_address_clash_and_duplicate_name(self) -> None:
        data = minimal()
        data["peers"] = [
            {"name": "alpha", "addresses": ["100.64.0.1"], "endpoint": "198.18.0.2:1"},
        ]
        found = problems(data)
        assert "duplicate" in found["peers[0].name"]
        assert "already used" in found["peers[0].addresses[0]"]

    def test_bad_enum_lists_choices(self) -> None:
        data = minimal()
        data["network"]["mode"] = "bridge"
        assert "'interface', 'router'" in problems(data)["network.mode"]

    def test_bad_types(self) -> None:
        data = minimal()
        data["network"]["subnet"] = "not-a-net"
        data["node"]["name"] = 7
        found = problems(data)
        assert "network.subnet" in found and "string" in found["node.name"]

    def test_broken_toml_is_a_config_error(self, tmp_path: Path) -> None:
        path = tmp_path / "bad.toml"
        path.write_text("[node\nname=")
        with pytest.raises(ConfigError) as info:
            load_settings(path)
        assert "not valid TOML" in str(info.value)

    def test_missing_file_is_a_config_error(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError):
            load_settings(tmp_path / "absent.toml")


def example_with_ca(tmp_path: Path, name: str = "interface.toml") -> Path:
    """An example config whose ``ca_certificate`` names a file that exists."""
    (tmp_path / "ca.crt").write_text("a CA certificate\n")
    text = (ROOT / "configs" / name).read_text()
    path = tmp_path / name
    path.write_text(text.replace('"/etc/autovn/ca.crt"', f'"{tmp_path / "ca.crt"}"'))
    return path


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor", "check-config", str(path)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )


class TestCheckConfigCommand:
    def test_prints_effective_settings(self, tmp_path: Path) -> None:
        res = check_config(example_with_ca(tmp_path))
        assert res.returncode == 0, res.stderr
        assert '"listen_port": 4789' in res.stdout

    def test_missing_ca_certificate_file(self, tmp_path: Path) -> None:
        res = check_config(ROOT / "configs/interface.toml")  # /etc/autovn/ca.crt: not here
        assert res.returncode == 1
        assert "security.ca_certificate: /etc/autovn/ca.crt does not exist" in res.stderr
        assert "Traceback" not in res.stderr

    def test_errors_exit_1_with_key_paths(self, tmp_path: Path) -> None:
        path = tmp_path / "bad.toml"
        path.write_text('[node]\nname = "x"\nbogus = 1\n')
        res = subprocess.run(
            [sys.executable, "-m", "supervisor", "check-config", str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert res.returncode == 1
        for key in ("node.bogus", "node.state_dir", "network"):
            assert key in res.stderr


class TestIssue14:
    """The configuration defects of issue 14, each as a user met it."""

    @pytest.mark.parametrize(
        ("content", "said"),
        [
            (b'[node]\nname = "caf\xe9"\n', "not UTF-8 text (byte 0xe9 on line 2)"),
            (b"\x7fELF\x02\x01\x01\x00\x00\x00" + bytes(range(256)), "a binary file"),
            (b"\xff\xfe[\x00n\x00o\x00d\x00e\x00]\x00", "a binary file"),  # UTF-16
        ],
    )
    def test_a_file_that_is_not_utf8_text_is_a_config_error(
        self, tmp_path: Path, content: bytes, said: str
    ) -> None:
        path = tmp_path / "node.toml"
        path.write_bytes(content)
        with pytest.raises(ConfigError) as info:
            load_settings(path)
        assert info.value.problems == [(str(path), info.value.problems[0][1])]
        assert said in info.value.problems[0][1]

    @pytest.mark.parametrize(
        ("text", "key"),
        [
            ('[node]\nname = "a"\nname = "b"\n', "node.name"),
            ('[node]\nname = "a"\n\n[network]\nmtu = 1400\n[node]\n', "node"),
            ('[[peers]]\nname = "x"\n "name" = "y"\n', "peers.name"),
            (
                "[stages]\nclassifier.workers = 1\nclassifier.workers = 2\n",
                "stages.classifier.workers",
            ),
        ],
    )
    def test_a_duplicate_key_is_named_by_its_path(
        self, tmp_path: Path, text: str, key: str
    ) -> None:
        path = tmp_path / "dup.toml"
        path.write_text(text)
        with pytest.raises(ConfigError) as info:
            load_settings(path)
        [(where, msg)] = info.value.problems
        assert where == key and "defined twice (line" in msg

    def test_peer_timeout_below_keepalive_refused(self) -> None:
        data = minimal()
        data["overlay"] = {"keepalive_interval_s": 2.0, "peer_timeout_s": 1.0}
        assert "at least overlay.keepalive_interval_s" in problems(data)["overlay.peer_timeout_s"]
        data["overlay"] = {"keepalive_interval_s": 2.0, "peer_timeout_s": 2.0}
        settings_from_mapping(data)

    @pytest.mark.parametrize(
        ("section", "key"),
        [
            ("node", "state_dir"),
            ("node", "runtime_dir"),
            ("security", "ca_certificate"),
            ("log", "file"),
        ],
    )
    def test_relative_paths_refused(self, section: str, key: str) -> None:
        data = minimal()
        data.setdefault(section, {})[key] = "var/autovn"
        assert "must be an absolute path" in problems(data)[f"{section}.{key}"]

    def test_a_host_name_in_bootstrap_is_explained(self) -> None:
        data = minimal()
        data["overlay"] = {"bootstrap": ["example.org:4789", "198.18.0.1"]}
        found = problems(data)
        assert found["overlay.bootstrap[0]"] == (
            "a host name is not supported, give an IPv4 address: got 'example.org:4789'"
        )
        assert "must be 'IPv4:port'" in found["overlay.bootstrap[1]"]

    @pytest.mark.parametrize(
        ("listen", "host", "port"),
        [
            ("127.0.0.1:9477", "127.0.0.1", 9477),
            ("9100", "127.0.0.1", 9100),
            ("0.0.0.0:1", "0.0.0.0", 1),
        ],
    )
    def test_metrics_listen(self, listen: str, host: str, port: int) -> None:
        assert settings_from_mapping(minimal()).metrics.listen is None  # off by default
        s = settings_from_mapping(minimal() | {"metrics": {"listen": listen}})
        assert s.metrics_endpoint == Endpoint(IPv4Address(host), port)

    def test_metrics_listen_refused(self) -> None:
        found = problems(minimal() | {"metrics": {"listen": "localhost:99999"}})
        assert "must be 'IPv4:port'" in found["metrics.listen"]

    def test_port_mapping_protocols(self) -> None:
        s = settings_from_mapping(minimal())
        assert [p.value for p in s.nat.port_mapping_protocols] == ["pcp", "nat-pmp", "upnp"]
        alone = settings_from_mapping(minimal() | {"nat": {"port_mapping_protocols": ["upnp"]}})
        assert alone.nat.port_mapping_protocols == (PortMapProtocol.UPNP,)
        assert settings_from_json(alone.to_json()) == alone

    @pytest.mark.parametrize(
        ("protocols", "found"),
        [
            ([], "at least one protocol"),
            (["upnp", "pcp", "upnp"], "twice"),
            (["igd"], "must be one of 'pcp', 'nat-pmp', 'upnp'"),
        ],
    )
    def test_port_mapping_protocols_refused(self, protocols: list[str], found: str) -> None:
        got = problems(minimal() | {"nat": {"port_mapping_protocols": protocols}})
        where = "nat.port_mapping_protocols" + ("[0]" if protocols == ["igd"] else "")
        assert found in got[where]

    def test_ciphers(self) -> None:
        s = settings_from_mapping(minimal())
        assert [c.value for c in s.security.ciphers] == ["aes-256-gcm", "chacha20-poly1305"]
        sec = minimal()["security"] | {"ciphers": ["chacha20-poly1305"]}
        alone = settings_from_mapping(minimal() | {"security": sec})
        assert alone.security.ciphers == (DataCipher.CHACHA20_POLY1305,)
        assert settings_from_json(alone.to_json()) == alone
        assert control_settings(alone).links.ciphers == (DataCipher.CHACHA20_POLY1305,)

    @pytest.mark.parametrize(
        ("ciphers", "where", "found"),
        [
            ([], "security.ciphers", "must name at least one cipher"),
            (["aes-256-gcm", "aes-256-gcm"], "security.ciphers", "names a cipher twice"),
            (
                ["aes-256-gcm", "aes-128-gcm"],
                "security.ciphers[1]",
                "must be one of 'aes-256-gcm', 'chacha20-poly1305', got 'aes-128-gcm'",
            ),
        ],
    )
    def test_ciphers_refused(self, ciphers: object, where: str, found: str) -> None:
        sec = minimal()["security"] | {"ciphers": ciphers}
        got = problems(minimal() | {"security": sec})
        assert found in got[where], got

    def test_interface_example_does_not_call_dhcp_future_work(self) -> None:
        text = (ROOT / "configs/interface.toml").read_text()
        assert "DHCP from the DHT comes later" not in text
        assert "static for now" not in text


class TestConfigErrorsInEveryCommand:
    """A config that is not UTF-8 text: one clear message and exit 1 from every command that
    reads it, never a traceback."""

    @pytest.mark.parametrize(
        "argv",
        [
            ["check-config"],
            ["start"],
            ["status"],
            ["status", "--json"],
            ["stop"],
            ["logs"],
            ["key", "show"],
            ["dht", "get", "@", "k"],
        ],
    )
    def test_binary_config(self, tmp_path: Path, argv: list[str]) -> None:
        path = tmp_path / "node.toml"
        path.write_bytes(b'[node]\nname = "\xff\xfe"\n')
        if "@" in argv:
            argv = [str(path) if a == "@" else a for a in argv]
        else:
            argv = (
                [*argv[:2], str(path), *argv[2:]]
                if argv[0] == "key"
                else [argv[0], str(path), *argv[1:]]
            )
        res = subprocess.run(
            [sys.executable, "-m", "supervisor", *argv],
            capture_output=True,
            text=True,
            check=False,
            cwd=ROOT,
            timeout=60,
        )
        assert res.returncode == 1, res.stderr
        assert "Traceback" not in res.stderr
        assert "not UTF-8 text (byte 0xff on line 2)" in res.stderr
