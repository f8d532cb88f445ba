"""Remote-access gateways from a real charon's answers (tests/fixtures/remote-access, captured
from tests/ra_lab.py): which tunnels serve many clients, who is connected, with which
address and traffic, how full the pools are; stroke and VICI alike."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

import ipsec_textfile as it
from conftest import FIXTURES, require, run_collector, vici_answer
from promfile import by_tunnel, samples, value

RA = FIXTURES / "remote-access"
STATES = FIXTURES / "states"
IPSEC_CONF_TUNNELS = {"rw-eap", "rw-xauth", "rw-cert"}  # rw-swan is swanctl.conf's (VICI only)


def stroke_state() -> it.DaemonState:
    return it.parse_statusall((RA / "statusall.txt").read_text())


def vici_state() -> it.DaemonState:
    return it.parse_vici(vici_answer(RA))


def ra_tunnels() -> list[it.Tunnel]:
    return it.read_config(str(RA / "etc" / "ipsec.conf"))


def statuses(state: it.DaemonState) -> dict[str, it.TunnelStatus]:
    return {s.name: s for s in it.classify(it.all_tunnels(ra_tunnels(), state.loaded), state)}


def exposition(state: it.DaemonState, max_clients: int = it.DEFAULT_MAX_CLIENTS) -> str:
    classified = it.classify(it.all_tunnels(ra_tunnels(), state.loaded), state)
    result = it.RunResult(classified, state, 0.0, 0.0, it.select_clients(classified, max_clients))
    return generate_latest(it.build_registry(result)).decode()


def client_samples(text: str, tunnels: set[str]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The per-client series of those tunnels, less the seconds connected (a clock)."""
    return {key: v for key, v in samples(text).items() if key[0].startswith("ipsec_client_")
            and key[0] != "ipsec_client_connected_seconds" and dict(key[1])["tunnel"] in tunnels}


def per_client(text: str, metric: str) -> dict[tuple[str, str], float]:
    return {(dict(labels)["tunnel"], dict(labels)["client"]): v
            for (name, labels), v in samples(text).items() if name == metric}


# ---------------------------------------------------------------- which tunnels are remote access


@pytest.mark.parametrize(("remote", "many"), [
    ("%any", True), ("%any6", True), ("", True), ("10.0.0.0/8", True), ("2001:db8::/64", True),
    ("10.0.0.1-10.0.0.9", True), ("10.99.0.2,10.99.0.3", True), ("vpn.example.org,192.0.2.1", True),
    ("10.99.0.2", False), ("2001:db8::1", False), ("peer-1.example.org", False), ("%peer-gw", False),
])
def test_a_remote_that_admits_more_than_one_peer_is_remote_access(remote: str, many: bool) -> None:
    assert it.serves_many(remote) is many


@pytest.mark.parametrize("state", [stroke_state, vici_state])
def test_right_any_tunnels_are_remote_access_and_count_their_clients(state: object) -> None:
    got = statuses(state())  # type: ignore[operator]
    # 3 clients of each kind connected, xauth-2 and swan-2 left, user0 twice (CAPTURE.md).
    clients = {name: s.detail.clients for name, s in got.items() if s.detail}
    assert {name: clients[name] for name in IPSEC_CONF_TUNNELS} == {"rw-eap": 4, "rw-xauth": 2, "rw-cert": 3}
    assert all(s.detail and s.detail.remote_access for s in got.values())
    assert {name: s.status for name, s in got.items()} == {name: 0 for name in got}


def test_site_to_site_tunnels_are_not_remote_access_and_have_one_client_at_most() -> None:
    state = it.parse_statusall((STATES / "statusall.txt").read_text())
    tunnels = it.read_config(str(STATES / "etc" / "ipsec.conf"), root=str(STATES))
    got = {s.name: s.detail for s in it.classify(tunnels, state) if s.detail}
    assert not any(d.remote_access for d in got.values())
    # up carries site and the others on its IKE SA; connecting's IKE SA is not established.
    assert {name: d.clients for name, d in got.items()} == {
        "up": 1, "site": 1, "sit": 0, "a.b_c-d": 1, "included": 1, "alsoconn": 1, "ike": 1, "ike-only": 0,
        "connecting": 0, "routed": 0}
    text = exposition(state)
    assert not [key for key in samples(text) if key[0].startswith("ipsec_client_")]


def test_a_half_open_ike_sa_is_no_client_even_on_a_remote_access_tunnel() -> None:
    # The states lab's CONNECTING IKE SA, its tunnel's remote made %any: a peer that has not
    # authenticated picks its own identity, which must never become a client.
    state = it.parse_statusall((STATES / "statusall.txt").read_text())
    configs = dict(state.configs, connecting=replace(state.configs["connecting"], remote="%any"))
    tunnels = it.read_config(str(STATES / "etc" / "ipsec.conf"), root=str(STATES))
    got = {s.name: s for s in it.classify(tunnels, replace(state, configs=configs))}
    detail = got["connecting"].detail
    assert detail is not None and detail.remote_access and (detail.clients, detail.sessions) == (0, ())
    assert got["connecting"].status == 3  # ipsec_status keeps its value


# ---------------------------------------------------------------- per client


def test_each_client_is_named_by_eap_identity_else_xauth_user_else_ike_identity() -> None:
    text = exposition(stroke_state())
    assert set(per_client(text, "ipsec_client_sessions")) == {
        ("rw-eap", "user0"), ("rw-eap", "user1"), ("rw-eap", "user2"),
        ("rw-xauth", "xuser0"), ("rw-xauth", "xuser1"),
        ("rw-cert", "O=lab, CN=cert0"), ("rw-cert", "O=lab, CN=cert1"), ("rw-cert", "O=lab, CN=cert2")}


def test_a_clients_bytes_are_its_own_child_sas_only() -> None:
    # eap-1 (user1) sent 5 datagrams of 100 bytes (128 with headers), cert-0 sent 2: nobody else.
    for state in (stroke_state(), vici_state()):
        text = exposition(state)
        moved = {k: v for k, v in per_client(text, "ipsec_client_in_bytes_total").items() if v}
        assert moved == {("rw-eap", "user1"): 640, ("rw-cert", "O=lab, CN=cert0"): 256}
        assert per_client(text, "ipsec_client_out_packets_total")[("rw-eap", "user1")] == 5
        # The tunnel's own counter is the sum of its clients'.
        assert by_tunnel(text, "ipsec_in_bytes_total")["rw-eap"] == 640


def test_two_sessions_of_one_client_are_summed_with_their_info() -> None:
    text = exposition(stroke_state())
    assert per_client(text, "ipsec_client_sessions")[("rw-eap", "user0")] == 2
    # Both sessions came from one address and got one lease: their info series is one.
    info = [dict(labels) for (name, labels) in samples(text) if name == "ipsec_client_info"
            and dict(labels)["client"] == "user0"]
    assert info == [{"tunnel": "rw-eap", "client": "user0", "remote_host": "10.99.0.2",
                     "virtual_ip": "10.98.0.1", "ike_version": "IKEv2"}]


def test_client_info_has_address_virtual_ip_and_ike_version() -> None:
    text = exposition(stroke_state())
    info = {dict(labels)["client"]: dict(labels) for (name, labels) in samples(text) if name == "ipsec_client_info"}
    leases = {m.group(2): m.group(1) for m in re.finditer(r"^ +(\S+) +online +'(.*)'$",
                                                         (RA / "leases.txt").read_text(), re.MULTILINE)}
    assert len(leases) == 8
    assert {client: i["virtual_ip"] for client, i in info.items() if client in leases} == leases
    assert info["xuser1"]["ike_version"] == "IKEv1" and info["user1"]["ike_version"] == "IKEv2"
    assert {i["remote_host"] for i in info.values()} == {"10.99.0.2"}


def test_stroke_and_vici_agree_on_every_client() -> None:
    stroke, vici = exposition(stroke_state()), exposition(vici_state())
    assert client_samples(stroke, IPSEC_CONF_TUNNELS) == client_samples(vici, IPSEC_CONF_TUNNELS)
    assert client_samples(stroke, IPSEC_CONF_TUNNELS)
    # VICI also knows swanctl.conf's rw-swan, and its clients.
    assert {client for tunnel, client in per_client(vici, "ipsec_client_sessions") if tunnel == "rw-swan"} == {
        "suser0", "suser1"}


# ---------------------------------------------------------------- the bound


def test_max_clients_keeps_the_first_names_and_counts_the_rest(tmp_path: Path) -> None:
    out = tmp_path / "ipsec.prom"
    proc = run_collector("--config", str(RA / "etc" / "ipsec.conf"), "--status-file", str(RA / "statusall.txt"),
                         "--output", str(out), "--max-clients", "3")
    assert proc.returncode == 0
    assert "5 clients of remote-access tunnels left out" in proc.stderr
    text = out.read_text()
    assert set(per_client(text, "ipsec_client_sessions")) == {
        ("rw-cert", "O=lab, CN=cert0"), ("rw-cert", "O=lab, CN=cert1"), ("rw-cert", "O=lab, CN=cert2")}
    assert value(text, "ipsec_clients_left_out") == 5
    assert by_tunnel(text, "ipsec_tunnel_clients")["rw-eap"] == 4  # the per-tunnel count is whole


def test_max_clients_0_writes_no_client_series(tmp_path: Path) -> None:
    out = tmp_path / "ipsec.prom"
    proc = run_collector("--config", str(RA / "etc" / "ipsec.conf"), "--status-file", str(RA / "statusall.txt"),
                         "--output", str(out), "--max-clients", "0")
    assert (proc.returncode, proc.stderr) == (0, "")
    text = out.read_text()
    assert not [key for key in samples(text) if key[0].startswith("ipsec_client_")]
    assert value(text, "ipsec_clients_left_out") == 8


def test_the_default_bound_keeps_every_client_of_a_2000_user_concentrator() -> None:
    assert it.DEFAULT_MAX_CLIENTS >= 2000


# ---------------------------------------------------------------- hostile names


HOSTILE = ['a"b', "back\\slash", "new\nline", "cr\rtab\t", "bad\udcff\udcfebytes", "\ufffd\u00e9", "x" * 10240,
           "x" * 10239 + "y", "\x00nul", "\x1b[31mred"]


def test_hostile_names_become_valid_capped_distinct_labels() -> None:
    labels = [it.client_label(name) for name in HOSTILE]
    assert all(len(label) <= it.CLIENT_NAME_MAX for label in labels)
    assert len(set(labels)) == len(HOSTILE)  # two 10 kB names differing at the end stay two
    assert all(not any(ord(c) < 32 or 127 <= ord(c) < 160 for c in label) for label in labels)
    assert labels[0] == 'a"b' and labels[1] == "back\\slash"  # the exposition escapes these


def test_hostile_client_names_make_a_file_promtool_and_the_parser_accept() -> None:
    state = stroke_state()
    eap = [sa for sa in state.ike_sas if sa.name == "rw-eap"]
    hostile = dict(zip((sa.uid for sa in eap), HOSTILE[2:]))
    named = [replace(sa, eap_id=hostile[sa.uid]) if sa.uid in hostile else sa for sa in state.ike_sas]
    text = exposition(replace(state, ike_sas=named))
    clients = {s.labels["client"] for f in text_string_to_metric_families(text) for s in f.samples
               if f.name == "ipsec_client_sessions" and s.labels["tunnel"] == "rw-eap"}
    assert clients == {it.client_label(name) for name in HOSTILE[2:6]}
    promtool = shutil.which("promtool")
    require([] if promtool else ["promtool"], "checking metrics")
    check = subprocess.run([str(promtool), "check", "metrics"], input=text.encode("utf-8", "surrogateescape"),
                           capture_output=True, timeout=60, check=False)
    assert check.returncode == 0, check.stdout + check.stderr


def test_a_state_word_inside_an_identity_opens_no_sa() -> None:
    # A peer may call itself "x[99]: ESTABLISHED": stroke prints it on its SA's own lines.
    text = (RA / "statusall.txt").read_text().replace("[client1@eap.lab]", "[x[99]: ESTABLISHED 1 second ago]")
    text = text.replace("Remote EAP identity: user2", "Remote EAP identity: y{98}:  INSTALLED, TUNNEL")
    forged = it.parse_statusall(text)
    assert {sa.uid for sa in forged.ike_sas} == {sa.uid for sa in stroke_state().ike_sas}
    assert {c.uid for c in forged.child_sas} == {c.uid for c in stroke_state().child_sas}
    assert {sa.remote_id for sa in forged.ike_sas if sa.eap_id == "user1"} == {"x[99]: ESTABLISHED 1 second ago"}


# ---------------------------------------------------------------- pools


def test_stroke_reports_ipsec_conf_pools_from_statusall_as_ipsec_leases_does() -> None:
    pools = stroke_state().pools
    assert pools == it.parse_stroke_leases((RA / "leases.txt").read_text())
    # xauth-2 left: its lease stays, offline.
    assert {p.name: (p.size, p.online, p.offline) for p in pools} == {
        "10.98.0.0/24": (254, 4, 0), "10.97.0.0/24": (254, 2, 1), "10.96.0.0/24": (254, 3, 0)}


def test_vici_reports_its_own_pools_by_section_name() -> None:
    # get-pools lists only pools loaded over VICI (swanctl.conf); swan-2 left.
    assert vici_state().pools == [it.Pool("swan-pool", 62, 2, 1)]


def test_pool_series() -> None:
    text = exposition(stroke_state())
    got = {tuple(sorted(dict(labels).items())): v for (name, labels), v in samples(text).items()
           if name == "ipsec_pool_leases"}
    assert got[(("pool", "10.97.0.0/24"), ("state", "offline"))] == 1
    assert got[(("pool", "10.97.0.0/24"), ("state", "online"))] == 2
    assert samples(text)[("ipsec_pool_addresses", (("pool", "10.98.0.0/24"),))] == 254
