"""Against a real pluto (libreswan 4.10 and 5.2) in User-Mode Linux guests: every
ipsec_status value, exact byte counters, node_exporter serving the file."""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import partial

import pytest

import libreswan_lab
from conftest import running_lab
from node_exporter import scrape_once
from promfile import by_tunnel, samples, value


@pytest.fixture(scope="module", params=sorted(libreswan_lab.SUITES))
def pluto_lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[libreswan_lab.LibreswanLab]:
    with running_lab(partial(libreswan_lab.start_states_lab, request.param), tmp_path_factory,
                     libreswan_lab.missing_tools, "the libreswan lab") as started:
        yield started


@pytest.mark.parametrize("backend", ["pluto", "auto"])
def test_every_state_from_pluto(pluto_lab: libreswan_lab.LibreswanLab, backend: str) -> None:
    text = pluto_lab.collect("--backend", backend)
    states = [line for line in pluto_lab.gateway.whack("--status").splitlines() if re.match(r"(?:000 )?#\d+: ", line)]
    assert by_tunnel(text, "ipsec_status") == libreswan_lab.STATES_EXPECTED, "\n".join(states)
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
    before = pluto_lab.collect("--backend", "pluto")
    count, size = 5, 1000
    pluto_lab.gateway.run(f"ping -c {count} -s {size} -i 0.2 -I 10.1.1.1 10.2.1.1\n", timeout=60)
    after = pluto_lab.collect("--backend", "pluto")
    for family in ("ipsec_out_bytes_total", "ipsec_in_bytes_total"):
        grown = by_tunnel(after, family)["up-v2"] - by_tunnel(before, family)["up-v2"]
        assert grown >= count * size, family


def test_node_exporter_serves_the_file(pluto_lab: libreswan_lab.LibreswanLab) -> None:
    pluto_lab.collect("--backend", "pluto")
    scraped = scrape_once(pluto_lab.gateway.labdir / "textfile")
    assert by_tunnel(scraped, "ipsec_status") == libreswan_lab.STATES_EXPECTED
