"""Certificates and CRLs: what a real charon has loaded, to the second, through both backends.

The fixtures in tests/fixtures/certificates were captured from tests/cert_lab.py's gateway
(tests/capture_cert_fixtures.py); expected.json is what that lab issued with `pki`.
"""

from __future__ import annotations

import datetime
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

import cert_lab
import ipsec_textfile as it
import lab
from conftest import FIXTURES, FakeVici, require, run_collector, vici_packets
from promfile import by_tunnel, samples

CERTS = FIXTURES / "certificates"
NOT_AFTER = "ipsec_certificate_not_after_timestamp_seconds"
NOT_BEFORE = "ipsec_certificate_not_before_timestamp_seconds"
NEXT_UPDATE = "ipsec_crl_next_update_timestamp_seconds"
# The collector runs in another zone than the gateway's charon (cert_lab.GATEWAY_TZ).
COLLECTOR_TZ = "TZ=America/St_Johns"  # -03:30


def expected() -> dict[str, Any]:
    issued: dict[str, Any] = json.loads((CERTS / "expected.json").read_text())
    return issued


def expected_certificates(readable_only: bool, issued: dict[str, Any] | None = None) -> list[it.Certificate]:
    return [it.Certificate(c["subject"], c["issuer"], c["serial"], c["type"], c["not_before"], c["not_after"])
            for c in (issued or expected())["certificates"] if c["readable"] or not readable_only]


def expected_crls(issued: dict[str, Any] | None = None) -> list[it.Crl]:
    return [it.Crl(c["issuer"], c["next_update"]) for c in (issued or expected())["crls"]]


def key(cert: it.Certificate) -> tuple[str, str]:
    return cert.subject, cert.serial


def list_certs() -> list[it.ViciMessage]:
    events: list[it.ViciMessage] = json.loads((CERTS / "list-certs.json").read_text())
    return events


def warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line]


# ---------------------------------------------------------------- captured answers


def test_stroke_listing_gives_every_certificate_and_crl_as_issued(capsys: pytest.CaptureFixture[str]) -> None:
    certificates, crls = it.parse_certificate_listing((CERTS / "listall.txt").read_text())
    assert sorted(certificates, key=key) == sorted(expected_certificates(readable_only=False), key=key)
    assert sorted(crls, key=lambda c: c.issuer) == sorted(expected_crls(), key=lambda c: c.issuer)
    assert capsys.readouterr().err == ""


def test_vici_der_gives_the_same_but_one_name_the_library_refuses(capsys: pytest.CaptureFixture[str]) -> None:
    certificates, crls = it.vici_certificates(list_certs())
    assert sorted(certificates, key=key) == sorted(expected_certificates(readable_only=True), key=key)
    assert sorted(crls, key=lambda c: c.issuer) == sorted(expected_crls(), key=lambda c: c.issuer)
    (warning,) = warnings(capsys.readouterr().err)
    assert "1 of the 11 certificates and CRLs" in warning
    # Its serial and expiry where the library reads those (cryptography 2.x refuses it whole).
    assert "serial 0c, not after" in warning or "Unable to load certificate" in warning


def test_a_listing_in_local_time_is_never_read_as_utc(capsys: pytest.CaptureFixture[str]) -> None:
    """Without --utc charon prints its own zone (+05:45 here) with no zone at all: such
    times are left out with a warning, never taken for UTC."""
    certificates, crls = it.parse_certificate_listing((CERTS / "listall-local.txt").read_text())
    assert (certificates, crls) == ([], [])
    (warning,) = warnings(capsys.readouterr().err)
    assert f"{len(expected()['certificates']) + len(expected()['crls'])} entries" in warning


def test_an_unreadable_certificate_is_left_out_and_the_rest_written(capsys: pytest.CaptureFixture[str]) -> None:
    events = list_certs()
    broken = dict(events[0], data=events[0]["data"][:200])  # cut short
    junk = {"type": "X509", "flag": "CA", "data": "not DER at all"}
    certificates, crls = it.vici_certificates([broken, *events, junk])
    assert sorted(certificates, key=key) == sorted(expected_certificates(readable_only=True), key=key)
    assert len(crls) == 2
    (warning,) = warnings(capsys.readouterr().err)
    assert "3 of the 13 certificates and CRLs the daemon listed cannot be read" in warning


def test_cryptography_before_3_1_is_handed_its_backend(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    # Before 3.1 the loaders take the backend as a required argument; from 3.1 on the run
    # skips loading it. Both read the same.
    cryptography = pytest.importorskip("cryptography")
    modern = it.vici_certificates(list_certs())
    handed: list[object] = []
    from cryptography import x509
    from cryptography.hazmat.backends import default_backend

    default_backend()  # loaded before its version is changed below: it checks the version once

    def load_requiring_a_backend(der: bytes, backend: object) -> object:
        assert backend is not None, "cryptography before 3.1 needs its backend"
        handed.append(backend)
        return real_load(der, backend)

    real_load = x509.load_der_x509_certificate
    monkeypatch.setattr(x509, "load_der_x509_certificate", load_requiring_a_backend)
    monkeypatch.setattr(cryptography, "__version__", "2.8")
    assert it.vici_certificates(list_certs()) == modern
    assert handed
    capsys.readouterr()


def test_without_cryptography_one_warning_and_no_certificate(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "cryptography", None)  # import fails as when it is not installed
    assert it.vici_certificates(list_certs()) == ([], [])
    (warning,) = warnings(capsys.readouterr().err)
    assert "python3-cryptography" in warning
    # a daemon with no certificate: nothing to say
    assert it.vici_certificates([]) == ([], []) and capsys.readouterr().err == ""


def state_with(certificates: list[it.Certificate], crls: list[it.Crl]) -> it.DaemonState:
    return it.DaemonState([], [], backend="vici", version="5.9.8", certificates=certificates, crls=crls)


def exposition(state: it.DaemonState) -> str:
    return generate_latest(it.build_registry(it.RunResult([], state, 0.0, 0.0))).decode()


def promtool_check(text: str) -> None:
    promtool = shutil.which("promtool")
    require([] if promtool else ["promtool"], "checking metrics")
    check = subprocess.run([str(promtool), "check", "metrics"], input=text, capture_output=True, text=True,
                           timeout=60, check=False)
    assert check.returncode == 0, check.stdout + check.stderr


def test_series_carry_names_with_quotes_and_backslashes_intact() -> None:
    certificates = expected_certificates(readable_only=False)
    text = exposition(state_with(certificates, expected_crls()))
    written = {dict(labels)["subject"]: value for (name, labels), value in samples(text).items() if name == NOT_AFTER}
    assert written == {c.subject: c.not_after for c in certificates}
    assert 'CN=say \\"hi\\" \\\\back\\\\slash' in text
    promtool_check(text)


def test_a_certificate_listed_twice_is_one_series_and_a_crl_issuer_its_latest() -> None:
    cert = expected_certificates(readable_only=True)[0]
    crl = expected_crls()[0]
    later = it.Crl(crl.issuer, crl.next_update + 3600)
    text = exposition(state_with([cert, cert], [crl, later, crl]))
    # Prometheus rejects a scrape that repeats a series.
    assert [line.split("{")[0] for line in text.splitlines() if not line.startswith("#")
            and line.startswith(("ipsec_certificate", "ipsec_crl"))] == [NOT_BEFORE, NOT_AFTER, NEXT_UPDATE]
    assert samples(text)[(NOT_AFTER, tuple(sorted({"subject": cert.subject, "issuer": cert.issuer,
                                                    "serial": cert.serial, "type": cert.type}.items())))] \
        == cert.not_after
    assert samples(text)[(NEXT_UPDATE, (("issuer", crl.issuer),))] == later.next_update
    promtool_check(text)


def test_thousands_of_certificates_each_written(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("cryptography")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    count = 3000
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "bulk CA")])
    start = datetime.datetime(2026, 1, 1)
    events = []
    for serial in range(1, count + 1):
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(serial).not_valid_before(start)
                .not_valid_after(start + datetime.timedelta(seconds=serial)).sign(key, hashes.SHA256()))
        der = cert.public_bytes(serialization.Encoding.DER)
        events.append({"type": "X509", "flag": "NONE", "data": der.decode("utf-8", "surrogateescape")})
    certificates, _ = it.vici_certificates(events)
    assert len(certificates) == count and capsys.readouterr().err == ""
    text = exposition(state_with(certificates, []))
    not_after = [v for (name, _), v in samples(text).items() if name == NOT_AFTER]
    assert sorted(not_after) == [start.replace(tzinfo=datetime.timezone.utc).timestamp() + s
                                 for s in range(1, count + 1)]
    promtool_check(text)


# ---------------------------------------------------------------- a daemon slow to list them

STATES = FIXTURES / "states"


def sent_before_the_certificates(fixture: Path) -> bytes:
    """The bytes charon sent in a capture up to its answers to list-certs (the last command:
    its register confirmation, events, response and unregister confirmation), which a charon
    slow to list thousands of certificates has not sent yet when the client gives up."""
    packets = vici_packets(fixture)
    confirmations = [i for i, packet in enumerate(packets) if packet[0] == it._VICI_EVENT_CONFIRM]
    return b"".join(len(packet).to_bytes(4, "big") + packet for packet in packets[: confirmations[-2]])


def test_vici_slow_to_list_certificates_still_gives_every_tunnel(tmp_path: Path) -> None:
    sock = tmp_path / "charon.vici"
    FakeVici(sock, sent_before_the_certificates(STATES))
    proc = run_collector("--config", str(STATES / "etc" / "ipsec.conf"), "--output", "-", "--backend", "vici",
                         "--vici-socket", str(sock), "--timeout", "2")
    assert proc.returncode == 0
    (warning,) = warnings(proc.stderr)
    assert "did not list its certificates within 2s" in warning
    assert by_tunnel(proc.stdout, "ipsec_status") == lab.STATES_EXPECTED
    assert certificate_series(proc.stdout) == {}


def test_stroke_slow_to_list_certificates_still_gives_every_tunnel(tmp_path: Path) -> None:
    ipsec = tmp_path / "ipsec"
    ipsec.write_text('#!/bin/sh\nif [ "$1" = statusall ]; then cat "$STATUSALL"; else sleep 30; fi\n')
    ipsec.chmod(0o755)
    started = time.monotonic()
    proc = run_collector("--config", str(STATES / "etc" / "ipsec.conf"), "--output", "-", "--backend", "stroke",
                         "--ipsec", str(ipsec), "--timeout", "2",
                         prefix=["env", f"STATUSALL={STATES / 'statusall.txt'}"])
    assert time.monotonic() - started < 15  # the sleeping listing was killed
    assert proc.returncode == 0
    (warning,) = warnings(proc.stderr)
    assert "did not list its certificates within 2s" in warning
    # The config's include names the gateway's /etc/ipsec.d, absent here: stroke knows tunnels
    # from the config alone.
    assert by_tunnel(proc.stdout, "ipsec_status") == {k: v for k, v in lab.STATES_EXPECTED.items()
                                                       if k != "included"}
    assert certificate_series(proc.stdout) == {}


# ---------------------------------------------------------------- the live gateway


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[cert_lab.CertLab]:
    require(cert_lab.missing_tools(), "the certificate lab")
    started = cert_lab.start_cert_lab(tmp_path_factory.mktemp("cert-lab"))
    yield started
    started.destroy()


def issued(lab: cert_lab.CertLab) -> dict[str, Any]:
    return {"certificates": [{**vars(c)} for c in lab.certificates], "crls": [{**vars(c)} for c in lab.crls]}


def collect(lab: cert_lab.CertLab, backend: str, *env: str) -> tuple[str, str]:
    proc = run_collector("--output", "-", "--backend", backend,
                         prefix=[*lab.lab.gateway.nsenter(), "env", COLLECTOR_TZ, *env])
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, proc.stderr


def certificate_series(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {k: v for k, v in samples(text).items() if k[0] in (NOT_AFTER, NOT_BEFORE, NEXT_UPDATE)}


def as_series(certificates: list[it.Certificate], crls: list[it.Crl]) -> dict[tuple[str, tuple[tuple[str, str], ...]],
                                                                                float]:
    series = {}
    for c in certificates:
        labels = (("issuer", c.issuer), ("serial", c.serial), ("subject", c.subject), ("type", c.type))
        series[(NOT_AFTER, labels)] = c.not_after
        series[(NOT_BEFORE, labels)] = c.not_before
    for crl in crls:
        series[(NEXT_UPDATE, (("issuer", crl.issuer),))] = crl.next_update
    return series


@pytest.mark.parametrize("backend", ["stroke", "vici"])
def test_every_loaded_certificate_and_crl_to_the_second(gateway: cert_lab.CertLab, backend: str) -> None:
    text, stderr = collect(gateway, backend)
    readable_only = backend == "vici"
    want = as_series(expected_certificates(readable_only, issued(gateway)), expected_crls(issued(gateway)))
    assert certificate_series(text) == want
    if backend == "vici":  # the name that is not UTF-8
        (warning,) = warnings(stderr)
        assert "serial 0c" in warning
    else:
        assert stderr == ""
    assert samples(text)[("ipsec_status", (("tunnel", "up"),))] == 0
    promtool_check(text)


def test_both_backends_agree_to_the_second(gateway: cert_lab.CertLab) -> None:
    stroke, vici = (certificate_series(collect(gateway, backend)[0]) for backend in ("stroke", "vici"))
    refused = {k for k in stroke if ("serial", "0c") in k[1]}
    assert len(refused) == 2
    assert {k: v for k, v in stroke.items() if k not in refused} == vici


def test_tunnels_unaffected_without_cryptography(gateway: cert_lab.CertLab, tmp_path: Path) -> None:
    hidden = tmp_path / "no-cryptography"
    (hidden / "cryptography").mkdir(parents=True)
    (hidden / "cryptography" / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    with_it, _ = collect(gateway, "vici")
    without, stderr = collect(gateway, "vici", f"PYTHONPATH={hidden}")
    (warning,) = warnings(stderr)
    assert "python3-cryptography" in warning
    assert certificate_series(without) == {}
    tunnels = {k: v for k, v in samples(with_it).items() if k[0] == "ipsec_status"}
    assert tunnels and {k: v for k, v in samples(without).items() if k[0] == "ipsec_status"} == tunnels
