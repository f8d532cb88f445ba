"""strongSwan's own verdict on a config: `starter --conftest --debug-all` as /etc/ipsec.conf.

The config is bind-mounted over /etc/ipsec.conf in a private mount namespace (root, util-linux),
as the shared corpus' oracle did; nothing on the host changes.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

STARTER = "/usr/lib/ipsec/starter"


def missing() -> list[str]:
    lacking = [] if os.path.exists(STARTER) else [STARTER]
    lacking += [] if shutil.which("unshare") else ["unshare"]
    return lacking + ([] if os.geteuid() == 0 else ["root"])


@dataclass
class Verdict:
    error: bool
    conns: list[str] = field(default_factory=list)  # every conn starter read, in order
    dropped: set[str] = field(default_factory=set)
    auto: dict[str, str | None] = field(default_factory=dict)

    @property
    def loaded(self) -> list[str]:
        return [c for c in self.conns
                if c not in self.dropped and self.auto.get(c) in ("add", "route", "start")]


class OracleFailed(Exception):
    """starter gave no verdict: neither "config OK" with status 0 nor "config invalid!" with
    another (a crash, a mount that failed, a missing program)."""


def starter_verdict(config: Path) -> Verdict:
    proc = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         f'mount --bind "$1" /etc/ipsec.conf && exec {STARTER} --conftest --debug-all', "sh",
         str(config)],
        capture_output=True, text=True, timeout=30, check=False,
    )
    output = proc.stdout + proc.stderr
    if "config invalid!" in output and proc.returncode > 0:
        return Verdict(error=True)
    if "config OK" not in output or proc.returncode != 0:
        raise OracleFailed(f"starter --conftest exited {proc.returncode}: {output.strip()[-300:]}")
    verdict = Verdict(error=False)
    current = None
    for line in output.splitlines():
        loading = re.match(r"Loading conn '(.*)'$", line)
        if loading:
            current = loading.group(1)
            verdict.conns.append(current)
            verdict.auto[current] = None
            continue
        ignored = re.match(r"# ignored conn '(.*)' due to \d+ parsing errors?$", line)
        if ignored:
            verdict.dropped.add(ignored.group(1))
            continue
        auto = re.match(r"  auto=(.*)$", line)
        if auto and current is not None:
            verdict.auto[current] = auto.group(1)
    return verdict
