"""Capture pluto's answers on a remote-access gateway as parser fixtures (run as root).

For each Debian release of libreswan_lab.SUITES: boot libreswan_lab.start_ra_lab (a gateway
whose conns "rw" (IKEv2, PSK) and "xauth" (IKEv1, PSK and XAuth) serve any peer from address
pools, and a client guest running three IKEv2 and two XAuth clients), then: ping from
client1's lease to the gateway's subnet, take client3 down, and save on the gateway guest
`{ ipsec whack --status; ipsec whack --trafficstatus; ipsec whack --addresspoolstatus; }`
(a --status-file for the pluto backend) beside the ipsec.conf that produced it.
"""

from __future__ import annotations

import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import libreswan_lab
from lab import wait_for

FIXTURES = Path(__file__).resolve().parent / "fixtures"
PINGS = 4


def lease_of(lab: libreswan_lab.LibreswanLab, client: str) -> str:
    """The address the gateway leased to one of the client guest's conns."""
    found = re.search(rf'"{client}"\S* [^\n]*lease=([0-9.]+)/32', lab.peer.whack("--trafficstatus"))
    assert found, f"{client} has no lease"
    return found.group(1)


def main() -> None:
    for suite, version in sorted(libreswan_lab.SUITES.items()):
        with tempfile.TemporaryDirectory() as workdir:
            lab = libreswan_lab.start_ra_lab(suite, Path(workdir))
            try:
                lease = lease_of(lab, "client1")
                lab.peer.run(f"ping -c {PINGS} -s 500 -i 0.2 -I {lease} 10.77.0.1\n", timeout=60)
                lab.peer.whack("--name client3 --terminate")
                wait_for(lambda lab=lab: not libreswan_lab.ra_clients_up(lab.gateway.whack("--trafficstatus"), 5),
                         30, "client3 to leave")
                status = "".join(lab.gateway.whack(f"--{query}") for query in
                                 ("status", "trafficstatus", "addresspoolstatus"))
            finally:
                lab.destroy()
        target = FIXTURES / f"libreswan-{version}-remote-access"
        target.mkdir(parents=True, exist_ok=True)
        (target / "ipsec.conf").write_text(libreswan_lab.RA_GATEWAY_CONF)
        (target / "peer-ipsec.conf").write_text(libreswan_lab.ra_peer_conf(3, 2))
        (target / "status.txt").write_text(status)
        (target / "README").write_text(
            f"Captured {time.strftime('%Y-%m-%d')} by tests/capture_libreswan_ra_fixtures.py from the libreswan\n"
            f"remote-access lab (Debian {suite}, libreswan {version}): the gateway read ipsec.conf, the client\n"
            "guest peer-ipsec.conf (its conns client1..3 IKEv2, xuser1..2 IKEv1 with XAuth, all\n"
            "initiated). Then, on the client guest:\n"
            f"  ping -c {PINGS} -s 500 -i 0.2 -I {lease} 10.77.0.1   (client1's lease)\n"
            "  ipsec whack --name client3 --terminate\n"
            "and on the gateway guest:\n"
            "  { ipsec whack --status; ipsec whack --trafficstatus; ipsec whack --addresspoolstatus; } > status.txt\n")
        print(f"wrote {target}")


if __name__ == "__main__":
    main()
