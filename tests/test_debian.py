"""Debian 11, 12 and 13 as they ship: the collector installed per README, run by its timer, served by
Debian's node_exporter (see tests/debian_lab.py). `pytest -s` prints each gateway's figure."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import debian_lab
from conftest import require
from debian_lab import daemon_info, tunnels_right
from promfile import by_tunnel, value

KINDS = list(debian_lab.KINDS)
COUNT, SIZE = 20, 200  # datagrams sent through the traffic tunnel, and their payload


@dataclass
class Traffic:
    """node_exporter's pages from timer runs either side of COUNT datagrams through the traffic tunnel."""

    before: str
    after: str
    after_run: debian_lab.TimerRun


@dataclass
class Gateways:
    """Per kind: the gateway once installed per README, and its traffic once counted."""

    installed: dict[str, concurrent.futures.Future[debian_lab.Gateway]]
    traffic: dict[str, concurrent.futures.Future[Traffic]]


def install(gateway: debian_lab.Gateway, cached_root: Path) -> debian_lab.Gateway:
    gateway.start(cached_root)
    installed = gateway.install()
    assert installed.returncode == 0, f"README's install block on {gateway.kind.name}:\n{installed.stderr}"
    return gateway


def count_traffic(installed: concurrent.futures.Future[debian_lab.Gateway]) -> Traffic:
    gateway = installed.result()
    gateway.wait_for_timer_run(after=gateway.settled_at)
    before = gateway.scrape()
    gateway.exchange_datagrams(COUNT, SIZE)
    # A run that started after the last echo came back has counted all of it.
    after_run = gateway.wait_for_timer_run(after=time.monotonic_ns() // 1000)
    return Traffic(before, gateway.scrape(), after_run)


def kind_of(item: pytest.Item) -> object:
    """The gateway kind a collected test is parametrized with, if any."""
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("kind") if callspec is not None else None


# Module-scoped: the gateways shut down when this file's tests are done, before
# tests/test_package.py boots its own.
@pytest.fixture(scope="module")
def debian_gateways(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateways]:
    """Every gateway kind this run's tests ask for, booted side by side, installed per README,
    and its traffic counted in the background.

    Together, their timers run together: the waits for timer runs (two a gateway) overlap instead
    of adding up. A kind that fails to come up fails its own tests only.
    """
    require(debian_lab.missing_tools(), "the Debian gateways")
    wanted = {kind_of(item) for item in request.session.items if item.path == Path(__file__)}
    kinds = [kind for name, kind in debian_lab.KINDS.items() if name in wanted]
    roots = debian_lab.build_roots(kinds)
    gateways = [debian_lab.Gateway(kind, tmp_path_factory.mktemp(kind.name)) for kind in kinds]
    # Two threads a gateway: one installs it, one waits for that and counts its traffic.
    with concurrent.futures.ThreadPoolExecutor(max_workers=2 * len(gateways)) as pool:
        installed = {gateway.kind.name: pool.submit(install, gateway, roots[gateway.kind.name])
                     for gateway in gateways}
        traffic = {name: pool.submit(count_traffic, future) for name, future in installed.items()}
        try:
            yield Gateways(installed, traffic)
        finally:
            concurrent.futures.wait(installed.values())
            concurrent.futures.wait(traffic.values())
            for gateway in gateways:
                gateway.stop()


@pytest.fixture
def gateway(debian_gateways: Gateways, kind: str) -> debian_lab.Gateway:
    return debian_gateways.installed[kind].result()


@pytest.fixture
def traffic(debian_gateways: Gateways, kind: str) -> Traffic:
    return debian_gateways.traffic[kind].result()


@pytest.mark.parametrize("kind", KINDS)
def test_the_timer_serves_every_tunnel_state(gateway: debian_lab.Gateway) -> None:
    run = gateway.wait_for_timer_run(after=gateway.settled_at)
    assert (run.status, run.result) == (0, "success")
    # Started by the timer: it fired before the run (nothing else starts the service), and
    # systemd started the run on it, at once: 10 s, a margin a loaded 2-core machine keeps.
    assert 0 < run.triggered <= run.started < run.triggered + 10_000_000

    page = gateway.scrape()
    got = by_tunnel(page, "ipsec_status")
    info = daemon_info(page)
    right, of = tunnels_right(gateway.kind.expected, got)
    print(f"\n{gateway.kind.name}: {right} of {of} tunnels right "
          f"(timer run, backend {info['backend']}, strongSwan {info['version']})")
    assert got == gateway.kind.expected
    # What node_exporter serves is the file the timer's service writes.
    assert by_tunnel(gateway.sh("cat", debian_lab.TEXTFILE), "ipsec_status") == got
    assert value(page, "ipsec_textfile_success") == 1
    assert value(page, "node_textfile_scrape_error") == 0
    assert info["version"] == gateway.strongswan_version()
    assert info["backend"] == "vici"  # README's table: auto picks VICI on every release


@pytest.mark.parametrize("kind", KINDS)
def test_the_timer_counts_the_traffic(gateway: debian_lab.Gateway, traffic: Traffic) -> None:
    assert (traffic.after_run.status, traffic.after_run.result) == (0, "success")
    tunnel = gateway.kind.traffic_tunnel

    def grew(metric: str) -> float:
        return by_tunnel(traffic.after, metric)[tunnel] - by_tunnel(traffic.before, metric)[tunnel]

    # Each datagram is an IP packet of SIZE + 28 bytes, echoed back.
    assert grew("ipsec_out_bytes_total") >= COUNT * (SIZE + 28)
    assert grew("ipsec_in_bytes_total") >= COUNT * (SIZE + 28)
    assert grew("ipsec_out_packets_total") >= COUNT
    assert grew("ipsec_in_packets_total") >= COUNT


def backends(kind: str) -> list[str]:
    """stroke needs the starter's `ipsec` command; every kind has VICI."""
    return ["stroke", "vici"] if debian_lab.KINDS[kind].starter else ["vici"]


@pytest.mark.parametrize(("kind", "backend"), [(kind, backend) for kind in KINDS for backend in backends(kind)])
def test_each_backend_by_hand(gateway: debian_lab.Gateway, backend: str) -> None:
    proc = gateway.collector("--backend", backend, "--output", "-")
    assert (proc.returncode, proc.stderr) == (0, "")
    got = by_tunnel(proc.stdout, "ipsec_status")
    right, of = tunnels_right(gateway.kind.expected, got)
    print(f"\n{gateway.kind.name}: {right} of {of} tunnels right (by hand, backend {backend})")
    assert got == gateway.kind.expected
    assert daemon_info(proc.stdout) == {"backend": backend, "version": gateway.strongswan_version()}


# Series both backends must give alike; ages and rekey times differ in resolution.
SAME_IN_BOTH = ["ipsec_status", "ipsec_tunnel_routed", "ipsec_installed_child_sas", "ipsec_ike_established",
                "ipsec_in_bytes_total", "ipsec_out_bytes_total", "ipsec_in_packets_total",
                "ipsec_out_packets_total"]


@pytest.mark.parametrize("kind", [kind for kind in KINDS if debian_lab.KINDS[kind].starter])
def test_stroke_and_vici_agree(gateway: debian_lab.Gateway) -> None:
    stroke, vici = (gateway.collector("--backend", backend, "--output", "-") for backend in ("stroke", "vici"))
    assert (stroke.returncode, vici.returncode) == (0, 0)
    for metric in SAME_IN_BOTH:
        assert by_tunnel(vici.stdout, metric) == by_tunnel(stroke.stdout, metric), metric


@pytest.mark.parametrize("kind", [kind for kind in KINDS if not debian_lab.KINDS[kind].starter])
def test_a_default_trixie_has_no_starter_and_the_collector_asks_vici(gateway: debian_lab.Gateway) -> None:
    assert gateway.sh_process("sh", "-c", "command -v ipsec").returncode != 0
    assert not (gateway.root / "etc" / "ipsec.conf").exists()
    assert daemon_info(gateway.scrape())["backend"] == "vici"
