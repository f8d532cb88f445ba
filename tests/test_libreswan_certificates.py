"""Certificates and CRLs in libreswan's NSS database, read through `ipsec whack` by the
collector inside the UML lab's gateway guest (libreswan 4.10 and 5.2), and on the listings
captured from it (tests/fixtures/certificates/libreswan-*)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

import cert_lab
import ipsec_textfile as it
import libreswan_lab
from conftest import FIXTURES, require
from promfile import samples

NOT_AFTER = "ipsec_certificate_not_after_timestamp_seconds"
NOT_BEFORE = "ipsec_certificate_not_before_timestamp_seconds"
NEXT_UPDATE = "ipsec_crl_next_update_timestamp_seconds"
# Names with quotes, backslashes or bytes outside ASCII: pluto escapes them its own way
# (CN=caf\E9, CN=say \"hi\"); the others it prints as strongSwan does.
PLAIN = {"root.crt", "intermediate.crt", "gw.crt", "days.crt", "expired.crt", "peer.crt"}


def listed(version: str, cert_type: str) -> bool:
    """Whether pluto's listing shows a certificate of that type: libreswan 5's --listcacerts
    lists its trust anchors (root CAs) only, never an intermediate CA of the database."""
    return not (version.startswith("5.") and cert_type == "intermediate")


def expected_by_serial(certificates: list[dict[str, Any]], version: str) -> dict[str, tuple[str, float, float]]:
    return {c["serial"]: (c["type"], c["not_before"], c["not_after"]) for c in certificates
            if listed(version, c["type"])}


@pytest.mark.parametrize("version", sorted(libreswan_lab.SUITES.values()))
def test_captured_listing_gives_every_certificate_and_crl(version: str) -> None:
    captured = FIXTURES / "certificates" / f"libreswan-{version}"
    issued = json.loads((captured / "expected.json").read_text())
    # read as the collector reads a command's output (5.2 prints a name's bytes as they are)
    listing = (captured / "listing.txt").read_bytes().decode("utf-8", "replace")
    certificates, crls = it.parse_pluto_certificates(listing)
    assert {c.serial: (c.type, c.not_before, c.not_after) for c in certificates} \
        == expected_by_serial(issued["certificates"], version)
    plain = {c["serial"]: c["subject"] for c in issued["certificates"]
             if c["file"] in PLAIN and listed(version, c["type"])}
    assert {c.serial: c.subject for c in certificates if c.serial in plain} == plain
    assert sorted((c.issuer, c.next_update) for c in crls) \
        == sorted((c["issuer"], c["next_update"]) for c in issued["crls"])


@pytest.fixture(scope="module", params=sorted(libreswan_lab.SUITES))
def nss_lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[tuple[libreswan_lab.LibreswanLab, list[cert_lab.Issued], list[cert_lab.IssuedCrl]]]:
    require(libreswan_lab.missing_tools() + cert_lab.missing_tools(), "the libreswan certificate lab")
    started = cert_lab.start_libreswan_cert_lab(request.param,
                                                tmp_path_factory.mktemp(f"libreswan-certs-{request.param}"))
    yield started
    started[0].destroy()


def test_pluto_backend_gives_every_certificate_to_the_second(
        nss_lab: tuple[libreswan_lab.LibreswanLab, list[cert_lab.Issued], list[cert_lab.IssuedCrl]]) -> None:
    lab, issued, crls = nss_lab
    out = lab.gateway.run("python3 /repo/ipsec_textfile.py --backend pluto --output /lab/textfile/ipsec.prom "
                          "--config /etc/ipsec.conf 2>&1\n", timeout=60)
    assert out == ""
    text = (lab.gateway.labdir / "textfile/ipsec.prom").read_text()
    written: dict[str, dict[str, Any]] = {}
    for (name, labels), value in samples(text).items():
        if name in (NOT_AFTER, NOT_BEFORE):
            written.setdefault(dict(labels)["serial"], dict(labels))[name] = value
    assert {serial: (w["type"], w[NOT_BEFORE], w[NOT_AFTER]) for serial, w in written.items()} \
        == {c.serial: (c.type, c.not_before, c.not_after) for c in issued if listed(lab.version, c.type)}
    plain = [c for c in issued if c.file in PLAIN and listed(lab.version, c.type)]
    assert {c.serial: written[c.serial]["subject"] for c in plain} == {c.serial: c.subject for c in plain}
    assert {dict(labels)["issuer"]: value for (name, labels), value in samples(text).items()
            if name == NEXT_UPDATE} == {c.issuer: c.next_update for c in crls}
    # Every subject label is the line pluto printed (as the collector decodes it).
    lab.gateway.run(f"{cert_lab.LISTING} > /lab/listing.txt\n")
    listing = (lab.gateway.labdir / "listing.txt").read_bytes().decode("utf-8", "replace")
    assert all(f"  subject: {w['subject']}\n" in listing for w in written.values())

