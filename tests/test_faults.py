"""Every failure an operator meets: nothing lost, nothing stale, nothing partial.

Each case checks the exit status, the one error line, the file afterwards and that no
temporary file is left beside it.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import lab
from conftest import BACKENDS, FIXTURES, SCRIPT, require, run_collector
from node_exporter import BINARY, scrape_once
from promfile import by_tunnel, value

STATUSALL = FIXTURES / "states" / "statusall.txt"


def write_conf(tmp_path: Path, text: str = "conn %default\n    auto=add\nconn site\nconn sit\n") -> Path:
    conf = tmp_path / "ipsec.conf"
    conf.write_text(text)
    return conf


def assert_failed_run(out: Path) -> None:
    """The file says the run failed and claims no tunnel up."""
    text = out.read_text()
    assert value(text, "ipsec_textfile_success") == 0
    assert 0 not in by_tunnel(text, "ipsec_status").values()


def assert_no_temp_files(directory: Path) -> None:
    assert {p.name for p in directory.iterdir()} <= {"ipsec.prom", "ipsec.prom.lock"}


def one_error_line(proc: subprocess.CompletedProcess[str], fragment: str) -> None:
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ipsec-textfile: error: "), proc.stderr
    assert fragment in lines[0]


def executable(path: Path, script: str) -> Path:
    path.write_text(script)
    path.chmod(0o755)
    return path


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
    assert elapsed < 15  # the stuck stroke child was killed with its parent
    assert_failed_run(out)
    assert_no_temp_files(tmp_path)


def fake_vici(path: Path, reply: bytes, stall: float = 5) -> threading.Thread:
    """A VICI socket that accepts one client, reads its first request, sends reply, stalls
    for `stall` seconds and closes."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def serve() -> None:
        client, _ = server.accept()
        client.recv(65536)
        client.sendall(reply)
        time.sleep(stall)
        client.close()
        server.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize(("reply", "stall", "fragment"), [
    (b"", 5, "did not answer within 1s"),  # silent
    # A packet header promising 100 bytes, then nothing: stalled mid-packet.
    (b"\x00\x00\x00\x64\x01", 5, "did not answer within 1s"),
    # The same, then the connection closes: a short read.
    (b"\x00\x00\x00\x64\x01", 0, "closed the connection in the middle of an answer"),
    (b"\x00\x10\x00\x00", 5, "announced a packet of 1048576 bytes"),  # past charon's 512 KiB
    (b"\x00\x00\x00\x03\x01\x09\x00", 5, "malformed message: element type 9"),  # a response with a bad element
    (b"\x00\x00\x00\x07\x01" + b"\x01\x01a" * 2, 5, "ends inside a list or section"),  # never closed
])
def test_a_vici_socket_that_stalls_or_talks_nonsense_is_a_failed_run(
        tmp_path: Path, reply: bytes, stall: float, fragment: str) -> None:
    sock = tmp_path / "charon.vici"
    fake_vici(sock, reply, stall)
    out = tmp_path / "ipsec.prom"
    started = time.monotonic()
    proc = run_collector("--config", str(write_conf(tmp_path)), "--output", str(out),
                         "--backend", "vici", "--vici-socket", str(sock), "--timeout", "1")
    assert time.monotonic() - started < 4
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
    not_exec.write_text("#!/bin/sh\n")
    out = tmp_path / "ipsec.prom"
    proc = run_collector("--config", str(write_conf(tmp_path)), "--backend", "stroke", "--ipsec", str(not_exec),
                         "--output", str(out))
    assert proc.returncode == 1
    one_error_line(proc, f"command not executable: {not_exec}")
    assert_failed_run(out)


def truncations() -> dict[str, str]:
    text = STATUSALL.read_text()
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


def replay(conf: Path, out: Path, *prefix: str) -> subprocess.CompletedProcess[str]:
    return run_collector("--config", str(conf), "--status-file", str(STATUSALL), "--output", str(out),
                         "--lock-timeout", "2", prefix=list(prefix))


def test_missing_textfile_directory_is_not_created(tmp_path: Path) -> None:
    out = tmp_path / "missing" / "ipsec.prom"
    proc = replay(write_conf(tmp_path), out)
    assert proc.returncode == 3
    one_error_line(proc, f"directory {out.parent} does not exist")
    assert not out.parent.exists()


def in_private_mount(script: str) -> list[str]:
    """Run the collector after `script` set up mounts that only it sees."""
    require([] if os.geteuid() == 0 and shutil.which("unshare") else ["root", "unshare"], "private mounts")
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", f'{script} && exec "$@"', "sh"]


def test_read_only_textfile_directory(tmp_path: Path) -> None:
    outdir = tmp_path / "textfile"
    outdir.mkdir()
    proc = replay(write_conf(tmp_path), outdir / "ipsec.prom",
                  *in_private_mount(f"mount -t tmpfs -o ro,mode=0755 none {outdir}"))
    assert proc.returncode == 3
    one_error_line(proc, "Read-only file system")


def test_textfile_directory_not_writable_by_the_user(tmp_path: Path) -> None:
    require([] if shutil.which("setpriv") and os.geteuid() == 0 else ["setpriv", "root"], "dropping privileges")
    outdir = tmp_path / "textfile"
    outdir.mkdir()
    (outdir / "ipsec.prom").write_text("previous\n")
    outdir.chmod(0o555)
    # root without the capabilities that override file permissions
    proc = replay(write_conf(tmp_path), outdir / "ipsec.prom",
                  "setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner")
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
    proc = run_collector("--config", str(conf), "--status-file", str(STATUSALL),
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
        runs = [subprocess.Popen([sys.executable, str(SCRIPT), "--config", str(conf), "--status-file",
                                  str(STATUSALL), "--output", str(out), "--lock-timeout", "60"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                for _ in range(20)]
        codes = [run.wait(timeout=120) for run in runs]
    finally:
        stop.set()
        thread.join(timeout=30)
    assert codes == [0] * 20
    assert reads > 0 and bad == []
    assert_no_temp_files(out.parent)


def test_run_killed_mid_write_leaves_the_previous_file(tmp_path: Path) -> None:
    conf = big_conf(tmp_path)
    out = tmp_path / "textfile" / "ipsec.prom"
    out.parent.mkdir()
    assert replay(conf, out).returncode == 0
    rng = random.Random(3)
    for _ in range(15):
        run = subprocess.Popen([sys.executable, str(SCRIPT), "--config", str(conf), "--status-file",
                                str(STATUSALL), "--output", str(out)], stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.05, 0.6))
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=30)
        text = out.read_text()
        assert len(by_tunnel(text, "ipsec_status")) == 3000 and value(text, "ipsec_textfile_success") == 1
        assert not [p for p in out.parent.iterdir() if p.name.endswith(".prom") and p != out]
    assert replay(conf, out).returncode == 0
    assert_no_temp_files(out.parent)  # the next run removed what killed runs left


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
    assert_failed_run(out)
    assert by_tunnel(out.read_text(), "ipsec_status") == {}


def test_unreadable_config_for_an_unprivileged_run(tmp_path: Path) -> None:
    require([] if shutil.which("setpriv") and os.geteuid() == 0 else ["setpriv", "root"], "dropping privileges")
    conf = write_conf(tmp_path)
    conf.chmod(0)
    out = tmp_path / "ipsec.prom"
    proc = replay(conf, out, "setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner")
    assert proc.returncode == 1
    one_error_line(proc, f"cannot read {conf}: Permission denied")
    assert_failed_run(out)


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
    promtool = shutil.which("promtool")
    require([] if promtool else ["promtool"], "checking metrics")
    check = subprocess.run([str(promtool), "check", "metrics"], input=out.read_text(), capture_output=True,
                           text=True, timeout=30, check=False)
    assert check.returncode == 0, check.stdout + check.stderr


def test_node_exporter_serves_odd_names(tmp_path: Path) -> None:
    require([] if shutil.which(BINARY) else [BINARY], "node_exporter end to end")
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
    wrapper = executable(tmp_path / "ipsec", f'#!/bin/sh\nprintf "%s\\n" "$@" >> {argv_log}\ncat {STATUSALL}\n')
    proc = run_collector("--config", str(conf), "--ipsec", str(wrapper), "--output", "-")
    assert proc.returncode == 0
    assert argv_log.read_text() == "statusall\nlistall\n--utc\n"
    assert not marker.exists()
