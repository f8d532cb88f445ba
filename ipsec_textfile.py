#!/usr/bin/env python3
"""Report the health of IPsec tunnels (strongSwan or libreswan) for node_exporter's textfile collector.

One run asks the IKE daemon once for the state of every SA, reads ipsec.conf the way
that daemon's own tools do (strongSwan's starter, libreswan's addconn), classifies
each tunnel, and writes one .prom file atomically (temporary file + rename) under a lock.

The pipeline, one plain function a stage:
    Daemon.ask -> (its answer, read once prometheus_client is loaded) -> read_config /
    read_libreswan_config -> classify -> select_clients -> build_registry -> write_output

The file's sections, in that order:
    read config          read_config: ipsec.conf's conns as starter resolves them
      libreswan          read_libreswan_config: as libreswan 4.x or 5.x resolves them
    query daemon         the Daemon interface (ask, then read the answer) and the DaemonState
                         every backend returns (tunnels, SAs, pools, and the Certificates and
                         Crls the daemon holds)
      stroke             StrokeDaemon runs `ipsec statusall`, parse_statusall reads it (its
                         pools: parse_stroke_pools), then `ipsec listall --utc`,
                         parse_certificate_listing reads that; StrokePools runs `ipsec
                         leases` for VICI; StatusFile replays a saved statusall (or a
                         saved pluto answer)
      VICI               ViciDaemon asks charon's VICI socket (and StrokePools for
                         ipsec.conf's pools), parse_vici reads the answers,
                         vici_certificates the DER of list-certs (with the optional
                         cryptography package); the protocol itself: vici_decode,
                         vici_encode, ViciConnection
      pluto              PlutoDaemon runs `ipsec whack --status`, `--trafficstatus` and
                         `--addresspoolstatus` (libreswan), parse_pluto reads them; every
                         backend's commands: start_command (a RunningCommand), run_command
      auto               AutoDaemon: VICI when its socket answers, else pluto when its
                         socket answers and charon's stroke socket is absent, else stroke
    classify             classify: each tunnel's ipsec_status and figures; serves_many tells
                         remote-access tunnels, client_sessions their clients
      clients            select_clients: clients by name under --max-clients; client_label
    build metrics        metric_families (client_families, pool_families,
                         certificate_families), build_registry
    write file           write_output: a checked, held directory, flock, write_to_textfile
    main                 parse_args, main
"""

from __future__ import annotations

import argparse
import calendar
import errno
import fcntl
import glob
import hashlib
import ipaddress
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Dict, Protocol, cast

# prometheus_client is imported where the metrics are built, not here: main() loads it while
# the daemon works on its answer, which hides most of its 40 ms import.
if TYPE_CHECKING:  # for the type checker only
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import Metric
    from prometheus_client.registry import Collector

DEFAULT_CONFIG = "/etc/ipsec.conf"
DEFAULT_OUTPUT = "/var/lib/prometheus/node-exporter/ipsec.prom"
DEFAULT_VICI_SOCKET = "/var/run/charon.vici"
DEFAULT_STROKE_SOCKET = "/var/run/charon.ctl"
DEFAULT_PLUTO_SOCKET = "/run/pluto/pluto.ctl"
TUNNEL = ["tunnel"]  # the label of every per-tunnel series
# Per-client series for this many client names: every client of a 2000-user concentrator
# with room to grow, about 30,000 series at most.
DEFAULT_MAX_CLIENTS = 5000

STATUS_UP = 0
STATUS_IKE_ONLY = 1
STATUS_DOWN = 2
STATUS_UNKNOWN = 3
STATUS_IGNORED = 4

EXIT_OK = 0
EXIT_RUN_FAILED = 1  # config or daemon unreadable; the file says so
EXIT_NOT_WRITTEN = 3  # lock busy or output not writable; the file is untouched


# ---------------------------------------------------------------- read config


class ConfigError(Exception):
    """ipsec.conf cannot be read, or strongSwan's starter would reject it."""


@dataclass(frozen=True)
class Tunnel:
    """A conn section of ipsec.conf as starter resolves it, or a CHILD config the daemon lists."""

    name: str
    auto: str | None  # effective auto=; None when unset (strongSwan: ignore) or loaded over VICI
    shunt: bool  # type=pass/passthrough/drop/reject: a policy that never carries an SA
    loaded: bool  # starter hands it to the daemon
    ike: str | None = None  # its IKE config, when not named after it (a swanctl.conf connection)

    @property
    def ignored(self) -> bool:
        return self.shunt or not self.loaded


@dataclass
class _Section:
    settings: dict[str, str | None] = field(default_factory=dict)
    also: list[str] = field(default_factory=list)  # most important first
    parents: list[_Section] | None = None  # linearized also= chain, %default last


@dataclass
class _Token:
    kind: str  # NEWLINE SPACES EQ STRING CONFIG_SETUP CONN CA EOF
    value: str
    where: str  # "file:line"


# Tokens follow starter's flex lexer (src/starter/parser/lexer.l): settings must
# be indented, sections start in column one, "include" may appear anywhere.
_VERSION_LINE = re.compile(r"[\t ]*version[^\n]*(?=\n)")
_BLANKS = re.compile(r"[\t ]+")
_COMMENT = re.compile(r"[\t ]*#[^\n]*")
_WORD = re.compile(r'(?:@#)?[^"#= \t\n]+')
_INCLUDE = re.compile(r"include[\t ]+(?=[^=])")
_INCLUDE_WORD = re.compile(r'[^"\\#\n\t ]+')
# Fast path for the lines nearly every config consists of: "  key=value" and
# "conn name", each optionally followed by a comment. Anything else (quotes,
# includes, several words) takes the general path.
_SETTING_LINE = re.compile(r'([\t ]+)((?:@#)?[^"#= \t\n]+)[\t ]*=[\t ]*((?:@#)?[^"#= \t\n]+)(?:[\t ]*#[^\n]*)?[\t ]*\n')
_CONN_LINE = re.compile(r'conn[\t ]+((?:@#)?[^"#= \t\n]+)(?:[\t ]*#[^\n]*)?[\t ]*\n')
_QUOTED_ESCAPES = {"n": "\n", "r": "\r", "t": "\t"}


class _Lexer:
    """Turns one file into tokens, reading included files in place as starter does."""

    def __init__(self, root: str | None) -> None:
        self.root = root
        self.stack: list[str] = []  # real paths of the files being read

    def tokens(self, path: str, where: str) -> Iterator[_Token]:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ConfigError(f"{where}: cannot read {path}: {e.strerror}") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
        self.stack.append(os.path.realpath(path))
        yield from self._scan(text, path)
        self.stack.pop()

    def _scan(self, text: str, path: str) -> Iterator[_Token]:
        pos, line, end, bol = 0, 1, len(text), True
        while pos < end:
            at = f"{path}:{line}"
            char = text[pos]
            if bol:
                m = _SETTING_LINE.match(text, pos)
                if m and not m.group(2).startswith(("version", "include")) and not m.group(3).startswith("include"):
                    yield _Token("SPACES", "", at)
                    yield _Token("STRING", m.group(2), at)
                    yield _Token("EQ", "", at)
                    yield _Token("STRING", m.group(3), at)
                    yield _Token("NEWLINE", "", at)
                    pos, line = m.end(), line + 1
                    continue
                m = _CONN_LINE.match(text, pos)
                if m and not m.group(1).startswith("include"):
                    yield _Token("CONN", "", at)
                    yield _Token("STRING", m.group(1), at)
                    yield _Token("NEWLINE", "", at)
                    pos, line = m.end(), line + 1
                    continue
                bol = False
                m = _VERSION_LINE.match(text, pos)
                if m:  # legacy "version 2.0" lines are eaten whole
                    pos = m.end()
                    continue
                m = _BLANKS.match(text, pos)
                if m and not text.startswith("#", m.end()):
                    yield _Token("SPACES", "", at)
                    pos = m.end()
                    continue
                if text.startswith("config setup", pos):
                    yield _Token("CONFIG_SETUP", "", at)
                    pos += len("config setup")
                    continue
                m = _WORD.match(text, pos)
                if m and m.group() in ("conn", "ca"):
                    yield _Token(m.group().upper(), "", at)
                    pos = m.end()
                    continue
            if char == "\n":
                yield _Token("NEWLINE", "", at)
                pos, line, bol = pos + 1, line + 1, True
            elif char in " \t#":
                m = _COMMENT.match(text, pos) or _BLANKS.match(text, pos)
                assert m is not None
                pos = m.end()
            elif char == "=":
                yield _Token("EQ", "", at)
                pos += 1
            elif char == '"':
                value, pos, line = _quoted(text, pos + 1, line, at)
                yield _Token("STRING", value, at)
            elif text.startswith("include", pos) and (include := _INCLUDE.match(text, pos)):
                pattern, pos, line = self._include_pattern(text, include.end(), line, at)
                yield from self._include(pattern, path, at)
            else:
                m = _WORD.match(text, pos)
                assert m is not None
                yield _Token("STRING", m.group(), at)
                pos = m.end()

    @staticmethod
    def _include_pattern(text: str, pos: int, line: int, at: str) -> tuple[str, int, int]:
        pattern = ""
        while pos < len(text):
            char = text[pos]
            if char in "\n#":  # left for the main scanner (newline, comment)
                break
            if char in " \t":
                pos += 1
                break
            if char == '"':
                value, pos, line = _quoted(text, pos + 1, line, at)
                pattern += value
                break
            if char == "\\":
                if pos + 1 < len(text) and text[pos + 1] in '"#} ':
                    pattern += text[pos + 1]
                    pos += 2
                else:
                    pattern += "\\"
                    pos += 1
                continue
            m = _INCLUDE_WORD.match(text, pos)
            assert m is not None
            pattern += m.group()
            pos = m.end()
        return pattern, pos, line

    def _include(self, pattern: str, current: str, at: str) -> Iterator[_Token]:
        if not pattern:
            return
        if pattern.startswith("/"):
            full = (self.root.rstrip("/") + pattern) if self.root else pattern
        else:
            full = os.path.join(os.path.dirname(current), pattern)
        # A pattern that matches nothing is not an error for starter.
        for match in sorted(glob.glob(full)):
            if os.path.realpath(match) in self.stack:
                # starter re-reads it until it runs out of file descriptors and
                # merges the copies; reading it once gives the same sections.
                warn(f"{at}: {match} includes itself; read once")
                continue
            yield from self.tokens(match, at)


def _quoted(text: str, pos: int, line: int, at: str) -> tuple[str, int, int]:
    """Scan a quoted string from just after its opening quote."""
    parts: list[str] = []
    while True:
        stop = min((i for i in (text.find('"', pos), text.find("\\", pos)) if i >= 0), default=-1)
        if stop < 0:
            raise ConfigError(f"{at}: unterminated string")
        chunk = text[pos:stop]
        parts.append(chunk)
        line += chunk.count("\n")
        if text[stop] == '"':
            return "".join(parts), stop + 1, line
        following = text[stop + 1 : stop + 3]
        if not following:
            raise ConfigError(f"{at}: unterminated string")
        if following.startswith("\n") or following == "\r\n":  # line continuation
            pos = stop + 1 + (2 if following == "\r\n" else 1)
            line += 1
        else:
            parts.append(_QUOTED_ESCAPES.get(following[0], following[0]))
            pos = stop + 2


@dataclass
class _ParsedConfig:
    setup: dict[str, str | None]
    conns: dict[str, _Section]  # in file order
    cas: dict[str, _Section]


def _parse(path: str, root: str | None) -> _ParsedConfig:
    """starter's grammar (src/starter/parser/parser.y) over the token stream."""
    parsed = _ParsedConfig({}, {}, {})
    setup = _Section(settings=parsed.setup)
    current: _Section | None = None
    tokens = _Lexer(root).tokens(path, path)
    tok = next(tokens, None)

    def advance() -> _Token | None:
        return next(tokens, None)

    def unexpected(t: _Token) -> ConfigError:
        return ConfigError(f"{t.where}: syntax error, unexpected {t.kind}")

    while tok is not None:
        if tok.kind == "NEWLINE":
            tok = advance()
        elif tok.kind in ("CONFIG_SETUP", "CONN", "CA"):
            kind, at = tok.kind, tok.where
            tok = advance()
            name = None
            if tok is not None and tok.kind == "STRING":
                name, tok = tok.value, advance()
            if kind == "CONFIG_SETUP":
                current = setup
            elif not name:
                raise ConfigError(f"{at}: section name missing")
            else:
                table = parsed.conns if kind == "CONN" else parsed.cas
                current = table.setdefault(name, _Section())
            if tok is not None and tok.kind in ("STRING", "EQ"):
                raise unexpected(tok)
        elif tok.kind == "SPACES":
            tok = advance()
            if tok is None or tok.kind != "STRING":
                if tok is not None and tok.kind == "EQ":
                    raise unexpected(tok)
                continue  # an empty, indented line
            key, at = tok.value, tok.where
            tok = advance()
            if tok is None or tok.kind != "EQ":
                raise ConfigError(f"{at}: missing value for setting '{key}'")
            tok = advance()
            words = []
            while tok is not None and tok.kind == "STRING":
                words.append(tok.value)
                tok = advance()
            if tok is not None and tok.kind == "EQ":
                raise unexpected(tok)
            if not key:
                raise ConfigError(f"{at}: setting name can't be empty")
            value = " ".join(words) if words else None
            if current is not None:
                _add_setting(current, key, value)
        else:
            raise unexpected(tok)
    return parsed


def _add_setting(section: _Section, key: str, value: str | None) -> None:
    if key == "also":
        # Every section inherits %default anyway; an empty also= means nothing.
        if value and value != "%default":
            section.also.insert(0, value)
        return
    section.settings[key] = value  # later wins; None (key=) unsets


def _resolve_also(sections: dict[str, _Section]) -> None:
    """Linearize also= as starter does: depth first, keep each section's last occurrence."""
    default = sections.get("%default")
    if default is not None:
        default.parents = []

    def resolve(name: str, section: _Section, stack: list[str]) -> None:
        chain: list[_Section] = []
        for target in section.also:
            parent = sections.get(target)
            if parent is None:
                raise ConfigError(f"section '{target}' referenced in section '{name}' not found")
            if target in stack:
                raise ConfigError(f"section '{target}' referenced in section '{name}' causes a loop")
            if parent.parents is None:
                resolve(target, parent, stack + [target])
            chain.append(parent)
            chain.extend(parent.parents or [])
        if not chain and default is not None:
            chain.append(default)
        section.parents = [s for i, s in enumerate(chain) if not any(s is t for t in chain[i + 1 :])]

    for name, section in sections.items():
        if section.parents is None:
            resolve(name, section, [name])


def _effective(section: _Section) -> dict[str, str]:
    """The settings starter sees: own first, then the linearized parents; unset keys dropped."""
    merged: dict[str, str | None] = {}
    for source in [section, *(section.parents or [])]:
        for key, value in source.settings.items():
            merged.setdefault(key, value)
    return {key: value for key, value in merged.items() if value is not None}


# Keyword tables of strongSwan 5.9's starter (keywords.txt, args.c, confread.c),
# checked against `starter --conftest`. Only what decides whether starter
# rejects the file (config setup) or drops a conn is modelled.
_BOOL = ("no", "yes")
_SETUP_VALUES = {
    "uniqueids": ("no", "yes", "replace", "keep", "never"),
    "cachecrls": _BOOL,
    "strictcrlpolicy": ("no", "yes", "ifuri"),
}
_SETUP_FREE = {
    "charondebug", "charonstart", "crlcheckinterval", "dumpdir", "force_keepalive", "fragicmp",
    "hidetos", "interfaces", "keep_alive", "klipsdebug", "nat_traversal", "nocrsend",
    "overridemtu", "packetdefault", "pkcs11initargs", "pkcs11keepstate", "pkcs11module",
    "pkcs11proxy", "plutodebug", "plutostart", "plutostderrlog", "postpluto", "prepluto",
    "virtual_private",
}
_CA_KEYWORDS = {
    "cacert", "certuribase", "crluri", "crluri1", "crluri2", "ldapbase", "ldaphost",
    "ocspuri", "ocspuri1", "ocspuri2",
}
_DPD_ACTIONS = ("none", "clear", "hold", "restart")
_CONN_VALUES = {
    "auto": ("ignore", "add", "route", "start"),
    "keyexchange": ("ike", "ikev1", "ikev2"),
    "authby": ("psk", "secret", "pubkey", "rsa", "rsasig", "ecdsa", "ecdsasig",
               "xauthpsk", "xauthrsasig", "never"),
    "fragmentation": ("no", "yes", "accept", "force"),
    "dpdaction": _DPD_ACTIONS,
    "closeaction": _DPD_ACTIONS,
    "aggressive": _BOOL, "installpolicy": _BOOL, "mediation": _BOOL, "sha256_96": _BOOL,
    "compress": _BOOL, "rekey": _BOOL, "reauth": _BOOL, "mobike": _BOOL, "forceencaps": _BOOL,
    "modeconfig": ("push", "pull"),
    "xauth": ("server", "client"),
    "type": ("tunnel", "transport", "transport_proxy", "beet", "pass", "passthrough",
             "drop", "reject"),
}
_END_VALUES = {
    "firewall": _BOOL, "hostaccess": _BOOL, "allowany": _BOOL,
    "sendcert": ("always", "ifasked", "never", "yes", "no"),
}
_SHUNT_TYPES = {"pass", "passthrough", "drop", "reject"}


def _strtol(text: str, base: int = 10) -> tuple[int, int]:
    """C's strtol(): the value read and where reading stopped (0 when no digits)."""
    i = len(text) - len(text.lstrip(" \t\n\v\f\r"))
    sign = -1 if text[i : i + 1] == "-" else 1
    if text[i : i + 1] in ("+", "-"):
        i += 1
    if base == 0:
        if text[i : i + 2].lower() == "0x" and _is_digit(text[i + 2 : i + 3], 16):
            base, i = 16, i + 2
        else:
            base = 8 if text[i : i + 1] == "0" else 10
    start = i
    while i < len(text) and _is_digit(text[i], base):
        i += 1
    if i == start:
        return 0, 0
    return sign * int(text[start:i], base), i


def _is_digit(char: str, base: int) -> bool:
    return len(char) == 1 and char.isascii() and char.isalnum() and int(char, 36) < base


def _reads_whole(text: str, base: int = 10) -> bool:
    return _strtol(text, base)[1] == len(text)


def _valid_duration(value: str) -> bool:
    return value[_strtol(value)[1] :] in ("", "s", "m", "h", "d")


def _valid_percent(value: str) -> bool:
    stop = _strtol(value)[1]
    return stop > 0 and value[stop:] == "%"


def _valid_mark(value: str) -> bool:
    """mark_from_string() as starter calls it: number[/mask] or %unique[-dir][/mask]."""
    if value.lower().startswith("%unique"):
        rest = value[len("%unique") :]
        if rest.lower().startswith("-dir"):
            rest = rest[len("-dir") :]
    elif value.lower().startswith("%same"):
        return False  # starter does not accept %same
    else:
        rest = value[_strtol(value, 0)[1] :]
    return rest == "" or (rest[0] == "/" and _reads_whole(rest[1:], 0))


def _valid_protoport(value: str) -> bool:
    proto, _, port = value.partition("/")
    if proto != "%any":
        try:
            socket.getprotobyname(proto)
        except OSError:
            number, stop = _strtol(proto, 0)
            if (proto and stop != len(proto)) or not 0 <= number <= 0xFF:
                return False
    if port in ("", "%any", "%opaque"):
        return True
    try:
        socket.getservbyname(port)
        return True
    except OSError:
        pass
    first, stop = _strtol(port, 0)
    last = first
    if port[stop : stop + 1] == "-":
        last, length = _strtol(port[stop + 1 :], 0)
        stop += 1 + length
    return stop == len(port) and 0 <= first <= 0xFFFF and 0 <= last <= 0xFFFF


def _always(value: str) -> bool:
    return True


def _one_of(*allowed: str) -> Callable[[str], bool]:
    return lambda value: value in allowed


# Every keyword starter knows in a conn section, with the check it applies to the
# value (free-form and deprecated ones accept anything).
_CONN_CHECKS: dict[str, Callable[[str], bool]] = {
    **{key: _one_of(*values) for key, values in _CONN_VALUES.items()},
    **dict.fromkeys(["dpddelay", "dpdtimeout", "ikelifetime", "inactivity", "keylife", "lifetime",
                     "margintime", "rekeymargin"], _valid_duration),
    **dict.fromkeys(["lifebytes", "lifepackets", "marginbytes", "marginpackets", "reqid",
                     "replay_window"], _reads_whole),
    **dict.fromkeys(["aaa_identity", "ah", "eap", "eap_identity", "esp", "ike", "me_peerid",
                     "mediated_by", "pfs", "pfsgroup", "xauth_identity"], _always),
    **dict.fromkeys(["mark", "mark_in", "mark_out"], _valid_mark),
    "rekeyfuzz": _valid_percent,
    "ikedscp": lambda value: _reads_whole(value, 2),
    "keyingtries": lambda value: value == "%forever" or _reads_whole(value),
    "tfc": lambda value: value == "%mtu" or _reads_whole(value),
}
# The same for left*/right* keywords, by what follows "left" or "right".
_END_CHECKS: dict[str, Callable[[str], bool]] = {
    **{key: _one_of(*values) for key, values in _END_VALUES.items()},
    **dict.fromkeys(["", "auth", "auth2", "ca", "ca2", "cert", "cert2", "certpolicy", "dns", "groups",
                     "groups2", "id", "id2", "nexthop", "rsasigkey", "sigkey", "sourceip", "subnet",
                     "subnetwithin", "updown"], _always),
    "ikeport": _reads_whole,
    "protoport": _valid_protoport,
}


def _conn_check(key: str) -> Callable[[str], bool] | None:
    """The value check of a conn or end keyword; None when starter does not know it there."""
    for side in ("left", "right"):
        if key.startswith(side) and key[len(side) :] in _END_CHECKS:
            return _END_CHECKS[key[len(side) :]]
    return _CONN_CHECKS.get(key)


def _conn_errors(settings: dict[str, str]) -> list[str]:
    """The values for which starter drops a conn ("bad argument value in conn")."""
    errors = []
    for key, value in settings.items():
        check = _conn_check(key)
        if check is not None:
            ok = check(value)
        else:
            # a config setup or ca keyword is "unsupported" here; an unknown one only warns
            ok = key not in _SETUP_VALUES and key not in _SETUP_FREE and key not in _CA_KEYWORDS
        if not ok:
            errors.append(f"{key}={value}")
    for side in ("left", "right"):
        if settings.get(side + "firewall") == "yes" and side + "updown" in settings:
            errors.append(f"both {side}firewall and {side}updown")
    return errors


def _setup_errors(settings: dict[str, str | None]) -> list[str]:
    errors = []
    for key, value in settings.items():
        if value is None:
            continue
        if key in _SETUP_VALUES:
            if value not in _SETUP_VALUES[key]:
                errors.append(f"{key}={value}")
        elif key not in _SETUP_FREE and (_conn_check(key) is not None or key in _CA_KEYWORDS):
            errors.append(f"{key} is not a config setup keyword")
    return errors


def read_config(path: str, root: str | None = None) -> list[Tunnel]:
    """Every conn of ipsec.conf except %default, with what starter decides about it.

    root: resolve absolute include paths below this directory (for tests).
    Raises ConfigError where starter would say "config invalid!".
    """
    parsed = _parse(path, root)
    _resolve_also(parsed.conns)
    _resolve_also(parsed.cas)
    setup_errors = _setup_errors(parsed.setup)
    if setup_errors:
        raise ConfigError(f"{path}: bad config setup: {', '.join(setup_errors)}")
    tunnels = []
    for name, section in parsed.conns.items():
        if name == "%default":
            continue
        settings = _effective(section)
        auto = settings.get("auto")
        dropped = bool(_conn_errors(settings))
        tunnels.append(Tunnel(
            name=name,
            auto=auto,
            shunt=settings.get("type") in _SHUNT_TYPES,
            loaded=not dropped and auto in ("add", "route", "start"),
        ))
    return tunnels


# ---------------------------------------------------------------- read config: libreswan


# libreswan reads the same kind of file with its own lexer and rules (lib/libipsecconf),
# and they changed between 4.x and 5.x. Checked against each version's readwriteconf:
#   - a setting is one indented "key=value" line; the value is one word, "quoted" or
#     {braced}; keywords match without case, X- and x_ keys are comments;
#   - an unknown keyword rejects the file (both); 4.x also rejects a bad value of a
#     boolean or enumerated keyword and a conn keyword in config setup, where 5.x warns
#     and ignores the setting;
#   - auto= defaults to ignore; route and up are old names of ondemand and start;
#   - a conn's settings, then its also= sections', then %default's: 4.x drops a conn
#     whose key is set twice (in it or by an also= section; to different values, or at all
#     for string keys), or whose also= target is missing; 5.x keeps the first value it
#     reads (also= expands in place);
#   - two conns of one name are both read; pluto keeps the later one.
_LSW_AUTO = {"ignore": "ignore", "add": "add", "ondemand": "ondemand", "route": "ondemand",
             "start": "start", "up": "start", "keep": "keep"}
_LSW_LOADED = {"add", "ondemand", "start", "keep"}
_LSW_SHUNTS = {"passthrough", "pass", "drop", "reject"}
_LSW_TYPES = {"tunnel", "transport", *_LSW_SHUNTS}
_LSW4_BOOLEAN_WORDS = {"y", "yes", "true", "on", "n", "no", "false", "off"}
_LSW_KEY = re.compile(r'[^"=\t\n ]+')
_LSW_VALUE = re.compile(r'"[^"\n]*"|\{[^"\n]*\}|[^"\t\n ]+')
_LSW_BLANKS = re.compile(r"[\t ]*")


# Keywords both 4.10 and 5.2 know (probed with their readwriteconf; matched without case).
_LSW_KEYWORDS = frozenset({
    "accept-redirect", "accept-redirect-to", "addresspool", "aggressive", "aggrmode", "ah", "also",
    "audit-log", "auth", "authby", "autheap", "auto", "ca", "cat", "cert", "cisco-unity", "ckaid",
    "clientaddrfamily", "compress", "connalias", "crl-strict", "crlcheckinterval", "curl-iface",
    "curl-timeout", "ddos-ike-threshold", "ddos-mode", "decap-dscp", "dnssec-anchors", "dnssec-enable",
    "dnssec-rootkey-file", "dpdaction", "dpddelay", "dpdtimeout", "drop-oppo-null", "dumpdir", "ecdsakey",
    "enable-tcp", "encapsulation", "esn", "esp", "failureshunt", "fake-strongswan", "fragmentation",
    "global-redirect", "global-redirect-to", "hostaddrfamily", "id", "ignore-peer-dns", "ike",
    "ike-socket-bufsize", "ike-socket-errqueue", "ikelifetime", "ikepad", "ikeport", "ikev1-policy",
    "ikev1-secctx-attr-type", "ikev2", "initial-contact", "interfaces", "intermediate", "ipsec-interface",
    "ipsec-lifetime", "ipsec-max-bytes", "ipsec-max-packets", "ipsecdir", "keep-alive", "keyexchange",
    "keyingtries", "keylife", "left", "leftaddresspool", "leftauth", "leftautheap", "leftca", "leftcat",
    "leftcert", "leftckaid", "leftecdsakey", "leftid", "leftikeport", "leftmodecfgclient",
    "leftmodecfgserver", "leftnexthop", "leftprotoport", "leftpubkey", "leftrsasigkey", "leftsendcert",
    "leftsourceip", "leftsubnet", "leftsubnets", "leftupdown", "leftusername", "leftvti", "leftxauthclient",
    "leftxauthserver", "leftxauthusername", "listen", "listen-tcp", "listen-udp", "logappend", "logfile",
    "logip", "logtime", "mark", "mark-in", "mark-out", "max-halfopen-ike", "metric", "mobike",
    "modecfgbanner", "modecfgclient", "modecfgdns", "modecfgdomains", "modecfgpull", "modecfgserver",
    "ms-dh-downgrade", "mtu", "myvendorid", "narrowing", "nat-ikev1-method", "nat-keepalive",
    "negotiationshunt", "nexthop", "nflog", "nflog-all", "nhelpers", "nic-offload", "nm-configured",
    "nopmtudisc", "nssdir", "ocsp-cache-max-age", "ocsp-cache-min-age", "ocsp-cache-size", "ocsp-enable",
    "ocsp-method", "ocsp-strict", "ocsp-timeout", "ocsp-trustname", "ocsp-uri", "overlapip",
    "pam-authorize", "pfs", "phase2", "phase2alg", "plutodebug", "plutostderrlog", "policy-label", "ppk",
    "priority", "protoport", "protostack", "pubkey", "reauth", "rekey", "rekeyfuzz", "rekeymargin",
    "remote-peer-type", "remote_peer_type", "replay-window", "reqid", "require-id-on-certificate",
    "retransmit-interval", "retransmit-timeout", "right", "rightaddresspool", "rightauth", "rightautheap",
    "rightca", "rightcat", "rightcert", "rightckaid", "rightecdsakey", "rightid", "rightikeport",
    "rightmodecfgclient", "rightmodecfgserver", "rightnexthop", "rightprotoport", "rightpubkey",
    "rightrsasigkey", "rightsendcert", "rightsourceip", "rightsubnet", "rightsubnets", "rightupdown",
    "rightusername", "rightvti", "rightxauthclient", "rightxauthserver", "rightxauthusername", "rsasigkey",
    "salifetime", "sec-label", "secretsfile", "seedbits", "send-no-esp-tfc", "send-redirect",
    "send-vendorid", "sendca", "sendcert", "sha2-truncbug", "shuntlifetime", "sourceip", "statsbin",
    "subnet", "subnets", "syslog", "tcp-remoteport", "tfc", "type", "uniqueids", "updown", "username",
    "virtual-private", "virtual_private", "vti", "vti-interface", "vti-routing", "vti-shared", "xauthby",
    "xauthclient", "xauthfail", "xauthserver", "xauthusername", "xfrmlifetime"
})

# Known to 4.x only.
_LSW_KEYWORDS_4 = frozenset({
    "alsoflip", "forceencaps"
})

# Known to 5.x only.
_LSW_KEYWORDS_5 = frozenset({
    "debug", "encap-dscp", "groundhog", "ikev1-dpdtimeout", "interface-ip", "ipsec-interface-managed",
    "iptfs", "iptfs-drop-time", "iptfs-fragmentation", "iptfs-init-delay", "iptfs-max-queue-size",
    "iptfs-packet-size", "iptfs-reorder-window", "leftgroundhog", "leftinterface-ip",
    "pfs-rekey-workaround", "ppk-ids", "rightgroundhog", "rightinterface-ip", "session-resumption"
})

# config setup's own keywords; 4.x rejects the file when any other keyword appears there.
_LSW_SETUP_ONLY = frozenset({
    "audit-log", "crl-strict", "crlcheckinterval", "curl-iface", "curl-timeout", "ddos-ike-threshold",
    "ddos-mode", "dnssec-anchors", "dnssec-enable", "dnssec-rootkey-file", "drop-oppo-null", "dumpdir",
    "global-redirect", "global-redirect-to", "ike-socket-bufsize", "ike-socket-errqueue", "ikev1-policy",
    "ikev1-secctx-attr-type", "interfaces", "ipsecdir", "keep-alive", "listen", "listen-tcp", "listen-udp",
    "logappend", "logfile", "logip", "logtime", "max-halfopen-ike", "myvendorid", "nflog-all", "nhelpers",
    "nssdir", "ocsp-cache-max-age", "ocsp-cache-min-age", "ocsp-cache-size", "ocsp-enable", "ocsp-method",
    "ocsp-strict", "ocsp-timeout", "ocsp-trustname", "ocsp-uri", "plutodebug", "plutostderrlog",
    "protostack", "rekeyfuzz", "secretsfile", "seedbits", "shuntlifetime", "statsbin", "syslog",
    "uniqueids", "virtual-private", "virtual_private", "xfrmlifetime"
})
_LSW4_CONN_ONLY = (_LSW_KEYWORDS | _LSW_KEYWORDS_4) - _LSW_SETUP_ONLY

# 4.x lexes these as booleans: any other value than y/yes/true/on/n/no/false/off is a syntax error.
_LSW4_BOOLEANS = frozenset({
    "aggressive", "aggrmode", "audit-log", "cat", "cisco-unity", "compress", "crl-strict", "decap-dscp",
    "dnssec-enable", "drop-oppo-null", "fake-strongswan", "ignore-peer-dns", "ike-socket-errqueue",
    "ikepad", "initial-contact", "intermediate", "leftcat", "leftmodecfgclient", "leftmodecfgserver",
    "leftxauthclient", "leftxauthserver", "listen-tcp", "listen-udp", "logappend", "logip", "logtime",
    "mobike", "modecfgclient", "modecfgpull", "modecfgserver", "ms-dh-downgrade", "narrowing",
    "nat-keepalive", "nm-configured", "nopmtudisc", "ocsp-enable", "ocsp-strict", "overlapip",
    "pam-authorize", "pfs", "reauth", "rekey", "require-id-on-certificate", "rightcat",
    "rightmodecfgclient", "rightmodecfgserver", "rightxauthclient", "rightxauthserver", "send-no-esp-tfc",
    "send-vendorid", "sha2-truncbug", "uniqueids", "vti-routing", "vti-shared", "xauthclient", "xauthserver"
})

# 4.x: an empty value is a syntax error (durations and sizes).
_LSW4_NOT_EMPTY = frozenset({
    "crlcheckinterval", "curl-timeout", "dpddelay", "dpdtimeout", "ikelifetime", "ipsec-lifetime",
    "ipsec-max-bytes", "ipsec-max-packets", "keylife", "ocsp-cache-max-age", "ocsp-cache-min-age",
    "rekeymargin", "retransmit-interval", "retransmit-timeout", "salifetime", "shuntlifetime"
})

# 4.x drops a conn that sets one of these twice even to the same value (strings; the other
# keys only when the values differ).
_LSW4_STRINGS = frozenset({
    "accept-redirect-to", "addresspool", "ah", "alsoflip", "authby", "ca", "cert", "ckaid", "ecdsakey",
    "esp", "id", "ike", "ipsec-interface", "leftaddresspool", "leftca", "leftcert", "leftckaid",
    "leftecdsakey", "leftid", "leftnexthop", "leftprotoport", "leftpubkey", "leftrsasigkey", "leftsourceip",
    "leftsubnet", "leftupdown", "leftusername", "leftvti", "leftxauthusername", "mark", "mark-in",
    "mark-out", "modecfgbanner", "modecfgdns", "modecfgdomains", "nexthop", "phase2alg", "policy-label",
    "protoport", "pubkey", "rightaddresspool", "rightca", "rightcert", "rightckaid", "rightecdsakey",
    "rightid", "rightnexthop", "rightprotoport", "rightpubkey", "rightrsasigkey", "rightsourceip",
    "rightsubnet", "rightupdown", "rightusername", "rightvti", "rightxauthusername", "rsasigkey",
    "sec-label", "sourceip", "subnet", "updown", "username", "vti", "vti-interface", "xauthusername"
})
# 4.x rejects the file for any other value of these (besides a plain number); lists take commas.
_LSW4_ENUMS = {
    "accept-redirect": ("auto", "no", "yes"),
    "auth": ("eaponly", "ecdsa", "never", "null", "rsa", "rsasig", "secret"),
    "autheap": ("none", "tls"),
    "auto": ("add", "ignore", "keep", "ondemand", "route", "start", "up"),
    "clientaddrfamily": ("inet", "inet6", "ipv4", "ipv6"),
    "ddos-mode": ("auto", "busy", "unlimited"),
    "dpdaction": ("clear", "hold", "restart", "restart_by_peer"),
    "enable-tcp": ("fallback", "no", "yes"),
    "encapsulation": ("auto", "no", "yes"),
    "esn": ("either", "no", "yes"),
    "failureshunt": ("drop", "hold", "none", "passthrough", "reject"),
    "fragmentation": ("force", "insist", "never", "no", "yes"),
    "hostaddrfamily": ("inet", "inet6", "ipv4", "ipv6"),
    "ikev1-policy": ("accept", "drop", "reject"),
    "ikev2": ("always", "insist", "never", "no", "permit", "propose", "yes"),
    "keyexchange": ("ike",),
    "leftauth": ("eaponly", "ecdsa", "never", "null", "rsa", "rsasig", "secret"),
    "leftautheap": ("none", "tls"),
    "leftsendcert": ("always", "alwayssend", "never", "sendifasked"),
    "nat-ikev1-method": ("both", "drafts", "none", "rfc"),
    "negotiationshunt": ("drop", "hold", "passthrough"),
    "nic-offload": ("auto", "no", "yes"),
    "ocsp-method": ("get", "post"),
    "phase2": ("ah", "default", "esp"),
    "plutodebug": (
        "all", "base", "debug-add-prefix", "debug-base", "debug-cpu-usage", "debug-crypt",
        "debug-private", "debug-refcnt", "debug-tmi", "debug-whackwatch", "none", "private", "tmi"
    ),
    "ppk": ("always", "insist", "never", "no", "permit", "propose", "yes"),
    "remote-peer-type": ("cisco",),
    "remote_peer_type": ("cisco",),
    "rightauth": ("eaponly", "ecdsa", "never", "null", "rsa", "rsasig", "secret"),
    "rightautheap": ("none", "tls"),
    "rightsendcert": ("always", "alwayssend", "never", "sendifasked"),
    "send-redirect": ("auto", "no", "yes"),
    "sendca": ("all", "issuer", "none"),
    "sendcert": ("always", "alwayssend", "never", "sendifasked"),
    "type": ("drop", "pass", "passthrough", "reject", "transport", "tunnel"),
    "xauthby": ("alwaysok", "file", "pam"),
    "xauthfail": ("hard", "soft"),
}


@dataclass
class _LswSection:
    name: str
    items: list[tuple[str, str]] = field(default_factory=list)  # (keyword, value) and ("also", target)


def read_libreswan_config(path: str, root: str | None = None, version: str = "") -> list[Tunnel]:
    """Every conn of ipsec.conf except %default, with what libreswan's addconn decides about it.

    version: pluto's ("4.10", "5.2"); the rules of 5.x when unknown.
    Raises ConfigError where libreswan rejects the whole file.
    """
    major4 = version.split(".")[0] in ("3", "4")
    conns: list[_LswSection] = []
    setup: list[list[tuple[str, str]]] = []  # each config setup section's settings
    _lsw_read(path, root, major4, conns, setup, [], [])
    # 4.x checks the keywords of the first config setup section with settings only: later
    # ones may hold conn keywords (readwriteconf 4.10 accepts them there).
    for key, _ in next((settings for settings in setup if settings), []):
        if major4 and key in _LSW4_CONN_ONLY:
            raise ConfigError(f"{path}: {key}= is a conn keyword, not one of config setup")
    by_name = {c.name: c for c in conns}  # the later of two conns of one name
    # Every conn %default section adds to the defaults; the first value of a key counts.
    defaults = [(key, value) for c in conns if c.name == "%default" for key, value in c.items if key != "also"]
    tunnels: dict[str, Tunnel] = {}
    for conn in conns:
        if conn.name == "%default":
            continue
        settings, dropped = _lsw_resolve(conn, by_name, major4)
        for key, value in defaults:
            settings.setdefault(key, value)
        auto = _LSW_AUTO.get(settings.get("auto", "").lower(), "ignore")
        kind = settings.get("type:shunt") or settings.get("type", "")
        tunnel = Tunnel(name=conn.name, auto=auto, shunt=kind.lower() in _LSW_SHUNTS,
                        loaded=not dropped and auto in _LSW_LOADED)
        tunnels[conn.name] = tunnel  # keeps the first one's place, the later one's verdict
    return list(tunnels.values())


def _lsw_resolve(conn: _LswSection, conns: dict[str, _LswSection], major4: bool) -> tuple[dict[str, str], bool]:
    """A conn's settings with its also= sections merged (%default apart), and whether 4.x drops it."""
    settings: dict[str, str] = {}
    dropped = False
    seen = {conn.name}

    def merge(section: _LswSection) -> None:
        nonlocal dropped
        for key, value in section.items:
            if key == "also":
                target = conns.get(value)
                if target is None or target.name == "%default":
                    dropped = dropped or major4
                elif value not in seen:
                    seen.add(value)
                    merge(target)
            elif key not in settings:
                settings[key] = value
            elif major4 and _lsw_differ(key, settings[key], value):
                dropped = True

    merge(conn)
    return settings, dropped


def _lsw_words(line: str) -> list[str]:
    """A line's words as libreswan's lexer splits them: "=" alone, a value (or a conn's name)
    after "=" or "conn", other words up to a blank, quote or "="; a comment runs from a "#"
    to the end of the line only when that is longer than the word starting at the "#" (flex
    takes the longest match), so "# note" is a comment and "#note" a word."""
    words: list[str] = []
    pos = _LSW_BLANKS.match(line).end()  # type: ignore[union-attr]
    while pos < len(line):
        if line[pos] == "=":
            words.append("=")
            pattern = _LSW_VALUE
            pos += 1
        elif words and words[-1] in ("=", "conn"):
            pattern = _LSW_VALUE
        else:
            pattern = _LSW_KEY
        pos = _LSW_BLANKS.match(line, pos).end()  # type: ignore[union-attr]
        if pos >= len(line):
            break
        word = pattern.match(line, pos)
        if pattern is _LSW_KEY and line[pos] == "#" and (word is None or word.end() < len(line)):
            break
        if word is None:  # a quote that does not close
            raise ValueError(line[pos:])
        words.append(word.group())
        pos = _LSW_BLANKS.match(line, word.end()).end()  # type: ignore[union-attr]
    return words


def _lsw_differ(key: str, first: str, second: str) -> bool:
    """Whether 4.x counts a second value of a key as a conflict (enumerated ones compare
    without case; a string key set twice always conflicts)."""
    if key in _LSW4_STRINGS:
        return True
    return first.lower() != second.lower() if key in _LSW4_ENUMS else first != second


def _lsw_read(path: str, root: str | None, major4: bool, conns: list[_LswSection],
              setup: list[list[tuple[str, str]]], stack: list[str], statements: list[str]) -> None:
    """Read one file into conns and setup, included files in place (statements: the
    unindented lines read so far, since "version" may only come first)."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    stack = [*stack, os.path.realpath(path)]
    section: _LswSection | None = None
    in_setup = False
    for number, line in enumerate(text.split("\n"), 1):
        at = f"{path}:{number}"
        stripped = line.strip(" \t")
        if not stripped or stripped.startswith("#"):
            continue
        try:
            words = _lsw_words(line)
        except ValueError:
            raise ConfigError(f"{at}: syntax error: unterminated string") from None
        if line[0] in " \t":
            if section is None and not in_setup:
                raise ConfigError(f"{at}: syntax error: a setting outside a section")
            key, lowered = words[0], words[0].lower()
            if lowered.startswith(("x-", "x_")):  # a comment, with a value or (5.x) without
                if major4 and (words[1:2] != ["="] or len(words) < 3):
                    raise ConfigError(f"{at}: syntax error")
                continue
            if words[1:2] != ["="] or len(words) > 3:
                raise ConfigError(f"{at}: syntax error")
            if not major4 and lowered.startswith(("left-", "right-")):  # 5.x: left-subnet is leftsubnet
                lowered = lowered.replace("-", "", 1)
            if lowered not in _LSW_KEYWORDS and lowered not in (_LSW_KEYWORDS_4 if major4 else _LSW_KEYWORDS_5):
                raise ConfigError(f"{at}: unknown keyword {key}")
            raw = words[2] if len(words) == 3 else ""
            value = _lsw_value(lowered, raw[1:-1] if raw[:1] in ('"', "{") else raw, raw, major4, at)
            if value is None:
                continue
            if not major4 and lowered == "type" and value.lower() in _LSW_SHUNTS:
                # 5.x keeps a shunt apart from the mode: type=tunnel in a conn does not undo
                # type=passthrough from %default or also=.
                lowered = "type:shunt"
            if in_setup:
                setup[-1].append((lowered, value))
            elif section is not None:
                section.items.append((lowered, value))
            continue
        word = words[0]
        argument = words[1] if len(words) > 1 else None
        extra = len(words) > 2 and not (major4 and word == "include")  # 4.x ignores more words there
        if extra or word not in ("conn", "config", "include", "version") or word == "version" and statements:
            raise ConfigError(f"{at}: syntax error")
        statements.append(word)
        if word == "conn" and argument:
            name = argument[1:-1] if argument[:1] in ('"', "{") else argument
            section, in_setup = _LswSection(name), False
            conns.append(section)
        elif word == "config" and argument == "setup":
            section, in_setup = None, True
            setup.append([])
        elif word == "include" and argument:
            pattern = argument[1:-1] if argument.startswith('"') else argument
            full = (root.rstrip("/") + pattern) if root and pattern.startswith("/") else pattern
            for match in sorted(glob.glob(full)):
                if os.path.realpath(match) not in stack:  # libreswan reads it again to depth 10: the same conns
                    _lsw_read(match, root, major4, conns, setup, stack, statements)
            section, in_setup = None, False
        elif word != "version" or not argument:
            raise ConfigError(f"{at}: syntax error")


def _lsw_value(key: str, value: str, raw: str, major4: bool, at: str) -> str | None:
    """The value libreswan keeps for a setting (raw: as written, quotes and all); None when
    it ignores the setting: key= alone, and in 5.x a value it does not accept."""
    if major4:
        if key in _LSW4_BOOLEANS and (raw not in _LSW4_BOOLEAN_WORDS):
            raise ConfigError(f"{at}: syntax error: {key} takes yes or no")
        if key in _LSW4_NOT_EMPTY and not raw:
            raise ConfigError(f"{at}: syntax error: {key} needs a value")
        if not raw:  # key= alone is ignored
            return None
        allowed = _LSW4_ENUMS.get(key)
        if allowed is not None and not raw.isdigit() and raw != "%forever":  # numbers pass the lexer
            words = [value.lower()]
            if key in ("auth", "leftauth", "rightauth"):  # lists
                words = value.lower().split(",")
            elif key == "plutodebug":
                words = [word for word in re.split(r"[ ,+]", value.lower()) if word]
            elif key == "keyexchange":  # ike, or ike: and options
                words = [value.lower().split(":")[0]]
            if not all(word in allowed for word in words):
                raise ConfigError(f"{at}: {key}={value} is not a value libreswan 4 accepts")
        return value
    if key == "auto" and value.lower() not in _LSW_AUTO or key == "type" and value.lower() not in _LSW_TYPES:
        return None
    return value if raw else None


# ---------------------------------------------------------------- query daemon


class DaemonError(Exception):
    """The IKE daemon could not be asked, or its answer makes no sense."""


@dataclass(frozen=True)
class IkeSA:
    name: str  # the IKE config's name: an ipsec.conf conn, a swanctl.conf connection
    uid: int
    state: str  # strongSwan's ike_sa_state name: ESTABLISHED, CONNECTING, ...
    age: float | None = None  # seconds since it was established
    next_rekey: float | None = None  # seconds until its next rekey or reauthentication
    # Who the peer is, as the daemon prints it (from the network: hostile).
    remote_host: str = ""
    remote_id: str = ""  # its IKE identity: certificate subject, FQDN, e-mail, address
    eap_id: str = ""  # the identity it authenticated with over EAP, if any
    xauth_id: str = ""  # its XAuth user name, if any (IKEv1)
    virtual_ips: tuple[str, ...] = ()  # addresses the daemon gave it
    ike_version: str = ""  # IKEv1, IKEv2


@dataclass(frozen=True)
class Traffic:
    """What one CHILD SA carried since it was installed, or a tunnel's CHILD SAs together."""

    bytes_in: int = 0
    bytes_out: int = 0
    packets_in: int | None = 0  # None: the daemon does not count packets (pluto)
    packets_out: int | None = 0

    def __add__(self, other: Traffic) -> Traffic:
        return Traffic(self.bytes_in + other.bytes_in, self.bytes_out + other.bytes_out,
                       _add_count(self.packets_in, other.packets_in),
                       _add_count(self.packets_out, other.packets_out))


NO_PACKETS = Traffic(packets_in=None, packets_out=None)  # a sum that stays without packet counts


def _add_count(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else a + b


@dataclass(frozen=True)
class ChildSA:
    name: str  # the CHILD config's name: an ipsec.conf conn, a swanctl.conf child
    uid: int
    state: str  # strongSwan's child_sa_state name: INSTALLED, REKEYED, ...
    ike_uid: int  # the IKE SA that carries it
    traffic: Traffic = Traffic()
    remote_ts: tuple[str, ...] = ()  # its remote traffic selectors (stroke)


@dataclass(frozen=True)
class TunnelConfig:
    """What the daemon has loaded for a CHILD config: where it goes and what it carries,
    as configured (%any stays %any); several addresses or selectors are comma-separated."""

    ike: str  # the IKE config it belongs to
    local: str
    remote: str
    local_ts: str
    remote_ts: str
    ike_version: str  # as the daemon names it: IKEv1, IKEv2, IKEv1/2


# A certificate's type label, from charon's own flag for it (VICI's flag, stroke's listing)
# and whether it names itself as its issuer.
CERTIFICATE_TYPES = {"NONE": "end-entity", "CA": "ca", "OCSP": "ocsp-signer", "AA": "attribute-authority"}


@dataclass(frozen=True)
class Certificate:
    """An X.509 certificate the daemon has loaded, its names as strongSwan prints them."""

    subject: str
    issuer: str
    serial: str  # hex bytes, colon-separated: "8a:01"
    type: str  # end-entity, ca (self-signed), intermediate (a CA issued by another), ocsp-signer, ...
    not_before: float  # Unix time
    not_after: float


def certificate_type(flag: str, subject: str, issuer: str) -> str:
    """The type label of a certificate charon flags NONE, CA, OCSP or AA."""
    if flag == "CA" and subject != issuer:
        return "intermediate"
    return CERTIFICATE_TYPES.get(flag, flag.lower())


@dataclass(frozen=True)
class Crl:
    """A certificate revocation list the daemon holds."""

    issuer: str
    next_update: float  # Unix time; past it, charon no longer trusts the list


@dataclass(frozen=True)
class Pool:
    """A virtual IP address pool: ipsec.conf's rightsourceip (named after it), swanctl.conf's pools."""

    name: str
    size: int  # addresses
    online: int  # leases held by a connected client
    offline: int  # leases kept for a client that left


@dataclass(frozen=True)
class DaemonState:
    """One snapshot of the daemon."""

    ike_sas: list[IkeSA]
    child_sas: list[ChildSA]
    routed: set[str] = field(default_factory=set)  # CHILD configs with a trap policy
    loaded: list[Tunnel] = field(default_factory=list)  # tunnels the daemon itself lists (VICI)
    configs: dict[str, TunnelConfig] = field(default_factory=dict)  # by CHILD config name
    version: str = ""
    uptime: float | None = None  # seconds
    backend: str = ""
    counts_packets: bool = True  # pluto counts bytes only
    pools: list[Pool] = field(default_factory=list)
    certificates: list[Certificate] = field(default_factory=list)
    crls: list[Crl] = field(default_factory=list)


class Daemon(Protocol):
    def ask(self) -> Callable[[], DaemonState]:
        """Send the questions and return at once; calling the result reads the answers. In
        between the daemon works on them (charon takes about 45 ms for 1000 IKE SAs) while the
        run loads prometheus_client."""


# ---------------------------------------------------------------- query daemon: stroke


_DELTA_UNITS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
_DELTA = r"(\d+) (second|minute|hour|day)s?"
# "weakSwan" is the build's name when aggressive-mode PSK is forced.
_STATUS_HEADER = re.compile(r"^Status of IKE charon daemon \((?:strong|weak)Swan ([^,)]*)", re.MULTILINE)
_SINCE = re.compile(r"^  uptime: [^\n]*, since ([A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d \d{4})$", re.MULTILINE)
_SA_COUNTS = re.compile(r"^Security Associations \((\d+) up, (\d+) connecting\):", re.MULTILINE)
# The line that opens each SA: "   name[3]: ESTABLISHED 5 minutes ago, ..." (IKE SA) or
# "name{7}:  INSTALLED, TUNNEL, ..." (CHILD SA or trap policy), right-aligned names.
# Found by its state word (strongSwan's ike_sa_state and child_sa_state names), then
# the name is the rest of the line before it: no backtracking over long lines.
_SA_STATE = re.compile(
    r"(?:\[(?P<ike>\d+)\]|\{(?P<child>\d+)\}):[ \t]+(?P<state>CREATED|CONNECTING|ESTABLISHED|PASSIVE|"
    r"REKEYING|REKEYED|DELETING|DESTROYING|ROUTED|INSTALLING|INSTALLED|UPDATING|RETRYING|DELETED)\b")
_IKE_AGE = re.compile(" " + _DELTA + " ago")
_IKE_REKEY = re.compile(r"(?:rekeying|reauthentication) in " + _DELTA)
# The "Connections:" section: an IKE config's line, then its CHILD configs' lines
# (conns sharing one IKE config are listed under the first one's name).
_CONNECTIONS = re.compile(r"^Connections:\n(.*?)^(?:Shunted Connections|Routed Connections|Security Associations)",
                          re.MULTILINE | re.DOTALL)
_IKE_CONFIG = re.compile(r"^ *(?P<name>.+?):  (?P<local>\S+)\.\.\.(?P<remote>\S+)  (?P<version>IKE\S*)$",
                         re.MULTILINE)
_CHILD_CONFIG = re.compile(r"^ *(?P<name>.+?):   child:  (?P<local>.*?) === (?P<remote>.*) \S+$", re.MULTILINE)
# stroke shows a packet count only once the SA has been used: "640 bytes_i (5 pkts, 1s ago)"
# or "0 bytes_i"; one packet is "1 pkt".
_TRAFFIC = re.compile(r", (\d+) bytes_i(?: \((\d+) pkts?,[^)]*\))?, (\d+) bytes_o(?: \((\d+) pkts?,)?")
# An ESTABLISHED IKE SA's ends: "ago, LOCAL[local id]...REMOTE[remote id]". The remote id
# is the peer's choice (charon prints it with non-printable bytes as "?"): the local id,
# ours, ends at the first "]...".
_IKE_ENDS = re.compile(r" ago, [^\[\n]*\[[^\n]*?\]\.\.\.(?P<host>[^\[\n]*)\[(?P<id>[^\n]*)\]$", re.MULTILINE)
# An IKE SA's detail lines, "   name[3]: Remote EAP identity: user3": the first "]: " of
# each line is the daemon's, whatever the peer's identity holds after it.
_IKE_DETAIL = re.compile(r"^[^\n]*?\]: (?P<key>Remote EAP identity|Remote XAuth identity|IKEv[12] SPIs): ?"
                         r"(?P<value>[^\n]*)$", re.MULTILINE)
# A CHILD SA's selectors: "   name{7}:   10.77.0.0/24 === 10.99.0.3/32".
_CHILD_TS = re.compile(r"^[^\n]*?\}:   (?P<local>[^\n]*?) === (?P<remote>[^\n]*)$", re.MULTILINE)
_HOST_ROUTE = re.compile(r"(?P<address>[0-9a-fA-F.:]+)/(?:32|128)$")
_POOLS = re.compile(r"^Virtual IP pools \(size/online/offline\):\n((?:  [^\n]*\n)*)", re.MULTILINE)
_POOL = re.compile(r"^  (?P<name>[^\n]+): (?P<size>\d+)/(?P<online>\d+)/(?P<offline>\d+)$", re.MULTILINE)


def _delta(match: re.Match[str], first: int = 1) -> float:
    """Seconds in stroke's "N unit(s)", which rounds down to minutes past 2 min, hours past 2 h."""
    return int(match.group(first)) * _DELTA_UNITS[match.group(first + 1)]


def _uptime(since: str) -> float | None:
    """Seconds since charon's start, from its local-time "Nov 24 22:34:49 2026" (stroke and VICI)."""
    try:
        return max(0.0, time.time() - time.mktime(time.strptime(since, "%b %d %H:%M:%S %Y")))
    except ValueError:
        return None


def parse_statusall(text: str) -> DaemonState:
    """Parse `ipsec statusall` (stroke) output into the SAs it lists."""
    header = _STATUS_HEADER.search(text)
    if header is None:
        raise DaemonError("no daemon status in the output (is charon running?)")
    counts = _SA_COUNTS.search(text)
    if counts is None:
        raise DaemonError("the output has no 'Security Associations' section: truncated?")
    ike: dict[int, IkeSA] = {}
    # Before 5.3, stroke numbered CHILD SAs by reqid: a CHILD SA being rekeyed and its
    # successor share one {N}, listed one after the other. Every opening line is one SA.
    child: list[ChildSA] = []
    routed = set()
    carrier = -1  # the IKE SA listed last, which carries the CHILD SAs listed after it
    # An SA's opening line starts with its name; "name[3]: ESTABLISHED" inside a peer's
    # identity ("...[user[9]: ESTABLISHED]") follows a ": " on its line and opens nothing.
    matches = [m for m in _SA_STATE.finditer(text) if ": " not in _sa_name(text, m)]
    for m, following in zip(matches, [*matches[1:], None]):
        name = _sa_name(text, m)
        ike_uid, child_uid, sa_state = m.group("ike", "child", "state")
        # An SA's detail lines run up to the next SA's opening line.
        end = following.start() if following else len(text)
        if ike_uid is not None:
            carrier = int(ike_uid)
            if carrier in ike:
                continue
            age = _IKE_AGE.match(text, m.end(), end)
            rekeys = [_delta(r) for r in _IKE_REKEY.finditer(text, m.end(), end)]
            ike[carrier] = _with_peer(IkeSA(name, carrier, sa_state, _delta(age) if age else None,
                                            min(rekeys, default=None)), text, m.end(), end)
        elif sa_state == "ROUTED":
            routed.add(name)
        elif m.start() > counts.start():
            traffic = _TRAFFIC.search(text, m.end(), end)
            b_in, p_in, b_out, p_out = (int(n or 0) for n in traffic.groups()) if traffic else (0, 0, 0, 0)
            selectors = _CHILD_TS.search(text, m.end(), end)
            child.append(ChildSA(name, int(child_uid), sa_state, carrier, Traffic(b_in, b_out, p_in, p_out),
                                 tuple(selectors.group("remote").split()) if selectors else ()))
    announced = int(counts.group(1)) + int(counts.group(2))
    if len(ike) < announced:
        # A cut-off answer would make the missing tunnels look down.
        raise DaemonError(f"the daemon announced {announced} IKE SAs but listed {len(ike)}: truncated?")
    since = _SINCE.search(text)
    return DaemonState(_with_virtual_ips(ike, child), child, routed, configs=_stroke_configs(text),
                       version=header.group(1), uptime=_uptime(since.group(1)) if since else None,
                       backend="stroke", pools=parse_stroke_pools(text[: counts.start()]))


def _sa_name(text: str, state: re.Match[str]) -> str:
    """What precedes an SA's state word on its line: its name, for an opening line."""
    return text[text.rfind("\n", 0, state.start()) + 1 : state.start()].lstrip(" ")


def _with_peer(sa: IkeSA, text: str, start: int, end: int) -> IkeSA:
    """sa with who its peer is, from its opening line's rest (start) and detail lines (to end)."""
    line_end = text.find("\n", start, end)
    line_end = end if line_end < 0 else line_end
    ends = _IKE_ENDS.search(text, start, line_end)
    remote_host, remote_id = ends.group("host", "id") if ends else ("", "")
    details = {m.group("key"): m.group("value") for m in _IKE_DETAIL.finditer(text, line_end, end)}
    version = next((key.split()[0] for key in details if key.endswith(" SPIs")), "")
    return replace(sa, remote_host=remote_host, remote_id=remote_id, eap_id=details.get("Remote EAP identity", ""),
                   xauth_id=details.get("Remote XAuth identity", ""), ike_version=version)


def _with_virtual_ips(ike: dict[int, IkeSA], child: list[ChildSA]) -> list[IkeSA]:
    """Each IKE SA with the single addresses its CHILD SAs lead to, other than the peer's
    own (a remote-access client's virtual IPs: stroke's statusall names them nowhere else)."""
    addresses: dict[int, dict[str, None]] = {}
    for c in child:
        for selector in c.remote_ts:
            host = _HOST_ROUTE.match(selector)
            if host and c.ike_uid in ike and host.group("address") != ike[c.ike_uid].remote_host:
                addresses.setdefault(c.ike_uid, {})[host.group("address")] = None
    return [replace(sa, virtual_ips=tuple(addresses[uid])) if uid in addresses else sa for uid, sa in ike.items()]


def parse_stroke_pools(text: str) -> list[Pool]:
    """statusall's "Virtual IP pools (size/online/offline):" lines (pools of ipsec.conf's rightsourceip)."""
    section = _POOLS.search(text)
    if section is None:
        return []
    return [Pool(m.group("name"), int(m.group("size")), int(m.group("online")), int(m.group("offline")))
            for m in _POOL.finditer(section.group(1))]


def _stroke_configs(text: str) -> dict[str, TunnelConfig]:
    section = _CONNECTIONS.search(text)
    configs: dict[str, TunnelConfig] = {}
    if section is None:
        return configs
    ike = None
    for line in section.group(1).splitlines():
        m = _IKE_CONFIG.match(line)
        if m:
            ike = m
            continue
        child = _CHILD_CONFIG.match(line)
        if child and ike:
            configs[child.group("name")] = TunnelConfig(
                ike.group("name"), ike.group("local"), ike.group("remote"),
                ",".join(child.group("local").split()), ",".join(child.group("remote").split()),
                ike.group("version"))
    return configs


# `ipsec listall --utc`: a section per kind of credential, each certificate a block of
# "  key:  value" lines. Times in UTC ("Dec 21 02:45:29 UTC 2026"): without --utc charon
# prints its own local time, which the collector's zone need not share.
_LISTING_SECTION = re.compile(r"^List of (.+?)s?:?$", re.MULTILINE)
_LISTED_FLAGS = {"X.509 End Entity Certificate": "NONE", "X.509 CA Certificate": "CA",
                 "X.509 OCSP Signer Certificate": "OCSP", "X.509 AA Certificate": "AA"}
_LISTED_NAME = re.compile(r'^  (subject|issuer): +"(.*)"$', re.MULTILINE)  # names may hold quotes
_LISTED_SERIAL = re.compile(r"^  serial: +([0-9a-f:]+)$", re.MULTILINE)
_UTC_TIME = r"([A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d) UTC (\d{4})"
_LISTED_VALIDITY = re.compile(r"^  validity: +not before " + _UTC_TIME + r",[^\n]*\n +not after +" + _UTC_TIME,
                              re.MULTILINE)
_LISTED_NEXT_UPDATE = re.compile(r"^ +next on " + _UTC_TIME, re.MULTILINE)


def _utc_time(match: re.Match[str], first: int) -> float:
    return float(calendar.timegm(time.strptime(f"{match.group(first)} {match.group(first + 1)}",
                                               "%b %d %H:%M:%S %Y")))


def parse_certificate_listing(text: str) -> tuple[list[Certificate], list[Crl]]:
    """The X.509 certificates and CRLs in `ipsec listall --utc` output; an entry without a
    subject, issuer, serial or both validity times (in UTC) is left out with a warning."""
    certificates: list[Certificate] = []
    crls: list[Crl] = []
    left_out: list[str] = []
    sections = list(_LISTING_SECTION.finditer(text))
    for section, following in zip(sections, [*sections[1:], None]):
        kind = section.group(1)
        if kind not in _LISTED_FLAGS and kind != "X.509 CRL":
            continue
        body = text[section.end() : following.start() if following else len(text)]
        # Every entry opens with its first name line: subject (certificates), issuer (CRLs).
        opener = "  issuer:" if kind == "X.509 CRL" else "  subject:"
        for entry in body.split("\n" + opener)[1:]:
            entry = opener + entry
            names = dict(_LISTED_NAME.findall(entry))
            if kind == "X.509 CRL":
                next_update = _LISTED_NEXT_UPDATE.search(entry)
                if "issuer" in names and next_update:
                    crls.append(Crl(names["issuer"], _utc_time(next_update, 1)))
                    continue
            else:
                serial, validity = _LISTED_SERIAL.search(entry), _LISTED_VALIDITY.search(entry)
                if "subject" in names and "issuer" in names and serial and validity:
                    certificates.append(Certificate(
                        names["subject"], names["issuer"], serial.group(1),
                        certificate_type(_LISTED_FLAGS[kind], names["subject"], names["issuer"]),
                        _utc_time(validity, 1), _utc_time(validity, 3)))
                    continue
            left_out.append(f"{kind} {entry.splitlines()[0].strip()}")
    if left_out:
        warn(f"{len(left_out)} entries of `ipsec listall --utc` lack a name, a serial or a time in UTC and are "
             f"left out; the first: {left_out[0]}")
    return certificates, crls


@dataclass(frozen=True)
class StrokeDaemon:
    """charon through the `ipsec` command (stroke): `ipsec statusall`, then `ipsec listall
    --utc` for the certificates, both within one timeout."""

    ipsec: str = "ipsec"
    timeout: float = 10.0

    def ask(self) -> Callable[[], DaemonState]:
        deadline = time.monotonic() + self.timeout
        statusall = start_command([self.ipsec, "statusall"], deadline, self.timeout)

        def read() -> DaemonState:
            stdout, stderr, code = statusall.finish()
            # The wrapper's exit status says whether starter runs, not whether the
            # query worked: the output decides.
            try:
                state = parse_statusall(stdout)
            except DaemonError as e:
                said = (stderr.strip().splitlines() or [str(e)])[-1]
                raise DaemonError(f"`{' '.join(statusall.command)}` gave no usable daemon status (exit {code}): "
                                  f"{said}") from None
            return with_listed_certificates(state, [self.ipsec, "listall", "--utc"], parse_certificate_listing,
                                            deadline, self.timeout)

        return read


def certificates_late(timeout: float) -> str:
    """The tunnels came in time, the certificates did not (charon lists thousands slowly)."""
    return (f"the daemon did not list its certificates within {timeout:g}s (with the tunnels): the tunnels "
            "are written, no certificate series this run; a longer --timeout gives it time")


def with_listed_certificates(state: DaemonState, command: list[str],
                             parse: Callable[[str], tuple[list[Certificate], list[Crl]]],
                             deadline: float, timeout: float) -> DaemonState:
    """state with the certificates and CRLs a listing command prints, asked last, in what is
    left of the run's deadline; when it does not answer by then, state as it is (warned)."""
    try:
        listing, _, _ = start_command(command, deadline, timeout).finish()
    except CommandTimeout:
        warn(certificates_late(timeout))
        return state
    certificates, crls = parse(listing)
    return replace(state, certificates=certificates, crls=crls)


_LEASES_POOL = re.compile(r"^Leases in pool '(?P<name>[^\n]*)', usage: (?P<used>\d+)/(?P<size>\d+), "
                          r"(?P<online>\d+) online$", re.MULTILINE)


def parse_stroke_leases(text: str) -> list[Pool]:
    """`ipsec leases`: each ipsec.conf pool's "Leases in pool 'NAME', usage: USED/SIZE, N online"."""
    return [Pool(m.group("name"), int(m.group("size")), int(m.group("online")),
                 int(m.group("used")) - int(m.group("online"))) for m in _LEASES_POOL.finditer(text)]


@dataclass(frozen=True)
class StrokePools:
    """The pools of ipsec.conf's rightsourceip, which charon keeps in its stroke plugin:
    VICI's get-pools does not list them. One `ipsec leases` when charon's stroke socket exists,
    run while charon answers VICI, within the same deadline."""

    ipsec: str = "ipsec"
    stroke_socket: str = DEFAULT_STROKE_SOCKET

    def ask(self, deadline: float, timeout: float) -> RunningCommand | None:
        if not os.path.exists(self.stroke_socket) or shutil.which(self.ipsec) is None:
            return None
        try:
            return start_command([self.ipsec, "leases"], deadline, timeout)
        except DaemonError as e:
            warn(f"{e}; ipsec.conf's address pools left out")  # the tunnels are VICI's, and known
            return None


def read_stroke_pools(leases: RunningCommand) -> list[Pool]:
    try:
        stdout, _, _ = leases.finish()
    except DaemonError as e:
        warn(f"{e}; ipsec.conf's address pools left out")
        return []
    return parse_stroke_leases(stdout)


@dataclass(frozen=True)
class StatusFile:
    """A saved daemon answer, replayed instead of asking the daemon: `ipsec statusall`
    (strongSwan), or `ipsec whack --status` followed by `ipsec whack --trafficstatus` (and
    `--addresspoolstatus`) in one file (libreswan; told apart by pluto's "Connection list:")."""

    path: str

    def ask(self) -> Callable[[], DaemonState]:
        return self.read

    def read(self) -> DaemonState:
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError as e:
            raise DaemonError(f"cannot read status file {self.path}: {e.strerror}") from None
        try:
            if _STATUS_HEADER.search(text) is None and "Connection list:" in text:
                return parse_pluto(text, text, text)
            return parse_statusall(text)
        except DaemonError as e:
            raise DaemonError(f"{self.path}: {e}") from None


# ---------------------------------------------------------------- query daemon: VICI


class ViciUnreachable(DaemonError):
    """Nothing accepts a connection on the VICI socket."""


class ViciIncomplete(DaemonError):
    """charon left an IKE SA out of list-sas (its 512 KiB message limit)."""


_VICI_SHUNT_MODES = {"PASS", "DROP"}


def parse_vici(answer: dict[str, Any]) -> DaemonState:
    """One snapshot from the VICI answers ViciDaemon collects (bytes decoded to str).

    answer: "version", "stats", "list-sas", "list-policies", "list-conns", "get-pools"
    (only pools loaded over VICI), "list-certs", then "stats-after": stats again, taken after
    list-sas.
    """
    ike: list[IkeSA] = []
    child: list[ChildSA] = []
    for event in answer["list-sas"]:
        for ike_name, sa in event.items():
            rekeys = [float(sa[k]) for k in ("rekey-time", "reauth-time") if k in sa]
            age = float(sa["established"]) if "established" in sa else None
            ike.append(IkeSA(ike_name, int(sa["uniqueid"]), sa["state"], age, min(rekeys, default=None),
                             sa.get("remote-host", ""), sa.get("remote-id", ""), sa.get("remote-eap-id", ""),
                             sa.get("remote-xauth-id", ""), tuple(sa.get("remote-vips", [])),
                             f"IKEv{sa['version']}" if "version" in sa else ""))
            for c in sa.get("child-sas", {}).values():
                traffic = Traffic(*(int(c.get(k, 0)) for k in ("bytes-in", "bytes-out", "packets-in",
                                                               "packets-out")))
                child.append(ChildSA(c["name"], int(c["uniqueid"]), c["state"], int(sa["uniqueid"]), traffic))
    # charon drops an IKE SA from list-sas whose message would pass VICI's 512 KiB
    # limit (about 1300 CHILD SAs): its tunnels must not look down.
    counted = min(int(answer[k]["ikesas"]["total"]) for k in ("stats", "stats-after"))
    if len(ike) < counted:
        raise ViciIncomplete(
            f"the daemon has {counted} IKE SAs but VICI listed {len(ike)} (an IKE SA with too many "
            "CHILD SAs passes VICI's message size limit)")
    loaded: list[Tunnel] = []
    configs: dict[str, TunnelConfig] = {}
    for event in answer["list-conns"]:
        for conn_name, conn in event.items():
            local, remote = (",".join(conn.get(k, [])) for k in ("local_addrs", "remote_addrs"))
            for name, c in conn.get("children", {}).items():
                loaded.append(Tunnel(name, auto=None, shunt=c.get("mode") in _VICI_SHUNT_MODES, loaded=True,
                                     ike=conn_name))
                configs.setdefault(name, TunnelConfig(conn_name, local, remote, ",".join(c.get("local-ts", [])),
                                                      ",".join(c.get("remote-ts", [])), conn.get("version", "")))
    routed = {p["child"] for event in answer["list-policies"] for p in event.values()
              if p.get("mode") not in _VICI_SHUNT_MODES}
    pools = [Pool(name, int(p["size"]), int(p["online"]), int(p["offline"]))
             for name, p in answer["get-pools"].items()]
    certificates, crls = vici_certificates(answer["list-certs"])
    return DaemonState(ike, child, routed, loaded, configs, version=answer["version"].get("version", ""),
                       uptime=_uptime(answer["stats"].get("uptime", {}).get("since", "")), backend="vici",
                       pools=pools, certificates=certificates, crls=crls)


# The names strongSwan prints for the attributes of a distinguished name (its oid.txt).
_DN_ATTRIBUTES = {
    "2.5.4.3": "CN", "2.5.4.4": "SN", "2.5.4.5": "serialNumber", "2.5.4.6": "C", "2.5.4.7": "L", "2.5.4.8": "ST",
    "2.5.4.9": "STREET", "2.5.4.10": "O", "2.5.4.11": "OU", "2.5.4.12": "T", "2.5.4.13": "D",
    "2.5.4.16": "postalAddress", "2.5.4.17": "postalCode", "2.5.4.41": "N", "2.5.4.42": "G", "2.5.4.43": "I",
    "2.5.4.45": "ID", "2.5.4.46": "dnQualifier", "2.5.4.54": "dmdName", "2.5.4.65": "pseudonym", "2.5.4.72": "role",
    "1.2.840.113549.1.9.1": "E", "1.2.840.113549.1.9.2": "unstructuredName",
    "1.2.840.113549.1.9.8": "unstructuredAddress", "0.9.2342.19200300.100.1.1": "UID",
    "0.9.2342.19200300.100.1.25": "DC", "0.2.262.1.10.7.20": "ND", "2.23.133.2.3": "TCGID",
}
_DN_UNPRINTABLE = re.compile(rb"[^\x20-\x7e]")


def strongswan_dn(name: Any) -> str:
    """A cryptography x509.Name as strongSwan prints it (stroke, swanctl): "C=CH, O=Org, CN=gw",
    each byte outside printable ASCII a '?' (other attributes by their dotted OID)."""
    parts = []
    for attribute in name:
        value = attribute.value
        raw = value if isinstance(value, bytes) else value.encode("utf-8", "replace")
        oid = attribute.oid.dotted_string
        parts.append(f"{_DN_ATTRIBUTES.get(oid, oid)}={_DN_UNPRINTABLE.sub(b'?', raw).decode('ascii')}")
    return ", ".join(parts)


def _serial(number: int) -> str:
    """A serial number as strongSwan prints it: its bytes in hex, colon-separated."""
    raw = number.to_bytes(max(1, (number.bit_length() + 7) // 8), "big", signed=False)
    return ":".join(f"{byte:02x}" for byte in raw)


def _datetime(item: Any, name: str) -> Any:
    """cryptography's datetime attribute NAME: NAME_utc (aware) from cryptography 42 on, which
    deprecates NAME (naive, in UTC)."""
    return getattr(item, f"{name}_utc") if hasattr(item, f"{name}_utc") else getattr(item, name)


def _unix_time(moment: Any) -> float:
    return float(calendar.timegm(moment.utctimetuple()))


def _still_known(x509: Any, der: bytes, backend: Any) -> str:
    """What can still be told of a certificate whose names the library refuses."""
    try:
        cert = x509.load_der_x509_certificate(der, backend)
        expiry = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(_unix_time(_datetime(cert, "not_valid_after"))))
        return f" with serial {_serial(cert.serial_number)}, not after {expiry} UTC"
    except Exception:  # noqa: BLE001 (no more to tell)
        return ""


def vici_certificates(events: list[ViciMessage]) -> tuple[list[Certificate], list[Crl]]:
    """The X.509 certificates and CRLs in list-certs' events, their DER read by the
    cryptography package; without it, none (with a warning). An entry it cannot read is left
    out with a warning."""
    wanted = [e for e in events if e.get("type") in ("X509", "X509_CRL")]
    if not wanted:
        return [], []
    try:
        # Not a line per run in the log for a library's own notices (cryptography 47 warns on
        # import under Python 3.8).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from cryptography import __version__ as cryptography_version
            from cryptography import x509
    except ImportError:
        warn(f"the daemon holds {len(wanted)} certificates and CRLs, but without the Python package "
             "cryptography (Debian: python3-cryptography) they cannot be read: no certificate series")
        return [], []
    # Before cryptography 3.1 the loaders want its OpenSSL backend; later ones ignore it, and
    # loading it would cost about 10 ms a run.
    backend = None
    if tuple(int(part) for part in re.findall(r"\d+", cryptography_version)[:2]) < (3, 1):
        from cryptography.hazmat.backends import default_backend
        backend = default_backend()
    certificates: list[Certificate] = []
    crls: list[Crl] = []
    unreadable: list[str] = []
    for number, event in enumerate(wanted, 1):
        # list-certs was decoded with surrogateescape: encoding back gives the DER bytes.
        der = event.get("data", "").encode("utf-8", "surrogateescape")
        try:
            if event["type"] == "X509_CRL":
                crl = x509.load_der_x509_crl(der, backend)
                next_update = _datetime(crl, "next_update")
                if next_update is not None:  # a CRL without a next update never goes stale
                    crls.append(Crl(strongswan_dn(crl.issuer), _unix_time(next_update)))
                continue
            cert = x509.load_der_x509_certificate(der, backend)
            subject, issuer = strongswan_dn(cert.subject), strongswan_dn(cert.issuer)
            certificates.append(Certificate(
                subject, issuer, _serial(cert.serial_number),
                certificate_type(event.get("flag", "NONE"), subject, issuer),
                _unix_time(_datetime(cert, "not_valid_before")), _unix_time(_datetime(cert, "not_valid_after"))))
        except Exception as e:  # noqa: BLE001 (whatever the library raises for one entry, the rest is written)
            what = "CRL" if event["type"] == "X509_CRL" else f"certificate{_still_known(x509, der, backend)}"
            unreadable.append(f"{what}, number {number} of the list ({type(e).__name__}: {e})")
    if unreadable:
        warn(f"{len(unreadable)} of the {len(wanted)} certificates and CRLs the daemon listed cannot be read "
             f"and are left out; the first: {unreadable[0]}")
    return certificates, crls


# charon's VICI protocol (its plugins/vici/README.md), spoken with the standard library:
# a packet is a 4-byte big-endian length, a type byte, a name for named types, then a
# message of elements. The decoder trusts nothing: every length is checked against what
# arrived, and a packet past charon's own 512 KiB limit is refused before it is read.
VICI_MAX_PACKET = 512 * 1024
VICI_MAX_DEPTH = 32  # charon nests 4 deep; more means a corrupt stream
_VICI_CMD_REQUEST, _VICI_CMD_RESPONSE, _VICI_CMD_UNKNOWN = 0, 1, 2
_VICI_EVENT_REGISTER, _VICI_EVENT_UNREGISTER, _VICI_EVENT_CONFIRM, _VICI_EVENT_UNKNOWN, _VICI_EVENT = 3, 4, 5, 6, 7
_VICI_NAMED_PACKETS = {_VICI_CMD_REQUEST, _VICI_EVENT_REGISTER, _VICI_EVENT_UNREGISTER, _VICI_EVENT}
_VICI_SECTION_START, _VICI_SECTION_END, _VICI_KEY_VALUE = 1, 2, 3
_VICI_LIST_START, _VICI_LIST_ITEM, _VICI_LIST_END = 4, 5, 6


class ViciError(DaemonError):
    """charon's VICI answer is malformed, or the socket failed mid-conversation."""


ViciMessage = Dict[str, Any]  # str values, ViciMessage sections, lists of str


def vici_decode(data: bytes, errors: str = "replace") -> ViciMessage:
    """One VICI message (the packet after its type and name) as dicts, lists and str; bytes
    that are not UTF-8 decoded by the codec error handler errors (surrogateescape keeps binary
    values, such as list-certs' DER, recoverable)."""
    root: ViciMessage = {}
    stack = [root]  # the open sections, innermost last
    section = root
    items: list[str] | None = None  # the open list, if any
    pos, end = 0, len(data)
    # One flat loop, lengths read in place: list-sas at 1000 tunnels is 30,000 elements.
    try:
        while pos < end:
            kind = data[pos]
            if kind == _VICI_KEY_VALUE and items is None:
                name_end = pos + 2 + data[pos + 1]
                value_end = name_end + 2 + (data[name_end] << 8 | data[name_end + 1])
                if value_end > end:
                    raise IndexError
                section[data[pos + 2 : name_end].decode("utf-8", "replace")] = \
                    data[name_end + 2 : value_end].decode("utf-8", errors)
                pos = value_end
            elif kind == _VICI_LIST_ITEM and items is not None:
                value_end = pos + 3 + (data[pos + 1] << 8 | data[pos + 2])
                if value_end > end:
                    raise IndexError
                items.append(data[pos + 3 : value_end].decode("utf-8", errors))
                pos = value_end
            elif kind in (_VICI_SECTION_START, _VICI_LIST_START) and items is None:
                name_end = pos + 2 + data[pos + 1]
                if name_end > end:
                    raise IndexError
                name = data[pos + 2 : name_end].decode("utf-8", "replace")
                pos = name_end
                if kind == _VICI_LIST_START:
                    items = section[name] = []
                elif len(stack) > VICI_MAX_DEPTH:
                    raise ViciError(f"sections nested deeper than {VICI_MAX_DEPTH}")
                else:
                    section[name] = section = {}
                    stack.append(section)
            elif kind == _VICI_SECTION_END and items is None:
                if len(stack) == 1:
                    raise ViciError("a section end without a section")
                stack.pop()
                section = stack[-1]
                pos += 1
            elif kind == _VICI_LIST_END and items is not None:
                items = None
                pos += 1
            else:
                where = "inside a list" if items is not None else "where a section's element belongs"
                raise ViciError(f"element type {kind} {where}")
    except IndexError:
        raise ViciError("the message ends inside an element") from None
    if items is not None or len(stack) > 1:
        raise ViciError("the message ends inside a list or section")
    return root


def vici_encode(message: ViciMessage) -> bytes:
    """A VICI message from dicts, lists and str (the inverse of vici_decode)."""
    out = bytearray()

    def put_name(key: str) -> None:
        raw = key.encode()
        out.append(len(raw))
        out.extend(raw)

    def put_value(text: str) -> None:
        raw = text.encode()
        out.extend(len(raw).to_bytes(2, "big"))
        out.extend(raw)

    def put(section: ViciMessage) -> None:
        for key, item in section.items():
            if isinstance(item, dict):
                out.append(_VICI_SECTION_START)
                put_name(key)
                put(item)
                out.append(_VICI_SECTION_END)
            elif isinstance(item, list):
                out.append(_VICI_LIST_START)
                put_name(key)
                for entry in item:
                    out.append(_VICI_LIST_ITEM)
                    put_value(entry)
                out.append(_VICI_LIST_END)
            else:
                out.append(_VICI_KEY_VALUE)
                put_name(key)
                put_value(item)

    put(message)
    return bytes(out)


def vici_packet(kind: int, name: str = "", message: ViciMessage | None = None) -> bytes:
    body = bytes([kind])
    if kind in _VICI_NAMED_PACKETS:
        raw = name.encode()
        body += bytes([len(raw)]) + raw
    body += vici_encode(message or {})
    return len(body).to_bytes(4, "big") + body


class ViciConnection:
    """One conversation with charon's VICI socket, every read bounded by one deadline."""

    def __init__(self, sock: socket.socket, where: str, deadline: float) -> None:
        self.sock = sock
        self.where = where
        self.deadline = deadline
        self.questions = bytearray()  # asked, not sent yet

    def _read(self, size: int) -> bytes:
        data = bytearray(size)
        buffer = memoryview(data)
        got = 0
        while got < size:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout()
            self.sock.settimeout(remaining)
            try:
                count = self.sock.recv_into(buffer[got:])
            except ConnectionResetError:  # closed with questions of ours unread: a hang-up too
                count = 0
            if count == 0:
                raise ViciError(f"VICI at {self.where} closed the connection in the middle of an answer")
            got += count
        return bytes(data)

    def receive(self) -> tuple[int, str, bytes]:
        """The next packet: its type, its name (named types) and its message bytes."""
        length = int.from_bytes(self._read(4), "big")
        if not 1 <= length <= VICI_MAX_PACKET:
            raise ViciError(f"VICI at {self.where} announced a packet of {length} bytes "
                            f"(1 to {VICI_MAX_PACKET} allowed)")
        packet = self._read(length)
        kind, pos, name = packet[0], 1, ""
        if kind in _VICI_NAMED_PACKETS:
            if length < 2 or 2 + packet[1] > length:
                raise ViciError(f"VICI at {self.where} sent a packet cut inside its name")
            pos = 2 + packet[1]
            name = packet[2:pos].decode("utf-8", "replace")
        elif kind > _VICI_EVENT:
            raise ViciError(f"VICI at {self.where} sent a packet of unknown type {kind}")
        return kind, name, packet[pos:]

    def send(self) -> None:
        """The questions asked so far, in one write."""
        self.sock.settimeout(max(0.001, self.deadline - time.monotonic()))
        try:
            self.sock.sendall(self.questions)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon hung up: what it sent before, or nothing, is read as its answer
        self.questions.clear()

    def decode(self, body: bytes, errors: str = "replace") -> ViciMessage:
        try:
            return vici_decode(body, errors)
        except ViciError as e:
            raise ViciError(f"VICI at {self.where} sent a malformed message: {e}") from None

    def ask(self, command: str, event: str | None = None, message: ViciMessage | None = None) -> None:
        """Ask a command (sent by send()); for one that answers with an event per item
        (list-sas: one per IKE SA), register for its event before and unregister after.
        charon answers a connection's packets in the order they came (since 5.2), so every
        question can be sent at once."""
        if event is not None:
            self.questions += vici_packet(_VICI_EVENT_REGISTER, event)
        self.questions += vici_packet(_VICI_CMD_REQUEST, command, message)
        if event is not None:
            self.questions += vici_packet(_VICI_EVENT_UNREGISTER, event)

    def response(self, command: str) -> ViciMessage:
        """The answer to a command asked without an event."""
        return self._response(command, self.receive())

    def events(self, command: str, event: str, errors: str = "replace") -> list[ViciMessage]:
        """The answer to a command asked with its event: the events, then the command's own
        response; errors as in vici_decode."""
        self._confirm(event)
        events = []
        while True:
            packet = self.receive()
            if packet[0] != _VICI_EVENT:
                break
            if packet[1] != event:
                raise ViciError(f"VICI at {self.where} sent event {packet[1]} during {command}")
            events.append(self.decode(packet[2], errors))
        self._response(command, packet)
        self._confirm(event)
        return events

    def _response(self, command: str, packet: tuple[int, str, bytes]) -> ViciMessage:
        kind, _, body = packet
        if kind == _VICI_CMD_UNKNOWN:
            raise ViciError(f"charon's VICI does not know the command {command}")
        if kind != _VICI_CMD_RESPONSE:
            raise ViciError(f"VICI at {self.where} answered {command} with a packet of type {kind}")
        return self.decode(body)

    def _confirm(self, event: str) -> None:
        answer = self.receive()[0]
        if answer == _VICI_EVENT_UNKNOWN:
            raise ViciError(f"charon's VICI does not know the event {event}")
        if answer != _VICI_EVENT_CONFIRM:
            raise ViciError(f"VICI at {self.where} answered the event {event} with a packet of type {answer}")


# What a run asks charon, in this order: the answer's key, the command, the event it streams
# (None: one response), its message. list-certs comes after these, last, as it may be late.
_VICI_QUESTIONS: list[tuple[str, str, str | None, ViciMessage | None]] = [
    ("version", "version", None, None),
    ("stats", "stats", None, None),
    ("list-sas", "list-sas", "list-sa", None),
    ("stats-after", "stats", None, None),  # did list-sas leave an IKE SA out? (parse_vici)
    ("list-policies", "list-policies", "list-policy", {"trap": "yes", "pass": "yes", "drop": "yes"}),
    ("list-conns", "list-conns", "list-conn", None),
    ("get-pools", "get-pools", None, None),
]


@dataclass(frozen=True)
class ViciDaemon:
    """charon through its VICI socket, as swanctl asks it; one connection per run."""

    socket_path: str = DEFAULT_VICI_SOCKET
    timeout: float = 10.0
    stroke_pools: StrokePools | None = None  # ipsec.conf's pools, which VICI does not list

    def ask(self) -> Callable[[], DaemonState]:
        deadline = time.monotonic() + self.timeout
        read_answers = self.send_questions(deadline)
        leases = self.stroke_pools.ask(deadline, self.timeout) if self.stroke_pools is not None else None

        def read() -> DaemonState:
            try:
                state = self._parse(read_answers())
            except BaseException:
                if leases is not None:
                    leases.stop()
                raise
            return state if leases is None else replace(state, pools=state.pools + read_stroke_pools(leases))

        return read

    def _parse(self, answer: dict[str, Any]) -> DaemonState:
        try:
            return parse_vici(answer)
        except (KeyError, ValueError, TypeError, AttributeError) as e:
            # Another strongSwan version's answer, without a field this one relies on.
            raise DaemonError(f"unexpected VICI answer from {self.socket_path}: "
                              f"{type(e).__name__} {e}") from None

    def send_questions(self, deadline: float) -> Callable[[], dict[str, Any]]:
        """Connect and send every question; the result reads the answers parse_vici reads,
        all by the deadline."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        vici = ViciConnection(sock, self.socket_path, deadline)
        with self._conversation(sock, closing=False):
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.socket_path)
            except OSError as e:
                raise ViciUnreachable(f"cannot connect to VICI at {self.socket_path}: "
                                      f"{e.strerror or e}") from None
            for _, command, event, message in _VICI_QUESTIONS:
                vici.ask(command, event, message)
            vici.ask("list-certs", "list-cert", {"type": "ANY"})
            vici.send()

        def read_answers() -> dict[str, Any]:
            with self._conversation(sock, closing=True):
                answer: dict[str, Any] = {
                    key: vici.response(command) if event is None else vici.events(command, event)
                    for key, command, event, _ in _VICI_QUESTIONS}
                try:
                    # DER in "data": decoded so that it can be encoded back to the same bytes
                    answer["list-certs"] = vici.events("list-certs", "list-cert", errors="surrogateescape")
                except socket.timeout:
                    answer["list-certs"] = []
                    warn(certificates_late(self.timeout))
                return answer

        return read_answers

    @contextmanager
    def _conversation(self, sock: socket.socket, closing: bool) -> Iterator[None]:
        """The socket's failures as DaemonErrors, the socket closed after one (or at the end,
        when closing)."""
        try:
            yield
        except socket.timeout:
            sock.close()
            raise DaemonError(f"VICI at {self.socket_path} did not answer within {self.timeout:g}s") from None
        except OSError as e:
            sock.close()
            raise ViciError(f"VICI at {self.socket_path}: {e.strerror or e}") from None
        except BaseException:
            sock.close()
            raise
        if closing:
            sock.close()


# ---------------------------------------------------------------- query daemon: pluto


# `ipsec whack --status` (4.x prefixes every line with "000 "; 5.x does not). A conn's
# first line: "NAME": LOCAL_TS===LOCAL[id]...REMOTE[id]===REMOTE_TS; ROUTING; ...
# (instances of a template conn add [N] and the peer's address after the name).
_PLUTO_LINE_PREFIX = r"^(?:000 )?"
_PLUTO_CONN = re.compile(_PLUTO_LINE_PREFIX + r'"(?P<name>[^"]+)"(?P<instance>\[\d+\][^:]*)?: '
                         r"(?P<ends>\S+); (?P<routing>[^;]+);", re.MULTILINE)
_PLUTO_POLICY = re.compile(_PLUTO_LINE_PREFIX + r'"(?P<name>[^"]+)"(?:\[\d+\][^:]*)?:   policy: (?P<version>IKEv[12])',
                           re.MULTILINE)
# Every state, IKE or IPsec: "#9: "up-v2":500 STATE_V2_ESTABLISHED_CHILD_SA (established Child SA); ...;
# IKE SA #5; ..." (5.x drops the STATE_V2_ prefix of IKEv2 states). The description in
# parentheses says "established" exactly for the established ones in both versions.
_PLUTO_STATE = re.compile(_PLUTO_LINE_PREFIX + r'#(?P<uid>\d+): "(?P<name>[^"]+)"(?:\[\d+\])?(?: (?P<peer>\S+))?:\d+ '
                          r"(?P<state>[A-Z][A-Z0-9_]+) \((?P<what>[^)]*)\)(?P<rest>[^\n]*)", re.MULTILINE)
_PLUTO_CARRIER = re.compile(r"\b(?:IKE|ISAKMP) SA #(\d+)")
_PLUTO_REKEY = re.compile(r"\b(?:REKEY|REPLACE) in (\d+)s")  # an IKE SA's next rekey or replacement
_PLUTO_CHILD_WORDS = ("QUICK", "CHILD", "IPSEC")  # IPsec SA states; the rest are IKE/ISAKMP SAs
# Routing states of a conn that waits for traffic with a trap policy (auto=ondemand).
_PLUTO_TRAPS = {"prospective erouted", "routed-ondemand"}
_PLUTO_VERSION = re.compile(r"\bpluto_version=([^,\s]+)")
# `ipsec whack --trafficstatus`: one line per established IPsec SA, exact bytes, no packets;
# an XAuth user's name comes before the figures, the peer's IKE identity (quoted) and its
# lease after them. Both names are the peer's: the figures are taken from the last place
# they could stand before the identity, and the identity to the last quote.
_PLUTO_TRAFFIC = re.compile(_PLUTO_LINE_PREFIX + r'(?:006 )?#(?P<uid>\d+): "[^"\n]+"[^,\n]*'
                            r"(?:, username=(?P<user>[^\n]*))?, type=\w+, add_time=\d+, "
                            r"inBytes=(?P<in>\d+), outBytes=(?P<out>\d+)[^\n]*?"
                            r"(?:, id='(?P<id>[^\n]*)')?(?:, lease=(?P<lease>[0-9a-fA-F.:]+)/\d+)?$", re.MULTILINE)
# `ipsec whack --addresspoolstatus`: "address pool 10.79.0.10-10.79.0.50: 41 addresses, 4 leases,
# 2 in-use, 2 free (0 reusable)"; a free lease is kept for the client that left it.
_PLUTO_POOL = re.compile(_PLUTO_LINE_PREFIX + r"address pool (?P<name>\S+): (?P<size>\d+) addresses, "
                         r"(?P<leases>\d+) leases, (?P<online>\d+) in-use", re.MULTILINE)


def parse_pluto(status: str, traffic: str, pools: str = "") -> DaemonState:
    """Parse `ipsec whack --status`, `--trafficstatus` and `--addresspoolstatus` (libreswan 4.x, 5.x)."""
    if "Connection list:" not in status:
        raise DaemonError("no connection list in the output (is pluto running?)")
    sa_lines = {int(m.group("uid")): m for m in _PLUTO_TRAFFIC.finditer(traffic)}
    versions = {m.group("name"): m.group("version") for m in _PLUTO_POLICY.finditer(status)}
    ike: list[IkeSA] = []
    child: list[ChildSA] = []
    for m in _PLUTO_STATE.finditer(status):
        uid, name, state = int(m.group("uid")), m.group("name"), m.group("state")
        established = "established" in m.group("what")
        if any(word in state for word in _PLUTO_CHILD_WORDS):
            carrier = _PLUTO_CARRIER.search(m.group("rest"))
            line = sa_lines.get(uid)
            child.append(ChildSA(name, uid, "INSTALLED" if established else state,
                                 int(carrier.group(1)) if carrier else -1,
                                 Traffic(int(line.group("in")), int(line.group("out")), None, None) if line
                                 else NO_PACKETS))
        else:
            rekeys = [float(r) for r in _PLUTO_REKEY.findall(m.group("rest"))]
            ike.append(IkeSA(name, uid, "ESTABLISHED" if established else "CONNECTING",
                             next_rekey=min(rekeys, default=None) if established else None,
                             remote_host=m.group("peer") or "", ike_version=versions.get(name, "")))
    ike = _pluto_peers(ike, child, sa_lines)
    routed = set()
    configs: dict[str, TunnelConfig] = {}
    for m in _PLUTO_CONN.finditer(status):
        name = m.group("name")
        if m.group("routing") in _PLUTO_TRAPS:
            routed.add(name)
        if m.group("instance") is None and "..." in m.group("ends"):
            configs[name] = _pluto_config(name, m.group("ends"), versions.get(name, ""))
    version = _PLUTO_VERSION.search(status)
    return DaemonState(ike, child, routed, configs=configs, version=version.group(1) if version else "",
                       backend="pluto", counts_packets=False,
                       pools=[Pool(m.group("name"), int(m.group("size")), int(m.group("online")),
                                   int(m.group("leases")) - int(m.group("online")))
                              for m in _PLUTO_POOL.finditer(pools)])


def _pluto_peers(ike: list[IkeSA], child: list[ChildSA], sa_lines: dict[int, re.Match[str]]) -> list[IkeSA]:
    """Each IKE SA with its peer's identity, XAuth user and leases, which --trafficstatus
    gives on the lines of the IPsec SAs it carries."""
    found: dict[int, dict[str, Any]] = {}
    for c in child:
        line = sa_lines.get(c.uid)
        if line is None:
            continue
        peer = found.setdefault(c.ike_uid, {"leases": {}})
        peer.setdefault("remote_id", line.group("id") or "")
        peer.setdefault("xauth_id", line.group("user") or "")
        if line.group("lease"):
            peer["leases"][line.group("lease")] = None
    return [replace(sa, remote_id=found[sa.uid]["remote_id"], xauth_id=found[sa.uid]["xauth_id"],
                    virtual_ips=tuple(found[sa.uid]["leases"])) if sa.uid in found else sa for sa in ike]


def _pluto_config(name: str, ends: str, ike_version: str) -> TunnelConfig:
    """A conn's "LOCAL_TS===LOCAL[id]...REMOTE[id]===REMOTE_TS" (host-to-host: no selectors)."""
    local_side, _, remote_side = ends.partition("...")
    local_ts, _, local = local_side.rpartition("===")
    remote, _, remote_ts = remote_side.partition("===")
    # Drop ids [..], source addresses <..>, options {..} and next hops (---).
    local = re.split(r"[\[<{]", local.split("---")[0])[0]
    remote = re.split(r"[\[<{]", remote.split("---")[-1])[0]
    return TunnelConfig(name, local, remote, local_ts or local, remote_ts or remote, ike_version)


class CommandTimeout(DaemonError):
    """A command the daemon is asked through did not finish in time (and was killed)."""


@dataclass(frozen=True)
class RunningCommand:
    """A command started by start_command, its output read by finish before its deadline."""

    command: list[str]
    process: subprocess.Popen[str]
    deadline: float  # time.monotonic()
    timeout: float  # the --timeout the deadline comes from, for the message

    def finish(self) -> tuple[str, str, int]:
        """stdout, stderr and exit status; the whole process group killed at the deadline."""
        with self.process as proc:
            try:
                stdout, stderr = proc.communicate(timeout=max(0.001, self.deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.stop()
                raise CommandTimeout(f"`{' '.join(self.command)}` did not answer within {self.timeout:g}s") from None
        return stdout, stderr, proc.returncode

    def stop(self) -> None:
        """Kill the command and everything it started, and reap it."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:  # it had finished, and its children with it
            pass
        self.process.communicate()


def start_command(command: list[str], deadline: float, timeout: float) -> RunningCommand:
    """command running in its own process group, its output piped: `ipsec` runs the real program
    as a child, and a timeout must end both, or the pipe stays open until a hung daemon wakes."""
    try:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, errors="replace", start_new_session=True)
    except FileNotFoundError:
        raise DaemonError(f"command not found: {command[0]}") from None
    except PermissionError:
        raise DaemonError(f"command not executable: {command[0]}") from None
    except OSError as e:
        raise DaemonError(f"cannot run {command[0]}: {e.strerror}") from None
    return RunningCommand(command, proc, deadline, timeout)


def run_command(command: list[str], timeout: float) -> tuple[str, str, int]:
    """stdout, stderr and exit status of a command, its whole process group killed on timeout."""
    return start_command(command, time.monotonic() + timeout, timeout).finish()


# `ipsec whack --listcerts --listcacerts --listcrls`: what pluto's NSS database holds, times
# in UTC ("Tue Dec 01 04:03:24 2026"). A certificate opens with "[Root ]CA certificate" or
# "End certificate", its nickname and serial ("0x8a01"); a CRL with "issuer:".
_PLUTO_TIME = r"([A-Z][a-z]{2} [A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d \d{4})"
_PLUTO_CERT = re.compile(
    _PLUTO_LINE_PREFIX + r"(?P<kind>Root CA|CA|End) certificate \"[^\n]*\" - SN: 0x(?P<serial>[0-9a-fA-F]+)\n"
    r"(?:000 )?  subject: (?P<subject>[^\n]*)\n(?:000 )?  issuer: (?P<issuer>[^\n]*)\n"
    r"(?:000 )?  not before: " + _PLUTO_TIME + r"\n(?:000 )?  not after: " + _PLUTO_TIME + "$", re.MULTILINE)
_PLUTO_CRL = re.compile(_PLUTO_LINE_PREFIX + r"issuer: (?P<issuer>[^\n]*)\n(?:000 )?revoked certs: \d+\n"
                        r"(?:000 )?updates: this [^\n]*\n(?:000 )? +next " + _PLUTO_TIME + "$", re.MULTILINE)
_PLUTO_CERT_TYPES = {"Root CA": "ca", "CA": "intermediate", "End": "end-entity"}
_PLUTO_CERT_HEADER = re.compile(_PLUTO_LINE_PREFIX + r"(?:Root CA|CA|End) certificate \"", re.MULTILINE)


def _pluto_time(text: str) -> float:
    return float(calendar.timegm(time.strptime(text, "%a %b %d %H:%M:%S %Y")))


def _pluto_serial(digits: str) -> str:
    """NSS's serial (DER content, "0x008a01") as strongSwan prints one: "8a:01"."""
    raw = bytes.fromhex(digits if len(digits) % 2 == 0 else "0" + digits)
    if len(raw) > 1 and raw[0] == 0 and raw[1] & 0x80:  # the sign byte of a serial with its high bit set
        raw = raw[1:]
    return ":".join(f"{byte:02x}" for byte in raw)


def parse_pluto_certificates(text: str) -> tuple[list[Certificate], list[Crl]]:
    """The certificates and CRLs in `ipsec whack --listcerts --listcacerts --listcrls`; a
    certificate whose lines are not as expected is left out with a warning."""
    certificates = [Certificate(m["subject"], m["issuer"], _pluto_serial(m["serial"]),
                                _PLUTO_CERT_TYPES[m["kind"]], _pluto_time(m.group(5)), _pluto_time(m.group(6)))
                    for m in _PLUTO_CERT.finditer(text)]
    listed = len(_PLUTO_CERT_HEADER.findall(text))
    if listed > len(certificates):
        warn(f"{listed - len(certificates)} of the {listed} certificates `ipsec whack --listcerts` listed lack a "
             "subject, issuer or validity where expected and are left out")
    crls = [Crl(m["issuer"], _pluto_time(m.group(2))) for m in _PLUTO_CRL.finditer(text)]
    return certificates, crls


@dataclass(frozen=True)
class PlutoDaemon:
    """libreswan's pluto through `ipsec whack`: --status (conns, states), --trafficstatus
    (exact bytes, peers' names and leases), --addresspoolstatus, then what its NSS database
    holds, all within one timeout."""

    ipsec: str = "ipsec"
    timeout: float = 10.0

    def ask(self) -> Callable[[], DaemonState]:
        return self.read

    def read(self) -> DaemonState:
        deadline = time.monotonic() + self.timeout
        answers = []
        for option in ("--status", "--trafficstatus", "--addresspoolstatus"):
            command = [self.ipsec, "whack", option]
            try:
                stdout, stderr, code = start_command(command, deadline, self.timeout).finish()
            except CommandTimeout:
                raise CommandTimeout(f"`{' '.join(command)}` did not answer within {self.timeout:g}s "
                                     "(the three whack queries together)") from None
            if code != 0:
                said = (stderr.strip().splitlines() or stdout.strip().splitlines() or ["no output"])[-1]
                raise DaemonError(f"`{' '.join(command)}` failed (exit {code}): {said}")
            answers.append(stdout)
        return with_listed_certificates(parse_pluto(*answers),
                                        [self.ipsec, "whack", "--listcerts", "--listcacerts", "--listcrls"],
                                        parse_pluto_certificates, deadline, self.timeout)


# ---------------------------------------------------------------- query daemon: auto


def socket_answers(path: str) -> bool:
    """Whether something accepts a connection on the Unix socket at path."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(path)
        except OSError:
            return False
    return True


@dataclass(frozen=True)
class AutoDaemon:
    """--backend auto: VICI when its socket answers; else pluto when its control socket
    answers and charon's stroke socket is absent; else stroke when `ipsec` exists.

    libreswan also installs an `ipsec` command, so pluto is found by its socket, before
    stroke is tried; charon's stroke socket rules it out for a host running both.
    """

    vici: ViciDaemon
    stroke: StrokeDaemon
    pluto: PlutoDaemon
    pluto_socket: str = DEFAULT_PLUTO_SOCKET
    stroke_socket: str = DEFAULT_STROKE_SOCKET

    def ask(self) -> Callable[[], DaemonState]:
        try:
            read_vici = self.vici.ask()
        except ViciUnreachable as e:
            if self.asks_pluto():
                return self.pluto.ask()
            if not self._has_stroke():
                raise DaemonError(f"no IKE daemon to ask: {e}, and no `{self.stroke.ipsec}` command "
                                  "for stroke") from None
            return self.stroke.ask()

        def read() -> DaemonState:
            try:
                return read_vici()
            except ViciIncomplete as e:
                if not self._has_stroke():
                    raise
                warn(f"{e}; asked through stroke instead")
            return self.stroke.ask()()

        return read

    def _has_stroke(self) -> bool:
        return shutil.which(self.stroke.ipsec) is not None

    def asks_pluto(self) -> bool:
        return not os.path.exists(self.stroke_socket) and socket_answers(self.pluto_socket)


def choose_daemon(backend: str, ipsec: str, vici_socket: str, timeout: float) -> Daemon:
    stroke = StrokeDaemon(ipsec, timeout)
    vici = ViciDaemon(vici_socket, timeout, StrokePools(ipsec))
    pluto = PlutoDaemon(ipsec, timeout)
    if backend == "stroke":
        return stroke
    if backend == "vici":
        return vici
    if backend == "pluto":
        return pluto
    return AutoDaemon(vici, stroke, pluto)


# ---------------------------------------------------------------- classify


@dataclass(frozen=True)
class TunnelDetail:
    traffic: Traffic
    installed_child_sas: int
    ike: IkeSA | None  # its newest ESTABLISHED IKE SA, if any
    config: TunnelConfig | None = None  # what the daemon has loaded for it
    clients: int = 0  # ESTABLISHED IKE SAs carrying it
    remote_access: bool = False  # its configured remote admits many peers (serves_many)
    sessions: tuple[ClientSession, ...] = ()  # a remote-access tunnel's clients, one per IKE SA


@dataclass(frozen=True)
class ClientSession:
    """One ESTABLISHED (so authenticated) IKE SA of a remote-access tunnel: a connected client."""

    name: str  # the authenticated name: EAP identity, else XAuth user, else IKE identity
    remote_host: str
    virtual_ips: tuple[str, ...]
    ike_version: str
    age: float | None  # seconds since its IKE SA was established
    traffic: Traffic  # its own CHILD SAs of the tunnel only


@dataclass(frozen=True)
class TunnelStatus:
    name: str
    status: int
    routed: bool = False  # a trap policy (auto=route) is installed
    # The rest only when the daemon answered and the tunnel is not ignored.
    detail: TunnelDetail | None = None


_ANY_PEER = {"", "%any", "%any4", "%any6"}  # "": swanctl.conf's remote_addrs left unset


def serves_many(remote: str) -> bool:
    """Whether a tunnel's configured remote (TunnelConfig.remote) admits more than one peer:
    %any, a subnet, a range or several addresses. Such a tunnel is a remote-access one,
    idle when nobody is connected rather than down."""
    peers = remote.split(",")
    if len(peers) > 1:
        return True
    peer = peers[0].strip()
    return peer in _ANY_PEER or "/" in peer or _is_address_range(peer)


def _is_address_range(peer: str) -> bool:
    """"10.0.0.1-10.0.0.9"; a host name may hold a "-" too."""
    first, dash, last = peer.partition("-")
    if not dash:
        return False
    try:
        ipaddress.ip_address(first)
        ipaddress.ip_address(last)
    except ValueError:
        return False
    return True


def all_tunnels(configured: Sequence[Tunnel], loaded: Sequence[Tunnel]) -> list[Tunnel]:
    """ipsec.conf's tunnels, then those the daemon has loaded from elsewhere (swanctl.conf)."""
    known = {t.name for t in configured}
    tunnels = list(configured)
    for tunnel in loaded:
        if tunnel.name not in known:  # a CHILD name used by two swanctl connections: one tunnel
            known.add(tunnel.name)
            tunnels.append(tunnel)
    return tunnels


def classify(tunnels: Sequence[Tunnel], state: DaemonState) -> list[TunnelStatus]:
    """Each tunnel's ipsec_status and figures from one snapshot of the daemon; names match exactly."""
    children: dict[str, list[ChildSA]] = {}
    for c in state.child_sas:
        children.setdefault(c.name, []).append(c)
    ike_by_name: dict[str, list[IkeSA]] = {}
    ike_by_uid = {sa.uid: sa for sa in state.ike_sas}
    for sa in state.ike_sas:
        ike_by_name.setdefault(sa.name, []).append(sa)

    results = []
    for tunnel in tunnels:
        routed = tunnel.name in state.routed
        if tunnel.ignored:
            results.append(TunnelStatus(tunnel.name, STATUS_IGNORED, routed))
            continue
        own_children = children.get(tunnel.name, [])
        named_ike = ike_by_name.get(tunnel.ike or tunnel.name, [])
        installed = [c for c in own_children if c.state == "INSTALLED"]
        if installed:
            status = STATUS_UP
        elif not own_children and any(sa.state == "ESTABLISHED" for sa in named_ike):
            status = STATUS_IKE_ONLY
        elif not own_children and not named_ike:
            status = STATUS_DOWN
        else:
            status = STATUS_UNKNOWN
        # Its IKE SA is the one carrying its CHILD SAs; before it has any, the one of its name.
        carriers = [ike_by_uid[c.ike_uid] for c in installed if c.ike_uid in ike_by_uid] or named_ike
        established = [sa for sa in carriers if sa.state == "ESTABLISHED"]
        newest = min(established, key=lambda sa: sa.age if sa.age is not None else 0.0, default=None)
        traffic = sum((c.traffic for c in own_children), Traffic() if state.counts_packets else NO_PACKETS)
        carrying = {c.ike_uid for c in own_children} | {sa.uid for sa in named_ike}
        clients = [ike_by_uid[uid] for uid in carrying if uid in ike_by_uid and ike_by_uid[uid].state == "ESTABLISHED"]
        config = state.configs.get(tunnel.name)
        remote_access = config is not None and serves_many(config.remote)
        sessions = client_sessions(clients, own_children, state.counts_packets) if remote_access else ()
        detail = TunnelDetail(traffic, len(installed), newest, config, len(clients), remote_access, sessions)
        results.append(TunnelStatus(tunnel.name, status, routed, detail))
    return results


def client_sessions(clients: Sequence[IkeSA], children: Sequence[ChildSA],
                    counts_packets: bool) -> tuple[ClientSession, ...]:
    """A remote-access tunnel's clients, each with the traffic of its own CHILD SAs of it."""
    traffic: dict[int, Traffic] = {}
    for c in children:
        traffic[c.ike_uid] = traffic.get(c.ike_uid, Traffic() if counts_packets else NO_PACKETS) + c.traffic
    return tuple(
        ClientSession(sa.eap_id or sa.xauth_id or sa.remote_id, sa.remote_host, sa.virtual_ips, sa.ike_version,
                      sa.age, traffic.get(sa.uid, Traffic() if counts_packets else NO_PACKETS))
        for sa in clients)


def unknown_statuses(tunnels: Sequence[Tunnel]) -> list[TunnelStatus]:
    """What a run that could not ask the daemon knows: nothing is known to be up."""
    return [TunnelStatus(t.name, STATUS_IGNORED if t.ignored else STATUS_UNKNOWN) for t in tunnels]


# ---------------------------------------------------------------- classify: clients


@dataclass(frozen=True)
class Client:
    """One client name under one remote-access tunnel: its sessions, reported together."""

    tunnel: str
    name: str  # as written (client_label)
    sessions: list[ClientSession]


@dataclass(frozen=True)
class ClientReport:
    clients: list[Client]  # by tunnel, then name
    left_out: int = 0  # client names past --max-clients


CLIENT_NAME_MAX = 128  # characters of a client name written; a longer one is cut and hashed
_CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f]")


def client_label(name: str) -> str:
    """A name from the network as a label value: control characters as "?", at most
    CLIENT_NAME_MAX characters; a longer name is cut and ends in a hash of all of it, so
    that two long names stay two clients. Quotes and backslashes are the exposition's to escape."""
    # Lone surrogates (undecodable bytes kept by a decoder) cannot be written as UTF-8.
    printable = _CONTROL_CHARACTERS.sub("?", name.encode("utf-8", "replace").decode("utf-8"))
    if len(printable) <= CLIENT_NAME_MAX:
        return printable
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{printable[: CLIENT_NAME_MAX - 11]}...{digest}"


def select_clients(statuses: Sequence[TunnelStatus], max_clients: int) -> ClientReport:
    """The remote-access tunnels' clients by name, the first max_clients of them in
    (tunnel, name) order: the same ones every run, whoever connects last."""
    sessions: dict[tuple[str, str], list[ClientSession]] = {}
    for tunnel in statuses:
        for session in tunnel.detail.sessions if tunnel.detail else ():
            sessions.setdefault((tunnel.name, client_label(session.name)), []).append(session)
    names = sorted(sessions)
    kept = names[: max(0, max_clients)]
    return ClientReport([Client(tunnel, name, sessions[tunnel, name]) for tunnel, name in kept],
                        len(names) - len(kept))


# ---------------------------------------------------------------- build metrics


TRAFFIC_COUNTERS = [  # (family, what it counts, Traffic field)
    ("ipsec_in_bytes", "Bytes received", "bytes_in"),
    ("ipsec_out_bytes", "Bytes sent", "bytes_out"),
    ("ipsec_in_packets", "Packets received", "packets_in"),
    ("ipsec_out_packets", "Packets sent", "packets_out"),
]
IKE_SA_STATES = ("CREATED", "CONNECTING", "ESTABLISHED", "PASSIVE", "REKEYING", "REKEYED", "DELETING",
                 "DESTROYING")


@dataclass(frozen=True)
class RunResult:
    statuses: list[TunnelStatus]
    daemon: DaemonState | None  # None when the daemon could not be asked
    finished: float  # unix time
    duration: float  # seconds
    clients: ClientReport = field(default_factory=lambda: ClientReport([]))

    @property
    def success(self) -> bool:
        return self.daemon is not None


def metric_families(result: RunResult) -> list[Metric]:
    """Every series of one run, per-tunnel ones in config order.

    Only ipsec_status is written for a tunnel the daemon was not asked about, or
    that is ignored: no figure is carried over from an earlier run.
    """
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

    status = GaugeMetricFamily("ipsec_status",
                               "IPsec tunnel state: 0 up (a CHILD SA installed), 1 IKE SA only, 2 down, "
                               "3 unknown (other state, or the daemon could not be asked), 4 ignored.",
                               labels=TUNNEL)
    routed = GaugeMetricFamily("ipsec_tunnel_routed",
                               "1 when the tunnel's trap policy is installed (auto=route, on demand).",
                               labels=TUNNEL)
    child_sas = GaugeMetricFamily("ipsec_installed_child_sas",
                                  "CHILD SAs of the tunnel in state INSTALLED (2 while one is rekeyed).",
                                  labels=TUNNEL)
    ike_up = GaugeMetricFamily("ipsec_ike_established",
                               "1 when the IKE SA that carries the tunnel is ESTABLISHED.", labels=TUNNEL)
    ike_age = GaugeMetricFamily("ipsec_ike_age_seconds",
                                "Seconds since the tunnel's IKE SA was established (stroke: minutes past "
                                "2 minutes, hours past 2 hours).", labels=TUNNEL)
    ike_rekey = GaugeMetricFamily("ipsec_ike_next_rekey_seconds",
                                  "Seconds until the tunnel's IKE SA is rekeyed or reauthenticated, "
                                  "whichever comes first.", labels=TUNNEL)
    remote_access = GaugeMetricFamily("ipsec_tunnel_remote_access",
                                      "1 when the tunnel's configured remote admits many peers (%any, a "
                                      "subnet, a range, several addresses): a remote-access tunnel, idle "
                                      "rather than down without clients; 0 for one fixed peer.", labels=TUNNEL)
    clients = GaugeMetricFamily("ipsec_tunnel_clients",
                                "ESTABLISHED IKE SAs carrying the tunnel: 0 or 1 for a site-to-site tunnel, "
                                "one per connected client of a remote-access one.", labels=TUNNEL)
    info = InfoMetricFamily("ipsec_tunnel", "Where the tunnel goes and what it carries, as the daemon has it "
                                            "loaded: IKE config, addresses, traffic selectors, IKE version.",
                            labels=TUNNEL)
    counters = [
        (CounterMetricFamily(name, f"{what} through the tunnel, summed over its CHILD SAs; "
                                   "restarts from 0 when a CHILD SA is rekeyed.", labels=TUNNEL), field_name)
        for name, what, field_name in TRAFFIC_COUNTERS
    ]
    for tunnel in result.statuses:
        label = [tunnel.name]
        status.add_metric(label, tunnel.status)
        detail = tunnel.detail
        if detail is None:
            continue
        routed.add_metric(label, int(tunnel.routed))
        child_sas.add_metric(label, detail.installed_child_sas)
        clients.add_metric(label, detail.clients)
        ike_up.add_metric(label, int(detail.ike is not None))
        if detail.ike is not None and detail.ike.age is not None:
            ike_age.add_metric(label, detail.ike.age)
        if detail.ike is not None and detail.ike.next_rekey is not None:
            ike_rekey.add_metric(label, detail.ike.next_rekey)
        for counter, field_name in counters:
            figure = getattr(detail.traffic, field_name)
            if figure is not None:  # a figure the daemon does not give is left out, not 0
                counter.add_metric(label, figure)
        config = detail.config
        if config is not None:
            info.add_metric(label, {"ike": config.ike, "local": config.local, "remote": config.remote,
                                    "local_ts": config.local_ts, "remote_ts": config.remote_ts,
                                    "ike_version": config.ike_version})
            remote_access.add_metric(label, int(detail.remote_access))
    families = [status, info, remote_access, clients, routed, child_sas, ike_up, ike_age, ike_rekey,
                *(c for c, _ in counters)]

    daemon = result.daemon
    if daemon is not None:
        info = InfoMetricFamily("ipsec_daemon", "The IKE daemon's version, and how this collector asks it.",
                                value={"version": daemon.version, "backend": daemon.backend})
        families.append(info)
        if daemon.uptime is not None:
            families.append(GaugeMetricFamily("ipsec_daemon_uptime_seconds",
                                              "Seconds since the IKE daemon started.", value=daemon.uptime))
        by_state = GaugeMetricFamily("ipsec_ike_sas", "IKE SAs the daemon holds, by state.", labels=["state"])
        for state in IKE_SA_STATES:
            by_state.add_metric([state], sum(sa.state == state for sa in daemon.ike_sas))
        families.append(by_state)
        families += client_families(result.clients)
        families += pool_families(daemon.pools)
        families.extend(certificate_families(daemon))
    return [
        *families,
        GaugeMetricFamily("ipsec_textfile_success", "1 when this collector's last run succeeded, else 0.",
                          value=int(result.success)),
        GaugeMetricFamily("ipsec_textfile_last_run_timestamp_seconds",
                          "When this collector's last run finished, in seconds since the epoch.",
                          value=result.finished),
        GaugeMetricFamily("ipsec_textfile_duration_seconds", "How long this collector's last run took.",
                          value=result.duration),
    ]


CLIENT = ["tunnel", "client"]  # the labels of every per-client series


def client_families(report: ClientReport) -> list[Metric]:
    """The per-client series of remote-access tunnels, and how many clients were left out."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

    info = InfoMetricFamily("ipsec_client", "A connected client of a remote-access tunnel, one series per "
                                            "session (sessions alike in every label share one): where from, "
                                            "its virtual IPs (comma-separated), its IKE version. client is its "
                                            "EAP identity, else its XAuth user, else its IKE identity.",
                            labels=CLIENT)
    sessions = GaugeMetricFamily("ipsec_client_sessions", "ESTABLISHED IKE SAs of the client under the tunnel.",
                                 labels=CLIENT)
    connected = GaugeMetricFamily("ipsec_client_connected_seconds",
                                  "Seconds since the client's IKE SA was established (its oldest session's).",
                                  labels=CLIENT)
    counters = [
        (CounterMetricFamily(name.replace("ipsec_", "ipsec_client_", 1),
                             f"{what} through the client's own CHILD SAs of the tunnel, its sessions summed; "
                             "restarts from 0 when a CHILD SA is rekeyed or a session ends.", labels=CLIENT),
         field_name)
        for name, what, field_name in TRAFFIC_COUNTERS
    ]
    for client in report.clients:
        label = [client.tunnel, client.name]
        written = set()
        for session in client.sessions:
            extra = (client_label(session.remote_host), client_label(",".join(session.virtual_ips)),
                     session.ike_version)
            if extra not in written:
                written.add(extra)
                info.add_metric(label, dict(zip(("remote_host", "virtual_ip", "ike_version"), extra)))
        sessions.add_metric(label, len(client.sessions))
        ages = [s.age for s in client.sessions if s.age is not None]
        if ages:
            connected.add_metric(label, max(ages))
        traffic = sum((s.traffic for s in client.sessions[1:]), client.sessions[0].traffic)
        for counter, field_name in counters:
            figure = getattr(traffic, field_name)
            if figure is not None:
                counter.add_metric(label, figure)
    left_out = GaugeMetricFamily("ipsec_clients_left_out",
                                 "Clients of remote-access tunnels without per-client series: past --max-clients.",
                                 value=report.left_out)
    return [info, sessions, connected, *(c for c, _ in counters), left_out]


def pool_families(pools: Sequence[Pool]) -> list[Metric]:
    from prometheus_client.core import GaugeMetricFamily

    size = GaugeMetricFamily("ipsec_pool_addresses", "Addresses of the virtual IP pool.", labels=["pool"])
    leases = GaugeMetricFamily("ipsec_pool_leases", "Leases of the virtual IP pool: online (its client is "
                                                    "connected) or offline (kept for a client that left).",
                               labels=["pool", "state"])
    for pool in pools:
        size.add_metric([pool.name], pool.size)
        leases.add_metric([pool.name, "online"], pool.online)
        leases.add_metric([pool.name, "offline"], pool.offline)
    return [size, leases]


CERTIFICATE_LABELS = ["subject", "issuer", "serial", "type"]


def certificate_families(daemon: DaemonState) -> list[Metric]:
    """The validity of every certificate the daemon has loaded, and when each CRL it holds
    is due for renewal; one series per certificate (a certificate listed twice counts once)
    and per CRL issuer (the latest next update, the CRL charon uses)."""
    from prometheus_client.core import GaugeMetricFamily

    not_before = GaugeMetricFamily(
        "ipsec_certificate_not_before_timestamp_seconds",
        "When the certificate becomes valid (notBefore), in seconds since the epoch.", labels=CERTIFICATE_LABELS)
    not_after = GaugeMetricFamily(
        "ipsec_certificate_not_after_timestamp_seconds",
        "When the certificate expires (notAfter), in seconds since the epoch: every X.509 certificate the "
        "daemon has loaded; type end-entity, ca (self-signed CA), intermediate (CA issued by another CA), "
        "ocsp-signer or attribute-authority.", labels=CERTIFICATE_LABELS)
    seen = set()
    for cert in daemon.certificates:
        labels = [cert.subject, cert.issuer, cert.serial, cert.type]
        if tuple(labels) not in seen:
            seen.add(tuple(labels))
            not_before.add_metric(labels, cert.not_before)
            not_after.add_metric(labels, cert.not_after)
    next_update: dict[str, float] = {}
    for crl in daemon.crls:
        next_update[crl.issuer] = max(crl.next_update, next_update.get(crl.issuer, crl.next_update))
    crls = GaugeMetricFamily(
        "ipsec_crl_next_update_timestamp_seconds",
        "When the issuer's CRL that the daemon holds is due to be replaced (nextUpdate), in seconds since the "
        "epoch; past it, certificates of that issuer may fail to verify.", labels=["issuer"])
    for issuer, moment in next_update.items():
        crls.add_metric([issuer], moment)
    return [not_before, not_after, crls]


@dataclass(frozen=True, eq=False)  # registries hash their collectors
class _RunCollector:
    result: RunResult

    def collect(self) -> Iterator[Metric]:
        yield from metric_families(self.result)


def build_registry(result: RunResult) -> CollectorRegistry:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    # prometheus_client types its collectors as a Protocol from 0.20 on, as an ABC before.
    registry.register(cast("Collector", _RunCollector(result)))
    return registry


# ---------------------------------------------------------------- write file


class OutputError(Exception):
    """The output file could not be written, or its directory is not safe to write in; the
    file is left as it was."""


def open_output_directory(directory: str) -> int:
    """The textfile directory, opened once and checked; every later file operation goes
    through this descriptor.

    The job runs as root in a directory whose parent often belongs to node_exporter's
    user (Debian: /var/lib/prometheus), who can rename the directory away and put one
    of their own, with links in it, in its place. So the directory must not be a link,
    must be owned by root (or by whoever runs the collector) and writable by nobody else.
    """
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise OutputError(f"directory {directory} does not exist") from None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise OutputError(f"refusing to write into {directory}: it is a symbolic link or not a "
                              "directory; point --output at the real textfile directory") from None
        raise OutputError(f"cannot open directory {directory}: {e.strerror or e}") from None
    info = os.fstat(fd)
    problems = []
    if info.st_uid not in (0, os.geteuid()):
        problems.append(f"owned by uid {info.st_uid}")
    if info.st_mode & 0o022:
        problems.append(f"writable by group or others (mode {stat.S_IMODE(info.st_mode):04o})")
    if not os.path.isdir(f"/proc/self/fd/{fd}"):
        problems.append("not reachable through /proc/self/fd (is /proc mounted?)")
    if problems:
        os.close(fd)
        raise OutputError(
            f"refusing to write into {directory}: it is {' and '.join(problems)}, so another user could "
            f"redirect what this job writes; fix with: chown root:root {directory} && chmod 0755 {directory}")
    return fd


class LockTimeout(Exception):
    """Another run held the lock for the whole wait."""


@contextmanager
def exclusive_lock(dir_fd: int, name: str, timeout: float) -> Iterator[None]:
    """flock() on NAME in the held directory, so that overlapping runs take turns.

    Opened relative to the descriptor and never through a link: filelock resolves the
    lock's directory by name on every attempt (4.x) or follows a linked lock file with
    O_TRUNC (3.x), either of which a swapped directory could redirect.
    """
    fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockTimeout() from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # and with it the lock


def write_output(registry: CollectorRegistry, path: str, lock_timeout: float) -> None:
    """Replace path atomically, under path.lock; '-' prints to stdout."""
    from prometheus_client import generate_latest, write_to_textfile

    if path == "-":
        sys.stdout.write(generate_latest(registry).decode("utf-8"))
        return
    directory, name = os.path.split(path)
    if not name:
        raise OutputError(f"--output {path} names a directory, not a file")
    dir_fd = open_output_directory(directory or ".")
    try:
        with exclusive_lock(dir_fd, name + ".lock", lock_timeout):
            _remove_stale_temp_files(dir_fd, name)
            # node_exporter runs as its own user: the file must be world-readable
            # whatever umask cron or systemd gave this run.
            old_umask = os.umask(0o022)
            try:
                # Through the held directory: one swapped in after the check is never written to.
                write_to_textfile(f"/proc/self/fd/{dir_fd}/{name}", registry)
            finally:
                os.umask(old_umask)
                _remove_stale_temp_files(dir_fd, name)
    except LockTimeout:
        raise OutputError(f"another run holds the lock {path}.lock (waited {lock_timeout:g}s)") from None
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        os.close(dir_fd)


def _remove_stale_temp_files(dir_fd: int, name: str) -> None:
    """write_to_textfile's temporary files (NAME.PID.TID) left by a killed run.

    Only called under the lock, when no other run can be writing one.
    """
    own = re.compile(re.escape(name) + r"\.\d+\.\d+")
    for leftover in os.listdir(dir_fd):
        if own.fullmatch(leftover):
            try:
                os.unlink(leftover, dir_fd=dir_fd)
            except FileNotFoundError:
                pass


# ---------------------------------------------------------------- main


def warn(message: str) -> None:
    print(f"ipsec-textfile: warning: {message}", file=sys.stderr)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ipsec-textfile",
        description=(
            "Write the state and traffic of every IPsec tunnel of a strongSwan or libreswan gateway "
            "(ipsec.conf conns, and with VICI swanctl.conf children) to a .prom file for "
            "node_exporter's textfile collector. Asks the IKE daemon once per run."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"""\
ipsec_status values:
  0 up        a CHILD SA (IPsec SA) of the tunnel is INSTALLED (established)
  1 IKE only  its IKE SA is ESTABLISHED, no CHILD SA
  2 down      the daemon has no SA of it (a trap policy alone, auto=route or
              libreswan's auto=ondemand, is 2 too; see ipsec_tunnel_routed)
  3 unknown   any other state, or the daemon could not be asked
  4 ignored   auto=ignore (the default), or a shunt (type=pass/drop/reject)

Traffic counters (ipsec_in_bytes_total, ...) sum the tunnel's CHILD SAs and
restart from 0 when one is rekeyed: use rate() or increase() on them. pluto
gives no packet counts: with it the packet series are left out.

exit status:
  {EXIT_OK}  the file was written with fresh data
  {EXIT_RUN_FAILED}  config or daemon could not be read; the file was written and says
     so (ipsec_textfile_success 0, no tunnel up)
  {EXIT_NOT_WRITTEN}  the file could not be written (lock held, directory not writable)
  2  bad command line

example cron line (/etc/cron.d/ipsec-textfile):
  * * * * * root ipsec-textfile --output {DEFAULT_OUTPUT} 2>&1 | logger -t ipsec-textfile
""",
    )
    parser.add_argument("--config", metavar="PATH",
                        help=f"ipsec.conf to read (default: {DEFAULT_CONFIG}; with VICI it may be missing, "
                             "the daemon then names the tunnels it loaded from swanctl.conf)")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, metavar="PATH",
                        help="the .prom file to replace, or - for stdout (default: %(default)s)")
    parser.add_argument("--backend", choices=("auto", "stroke", "vici", "pluto"), default="auto",
                        help="how to ask the IKE daemon: stroke runs `ipsec statusall` and `ipsec listall "
                             "--utc` (strongSwan's charon); vici talks to charon's VICI socket, as swanctl does; "
                             "pluto runs `ipsec whack --status`, `--trafficstatus`, `--addresspoolstatus` and "
                             "`--listcerts --listcacerts --listcrls` (libreswan); auto uses VICI "
                             f"when its socket accepts a connection, else pluto when {DEFAULT_PLUTO_SOCKET} "
                             "does and charon's stroke socket is absent, else stroke (default: %(default)s)")
    parser.add_argument("--ipsec", default="ipsec", metavar="PATH",
                        help="the ipsec command to run (default: %(default)s)")
    parser.add_argument("--vici-socket", default=DEFAULT_VICI_SOCKET, metavar="PATH",
                        help="charon's VICI socket (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                        help="how long the daemon may take to answer (default: %(default)s); the certificates "
                             "are asked last: when they are not listed in time, the tunnels are written and a "
                             "warning says so")
    parser.add_argument("--lock-timeout", type=float, default=10.0, metavar="SECONDS",
                        help="how long to wait for an overlapping run's lock (default: %(default)s)")
    parser.add_argument("--max-clients", type=int, default=DEFAULT_MAX_CLIENTS, metavar="N",
                        help="per-client series (ipsec_client_*) for at most N client names of remote-access "
                             "tunnels, the first in tunnel and name order; the rest are counted in "
                             "ipsec_clients_left_out; 0 writes none (default: %(default)s)")
    parser.add_argument("--status-file", metavar="PATH",
                        help="read a saved daemon answer instead of asking the daemon (replaces "
                             "--backend): `ipsec statusall` output, or for libreswan `ipsec whack "
                             "--status` followed by `ipsec whack --trafficstatus` (and `--addresspoolstatus`) in one file")
    return parser.parse_args(argv)


def configured_tunnels(path: str | None, pluto_version: str | None) -> list[Tunnel] | None:
    """ipsec.conf's tunnels, read as starter reads it, or as libreswan of pluto_version does
    (None: strongSwan; "": libreswan, version unknown); None when no --config was given and
    the default is absent, as on a host configured by swanctl.conf alone (only VICI then
    names the tunnels)."""
    if path is None:
        if not os.path.exists(DEFAULT_CONFIG):
            return None
        path = DEFAULT_CONFIG
    return read_config(path) if pluto_version is None else read_libreswan_config(path, version=pluto_version)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    daemon = (StatusFile(args.status_file) if args.status_file
              else choose_daemon(args.backend, args.ipsec, args.vici_socket, args.timeout))

    # The daemon first: which one answered decides how ipsec.conf is read.
    state: DaemonState | None = None
    error = None
    try:
        read_answer = daemon.ask()
        import prometheus_client  # noqa: F401 (loaded while the daemon works on its answer: see Daemon)
        state = read_answer()
    except DaemonError as e:
        error = str(e)
    if state is not None:
        pluto_version = state.version if state.backend == "pluto" else None
    else:
        pluto_version = "" if isinstance(daemon, PlutoDaemon) else None

    tunnels: list[Tunnel] | None = []
    try:
        tunnels = configured_tunnels(args.config, pluto_version)
        if state is not None and tunnels is None and state.backend != "vici":
            raise ConfigError(f"cannot read {DEFAULT_CONFIG}: No such file or directory "
                              f"({state.backend} knows tunnels only from it)")
    except ConfigError as e:
        error = str(e)  # reported before the daemon's own error, if both failed
        state = None
    statuses = (classify(all_tunnels(tunnels or [], state.loaded), state) if state is not None
                else unknown_statuses(tunnels or []))

    clients = select_clients(statuses, args.max_clients)
    if clients.left_out and args.max_clients > 0:
        warn(f"{clients.left_out} clients of remote-access tunnels left out of the per-client series "
             f"(--max-clients {args.max_clients})")
    result = RunResult(statuses, state, time.time(), time.monotonic() - started, clients)
    try:
        write_output(build_registry(result), args.output, args.lock_timeout)
    except OutputError as e:
        print(f"ipsec-textfile: error: {e}", file=sys.stderr)
        return EXIT_NOT_WRITTEN
    if error is not None:
        print(f"ipsec-textfile: error: {error}", file=sys.stderr)
        return EXIT_RUN_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
