"""libreswan's own verdict on a config: its readwriteconf and addconn, run from a lab root.

readwriteconf is libreswan's config parser (lib/libipsecconf, the one addconn uses)
printing every conn as it resolved it; `addconn --checkconfig` is the check operators
run. Both run from the Debian roots the libreswan lab builds (libreswan_lab.guest_root),
through that root's dynamic loader and libraries, so nothing is installed on the host
(libreswan conflicts with strongSwan's starter).
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import libreswan_lab

LOADED = {"add", "ondemand", "route", "start", "keep", "up"}  # route, up: 5.x prints the old names
SHUNTS = {"passthrough", "pass", "drop", "reject"}


class OracleFailed(Exception):
    """readwriteconf gave no verdict: an exit status it never uses for one, or a signal."""


class OracleCrashed(OracleFailed):
    """readwriteconf died of a signal (4.10 does on an X- comment in conn %default)."""


def x_key_in_conn_default(text: str) -> bool:
    """Whether a `conn %default` section sets an X- key: what makes 4.10's readwriteconf crash."""
    inside = False
    for line in text.splitlines():
        if line[:1] in (" ", "\t"):
            if inside and line.strip().startswith("X-"):
                return True
        elif line.strip() and not line.startswith("#"):
            inside = line.split() == ["conn", "%default"]
    return False


@dataclass
class Verdict:
    error: bool
    conns: list[str] = field(default_factory=list)  # every conn, in order
    auto: dict[str, str] = field(default_factory=dict)
    shunts: set[str] = field(default_factory=set)
    dropped: set[str] = field(default_factory=set)

    @property
    def loaded(self) -> list[str]:
        return [c for c in self.conns if c not in self.dropped and self.auto.get(c) in LOADED]


def run_tool(suite: str, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    """One of /usr/libexec/ipsec's programs of that suite's libreswan."""
    root = libreswan_lab.guest_root(suite)
    libraries = f"{root}/usr/lib/x86_64-linux-gnu:{root}/lib/x86_64-linux-gnu"
    command = [f"{root}/lib64/ld-linux-x86-64.so.2", "--library-path", libraries,
               f"{root}/usr/libexec/ipsec/{tool}", *args]
    return subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=30, check=False)


def readwriteconf(suite: str, config: Path, rootdir: Path | None = None) -> subprocess.CompletedProcess[str]:
    return run_tool(suite, "readwriteconf", "--config", str(config),
                    *(["--rootdir", str(rootdir)] if rootdir is not None else []))


def addconn_rejects(suite: str, config: Path) -> bool:
    """Whether `addconn --checkconfig` refuses the file (its exit status is 0 either way)."""
    said = run_tool(suite, "addconn", "--checkconfig", "--config", str(config)).stderr
    return "cannot load config" in said or "FATAL" in said or re.search(r"^ERROR:", said, re.MULTILINE) is not None


def verdict(suite: str, config: Path, rootdir: Path | None = None) -> Verdict:
    proc = readwriteconf(suite, config, rootdir)
    if proc.returncode < 0:
        raise OracleCrashed(f"readwriteconf died of signal {-proc.returncode}")
    if proc.returncode not in (0, 1, 3):
        raise OracleFailed(f"readwriteconf exited {proc.returncode}: {proc.stderr.strip()[-300:]}")
    # 4.x: status 3 (syntax), or 1 and nothing printed (a bad value); 5.x: FATAL, status 1
    # or 3. A conn that fails its own checks (4.x: "while loading") leaves the rest.
    if (proc.returncode not in (0, 1) or "FATAL" in proc.stderr
            or (proc.returncode != 0 and not re.search(r"^(conn |config setup)", proc.stdout, re.MULTILINE))):
        return Verdict(error=True)
    result = Verdict(error=False)
    current = None
    for line in proc.stdout.splitlines():
        conn = re.match(r"conn (.*)$", line)
        if conn:
            current = conn.group(1)
            result.conns.append(current)
            result.auto[current] = "ignore"  # a later conn of the same name starts afresh
            result.shunts.discard(current)
            continue
        if current is None:
            continue
        for key, value in re.findall(r"\b(auto|type)=(\S+)", line):
            if key == "auto":
                result.auto[current] = "ondemand" if value == "route" else "start" if value == "up" else value
            elif value in SHUNTS:
                result.shunts.add(current)
            else:
                result.shunts.discard(current)
    result.dropped = set(re.findall(r"while loading '(.*?)':", proc.stderr))
    # Two conns of one name: pluto keeps the later (the collector reports one tunnel).
    result.conns = list(dict.fromkeys(result.conns))
    return result
