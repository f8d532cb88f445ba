"""A live strongSwan remote-access gateway (tests/ra_lab.py) with 20 clients of every kind:
who is connected, their traffic and addresses, the pools, both backends, hostile names."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import node_exporter
import ra_lab
from conftest import BACKENDS, require, run_collector
from promfile import by_tunnel, samples, value

CLIENTS = 20  # of each kind
IPSEC_CONF_TUNNELS = {"rw-eap", "rw-xauth", "rw-cert"}


@pytest.fixture(scope="module")
def ra(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ra_lab.RaLab]:
    require(ra_lab.missing_tools(), "the remote-access lab")
    started = ra_lab.start_ra_lab(tmp_path_factory.mktemp("ra"), CLIENTS)
    yield started
    started.destroy()


def collect(ra: ra_lab.RaLab, backend: str, *more: str) -> str:
    """The collector's file, run on the gateway as cron would run it there."""
    proc = run_collector("--output", "-", "--backend", backend, *more, prefix=ra.gateway.nsenter())
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr
    return proc.stdout


def per_client(text: str, metric: str) -> dict[tuple[str, str], float]:
    return {(dict(labels)["tunnel"], dict(labels)["client"]): v
            for (name, labels), v in samples(text).items() if name == metric}


def pools(text: str) -> dict[tuple[str, str], float]:
    return {(dict(labels)["pool"], dict(labels).get("state", "size")): v for (name, labels), v in samples(text).items()
            if name in ("ipsec_pool_leases", "ipsec_pool_addresses")}


def client_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The ipsec.conf tunnels' per-client series, less the seconds connected (a clock)."""
    return {key: v for key, v in samples(text).items() if key[0].startswith("ipsec_client_")
            and key[0] != "ipsec_client_connected_seconds" and dict(key[1])["tunnel"] in IPSEC_CONF_TUNNELS}


def test_every_client_of_every_kind_is_reported_and_both_backends_agree(ra: ra_lab.RaLab) -> None:
    stroke, vici, auto = (collect(ra, backend) for backend in (*BACKENDS, "auto"))
    # 20 of each kind; eap-twice is a second session of user0.
    assert {t: by_tunnel(vici, "ipsec_tunnel_clients")[t] for t in ("rw-eap", "rw-xauth", "rw-cert", "rw-swan")} \
        == {"rw-eap": CLIENTS + 1, "rw-xauth": CLIENTS, "rw-cert": CLIENTS, "rw-swan": CLIENTS}
    assert by_tunnel(vici, "ipsec_tunnel_remote_access") == {t: 1 for t in (*IPSEC_CONF_TUNNELS, "rw-swan")}
    names = set(per_client(vici, "ipsec_client_sessions"))
    assert len(names) == 4 * CLIENTS
    assert {("rw-eap", "user7"), ("rw-xauth", "xuser7"), ("rw-cert", "O=lab, CN=cert7"), ("rw-swan", "suser7")} <= names
    assert per_client(vici, "ipsec_client_sessions")[("rw-eap", "user0")] == 2
    assert client_samples(stroke) == client_samples(vici) == client_samples(auto)
    # ipsec.conf's pools through stroke (statusall) and through VICI (which asks `ipsec leases`
    # for them), swanctl.conf's pool through VICI alone.
    ipsec_conf_pools = {k: v for k, v in pools(vici).items() if k[0] != ra_lab.SWAN_POOL}
    assert pools(stroke) == ipsec_conf_pools
    # charon counts user0's one address twice, once per session.
    assert ipsec_conf_pools[(ra_lab.EAP_POOL, "online")] == CLIENTS + 1
    assert pools(vici)[(ra_lab.SWAN_POOL, "online")] == CLIENTS
    assert pools(vici)[(ra_lab.SWAN_POOL, "size")] == 62
    assert pools(auto) == pools(vici)


def test_traffic_from_one_clients_virtual_ip_counts_on_that_client_alone(ra: ra_lab.RaLab) -> None:
    before = {b: per_client(collect(ra, b), "ipsec_client_in_bytes_total") for b in BACKENDS}
    virtual_ip = ra.send_from("xauth-7", 4, 200)  # 228 bytes each on the wire
    for backend in BACKENDS:
        text = collect(ra, backend)
        after = per_client(text, "ipsec_client_in_bytes_total")
        moved = {k: after[k] - before[backend].get(k, 0) for k in after if after[k] != before[backend].get(k, 0)}
        assert moved == {("rw-xauth", "xuser7"): 4 * 228}, backend
        info = [dict(labels) for (name, labels) in samples(text) if name == "ipsec_client_info"
                and dict(labels)["client"] == "xuser7"]
        assert [i["virtual_ip"] for i in info] == [virtual_ip]


def test_clients_leave_and_come_back_and_their_leases_go_offline(ra: ra_lab.RaLab) -> None:
    before = collect(ra, "vici")
    ra.down("cert-3", "swan-5")
    try:
        ra.wait_established(4 * CLIENTS - 1)
        for backend in BACKENDS:
            text = collect(ra, backend)
            assert by_tunnel(text, "ipsec_tunnel_clients")["rw-cert"] == CLIENTS - 1
            assert ("rw-cert", "O=lab, CN=cert3") not in per_client(text, "ipsec_client_sessions")
            assert pools(text)[(ra_lab.CERT_POOL, "offline")] == pools(before)[(ra_lab.CERT_POOL, "offline")] + 1
            assert pools(text)[(ra_lab.CERT_POOL, "online")] == CLIENTS - 1
        assert pools(text)[(ra_lab.SWAN_POOL, "offline")] == 1
        assert by_tunnel(text, "ipsec_status")["rw-cert"] == 0
    finally:
        ra.up("cert-3", "swan-5")
        ra.wait_established(4 * CLIENTS + 1)
    back = collect(ra, "vici")
    assert ("rw-cert", "O=lab, CN=cert3") in per_client(back, "ipsec_client_sessions")
    # Its lease is its own again: online, none left offline.
    assert pools(back) == pools(before)


def test_max_clients_bounds_the_series_live(ra: ra_lab.RaLab) -> None:
    proc = run_collector("--output", "-", "--max-clients", "10", prefix=ra.gateway.nsenter())
    assert proc.returncode == 0 and f"{4 * CLIENTS - 10} clients of remote-access tunnels left out" in proc.stderr
    assert len(per_client(proc.stdout, "ipsec_client_sessions")) == 10
    assert value(proc.stdout, "ipsec_clients_left_out") == 4 * CLIENTS - 10
    none = collect(ra, "auto", "--max-clients", "0")
    assert not per_client(none, "ipsec_client_sessions") and value(none, "ipsec_clients_left_out") == 4 * CLIENTS


def test_hostile_client_names_from_a_real_peer_make_a_valid_file(ra: ra_lab.RaLab, tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    require([] if promtool else ["promtool"], "checking metrics")
    require([] if shutil.which(node_exporter.BINARY) else [node_exporter.BINARY], "node_exporter's check")
    ra.connect_hostile()
    for backend in BACKENDS:
        out = tmp_path / backend / "ipsec.prom"
        out.parent.mkdir()
        proc = run_collector("--output", str(out), "--backend", backend, prefix=ra.gateway.nsenter())
        assert (proc.returncode, proc.stderr) == (0, "")
        text = out.read_text(encoding="utf-8")
        check = subprocess.run([str(promtool), "check", "metrics"], input=text, capture_output=True, text=True,
                               timeout=60, check=False)
        assert check.returncode == 0, check.stdout + check.stderr
        scraped = node_exporter.scrape_once(out.parent)
        assert "node_textfile_scrape_error 0" in scraped
        names = {client for tunnel, client in per_client(scraped, "ipsec_client_sessions")}
        # charon prints the bytes it cannot print as "?"; quotes and backslashes stay.
        assert {'q"uote"', "back\\slash\\", "new?line??[31m", "bad???bytes"} <= names
        assert "x[99]: ESTABLISHED 1 second ago, 10.99.0.1[a]...10.99.0.9[b]" in names
        # charon prints the first 511 characters of a name: the two 10 kB users, differing only
        # in their last, are one name to it, capped here with a hash of what it printed.
        long_names = [n for n in names if n.startswith("LLLL")]
        assert len(long_names) == 1 and len(long_names[0]) <= 128
        assert per_client(scraped, "ipsec_client_sessions")[("rw-xauth", long_names[0])] == 2
        # The forged SA opened nothing: every client is one of the lab's.
        assert by_tunnel(scraped, "ipsec_tunnel_clients")["rw-eap"] == CLIENTS + 1 + 5
        established = samples(scraped)[("ipsec_ike_sas", (("state", "ESTABLISHED"),))]
        assert established == 4 * CLIENTS + 1 + len(ra_lab.HOSTILE_CLIENTS)


def test_vici_asks_stroke_once_for_ipsec_conf_pools_and_stroke_nothing_more_for_them(
        ra: ra_lab.RaLab, tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    counting = tmp_path / "counting-ipsec"
    counting.write_text(f'#!/bin/sh\necho "$*" >> {calls}\nexec ipsec "$@"\n')
    counting.chmod(0o755)
    # stroke's second query is the certificates' (`listall --utc`), not the pools'.
    for backend, asked in (("vici", "leases\n"), ("auto", "leases\n"), ("stroke", "statusall\nlistall --utc\n")):
        calls.write_text("")
        text = collect(ra, backend, "--ipsec", str(counting))
        assert calls.read_text() == asked, backend
        assert (ra_lab.EAP_POOL, "size") in pools(text)



def test_a_half_open_ike_sa_is_never_a_client(ra: ra_lab.RaLab, tmp_path: Path) -> None:
    # A peer whose EAP authentication fails (charon's EAP-MSCHAPv2 refuses a 10 kB user name)
    # leaves an IKE SA CONNECTING on the gateway for a while, under an identity it chose.
    conf = tmp_path / "half.conf"
    conf.write_text(
        "connections {\n half {\n  local_addrs = 10.99.0.2\n  remote_addrs = 10.99.0.1\n  vips = 0.0.0.0\n"
        f'  local {{ auth = eap\n   id = half@eap.lab\n   eap_id = "{"H" * 10240}" }}\n'
        f"  remote {{ auth = pubkey\n   id = {ra_lab.GATEWAY_ID} }}\n"
        f"  children {{ half {{ remote_ts = {ra_lab.GATEWAY_NET}\n   esp_proposals = aes128-sha256 }} }}\n"
        " }\n}\n")
    before = by_tunnel(collect(ra, "vici"), "ipsec_tunnel_clients")["rw-eap"]
    ra_lab.lab.run([*ra.client.nsenter(), "swanctl", "--load-conns", "--file", str(conf)], timeout=30)
    ra_lab.lab.run([*ra.client.nsenter(), "swanctl", "--initiate", "--child", "half", "--timeout", "20"],
                   timeout=60, check=False)
    for backend in BACKENDS:
        text = collect(ra, backend)
        assert samples(text)[("ipsec_ike_sas", (("state", "CONNECTING"),))] >= 1, backend
        clients = per_client(text, "ipsec_client_sessions")
        assert not [name for tunnel, name in clients if "half" in name or name.startswith("HHHH")], backend
        assert by_tunnel(text, "ipsec_tunnel_clients")["rw-eap"] == before, backend
