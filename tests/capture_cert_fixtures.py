#!/usr/bin/env python3
"""Capture the certificate fixtures from a real charon (root; Debian's strongSwan and pki).

    sudo python3 tests/capture_cert_fixtures.py

Brings up tests/cert_lab.py's gateway (charon in cert_lab.GATEWAY_TZ) and asks its
charon back to back for what it holds, once through stroke and once through VICI:

    tests/fixtures/certificates/
        listall.txt        `ipsec listall --utc` output
        listall-local.txt  `ipsec listall` output: the same in the gateway's local time
        list-certs.json    the list-certs events ipsec_textfile.ViciDaemon.send_questions() collects,
                           decoded as it decodes them (surrogateescape: the DER in "data"
                           is recovered with .encode("utf-8", "surrogateescape"))
        expected.json      what the lab issued: each certificate's and CRL's names and
                           validity, as the collector must report them
        etc/...            the gateway's ipsec.conf and ipsec.d (certificates, CRLs; no keys)
        CAPTURE.md         command, version, date

    sudo python3 tests/capture_cert_fixtures.py --libreswan

does the same in each libreswan lab (cert_lab.start_libreswan_cert_lab, libreswan 4.10
and 5.2): tests/fixtures/certificates/libreswan-VERSION/ holds listing.txt (what
`ipsec whack --listcerts --listcacerts --listcrls` printed on the gateway guest),
expected.json and README.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import cert_lab
import ipsec_textfile
import libreswan_lab

TARGET = HERE / "fixtures" / "certificates"


def capture_libreswan() -> None:
    for suite, version in sorted(libreswan_lab.SUITES.items()):
        with tempfile.TemporaryDirectory() as tmp:
            lab, certificates, crls = cert_lab.start_libreswan_cert_lab(suite, Path(tmp))
            try:
                # Into a file: libreswan 5.2 prints a name's bytes as they are, not always UTF-8.
                lab.gateway.run(f"{cert_lab.LISTING} > /lab/listing.txt\n")
                listing = (lab.gateway.labdir / "listing.txt").read_bytes()
            finally:
                lab.destroy()
        target = TARGET / f"libreswan-{version}"
        target.mkdir(parents=True, exist_ok=True)
        (target / "listing.txt").write_bytes(listing)
        expected = {"certificates": [dataclasses.asdict(c) for c in certificates],
                    "crls": [dataclasses.asdict(c) for c in crls]}
        (target / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
        (target / "README").write_text(
            f"Captured {datetime.date.today().isoformat()} by `python3 tests/capture_cert_fixtures.py --libreswan` "
            f"from the libreswan lab (Debian {suite}, libreswan {version}): `cert_lab.make_pki`'s certificates\n"
            "and CRLs imported into the gateway guest's NSS database (cert_lab.start_libreswan_cert_lab), then\n"
            f"  {cert_lab.LISTING} > listing.txt\n"
            "expected.json is what make_pki issued.\n")
        print(f"wrote {target}")


def main() -> None:
    if sys.argv[1:] == ["--libreswan"]:
        capture_libreswan()
        return
    with tempfile.TemporaryDirectory() as tmp:
        started = cert_lab.start_cert_lab(Path(tmp))
        try:
            gateway = started.lab.gateway
            listall = gateway.ipsec("listall", "--utc")
            listall_local = gateway.ipsec("listall")
            answer = ipsec_textfile.ViciDaemon(gateway.vici_socket).send_questions(time.monotonic() + 10)()
            version = gateway.ipsec("version").strip().splitlines()[0]
        finally:
            started.destroy()
        shutil.rmtree(TARGET, ignore_errors=True)
        (TARGET / "etc").mkdir(parents=True)
        shutil.copy(gateway.workdir / "ipsec.conf", TARGET / "etc" / "ipsec.conf")
        shutil.copytree(gateway.workdir / "ipsec.d", TARGET / "etc" / "ipsec.d",
                        ignore=shutil.ignore_patterns("private"))
    (TARGET / "listall.txt").write_text(listall)
    (TARGET / "listall-local.txt").write_text(listall_local)
    (TARGET / "list-certs.json").write_text(json.dumps(answer["list-certs"], indent=1) + "\n")
    expected = {"certificates": [dataclasses.asdict(c) for c in started.certificates],
                "crls": [dataclasses.asdict(c) for c in started.crls]}
    (TARGET / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    (TARGET / "CAPTURE.md").write_text(
        "# certificates\n\n"
        "Captured by `python3 tests/capture_cert_fixtures.py` (as root) on "
        f"{datetime.date.today().isoformat()} from {version}.\n\n"
        "The gateway of `tests/cert_lab.py` (`etc/ipsec.conf`, its certificates and CRLs in\n"
        f"`etc/ipsec.d`, made by `pki`), its charon running with TZ={cert_lab.GATEWAY_TZ}, had\n"
        "established tunnel `up` with its peer (the peer's certificate, serial 05, came with it).\n"
        "Then, back to back inside the gateway's namespaces: `ipsec listall --utc` (`listall.txt`),\n"
        "`ipsec listall` (`listall-local.txt`, the gateway's local time) and\n"
        "`ipsec_textfile.ViciDaemon(socket).send_questions(deadline)()`, whose list-certs events are `list-certs.json`.\n"
        "`expected.json` is what `cert_lab.make_pki` issued (`readable` false: the cryptography\n"
        "package refuses that certificate's name, a byte that is not UTF-8).\n"
    )
    print(f"wrote {TARGET}")


if __name__ == "__main__":
    main()
