#!/usr/bin/env python3
"""Capture the certificate fixtures from a real charon (root; Debian's strongSwan and pki).

    sudo python3 tests/capture_cert_fixtures.py

Brings up tests/cert_lab.py's gateway (charon in cert_lab.GATEWAY_TZ) and asks its
charon back to back for what it holds, once through stroke and once through VICI:

    tests/fixtures/certificates/
        listall.txt        `ipsec listall --utc` output
        listall-local.txt  `ipsec listall` output: the same in the gateway's local time
        list-certs.json    the list-certs events ipsec_textfile.ViciDaemon.ask() collects,
                           decoded as it decodes them (surrogateescape: the DER in "data"
                           is recovered with .encode("utf-8", "surrogateescape"))
        expected.json      what the lab issued: each certificate's and CRL's names and
                           validity, as the collector must report them
        etc/...            the gateway's ipsec.conf and ipsec.d (certificates, CRLs; no keys)
        CAPTURE.md         command, version, date
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import cert_lab
import ipsec_textfile

TARGET = HERE / "fixtures" / "certificates"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        started = cert_lab.start_cert_lab(Path(tmp))
        try:
            gateway = started.lab.gateway
            listall = gateway.ipsec("listall", "--utc")
            listall_local = gateway.ipsec("listall")
            answer = ipsec_textfile.ViciDaemon(gateway.vici_socket).ask()
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
        "`ipsec_textfile.ViciDaemon(socket).ask()`, whose list-certs events are `list-certs.json`.\n"
        "`expected.json` is what `cert_lab.make_pki` issued (`readable` false: the cryptography\n"
        "package refuses that certificate's name, a byte that is not UTF-8).\n"
    )
    print(f"wrote {TARGET}")


if __name__ == "__main__":
    main()
