"""Against a real pluto (libreswan 4.10 and 5.2) in User-Mode Linux guests: every
ipsec_status value, exact byte counters, node_exporter serving the file."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import libreswan_lab
import pytest

from conftest import require
from node_exporter import scrape_once
from promfile import by_tunnel, samples, value

GATEWAY_CONF = """\
config setup
	ikev1-policy=accept

conn %default
	authby=secret
	left=192.168.0.1
	right=192.168.0.2
	keyingtries=%forever

conn up-v2
	leftsubnet=10.1.1.0/24
	rightsubnet=10.2.1.0/24
	auto=start

# same peer and ids as up-v2: its Child SA rides on up-v2's IKE SA
conn rides
	leftsubnet=10.1.9.0/24
	rightsubnet=10.2.9.0/24
	auto=start

conn up-v1
	ikev2=no
	leftsubnet=10.1.2.0/24
	rightsubnet=10.2.2.0/24
	auto=start

# the peer refuses its Child SA (other selectors): the IKE SA stays
conn ike-only
	leftid=@gw-ikeonly
	rightid=@peer-ikeonly
	leftsubnet=10.1.3.0/24
	rightsubnet=10.2.3.0/24
	auto=add

conn added
	leftsubnet=10.1.4.0/24
	rightsubnet=10.2.4.0/24
	auto=add

conn ondemand
	leftsubnet=10.1.5.0/24
	rightsubnet=10.2.5.0/24
	auto=ondemand

# triggered by traffic during the test
conn triggered
	leftsubnet=10.1.10.0/24
	rightsubnet=10.2.10.0/24
	auto=ondemand

conn silent
	right=192.168.0.99
	leftsubnet=10.1.6.0/24
	rightsubnet=10.2.6.0/24
	auto=start

conn ignored
	leftsubnet=10.1.7.0/24
	rightsubnet=10.2.7.0/24
	auto=ignore

conn shunt
	leftsubnet=10.1.8.0/24
	rightsubnet=10.2.8.0/24
	type=passthrough
	authby=never
	auto=ondemand
"""

PEER_CONNS = {"up-v2": 1, "rides": 9, "up-v1": 2, "ike-only": 3, "added": 4, "ondemand": 5, "triggered": 10}


def peer_conf() -> str:
    lines = ["config setup", "\tikev1-policy=accept", "",
             "conn %default", "\tauthby=secret", "\tleft=192.168.0.2", "\tright=192.168.0.1", "\tauto=add", ""]
    for name, net in PEER_CONNS.items():
        net = 33 if name == "ike-only" else net  # selectors the gateway does not propose
        lines += [f"conn {name}", f"\tleftsubnet=10.2.{net}.0/24", f"\trightsubnet=10.1.{net}.0/24"]
        lines += ["\tikev2=no"] if name == "up-v1" else []
        lines += ["\tleftid=@peer-ikeonly", "\trightid=@gw-ikeonly"] if name == "ike-only" else []
        lines.append("")
    return "\n".join(lines)


EXPECTED = {"up-v2": 0, "rides": 0, "up-v1": 0, "ike-only": 1, "added": 2, "ondemand": 2, "triggered": 0,
            "silent": 3, "ignored": 4, "shunt": 4}


def settled(status: str) -> bool:
    """up-v2, rides, up-v1 and triggered up, ike-only's IKE SA up, silent half-open."""
    states = [line for line in status.splitlines() if re.match(r"(?:000 )?#\d+: ", line)]
    children = sum("(established Child SA)" in s or "(IPsec SA established)" in s for s in states)
    ike_only = any('"ike-only"' in s and "(established IKE SA)" in s for s in states)
    return children >= 4 and ike_only and any('"silent"' in s and "IKE_SA_INIT" in s for s in states)


def start(suite: str, workdir: Path) -> libreswan_lab.LibreswanLab:
    nets = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    lab = libreswan_lab.boot(suite, workdir, GATEWAY_CONF, peer_conf(), [f"10.1.{n}.1/32" for n in nets],
                             [f"10.2.{n}.1/32" for n in nets])
    try:
        lab.peer.run("ipsec addconn --autoall && ipsec whack --listen\n")
        lab.gateway.run("ipsec addconn --autoall && ipsec whack --listen\n")
        lab.gateway.run("ipsec auto --asynchronous --up ike-only\n")
        # auto=ondemand: traffic into the trap brings it up.
        lab.gateway.run("ping -c 3 -W 2 -I 10.1.10.1 10.2.10.1 || true\n", timeout=60)
        libreswan_lab.wait_for(lambda: settled(lab.gateway.whack("--status")), 60, "the gateway's SAs")
    except BaseException:
        lab.destroy()
        raise
    return lab


@pytest.fixture(scope="module", params=sorted(libreswan_lab.SUITES))
def pluto_lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[libreswan_lab.LibreswanLab]:
    require(libreswan_lab.missing_tools(), "the libreswan lab")
    lab = start(request.param, tmp_path_factory.mktemp(f"libreswan-{request.param}"))
    yield lab
    lab.destroy()


def collect(lab: libreswan_lab.LibreswanLab, *more: str) -> str:
    """The collector run inside the gateway guest, with that release's Python; the file's text."""
    lab.gateway.run("python3 /repo/ipsec_textfile.py --output /lab/textfile/ipsec.prom " + " ".join(more) + "\n",
                    timeout=60)
    return (lab.gateway.labdir / "textfile/ipsec.prom").read_text()


@pytest.mark.parametrize("backend", ["pluto", "auto"])
def test_every_state_from_pluto(pluto_lab: libreswan_lab.LibreswanLab, backend: str) -> None:
    text = collect(pluto_lab, "--backend", backend)
    states = [line for line in pluto_lab.gateway.whack("--status").splitlines() if re.match(r"(?:000 )?#\d+: ", line)]
    assert by_tunnel(text, "ipsec_status") == EXPECTED, "\n".join(states)
    # The trap of auto=ondemand; ignored tunnels (the shunt) carry no figures.
    assert {t for t, v in by_tunnel(text, "ipsec_tunnel_routed").items() if v == 1} == {"ondemand"}
    assert value(text, "ipsec_textfile_success") == 1
    assert samples(text)[("ipsec_daemon_info", (("backend", "pluto"), ("version", pluto_lab.version)))] == 1
    # pluto counts no packets: left out, not 0.
    assert not [name for name, _ in samples(text) if name.endswith("_packets_total")]
    info = {labels: v for (name, labels), v in samples(text).items() if name == "ipsec_tunnel_info"}
    assert (("ike", "up-v1"), ("ike_version", "IKEv1"), ("local", "192.168.0.1"), ("local_ts", "10.1.2.0/24"),
            ("remote", "192.168.0.2"), ("remote_ts", "10.2.2.0/24"), ("tunnel", "up-v1")) in info


def test_traffic_raises_the_byte_counters(pluto_lab: libreswan_lab.LibreswanLab) -> None:
    before = collect(pluto_lab, "--backend", "pluto")
    count, size = 5, 1000
    pluto_lab.gateway.run(f"ping -c {count} -s {size} -i 0.2 -I 10.1.1.1 10.2.1.1\n", timeout=60)
    after = collect(pluto_lab, "--backend", "pluto")
    for family in ("ipsec_out_bytes_total", "ipsec_in_bytes_total"):
        grown = by_tunnel(after, family)["up-v2"] - by_tunnel(before, family)["up-v2"]
        assert grown >= count * size, family


def test_node_exporter_serves_the_file(pluto_lab: libreswan_lab.LibreswanLab) -> None:
    collect(pluto_lab, "--backend", "pluto")
    scraped = scrape_once(pluto_lab.gateway.labdir / "textfile")
    assert by_tunnel(scraped, "ipsec_status") == EXPECTED
