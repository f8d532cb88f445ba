"""Capture pluto's answers from the libreswan lab as parser fixtures (run as root).

For each Debian release of libreswan_lab.SUITES: boot the lab of test_libreswan_lab.py,
then save on the gateway guest `{ ipsec whack --status; ipsec whack --trafficstatus; }`
(a --status-file for the pluto backend) beside the ipsec.conf that produced it, after
TRAFFIC: three pings through up-v2; two through up-v1 (IKEv1), a new IPsec SA for it
(`--initiate` again: IKEv1 keeps the old one until it expires), one ping through that, so
that one conn has bytes on two IPsec SAs.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import libreswan_lab
from lab import wait_for

TRAFFIC = """\
  ping -c 3 -s 500 -i 0.2 -I 10.1.1.1 10.2.1.1
  ping -c 2 -s 500 -i 0.2 -I 10.1.2.1 10.2.2.1
  ipsec whack --name up-v1 --initiate --asynchronous, then wait for its new IPsec SA
  ping -c 1 -s 500 -I 10.1.2.1 10.2.2.1
"""

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def main() -> None:
    for suite, version in sorted(libreswan_lab.SUITES.items()):
        with tempfile.TemporaryDirectory() as workdir:
            lab = libreswan_lab.start_states_lab(suite, Path(workdir))
            try:
                for line in TRAFFIC.splitlines():
                    if "ping" in line:
                        lab.gateway.run(line.strip() + "\n", timeout=60)
                    else:
                        before = up_v1_sas(lab)
                        lab.gateway.whack("--name up-v1 --initiate --asynchronous")
                        wait_for(lambda lab=lab, b=before: up_v1_sas(lab) > b,  # type: ignore[misc]
                                 30, "up-v1's new IPsec SA")
                status = lab.gateway.whack("--status") + lab.gateway.whack("--trafficstatus")
            finally:
                lab.destroy()
        target = FIXTURES / f"libreswan-{version}"
        target.mkdir(parents=True, exist_ok=True)
        (target / "ipsec.conf").write_text(libreswan_lab.STATES_GATEWAY_CONF)
        (target / "status.txt").write_text(status)
        (target / "README").write_text(
            f"Captured {time.strftime('%Y-%m-%d')} by tests/capture_libreswan_fixtures.py from the libreswan "
            f"lab (Debian {suite}, libreswan {version}) on the gateway guest:\n"
            f"{TRAFFIC}"
            "  { ipsec whack --status; ipsec whack --trafficstatus; } > status.txt\n"
            "with ipsec.conf as its /etc/ipsec.conf.\n")
        print(f"wrote {target}")


def up_v1_sas(lab: libreswan_lab.LibreswanLab) -> int:
    return lab.gateway.whack("--trafficstatus").count('"up-v1", type=ESP')


if __name__ == "__main__":
    main()
