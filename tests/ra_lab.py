"""A real strongSwan remote-access gateway and its clients in two network namespaces.

Built on tests/lab.py's machinery (namespaces, one charon per host, userspace ESP).
The gateway (10.99.0.1) authenticates itself with an RSA certificate made with
`pki` and serves three `right=%any` conns, each with its own rightsourceip pool:

    rw-eap     IKEv2, clients authenticated by EAP-MSCHAPv2   pool 10.98.0.0/24
    rw-xauth   IKEv1, PSK + XAuth                             pool 10.97.0.0/24
    rw-cert    IKEv2, client certificates from the lab's CA   pool 10.96.0.0/24
    rw-swan    IKEv2 EAP-MSCHAPv2 again, but from swanctl.conf (loaded over VICI) with its
               pool swan-pool (10.95.0.0/26): VICI's get-pools lists only such pools,
               stroke only ipsec.conf's

One client charon (10.99.0.2) runs every client: one conn per client, each with its
own IKE identity (and EAP or XAuth user), `leftsourceip=%config`, so every client is
its own IKE SA from one address with its own virtual IP. eap-twice-N is a second
session of EAP user `user0`.

Needs what tests/lab.py needs, plus `pki` (strongswan-pki) and the EAP-MSCHAPv2 and
XAuth plugins (libcharon-extauth-plugins).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import lab

GATEWAY_ID = "vpn.lab"
EAP_POOL, XAUTH_POOL, CERT_POOL = "10.98.0.0/24", "10.97.0.0/24", "10.96.0.0/24"
SWAN_POOL = "swan-pool"
GATEWAY_NET = "10.77.0.0/24"  # what the clients reach through the gateway
GATEWAY_ADDRESS = "10.77.0.1"
PASSWORD = "ipsec-textfile-lab-password"
PLUGINS = ("/usr/lib/ipsec/plugins/libstrongswan-eap-mschapv2.so",
           "/usr/lib/ipsec/plugins/libstrongswan-xauth-generic.so")

GATEWAY_CONF = f"""\
# ipsec.conf of the remote-access lab gateway
config setup
    # not even an INITIAL_CONTACT ends another session of the same user
    uniqueids = never

conn %default
    left=10.99.0.1
    leftsubnet={GATEWAY_NET}
    right=%any
    auto=add

conn rw-eap
    keyexchange=ikev2
    leftcert=gw.pem
    leftid=@{GATEWAY_ID}
    leftsendcert=always
    rightid=*@eap.lab
    rightauth=eap-mschapv2
    eap_identity=%identity
    rightsourceip={EAP_POOL}

conn rw-xauth
    keyexchange=ikev1
    leftid=@{GATEWAY_ID}
    leftauth=psk
    rightauth=psk
    rightauth2=xauth
    rightsourceip={XAUTH_POOL}

conn rw-cert
    keyexchange=ikev2
    leftcert=gw.pem
    leftid=@{GATEWAY_ID}
    rightid="O=lab, CN=*"
    rightauth=pubkey
    rightsourceip={CERT_POOL}
"""

SWANCTL_CONF = f"""\
# swanctl.conf of the remote-access lab gateway, loaded with swanctl --load-all --file
connections {{
    rw-swan {{
        local_addrs = 10.99.0.1
        pools = {SWAN_POOL}
        local {{ auth = pubkey
                id = {GATEWAY_ID} }}
        remote {{ auth = eap-mschapv2
                 eap_id = %any
                 id = *@swan.lab }}
        children {{
            # kernel-libipsec has no AES-GCM, swanctl's first default
            rw-swan {{ local_ts = {GATEWAY_NET}
                      esp_proposals = aes128-sha256 }}
        }}
    }}
}}
pools {{
    {SWAN_POOL} {{ addrs = 10.95.0.0/26 }}
}}
"""

CLIENT_DEFAULT = f"""\
config setup
    uniqueids = no

conn %default
    left=10.99.0.2
    leftsourceip=%config
    right=10.99.0.1
    rightid=@{GATEWAY_ID}
    rightsubnet={GATEWAY_NET}
    auto=add
    # under load an exchange may time out: a client that gave up would never come
    keyingtries=%forever
"""


def eap_client(i: int, user: str) -> str:
    return (f"conn eap-{i}\n    keyexchange=ikev2\n    leftid=client{i}@eap.lab\n    leftauth=eap\n"
            f"    eap_identity={user}\n    rightauth=pubkey\n")


def swan_client(i: int) -> str:
    return (f"conn swan-{i}\n    keyexchange=ikev2\n    leftid=client{i}@swan.lab\n    leftauth=eap\n"
            f"    eap_identity=suser{i}\n    rightauth=pubkey\n")


def xauth_client(i: int) -> str:
    return (f"conn xauth-{i}\n    keyexchange=ikev1\n    leftid=client{i}@xauth.lab\n    leftauth=psk\n"
            f"    leftauth2=xauth\n    xauth_identity=xuser{i}\n    rightauth=psk\n")


def cert_client(i: int) -> str:
    return (f"conn cert-{i}\n    keyexchange=ikev2\n    leftcert=cert{i}.pem\n"
            f'    leftid="O=lab, CN=cert{i}"\n    rightauth=pubkey\n')


def missing_tools() -> list[str]:
    missing = lab.missing_tools()
    if not shutil.which("pki"):
        missing.append("pki")
    missing += [p for p in PLUGINS if not Path(p).exists()]
    return missing


def pki(*args: str, stdin: bytes | None = None) -> bytes:
    proc = subprocess.run(["pki", *args], input=stdin, capture_output=True, timeout=60, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"pki {' '.join(args)} failed: {proc.stderr.decode(errors='replace')}")
    return proc.stdout


def make_certificates(ca_dir: Path, subjects: dict[str, tuple[str, str, str]]) -> None:
    """A lab CA (ca.pem) and, for each NAME: (DN, SAN or "", flag), NAME.pem and NAME.key.pem."""
    ca_dir.mkdir(parents=True, exist_ok=True)
    ca_key = pki("--gen", "--type", "rsa", "--size", "2048", "--outform", "pem")
    (ca_dir / "ca.key.pem").write_bytes(ca_key)
    (ca_dir / "ca.pem").write_bytes(pki("--self", "--ca", "--lifetime", "30", "--in", str(ca_dir / "ca.key.pem"),
                                        "--type", "rsa", "--dn", "O=lab, CN=lab CA", "--outform", "pem"))
    for name, (dn, san, flag) in subjects.items():
        key = pki("--gen", "--type", "rsa", "--size", "2048", "--outform", "pem")
        (ca_dir / f"{name}.key.pem").write_bytes(key)
        request = pki("--req", "--type", "rsa", "--in", str(ca_dir / f"{name}.key.pem"), "--dn", dn,
                      *(["--san", san] if san else []), "--outform", "pem")
        (ca_dir / f"{name}.pem").write_bytes(pki(
            "--issue", "--type", "pkcs10", "--cacert", str(ca_dir / "ca.pem"), "--cakey",
            str(ca_dir / "ca.key.pem"), "--lifetime", "30", "--flag", flag, "--outform", "pem", stdin=request))


def install_credentials(host: lab.Host, ca_dir: Path, certs: list[str], secrets: str) -> None:
    """The CA into ipsec.d/cacerts, each NAME's certificate and key, and ipsec.secrets."""
    ipsec_d = host.workdir / "ipsec.d"
    for sub in ("cacerts", "certs", "private"):
        (ipsec_d / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy(ca_dir / "ca.pem", ipsec_d / "cacerts" / "ca.pem")
    for name in certs:
        shutil.copy(ca_dir / f"{name}.pem", ipsec_d / "certs" / f"{name}.pem")
        shutil.copy(ca_dir / f"{name}.key.pem", ipsec_d / "private" / f"{name}.pem")
    keys = "".join(f": RSA {name}.pem\n" for name in certs)
    path = host.workdir / "ipsec.secrets"
    path.write_text(keys + f': PSK "{lab.PSK}"\n' + secrets)
    path.chmod(0o600)


KINDS = ("eap", "xauth", "cert", "swan")  # the client charon's conns: KIND-N

# Clients that pick hostile user names: (conn, "eap" or "xauth", the name in swanctl.conf's
# syntax, where "fqdn:#HEX" is any bytes). The 10 kB XAuth user needs IKEv1: charon's
# EAP-MSCHAPv2 refuses names that long.
HOSTILE_CLIENTS = [
    ("h-quote", "eap", 'q"uote"'),
    ("h-backslash", "eap", "back\\slash\\"),
    ("h-newline", "eap", "fqdn:#" + b"new\nline\r\x1b[31m".hex()),
    ("h-bytes", "eap", "fqdn:#" + b"bad\xff\xfe\xc3bytes".hex()),
    ("h-forged", "eap", "x[99]: ESTABLISHED 1 second ago, 10.99.0.1[a]...10.99.0.9[b]"),
    ("h-long", "xauth", "L" * 10240),
    ("h-long-too", "xauth", "L" * 10239 + "M"),
]


@dataclass
class RaLab:
    lab: lab.Lab
    clients: int  # of each kind

    @property
    def gateway(self) -> lab.Host:
        return self.lab.gateway

    @property
    def client(self) -> lab.Host:
        return self.lab.peer

    def destroy(self) -> None:
        self.lab.destroy()

    def conns(self) -> list[str]:
        """Every client's conn on the client charon, but the second session eap-twice."""
        return [f"{kind}-{i}" for i in range(self.clients) for kind in KINDS]

    def wait_established(self, count: int, timeout: float = 300, command: str = "statusall") -> str:
        """The gateway's statusall (or status) once it lists count ESTABLISHED IKE SAs, each
        with its CHILD SA."""
        def settled(status: str) -> bool:
            return status.count(": ESTABLISHED ") == count and status.count(":  INSTALLED, TUNNEL") == count
        return lab.wait_for_status(self.gateway, settled, timeout, f"{count} remote-access clients", command)

    def up(self, *conns: str) -> None:
        """Start conns without waiting for each (see wait_established)."""
        for conn in conns:
            self.client.ipsec("stroke", "up-nb", conn)

    def down(self, *conns: str) -> None:
        for conn in conns:
            self.client.ipsec("down", conn, timeout=60)

    def connect_hostile(self) -> None:
        """Bring up HOSTILE_CLIENTS, loaded into the client charon over VICI."""
        conf = "connections {\n"
        for conn, kind, name in HOSTILE_CLIENTS:
            quoted = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
            auth = (f"local {{ auth = eap\n id = {conn}@eap.lab\n eap_id = {quoted} }}" if kind == "eap" else
                    f"version = 1\n local-1 {{ auth = psk\n id = {conn}@xauth.lab }}\n"
                    f"local-2 {{ auth = xauth\n xauth_id = {quoted} }}")
            remote = "pubkey" if kind == "eap" else "psk"
            conf += (f"{conn} {{\n local_addrs = 10.99.0.2\n remote_addrs = 10.99.0.1\n vips = 0.0.0.0\n {auth}\n"
                     f" remote {{ auth = {remote}\n id = {GATEWAY_ID} }}\n"
                     f" children {{ {conn} {{ remote_ts = {GATEWAY_NET}\n esp_proposals = aes128-sha256 }} }}\n}}\n")
        path = self.client.workdir / "hostile.conf"
        path.write_text(conf + "}\n")
        lab.run([*self.client.nsenter(), "swanctl", "--load-conns", "--file", str(path)], timeout=30)
        for conn, _, _ in HOSTILE_CLIENTS:
            lab.run([*self.client.nsenter(), "swanctl", "--initiate", "--child", conn, "--timeout", "20"],
                    timeout=60)

    def send_from(self, conn: str, count: int, size: int) -> str:
        """count UDP datagrams of size bytes from conn's virtual IP to an echo server on the
        gateway's network, each echoed back; the virtual IP used."""
        virtual_ip = self.virtual_ip(conn)
        server = subprocess.Popen(["ip", "netns", "exec", self.gateway.netns, "python3", "-c", lab.ECHO_SERVER,
                                   GATEWAY_ADDRESS], stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout is not None and server.stdout.readline() == "ready\n"
            lab.run(["ip", "netns", "exec", self.client.netns, "python3", "-c", lab.ECHO_CLIENT,
                     virtual_ip, GATEWAY_ADDRESS, str(count), str(size)], timeout=30)
        finally:
            server.kill()
            server.wait()
        return virtual_ip

    def virtual_ip(self, conn: str) -> str:
        """The client's own view of the virtual IP its conn was given."""
        status = self.client.ipsec("statusall", conn)
        for line in status.splitlines():
            if f"{conn}{{" in line and " === " in line:
                return line.split("===")[0].split(":")[-1].strip().split("/")[0]
        raise RuntimeError(f"{conn} has no CHILD SA: {status}")


def start_ra_lab(workdir: Path, clients: int = 20) -> RaLab:
    """The gateway and `clients` clients of each kind, plus eap-twice (a second session of
    EAP user user0 under another IKE identity), all up."""
    ra = RaLab(lab.Lab(workdir), clients)
    ra.lab.create_network()
    try:
        subjects = {"gw": (f"O=lab, CN={GATEWAY_ID}", GATEWAY_ID, "serverAuth")}
        subjects.update({f"cert{i}": (f"O=lab, CN=cert{i}", "", "clientAuth") for i in range(clients)})
        make_certificates(workdir / "ca", subjects)
        options = "dos_protection = no"
        ra.gateway.write_config(GATEWAY_CONF, [f"{GATEWAY_ADDRESS}/32"], charon_options=options)
        users = "".join(f'user{i} : EAP "{PASSWORD}"\nsuser{i} : EAP "{PASSWORD}"\n'
                        f'xuser{i} : XAUTH "{PASSWORD}"\n' for i in range(clients))
        # Any other user name too: the hostile clients (connect_hostile) pick theirs.
        users += f': EAP "{PASSWORD}"\n: XAUTH "{PASSWORD}"\n'
        install_credentials(ra.gateway, workdir / "ca", ["gw"], users)
        conf = CLIENT_DEFAULT + "".join(
            eap_client(i, f"user{i}") + xauth_client(i) + cert_client(i) + swan_client(i) for i in range(clients))
        conf += eap_client(clients, "user0").replace(f"eap-{clients}", "eap-twice")
        ra.client.write_config(conf, [], charon_options=options)
        install_credentials(ra.client, workdir / "ca", [f"cert{i}" for i in range(clients)], users)
        (ra.gateway.workdir / "swanctl.conf").write_text(SWANCTL_CONF)
        ra.gateway.start()
        lab.run([*ra.gateway.nsenter(), "swanctl", "--load-all", "--noprompt",
                 "--file", str(ra.gateway.workdir / "swanctl.conf")], timeout=30)
        ra.client.start()
        ra.up(*ra.conns(), "eap-twice")
        ra.wait_established(len(KINDS) * clients + 1)
    except BaseException:
        ra.destroy()
        raise
    return ra


SCALE_POOL = "10.64.0.0/16"  # room for the scale lab's clients


def start_scale_ra_lab(workdir: Path, clients: int, timeout: float = 900) -> RaLab:
    """A gateway with `clients` EAP-MSCHAPv2 clients connected to rw-eap, each its own IKE SA
    with its own virtual IP (for the benchmark): a concentrator's usual shape."""
    ra = RaLab(lab.Lab(workdir), clients)
    ra.lab.create_network()
    try:
        make_certificates(workdir / "ca", {"gw": (f"O=lab, CN={GATEWAY_ID}", GATEWAY_ID, "serverAuth")})
        options = "dos_protection = no"
        ra.gateway.write_config(GATEWAY_CONF.replace(EAP_POOL, SCALE_POOL), [f"{GATEWAY_ADDRESS}/32"],
                                charon_options=options)
        users = f': EAP "{PASSWORD}"\n'
        install_credentials(ra.gateway, workdir / "ca", ["gw"], users)
        conf = CLIENT_DEFAULT + "".join(eap_client(i, f"user{i}") + "    auto=start\n" for i in range(clients))
        ra.client.write_config(conf, [], charon_options=options)
        install_credentials(ra.client, workdir / "ca", [], users)
        ra.gateway.start()
        ra.client.start()
        # Polled through VICI's cheap stats: listing thousands of SAs over and over would
        # take the CPU the daemons need to bring them up.
        stats = [*ra.gateway.nsenter(), "swanctl", "--stats"]
        lab.wait_for(lambda: f"IKE_SAs: {clients} total, 0 half-open" in lab.run(stats, check=False), timeout,
                     f"{clients} IKE SAs")
        ra.wait_established(clients, 60, command="status")
    except BaseException:
        ra.destroy()
        raise
    return ra
