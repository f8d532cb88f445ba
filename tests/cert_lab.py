"""A strongSwan gateway that authenticates with certificates made by `pki`.

The gateway and its peer are tests/lab.py's hosts. `make_pki` issues, with exact
validity times (pki runs in UTC, so each time given is the time written):

    root CA          self-signed, 10 years               ipsec.d/cacerts (charon loads it unasked)
    odd, latin1,     self-signed CAs with awkward names  ipsec.d/cacerts (see make_pki)
    utf8
    intermediate CA  issued by the root, 40 days left    ipsec.d/cacerts
    gw.lab           the gateway's own, 20 days left     conn up's leftcert (the tunnel that comes up)
    days.lab         issued by the intermediate, 3 days  conn days's leftcert (auto=add)
    expired.lab      expired 2 days ago                  conn expired's leftcert (auto=add)
    peer.lab         the peer's own                      the peer's leftcert (the gateway holds it
                                                         once the peer has authenticated)
    a CRL of the root, next update in 5 days, and one of the intermediate past its
    next update (a day ago), both in ipsec.d/crls

The gateway's charon runs in GATEWAY_TZ, +05:45 from UTC, so that a reader that took
stroke's times for UTC, or for the reader's own zone, is off by hours and minutes.

start_libreswan_cert_lab puts the same certificates and CRLs into the NSS database of
libreswan_lab's gateway guest.

Needs what tests/lab.py needs, and strongswan-pki.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import lab
import libreswan_lab

GATEWAY_TZ = "Asia/Kathmandu"  # +05:45, no daylight saving time
DAY = 86400
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
ROOT_DN = "C=CH, O=ipsec-textfile lab, CN=Lab Root CA"
INTERMEDIATE_DN = "C=CH, O=ipsec-textfile lab, CN=Lab Intermediate CA"
ODD_DN = r'C=CH, O=ipsec-textfile lab, CN=say "hi" \back\slash'
LATIN1_DN = b"C=CH, O=ipsec-textfile lab, CN=caf\xe9"
LATIN1_SHOWN = "C=CH, O=ipsec-textfile lab, CN=caf?"
UTF8_DN = "C=CH, O=ipsec-textfile lab, CN=caf\u00e9"  # two bytes in UTF-8: strongSwan prints '??'
UTF8_SHOWN = "C=CH, O=ipsec-textfile lab, CN=caf??"


@dataclass(frozen=True)
class Issued:
    """A certificate as the collector must report it."""

    file: str
    subject: str
    issuer: str
    serial: str  # as strongSwan prints it
    type: str
    not_before: int
    not_after: int
    readable: bool = True  # by the cryptography package: its subject is valid UTF-8


@dataclass(frozen=True)
class IssuedCrl:
    file: str
    issuer: str
    next_update: int


@dataclass
class CertLab:
    lab: lab.Lab
    certificates: list[Issued]  # those the gateway loads
    crls: list[IssuedCrl]

    def destroy(self) -> None:
        self.lab.destroy()


def missing_tools() -> list[str]:
    return lab.missing_tools() + ([] if shutil.which("pki") else ["pki (strongswan-pki)"])


def pki(*args: str) -> bytes:
    proc = subprocess.run(["pki", *args], capture_output=True, timeout=60, check=False,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "TZ": "UTC"})
    if proc.returncode != 0:
        raise RuntimeError(f"pki {' '.join(args)} failed: {proc.stderr.decode(errors='replace')}")
    return proc.stdout


def utc(moment: int) -> str:
    return time.strftime(DATE_FORMAT, time.gmtime(moment))


def key(path: Path) -> Path:
    path.write_bytes(pki("--gen", "--type", "rsa", "--size", "2048"))
    return path


def issue(directory: Path, name: str, dn: str, ca: str, serial: str, not_before: int, not_after: int,
          *extra: str) -> Path:
    """A certificate for a new key, signed by the CA whose files are ca.crt and ca.key in directory."""
    public = pki("--pub", "--in", str(key(directory / f"{name}.key")))
    cert = directory / f"{name}.crt"
    (directory / f"{name}.pub").write_bytes(public)
    cert.write_bytes(pki("--issue", "--in", str(directory / f"{name}.pub"), "--cacert", str(directory / f"{ca}.crt"),
                         "--cakey", str(directory / f"{ca}.key"), "--dn", dn, "--serial", serial,
                         "--not-before", utc(not_before), "--not-after", utc(not_after),
                         "--dateform", DATE_FORMAT, *extra))
    return cert


def self_signed(directory: Path, name: str, dn: str, serial: str, not_before: int, not_after: int) -> None:
    directory.joinpath(f"{name}.crt").write_bytes(pki(
        "--self", "--ca", "--in", str(key(directory / f"{name}.key")), "--dn", dn, "--serial", serial,
        "--not-before", utc(not_before), "--not-after", utc(not_after), "--dateform", DATE_FORMAT))


def make_pki(directory: Path, now: int, bulk: int = 0) -> tuple[list[Issued], list[IssuedCrl]]:
    """The lab's certificates and CRLs; bulk more CAs issued by the root (bulk-N.crt, one key),
    for the benchmark."""
    directory.mkdir(parents=True, exist_ok=True)
    root_from, root_until = now - DAY, now + 3650 * DAY
    self_signed(directory, "root", ROOT_DN, "01", root_from, root_until)
    # More CAs that charon loads unasked, with names a reader must not trip over: quotes and
    # backslashes; a byte that is not UTF-8 (pki copies it into a UTF8String, strongSwan prints
    # it as '?', the cryptography package refuses the name); a letter outside ASCII.
    self_signed(directory, "odd", ODD_DN, "0b", now - DAY, now + 100 * DAY)
    self_signed(directory, "latin1", os.fsdecode(LATIN1_DN), "0c", now - DAY, now + 200 * DAY)
    self_signed(directory, "utf8", UTF8_DN, "0d", now - DAY, now + 150 * DAY)
    # A serial with its high bit set: DER writes a leading zero byte that is not part of it.
    certs = [
        Issued("root.crt", ROOT_DN, ROOT_DN, "01", "ca", root_from, root_until),
        Issued("odd.crt", ODD_DN, ODD_DN, "0b", "ca", now - DAY, now + 100 * DAY),
        Issued("latin1.crt", LATIN1_SHOWN, LATIN1_SHOWN, "0c", "ca", now - DAY, now + 200 * DAY, readable=False),
        Issued("utf8.crt", UTF8_SHOWN, UTF8_SHOWN, "0d", "ca", now - DAY, now + 150 * DAY),
        Issued("intermediate.crt", INTERMEDIATE_DN, ROOT_DN, "8a:01", "intermediate", now - DAY, now + 40 * DAY),
        Issued("gw.crt", "C=CH, O=ipsec-textfile lab, CN=gw.lab", ROOT_DN, "02", "end-entity",
               now - 2 * DAY, now + 20 * DAY),
        Issued("days.crt", "C=CH, O=ipsec-textfile lab, CN=days.lab", INTERMEDIATE_DN, "03", "end-entity",
               now - 7 * DAY, now + 3 * DAY),
        Issued("expired.crt", "C=CH, O=ipsec-textfile lab, CN=expired.lab", ROOT_DN, "04", "end-entity",
               now - 30 * DAY, now - 2 * DAY),
    ]
    for cert in certs[4:]:
        name = cert.file[:-len(".crt")]
        ca = "root" if cert.issuer == ROOT_DN else "intermediate"
        extra = ["--ca"] if cert.type == "intermediate" else ["--san", cert.subject.rsplit("=", 1)[1],
                                                               "--flag", "serverAuth", "--flag", "clientAuth"]
        issue(directory, name, cert.subject, ca, cert.serial.replace(":", ""), cert.not_before, cert.not_after,
              *extra)
    if bulk:
        public = directory / "bulk.pub"
        public.write_bytes(pki("--pub", "--in", str(key(directory / "bulk.key"))))
    for n in range(bulk):
        serial = f"{0x1000 + n:04x}"
        cert = Issued(f"bulk-{n}.crt", f"C=CH, O=ipsec-textfile lab, CN=bulk CA {n}", ROOT_DN,
                      f"{serial[:2]}:{serial[2:]}", "intermediate", now - DAY, now + (30 + n % 300) * DAY)
        (directory / cert.file).write_bytes(pki(
            "--issue", "--in", str(public), "--cacert", str(directory / "root.crt"), "--cakey",
            str(directory / "root.key"), "--dn", cert.subject, "--serial", serial, "--ca",
            "--not-before", utc(cert.not_before), "--not-after", utc(cert.not_after), "--dateform", DATE_FORMAT))
        certs.append(cert)
    # The peer's, which the gateway holds once the peer has authenticated with it.
    peer = Issued("peer.crt", "C=CH, O=ipsec-textfile lab, CN=peer.lab", ROOT_DN, "05", "end-entity",
                  now - DAY, now + 300 * DAY)
    issue(directory, "peer", peer.subject, "root", peer.serial, peer.not_before, peer.not_after,
          "--san", "peer.lab", "--flag", "clientAuth")
    certs.append(peer)
    crls = [IssuedCrl("root.crl", ROOT_DN, now + 5 * DAY), IssuedCrl("intermediate.crl", INTERMEDIATE_DN, now - DAY)]
    for crl in crls:
        ca = crl.file[:-len(".crl")]
        (directory / crl.file).write_bytes(pki(
            "--signcrl", "--cacert", str(directory / f"{ca}.crt"), "--cakey", str(directory / f"{ca}.key"),
            "--this-update", utc(crl.next_update - 2 * DAY), "--next-update", utc(crl.next_update),
            "--dateform", DATE_FORMAT, *(["--serial", "04", "--reason", "superseded"] if ca == "root" else [])))
    return certs, crls


GATEWAY_CONF = """\
conn %default
    keyexchange=ikev2
    left=10.99.0.1
    right=10.99.0.2
    rightid=peer.lab
    leftsubnet=10.1.1.0/24
    rightsubnet=10.2.1.0/24

conn up
    leftcert=gw.crt
    leftid=gw.lab
    auto=start

conn days
    leftcert=days.crt
    leftid=days.lab
    auto=add

conn expired
    leftcert=expired.crt
    leftid=expired.lab
    auto=add
"""

PEER_CONF = """\
conn gw
    keyexchange=ikev2
    left=10.99.0.2
    right=10.99.0.1
    leftcert=peer.crt
    leftid=peer.lab
    rightid=gw.lab
    leftsubnet=10.2.1.0/24
    rightsubnet=10.1.1.0/24
    auto=add
"""


def install(host: lab.Host, directory: Path, certs: list[str], cacerts: list[str], crls: list[str],
            keys: list[str]) -> None:
    ipsec_d = host.workdir / "ipsec.d"
    for sub, names in (("certs", certs), ("cacerts", cacerts), ("crls", crls), ("private", keys)):
        (ipsec_d / sub).mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copy(directory / name, ipsec_d / sub / name)
    secrets = host.workdir / "ipsec.secrets"
    secrets.write_text("".join(f": RSA {name}\n" for name in keys))
    secrets.chmod(0o600)


def start_cert_lab(workdir: Path, bulk: int = 0) -> CertLab:
    """Bring up the gateway, its tunnel up established with gw.lab's certificate (and bulk
    more CAs loaded, see make_pki)."""
    now = int(time.time())
    certs, crls = make_pki(workdir / "pki", now, bulk)
    cert_lab = CertLab(lab.Lab(workdir), certs, crls)
    gateway, peer = cert_lab.lab.gateway, cert_lab.lab.peer
    gateway.environment["TZ"] = GATEWAY_TZ
    cert_lab.lab.create_network()
    try:
        gateway.write_config(GATEWAY_CONF, ["10.1.1.1/32"])
        install(gateway, workdir / "pki", ["gw.crt", "days.crt", "expired.crt"],
                ["root.crt", "intermediate.crt", "odd.crt", "latin1.crt", "utf8.crt",
                 *(f"bulk-{n}.crt" for n in range(bulk))],
                [c.file for c in crls], ["gw.key", "days.key", "expired.key"])
        # The gateway's IKE_AUTH asks for a certificate of every CA it trusts (20 bytes each):
        # past charon's 10000-byte message limit with the benchmark's bulk CAs.
        peer.write_config(PEER_CONF, ["10.2.1.1/32"], charon_options="max_packet = 262144")
        install(peer, workdir / "pki", ["peer.crt"], ["root.crt"], [], ["peer.key"])
        cert_lab.lab.start()
        lab.wait_for_status(gateway, lambda s: "up{" in s and "INSTALLED" in s, 30, "tunnel up to come up")
    except BaseException:
        cert_lab.destroy()
        raise
    return cert_lab


# ---- libreswan: the same certificates and CRLs in pluto's NSS database (UML lab)

NSS = "sql:/var/lib/ipsec/nss"
LISTING = "ipsec whack --listcerts --listcacerts --listcrls"


def start_libreswan_cert_lab(suite: str, workdir: Path
                             ) -> tuple[libreswan_lab.LibreswanLab, list[Issued], list[IssuedCrl]]:
    """libreswan_lab's gateway and peer guests (no conn), make_pki's certificates and CRLs
    imported into the gateway's NSS database while its pluto runs (it reads them live): CAs
    trusted (CT,,), the others as peers' (P,,)."""
    lab = libreswan_lab.boot(suite, workdir, "config setup\n", "config setup\n", [], [])
    try:
        certificates, crls = make_pki(lab.gateway.labdir / "pki", int(time.time()))
        imports = "".join(f"certutil -A -d {NSS} -n {c.file[:-4]} -t {'P,,' if c.type == 'end-entity' else 'CT,,'} "
                          f"-i /lab/pki/{c.file}\n" for c in certificates)
        # -B: no check of the CRL's signature or dates (one is past its next update on purpose)
        imports += "".join(f"crlutil -I -d {NSS} -B -i /lab/pki/{c.file}\n" for c in crls)
        lab.gateway.run(imports, timeout=120)
    except BaseException:
        lab.destroy()
        raise
    return lab, certificates, crls
