"""The daemon's answers as a real charon gave them (stroke and VICI), and what each tunnel gets."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import ipsec_textfile as it
import lab
from conftest import FIXTURES, vici_answer

STATES = FIXTURES / "states"
SWANCTL = FIXTURES / "swanctl"


def states_snapshot() -> it.DaemonState:
    return it.parse_statusall((STATES / "statusall.txt").read_text())


def states_tunnels() -> list[it.Tunnel]:
    return it.read_config(str(STATES / "etc" / "ipsec.conf"), root=str(STATES))


def by_name(statuses: list[it.TunnelStatus]) -> dict[str, it.TunnelStatus]:
    return {s.name: s for s in statuses}


def test_every_tunnel_of_the_captured_lab_gets_its_status() -> None:
    statuses = {s.name: s.status for s in it.classify(states_tunnels(), states_snapshot())}
    assert statuses == lab.STATES_EXPECTED


def test_routed_trap_is_down_but_flagged_routed() -> None:
    routed = {s.name for s in it.classify(states_tunnels(), states_snapshot()) if s.routed}
    assert routed == {"routed"}


def test_parser_finds_ike_and_child_sas_with_their_states() -> None:
    snapshot = states_snapshot()
    assert {(sa.name, sa.state) for sa in snapshot.ike_sas} == {
        ("up", "ESTABLISHED"), ("ike", "ESTABLISHED"), ("connecting", "CONNECTING")}
    assert {(sa.name, sa.state) for sa in snapshot.child_sas} == {
        ("up", "INSTALLED"), ("site", "INSTALLED"), ("a.b_c-d", "INSTALLED"),
        ("included", "INSTALLED"), ("alsoconn", "INSTALLED")}
    assert snapshot.routed == {"routed"}
    carriers = {sa.uid: sa.name for sa in snapshot.ike_sas}
    assert {carriers[c.ike_uid] for c in snapshot.child_sas} == {"up"}


def test_stroke_traffic_counts_plural_and_singular_packets() -> None:
    # The capture sent 5 and 1 UDP datagrams of 100 bytes (128 on the wire) each way.
    traffic = {c.name: c.traffic for c in states_snapshot().child_sas}
    assert traffic["up"] == it.Traffic(bytes_in=640, bytes_out=640, packets_in=5, packets_out=5)
    assert traffic["site"] == it.Traffic(128, 128, 1, 1)  # "(1 pkt, ...)"
    assert traffic["included"] == it.Traffic()  # "0 bytes_i" with no packet count


def test_stroke_times_in_seconds() -> None:
    snapshot = states_snapshot()
    text = (STATES / "statusall.txt").read_text()
    up, ike = (next(sa for sa in snapshot.ike_sas if sa.name == name) for name in ("up", "ike"))
    # "ESTABLISHED 1 second ago", "reauthentication in 2 days" (ikelifetime=3d), "... in 43
    # minutes" (ikelifetime=1h): stroke's units, in seconds.
    assert up.age is not None and up.age > 0 and f"up[1]: ESTABLISHED {up.age:g} second" in text
    assert up.next_rekey is not None and f"reauthentication in {up.next_rekey / 86400:g} days" in text
    assert up.next_rekey >= 2 * 86400
    assert ike.next_rekey is not None and f"reauthentication in {ike.next_rekey / 60:g} minutes" in text
    swanctl = it.parse_statusall((SWANCTL / "statusall.txt").read_text())
    gw_ike = next(sa for sa in swanctl.ike_sas if sa.name == "gw-ike")
    assert gw_ike.next_rekey is not None
    assert f"rekeying in {gw_ike.next_rekey / 3600:g} hours" in (SWANCTL / "statusall.txt").read_text()
    assert snapshot.version == "5.9.8"
    assert snapshot.uptime is not None and snapshot.uptime > 0
    connecting = next(sa for sa in snapshot.ike_sas if sa.name == "connecting")
    assert (connecting.age, connecting.next_rekey) == (None, None)


def test_next_rekey_is_the_rekey_or_the_reauthentication_whichever_comes_first() -> None:
    # swanctl.conf's gw: rekey_time 1h, reauth_time 2h; charon schedules both.
    text = (SWANCTL / "statusall.txt").read_text()
    line = next(line for line in text.splitlines() if "gw[1]: IKEv2 SPIs" in line)
    stroke = {word: int(n) * {"minutes": 60, "hours": 3600}[unit] for word, n, unit in
              re.findall(r"(rekeying|reauthentication) in (\d+) (minutes|hours)", line)}
    assert set(stroke) == {"rekeying", "reauthentication"} and stroke["rekeying"] < stroke["reauthentication"]
    (gw,) = (sa for sa in it.parse_statusall(text).ike_sas if sa.name == "gw")
    assert gw.next_rekey == min(stroke.values())
    answer = vici_answer(SWANCTL)
    vici_gw = next(event["gw"] for event in answer["list-sas"] if "gw" in event)
    times = [int(vici_gw["rekey-time"]), int(vici_gw["reauth-time"])]
    assert times[0] < times[1]
    (gw,) = (sa for sa in it.parse_vici(answer).ike_sas if sa.name == "gw")
    assert gw.next_rekey == min(times)


def test_vici_answer_gives_every_ipsec_conf_tunnel_the_same_as_stroke() -> None:
    # Both answers were taken back to back from one daemon.
    stroke = by_name(it.classify(states_tunnels(), states_snapshot()))
    vici_state = it.parse_vici(vici_answer(STATES))
    vici = by_name(it.classify(it.all_tunnels(states_tunnels(), vici_state.loaded), vici_state))
    assert {n: s.status for n, s in vici.items()} == lab.STATES_EXPECTED
    assert {n: (s.status, s.routed) for n, s in vici.items()} == {
        n: (s.status, s.routed) for n, s in stroke.items()}
    for name, status in stroke.items():
        if status.detail is not None:
            assert vici[name].detail is not None
            assert vici[name].detail.traffic == status.detail.traffic, name
            assert vici[name].detail.installed_child_sas == status.detail.installed_child_sas


def test_vici_swanctl_tunnels_come_from_the_daemon() -> None:
    state = it.parse_vici(vici_answer(SWANCTL))
    statuses = by_name(it.classify(it.all_tunnels([], state.loaded), state))
    assert {n: s.status for n, s in statuses.items()} == lab.SWANCTL_EXPECTED
    assert {n for n, s in statuses.items() if s.routed} == {"net-routed"}
    up = statuses["net-up"].detail
    assert up is not None and up.traffic == it.Traffic(640, 640, 5, 5)
    assert up.ike is not None and up.ike.name == "gw" and up.ike.next_rekey is not None


def test_vici_ike_sa_dropped_for_its_size_is_an_error_not_a_down_tunnel() -> None:
    # charon leaves out an IKE SA whose list-sas message passes VICI's limit;
    # stats still counts it.
    answer = vici_answer(STATES)
    answer["list-sas"] = [event for event in answer["list-sas"] if "up" not in event]
    with pytest.raises(it.DaemonError, match="message size limit"):
        it.parse_vici(answer)


def test_ipsec_conf_tunnels_come_first_and_names_stay_unique() -> None:
    configured = [it.Tunnel("a", "add", shunt=False, loaded=True)]
    loaded = [it.Tunnel("b", None, shunt=False, loaded=True, ike="x"),
              it.Tunnel("a", None, shunt=False, loaded=True, ike="y"),
              it.Tunnel("b", None, shunt=False, loaded=True, ike="z")]
    assert [(t.name, t.ike) for t in it.all_tunnels(configured, loaded)] == [("a", None), ("b", "x")]


def test_names_match_exactly_not_as_prefixes() -> None:
    snapshot = states_snapshot()
    neighbours = [it.Tunnel(name, "add", shunt=False, loaded=True)
                  for name in ("sit", "site", "sites", "ike", "ike-only", "u", "up")]
    statuses = {s.name: s.status for s in it.classify(neighbours, snapshot)}
    assert statuses == {"sit": 2, "site": 0, "sites": 2, "ike": 1, "ike-only": 2, "u": 2, "up": 0}


@pytest.mark.parametrize("text", ["", "failed to connect to stroke socket\n", "garbage\x00\n"])
def test_output_without_a_daemon_status_is_an_error(text: str) -> None:
    with pytest.raises(it.DaemonError):
        it.parse_statusall(text)


def test_truncated_output_keeps_what_arrived() -> None:
    # The header and the first SAs survive a cut; tunnels past the cut read as down,
    # so a cut never makes a tunnel look up that is not.
    text = (STATES / "statusall.txt").read_text()
    cut = text[: text.index("    included{")]
    snapshot = it.parse_statusall(cut)
    assert not any(sa.name == "included" for sa in snapshot.child_sas)
    assert any(sa.name == "site" and sa.state == "INSTALLED" for sa in snapshot.child_sas)


def test_vici_answer_without_a_field_it_needs_is_a_daemon_error(monkeypatch: pytest.MonkeyPatch) -> None:
    answer = vici_answer(STATES)
    up = next(event["up"] for event in answer["list-sas"] if "up" in event)
    del up["uniqueid"]
    monkeypatch.setattr(it.ViciDaemon, "send_questions", lambda self, deadline: lambda: answer)
    with pytest.raises(it.DaemonError, match="unexpected VICI answer .*KeyError 'uniqueid'"):
        it.ViciDaemon("charon.vici").ask()()


REKEYED = FIXTURES / "rekeyed"


@pytest.mark.parametrize("capture", ["statusall.txt", "statusall-before-5.3.txt"])
def test_a_tunnel_whose_child_sa_is_being_rekeyed_is_up_with_both_sas_counted(capture: str) -> None:
    # The old CHILD SA (REKEYED) and its INSTALLED successor, listed one after the other;
    # before strongSwan 5.3 both carry the same {reqid}.
    text = (REKEYED / capture).read_text()
    snapshot = it.parse_statusall(text)
    assert sorted(c.state for c in snapshot.child_sas) == ["INSTALLED", "REKEYED"]
    assert len({c.uid for c in snapshot.child_sas}) == (1 if "before-5.3" in capture else 2)
    (status,) = it.classify(it.read_config(str(REKEYED / "etc" / "ipsec.conf")), snapshot)
    assert (status.name, status.status) == ("v1", it.STATUS_UP)
    assert status.detail is not None and status.detail.installed_child_sas == 1
    # The capture sent 2 datagrams of 100 bytes through the new SA after the rekey.
    assert status.detail.traffic == sum((c.traffic for c in snapshot.child_sas), it.Traffic())
    assert status.detail.traffic == it.Traffic(256, 256, 2, 2)


def test_both_backends_agree_on_a_rekeyed_tunnel_except_the_old_sas_traffic_stroke_hides() -> None:
    # Taken back to back: VICI lists traffic for a CHILD SA that is INSTALLED, REKEYING or
    # REKEYED; stroke prints a traffic line for INSTALLED ones only (charon's vici_query.c and
    # stroke_list.c). The old SA's traffic is real: VICI's sum is the tunnel's traffic.
    tunnels = it.read_config(str(REKEYED / "etc" / "ipsec.conf"))
    (stroke,) = it.classify(tunnels, it.parse_statusall((REKEYED / "statusall.txt").read_text()))
    vici_state = it.parse_vici(vici_answer(REKEYED))
    (vici,) = it.classify(it.all_tunnels(tunnels, vici_state.loaded), vici_state)
    assert stroke.detail is not None and vici.detail is not None
    assert (vici.name, vici.status, vici.routed) == (stroke.name, stroke.status, stroke.routed) == ("v1", 0, False)
    assert vici.detail.installed_child_sas == stroke.detail.installed_child_sas == 1
    assert vici.detail.config == stroke.detail.config
    assert vici.detail.ike is not None and stroke.detail.ike is not None
    assert (vici.detail.ike.uid, vici.detail.ike.state) == (stroke.detail.ike.uid, stroke.detail.ike.state)
    # 3 datagrams of 100 bytes (128 on the wire) came in before the rekey, 2 each way after.
    old = next(c for c in vici_state.child_sas if c.state == "REKEYED").traffic
    assert old == it.Traffic(384, 0, 3, 0)
    assert stroke.detail.traffic == it.Traffic(256, 256, 2, 2)
    assert vici.detail.traffic == stroke.detail.traffic + old == it.Traffic(640, 256, 5, 2)


def test_a_weakswan_build_is_read_like_strongswan() -> None:
    # The build's name when aggressive-mode PSK is forced; nothing else changes.
    text = (STATES / "statusall.txt").read_text()
    weak = text.replace("charon daemon (strongSwan 5.9.8", "charon daemon (weakSwan 5.9.8", 1)
    assert weak != text
    snapshot = it.parse_statusall(weak)
    assert snapshot.version == "5.9.8"
    assert {s.name: s.status for s in it.classify(states_tunnels(), snapshot)} == lab.STATES_EXPECTED


@pytest.mark.parametrize("fixture", [STATES, SWANCTL, REKEYED])
def test_both_backends_read_the_same_loaded_configs(fixture: Path) -> None:
    stroke = it.parse_statusall((fixture / "statusall.txt").read_text()).configs
    vici = it.parse_vici(vici_answer(fixture)).configs
    assert stroke == vici and len(stroke) >= 1


def test_loaded_configs_say_where_each_tunnel_goes() -> None:
    configs = states_snapshot().configs
    # site shares up's IKE config (stroke lists it under up); connecting goes to the silent peer.
    assert configs["site"] == it.TunnelConfig("up", "10.99.0.1", "10.99.0.2", "10.1.2.0/24", "10.2.2.0/24", "IKEv2")
    assert configs["connecting"].remote == "10.99.0.3"
    assert "ignored" not in configs and "template" not in configs  # never loaded
    # A name wider than stroke's right-aligned column, and swanctl's "any IKE version".
    swanctl = it.parse_statusall((SWANCTL / "statusall.txt").read_text()).configs
    assert swanctl["net-connecting"] == it.TunnelConfig("lost", "10.99.0.1", "10.99.0.3", "10.1.9.0/24",
                                                        "10.2.9.0/24", "IKEv1/2")


def test_tunnel_info_is_one_series_per_tunnel_the_daemon_loaded() -> None:
    snapshot = states_snapshot()
    result = it.RunResult(it.classify(states_tunnels(), snapshot), snapshot, 0.0, 0.0)
    (info,) = [f for f in it.metric_families(result) if f.name == "ipsec_tunnel"]
    labels = {s.labels["tunnel"]: s.labels for s in info.samples}
    # Ignored tunnels (4) get ipsec_status alone, as everywhere else.
    assert set(labels) == {n for n, v in lab.STATES_EXPECTED.items() if v != 4}
    assert labels["site"] == {"tunnel": "site", "ike": "up", "local": "10.99.0.1", "remote": "10.99.0.2",
                              "local_ts": "10.1.2.0/24", "remote_ts": "10.2.2.0/24", "ike_version": "IKEv2"}
    assert {s.value for s in info.samples} == {1}
