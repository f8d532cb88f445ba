#!/usr/bin/env python3
"""Capture the daemon-answer fixtures from a real charon (root; Debian's strongSwan).

    sudo python3 tests/capture_fixtures.py [NAME ...]

Brings up the two gateway labs of tests/lab.py, sends traffic through two of
their tunnels, then asks each gateway's charon back to back, once through
stroke and once through VICI, and stores the answers beside the exact configs
that produced them:

    tests/fixtures/states/      ipsec.conf gateway (lab.start_states_lab)
    tests/fixtures/swanctl/     swanctl.conf gateway (lab.start_swanctl_lab)
    tests/fixtures/rekeyed/     an IKEv1 tunnel whose rekeyed CHILD SA is still listed
                                (lab.start_rekey_lab)
    tests/fixtures/remote-access/  a remote-access gateway and its clients (ra_lab.start_ra_lab)
        statusall.txt           `ipsec statusall` output
        vici.bin                every byte charon sent on the one VICI connection of
                                ipsec_textfile.ViciDaemon.send_questions() (version, stats, list-sas,
                                stats, list-policies, list-conns), as it sent it: recorded
                                by lab.ViciProxy in front of its socket; the tests decode it
        etc/...                 the gateway's /etc/ipsec.conf and what it includes
        swanctl.conf            what `swanctl --load-all --file` loaded (swanctl only)
        peer-ipsec.conf         the peer's /etc/ipsec.conf
        statusall-before-5.3.txt  rekeyed/ only: statusall.txt with each CHILD SA
                                numbered by its reqid, as stroke before strongSwan 5.3 did
        leases.txt              remote-access/ only: `ipsec leases` output
        CAPTURE.md              command, versions, date, traffic sent
"""

from __future__ import annotations

import contextlib
import datetime
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import ipsec_textfile
import lab
import ra_lab

# (local, remote, datagrams, payload bytes): 5 packets on one tunnel, 1 on another
# (stroke writes "1 pkt" for it).
TRAFFIC = {
    "states": [("10.1.1.1", "10.2.1.1", 5, 100), ("10.1.2.1", "10.2.2.1", 1, 100)],
    "swanctl": [("10.1.1.1", "10.2.1.1", 5, 100)],
    "rekeyed": [("10.1.1.1", "10.2.1.1", 2, 100)],
}


def recorded_vici(socket_path: str, workdir: Path) -> bytes:
    """Every byte charon sends on the one connection of ipsec_textfile.ViciDaemon.send_questions()."""
    with contextlib.closing(lab.ViciProxy(workdir / "recording.vici", socket_path)) as proxy:
        ipsec_textfile.ViciDaemon(str(proxy.path)).send_questions(time.monotonic() + 10)()
    return bytes(proxy.from_daemon)


def capture(name: str, start: Callable[[Path], lab.Lab], describe: str) -> None:
    target = HERE / "fixtures" / name
    with tempfile.TemporaryDirectory() as tmp:
        gateway_lab = start(Path(tmp))
        try:
            for local, remote, count, size in TRAFFIC[name]:
                lab.exchange_datagrams(gateway_lab, local, remote, count, size)
            statusall = gateway_lab.gateway.ipsec("statusall")
            sent = recorded_vici(gateway_lab.gateway.vici_socket, Path(tmp))
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
    if name == "rekeyed":
        (target / "statusall-before-5.3.txt").write_text(numbered_by_reqid(statusall))
    (target / "vici.bin").write_bytes(sent)
    traffic = "".join(f"- {count} UDP datagrams of {size} bytes from {local} to an echo server at {remote}\n"
                   for local, remote, count, size in TRAFFIC[name])
    (target / "CAPTURE.md").write_text(
        f"# {name}\n\n"
        "Captured by `python3 tests/capture_fixtures.py` (as root) on "
        f"{datetime.date.today().isoformat()} from {version}.\n\n"
        f"{describe}\n\n"
        "Once the lab had settled, `lab.exchange_datagrams` sent (and got back):\n\n"
        f"{traffic}\n"
        "Then, back to back inside the gateway's namespaces: `ipsec statusall` (`statusall.txt`)\n"
        "and `ipsec_textfile.ViciDaemon(socket).send_questions(deadline)()` through `lab.ViciProxy` in front of its\n"
        "/run/charon.vici, which kept every byte charon sent on that connection (`vici.bin`).\n"
        "The peer read `peer-ipsec.conf`; both used PSK authentication and kernel-libipsec\n"
        "(see tests/lab.py).\n"
    )
    print(f"wrote {target}")


def numbered_by_reqid(statusall: str) -> str:
    """stroke's output as before strongSwan 5.3, which printed a CHILD SA's reqid in {N}
    where later versions print its unique id; nothing else differs in these lines."""
    reqids = dict(re.findall(r"\{(\d+)\}:  [A-Z]+, [A-Z_]+, reqid (\d+)", statusall))
    return re.sub(r"\{(\d+)\}:", lambda m: "{" + reqids.get(m.group(1), m.group(1)) + "}:", statusall)


# The remote-access capture: 3 clients of each kind; (conn, datagrams, payload bytes)
# sent from the client's virtual IP; conns that then leave (their leases go offline).
RA_CLIENTS = 3
RA_TRAFFIC = [("eap-1", 5, 100), ("cert-0", 2, 100)]
RA_LEFT = ["xauth-2", "swan-2"]


def capture_remote_access() -> None:
    target = HERE / "fixtures" / "remote-access"
    with tempfile.TemporaryDirectory() as tmp:
        ra = ra_lab.start_ra_lab(Path(tmp), RA_CLIENTS)
        try:
            for conn, count, size in RA_TRAFFIC:
                ra.send_from(conn, count, size)
            ra.down(*RA_LEFT)
            ra.wait_established(len(ra_lab.KINDS) * RA_CLIENTS + 1 - len(RA_LEFT))
            statusall = ra.gateway.ipsec("statusall")
            leases = ra.gateway.ipsec("leases")
            sent_by_charon = recorded_vici(ra.gateway.vici_socket, Path(tmp))
            version = ra.gateway.ipsec("version").strip().splitlines()[0]
        finally:
            ra.destroy()
        shutil.rmtree(target, ignore_errors=True)
        (target / "etc").mkdir(parents=True)
        shutil.copy(ra.gateway.workdir / "ipsec.conf", target / "etc" / "ipsec.conf")
        shutil.copy(ra.gateway.workdir / "swanctl.conf", target / "swanctl.conf")
        shutil.copy(ra.client.workdir / "ipsec.conf", target / "peer-ipsec.conf")
    (target / "statusall.txt").write_text(statusall)
    (target / "leases.txt").write_text(leases)
    (target / "vici.bin").write_bytes(sent_by_charon)
    sent = "".join(f"- {count} UDP datagrams of {size} bytes from {conn}'s virtual IP to an echo server at "
                   f"{ra_lab.GATEWAY_ADDRESS}\n" for conn, count, size in RA_TRAFFIC)
    (target / "CAPTURE.md").write_text(
        "# remote-access\n\n"
        "Captured by `python3 tests/capture_fixtures.py remote-access` (as root) on "
        f"{datetime.date.today().isoformat()} from {version}.\n\n"
        f"`ra_lab.start_ra_lab(workdir, {RA_CLIENTS})`: the gateway read `etc/ipsec.conf` (conns rw-eap,\n"
        "rw-xauth, rw-cert, `right=%any`, each with a rightsourceip pool) and loaded `swanctl.conf` (rw-swan\n"
        f"and its pool {ra_lab.SWAN_POOL}) with `swanctl --load-all --file`. One client charon (`peer-ipsec.conf`)\n"
        f"brought up {RA_CLIENTS} clients of each kind (eap-N: EAP user userN; xauth-N: XAuth user xuserN;\n"
        "cert-N: certificate O=lab, CN=certN; swan-N: EAP user suserN) and eap-twice, a second session\n"
        "of user0 under another IKE identity. Then `RaLab.send_from` sent (and got back):\n\n"
        f"{sent}\n"
        f"and {', '.join(RA_LEFT)} left (`ipsec down` on the client). Then, back to back inside the gateway's\n"
        "namespaces: `ipsec statusall` (`statusall.txt`), `ipsec leases` (`leases.txt`) and\n"
        "`ipsec_textfile.ViciDaemon(socket).send_questions(deadline)()` through `lab.ViciProxy` in front of its /run/charon.vici,\n"
        "which kept every byte charon sent on that connection (`vici.bin`).\n"
    )
    print(f"wrote {target}")


CAPTURES: dict[str, tuple[Callable[[Path], lab.Lab], str]] = {
    "states": (lab.start_states_lab,
               ("The gateway read `etc/ipsec.conf` as /etc/ipsec.conf and `etc/ipsec.d/included.conf`\n"
               "as /etc/ipsec.d/included.conf. What each tunnel must report is `lab.STATES_EXPECTED`.")),
    "swanctl": (lab.start_swanctl_lab,
                ("The gateway's /etc/ipsec.conf (`etc/ipsec.conf`) has no conn; its tunnels come from\n"
                "`swanctl.conf`, loaded with `swanctl --load-all --file`. What each tunnel must report\n"
                "is `lab.SWANCTL_EXPECTED`.")),
    "rekeyed": (lab.start_rekey_lab,
                ("The gateway's tunnel v1 (IKEv1, `etc/ipsec.conf`) carried 3 datagrams, was rekeyed with\n"
                "`swanctl --rekey --child v1`; IKEv1 keeps the old CHILD SA (REKEYED) until it expires,\n"
                "so both are listed. `statusall-before-5.3.txt` is `statusall.txt` with each CHILD SA's\n"
                "{unique id} replaced by its reqid (`numbered_by_reqid`), which is how stroke numbered\n"
                "CHILD SAs before strongSwan 5.3: the pair then shares one {N}.")),
}


def main() -> None:
    """`capture_fixtures.py [NAME ...]`: those fixtures, or all of them."""
    for name in sys.argv[1:] or [*CAPTURES, "remote-access"]:
        if name == "remote-access":
            capture_remote_access()
            continue
        start, describe = CAPTURES[name]
        capture(name, start, describe)


if __name__ == "__main__":
    main()
