"""Shared fixtures: the real strongSwan lab and a way to run the collector as users do."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
SCRIPT = ROOT / "ipsec_textfile.py"
FIXTURES = TESTS / "fixtures"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(TESTS))

import ipsec_textfile
import lab

# The two ways to ask charon.
BACKENDS = ["stroke", "vici"]
# The ipsec.conf gateway's `ipsec statusall`, captured from the lab (fixtures/states/CAPTURE.md).
STATES_STATUSALL = FIXTURES / "states" / "statusall.txt"


def require(missing: list[str], what: str) -> None:
    """Skip a test whose tools are missing, except in CI, where that is a failure."""
    if not missing:
        return
    message = f"{what} needs: {', '.join(missing)}"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Outside CI, say in one line that tests were skipped (-ra lists which, and why)."""
    skipped = len(terminalreporter.stats.get("skipped", []))
    if skipped and os.environ.get("CI") != "true":
        terminalreporter.write_line(f"{skipped} tests skipped, each with its reason in the summary; "
                                    "with CI=true a missing tool or root would fail them", yellow=True, bold=True)


def require_tools(*tools: str, what: str, root: bool = False) -> None:
    """require() for commands on PATH, and root when asked."""
    require([t for t in tools if not shutil.which(t)] + (["root"] if root and os.geteuid() != 0 else []), what)


class FakeVici:
    """A VICI socket with one client, which sends its questions at once: they are answered
    with `reply` (after `delay` seconds). Then, with close_after, it hangs up; with trickle, it sends one more byte
    every `trickle` seconds for as long as the client listens; else it stays silent until the
    client leaves."""

    def __init__(self, path: Path, reply: bytes, close_after: bool = False, trickle: float | None = None,
                 delay: float = 0) -> None:
        self.reply, self.close_after, self.trickle, self.delay = reply, close_after, trickle, delay
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(1)
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        try:
            client, _ = self.server.accept()
            with client:
                if client.recv(65536):
                    time.sleep(self.delay)
                    client.sendall(self.reply)
                    if self.close_after:
                        return
                    while self.trickle is not None:
                        time.sleep(self.trickle)
                        client.sendall(b"\x00")
                while client.recv(65536):
                    pass
        except OSError:
            pass
        finally:
            self.server.close()

    def close(self) -> None:
        self.server.close()


def vici_answer(fixture: Path) -> dict[str, Any]:
    """What the built-in VICI client reads from the bytes charon sent in a capture (vici.bin):
    the whole stream, replayed on a socket to ipsec_textfile.ViciDaemon.send_questions()."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "charon.vici"
        fake = FakeVici(path, (fixture / "vici.bin").read_bytes())
        try:
            return ipsec_textfile.ViciDaemon(str(path), timeout=30).send_questions(time.monotonic() + 30)()
        finally:
            fake.close()


def vici_packets(fixture: Path) -> list[bytes]:
    """The packets charon sent in a capture, each as it came: type, name and message."""
    data = (fixture / "vici.bin").read_bytes()
    packets, pos = [], 0
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        packets.append(data[pos + 4 : pos + 4 + length])
        pos += 4 + length
    assert pos == len(data), "a packet cut short"
    return packets


def replay(conf: Path, output: Path | str, *more: str, status: Path = STATES_STATUSALL,
           prefix: list[str] | None = None, umask: int | None = None) -> subprocess.CompletedProcess[str]:
    """The collector on a saved daemon answer (--status-file) instead of a live daemon."""
    return run_collector("--config", str(conf), "--status-file", str(status), "--output", str(output), *more,
                         prefix=prefix, umask=umask)


def executable(path: Path, script: str) -> Path:
    """A script at path, mode 755: a stand-in for a command (`ipsec`, most often)."""
    path.write_text(script)
    path.chmod(0o755)
    return path


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


class Destroyable(Protocol):
    def destroy(self) -> None: ...


LabT = TypeVar("LabT", bound=Destroyable)


@contextmanager
def running_lab(start: Callable[[Path], LabT], factory: pytest.TempPathFactory,
                missing: Callable[[], list[str]] = lab.missing_tools, what: str = "the strongSwan lab"
                ) -> Iterator[LabT]:
    """A lab from start(), destroyed when the block ends, however it ends."""
    require(missing(), what)
    started = start(factory.mktemp("lab"))
    try:
        yield started
    finally:
        started.destroy()


@pytest.fixture(scope="session")
def states_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[lab.Lab]:
    """The lab whose gateway shows every ipsec_status value (see lab.STATES_GATEWAY_CONF)."""
    with running_lab(lab.start_states_lab, tmp_path_factory) as states:
        yield states
