"""Generated configs: our parser and strongSwan's starter must reach the same verdict."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import ipsec_textfile as it
from conftest import require
from starter_oracle import missing, starter_verdict

NAMES = st.sampled_from(["a", "b", "site", "site2", "%default", '"q.u-o_t e"', "x1"])
VALUES = {
    "auto": st.sampled_from(["add", "route", "start", "ignore", "ondemand", "", '"add"']),
    "also": st.sampled_from(["a", "b", "site", "nowhere", "%default", ""]),
    "type": st.sampled_from(["tunnel", "transport", "passthrough", "drop", "bogus"]),
    "rekeymargin": st.sampled_from(["3m", "10s", "9", "10seconds", "m"]),
    "rekeyfuzz": st.sampled_from(["100%", "50", "%"]),
    "keyingtries": st.sampled_from(["%forever", "3", "three"]),
    "leftfirewall": st.sampled_from(["yes", "no", "maybe"]),
    "leftupdown": st.just("/bin/true"),
    "mark": st.sampled_from(["%unique", "0x10/0xff", "%same", "12x"]),
    "authby": st.sampled_from(["psk", "secret", "eap", "rsa-sha2"]),
    "leftprotoport": st.sampled_from(["tcp/http", "17/53", "udp/%any", "bogus/1"]),
    "frobnicate": st.just("1"),
    "uniqueids": st.sampled_from(["no", "never", "maybe"]),
    "charondebug": st.just('"ike 2"'),
    "cacert": st.just("ca.pem"),
}
INDENT = st.sampled_from(["  ", "\t", "    ", " \t"])
EQUALS = st.sampled_from(["=", " = ", "= ", " ="])
COMMENT = st.sampled_from(["", " # note", "\t#"])


SETUP_KEYS = ["uniqueids", "charondebug", "frobnicate", "auto"]


@st.composite
def settings_lines(draw: st.DrawFn, keys_from: list[str]) -> list[str]:
    keys = draw(st.lists(st.sampled_from(keys_from), max_size=4))
    return [f"{draw(INDENT)}{key}{draw(EQUALS)}{draw(VALUES[key])}{draw(COMMENT)}" for key in keys]


@st.composite
def configs(draw: st.DrawFn) -> tuple[str, str]:
    """(main file, included file): sections of every kind, some of them in the included file."""
    files: tuple[list[str], list[str]] = ([], [])
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["conn"] * 6 + ["ca", "config setup"]))
        header = kind if kind == "config setup" else f"{kind} {draw(NAMES)}"
        keys = SETUP_KEYS if kind == "config setup" else sorted(VALUES)
        lines = [header, *draw(settings_lines(keys))]
        if draw(st.booleans()):
            extra = ["", "version 2", "# comment", "  "] * 4 + ["auto=add", "  auto", "  a=b=c"]
            lines.append(draw(st.sampled_from(extra)))
        files[draw(st.integers(0, 1))].extend(lines)
    return "\n".join(files[0]) + "\n", "\n".join(files[1]) + "\n"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(("conn a\n  also=b\nconn b\n  auto=add\n", ""))
@example(("conn %default\n  auto=start\n", "conn a\n  type=passthrough\n"))
@given(configs())
def test_same_verdict_as_starter(config: tuple[str, str]) -> None:
    require(missing(), "comparing with starter")
    main, included = config
    with tempfile.TemporaryDirectory() as tmp:
        inc = Path(tmp) / "included.conf"
        inc.write_text(included)
        conf = Path(tmp) / "ipsec.conf"
        conf.write_text(main + f"include {inc}\n")
        theirs = starter_verdict(conf)
        try:
            tunnels = it.read_config(str(conf))
        except it.ConfigError as e:
            assert theirs.error, f"we reject what starter accepts: {e}\n{main}---\n{included}"
            return
    assert not theirs.error, f"starter rejects what we accept:\n{main}---\n{included}"
    assert [t.name for t in tunnels] == theirs.conns
    assert {t.name: t.auto for t in tunnels} == theirs.auto
    assert [t.name for t in tunnels if t.loaded] == theirs.loaded
