"""Every failure an operator meets: nothing lost, nothing stale, nothing partial.

Each case checks the exit status, the one error line, the file afterwards and that no
temporary file is left beside it.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import lab
from conftest import (
    BACKENDS,
    SCRIPT,
    STATES_STATUSALL,
    FakeVici,
    executable,
    replay,
    require_tools,
    run_collector,
)
from node_exporter import BINARY, scrape_once
from promfile import by_tunnel, value

# root without the capabilities that override file permissions
DROP_FILE_CAPABILITIES = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"]


def write_conf(tmp_path: Path, text: str = "conn %default\n    auto=add\nconn site\nconn sit\n") -> Path:
    conf = tmp_path / "ipsec.conf"
    conf.write_text(text)
    return conf


# What a failed run over write_conf()'s default config must write: README's promise, every
# tunnel that is not ignored at 3 (unknown), the ignored ones at 4, none left out.
DEFAULT_CONF_UNKNOWN = {"site": 3, "sit": 3}
# The states lab's gateway, when its daemon cannot be asked.
STATES_UNKNOWN = {name: 4 if status == 4 else 3 for name, status in lab.STATES_EXPECTED.items()}


def assert_failed_run(out: Path, statuses: dict[str, int] = DEFAULT_CONF_UNKNOWN) -> None:
    """The file says the run failed, and gives exactly these tunnels these ipsec_status values."""
    text = out.read_text()
    assert value(text, "ipsec_textfile_success") == 0
    assert by_tunnel(text, "ipsec_status") == statuses


def assert_no_temp_files(directory: Path) -> None:
    assert {p.name for p in directory.iterdir()} <= {"ipsec.prom", "ipsec.prom.lock"}


def one_error_line(proc: subprocess.CompletedProcess[str], fragment: str) -> None:
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ipsec-textfile: error: "), proc.stderr
    assert fragment in lines[0]


# ---------------------------------------------------------------- the daemon


@pytest.mark.parametrize("backend", BACKENDS)
def test_hung_charon_times_out_and_the_file_says_so(states_lab: lab.Lab, tmp_path: Path, backend: str) -> None:
    charon = states_lab.gateway.charon_pid()
    out = tmp_path / "ipsec.prom"
    os.kill(charon, signal.SIGSTOP)
    try:
        started = time.monotonic()
        proc = run_collector("--output", str(out), "--timeout", "1", "--backend", backend,
                             prefix=states_lab.gateway.nsenter())
        elapsed = time.monotonic() - started
    finally:
        os.kill(charon, signal.SIGCONT)
    assert proc.returncode == 1
    one_error_line(proc, "did not answer within 1s")
    # A fault bound: the stuck `ipsec statusall` was killed with its children after --timeout 1;
    # one left behind would hold the pipe until run_collector's 60 s. 15 s is a loaded machine's margin.
    assert elapsed < 15
    assert_failed_run(out, STATES_UNKNOWN)
    assert_no_temp_files(tmp_path)


@pytest.mark.parametrize(("reply", "close_after", "trickle", "fragment"), [
    (b"", False, None, "did not answer within 1s"),  # silent
    # A packet header promising 100 bytes, then nothing: stalled mid-packet.
    (b"\x00\x00\x00\x64\x01", False, None, "did not answer within 1s"),
    # The same, then one byte every 0.3 s: each read is served, the whole (30 s) never arrives.
    (b"\x00\x00\x00\x64\x01", False, 0.3, "did not answer within 1s"),
    # The same, then the connection closes: a short read.
    (b"\x00\x00\x00\x64\x01", True, None, "closed the connection in the middle of an answer"),
    (b"\x00\x10\x00\x00", False, None, "announced a packet of 1048576 bytes"),  # past charon's 512 KiB
    (b"\x00\x00\x00\x03\x01\x09\x00", False, None, "malformed message: element type 9"),  # a bad element
    (b"\x00\x00\x00\x07\x01" + b"\x01\x01a" * 2, False, None, "ends inside a list or section"),  # never closed
])
def test_a_vici_socket_that_stalls_or_talks_nonsense_is_a_failed_run(
        tmp_path: Path, reply: bytes, close_after: bool, trickle: float | None, fragment: str) -> None:
    sock = tmp_path / "charon.vici"
    FakeVici(sock, reply, close_after, trickle)
    out = tmp_path / "ipsec.prom"
    # The daemon that answers at once gets time enough on a loaded machine (the version
    # matrix runs several suites on 2 cores); the one that never does, 1 s.
    timeout = "1" if "did not answer" in fragment else "10"
    started = time.monotonic()
    proc = run_collector("--config", str(write_conf(tmp_path)), "--output", str(out),
                         "--backend", "vici", "--vici-socket", str(sock), "--timeout", timeout)
    # --timeout bounds the whole conversation (the trickle would last 30 s); the rest of the
    # bound is a Python start and a margin a loaded 2-core machine keeps.
    assert time.monotonic() - started < 20
    assert proc.returncode == 1
    one_error_line(proc, fragment)
    assert_failed_run(out)


def test_vici_socket_missing_is_a_failed_run(tmp_path: Path) -> None:
    out = tmp_path / "ipsec.prom"
    proc = run_collector("--config", str(write_conf(tmp_path)), "--output", str(out),
                         "--backend", "vici", "--vici-socket", str(tmp_path / "none.vici"))
    assert proc.returncode == 1
    one_error_line(proc, "cannot connect to VICI at")
    assert_failed_run(out)


def test_ipsec_command_not_executable(tmp_path: Path) -> None:
    not_exec = tmp_path / "ipsec"
    not_exec.write_text("#!/bin/sh\n")  # mode 644
    out = tmp_path / "ipsec.prom"
    proc = run_collector("--config", str(write_conf(tmp_path)), "--backend", "stroke", "--ipsec", str(not_exec),
                         "--output", str(out))
    assert proc.returncode == 1
    one_error_line(proc, f"command not executable: {not_exec}")
    assert_failed_run(out)


def truncations() -> dict[str, str]:
    text = STATES_STATUSALL.read_text()
    return {
        "before the SA section": text[: text.index("Security Associations")],
        "inside the SA section": text[: text.index("          up[1]: ESTABLISHED")],
        "garbled": "".join(random.Random(7).choice("\x00\xff{}[]:abc \n") for _ in range(2000)),
    }


@pytest.mark.parametrize("how", ["status-file", "wrapper"])
@pytest.mark.parametrize("cut", sorted(truncations()))
def test_truncated_or_garbled_output_is_a_failed_run(tmp_path: Path, how: str, cut: str) -> None:
    saved = tmp_path / "status.txt"
    saved.write_text(truncations()[cut])
    source = (["--status-file", str(saved)] if how == "status-file" else
              ["--ipsec", str(executable(tmp_path / "ipsec", f"#!/bin/sh\ncat {saved}\n"))])
    outdir = tmp_path / "textfile"
    outdir.mkdir()
    proc = run_collector("--config", str(write_conf(tmp_path)), *source, "--output", str(outdir / "ipsec.prom"))
    assert proc.returncode == 1
    one_error_line(proc, "truncated?" if cut != "garbled" else "no daemon status")
    assert_failed_run(outdir / "ipsec.prom")
    assert_no_temp_files(outdir)


# ---------------------------------------------------------------- the output


def test_missing_textfile_directory_is_not_created(tmp_path: Path) -> None:
    out = tmp_path / "missing" / "ipsec.prom"
    proc = replay(write_conf(tmp_path), out)
    assert proc.returncode == 3
    one_error_line(proc, f"directory {out.parent} does not exist")
    assert not out.parent.exists()


def in_private_mount(script: str) -> list[str]:
    """Run the collector after `script` set up mounts that only it sees."""
    require_tools("unshare", what="private mounts", root=True)
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", f'{script} && exec "$@"', "sh"]


def test_read_only_textfile_directory(tmp_path: Path) -> None:
    outdir = tmp_path / "textfile"
    outdir.mkdir()
    proc = replay(write_conf(tmp_path), outdir / "ipsec.prom",
                  prefix=in_private_mount(f"mount -t tmpfs -o ro,mode=0755 none {outdir}"))
    assert proc.returncode == 3
    one_error_line(proc, "Read-only file system")


def test_textfile_directory_not_writable_by_the_user(tmp_path: Path) -> None:
    require_tools("setpriv", what="dropping privileges", root=True)
    outdir = tmp_path / "textfile"
    outdir.mkdir()
    (outdir / "ipsec.prom").write_text("previous\n")
    outdir.chmod(0o555)
    proc = replay(write_conf(tmp_path), outdir / "ipsec.prom", prefix=DROP_FILE_CAPABILITIES)
    assert proc.returncode == 3
    one_error_line(proc, "Permission denied")
    assert (outdir / "ipsec.prom").read_text() == "previous\n"


def test_disk_full_keeps_the_previous_file(tmp_path: Path) -> None:
    outdir = tmp_path / "textfile"
    outdir.mkdir()
    # 4 KiB of tmpfs holding a small previous file and a filler that uses the rest
    script = (f"mount -t tmpfs -o size=8k,mode=0755 none {outdir} && echo previous > {outdir}/ipsec.prom && "
              f"touch {outdir}/ipsec.prom.lock && (dd if=/dev/zero of={outdir}/fill bs=1k 2>/dev/null; true)"
              f" && rm -f {outdir}/ipsec.prom.result")
    conf = write_conf(tmp_path, "conn %default\n    auto=add\n" +
                      "".join(f"conn tunnel-{i}\n" for i in range(200)))
    check = f' && cat {outdir}/ipsec.prom > {tmp_path}/after && ls {outdir} > {tmp_path}/listing'
    proc = run_collector("--config", str(conf), "--status-file", str(STATES_STATUSALL),
                         "--output", str(outdir / "ipsec.prom"),
                         prefix=["unshare", "-m", "--propagation", "private", "sh", "-c",
                                 f'{script} && "$@"; rc=$?{check}; exit $rc', "sh"])
    assert proc.returncode == 3
    one_error_line(proc, "No space left on device")
    assert (tmp_path / "after").read_text() == "previous\n"
    assert set((tmp_path / "listing").read_text().split()) == {"fill", "ipsec.prom", "ipsec.prom.lock"}


def test_output_path_that_is_a_directory(tmp_path: Path) -> None:
    out = tmp_path / "ipsec.prom"
    out.mkdir()
    proc = replay(write_conf(tmp_path), out)
    assert proc.returncode == 3
    one_error_line(proc, f"cannot write {out}")
    assert {p.name for p in tmp_path.iterdir()} == {"ipsec.conf", "ipsec.prom", "ipsec.prom.lock"}


def big_conf(tmp_path: Path, tunnels: int = 3000) -> Path:
    return write_conf(tmp_path, "conn %default\n    auto=add\n" +
                      "".join(f"conn tunnel-{i}\n    rightsubnet=10.{i // 250}.{i % 250}.0/24\n"
                              for i in range(tunnels)))


def test_overlapping_runs_never_show_a_partial_file(tmp_path: Path) -> None:
    conf = big_conf(tmp_path)
    out = tmp_path / "textfile" / "ipsec.prom"
    out.parent.mkdir()
    assert replay(conf, out).returncode == 0
    stop = threading.Event()
    bad: list[str] = []
    reads = 0

    def reader() -> None:
        nonlocal reads
        while not stop.is_set():
            text = out.read_text()
            reads += 1
            try:
                if len(by_tunnel(text, "ipsec_status")) != 3000 or value(text, "ipsec_textfile_success") != 1:
                    bad.append(text[-200:])
            except (ValueError, KeyError) as e:
                bad.append(f"{e}: {text[-200:]}")

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        # The runs take turns under the lock: the last waits for the 19 others. A bound on a
        # hang, not a speed: 600 s holds where several suites share 2 cores (tests/test_matrix.py).
        runs = [subprocess.Popen([sys.executable, str(SCRIPT), "--config", str(conf), "--status-file",
                                  str(STATES_STATUSALL), "--output", str(out), "--lock-timeout", "600"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                for _ in range(20)]
        codes = [run.wait(timeout=900) for run in runs]
    finally:
        stop.set()
        thread.join(timeout=30)
    assert codes == [0] * 20
    assert reads > 0 and bad == []
    assert_no_temp_files(out.parent)


def stop_inside_the_write(run: subprocess.Popen[bytes], directory: Path) -> str | None:
    """SIGSTOP the run once its temporary file (NAME.PID.TID) exists; that file's name if the
    stop landed between its creation and the rename, else None (the run got past it)."""
    prefix = f"ipsec.prom.{run.pid}."
    while run.poll() is None:
        temp = [p.name for p in directory.iterdir() if p.name.startswith(prefix)]
        if temp:
            run.send_signal(signal.SIGSTOP)
            # Stopped: what is there now stays there until the kill.
            return temp[0] if (directory / temp[0]).exists() else None
        time.sleep(0.001)
    return None


def test_run_killed_mid_write_leaves_the_previous_file(tmp_path: Path) -> None:
    conf = big_conf(tmp_path)
    out = tmp_path / "textfile" / "ipsec.prom"
    out.parent.mkdir()
    assert replay(conf, out).returncode == 0
    landed: list[str] = []
    # Each run opens its temporary file, then renders 3000 tunnels into it (tens of ms):
    # a poller stops it inside that window nearly every time; a run that got past is retried.
    for _ in range(20):
        run = subprocess.Popen([sys.executable, str(SCRIPT), "--config", str(conf), "--status-file",
                                str(STATES_STATUSALL), "--output", str(out)], stderr=subprocess.DEVNULL)
        temp = stop_inside_the_write(run, out.parent)
        run.kill()
        run.wait(timeout=30)
        if temp is None:
            continue
        landed.append(temp)
        text = out.read_text()
        assert len(by_tunnel(text, "ipsec_status")) == 3000 and value(text, "ipsec_textfile_success") == 1
        # What a killed run leaves: its own temporary file, nothing else; the one the
        # previous killed run left was removed before this run wrote.
        assert {p.name for p in out.parent.iterdir()} == {"ipsec.prom", "ipsec.prom.lock", temp}
        if len(landed) == 3:
            break
    assert len(landed) == 3, f"only {len(landed)} of 20 runs were stopped inside the write"
    assert replay(conf, out).returncode == 0
    assert_no_temp_files(out.parent)  # the next run removed what the last killed run left


# ---------------------------------------------------------------- bad input


def test_empty_config_reports_no_tunnels_and_succeeds(tmp_path: Path) -> None:
    out = tmp_path / "ipsec.prom"
    proc = replay(write_conf(tmp_path, ""), out)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert by_tunnel(out.read_text(), "ipsec_status") == {}
    assert value(out.read_text(), "ipsec_textfile_success") == 1


@pytest.mark.parametrize("text, fragment", [
    (b"\x00\xff\xfe binary", "not UTF-8"),
    (b"conn a\n    also=b\nconn b\n    also=a\n", "causes a loop"),
    (b"conn a\n    also=missing\n", "'missing' referenced in section 'a' not found"),
])
def test_bad_config_is_a_failed_run_without_tunnels(tmp_path: Path, text: bytes, fragment: str) -> None:
    conf = tmp_path / "ipsec.conf"
    conf.write_bytes(text)
    out = tmp_path / "ipsec.prom"
    proc = replay(conf, out)
    assert proc.returncode == 1
    one_error_line(proc, fragment)
    assert_failed_run(out, {})  # the config could not be read: no tunnel is known


def test_unreadable_config_for_an_unprivileged_run(tmp_path: Path) -> None:
    require_tools("setpriv", what="dropping privileges", root=True)
    conf = write_conf(tmp_path)
    conf.chmod(0)
    out = tmp_path / "ipsec.prom"
    proc = replay(conf, out, prefix=DROP_FILE_CAPABILITIES)
    assert proc.returncode == 1
    one_error_line(proc, f"cannot read {conf}: Permission denied")
    assert_failed_run(out, {})


def test_ten_thousand_conns_in_ten_megabytes(tmp_path: Path) -> None:
    body = "".join(
        f"conn tunnel-{i}\n\tleft=10.0.0.1\n  right = 10.{i // 250 % 250}.{i % 250}.1   # peer {i}\n"
        f"    leftsubnet=10.1.0.0/16\n    rightsubnet=10.{i % 200}.{i % 250}.0/24\n"
        f"    leftid=@gateway.example.com\n    rightid=@peer-{i}.example.com\n"
        f"    ike=aes256-sha256-modp2048!\n    esp=aes256-sha256!\n" + "    # " + "x" * 850 + "\n"
        for i in range(10_000)
    )
    conf = write_conf(tmp_path, "conn %default\n    auto=add\n" + body)
    assert conf.stat().st_size > 10_000_000
    out = tmp_path / "ipsec.prom"
    proc = replay(conf, out)
    assert proc.returncode == 0
    statuses = by_tunnel(out.read_text(), "ipsec_status")
    assert len(statuses) == 10_000
    assert statuses["tunnel-0"] == 2


ODD_NAMES = ['quo"te', "back\\slash", "with space", "ünïcødé-トンネル", "new\nline", "tab\there"]


def odd_names_conf(tmp_path: Path) -> Path:
    escaped = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t"}
    sections = "".join('conn "' + "".join(escaped.get(c, c) for c in name) + '"\n    auto=add\n'
                       for name in ODD_NAMES)
    return write_conf(tmp_path, sections)


def test_odd_names_are_escaped_labels_that_round_trip(tmp_path: Path) -> None:
    out = tmp_path / "ipsec.prom"
    assert replay(odd_names_conf(tmp_path), out).returncode == 0
    assert by_tunnel(out.read_text(), "ipsec_status") == dict.fromkeys(ODD_NAMES, 2)
    require_tools("promtool", what="checking metrics")
    check = subprocess.run(["promtool", "check", "metrics"], input=out.read_text(), capture_output=True,
                           text=True, timeout=30, check=False)
    assert check.returncode == 0, check.stdout + check.stderr


def test_node_exporter_serves_odd_names(tmp_path: Path) -> None:
    require_tools(BINARY, what="node_exporter end to end")
    outdir = tmp_path / "textfile"
    outdir.mkdir()
    # A CRLF config gives a name ending in \r (starter keeps it): served as it is.
    conf = odd_names_conf(tmp_path)
    conf.write_text(conf.read_text() + "conn crlf\r\n")
    assert replay(conf, outdir / "ipsec.prom").returncode == 0
    served = scrape_once(outdir)
    assert 'ipsec_status{tunnel="crlf\r"} 4\n' in served  # no auto: ignored
    # prometheus_client's own parser cannot read a raw \r; Prometheus and promtool can.
    parseable = "\n".join(line for line in served.split("\n") if "\r" not in line)
    assert by_tunnel(parseable, "ipsec_status") == dict.fromkeys(ODD_NAMES, 2)
    families = {f.name: f for f in text_string_to_metric_families(parseable)}
    assert families["node_textfile_scrape_error"].samples[0].value == 0


def test_config_contents_never_reach_a_command_line(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    conf = write_conf(tmp_path, f'conn "$(touch {marker})"\n    auto=add\nconn "`touch {marker}`"\n    auto=add\n')
    argv_log = tmp_path / "argv"
    wrapper = executable(tmp_path / "ipsec", f'#!/bin/sh\nprintf "%s\\n" "$@" >> {argv_log}\ncat {STATES_STATUSALL}\n')
    proc = run_collector("--config", str(conf), "--ipsec", str(wrapper), "--output", "-")
    assert proc.returncode == 0
    assert argv_log.read_text() == "statusall\nlistall\n--utc\n"
    assert not marker.exists()
