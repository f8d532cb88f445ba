"""Shared fixtures: the real strongSwan lab and a way to run the collector as users do."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
SCRIPT = ROOT / "ipsec_textfile.py"
FIXTURES = TESTS / "fixtures"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(TESTS))

import lab

# The two ways to ask charon.
BACKENDS = ["stroke", "vici"]


def require(missing: list[str], what: str) -> None:
    """Skip a test whose tools are missing, except in CI, where that is a failure."""
    if not missing:
        return
    message = f"{what} needs: {', '.join(missing)}"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def run_collector(
    *args: str, prefix: list[str] | None = None, umask: int | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ipsec_textfile.py as cron would: a fresh process, its exit status and stderr."""
    def set_umask() -> None:
        if umask is not None:
            os.umask(umask)

    return subprocess.run(
        [*(prefix or []), sys.executable, str(SCRIPT), *args],
        capture_output=True, text=True, timeout=timeout, check=False, preexec_fn=set_umask,
    )


def running_lab(start: Callable[[Path], lab.Lab], factory: pytest.TempPathFactory) -> Iterator[lab.Lab]:
    """A lab from start(), for as long as the fixture that yields from this lives."""
    require(lab.missing_tools(), "the strongSwan lab")
    started = start(factory.mktemp("lab"))
    yield started
    started.destroy()


@pytest.fixture(scope="session")
def states_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[lab.Lab]:
    """The lab whose gateway shows every ipsec_status value (see lab.STATES_GATEWAY_CONF)."""
    yield from running_lab(lab.start_states_lab, tmp_path_factory)
