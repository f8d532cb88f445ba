"""Capture pluto's answers from the libreswan lab as parser fixtures (run as root).

For each Debian release of libreswan_lab.SUITES: boot the lab of test_libreswan_lab.py,
then save on the gateway guest `{ ipsec whack --status; ipsec whack --trafficstatus; }`
(a --status-file for the pluto backend) beside the ipsec.conf that produced it, after
three pings through up-v2.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import libreswan_lab

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def main() -> None:
    for suite, version in sorted(libreswan_lab.SUITES.items()):
        with tempfile.TemporaryDirectory() as workdir:
            lab = libreswan_lab.start_states_lab(suite, Path(workdir))
            try:
                # Some traffic through up-v2, so that its byte counters are not 0.
                lab.gateway.run("ping -c 3 -s 500 -i 0.2 -I 10.1.1.1 10.2.1.1\n", timeout=60)
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
            "  ping -c 3 -s 500 -i 0.2 -I 10.1.1.1 10.2.1.1\n"
            "  { ipsec whack --status; ipsec whack --trafficstatus; } > status.txt\n"
            "with ipsec.conf as its /etc/ipsec.conf.\n")
        print(f"wrote {target}")


if __name__ == "__main__":
    main()
