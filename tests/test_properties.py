"""Property tests: whatever the input, the parsers answer or raise their documented error."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

import ipsec_textfile as it

CONFIG_PIECES = st.sampled_from([
    "conn ", "ca ", "config setup", "include ", "also=", "auto=", "add", "%default", "\n", "  ",
    "\t", "=", '"', "\\", "#", "version", "\r", "a", "b", " ", "*", "/",
])


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=300), st.lists(CONFIG_PIECES, max_size=60).map(lambda p: "".join(p).encode())))
def test_any_config_yields_tunnels_or_a_config_error(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "ipsec.conf"
        conf.write_bytes(data)
        try:
            tunnels = it.read_config(str(conf))
        except it.ConfigError as e:
            assert str(e)
            return
    assert all(isinstance(t.name, str) and t.name and t.name != "%default" for t in tunnels)


STATUS_PIECES = st.sampled_from([
    "Status of IKE charon daemon (strongSwan 5.9.8):\n", "Security Associations (1 up, 0 connecting):\n",
    "  a[1]: ESTABLISHED 1 second ago\n", "  a{1}:  INSTALLED, TUNNEL\n", "b{2}:  ROUTED\n", "[", "{",
    "}", "]", ":", " ", "\n", "x", "9", "ESTABLISHED", "\x00",
])


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=300), st.lists(STATUS_PIECES, max_size=40).map("".join)))
def test_any_statusall_yields_a_snapshot_or_a_daemon_error(text: str) -> None:
    try:
        snapshot = it.parse_statusall(text)
    except it.DaemonError as e:
        assert str(e)
        return
    assert all(sa.name and sa.state.isupper() for sa in snapshot.ike_sas + snapshot.child_sas)


NAMES = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=20)


def quoted(name: str) -> str:
    escaped = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
    return '"' + "".join(escaped.get(c, c) for c in name) + '"'


@settings(max_examples=200, deadline=None)
@given(st.lists(NAMES.filter(lambda n: n != "%default"), min_size=1, max_size=8, unique=True))
def test_generated_conn_names_round_trip(names: list[str]) -> None:
    text = "".join(f"conn {quoted(name)}\n    auto=add\n" for name in names)
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "ipsec.conf"
        conf.write_text(text)
        tunnels = it.read_config(str(conf))
    assert [t.name for t in tunnels] == names
    assert all(t.loaded for t in tunnels)
