#!/usr/bin/env python3
"""Report the health of strongSwan IPsec tunnels for node_exporter's textfile collector.

One run reads ipsec.conf the way strongSwan's starter does, asks the IKE daemon
once for the state of every SA, classifies each configured tunnel, and writes
one .prom file atomically (temporary file + rename) under a lock.

The pipeline, one plain function a stage:
    read_config -> Daemon.query -> classify -> build_registry -> write_output
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from filelock import FileLock, Timeout
from prometheus_client import CollectorRegistry, generate_latest, write_to_textfile
from prometheus_client.core import GaugeMetricFamily, Metric

DEFAULT_CONFIG = "/etc/ipsec.conf"
DEFAULT_OUTPUT = "/var/lib/prometheus/node-exporter/ipsec.prom"

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
    """A conn section of ipsec.conf, as starter resolves it."""

    name: str
    auto: str | None  # effective auto=; None when unset (strongSwan: ignore)
    shunt: bool  # type=pass/passthrough/drop/reject: a policy that never carries an SA
    loaded: bool  # starter hands it to the daemon

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


# ---------------------------------------------------------------- query daemon


class DaemonError(Exception):
    """The IKE daemon could not be asked, or its answer makes no sense."""


@dataclass(frozen=True)
class SA:
    """One IKE SA (name[uid]) or CHILD SA / trap policy (name{uid}) the daemon lists."""

    name: str
    uid: int
    state: str


@dataclass(frozen=True)
class DaemonState:
    ike_sas: list[SA]
    child_sas: list[SA]  # includes ROUTED trap policies


_STATUS_HEADER = re.compile(r"^Status of IKE charon daemon \(", re.MULTILINE)
_SA_COUNTS = re.compile(r"^Security Associations \((\d+) up, (\d+) connecting\):", re.MULTILINE)
# The line that opens each SA: "   name[3]: ESTABLISHED 5 minutes ago, ..." (IKE SA) or
# "name{7}:  INSTALLED, TUNNEL, ..." (CHILD SA or trap policy), right-aligned names.
# Found by its state word (strongSwan's ike_sa_state and child_sa_state names), then
# the name is the rest of the line before it: no backtracking over long lines.
_SA_STATE = re.compile(
    r"(?:\[(?P<ike>\d+)\]|\{(?P<child>\d+)\}):[ \t]+(?P<state>CREATED|CONNECTING|ESTABLISHED|PASSIVE|"
    r"REKEYING|REKEYED|DELETING|DESTROYING|ROUTED|INSTALLING|INSTALLED|UPDATING|RETRYING|DELETED)\b")


def parse_statusall(text: str) -> DaemonState:
    """Parse `ipsec statusall` (stroke) output into the SAs it lists."""
    if not _STATUS_HEADER.search(text):
        raise DaemonError("no daemon status in the output (is charon running?)")
    counts = _SA_COUNTS.search(text)
    if counts is None:
        raise DaemonError("the output has no 'Security Associations' section: truncated?")
    ike: dict[tuple[str, int], SA] = {}
    child: dict[tuple[str, int], SA] = {}
    for m in _SA_STATE.finditer(text):
        name = text[text.rfind("\n", 0, m.start()) + 1 : m.start()].lstrip(" ")
        ike_uid, child_uid, sa_state = m.group("ike", "child", "state")
        if ike_uid is not None:
            ike.setdefault((name, int(ike_uid)), SA(name, int(ike_uid), sa_state))
        else:
            child.setdefault((name, int(child_uid)), SA(name, int(child_uid), sa_state))
    announced = int(counts.group(1)) + int(counts.group(2))
    if len(ike) < announced:
        # A cut-off answer would make the missing tunnels look down.
        raise DaemonError(f"the daemon announced {announced} IKE SAs but listed {len(ike)}: truncated?")
    return DaemonState(list(ike.values()), list(child.values()))


@dataclass(frozen=True)
class StrokeDaemon:
    """charon through the `ipsec` command (stroke): one `ipsec statusall` per run."""

    ipsec: str = "ipsec"
    timeout: float = 10.0

    def query(self) -> DaemonState:
        command = [self.ipsec, "statusall"]
        shown = " ".join(command)
        try:
            # Its own process group: `ipsec` runs stroke as a child, and a timeout
            # must end both, or the pipe stays open until a hung charon wakes.
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, errors="replace", start_new_session=True)
        except FileNotFoundError:
            raise DaemonError(f"command not found: {self.ipsec}") from None
        except PermissionError:
            raise DaemonError(f"command not executable: {self.ipsec}") from None
        except OSError as e:
            raise DaemonError(f"cannot run {self.ipsec}: {e.strerror}") from None
        with proc:
            try:
                stdout, stderr = proc.communicate(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
                raise DaemonError(f"`{shown}` did not answer within {self.timeout:g}s") from None
        # The wrapper's exit status says whether starter runs, not whether the
        # query worked: the output decides.
        try:
            return parse_statusall(stdout)
        except DaemonError as e:
            said = (stderr.strip().splitlines() or [str(e)])[-1]
            raise DaemonError(f"`{shown}` gave no usable daemon status (exit {proc.returncode}): {said}") from None


@dataclass(frozen=True)
class StatusFile:
    """A saved `ipsec statusall` output, replayed instead of asking the daemon."""

    path: str

    def query(self) -> DaemonState:
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError as e:
            raise DaemonError(f"cannot read status file {self.path}: {e.strerror}") from None
        try:
            return parse_statusall(text)
        except DaemonError as e:
            raise DaemonError(f"{self.path}: {e}") from None


# ---------------------------------------------------------------- classify


@dataclass(frozen=True)
class TunnelStatus:
    name: str
    status: int
    routed: bool  # a trap policy (auto=route) is installed


def classify(tunnels: Sequence[Tunnel], state: DaemonState) -> list[TunnelStatus]:
    """Each tunnel's ipsec_status from one snapshot of the daemon; names match exactly."""
    children: dict[str, list[str]] = {}
    for sa in state.child_sas:
        children.setdefault(sa.name, []).append(sa.state)
    ike: dict[str, list[str]] = {}
    for sa in state.ike_sas:
        ike.setdefault(sa.name, []).append(sa.state)

    results = []
    for tunnel in tunnels:
        child_states = children.get(tunnel.name, [])
        routed = "ROUTED" in child_states
        live_children = [s for s in child_states if s != "ROUTED"]
        ike_states = ike.get(tunnel.name, [])
        if tunnel.ignored:
            status = STATUS_IGNORED
        elif "INSTALLED" in live_children:
            status = STATUS_UP
        elif not live_children and "ESTABLISHED" in ike_states:
            status = STATUS_IKE_ONLY
        elif not live_children and not ike_states:
            status = STATUS_DOWN
        else:
            status = STATUS_UNKNOWN
        results.append(TunnelStatus(tunnel.name, status, routed))
    return results


def unknown_statuses(tunnels: Sequence[Tunnel]) -> list[TunnelStatus]:
    """What a run that could not ask the daemon knows: nothing is known to be up."""
    return [TunnelStatus(t.name, STATUS_IGNORED if t.ignored else STATUS_UNKNOWN, False)
            for t in tunnels]


# ---------------------------------------------------------------- build metrics


@dataclass(frozen=True)
class RunResult:
    statuses: list[TunnelStatus]
    success: bool
    finished: float  # unix time
    duration: float  # seconds


def metric_families(result: RunResult) -> list[Metric]:
    """Every series of one run, per-tunnel ones in config order."""
    status = GaugeMetricFamily(
        "ipsec_status",
        "IPsec tunnel state: 0 up (a CHILD SA installed), 1 IKE SA only, 2 down, "
        "3 unknown (other state, or the daemon could not be asked), 4 ignored.",
        labels=["tunnel"],
    )
    routed = GaugeMetricFamily(
        "ipsec_tunnel_routed",
        "1 when the tunnel's trap policy is installed (auto=route, on demand).",
        labels=["tunnel"],
    )
    for tunnel in result.statuses:
        status.add_metric([tunnel.name], tunnel.status)
        routed.add_metric([tunnel.name], int(tunnel.routed))
    return [
        status,
        routed,
        GaugeMetricFamily("ipsec_textfile_success", "1 when this collector's last run succeeded, else 0.",
                          value=int(result.success)),
        GaugeMetricFamily("ipsec_textfile_last_run_timestamp_seconds",
                          "When this collector's last run finished, in seconds since the epoch.",
                          value=result.finished),
        GaugeMetricFamily("ipsec_textfile_duration_seconds", "How long this collector's last run took.",
                          value=result.duration),
    ]


@dataclass(frozen=True, eq=False)  # registries hash their collectors
class _RunCollector:
    result: RunResult

    def collect(self) -> Iterator[Metric]:
        yield from metric_families(self.result)


def build_registry(result: RunResult) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(_RunCollector(result))
    return registry


# ---------------------------------------------------------------- write file


class OutputError(Exception):
    """The output file could not be written; it is left as it was."""


def write_output(registry: CollectorRegistry, path: str, lock_timeout: float) -> None:
    """Replace path atomically, under path.lock; '-' prints to stdout."""
    if path == "-":
        sys.stdout.write(generate_latest(registry).decode("utf-8"))
        return
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        raise OutputError(f"cannot write {path}: directory {directory} does not exist")
    lock_path = path + ".lock"
    try:
        with FileLock(lock_path, timeout=lock_timeout):
            _remove_stale_temp_files(path)
            # node_exporter runs as its own user: the file must be world-readable
            # whatever umask cron or systemd gave this run.
            old_umask = os.umask(0o022)
            try:
                write_to_textfile(path, registry)
            finally:
                os.umask(old_umask)
                _remove_stale_temp_files(path)
    except Timeout:
        raise OutputError(f"another run holds the lock {lock_path} (waited {lock_timeout:g}s)") from None
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None


def _remove_stale_temp_files(path: str) -> None:
    """write_to_textfile's temporary files (PATH.PID.TID) left by a killed run.

    Only called under the lock, when no other run can be writing one.
    """
    own = re.compile(re.escape(os.path.basename(path)) + r"\.\d+\.\d+")
    for leftover in glob.glob(glob.escape(path) + ".*"):
        if own.fullmatch(os.path.basename(leftover)):
            try:
                os.remove(leftover)
            except FileNotFoundError:
                pass


# ---------------------------------------------------------------- main


def warn(message: str) -> None:
    print(f"ipsec-textfile: warning: {message}", file=sys.stderr)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ipsec-textfile",
        description=(
            "Write the state of every IPsec tunnel in ipsec.conf (strongSwan) to a .prom file "
            "for node_exporter's textfile collector. Asks the IKE daemon once per run."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"""\
ipsec_status values:
  0 up        a CHILD SA of the tunnel is INSTALLED
  1 IKE only  its IKE SA is ESTABLISHED, no CHILD SA
  2 down      the daemon has no SA of it (a ROUTED trap policy alone is 2 too;
              see ipsec_tunnel_routed)
  3 unknown   any other state, or the daemon could not be asked
  4 ignored   auto=ignore (strongSwan's default), or a shunt (type=pass/drop)

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
    parser.add_argument("--config", default=DEFAULT_CONFIG, metavar="PATH",
                        help="ipsec.conf to read (default: %(default)s)")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, metavar="PATH",
                        help="the .prom file to replace, or - for stdout (default: %(default)s)")
    parser.add_argument("--ipsec", default="ipsec", metavar="PATH",
                        help="the ipsec command to run (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                        help="how long the daemon may take to answer (default: %(default)s)")
    parser.add_argument("--lock-timeout", type=float, default=10.0, metavar="SECONDS",
                        help="how long to wait for an overlapping run's lock (default: %(default)s)")
    parser.add_argument("--status-file", metavar="PATH",
                        help="read a saved `ipsec statusall` output instead of asking the daemon")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    daemon = StatusFile(args.status_file) if args.status_file else StrokeDaemon(args.ipsec, args.timeout)

    tunnels: list[Tunnel] = []
    error = None
    try:
        tunnels = read_config(args.config)
        statuses = classify(tunnels, daemon.query())
    except (ConfigError, DaemonError) as e:
        error = str(e)
        statuses = unknown_statuses(tunnels)

    result = RunResult(statuses, error is None, time.time(), time.monotonic() - started)
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
