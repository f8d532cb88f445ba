"""The script as cron runs it: exit status, stderr, and the file node_exporter reads."""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, STATES_STATUSALL, executable, replay, require, require_tools, run_collector
from promfile import by_tunnel, samples, value

CONF = """\
conn %default
    auto=add
conn site
conn sit
conn ike
conn connecting
conn "a.b_c-d"
conn ignored
    auto=ignore
"""
EXPECTED = {"site": 0, "sit": 2, "ike": 1, "connecting": 3, "a.b_c-d": 0, "ignored": 4}


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    path = tmp_path / "ipsec.conf"
    path.write_text(CONF)
    return path


def test_replay_writes_every_tunnel_and_success(conf: Path, tmp_path: Path) -> None:
    out = tmp_path / "ipsec.prom"
    proc = replay(conf, str(out))
    assert (proc.returncode, proc.stderr) == (0, "")
    text = out.read_text()
    assert by_tunnel(text, "ipsec_status") == EXPECTED
    assert value(text, "ipsec_textfile_success") == 1
    assert value(text, "ipsec_textfile_duration_seconds") > 0
    assert abs(value(text, "ipsec_textfile_last_run_timestamp_seconds") - os.path.getmtime(out)) < 60


# strongSwan's ike_sa_state names (src/libcharon/sa/ike_sa.h).
IKE_SA_STATES = ["CREATED", "CONNECTING", "ESTABLISHED", "PASSIVE", "REKEYING", "REKEYED", "DELETING", "DESTROYING"]


def test_ike_sas_by_state_every_state_always_present(conf: Path, tmp_path: Path) -> None:
    out = tmp_path / "ipsec.prom"
    assert replay(conf, str(out)).returncode == 0
    by_state = {dict(labels)["state"]: v for (name, labels), v in samples(out.read_text()).items()
                if name == "ipsec_ike_sas"}
    # The capture holds up's and ike's IKE SAs ESTABLISHED and connecting's CONNECTING.
    assert by_state == {**dict.fromkeys(IKE_SA_STATES, 0), "ESTABLISHED": 2, "CONNECTING": 1}


def test_ike_established_is_whether_the_carrying_ike_sa_is(conf: Path, tmp_path: Path) -> None:
    out = tmp_path / "ipsec.prom"
    assert replay(conf, str(out)).returncode == 0
    # site and a.b_c-d ride on up's ESTABLISHED IKE SA, ike has its own; connecting's is
    # CONNECTING, sit has none; ignored tunnels get ipsec_status alone.
    assert by_tunnel(out.read_text(), "ipsec_ike_established") == {
        "site": 1, "a.b_c-d": 1, "ike": 1, "connecting": 0, "sit": 0}


def test_output_dash_prints_the_exposition(conf: Path) -> None:
    proc = replay(conf, "-")
    assert proc.returncode == 0
    assert by_tunnel(proc.stdout, "ipsec_status") == EXPECTED
    assert "# HELP ipsec_status " in proc.stdout and "# TYPE ipsec_status gauge" in proc.stdout


def test_counters_are_counters_without_created_series(conf: Path) -> None:
    text = replay(conf, "-").stdout
    for name in ("ipsec_in_bytes", "ipsec_out_bytes", "ipsec_in_packets", "ipsec_out_packets"):
        assert f"# TYPE {name}_total counter" in text or f"# TYPE {name} counter" in text
        assert by_tunnel(text, f"{name}_total")
    assert "_created" not in text
    # Ignored tunnels carry their status only, no figures.
    assert "ignored" not in by_tunnel(text, "ipsec_in_bytes_total")


def test_file_is_world_readable_under_umask_077_and_no_temp_file_left(conf: Path, tmp_path: Path) -> None:
    out = tmp_path / "textfile" / "ipsec.prom"
    out.parent.mkdir()
    proc = replay(conf, str(out), umask=0o077)
    assert proc.returncode == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert sorted(p.name for p in out.parent.iterdir()) == ["ipsec.prom", "ipsec.prom.lock"]


def test_a_run_that_cannot_get_the_lock_leaves_the_file_alone(conf: Path, tmp_path: Path) -> None:
    out = tmp_path / "ipsec.prom"
    out.write_text("previous\n")
    lock = os.open(str(out) + ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as an overlapping run holds it
        proc = replay(conf, str(out), "--lock-timeout", "0.5")
    finally:
        os.close(lock)
    assert proc.returncode == 3
    assert f"{out}.lock" in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert out.read_text() == "previous\n"


def test_bad_config_replaces_the_file_with_a_failed_run(tmp_path: Path) -> None:
    out = tmp_path / "ipsec.prom"
    good = tmp_path / "good.conf"
    good.write_text(CONF)
    assert replay(good, str(out)).returncode == 0
    bad = tmp_path / "bad.conf"
    bad.write_text("conn a\nauto=add\n")
    proc = replay(bad, str(out))
    assert proc.returncode == 1
    assert proc.stderr == f"ipsec-textfile: error: {bad}:2: syntax error, unexpected STRING\n"
    text = out.read_text()
    assert value(text, "ipsec_textfile_success") == 0
    assert by_tunnel(text, "ipsec_status") == {}  # nothing stale left claiming health


@pytest.mark.parametrize(("backend", "error"), [
    ("stroke", "command not found: {tmp}/no-such-ipsec"),
    # auto: neither way to ask exists, and the one error names both
    ("auto", ("no IKE daemon to ask: cannot connect to VICI at {tmp}/no.vici: No such file or directory, "
              "and no `{tmp}/no-such-ipsec` command for stroke")),
])
def test_daemon_that_cannot_be_asked_reports_no_tunnel_up(
        conf: Path, tmp_path: Path, backend: str, error: str) -> None:
    out = tmp_path / "ipsec.prom"
    proc = run_collector("--config", str(conf), "--backend", backend, "--ipsec", str(tmp_path / "no-such-ipsec"),
                         "--vici-socket", str(tmp_path / "no.vici"), "--output", str(out))
    assert proc.returncode == 1
    assert proc.stderr == "ipsec-textfile: error: " + error.format(tmp=tmp_path) + "\n"
    text = out.read_text()
    assert value(text, "ipsec_textfile_success") == 0
    assert by_tunnel(text, "ipsec_status") == {
        name: (4 if code == 4 else 3) for name, code in EXPECTED.items()}


def test_daemon_that_does_not_answer_in_time(conf: Path, tmp_path: Path) -> None:
    slow = executable(tmp_path / "slow-ipsec", "#!/bin/sh\nexec sleep 30\n")
    proc = run_collector("--config", str(conf), "--ipsec", str(slow), "--timeout", "0.5",
                         "--output", str(tmp_path / "ipsec.prom"))
    assert proc.returncode == 1
    assert "did not answer within 0.5s" in proc.stderr


def test_charon_not_running_is_an_error_not_an_empty_gateway(conf: Path, tmp_path: Path) -> None:
    # A private, empty /run: the real `ipsec` command finds no charon.
    require_tools("ipsec", "unshare", what="running ipsec without a daemon", root=True)
    out = tmp_path / "ipsec.prom"
    proc = run_collector("--config", str(conf), "--output", str(out),
                         prefix=["unshare", "-m", "--propagation", "private", "sh", "-c",
                                 'mount -t tmpfs none /run && exec "$@"', "sh"])
    assert proc.returncode == 1
    assert "ipsec statusall` gave no usable daemon status" in proc.stderr
    assert "is charon running?" in proc.stderr
    # README: every tunnel that is not ignored at 3, none left out.
    assert by_tunnel(out.read_text(), "ipsec_status") == {n: 4 if v == 4 else 3 for n, v in EXPECTED.items()}


def test_readme_sample_output_is_what_the_replay_it_names_prints() -> None:
    readme = (ROOT / "README.md").read_text()
    intro = readme.index("Sample output, from a checkout: `python3 ipsec_textfile.py --config")
    command = " ".join(readme[intro:].split("`")[1].split())
    block = readme.index("```\n", intro) + 4
    sample = readme[block : readme.index("```\n", block)].splitlines()
    args = command.split()[2:]
    assert args[-2:] == ["--output", "-"]
    printed = iter(run_collector(*[str(ROOT / a) if a.startswith("tests/") else a for a in args]).stdout.splitlines())
    shown = 0
    for line in sample:
        if line == "…":
            continue
        # Every other line, in order: verbatim, or up to a value that moves with the clock.
        prefix = line[: -len("…")] if line.endswith(" …") else None
        assert any(p == line or (prefix is not None and p.startswith(prefix)) for p in printed), line
        shown += 1
    assert shown > 40


def test_help_explains_flags_values_and_cron() -> None:
    proc = run_collector("--help")
    assert proc.returncode == 0
    for word in ("--config", "--output", "--ipsec", "--timeout", "--status-file",
                 "--lock-timeout", "ipsec_status", "ignored", "* * * * * root"):
        assert word in proc.stdout


def test_installed_console_script_behaves_like_the_checkout(conf: Path) -> None:
    installed = shutil.which("ipsec-textfile")
    require([] if installed else ["ipsec-textfile on PATH (pip install .)"], "the console script")
    assert installed is not None
    proc = subprocess.run([installed, "--config", str(conf), "--status-file", str(STATES_STATUSALL),
                           "--output", "-"], capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0
    checkout = replay(conf, "-")
    # All but the run's own timings and the daemon's uptime, which move with the clock.
    timed = ("ipsec_textfile_", "ipsec_daemon_uptime_seconds ")
    strip = [line for line in proc.stdout.splitlines() if not line.startswith(timed)]
    assert strip == [line for line in checkout.stdout.splitlines() if not line.startswith(timed)]


def test_promtool_accepts_the_file(conf: Path, tmp_path: Path) -> None:
    require_tools("promtool", what="checking metrics")
    out = tmp_path / "ipsec.prom"
    assert replay(conf, str(out)).returncode == 0
    check = subprocess.run(["promtool", "check", "metrics"], input=out.read_text(),
                           capture_output=True, text=True, timeout=30, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
