"""A real libreswan gateway and peer, each a User-Mode Linux guest.

This kernel has XFRM but no ESP, and libreswan has no userspace ESP, so pluto
runs inside UML guests (Debian's user-mode-linux kernel, which has esp4 and the
crypto as modules). Each guest sits in its own network namespace; its network
card is a raw socket on that namespace's end of a veth pair. Its root is a
Debian root built once with debootstrap (libreswan, Python and its
prometheus_client from that release), mounted over hostfs read-only; the repo is
mounted at /repo and a per-guest host directory writable at /lab.

Commands run in a guest through /lab/cmd: the host drops NAME.sh there, the
guest's init runs it and leaves NAME.sh.out and NAME.sh.rc (pluto's control
socket answers only inside the guest).

Cached under CACHE (never the host's apt state): the UML kernel, its modules and
the glibc it needs (`apt-get download` + `dpkg -x`), and one root per suite, each
built under a lock. Needs root, iproute2, debootstrap, dpkg, apt-get and patchelf.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lab import run, wait_for

CACHE = Path("/var/cache/ipsec-textfile-libreswan")
MIRROR = "http://deb.debian.org/debian"
SUITES = {"bookworm": "4.10", "trixie": "5.2"}  # Debian release: its libreswan
# bind9-host: libreswan depends on the virtual "host", which debootstrap does not resolve.
# The guests' kernel: sid's user-mode-linux (7.2 when first fetched) boots on every CPU
# here; bookworm's 6.1 and trixie's 6.12 panic at init on CPUs with AMX ("ptrace set fp
# regs failed"). It needs a newer glibc than bookworm's, so sid's libc6 comes along.
UML_SUITE = "sid"
UML_PACKAGES = ["user-mode-linux", "libc6"]
ROOT_PACKAGES = ["libreswan", "bind9-host", "python3", "python3-prometheus-client", "iproute2", "kmod", "iputils-ping",
                 "procps", "libnss3-tools"]
REPO = Path(__file__).resolve().parent.parent
PSK = "ipsec-textfile-libreswan-lab"
# Modules pluto's IPsec SAs need (the kernel has none of them built in).
MODULES = ["esp4", "xfrm4_tunnel", "xfrm_user", "tunnel4", "xfrm_ipcomp", "authenc", "authencesn", "echainiv",
           "seqiv", "gcm", "ctr", "cbc", "aes", "sha256", "sha512", "hmac", "chacha20poly1305", "cmac", "xcbc"]

# Runs as the guest's PID 1 (written into each root when it is built): the host
# directory named by the kernel's labdir= parameter (init's environment) becomes
# /lab, and /lab/init takes over.
BOOTSTRAP = """\
#!/bin/sh
# hostfs takes its host path as one legacy option string: trixie's mount(8) would split
# it into fsconfig() keys, which the new kernels' hostfs rejects.
export LIBMOUNT_FORCE_MOUNT2=always
mount -t proc proc /proc
mount -t hostfs none /lab -o "$labdir"
exec /bin/sh /lab/init
"""

GUEST_INIT = """\
#!/bin/sh
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t sysfs sys /sys
for dir in /run /tmp /var/lib/ipsec /var/log; do mount -t tmpfs tmpfs $dir; done
mount -t hostfs none /repo -o {repo},ro
mount -t hostfs none /uml -o {modules},ro
for f in ipsec.conf ipsec.secrets; do mount --bind /lab/etc/$f /etc/$f; done
# The kernel loads what else it needs (crypto templates) through this wrapper.
printf '#!/bin/sh\nexec /sbin/modprobe -d /uml "$@"\n' > /run/modprobe
chmod 755 /run/modprobe
echo /run/modprobe > /proc/sys/kernel/modprobe
for m in {modules_list}; do modprobe -d /uml $m 2>/dev/null; done
ip link set lo up
ip link set vec0 up
ip addr add {address}/24 dev vec0
ip route add 10.0.0.0/8 via {other} dev vec0
{extra_addresses}
mkdir -p /var/lib/ipsec/nss /run/pluto
certutil -N -d sql:/var/lib/ipsec/nss --empty-password
/usr/libexec/ipsec/pluto --config /etc/ipsec.conf --nofork --stderrlog >/lab/pluto.log 2>&1 &
echo booted > /lab/booted
while :; do
  for f in /lab/cmd/*.sh; do
    [ -e "$f" ] || continue
    sh "$f" > "$f.out" 2>&1
    echo $? > "$f.rc.tmp"
    mv "$f.rc.tmp" "$f.rc"
    mv "$f" "$f.done"
  done
  sleep 0.05
done
"""


def missing_tools() -> list[str]:
    """What this machine lacks to run the libreswan lab (empty when it can)."""
    missing = [t for t in ("ip", "debootstrap", "dpkg", "apt-get", "patchelf") if not shutil.which(t)]
    return missing + ([] if os.geteuid() == 0 else ["root"])


@contextmanager
def cache_lock(name: str) -> Iterator[None]:
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@dataclass(frozen=True)
class Kernel:
    """A UML kernel ready to run: the command that starts it and the tree modprobe -d needs."""

    linux: Path
    modules: Path  # lib/modules/VERSION lies below it
    versions: str  # the packages it came from, "name version" a line


def _private_apt(base: Path, suite: str) -> list[str]:
    """apt-get options for a sources list of our own: the host's apt state is never touched."""
    for sub in ("lists/partial", "archives/partial", "parts"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
    (base / "sources.list").write_text(f"deb [signed-by={keyring}] {MIRROR} {suite} main\n")
    return ["-o", f"Dir::Etc::sourcelist={base / 'sources.list'}", "-o", f"Dir::Etc::sourceparts={base / 'parts'}",
            "-o", f"Dir::State::lists={base / 'lists'}", "-o", f"Dir::Cache={base}",
            "-o", "Dir::State::status=/dev/null", "-o", "APT::Sandbox::User=root", "-qq"]


def _key(kind: str, suite: str, packages: list[str]) -> str:
    """A cache entry's name: what it holds and a digest of what it was fetched from."""
    return f"{kind}-{suite}-" + hashlib.sha256(f"{MIRROR} {suite} {' '.join(packages)}".encode()).hexdigest()[:16]


def kernel_key() -> str:
    return _key("uml", UML_SUITE, UML_PACKAGES)


def root_key(suite: str) -> str:
    return _key("root", suite, ROOT_PACKAGES)


def prune_cache() -> None:
    """Remove entries (and their locks and half builds) that no current key names: a kernel
    or root an older lab fetched is never booted again, and takes a gigabyte."""
    current = {kernel_key()} | {root_key(suite) for suite in SUITES}
    for entry in CACHE.iterdir():
        if re.sub(r"\.(?:lock|tmp)$", "", entry.name) in current:
            continue
        if entry.is_dir() and not entry.is_symlink():
            # A killed debootstrap may leave /proc mounted inside its half root: what cannot
            # be removed stays, and is tried again next time.
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink()


def kernel() -> Kernel:
    """UML_SUITE's kernel with that suite's glibc beside it, fetched and unpacked once.

    The key names the suite and the packages; VERSIONS inside says which versions the
    first fetch got (the suite moves on; a cache keeps what it booted)."""
    base = CACHE / kernel_key()
    with cache_lock(base.name):
        if not (base / "VERSIONS").exists():
            tmp = CACHE / f"{base.name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            apt = _private_apt(tmp / "apt", UML_SUITE)
            run(["apt-get", *apt, "update"], timeout=300)
            subprocess.run(["apt-get", *apt, "download", *UML_PACKAGES], cwd=tmp / "apt", check=True,
                           capture_output=True, timeout=600)
            versions = []
            for deb in sorted((tmp / "apt").glob("*.deb")):
                run(["dpkg", "-x", str(deb), str(tmp / "tree")], timeout=120)
                versions.append(run(["dpkg-deb", "-W", "--showformat=${Package} ${Version}\n", str(deb)]))
            # Its glibc, newer than some hosts', serves it alone: the kernel's loader and library
            # path point into the tree (run through that loader instead, UML's re-exec fails).
            libs = base / "tree/usr/lib/x86_64-linux-gnu"
            run(["patchelf", "--set-interpreter", str(libs / "ld-linux-x86-64.so.2"), "--set-rpath", str(libs),
                 str(tmp / "tree/usr/bin/linux.uml")])
            modules = tmp / "tree/lib/modules"
            modules.mkdir(parents=True)
            for version in (tmp / "tree/usr/lib/uml/modules").iterdir():
                (modules / version.name).symlink_to(f"../../usr/lib/uml/modules/{version.name}")
            shutil.rmtree(tmp / "apt")
            (tmp / "VERSIONS").write_text("".join(versions))
            tmp.rename(base)
    return Kernel(base / "tree/usr/bin/linux.uml", base / "tree", (base / "VERSIONS").read_text())


def guest_root(suite: str) -> Path:
    """A Debian root of that suite with libreswan, built once (2 to 3 minutes).

    Keyed by what debootstrap is asked for; the few files the lab adds are rewritten
    whenever they differ, so a root never boots an older lab's init."""
    root = CACHE / root_key(suite)
    with cache_lock(root.name):
        if not (root / "usr/libexec/ipsec/pluto").exists():
            tmp = CACHE / f"{root.name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            run(["debootstrap", "--variant=minbase", f"--include={','.join(ROOT_PACKAGES)}", suite,
                 str(tmp), MIRROR], timeout=1200)
            tmp.rename(root)
        for mount_point in ("lab", "repo", "uml"):
            (root / mount_point).mkdir(exist_ok=True)
        for config in ("etc/ipsec.conf", "etc/ipsec.secrets"):  # bind-mounted over in each guest
            (root / config).touch()
        init = root / "sbin/lab-init"
        if not init.exists() or init.read_text() != BOOTSTRAP:
            init.write_text(BOOTSTRAP)
            init.chmod(0o755)
    return root


@dataclass
class Guest:
    name: str
    netns: str
    labdir: Path
    process: subprocess.Popen[bytes] | None = None

    def run(self, script: str, timeout: float = 30, check: bool = True) -> str:
        """Run a shell script inside the guest; its output (stdout and stderr)."""
        cmd = self.labdir / "cmd"
        name = f"{time.monotonic_ns()}.sh"
        (cmd / f"{name}.tmp").write_text(script)
        (cmd / f"{name}.tmp").rename(cmd / name)
        rc = cmd / f"{name}.rc"
        wait_for(rc.exists, timeout, f"`{script.strip()}` in {self.name}")
        out = (cmd / f"{name}.out").read_text()
        status = int(rc.read_text())
        if check and status != 0:
            raise RuntimeError(f"`{script.strip()}` in {self.name} failed ({status}): {out}")
        return out

    def wait_booted(self, timeout: float) -> None:
        """Until init has started; a guest that dies or panics first fails with its console's reason."""
        console = self.labdir / "console.log"
        deadline = time.monotonic() + timeout
        while not (self.labdir / "booted").exists():
            text = console.read_text(errors="replace") if console.exists() else ""
            died = self.process is not None and self.process.poll() is not None
            if died or "Kernel panic" in text or time.monotonic() > deadline:
                lines = text.splitlines()
                # What led to a panic comes before it; the stack trace after it says little.
                panic = next((i for i, line in enumerate(lines) if "Kernel panic" in line), None)
                what = "panicked" if panic is not None else "exited" if died else f"did not boot within {timeout}s"
                shown = lines[max(0, panic - 15):panic + 1] if panic is not None else lines[-15:]
                raise RuntimeError(f"guest {self.name} {what}; {console} ends:\n" + "\n".join(shown))
            time.sleep(0.1)

    def whack(self, *args: str) -> str:
        return self.run(" ".join(["ipsec", "whack", *args]) + "\n", check=False)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)


@dataclass
class LibreswanLab:
    suite: str
    workdir: Path
    gateway: Guest
    peer: Guest

    @property
    def version(self) -> str:
        return SUITES[self.suite]

    def collect(self, *more: str) -> str:
        """The collector run inside the gateway guest, with that release's Python; the file's text."""
        self.gateway.run("python3 /repo/ipsec_textfile.py --output /lab/textfile/ipsec.prom " + " ".join(more) + "\n",
                         timeout=60)
        return (self.gateway.labdir / "textfile/ipsec.prom").read_text()

    def destroy(self) -> None:
        for guest in (self.gateway, self.peer):
            guest.stop()
        for guest in (self.gateway, self.peer):
            run(["ip", "netns", "delete", guest.netns], check=False)


_counter = itertools.count()


def boot(suite: str, workdir: Path, gateway_conf: str, peer_conf: str, gateway_extra: list[str],
         peer_extra: list[str]) -> LibreswanLab:
    """Two guests on one wire, 192.168.0.1 (gateway) and .2 (peer), each running pluto."""
    CACHE.mkdir(parents=True, exist_ok=True)
    prune_cache()
    uml = kernel()
    root = guest_root(suite)
    tag = f"lsw{os.getpid()}x{next(_counter)}"
    guests = []
    for role, address, other, conf, extra in (("gw", "192.168.0.1", "192.168.0.2", gateway_conf, gateway_extra),
                                              ("peer", "192.168.0.2", "192.168.0.1", peer_conf, peer_extra)):
        labdir = workdir / role
        for sub in ("cmd", "etc", "textfile"):
            (labdir / sub).mkdir(parents=True)
        labdir.chmod(0o755)
        (labdir / "etc/ipsec.conf").write_text(conf)
        secrets = labdir / "etc/ipsec.secrets"
        secrets.write_text(f'%any %any : PSK "{PSK}"\n')
        secrets.chmod(0o600)
        addresses = "\n".join(f"ip addr add {a} dev lo" for a in extra)
        (labdir / "init").write_text(GUEST_INIT.format(
            repo=REPO, modules=uml.modules, modules_list=" ".join(MODULES), address=address,
            other=other, extra_addresses=addresses))
        guests.append(Guest(role, f"{tag}{role}", labdir))
    gateway, peer = guests
    lab = LibreswanLab(suite, workdir, gateway, peer)
    try:
        run(["ip", "netns", "add", gateway.netns])
        run(["ip", "netns", "add", peer.netns])
        run(["ip", "link", "add", "veth-lsw", "netns", gateway.netns, "type", "veth", "peer", "name",
             "veth-lsw", "netns", peer.netns])
        for guest in guests:
            run(["ip", "-n", guest.netns, "link", "set", "veth-lsw", "up"])
            console = open(guest.labdir / "console.log", "wb")  # noqa: SIM115 (the guest keeps it)
            guest.process = subprocess.Popen(
                ["ip", "netns", "exec", guest.netns, str(uml.linux), "mem=192M", "root=/dev/root",
                 "rootfstype=hostfs", f"rootflags={root}", "ro", "init=/sbin/lab-init",
                 f"labdir={guest.labdir}", "vec0:transport=raw,ifname=veth-lsw,depth=128",
                 "con=null", "con0=null,fd:1", f"umid={guest.netns}"],
                stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT, start_new_session=True,
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "TMPDIR": str(workdir), "HOME": str(workdir)})
            console.close()
        for guest in guests:
            guest.wait_booted(60)
            wait_for(lambda g=guest: "Connection list:" in g.whack("--status"),  # type: ignore[misc]
                     30, f"pluto in {guest.name}")
    except BaseException:
        lab.destroy()
        raise
    return lab


# ---- the states lab: a gateway conn in every ipsec_status state

STATES_GATEWAY_CONF = """\
config setup
	ikev1-policy=accept

conn %default
	authby=secret
	left=192.168.0.1
	right=192.168.0.2
	keyingtries=%forever

conn up-v2
	leftsubnet=10.1.1.0/24
	rightsubnet=10.2.1.0/24
	auto=start

# same peer and ids as up-v2: its Child SA rides on up-v2's IKE SA
conn rides
	leftsubnet=10.1.9.0/24
	rightsubnet=10.2.9.0/24
	auto=start

conn up-v1
	ikev2=no
	leftsubnet=10.1.2.0/24
	rightsubnet=10.2.2.0/24
	auto=start

# the peer refuses its Child SA (other selectors): the IKE SA stays
conn ike-only
	leftid=@gw-ikeonly
	rightid=@peer-ikeonly
	leftsubnet=10.1.3.0/24
	rightsubnet=10.2.3.0/24
	auto=add

conn added
	leftsubnet=10.1.4.0/24
	rightsubnet=10.2.4.0/24
	auto=add

conn ondemand
	leftsubnet=10.1.5.0/24
	rightsubnet=10.2.5.0/24
	auto=ondemand

# triggered by traffic during the test
conn triggered
	leftsubnet=10.1.10.0/24
	rightsubnet=10.2.10.0/24
	auto=ondemand

conn silent
	right=192.168.0.99
	leftsubnet=10.1.6.0/24
	rightsubnet=10.2.6.0/24
	auto=start

conn ignored
	leftsubnet=10.1.7.0/24
	rightsubnet=10.2.7.0/24
	auto=ignore

conn shunt
	leftsubnet=10.1.8.0/24
	rightsubnet=10.2.8.0/24
	type=passthrough
	authby=never
	auto=ondemand
"""

PEER_CONNS = {"up-v2": 1, "rides": 9, "up-v1": 2, "ike-only": 3, "added": 4, "ondemand": 5, "triggered": 10}


def states_peer_conf() -> str:
    """The peer's side of STATES_GATEWAY_CONF: every conn it answers, auto=add."""
    lines = ["config setup", "\tikev1-policy=accept", "",
             "conn %default", "\tauthby=secret", "\tleft=192.168.0.2", "\tright=192.168.0.1", "\tauto=add", ""]
    for name, net in PEER_CONNS.items():
        net = 33 if name == "ike-only" else net  # selectors the gateway does not propose
        lines += [f"conn {name}", f"\tleftsubnet=10.2.{net}.0/24", f"\trightsubnet=10.1.{net}.0/24"]
        lines += ["\tikev2=no"] if name == "up-v1" else []
        lines += ["\tleftid=@peer-ikeonly", "\trightid=@gw-ikeonly"] if name == "ike-only" else []
        lines.append("")
    return "\n".join(lines)


# Each gateway conn's ipsec_status once start_states_lab returns.
STATES_EXPECTED = {"up-v2": 0, "rides": 0, "up-v1": 0, "ike-only": 1, "added": 2, "ondemand": 2, "triggered": 0,
                   "silent": 3, "ignored": 4, "shunt": 4}


def states_settled(status: str) -> bool:
    """up-v2, rides, up-v1 and triggered up, ike-only's IKE SA up, silent half-open."""
    states = [line for line in status.splitlines() if re.match(r"(?:000 )?#\d+: ", line)]
    children = sum("(established Child SA)" in s or "(IPsec SA established)" in s for s in states)
    ike_only = any('"ike-only"' in s and "(established IKE SA)" in s for s in states)
    return children >= 4 and ike_only and any('"silent"' in s and "IKE_SA_INIT" in s for s in states)


def start_states_lab(suite: str, workdir: Path) -> LibreswanLab:
    nets = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    lab = boot(suite, workdir, STATES_GATEWAY_CONF, states_peer_conf(), [f"10.1.{n}.1/32" for n in nets],
               [f"10.2.{n}.1/32" for n in nets])
    try:
        lab.peer.run("ipsec addconn --autoall && ipsec whack --listen\n")
        lab.gateway.run("ipsec addconn --autoall && ipsec whack --listen\n")
        lab.gateway.run("ipsec whack --name ike-only --initiate --asynchronous\n")
        # auto=ondemand: traffic into the trap brings it up.
        lab.gateway.run("ping -c 3 -W 2 -I 10.1.10.1 10.2.10.1 || true\n", timeout=60)
        wait_for(lambda: states_settled(lab.gateway.whack("--status")), 60, "the gateway's SAs")
    except BaseException:
        lab.destroy()
        raise
    return lab


# ---- the remote-access lab: one gateway conn per kind of client, each client an instance

# IKEv2 clients authenticate with the PSK; IKEv1 clients with the PSK and XAuth (any password:
# xauthby=alwaysok, the user name is what the collector reports). Each gets a lease.
RA_GATEWAY_CONF = """\
config setup
	ikev1-policy=accept

conn %default
	left=192.168.0.1
	leftid=@gw.lab
	leftsubnet=10.77.0.0/24
	right=%any
	leftmodecfgserver=yes
	rightmodecfgclient=yes
	authby=secret
	auto=add

conn rw
	rightaddresspool=10.79.0.10-10.79.0.50

conn xauth
	ikev2=no
	rightaddresspool=10.80.0.10-10.80.0.50
	leftxauthserver=yes
	rightxauthclient=yes
	xauthby=alwaysok
"""


def ra_peer_conf(ikev2_clients: int, xauth_clients: int) -> str:
    """The client guest: one conn per client, each with its own identity."""
    lines = ["config setup", "\tikev1-policy=accept", ""]
    for n in range(1, ikev2_clients + 1):
        lines += [f"conn client{n}", "\tleft=192.168.0.2", f"\tleftid=@client{n}.lab", "\tleftmodecfgclient=yes",
                  "\tright=192.168.0.1", "\trightid=@gw.lab", "\trightsubnet=10.77.0.0/24", "\tnarrowing=yes",
                  "\tauthby=secret", "\tauto=add", ""]
    for n in range(1, xauth_clients + 1):
        lines += [f"conn xuser{n}", "\tikev2=no", "\tleft=192.168.0.2", f"\tleftid=@xclient{n}.lab",
                  "\tleftmodecfgclient=yes", "\tleftxauthclient=yes", f"\tleftusername=xuser{n}",
                  "\tright=192.168.0.1", "\trightid=@gw.lab", "\trightsubnet=10.77.0.0/24",
                  "\tauthby=secret", "\tauto=add", ""]
    return "\n".join(lines)


def ra_clients_up(status: str, clients: int) -> bool:
    """Every client's IPsec SA established (as the gateway's --trafficstatus lists them)."""
    return len(re.findall(r'^(?:006 )?#\d+: "(?:rw|xauth)"\[\d+\]', status, re.MULTILINE)) >= clients


def start_ra_lab(suite: str, workdir: Path, ikev2_clients: int = 3, xauth_clients: int = 2) -> LibreswanLab:
    lab = boot(suite, workdir, RA_GATEWAY_CONF, ra_peer_conf(ikev2_clients, xauth_clients), ["10.77.0.1/32"], [])
    try:
        secrets = "".join(f'@xuser{n} : XAUTH "password{n}"\n' for n in range(1, xauth_clients + 1))
        lab.peer.run(f"cat >> /etc/ipsec.secrets <<'END'\n{secrets}END\nipsec whack --rereadsecrets\n")
        lab.gateway.run("ipsec addconn --autoall && ipsec whack --listen\n")
        lab.peer.run("ipsec addconn --autoall && ipsec whack --listen\n")
        names = [f"client{n}" for n in range(1, ikev2_clients + 1)] + [f"xuser{n}" for n in range(1, xauth_clients + 1)]
        for name in names:
            lab.peer.run(f"ipsec whack --name {name} --initiate --asynchronous\n")
        wait_for(lambda: ra_clients_up(lab.gateway.whack("--trafficstatus"), len(names)), 90, "every client")
    except BaseException:
        lab.destroy()
        raise
    return lab
