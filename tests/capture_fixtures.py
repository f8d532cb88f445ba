#!/usr/bin/env python3
"""Capture the stroke parser's fixtures from a real charon (root; Debian's strongSwan).

    sudo python3 tests/capture_fixtures.py

Brings up the states lab (tests/lab.py), runs `ipsec statusall` on its gateway
and stores the output beside the exact configs that produced it:

    tests/fixtures/stroke-states/statusall.txt      the daemon's answer
    tests/fixtures/stroke-states/etc/ipsec.conf     the gateway's /etc/ipsec.conf
    tests/fixtures/stroke-states/etc/ipsec.d/...    the file it includes
    tests/fixtures/stroke-states/peer-ipsec.conf    the peer's /etc/ipsec.conf
    tests/fixtures/stroke-states/CAPTURE.md         command, versions, date
"""

from __future__ import annotations

import datetime
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import lab


def main() -> None:
    target = HERE / "fixtures" / "stroke-states"
    with tempfile.TemporaryDirectory() as tmp:
        states = lab.start_states_lab(Path(tmp))
        try:
            statusall = states.gateway.ipsec("statusall")
            version = states.gateway.ipsec("version").strip().splitlines()[0]
        finally:
            states.destroy()
        shutil.rmtree(target, ignore_errors=True)
        (target / "etc" / "ipsec.d").mkdir(parents=True)
        (target / "statusall.txt").write_text(statusall)
        gw = states.gateway.workdir
        shutil.copy(gw / "ipsec.conf", target / "etc" / "ipsec.conf")
        shutil.copy(gw / "ipsec.d" / "included.conf", target / "etc" / "ipsec.d" / "included.conf")
        shutil.copy(states.peer.workdir / "ipsec.conf", target / "peer-ipsec.conf")
    (target / "CAPTURE.md").write_text(
        "# stroke-states\n\n"
        "Captured by `python3 tests/capture_fixtures.py` (as root) on "
        f"{datetime.date.today().isoformat()} from {version}.\n\n"
        "`statusall.txt` is the output of `ipsec statusall`, run inside the lab gateway's\n"
        "namespaces (`nsenter -t PID -m -n ipsec statusall`) once the lab had settled\n"
        "(`lab.states_settled`). The gateway read `etc/ipsec.conf` as /etc/ipsec.conf and\n"
        "`etc/ipsec.d/included.conf` as /etc/ipsec.d/included.conf; the peer read\n"
        "`peer-ipsec.conf`. Both used PSK authentication and kernel-libipsec (see tests/lab.py).\n"
        "What each tunnel must report is `lab.STATES_EXPECTED`.\n"
    )
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
