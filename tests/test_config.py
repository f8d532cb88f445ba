"""ipsec.conf as strongSwan's starter reads it: which conns are tunnels, which are ignored."""

from __future__ import annotations

from pathlib import Path

import pytest

import ipsec_textfile as it


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def tunnels(path: Path, root: Path | None = None) -> dict[str, it.Tunnel]:
    return {t.name: t for t in it.read_config(str(path), str(root) if root else None)}


def test_every_conn_but_default_is_a_tunnel_in_file_order(tmp_path: Path) -> None:
    conf = write(tmp_path / "ipsec.conf", """\
config setup
    uniqueids=no
ca myca
    cacert=ca.pem
    auto=add
conn %default
    keyexchange=ikev2
conn b
    auto=add
conn a
    auto=start
""")
    assert list(tunnels(conf)) == ["b", "a"]


def test_auto_decides_ignored_and_strongswan_default_is_ignore(tmp_path: Path) -> None:
    conf = write(tmp_path / "ipsec.conf", """\
conn added
    auto=add
conn routed
    auto=route
conn started
    auto=start
conn ignored
    auto=ignore
conn template
    left=1.2.3.4
""")
    result = tunnels(conf)
    assert {n: t.ignored for n, t in result.items()} == {
        "added": False, "routed": False, "started": False, "ignored": True, "template": True}
    assert result["template"].auto is None


def test_default_section_applies_to_conns_before_and_after_it(tmp_path: Path) -> None:
    conf = write(tmp_path / "ipsec.conf", """\
conn before
    left=1.1.1.1
conn %default
    auto=add
conn after
    left=2.2.2.2
conn own
    auto=ignore
""")
    assert {n: t.auto for n, t in tunnels(conf).items()} == {
        "before": "add", "after": "add", "own": "ignore"}


def test_also_pulls_in_sections_recursively_and_defined_later(tmp_path: Path) -> None:
    conf = write(tmp_path / "ipsec.conf", """\
conn user
    also=middle
conn middle
    also=base
conn base
    auto=start
""")
    assert {n: t.auto for n, t in tunnels(conf).items()} == {
        "user": "start", "middle": "start", "base": "start"}


def test_later_also_wins_and_own_settings_win_over_also(tmp_path: Path) -> None:
    conf = write(tmp_path / "ipsec.conf", """\
conn one
    auto=add
conn two
    auto=route
conn both
    also=one
    also=two
conn mine
    also=two
    auto=start
""")
    result = tunnels(conf)
    assert result["both"].auto == "route"
    assert result["mine"].auto == "start"


def test_empty_value_unsets_an_inherited_auto(tmp_path: Path) -> None:
    conf = write(tmp_path / "ipsec.conf", """\
conn %default
    auto=add
conn cancelled
    auto=
""")
    result = tunnels(conf)
    assert result["cancelled"].auto is None
    assert result["cancelled"].ignored


def test_duplicate_sections_merge_and_later_value_wins(tmp_path: Path) -> None:
    conf = write(tmp_path / "ipsec.conf", "conn a\n    auto=add\nconn b\n    auto=add\nconn a\n    auto=ignore\n")
    result = tunnels(conf)
    assert list(result) == ["a", "b"]
    assert result["a"].ignored


def test_shunts_are_ignored_even_when_loaded(tmp_path: Path) -> None:
    conf = write(tmp_path / "ipsec.conf", """\
conn pass
    type=passthrough
    auto=route
conn drop
    type=drop
    auto=route
conn tunnel
    type=tunnel
    auto=route
""")
    result = tunnels(conf)
    assert result["pass"].shunt and result["pass"].ignored
    assert result["drop"].shunt and result["drop"].ignored
    assert not result["tunnel"].ignored


def test_quotes_comments_tabs_and_spaces_around_equals(tmp_path: Path) -> None:
    conf = write(tmp_path / "ipsec.conf", (
        "# a comment\n"
        "version 2.0\n"
        'conn "a.b_c-d"   # the name is quoted\n'
        "\tauto = add # a comment after a value\n"
        "  \t  \n"
        'conn "with space"\n'
        '  leftid="C=CH, O=strongSwan"\n'
        "  auto=\"start\"\n"
    ))
    result = tunnels(conf)
    assert list(result) == ["a.b_c-d", "with space"]
    assert result["a.b_c-d"].auto == "add"
    assert result["with space"].auto == "start"


def test_include_globs_relative_to_the_including_file_and_nests(tmp_path: Path) -> None:
    conf = write(tmp_path / "ipsec.conf", "conn main\n    auto=add\ninclude conf.d/*.conf\ninclude missing/*.conf\n")
    write(tmp_path / "conf.d" / "b.conf", "conn from-b\n    auto=add\n")
    write(tmp_path / "conf.d" / "a.conf", "conn from-a\n    auto=add\ninclude nested/x.conf\n")
    write(tmp_path / "conf.d" / "nested" / "x.conf", "conn nested\n    auto=route\n")
    assert list(tunnels(conf)) == ["main", "from-a", "nested", "from-b"]


def test_default_split_across_included_files(tmp_path: Path) -> None:
    conf = write(tmp_path / "ipsec.conf", "include defaults.conf\nconn a\n    left=1.2.3.4\n")
    write(tmp_path / "defaults.conf", "conn %default\n    auto=start\n")
    assert tunnels(conf)["a"].auto == "start"


def test_absolute_include_below_root(tmp_path: Path) -> None:
    conf = write(tmp_path / "etc" / "ipsec.conf", "include /etc/ipsec.d/*.conf\n")
    write(tmp_path / "etc" / "ipsec.d" / "x.conf", "conn x\n    auto=add\n")
    assert list(tunnels(conf, root=tmp_path)) == ["x"]


def test_file_that_includes_itself_is_read_once_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = write(tmp_path / "ipsec.conf", "conn west\n    auto=add\ninclude ipsec.conf\n")
    assert list(tunnels(conf)) == ["west"]
    assert "includes itself" in capsys.readouterr().err


def test_conn_with_a_value_starter_rejects_is_dropped_not_loaded(tmp_path: Path) -> None:
    conf = write(tmp_path / "ipsec.conf", """\
conn bad-auto
    auto=ondemand
conn bad-duration
    rekeymargin=10seconds
    auto=add
conn unknown-keyword-is-only-a-warning
    frobnicate=yes
    auto=add
""")
    result = tunnels(conf)
    assert result["bad-auto"].ignored and result["bad-duration"].ignored
    assert not result["unknown-keyword-is-only-a-warning"].ignored


def test_crlf_line_endings_make_values_invalid_as_in_starter(tmp_path: Path) -> None:
    # starter's lexer keeps the \r in the value: "add\r" is not a valid auto.
    conf = write(tmp_path / "ipsec.conf", "conn a\r\n  auto=add\r\n")
    result = tunnels(conf)
    assert list(result) == ["a\r"]
    assert result["a\r"].ignored


@pytest.mark.parametrize("text, message", [
    ("conn a\nauto=add\n", "ipsec.conf:2: syntax error, unexpected STRING"),
    ("conn a\n    rightid=C=CH\n", "ipsec.conf:2: syntax error, unexpected EQ"),
    ("conn a\n    auto\n", "ipsec.conf:2: missing value for setting 'auto'"),
    ("conn\n", "ipsec.conf:1: section name missing"),
    ('conn a\n    leftid="open\n', "ipsec.conf:2: unterminated string"),
    ("conn a\n    also=nowhere\n", "section 'nowhere' referenced in section 'a' not found"),
    ("conn a\n    also=b\nconn b\n    also=a\n", "causes a loop"),
    ("config setup\n    uniqueids=maybe\n", "bad config setup: uniqueids=maybe"),
])
def test_configs_starter_rejects_are_errors_naming_file_and_line(
    tmp_path: Path, text: str, message: str
) -> None:
    conf = write(tmp_path / "ipsec.conf", text)
    with pytest.raises(it.ConfigError) as raised:
        it.read_config(str(conf))
    assert message in str(raised.value)


def test_missing_config_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(it.ConfigError, match="cannot read .*nope.conf"):
        it.read_config(str(tmp_path / "nope.conf"))


def test_unreadable_included_file_is_an_error(tmp_path: Path) -> None:
    # A directory where a file should be: unreadable even for root.
    conf = write(tmp_path / "ipsec.conf", "include secret.conf\n")
    (tmp_path / "secret.conf").mkdir()
    with pytest.raises(it.ConfigError, match=r"ipsec.conf:1: cannot read .*secret.conf"):
        it.read_config(str(conf))


def test_non_utf8_config_is_an_error(tmp_path: Path) -> None:
    conf = tmp_path / "ipsec.conf"
    conf.write_bytes(b"conn \xff\xfe\n    auto=add\n")
    with pytest.raises(it.ConfigError, match="not UTF-8"):
        it.read_config(str(conf))
