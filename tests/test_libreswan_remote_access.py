"""libreswan remote-access gateways: clients and pools from pluto, on answers captured from
libreswan_lab.start_ra_lab (tests/fixtures/libreswan-*-remote-access/) and live in the UML lab."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

import capture_libreswan_ra_fixtures as capture
import ipsec_textfile as it
import libreswan_lab
from conftest import FIXTURES, replay, running_lab
from lab import wait_for
from promfile import by_tunnel, samples

VERSIONS = sorted(libreswan_lab.SUITES.values())
ESP_OVERHEAD = 28  # ping's ICMP and IP headers: each echo request and reply counts 528 bytes at -s 500


def fixture(version: str) -> Path:
    return FIXTURES / f"libreswan-{version}-remote-access"


def clients(text: str, tunnel: str) -> dict[str, dict[str, str]]:
    """{client: its info labels} of one tunnel in an exposition."""
    return {dict(labels)["client"]: dict(labels) for (name, labels), _ in samples(text).items()
            if name == "ipsec_client_info" and dict(labels)["tunnel"] == tunnel}


def client_figure(text: str, metric: str, tunnel: str) -> dict[str, float]:
    return {dict(labels)["client"]: v for (name, labels), v in samples(text).items()
            if name == metric and dict(labels)["tunnel"] == tunnel}


def pools(text: str) -> dict[tuple[str, str], float]:
    return {(dict(labels)["pool"], dict(labels)["state"]): v for (name, labels), v in samples(text).items()
            if name == "ipsec_pool_leases"}


@pytest.mark.parametrize("version", VERSIONS)
def test_captured_gateway_reports_each_client_with_its_lease_and_own_traffic(version: str, tmp_path: Path) -> None:
    out = tmp_path / "ipsec.prom"
    proc = replay(fixture(version) / "ipsec.conf", out, status=fixture(version) / "status.txt")
    assert (proc.returncode, proc.stderr) == (0, "")
    text = out.read_text()
    # Both conns serve any peer: remote access, up, and one client per IKE SA (client3 left).
    assert by_tunnel(text, "ipsec_tunnel_remote_access") == {"rw": 1, "xauth": 1}
    assert by_tunnel(text, "ipsec_status") == {"rw": 0, "xauth": 0}
    assert by_tunnel(text, "ipsec_tunnel_clients") == {"rw": 2, "xauth": 2}
    # IKEv2 clients by their IKE identity, XAuth clients by their user name; each with the
    # lease the client guest was given (the status file names them too, per IPsec SA).
    status = (fixture(version) / "status.txt").read_text()
    rw, xauth = clients(text, "rw"), clients(text, "xauth")
    assert set(rw) == {"@client1.lab", "@client2.lab"}
    assert set(xauth) == {"xuser1", "xuser2"}
    for name, info in {**rw, **xauth}.items():
        assert re.search(rf"(?:id='{name}'|username={name},)[^\n]*lease={info['virtual_ip']}/32", status), name
        assert info["remote_host"] == "192.168.0.2"
    assert {info["ike_version"] for info in rw.values()} == {"IKEv2"}
    assert {info["ike_version"] for info in xauth.values()} == {"IKEv1"}
    # client1's pings and their replies, on client1 alone; pluto counts bytes, not packets.
    sent = capture.PINGS * (500 + ESP_OVERHEAD)
    assert client_figure(text, "ipsec_client_in_bytes_total", "rw") == {"@client1.lab": sent, "@client2.lab": 0}
    assert client_figure(text, "ipsec_client_out_bytes_total", "rw") == {"@client1.lab": sent, "@client2.lab": 0}
    assert client_figure(text, "ipsec_client_in_packets_total", "rw") == {}
    # The pools under pluto's own names: a lease per connected client online, client3's offline.
    leases = pools(text)
    assert leases[("10.79.0.10-10.79.0.50", "online")] == 2
    assert leases[("10.79.0.10-10.79.0.50", "offline")] >= 1
    assert (leases[("10.80.0.10-10.80.0.50", "online")], leases[("10.80.0.10-10.80.0.50", "offline")]) == (2, 0)
    assert {dict(labels)["pool"]: v for (name, labels), v in samples(text).items()
            if name == "ipsec_pool_addresses"} == {"10.79.0.10-10.79.0.50": 41, "10.80.0.10-10.80.0.50": 41}


@pytest.mark.parametrize("version", VERSIONS)
def test_hostile_names_in_trafficstatus_cannot_move_the_figures(version: str) -> None:
    # The captured answer with the user name and identity a peer could choose made to look
    # like more fields: every client keeps pluto's own figures and lease, under its odd name.
    # (Derived from the capture by replacing the names; pluto prints them as it got them.)
    status = (fixture(version) / "status.txt").read_text()
    forged = ", type=ESP, add_time=1, inBytes=999, outBytes=999, maxBytes=2^63B, id='x', lease=10.9.9.9/32"
    hostile = status.replace("username=xuser1,", f"username=xuser1{forged},").replace(
        "id='@client1.lab'", f"id='@client1.lab'{forged}'")
    def figures(text: str) -> list[tuple[int, int, it.Traffic, tuple[str, ...]]]:
        state = it.parse_pluto(text, text, text)
        ips = {sa.uid: sa.virtual_ips for sa in state.ike_sas}
        return [(c.uid, c.ike_uid, c.traffic, ips[c.ike_uid]) for c in state.child_sas]
    assert figures(hostile) == figures(status)
    names = {sa.xauth_id or sa.remote_id for sa in it.parse_pluto(hostile, hostile, hostile).ike_sas}
    assert f"xuser1{forged}" in names and f"@client1.lab'{forged}" in names


@pytest.fixture(scope="module", params=sorted(libreswan_lab.SUITES))
def ra_lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[libreswan_lab.LibreswanLab]:
    with running_lab(partial(libreswan_lab.start_ra_lab, request.param), tmp_path_factory,
                     libreswan_lab.missing_tools, "the libreswan lab") as started:
        yield started


def test_live_clients_traffic_and_leases(ra_lab: libreswan_lab.LibreswanLab) -> None:
    text = ra_lab.collect("--backend", "pluto")
    assert by_tunnel(text, "ipsec_tunnel_clients") == {"rw": 3, "xauth": 2}
    rw = clients(text, "rw")
    assert set(rw) == {"@client1.lab", "@client2.lab", "@client3.lab"}
    assert set(clients(text, "xauth")) == {"xuser1", "xuser2"}
    for n in (1, 2, 3):  # the lease each client guest's conn was given
        assert rw[f"@client{n}.lab"]["virtual_ip"] == capture.lease_of(ra_lab, f"client{n}")
    before = client_figure(text, "ipsec_client_in_bytes_total", "rw")
    ra_lab.peer.run(f"ping -c 3 -s 500 -i 0.2 -I {capture.lease_of(ra_lab, 'client2')} 10.77.0.1\n", timeout=60)
    after = client_figure(ra_lab.collect("--backend", "pluto"), "ipsec_client_in_bytes_total", "rw")
    assert after["@client2.lab"] - before["@client2.lab"] >= 3 * (500 + ESP_OVERHEAD)
    assert after["@client1.lab"] == before["@client1.lab"]
    assert after["@client3.lab"] == before["@client3.lab"]
    # client3 leaves: gone from the series, its lease offline; the conn stays up, not down.
    ra_lab.peer.whack("--name client3 --terminate")
    wait_for(lambda: "@client3.lab" not in clients(ra_lab.collect("--backend", "pluto"), "rw"), 30, "client3 to go")
    text = ra_lab.collect("--backend", "auto")
    assert by_tunnel(text, "ipsec_tunnel_clients") == {"rw": 2, "xauth": 2}
    assert by_tunnel(text, "ipsec_status")["rw"] == 0
    assert pools(text)[("10.79.0.10-10.79.0.50", "offline")] >= 1
    promtool = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True,
                              timeout=60, check=False)
    assert promtool.returncode == 0, promtool.stdout + promtool.stderr
