"""pluto's answers as the libreswan lab's gateway gave them (4.10 and 5.2), the pluto backend's
commands, --status-file replay, and how auto picks pluto."""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import ipsec_textfile as it
import libreswan_lab
from conftest import FIXTURES, STATES_STATUSALL, executable, run_collector
from promfile import by_tunnel, samples, value

STATES_EXPECTED = libreswan_lab.STATES_EXPECTED
VERSIONS = ["4.10", "5.2"]


def fixture(version: str) -> Path:
    return FIXTURES / f"libreswan-{version}"


def snapshot(version: str) -> it.DaemonState:
    return it.StatusFile(str(fixture(version) / "status.txt")).ask()()


def statuses(version: str) -> dict[str, it.TunnelStatus]:
    state = snapshot(version)
    tunnels = it.read_libreswan_config(str(fixture(version) / "ipsec.conf"), version=state.version)
    return {s.name: s for s in it.classify(tunnels, state)}


@pytest.mark.parametrize("version", VERSIONS)
def test_every_tunnel_of_the_captured_lab_gets_its_status(version: str) -> None:
    assert {name: s.status for name, s in statuses(version).items()} == STATES_EXPECTED
    # The trap of auto=ondemand (4.10 shows the shunt's policy the same way; it is ignored).
    assert {name for name, s in statuses(version).items() if s.routed and s.status != 4} == {"ondemand"}


@pytest.mark.parametrize("version", VERSIONS)
def test_the_version_and_backend_come_from_the_answer(version: str) -> None:
    state = snapshot(version)
    assert (state.version, state.backend, state.counts_packets) == (version, "pluto", False)


@pytest.mark.parametrize("version", VERSIONS)
def test_a_child_sa_riding_on_another_conns_ike_sa_is_up_and_names_its_carrier(version: str) -> None:
    state = snapshot(version)
    carriers = {sa.uid: sa.name for sa in state.ike_sas}
    assert {c.name: carriers[c.ike_uid] for c in state.child_sas} == {
        "up-v2": "up-v2", "rides": "up-v2", "up-v1": "up-v1", "triggered": "up-v2"}
    rides = statuses(version)["rides"].detail
    assert rides is not None and rides.ike is not None and rides.ike.name == "up-v2"


@pytest.mark.parametrize("version", VERSIONS)
def test_ike_sas_have_their_next_rekey_but_no_age(version: str) -> None:
    # "REKEY in 27839s; REPLACE in 28794s" (IKEv2), "REPLACE in 28210s" (IKEv1): whichever
    # comes first, read off each IKE SA's own line.
    text = (fixture(version) / "status.txt").read_text()
    established = [sa for sa in snapshot(version).ike_sas if sa.state == "ESTABLISHED"]
    assert {sa.name for sa in established} == {"up-v2", "up-v1", "ike-only"}
    both = 0
    for sa in established:
        line = next(line for line in text.splitlines() if re.match(rf"(?:000 )?#{sa.uid}: ", line))
        times = {word: int(n) for word, n in re.findall(r"\b(REKEY|REPLACE) in (\d+)s", line)}
        both += len(times) == 2
        assert sa.next_rekey == min(times.values()), line
    assert both >= 2  # IKEv2 SAs, whose REKEY comes before their REPLACE: the case that tells
    assert all(sa.age is None for sa in snapshot(version).ike_sas)  # pluto does not say
    assert [sa.state for sa in snapshot(version).ike_sas if sa.name == "silent"] == ["CONNECTING"]


def trafficstatus(version: str) -> dict[str, list[tuple[int, int]]]:
    """Each conn's IPsec SAs' (inBytes, outBytes), as `ipsec whack --trafficstatus` lists them."""
    rows: dict[str, list[tuple[int, int]]] = {}
    text = (fixture(version) / "status.txt").read_text()
    for name, bytes_in, bytes_out in re.findall(
            r'#\d+: "([^"]+)", type=ESP, add_time=\d+, inBytes=(\d+), outBytes=(\d+)', text):
        rows.setdefault(name, []).append((int(bytes_in), int(bytes_out)))
    return rows


@pytest.mark.parametrize("version", VERSIONS)
def test_bytes_are_trafficstatus_figures_summed_over_the_conns_sas_and_packets_are_left_out(version: str) -> None:
    for name, sas in trafficstatus(version).items():
        detail = statuses(version)[name].detail
        assert detail is not None
        assert (detail.traffic.bytes_in, detail.traffic.bytes_out) == tuple(map(sum, zip(*sas))), name
        assert (detail.traffic.packets_in, detail.traffic.packets_out) == (None, None)
    # A tunnel without an IPsec SA has 0 bytes, and still no packet count.
    added = statuses(version)["added"].detail
    assert added is not None and added.traffic == it.NO_PACKETS


def test_a_capture_has_a_conn_with_traffic_on_two_ipsec_sas() -> None:
    # What makes the sum above tell a sum from the last (or first) SA's figures.
    assert any(sum(1 for sa in sas if sa != (0, 0)) >= 2
               for version in VERSIONS for sas in trafficstatus(version).values())


@pytest.mark.parametrize("version", VERSIONS)
def test_replayed_status_file_writes_no_packet_series(version: str, tmp_path: Path) -> None:
    out = tmp_path / "ipsec.prom"
    proc = run_collector("--config", str(fixture(version) / "ipsec.conf"), "--status-file",
                         str(fixture(version) / "status.txt"), "--output", str(out))
    assert (proc.returncode, proc.stderr) == (0, "")
    text = out.read_text()
    assert by_tunnel(text, "ipsec_status") == STATES_EXPECTED
    assert not [name for name, _ in samples(text) if "packets" in name]
    assert set(by_tunnel(text, "ipsec_in_bytes_total")) == {t for t, v in STATES_EXPECTED.items() if v != 4}
    assert samples(text)[("ipsec_daemon_info", (("backend", "pluto"), ("version", version)))] == 1


@pytest.mark.parametrize("version", VERSIONS)
def test_tunnel_info_from_plutos_connection_list(version: str) -> None:
    configs = snapshot(version).configs
    assert configs["up-v1"] == it.TunnelConfig("up-v1", "192.168.0.1", "192.168.0.2", "10.1.2.0/24",
                                               "10.2.2.0/24", "IKEv1")
    assert configs["ike-only"] == it.TunnelConfig("ike-only", "192.168.0.1", "192.168.0.2", "10.1.3.0/24",
                                                  "10.2.3.0/24", "IKEv2")
    assert configs["silent"].remote == "192.168.0.99"
    assert "ignored" not in configs  # pluto never loaded it


def test_pluto_host_to_host_and_instances() -> None:
    # Hand-typed, not captured: the libreswan lab has no host-to-host conn and no template
    # instances. The lines follow the format of pluto 4.x's lines in the captures above.
    status = ("000 Connection list:\n"
              '000 "host": 192.0.2.1[@a]...192.0.2.2[@b]; erouted; eroute owner: #3\n'
              '000 "road"[1]: 192.0.2.1---192.0.2.254...198.51.100.7===10.9.0.1/32; erouted; eroute owner: #4\n'
              '000 #2: "host":500 STATE_V2_ESTABLISHED_IKE_SA (established IKE SA); newest;\n'
              '000 #3: "host":500 STATE_V2_ESTABLISHED_CHILD_SA (established Child SA); IKE SA #2;\n'
              '000 #4: "road"[1] 198.51.100.7:4500 STATE_V2_ESTABLISHED_CHILD_SA (established Child SA); '
              "IKE SA #5;\n")
    state = it.parse_pluto(status, "")
    assert state.configs == {"host": it.TunnelConfig("host", "192.0.2.1", "192.0.2.2", "192.0.2.1", "192.0.2.2",
                                                     "")}
    assert [(c.name, c.uid, c.ike_uid) for c in state.child_sas] == [("host", 3, 2), ("road", 4, 5)]


@pytest.mark.parametrize("text", ["", "whack: Pluto is not running (no \"/run/pluto/pluto.ctl\")\n",
                                  "Status of IKE charon daemon (strongSwan 5.9.8, Linux):\n"])
def test_output_without_a_connection_list_is_an_error(text: str) -> None:
    with pytest.raises(it.DaemonError):
        it.parse_pluto(text, "")


FAKE_IPSEC = """#!/bin/sh
# a stand-in for libreswan's ipsec: whack --status / --trafficstatus / --addresspoolstatus
# print the capture
case "$*" in
  "whack --status"|"whack --trafficstatus"|"whack --addresspoolstatus") cat {status}; exit {code};;
  statusall) cat {statusall};;
  *) echo "ipsec: unknown command $*" >&2; exit 1;;
esac
"""


def fake_ipsec(tmp_path: Path, status: Path, code: int = 0) -> Path:
    return executable(tmp_path / "ipsec", FAKE_IPSEC.format(status=status, code=code, statusall=STATES_STATUSALL))


def test_backend_pluto_asks_whack(tmp_path: Path) -> None:
    ipsec = fake_ipsec(tmp_path, fixture("5.2") / "status.txt")
    out = tmp_path / "ipsec.prom"
    proc = run_collector("--backend", "pluto", "--ipsec", str(ipsec), "--config",
                         str(fixture("5.2") / "ipsec.conf"), "--output", str(out))
    assert (proc.returncode, proc.stderr) == (0, "")
    assert by_tunnel(out.read_text(), "ipsec_status") == STATES_EXPECTED


def test_whack_failing_is_a_failed_run_that_says_why(tmp_path: Path) -> None:
    status = tmp_path / "said.txt"
    status.write_text('whack: Pluto is not running (no "/run/pluto/pluto.ctl")\n')
    ipsec = fake_ipsec(tmp_path, status, code=1)
    out = tmp_path / "ipsec.prom"
    proc = run_collector("--backend", "pluto", "--ipsec", str(ipsec), "--config",
                         str(fixture("5.2") / "ipsec.conf"), "--output", str(out))
    assert proc.returncode == it.EXIT_RUN_FAILED
    assert "Pluto is not running" in proc.stderr
    text = out.read_text()
    assert value(text, "ipsec_textfile_success") == 0
    # Read as libreswan reads it: auto=ondemand is loaded (3 unknown), auto=ignore is not (4).
    assert by_tunnel(text, "ipsec_status") == {t: 4 if v == 4 else 3 for t, v in STATES_EXPECTED.items()}


def test_a_hung_whack_is_killed_with_its_children(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    ipsec = executable(tmp_path / "ipsec", f"#!/bin/sh\nsleep 60 &\necho $! > {pidfile}\nwait\n")
    started = time.monotonic()
    with pytest.raises(it.DaemonError, match="did not answer within 1s"):
        it.PlutoDaemon(str(ipsec), timeout=1).ask()()
    # A fault bound: the 1 s timeout ends it; waiting for the `sleep 60` that holds the pipe
    # would take 60 s; 20 s is a loaded 2-core machine's margin.
    assert time.monotonic() - started < 20
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 20  # killed with its parent: gone at once, or within 60 s if not
    while os.path.exists(f"/proc/{child}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{child}")


@pytest.fixture
def pluto_socket(tmp_path: Path) -> Iterator[Path]:
    """A Unix socket that accepts connections, as pluto's control socket does."""
    path = tmp_path / "pluto.ctl"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen(4)
        yield path


def auto(tmp_path: Path, pluto_socket: Path, stroke_socket: Path) -> it.AutoDaemon:
    ipsec = str(fake_ipsec(tmp_path, fixture("4.10") / "status.txt"))
    return it.AutoDaemon(it.ViciDaemon(str(tmp_path / "no.vici"), 5), it.StrokeDaemon(ipsec, 5),
                         it.PlutoDaemon(ipsec, 5), str(pluto_socket), str(stroke_socket))


def test_auto_asks_pluto_when_its_socket_answers_and_charons_are_absent(tmp_path: Path,
                                                                        pluto_socket: Path) -> None:
    state = auto(tmp_path, pluto_socket, tmp_path / "no-charon.ctl").ask()()
    assert (state.backend, state.version) == ("pluto", "4.10")


def test_auto_asks_stroke_when_charons_stroke_socket_exists(tmp_path: Path, pluto_socket: Path) -> None:
    # Both an `ipsec` and a pluto socket: charon's socket says strongSwan is the one running.
    (tmp_path / "charon.ctl").touch()
    assert auto(tmp_path, pluto_socket, tmp_path / "charon.ctl").ask()().backend == "stroke"


def test_auto_asks_stroke_when_plutos_socket_is_stale(tmp_path: Path) -> None:
    stale = tmp_path / "pluto.ctl"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(stale))  # bound, never listening: connections are refused
    assert auto(tmp_path, stale, tmp_path / "no-charon.ctl").ask()().backend == "stroke"
