"""Shared fixtures: namespace testbeds that are always removed, pass or fail."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest
from hypothesis import settings

from supervisor.testbed import Testbed, leftover_namespaces, require_root
from supervisor.testbed.nat import missing_programs

# Property tests check what code does, not how fast: on a busy machine (CI shares its cores)
# one slow example must not fail a run, so there is no per-example deadline.
settings.register_profile("autovn", deadline=None)
# Long fuzzing runs (tests/test_fuzz.py takes the larger of its own count and this one):
# AUTOVN_HYPOTHESIS_PROFILE=fuzz-long, AUTOVN_FUZZ_EXAMPLES examples per target.
settings.register_profile(
    "fuzz-long",
    parent=settings.get_profile("autovn"),
    max_examples=int(os.environ.get("AUTOVN_FUZZ_EXAMPLES", "20000")),
)
settings.load_profile(os.environ.get("AUTOVN_HYPOTHESIS_PROFILE", "autovn"))


def require_netns() -> None:
    """Skip without root/iproute2, but fail under CI, which runs as root and must run them."""
    reason = require_root()
    if reason is None and shutil.which("ping") is None:
        reason = "iputils-ping not installed"
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"netns tests cannot run under CI: {reason}")
        pytest.skip(reason)


@pytest.fixture
def testbed() -> Iterator[Testbed]:
    """A fresh namespace testbed, closed (and checked empty) after the test."""
    require_netns()
    tb = Testbed(prefix="avnt")
    try:
        yield tb
    finally:
        tb.close()
    left = leftover_namespaces(tb.run_id)
    assert not left, f"namespaces left behind: {left}"


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Every test marked ``netns`` needs root and iproute2 (checked before its fixtures)."""
    if item.get_closest_marker("netns") is not None:
        require_netns()


@pytest.fixture
def nat_testbed(testbed: Testbed) -> Testbed:
    """A testbed for the NAT lab: its Debian packages present (under CI: must be)."""
    missing = missing_programs()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"the NAT lab needs Debian packages: {missing}")
        pytest.skip(f"the NAT lab needs Debian packages: {missing}")
    return testbed
