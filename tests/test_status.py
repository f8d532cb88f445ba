"""`ipsec statusall` as a real charon prints it, and the status each tunnel gets from it."""

from __future__ import annotations

import pytest

import ipsec_textfile as it
import lab
from conftest import FIXTURES

STATES = FIXTURES / "stroke-states"


def states_snapshot() -> it.DaemonState:
    return it.parse_statusall((STATES / "statusall.txt").read_text())


def test_every_tunnel_of_the_captured_lab_gets_its_status() -> None:
    tunnels = it.read_config(str(STATES / "etc" / "ipsec.conf"), root=str(STATES))
    statuses = {s.name: s.status for s in it.classify(tunnels, states_snapshot())}
    assert statuses == lab.STATES_EXPECTED


def test_routed_trap_is_down_but_flagged_routed() -> None:
    tunnels = it.read_config(str(STATES / "etc" / "ipsec.conf"), root=str(STATES))
    routed = {s.name for s in it.classify(tunnels, states_snapshot()) if s.routed}
    assert routed == {"routed"}


def test_parser_finds_ike_and_child_sas_with_their_states() -> None:
    snapshot = states_snapshot()
    assert {(sa.name, sa.state) for sa in snapshot.ike_sas} == {
        ("up", "ESTABLISHED"), ("ike", "ESTABLISHED"), ("connecting", "CONNECTING")}
    assert {(sa.name, sa.state) for sa in snapshot.child_sas} == {
        ("up", "INSTALLED"), ("site", "INSTALLED"), ("a.b_c-d", "INSTALLED"),
        ("included", "INSTALLED"), ("alsoconn", "INSTALLED"), ("routed", "ROUTED")}


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
