#!/usr/bin/env python3
"""Capture the daemon-answer fixtures from a real charon (root; Debian's strongSwan).

    sudo python3 tests/capture_fixtures.py

Brings up the two gateway labs of tests/lab.py, sends traffic through two of
their tunnels, then asks each gateway's charon back to back, once through
stroke and once through VICI, and stores the answers beside the exact configs
that produced them:

    tests/fixtures/states/      ipsec.conf gateway (lab.start_states_lab)
    tests/fixtures/swanctl/     swanctl.conf gateway (lab.start_swanctl_lab)
        statusall.txt           `ipsec statusall` output
        vici.json               the VICI answers ipsec_textfile.ViciDaemon.ask() collects
                                (version, stats, list-sas, stats-after, list-policies,
                                list-conns), bytes decoded as UTF-8
        etc/...                 the gateway's /etc/ipsec.conf and what it includes
        swanctl.conf            what `swanctl --load-all --file` loaded (swanctl only)
        peer-ipsec.conf         the peer's /etc/ipsec.conf
        CAPTURE.md              command, versions, date, traffic sent
"""

from __future__ import annotations

import datetime
import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import ipsec_textfile
import lab

# (local, remote, datagrams, payload bytes): 5 packets on one tunnel, 1 on another
# (stroke writes "1 pkt" for it).
TRAFFIC = {
    "states": [("10.1.1.1", "10.2.1.1", 5, 100), ("10.1.2.1", "10.2.2.1", 1, 100)],
    "swanctl": [("10.1.1.1", "10.2.1.1", 5, 100)],
}


def capture(name: str, start: Callable[[Path], lab.Lab], describe: str) -> None:
    target = HERE / "fixtures" / name
    with tempfile.TemporaryDirectory() as tmp:
        gateway_lab = start(Path(tmp))
        try:
            for local, remote, count, size in TRAFFIC[name]:
                lab.exchange_datagrams(gateway_lab, local, remote, count, size)
            statusall = gateway_lab.gateway.ipsec("statusall")
            answer = ipsec_textfile.ViciDaemon(gateway_lab.gateway.vici_socket).ask()
            version = gateway_lab.gateway.ipsec("version").strip().splitlines()[0]
        finally:
            gateway_lab.destroy()
        shutil.rmtree(target, ignore_errors=True)
        gw = gateway_lab.gateway.workdir
        shutil.copytree(gw / "ipsec.d", target / "etc" / "ipsec.d")
        shutil.copy(gw / "ipsec.conf", target / "etc" / "ipsec.conf")
        if (gw / "swanctl.conf").exists():
            shutil.copy(gw / "swanctl.conf", target / "swanctl.conf")
        shutil.copy(gateway_lab.peer.workdir / "ipsec.conf", target / "peer-ipsec.conf")
    (target / "statusall.txt").write_text(statusall)
    (target / "vici.json").write_text(json.dumps(answer, indent=1) + "\n")
    sent = "".join(f"- {count} UDP datagrams of {size} bytes from {local} to an echo server at {remote}\n"
                   for local, remote, count, size in TRAFFIC[name])
    (target / "CAPTURE.md").write_text(
        f"# {name}\n\n"
        "Captured by `python3 tests/capture_fixtures.py` (as root) on "
        f"{datetime.date.today().isoformat()} from {version}.\n\n"
        f"{describe}\n\n"
        "Once the lab had settled, `lab.exchange_datagrams` sent (and got back):\n\n"
        f"{sent}\n"
        "Then, back to back inside the gateway's namespaces: `ipsec statusall` (`statusall.txt`)\n"
        "and `ipsec_textfile.ViciDaemon(socket).ask()` on its /run/charon.vici (`vici.json`).\n"
        "The peer read `peer-ipsec.conf`; both used PSK authentication and kernel-libipsec\n"
        "(see tests/lab.py).\n"
    )
    print(f"wrote {target}")


def main() -> None:
    capture("states", lab.start_states_lab,
            "The gateway read `etc/ipsec.conf` as /etc/ipsec.conf and `etc/ipsec.d/included.conf`\n"
            "as /etc/ipsec.d/included.conf. What each tunnel must report is `lab.STATES_EXPECTED`.")
    capture("swanctl", lab.start_swanctl_lab,
            "The gateway's /etc/ipsec.conf (`etc/ipsec.conf`) has no conn; its tunnels come from\n"
            "`swanctl.conf`, loaded with `swanctl --load-all --file`. What each tunnel must report\n"
            "is `lab.SWANCTL_EXPECTED`.")


if __name__ == "__main__":
    main()
