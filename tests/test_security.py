"""The root job cannot be steered by node_exporter's user.

On Debian the textfile directory /var/lib/prometheus/node-exporter is root's, but its
parent belongs to `prometheus`, the user node_exporter runs as. Every attack here is
performed by that real unprivileged user (setpriv drops to it; no root pretending), against
a copy of that layout, and a root-only file outside stands for /etc/shadow: after each run
it must be byte for byte what it was, and nothing may appear outside the textfile directory.
The matrix (tests/test_matrix.py) runs this file with the oldest and newest supported
prometheus_client.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import FIXTURES, SCRIPT, STATES_STATUSALL, replay, require

ATTACKER = "prometheus"  # the user Debian's prometheus-node-exporter runs as
STATES_CONF = FIXTURES / "states" / "etc" / "ipsec.conf"


def attacker_missing() -> list[str]:
    missing = [] if shutil.which("setpriv") else ["setpriv (util-linux)"]
    try:
        pwd.getpwnam(ATTACKER)
    except KeyError:
        missing.append(f"the user {ATTACKER} (prometheus-node-exporter)")
    if os.geteuid() != 0:
        missing.append("root")
    return missing


def as_attacker(*command: str) -> None:
    """Run one command as the unprivileged user, with its own uid, gid and no other group."""
    subprocess.run(["setpriv", f"--reuid={ATTACKER}", f"--regid={ATTACKER}", "--clear-groups", "--",
                    *command], check=True, timeout=30, capture_output=True)


@dataclass
class Gateway:
    """/var/lib/prometheus (the attacker's) holding node-exporter (root's), and /etc/shadow."""

    base: Path

    @property
    def parent(self) -> Path:
        return self.base / "prometheus"

    @property
    def textfile_dir(self) -> Path:
        return self.parent / "node-exporter"

    @property
    def output(self) -> Path:
        return self.textfile_dir / "ipsec.prom"

    @property
    def victim(self) -> Path:
        return self.base / "shadow"

    def snapshot(self) -> dict[str, tuple[str, bytes | str]]:
        """Everything below base, links as their targets: what an attack may not change."""
        seen: dict[str, tuple[str, bytes | str]] = {}
        for path in sorted(self.base.rglob("*")):
            key = str(path.relative_to(self.base))
            if path.is_symlink():
                seen[key] = ("link", os.readlink(path))
            elif path.is_file():
                seen[key] = ("file", path.read_bytes())
            else:
                seen[key] = ("dir", oct(path.stat().st_mode))
        return seen

    def swap_directory(self, away: str = "away") -> Path:
        """The attack of the issue: rename the textfile directory away, make one's own."""
        as_attacker("mv", str(self.textfile_dir), str(self.parent / away))
        as_attacker("mkdir", str(self.textfile_dir))
        return self.parent / away


@pytest.fixture
def gateway() -> Iterator[Gateway]:
    require(attacker_missing(), "the attacker tests")
    # Not under pytest's tmp_path: its parents are root's 0700 and the attacker must reach in.
    base = Path(tempfile.mkdtemp(prefix="ipsec-textfile-attack-"))
    try:
        base.chmod(0o755)
        gw = Gateway(base)
        gw.parent.mkdir()
        shutil.chown(gw.parent, ATTACKER, ATTACKER)
        gw.textfile_dir.mkdir(mode=0o755)
        gw.victim.write_bytes(b"root:$6$secret:19000:0:99999:7:::\n")
        gw.victim.chmod(0o600)
        yield gw
    finally:
        shutil.rmtree(base)


def assert_refused(proc: subprocess.CompletedProcess[str], why: str,
                   fix: str = "fix with: chown root:root") -> None:
    """Exit 3 (file untouched) and one line that says why and how to put it right."""
    assert proc.returncode == 3, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "refusing to write into" in lines[0], proc.stderr
    assert why in lines[0] and fix in lines[0], proc.stderr


def collect(gw: Gateway) -> subprocess.CompletedProcess[str]:
    return replay(STATES_CONF, gw.output)


def test_the_untouched_layout_is_written(gateway: Gateway) -> None:
    # The parent being another user's is Debian's normal layout, not a reason to refuse.
    proc = collect(gateway)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert 'ipsec_status{tunnel="up"} 0.0' in gateway.output.read_text()


# What the attacker plants in the directory it swapped in: (name, link target or None for a
# directory). The temporary names follow write_to_textfile's NAME.PID.TID, which also makes
# the run's clean-up of leftovers look at them.
PLANTED = {
    "linked lock (the reported attack)": [("ipsec.prom.lock", "shadow")],
    "linked temporary files": [(f"ipsec.prom.{pid}.{tid}", "shadow")
                               for pid in (1, 4242, 99999) for tid in (1, 140000000000000)],
    "linked .prom": [("ipsec.prom", "shadow")],
    "directory .prom": [("ipsec.prom", None)],
    "everything at once": [("ipsec.prom.lock", "shadow"), ("ipsec.prom", "shadow"),
                           ("ipsec.prom.1.1", "shadow")],
}


def plant(gw: Gateway, entries: list[tuple[str, str | None]]) -> None:
    for name, target in entries:
        if target is None:
            as_attacker("mkdir", str(gw.textfile_dir / name))
        else:
            as_attacker("ln", "-s", str(gw.base / target), str(gw.textfile_dir / name))


@pytest.mark.parametrize("planted", PLANTED)
def test_a_directory_swapped_in_by_the_attacker_is_refused(gateway: Gateway, planted: str) -> None:
    gateway.swap_directory()
    plant(gateway, PLANTED[planted])
    before = gateway.snapshot()
    assert_refused(collect(gateway), f"owned by uid {pwd.getpwnam(ATTACKER).pw_uid}")
    assert gateway.snapshot() == before


def test_a_directory_swapped_between_two_runs_is_refused(gateway: Gateway) -> None:
    assert collect(gateway).returncode == 0
    away = gateway.swap_directory()
    plant(gateway, PLANTED["everything at once"])
    before = gateway.snapshot()
    assert_refused(collect(gateway), "owned by uid")
    assert gateway.snapshot() == before
    assert (away / "ipsec.prom").exists()


def test_a_link_in_place_of_the_directory_is_refused(gateway: Gateway) -> None:
    # A root-owned directory elsewhere would pass the ownership check: the link itself must not.
    elsewhere = gateway.base / "elsewhere"
    elsewhere.mkdir(mode=0o755)
    as_attacker("mv", str(gateway.textfile_dir), str(gateway.parent / "away"))
    as_attacker("ln", "-s", str(elsewhere), str(gateway.textfile_dir))
    before = gateway.snapshot()
    assert_refused(collect(gateway), "symbolic link", "point --output at the real textfile directory")
    assert gateway.snapshot() == before
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("mode, group", [(0o775, ATTACKER), (0o777, None), (0o1777, None)])
def test_a_directory_others_can_write_is_refused(gateway: Gateway, mode: int, group: str | None) -> None:
    if group is not None:
        shutil.chown(gateway.textfile_dir, group=group)
    gateway.textfile_dir.chmod(mode)
    # setpriv gives the attacker its own primary group: the group that may write here.
    plant(gateway, PLANTED["everything at once"])
    before = gateway.snapshot()
    assert_refused(collect(gateway), "writable by group or others")
    assert gateway.snapshot() == before


def test_a_directory_swapped_during_a_run_is_not_written_to(gateway: Gateway) -> None:
    # The run checks and opens the directory, then waits for the lock an earlier run holds;
    # the attacker swaps the directory meanwhile. The run must write into the one it checked.
    assert collect(gateway).returncode == 0
    held = os.open(str(gateway.output) + ".lock", os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)  # as an overlapping run holds it
    try:
        run = subprocess.Popen([sys.executable, str(SCRIPT), "--config", str(STATES_CONF), "--status-file",
                                str(STATES_STATUSALL), "--output", str(gateway.output),
                                "--lock-timeout", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
        wait_until_open(run.pid, gateway.textfile_dir)
        away = gateway.swap_directory()
        plant(gateway, PLANTED["everything at once"])
        stamp = (away / "ipsec.prom").stat().st_mtime_ns
        before = {k: v for k, v in gateway.snapshot().items() if not k.startswith("prometheus/away")}
    finally:
        os.close(held)
    _, stderr = run.communicate(timeout=60)
    assert (run.returncode, stderr) == (0, "")
    assert {k: v for k, v in gateway.snapshot().items() if not k.startswith("prometheus/away")} == before
    assert (away / "ipsec.prom").stat().st_mtime_ns > stamp


def wait_until_open(pid: int, directory: Path) -> None:
    """Until process pid holds directory open (the collector's checked handle)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == str(directory):
                    return
            except FileNotFoundError:
                pass
        time.sleep(0.01)
    raise TimeoutError(f"process {pid} never opened {directory}")
