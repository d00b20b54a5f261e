"""Configuration: TOML into frozen settings, every error by its key path, all at once."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import (
    Endpoint,
    Mode,
    Settings,
    load_settings,
    settings_from_json,
    settings_from_mapping,
)
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
        with pytest.raises(dataclasses.FrozenInstanceError):
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


class TestCheckConfigCommand:
    def test_prints_effective_settings(self) -> None:
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "supervisor",
                "check-config",
                str(ROOT / "configs/interface.toml"),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert res.returncode == 0
        assert '"listen_port": 4789' in res.stdout

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
