"""A real strongSwan gateway and peer in two network namespaces.

Used by the test suite (and meant for the benchmark and the demo): each host is
a network namespace joined to the other by a veth pair, runs its own starter
and charon in a private mount namespace (its own /run, its own /etc/ipsec.conf,
ipsec.secrets and strongswan.conf bind-mounted from a temporary directory), and
uses charon's userspace ESP (kernel-libipsec) because the kernel has no ESP.

Needs root, iproute2, util-linux and Debian's strongSwan packages.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

STARTER = "/usr/lib/ipsec/starter"

STRONGSWAN_CONF = """\
charon {{
  {options}
  load_modular = yes
  plugins {{
    include strongswan.d/charon/*.conf
    kernel-libipsec {{
      load = yes
    }}
  }}
  filelog {{
    lab {{
      path = {log}
      default = 1
      ike = 2
      cfg = 2
    }}
  }}
}}
include strongswan.d/*.conf
"""

PSK = "ipsec-textfile-lab-psk"


def missing_tools() -> list[str]:
    """What this machine lacks to run a lab (empty when it can)."""
    missing = [t for t in ("ip", "unshare", "nsenter", "ipsec") if not shutil.which(t)]
    if not os.path.exists(STARTER):
        missing.append(STARTER)
    if os.geteuid() != 0:
        missing.append("root")
    return missing


def run(args: list[str], timeout: float = 10, check: bool = True) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{args!r} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


@dataclass
class Host:
    """One IKE daemon in its own network and mount namespace."""

    netns: str
    address: str
    workdir: Path
    process: subprocess.Popen[bytes] | None = None
    environment: dict[str, str] = field(default_factory=dict)  # for starter and charon (TZ)

    @property
    def log(self) -> Path:
        return self.workdir / "charon.log"

    @property
    def ipsec_wrapper(self) -> Path:
        """An executable that runs `ipsec ARGS` against this host's daemon."""
        return self.workdir / "ipsec"

    def write_config(
        self, ipsec_conf: str, local_addresses: list[str], ipsec_d: dict[str, str] | None = None,
        charon_options: str = "",
    ) -> None:
        """Config files for /etc/ipsec.conf, /etc/ipsec.d/NAME, secrets and strongswan.conf."""
        (self.workdir / "ipsec.d").mkdir(parents=True, exist_ok=True)
        (self.workdir / "ipsec.conf").write_text(ipsec_conf)
        for name, text in (ipsec_d or {}).items():
            (self.workdir / "ipsec.d" / name).write_text(text)
        secrets = self.workdir / "ipsec.secrets"
        secrets.write_text(f': PSK "{PSK}"\n')
        secrets.chmod(0o600)
        (self.workdir / "strongswan.conf").write_text(
            STRONGSWAN_CONF.format(log=self.log, options=charon_options))
        # Every local traffic selector needs a local address inside it.
        batch = "".join(f"addr add {addr} dev lo\n" for addr in local_addresses)
        subprocess.run(["ip", "-n", self.netns, "-batch", "-"], input=batch, text=True,
                       check=True, timeout=120)

    def start(self) -> None:
        binds = " && ".join(
            f"mount --bind {self.workdir / name} /etc/{name}"
            for name in ("ipsec.conf", "ipsec.secrets", "strongswan.conf", "ipsec.d")
        )
        script = f"mount -t tmpfs none /run && {binds} && exec ipsec start --nofork"
        self.process = subprocess.Popen(
            ["ip", "netns", "exec", self.netns,
             "unshare", "-m", "--propagation", "private", "sh", "-c", script],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, **self.environment},
        )
        wait_for(lambda: self._socket_ready(), 15, f"charon in {self.netns} to start")
        self.ipsec_wrapper.write_text(
            "#!/bin/sh\n"
            f"exec nsenter -t {self.process.pid} -m -n ipsec \"$@\"\n"
        )
        self.ipsec_wrapper.chmod(0o755)

    def _socket_ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"starter in {self.netns} exited; see {self.log}")
        if os.readlink(f"/proc/{self.process.pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt"):
            return False
        probe = subprocess.run(
            ["nsenter", "-t", str(self.process.pid), "-m", "-n", "test", "-S", "/run/charon.ctl"],
            capture_output=True, timeout=5, check=False,
        )
        return probe.returncode == 0

    def ipsec(self, *args: str, timeout: float = 10) -> str:
        return run([str(self.ipsec_wrapper), *args], timeout=timeout, check=False)

    def charon_pid(self) -> int:
        return int(run([*self.nsenter(), "cat", "/run/charon.pid"]).strip())

    @property
    def vici_socket(self) -> str:
        """This host's VICI socket, reachable from outside its mount namespace."""
        assert self.process is not None
        return f"/proc/{self.process.pid}/root/run/charon.vici"

    def nsenter(self) -> list[str]:
        """Command prefix that runs a command on this host, as if on the gateway itself."""
        assert self.process is not None
        return ["nsenter", "-t", str(self.process.pid), "-m", "-n"]

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        # Only the process group this lab started; starter stops its charon.
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=5)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


_LAB_NUMBERS = itertools.count()


@dataclass
class Lab:
    """A gateway and its peer, joined by a veth pair (10.99.0.1 <-> 10.99.0.2)."""

    workdir: Path
    # Unique per lab on this machine (interface names stay under 15 characters).
    tag: str = field(default_factory=lambda: f"itf{os.getpid()}n{next(_LAB_NUMBERS)}")
    gateway: Host = field(init=False)
    peer: Host = field(init=False)

    def __post_init__(self) -> None:
        self.gateway = Host(f"{self.tag}-gw", "10.99.0.1", self.workdir / "gw")
        self.peer = Host(f"{self.tag}-peer", "10.99.0.2", self.workdir / "peer")

    def create_network(self) -> None:
        for host in (self.gateway, self.peer):
            run(["ip", "netns", "add", host.netns])
            run(["ip", "-n", host.netns, "link", "set", "lo", "up"])
        run(["ip", "link", "add", f"{self.tag}a", "netns", self.gateway.netns,
             "type", "veth", "peer", "name", f"{self.tag}b", "netns", self.peer.netns])
        for host, dev in ((self.gateway, f"{self.tag}a"), (self.peer, f"{self.tag}b")):
            run(["ip", "-n", host.netns, "addr", "add", f"{host.address}/24", "dev", dev])
            run(["ip", "-n", host.netns, "link", "set", dev, "up"])

    def start(self) -> None:
        # The peer first: a gateway that starts early fails authentication.
        self.peer.start()
        self.gateway.start()

    def destroy(self) -> None:
        for host in (self.gateway, self.peer):
            host.stop()
            run(["ip", "netns", "del", host.netns], check=False)


def wait_for_status(
    host: Host, predicate: Callable[[str], bool], timeout: float, what: str, command: str = "statusall"
) -> str:
    """Poll the daemon's own `ipsec statusall` (or `status`) until predicate(output) holds."""
    output = ""

    def check() -> bool:
        nonlocal output
        output = host.ipsec(command, timeout=60)
        return predicate(output)

    wait_for(check, timeout, what)
    return output


# The gateway config that produces every ipsec_status value, and what each tunnel
# must report once the lab has settled.
STATES_GATEWAY_CONF = """\
# ipsec.conf of the lab gateway: one tunnel for each state the collector reports
config setup
    uniqueids = no

conn %default
    keyexchange=ikev2
    authby=secret
    left=10.99.0.1
    right=10.99.0.2
    leftid=gw
    rightid=peer
    keyingtries=%forever
    # reauthentication in 2 days: stroke prints days past 2 days (ike's below: minutes)
    ikelifetime=3d

# up, and host of every child below that shares its IKE settings
conn up
    leftsubnet=10.1.1.0/24
    rightsubnet=10.2.1.0/24
    auto=start

# a CHILD SA under the IKE SA named up[N]
conn site
    leftsubnet=10.1.2.0/24
    rightsubnet=10.2.2.0/24
    auto=start

# prefix neighbour of site: loaded, never started
conn sit
    leftsubnet=10.1.3.0/24
    rightsubnet=10.2.3.0/24
    auto=add

conn "a.b_c-d"
    leftsubnet=10.1.4.0/24
    rightsubnet=10.2.4.0/24
    auto=start

include /etc/ipsec.d/*.conf

# a template: no auto, so strongSwan ignores it
conn template
    leftsubnet=10.1.5.0/24
    rightsubnet=10.2.5.0/24

conn alsoconn
    also=template
    auto=start

# the peer accepts this identity but no CHILD SA for it
conn ike
    leftid=gw-ike
    ikelifetime=1h
    leftsubnet=10.1.7.0/24
    rightsubnet=10.3.7.0/24
    auto=start

conn ike-only
    leftid=gw-ike
    leftsubnet=10.1.8.0/24
    rightsubnet=10.3.8.0/24
    auto=add

# nobody answers at 10.99.0.3
conn connecting
    right=10.99.0.3
    leftsubnet=10.1.9.0/24
    rightsubnet=10.2.9.0/24
    auto=start

conn routed
    leftsubnet=10.1.10.0/24
    rightsubnet=10.2.10.0/24
    auto=route

conn ignored
    leftsubnet=10.1.11.0/24
    rightsubnet=10.2.11.0/24
    auto=ignore

conn passthrough
    leftsubnet=10.1.12.0/24
    rightsubnet=10.2.12.0/24
    type=passthrough
    auto=route
"""

STATES_INCLUDED_CONF = """\
conn included
    leftsubnet=10.1.6.0/24
    rightsubnet=10.2.6.0/24
    auto=start
"""

STATES_PEER_CONF = """\
conn %default
    keyexchange=ikev2
    authby=secret
    left=10.99.0.2
    right=10.99.0.1
    leftid=peer

# one wide responder conn; charon narrows it to each proposed pair
conn gw
    rightid=gw
    leftsubnet=10.2.0.0/16
    rightsubnet=10.1.0.0/16
    auto=add

# authenticates gw-ike but refuses every CHILD SA it proposes
conn gw-ike
    rightid=gw-ike
    leftsubnet=10.4.0.0/16
    rightsubnet=10.5.0.0/16
    auto=add
"""

STATES_EXPECTED = {
    "up": 0, "site": 0, "a.b_c-d": 0, "included": 0, "alsoconn": 0,
    "ike": 1,
    "sit": 2, "ike-only": 2, "routed": 2,
    "connecting": 3,
    "ignored": 4, "template": 4, "passthrough": 4,
}


def states_settled(statusall: str) -> bool:
    """Every tunnel that will come up has, and the rest have had their chance."""
    installed = statusall.count(":  INSTALLED, TUNNEL")
    return installed >= 5 and "ike[" in statusall and "ESTABLISHED" in statusall


def start_states_lab(workdir: Path) -> Lab:
    """Bring up the lab whose gateway shows every ipsec_status value."""
    lab = Lab(workdir)
    lab.create_network()
    try:
        lab.gateway.write_config(
            STATES_GATEWAY_CONF,
            [f"10.1.{n}.1/32" for n in range(1, 13)],
            {"included.conf": STATES_INCLUDED_CONF},
        )
        lab.peer.write_config(STATES_PEER_CONF, [f"10.2.{n}.1/32" for n in range(1, 13)])
        lab.start()
        wait_for_status(lab.gateway, states_settled, 30, "the states lab to settle")
    except BaseException:
        lab.destroy()
        raise
    return lab


# The same states on a gateway configured only by swanctl.conf (loaded over VICI
# with `swanctl --load-all`); its ipsec.conf has no conn, like Debian's default.
# The peer is the states lab's.
SWANCTL_GATEWAY_CONF = """\
# swanctl.conf of the lab gateway: one CHILD config for each state the collector reports
connections {
    gw {
        local_addrs = 10.99.0.1
        remote_addrs = 10.99.0.2
        # a rekey and a later reauthentication, both scheduled (charon drops a rekey due
        # after the reauthentication)
        rekey_time = 1h
        reauth_time = 2h
        local { auth = psk
                id = gw }
        remote { auth = psk
                 id = peer }
        children {
            net-up { local_ts = 10.1.1.0/24
                     remote_ts = 10.2.1.0/24
                     start_action = start }
            # never started, under an established IKE SA
            net-sibling { local_ts = 10.1.2.0/24
                          remote_ts = 10.2.2.0/24 }
        }
    }
    # the peer accepts this identity but no CHILD SA for it
    gw-ike {
        local_addrs = 10.99.0.1
        remote_addrs = 10.99.0.2
        local { auth = psk
                id = gw-ike }
        remote { auth = psk
                 id = peer }
        children {
            net-refused { local_ts = 10.1.7.0/24
                          remote_ts = 10.3.7.0/24
                          start_action = start }
        }
    }
    spare {
        local_addrs = 10.99.0.1
        remote_addrs = 10.99.0.2
        local { auth = psk
                id = gw }
        remote { auth = psk
                 id = peer }
        children {
            net-down { local_ts = 10.1.3.0/24
                       remote_ts = 10.2.3.0/24 }
        }
    }
    ondemand {
        local_addrs = 10.99.0.1
        remote_addrs = 10.99.0.2
        local { auth = psk
                id = gw }
        remote { auth = psk
                 id = peer }
        children {
            net-routed { local_ts = 10.1.10.0/24
                         remote_ts = 10.2.10.0/24
                         start_action = trap }
            net-pass { local_ts = 10.1.12.0/24
                       remote_ts = 10.2.12.0/24
                       mode = pass
                       start_action = trap }
        }
    }
    # nobody answers at 10.99.0.3
    lost {
        local_addrs = 10.99.0.1
        remote_addrs = 10.99.0.3
        keyingtries = 0
        local { auth = psk
                id = gw }
        remote { auth = psk
                 id = peer }
        children {
            net-connecting { local_ts = 10.1.9.0/24
                             remote_ts = 10.2.9.0/24
                             start_action = start }
        }
    }
}
"""

# A swanctl tunnel's IKE SA is its connection's: net-sibling is IKE-only under gw.
SWANCTL_EXPECTED = {
    "net-up": 0, "net-sibling": 1, "net-refused": 1, "net-down": 2, "net-routed": 2, "net-connecting": 3,
    "net-pass": 4,
}


def swanctl_settled(statusall: str) -> bool:
    return "net-up{" in statusall and "gw-ike[" in statusall and "ESTABLISHED" in statusall


def start_swanctl_lab(workdir: Path) -> Lab:
    """The states lab's gateway, configured through swanctl.conf and VICI alone."""
    lab = Lab(workdir)
    lab.create_network()
    try:
        lab.gateway.write_config("config setup\n", [f"10.1.{n}.1/32" for n in range(1, 13)])
        secrets = f'secrets {{\n    ike-lab {{ secret = "{PSK}" }}\n}}\n'
        (lab.gateway.workdir / "swanctl.conf").write_text(SWANCTL_GATEWAY_CONF + secrets)
        lab.peer.write_config(STATES_PEER_CONF, [f"10.2.{n}.1/32" for n in range(1, 13)])
        lab.start()
        run([*lab.gateway.nsenter(), "swanctl", "--load-all", "--noprompt",
             "--file", str(lab.gateway.workdir / "swanctl.conf")], timeout=30)
        wait_for_status(lab.gateway, swanctl_settled, 30, "the swanctl lab to settle")
    except BaseException:
        lab.destroy()
        raise
    return lab


class ViciProxy:
    """A Unix socket in front of a host's VICI socket, until closed: passes every byte on,
    counts the connections made through it, keeps what the daemon sent."""

    def __init__(self, path: Path, upstream: str) -> None:
        self.path = path
        self.upstream = upstream
        self.connections = 0
        self.from_daemon = bytearray()
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(8)
        threading.Thread(target=self.serve, daemon=True).start()

    def close(self) -> None:
        self.server.close()

    def serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.server.accept()
                self.connections += 1
                daemon = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                daemon.connect(self.upstream)
                threading.Thread(target=self.pump, args=(client, daemon, None), daemon=True).start()
                threading.Thread(target=self.pump, args=(daemon, client, self.from_daemon), daemon=True).start()

    @staticmethod
    def pump(source: socket.socket, sink: socket.socket, keep: bytearray | None) -> None:
        with contextlib.suppress(OSError):
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if keep is not None:
                    keep += data
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


ECHO_SERVER = """\
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 7))
print("ready", flush=True)
while True:
    data, sender = s.recvfrom(65535)
    s.sendto(data, sender)
"""

ECHO_CLIENT = """\
import socket, sys
local, remote, count, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((local, 0))
s.settimeout(5)
for _ in range(count):
    s.sendto(b"x" * size, (remote, 7))
    assert len(s.recv(65535)) == size
"""


def exchange_datagrams(lab: Lab, local: str, remote: str, count: int, size: int) -> None:
    """Send count UDP datagrams of size bytes from the gateway's local address to an
    echo server at the peer's remote address, through whatever tunnel covers them,
    and wait for every echo: count packets of size + 28 bytes each way."""
    server = subprocess.Popen(["ip", "netns", "exec", lab.peer.netns, "python3", "-c", ECHO_SERVER, remote],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline() == "ready\n"
        run(["ip", "netns", "exec", lab.gateway.netns, "python3", "-c", ECHO_CLIENT,
             local, remote, str(count), str(size)], timeout=30)
    finally:
        server.kill()
        server.wait()


def scale_address(side: int, i: int) -> str:
    """Tunnel i's /32 traffic selector on side 1 (gateway) or 2 (peer)."""
    return f"10.{side}{i // 62500}.{i // 250 % 250}.{i % 250 + 1}"


def start_scale_lab(workdir: Path, tunnels: int, timeout: float = 600) -> Lab:
    """A gateway with `tunnels` INSTALLED tunnels, all CHILD SAs of one IKE SA.

    The conns share their IKE settings, so charon adds each as a child of the
    first; the peer answers them all from one wide responder conn.
    """
    lab = Lab(workdir)
    lab.create_network()
    try:
        gateway = "".join(
            f"conn t{i}\n    leftsubnet={scale_address(1, i)}/32\n    rightsubnet={scale_address(2, i)}/32\n"
            for i in range(tunnels))
        lab.gateway.write_config(
            SCALE_DEFAULT.format(left="10.99.0.1", right="10.99.0.2", id="gw", peer="peer", auto="start")
            + gateway, [f"{scale_address(1, i)}/32" for i in range(tunnels)])
        lab.peer.write_config(
            SCALE_DEFAULT.format(left="10.99.0.2", right="10.99.0.1", id="peer", peer="gw", auto="add")
            + "conn gw\n    leftsubnet=10.20.0.0/14\n    rightsubnet=10.10.0.0/14\n",
            [f"{scale_address(2, i)}/32" for i in range(tunnels)])
        lab.start()
        wait_for_status(lab.gateway, lambda s: s.count("INSTALLED, TUNNEL") >= tunnels, timeout,
                        f"{tunnels} tunnels to come up", command="status")
    except BaseException:
        lab.destroy()
        raise
    return lab


SCALE_DEFAULT = """\
conn %default
    keyexchange=ikev2
    authby=secret
    left={left}
    right={right}
    leftid={id}
    rightid={peer}
    auto={auto}
"""


# IKEv1 keeps a rekeyed CHILD SA until it expires (charon.delete_rekeyed is off by default),
# so the old and the new CHILD SA of one conn are listed together: the overlap that stroke
# before strongSwan 5.3 showed under one {reqid}.
REKEY_CONF = """\
conn %default
    keyexchange=ikev1
    authby=secret
    left={left}
    right={right}
    leftid={id}
    rightid={peer}
    leftsubnet={left_net}
    rightsubnet={right_net}
    auto={auto}

conn v1
"""


def start_rekey_lab(workdir: Path) -> Lab:
    """A gateway whose IKEv1 tunnel v1 carried traffic, was rekeyed, and lists both CHILD SAs."""
    lab = Lab(workdir)
    lab.create_network()
    try:
        lab.gateway.write_config(REKEY_CONF.format(left="10.99.0.1", right="10.99.0.2", id="gw", peer="peer",
                                                   left_net="10.1.1.0/24", right_net="10.2.1.0/24",
                                                   auto="start"), ["10.1.1.1/32"])
        lab.peer.write_config(REKEY_CONF.format(left="10.99.0.2", right="10.99.0.1", id="peer", peer="gw",
                                                left_net="10.2.1.0/24", right_net="10.1.1.0/24",
                                                auto="add"), ["10.2.1.1/32"])
        lab.start()
        wait_for_status(lab.gateway, lambda s: "v1{" in s and "INSTALLED" in s, 30, "v1 to come up")
        exchange_datagrams(lab, "10.1.1.1", "10.2.1.1", 3, 100)
        run([*lab.gateway.nsenter(), "swanctl", "--rekey", "--child", "v1"], timeout=30)
        wait_for_status(lab.gateway, lambda s: len(re.findall(r"v1\{\d+\}:  [A-Z]+,", s)) == 2
                        and ":  INSTALLED," in s, 30, "v1's old and new CHILD SA to be listed")
    except BaseException:
        lab.destroy()
        raise
    return lab
