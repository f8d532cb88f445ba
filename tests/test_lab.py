"""Against a real charon: the lab gateways, the collector run on them, node_exporter serving it."""

from __future__ import annotations

import contextlib
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import lab
from conftest import BACKENDS, executable, require_tools, run_collector, running_lab
from node_exporter import BINARY, scrape_once
from promfile import by_tunnel, samples, value


def collect_on_gateway(states: lab.Lab, out: Path, *more: str) -> subprocess.CompletedProcess[str]:
    """Run the collector on the gateway with its defaults: /etc/ipsec.conf, `ipsec`."""
    return run_collector("--output", str(out), *more, prefix=states.gateway.nsenter())


def collect(states: lab.Lab, tmp_path: Path, backend: str) -> str:
    out = tmp_path / f"{backend}.prom"
    proc = collect_on_gateway(states, out, "--backend", backend)
    assert (proc.returncode, proc.stderr) == (0, "")
    return out.read_text()


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_state_from_the_live_daemon(states_lab: lab.Lab, tmp_path: Path, backend: str) -> None:
    text = collect(states_lab, tmp_path, backend)
    assert by_tunnel(text, "ipsec_status") == lab.STATES_EXPECTED
    assert {t for t, v in by_tunnel(text, "ipsec_tunnel_routed").items() if v == 1} == {"routed"}
    assert value(text, "ipsec_textfile_success") == 1
    assert samples(text)[("ipsec_daemon_info", (("backend", backend), ("version", "5.9.8")))] == 1


# Series both backends must give alike; ages and rekey times differ in resolution.
SAME_IN_BOTH = ["ipsec_status", "ipsec_tunnel_routed", "ipsec_installed_child_sas", "ipsec_ike_established",
                "ipsec_in_bytes_total", "ipsec_out_bytes_total", "ipsec_in_packets_total",
                "ipsec_out_packets_total"]


def test_both_backends_agree_on_one_live_daemon(states_lab: lab.Lab, tmp_path: Path) -> None:
    stroke, vici = (collect(states_lab, tmp_path, backend) for backend in ("stroke", "vici"))
    for metric in SAME_IN_BOTH:
        assert by_tunnel(vici, metric) == by_tunnel(stroke, metric), metric

    def info(text: str) -> set[tuple[tuple[str, str], ...]]:
        return {labels for name, labels in samples(text) if name == "ipsec_tunnel_info"}

    assert info(vici) == info(stroke)
    assert len(info(stroke)) == sum(v != 4 for v in lab.STATES_EXPECTED.values())
    assert by_tunnel(stroke, "ipsec_status") == lab.STATES_EXPECTED


def test_auto_uses_vici_when_its_socket_answers(states_lab: lab.Lab, tmp_path: Path) -> None:
    auto = collect(states_lab, tmp_path, "auto")
    assert samples(auto)[("ipsec_daemon_info", (("backend", "vici"), ("version", "5.9.8")))] == 1


def test_auto_uses_stroke_without_a_vici_socket(states_lab: lab.Lab, tmp_path: Path) -> None:
    out = tmp_path / "fallback.prom"
    proc = collect_on_gateway(states_lab, out, "--vici-socket", str(tmp_path / "no-such.vici"))
    assert proc.returncode == 0
    assert samples(out.read_text())[("ipsec_daemon_info", (("backend", "stroke"), ("version", "5.9.8")))] == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_traffic_through_a_tunnel_shows_in_its_counters(
        states_lab: lab.Lab, tmp_path: Path, backend: str) -> None:
    count, size = 20, 200
    before = collect(states_lab, tmp_path, backend)
    lab.exchange_datagrams(states_lab, "10.1.1.1", "10.2.1.1", count, size)
    after = collect(states_lab, tmp_path, backend)

    def grew(metric: str, tunnel: str) -> float:
        return by_tunnel(after, metric)[tunnel] - by_tunnel(before, metric)[tunnel]

    # Each datagram is an IP packet of size + 28 bytes, echoed back.
    assert grew("ipsec_out_packets_total", "up") >= count
    assert grew("ipsec_in_packets_total", "up") >= count
    assert grew("ipsec_out_bytes_total", "up") >= count * (size + 28)
    assert grew("ipsec_in_bytes_total", "up") >= count * (size + 28)
    assert grew("ipsec_out_bytes_total", "a.b_c-d") == 0  # the same IKE SA, another CHILD SA
    assert by_tunnel(after, "ipsec_installed_child_sas")["up"] == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_rekeyed_child_sa_keeps_the_tunnel_up_and_restarts_its_counters(
        states_lab: lab.Lab, tmp_path: Path, backend: str) -> None:
    lab.exchange_datagrams(states_lab, "10.1.5.1", "10.2.5.1", 5, 100)  # through alsoconn
    before = collect(states_lab, tmp_path, backend)
    assert by_tunnel(before, "ipsec_out_packets_total")["alsoconn"] >= 5
    lab.run([*states_lab.gateway.nsenter(), "swanctl", "--rekey", "--child", "alsoconn"], timeout=30)

    def only_the_new_sa(statusall: str) -> bool:
        return re.findall(r"alsoconn\{\d+\}:  ([A-Z]+),", statusall) == ["INSTALLED"]

    lab.wait_for_status(states_lab.gateway, only_the_new_sa, 30, "the old CHILD SA of alsoconn to go")
    after = collect(states_lab, tmp_path, backend)
    assert by_tunnel(after, "ipsec_status")["alsoconn"] == 0
    assert by_tunnel(after, "ipsec_installed_child_sas")["alsoconn"] == 1
    # A fresh SA counts from 0: the sum drops, which rate() takes as a counter reset.
    assert by_tunnel(after, "ipsec_out_packets_total")["alsoconn"] < by_tunnel(
        before, "ipsec_out_packets_total")["alsoconn"]


def test_ike_age_grows_between_runs(states_lab: lab.Lab, tmp_path: Path) -> None:
    first = by_tunnel(collect(states_lab, tmp_path, "vici"), "ipsec_ike_age_seconds")
    # stroke asked between the two VICI runs, so no machine's load can put it past the second;
    # it rounds down to minutes after two minutes.
    stroke = by_tunnel(collect(states_lab, tmp_path, "stroke"), "ipsec_ike_age_seconds")
    time.sleep(1.5)  # at least this much older: VICI's whole seconds grow by 1 or more
    second = by_tunnel(collect(states_lab, tmp_path, "vici"), "ipsec_ike_age_seconds")
    assert set(first) == {"up", "site", "a.b_c-d", "included", "alsoconn", "ike"}
    assert all(second[t] >= first[t] + 1 for t in first)
    assert set(stroke) == set(first)
    assert all(0 < stroke[t] <= second[t] for t in stroke)


@pytest.fixture(scope="module")
def swanctl_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[lab.Lab]:
    """A gateway configured by swanctl.conf alone (lab.SWANCTL_GATEWAY_CONF)."""
    with running_lab(lab.start_swanctl_lab, tmp_path_factory) as swanctl:
        yield swanctl


def test_swanctl_gateway_every_state_over_vici(swanctl_lab: lab.Lab, tmp_path: Path) -> None:
    # Defaults: auto picks VICI; /etc/ipsec.conf has no conn, the daemon names the tunnels.
    out = tmp_path / "ipsec.prom"
    proc = collect_on_gateway(swanctl_lab, out)
    assert (proc.returncode, proc.stderr) == (0, "")
    text = out.read_text()
    assert by_tunnel(text, "ipsec_status") == lab.SWANCTL_EXPECTED
    assert {t for t, v in by_tunnel(text, "ipsec_tunnel_routed").items() if v == 1} == {"net-routed"}
    lab.exchange_datagrams(swanctl_lab, "10.1.1.1", "10.2.1.1", 3, 100)
    assert collect_on_gateway(swanctl_lab, out).returncode == 0
    assert by_tunnel(out.read_text(), "ipsec_out_packets_total")["net-up"] >= 3


def test_the_daemon_is_asked_once_per_run(states_lab: lab.Lab, tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    counting = executable(tmp_path / "counting-ipsec", f'#!/bin/sh\necho "$*" >> {calls}\nexec ipsec "$@"\n')
    proc = collect_on_gateway(states_lab, tmp_path / "ipsec.prom", "--backend", "stroke",
                              "--ipsec", str(counting))
    assert proc.returncode == 0
    assert calls.read_text() == "statusall\nlistall --utc\n"  # the tunnels, then the certificates


def test_the_daemon_is_asked_over_one_vici_connection_per_run(states_lab: lab.Lab, tmp_path: Path) -> None:
    with contextlib.closing(lab.ViciProxy(tmp_path / "counting.vici", states_lab.gateway.vici_socket)) as proxy:
        out = tmp_path / "ipsec.prom"
        proc = collect_on_gateway(states_lab, out, "--backend", "vici", "--vici-socket", str(proxy.path))
    assert (proc.returncode, proc.stderr) == (0, "")
    assert by_tunnel(out.read_text(), "ipsec_status") == lab.STATES_EXPECTED
    assert proxy.connections == 1


def test_a_tunnel_taken_down_reads_down_on_the_next_run(states_lab: lab.Lab, tmp_path: Path) -> None:
    out = tmp_path / "ipsec.prom"
    states_lab.gateway.ipsec("down", "included{*}")  # its CHILD SAs only
    try:
        assert collect_on_gateway(states_lab, out).returncode == 0
        assert by_tunnel(out.read_text(), "ipsec_status")["included"] == 2
    finally:
        states_lab.gateway.ipsec("up", "included", timeout=30)
    assert collect_on_gateway(states_lab, out).returncode == 0
    assert by_tunnel(out.read_text(), "ipsec_status")["included"] == 0


def test_node_exporter_serves_the_file(states_lab: lab.Lab, tmp_path: Path) -> None:
    require_tools(BINARY, what="node_exporter end to end")
    textfile_dir = tmp_path / "textfile"
    textfile_dir.mkdir()
    assert collect_on_gateway(states_lab, textfile_dir / "ipsec.prom", "--lock-timeout", "5").returncode == 0
    served = scrape_once(textfile_dir)
    assert by_tunnel(served, "ipsec_status") == lab.STATES_EXPECTED
    assert samples(served)[("node_textfile_scrape_error", ())] == 0
    assert value(served, "ipsec_textfile_success") == 1


def test_auto_asks_stroke_when_vici_leaves_an_ike_sa_out(tmp_path_factory: pytest.TempPathFactory) -> None:
    # 1500 CHILD SAs under one IKE SA pass VICI's 512 KiB message limit: charon leaves the
    # IKE SA out of list-sas. auto must notice, ask through stroke and say so.
    tunnels = 1500
    # The lab goes when the block ends, an assertion that fails in it included.
    with running_lab(lambda workdir: lab.start_scale_lab(workdir, tunnels), tmp_path_factory) as big:
        out = tmp_path_factory.mktemp("out") / "ipsec.prom"
        vici = collect_on_gateway(big, out, "--backend", "vici")
        assert vici.returncode == 1 and "VICI listed 0" in vici.stderr
        proc = collect_on_gateway(big, out)
        assert proc.returncode == 0
        assert proc.stderr.startswith("ipsec-textfile: warning: the daemon has 1 IKE SAs but VICI listed 0")
        assert proc.stderr.rstrip().endswith("asked through stroke instead")
        text = out.read_text()
        assert samples(text)[("ipsec_daemon_info", (("backend", "stroke"), ("version", "5.9.8")))] == 1
        assert list(by_tunnel(text, "ipsec_status").values()) == [0] * tunnels
