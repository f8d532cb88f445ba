"""Real Debian gateways, booted with real systemd, running the collector as README installs it.

Each gateway is a Debian root (11, 12 or 13) made once by debootstrap and cached on this
machine; every boot starts from a fresh overlay of that root, so README's install steps run
on a system that has never seen the collector. The root boots with systemd-nspawn inside
tests/lab.py's gateway network namespace, its distribution's strongSwan service brings the
tunnels of the states lab up against the host's strongSwan in the peer namespace, its
prometheus-node-exporter service serves the textfile directory, and the collector runs from
its systemd timer.

Beside the gateways, a builder root of each release (Debian's build tools, no gateway) builds
the Debian package (debian/) as that release's own tools do, for tests/test_package.py.

    python3 tests/debian_lab.py --build     builds (or checks) the cached roots
    python3 tests/debian_lab.py --report    boots every gateway and prints README's figures

Needs root, debootstrap, systemd-nspawn (systemd-container), overlayfs and tests/lab.py's tools.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import fcntl
import hashlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lab
from promfile import by_tunnel, samples

REPO = Path(__file__).resolve().parent.parent
CACHE = Path("/var/cache/ipsec-textfile-lab")
SOURCES = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]

# What every gateway has besides its strongSwan and what README's install block names: a
# system that boots, node_exporter, iproute2 and kernel-libipsec (in libcharon-extra-plugins:
# this kernel has no ESP). Nothing the collector needs is here, so a dependency README forgets
# is missing on the gateway too.
SYSTEM_PACKAGES = ["systemd", "systemd-sysv", "prometheus-node-exporter", "iproute2", "libcharon-extra-plugins"]
STARTER_PACKAGES = ("strongswan-starter", "strongswan-charon", "strongswan-swanctl")
INSTALL_MARK = "<!-- install: debian"


@dataclass(frozen=True)
class Kind:
    """One kind of gateway: a Debian release and how its strongSwan is installed."""

    name: str
    suite: str
    packages: tuple[str, ...]
    service: str  # the distribution's unit that runs charon
    starter: bool  # ipsec.conf and the `ipsec` command, else swanctl.conf alone

    @property
    def include(self) -> list[str]:
        """The root's packages: README's apt-get install is then a no-op, which a gateway without
        network needs."""
        packages = {*SYSTEM_PACKAGES, *self.packages, *readme_apt_packages(readme_install_block())}
        if "python3-cryptography" in packages:
            # It depends on virtual packages (python3-cffi-backend-api-*) that debootstrap does
            # not resolve; apt would pick their provider, python3-cffi-backend.
            packages.add("python3-cffi-backend")
        return sorted(packages)

    @property
    def expected(self) -> dict[str, int]:
        """Each tunnel's ipsec_status once the states lab has settled (tests/lab.py)."""
        return lab.STATES_EXPECTED if self.starter else lab.SWANCTL_EXPECTED

    @property
    def traffic_tunnel(self) -> str:
        """The tunnel 10.1.1.0/24 === 10.2.1.0/24 in this kind's config."""
        return "up" if self.starter else "net-up"

    @property
    def cache_key(self) -> str:
        return cache_key(self.suite, self.include)

    @property
    def cached_root(self) -> Path:
        return CACHE / self.cache_key


def cache_key(suite: str, include: list[str]) -> str:
    """A changed package list is another root, built afresh."""
    digest = hashlib.sha256(f"minbase {suite} {' '.join(include)}".encode()).hexdigest()
    return f"{suite}-{digest[:12]}"


@dataclass(frozen=True)
class Builder:
    """A Debian release with Debian's package build tools and nothing else: where the package
    (debian/) is built as that release's own tools build it. The container has no network, so
    the build dependencies come in when the root is made."""

    name: str
    suite: str

    @property
    def include(self) -> list[str]:
        # build-essential: dpkg-buildpackage checks for it besides debian/control's Build-Depends.
        return sorted(["build-essential", "debhelper", "dh-python"])

    @property
    def cache_key(self) -> str:
        return cache_key(self.suite, self.include)

    @property
    def cached_root(self) -> Path:
        return CACHE / self.cache_key


BUILDERS = {f"{name}-build": Builder(f"{name}-build", suite)
            for name, suite in (("debian11", "bullseye"), ("debian12", "bookworm"), ("debian13", "trixie"))}


KINDS = {
    kind.name: kind
    for kind in (
        Kind("debian11", "bullseye", STARTER_PACKAGES, "strongswan-starter.service", True),
        Kind("debian12", "bookworm", STARTER_PACKAGES, "strongswan-starter.service", True),
        Kind("debian13", "trixie", STARTER_PACKAGES, "strongswan-starter.service", True),
        # trixie's `strongswan` as a plain `apt-get install strongswan` gives it: charon-systemd
        # and swanctl, no starter, no `ipsec` command, no ipsec.conf.
        Kind("debian13-default", "trixie", ("strongswan",), "strongswan.service", False),
    )
}


def readme_install_block(readme: Path = REPO / "README.md") -> str:
    """The ```sh block that follows README's `<!-- install: debian ... -->` line."""
    lines = readme.read_text().splitlines()
    marks = [i for i, line in enumerate(lines) if line.startswith(INSTALL_MARK)]
    if len(marks) != 1 or lines[marks[0] + 1] != "```sh" or "```" not in lines[marks[0] + 2:]:
        raise RuntimeError(f"README.md needs one line starting {INSTALL_MARK!r} followed by a ```sh block")
    start = marks[0] + 2
    return "\n".join(lines[start:lines.index("```", start)]) + "\n"


def readme_apt_packages(block: str) -> list[str]:
    """The packages the block's `apt-get install` (or `apt install`) lines name."""
    packages = []
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["sudo"]:
            words = words[1:]
        if words[:2] in (["apt-get", "install"], ["apt", "install"]):
            packages += [word for word in words[2:] if not word.startswith("-")]
    return packages


def missing_tools() -> list[str]:
    """What this machine lacks to boot the Debian gateways (empty when it can)."""
    missing = [tool for tool in ("debootstrap", "systemd-nspawn") if not shutil.which(tool)]
    missing += lab.missing_tools()
    return sorted(set(missing))


def mirror() -> str:
    """The Debian archive this machine's apt sources use (one-line or deb822 format)."""
    for path in SOURCES:
        if not path.is_file() or not (path.name == "sources.list" or path.suffix in (".list", ".sources")):
            continue
        text = path.read_text()
        uris: list[str] = re.findall(r"^\s*deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+\w+\s", text, re.MULTILINE)
        uris += re.findall(r"^URIs:\s*(\S+)", text, re.MULTILINE)
        # The main archive, not its security or updates suites, nor a third party's.
        for uri in uris:
            if uri.rstrip("/").endswith("/debian"):
                return uri
    raise RuntimeError("no Debian archive (a URI ending in /debian) in this machine's apt sources")


def run(args: list[str], timeout: float, stdin: str | None = None, cwd: Path | None = None) -> str:
    """Run args; on failure raise with what it printed, so a log says why."""
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False, input=stdin,
                          cwd=cwd)
    if proc.returncode != 0:
        raise RuntimeError(f"{args!r} failed ({proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return str(proc.stdout)


def build_root(kind: Kind | Builder, archive: str) -> Path:
    """kind's cached root, debootstrapped first if this machine has none yet.

    The build happens in a temporary directory beside the cache entry and is renamed into
    place when complete, so an interrupted build never leaves a half root to be reused.
    A lock keeps two runs from building the same root at once.
    """
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{kind.cache_key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if kind.cached_root.is_dir():
            return kind.cached_root
        for stale in CACHE.glob(f".build-{kind.cache_key}-*"):  # left by a killed build
            shutil.rmtree(stale)
        build = Path(tempfile.mkdtemp(prefix=f".build-{kind.cache_key}-", dir=CACHE))
        build.chmod(0o755)  # the root directory of a system, not a private temporary one
        try:
            run(["debootstrap", "--variant=minbase", f"--include={','.join(kind.include)}",
                 kind.suite, str(build), archive], timeout=1800)
            # Downloaded .debs are only weight in a cache that is copied for every boot.
            run(["chroot", str(build), "apt-get", "clean"], timeout=120)
            os.rename(build, kind.cached_root)
        except BaseException:
            shutil.rmtree(build, ignore_errors=True)
            raise
    return kind.cached_root


def prune_cache() -> None:
    """Remove roots (and their locks and half builds) of package lists no kind or builder has
    any more, unless a running gateway is still on one."""
    current = {kind.cache_key for kind in KINDS.values()} | {builder.cache_key for builder in BUILDERS.values()}
    mounts = Path("/proc/self/mountinfo").read_text()
    for entry in CACHE.iterdir():
        key = entry.name
        if key.startswith(".build-"):  # .build-KEY-RANDOM, RANDOM without a dash (mkdtemp)
            key = key[len(".build-"):].rsplit("-", 1)[0]
        elif key.endswith(".lock"):
            key = key[:-len(".lock")]
        if key in current or f"lowerdir={entry}" in mounts:
            continue
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def build_roots(kinds: Sequence[Kind | Builder]) -> dict[str, Path]:
    """Every kind's cached root. Builds are mostly downloads, so they run side by side."""
    archive = mirror()
    if CACHE.is_dir():
        prune_cache()
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(kinds)) as pool:
        futures = {kind.name: pool.submit(build_root, kind, archive) for kind in kinds}
        return {name: future.result() for name, future in futures.items()}


# ---------------------------------------------------------------- the Debian package

PACKAGE = "prometheus-ipsec-textfile"
# What a checkout may hold besides the project's files: caches and a pip build.
NOT_SOURCE = shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", "build", ".pytest_cache",
                                    ".mypy_cache", ".ruff_cache", ".hypothesis")


def copy_checkout(destination: Path) -> Path:
    """The project's files at destination, as a fresh checkout has them."""
    shutil.copytree(REPO, destination, ignore=NOT_SOURCE)
    return destination


def debs(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"{PACKAGE}_*_all.deb"))


def build_package_here(source: Path, *args: str, timeout: float = 600) -> Path:
    """README's build command (dpkg-buildpackage -us -uc, -b unless args say otherwise) run in
    source, a checkout whose parent holds nothing else; the .deb it left beside source."""
    run(["dpkg-buildpackage", "-us", "-uc", *(args or ("-b",))], timeout=timeout, cwd=source)
    built = debs(source.parent)
    if len(built) != 1:
        raise RuntimeError(f"expected one .deb beside {source}, found {built}")
    return built[0]


def build_package_in(builder: Builder, cached_root: Path, source: Path, timeout: float = 600) -> Path:
    """The same command in builder's release: its root, read-only under a throwaway overlay, with
    no network; source's parent is the one directory shared with this machine."""
    run(["systemd-nspawn", "--register=no", "--keep-unit", "-q", "-D", str(cached_root),
         "--volatile=overlay", "--private-network", f"--bind={source.parent}:/build",
         f"--chdir=/build/{source.name}", "--setenv=LC_ALL=C.UTF-8",
         "dpkg-buildpackage", "-us", "-uc", "-b"], timeout=timeout)
    built = debs(source.parent)
    if len(built) != 1:
        raise RuntimeError(f"expected one .deb from {builder.name}, found {built}")
    return built[0]


# ---------------------------------------------------------------- one booted gateway

NODE_EXPORTER = "127.0.0.1:9100"  # in the gateway's own network namespace
TEXTFILE = "/var/lib/prometheus/node-exporter/ipsec.prom"
CHECKOUT = "/root/ipsec-textfile"  # where the gateway's admin unpacked the project
# A login shell's PATH on Debian: commands inside run as the gateway's root would.
ENVIRONMENT = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
               "HOME": "/root"}


def upstream_version(debian_version: str) -> str:
    """5.9.8 of Debian's 5.9.8-5+deb12u1 (and of an epoch's 1:5.9.8-5)."""
    return debian_version.split(":", 1)[-1].split("-", 1)[0]


def tunnels_right(expected: dict[str, int], got: dict[str, float]) -> tuple[int, int]:
    """(right, of): a tunnel missing from either side counts, and counts as wrong."""
    names = expected.keys() | got.keys()
    return sum(name in got and got[name] == expected.get(name) for name in names), len(names)


def daemon_info(text: str) -> dict[str, str]:
    """The labels of the one ipsec_daemon_info sample in an exposition."""
    infos = [dict(labels) for (name, labels), _ in samples(text).items() if name == "ipsec_daemon_info"]
    if len(infos) != 1:
        raise ValueError(f"{len(infos)} ipsec_daemon_info samples")
    return infos[0]


def settled(kind: Kind, status: str) -> bool:
    """The daemon's own status shows every tunnel that will come up, up."""
    if kind.starter:
        return lab.states_settled(status)
    # `swanctl --list-sas`: the IKE SA gw-ike (refused its CHILD SA) and net-up's CHILD SA.
    return bool(re.search(r"^gw-ike: #\d+, ESTABLISHED", status, re.MULTILINE)
                and re.search(r"^  net-up: #\d+, reqid \d+, INSTALLED", status, re.MULTILINE))


# systemctl prints a timer's monotonic times as a time span ("6min 43.020516s"), its
# service's as µs; the units of systemd's format_timespan().
TIMESPAN_UNITS_US = {"y": 31_557_600_000_000, "month": 2_629_800_000_000, "w": 604_800_000_000,
                     "d": 86_400_000_000, "h": 3_600_000_000, "min": 60_000_000, "s": 1_000_000,
                     "ms": 1_000, "us": 1, "\u03bcs": 1}


def timespan_us(text: str) -> int:
    """µs in a systemctl time span; 0 for a timer that never fired."""
    if text.strip() in ("", "0"):
        return 0
    parts = re.findall(r"(\d+(?:\.\d+)?)([a-z\u03bc]+)", text)
    if not parts:
        raise ValueError(f"not a systemd time span: {text!r}")
    return round(sum(float(number) * TIMESPAN_UNITS_US[unit] for number, unit in parts))


# systemd's own exit statuses for a service it could not set up (EXIT_CHDIR 200 to
# EXIT_CREDENTIALS 243, systemd.exec(5)): the command never ran.
SYSTEMD_SETUP_FAILURES = range(200, 244)


@dataclass
class TimerRun:
    """One finished run of ipsec-textfile.service, as systemd tells it (times: CLOCK_MONOTONIC, µs)."""

    started: int
    exited: int
    status: int
    result: str
    triggered: int  # when ipsec-textfile.timer last fired


class Gateway:
    """A Debian root booted with systemd in tests/lab.py's gateway namespace, its peer the host's
    strongSwan. start() leaves it with its tunnels settled and the collector not yet installed."""

    def __init__(self, kind: Kind, workdir: Path) -> None:
        self.kind = kind
        self.workdir = workdir
        self.lab = lab.Lab(workdir / "lab")
        self.root = workdir / "root"
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.leader = 0  # the container's systemd, as the host sees it
        self.settled_at = 0  # CLOCK_MONOTONIC µs when the tunnels were seen settled

    # -- life cycle

    def start(self, cached_root: Path, timeout: float = 120) -> None:
        try:
            self.lab.create_network()
            self._mount_fresh_root(cached_root)
            self._configure()
            addresses = "".join(f"addr add 10.1.{n}.1/32 dev lo\n" for n in range(1, 13))
            run(["ip", "-n", self.lab.gateway.netns, "-batch", "-"], timeout=30, stdin=addresses)
            # The peer first: a gateway that starts early fails authentication.
            self.lab.peer.write_config(lab.STATES_PEER_CONF, [f"10.2.{n}.1/32" for n in range(1, 13)])
            self.lab.peer.start()
            self._boot(timeout)
            lab.wait_for(lambda: settled(self.kind, self.daemon_status()), 60,
                         f"the tunnels of {self.kind.name} to settle")
            self.settled_at = time.monotonic_ns() // 1000
        except BaseException:
            self.stop()
            raise

    def _mount_fresh_root(self, cached_root: Path) -> None:
        """An overlay on the cached root: this boot's changes go to a scratch upper layer."""
        for name in ("upper", "work", "root"):
            (self.workdir / name).mkdir(parents=True)
        run(["mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={cached_root},upperdir={self.workdir / 'upper'},workdir={self.workdir / 'work'}",
             str(self.root)], timeout=30)

    def _configure(self) -> None:
        """What the gateway's admin set up before the collector: tunnels, kernel-libipsec,
        node_exporter on a loopback port; and the project's files, unpacked in root's home."""
        etc = self.root / "etc"
        if self.kind.starter:
            (etc / "ipsec.conf").write_text(lab.STATES_GATEWAY_CONF)
            (etc / "ipsec.d" / "included.conf").write_text(lab.STATES_INCLUDED_CONF)
            (etc / "ipsec.secrets").write_text(f': PSK "{lab.PSK}"\n')
            (etc / "ipsec.secrets").chmod(0o600)
        else:
            secrets = f'secrets {{\n    ike-lab {{ secret = "{lab.PSK}" }}\n}}\n'
            conf = etc / "swanctl" / "conf.d" / "lab.conf"
            conf.write_text(lab.SWANCTL_GATEWAY_CONF + secrets)
            conf.chmod(0o600)
        # This kernel has no ESP: charon's userspace ESP carries the traffic.
        libipsec = etc / "strongswan.d" / "charon" / "kernel-libipsec.conf"
        text, loads = re.subn(r"^(\s*)load = .*$", r"\1load = yes", libipsec.read_text(), count=1,
                              flags=re.MULTILINE)
        if not loads:
            raise RuntimeError(f"no `load =` line in {libipsec.name} of {self.kind.name}")
        libipsec.write_text(text)
        with open(etc / "default" / "prometheus-node-exporter", "a") as defaults:
            defaults.write(f'\n# ipsec-textfile lab: serve on loopback only\nARGS="--web.listen-address={NODE_EXPORTER}"\n')
        shutil.copytree(REPO, self.root / CHECKOUT.lstrip("/"), ignore=shutil.ignore_patterns(
            ".*", "__pycache__", "*.egg-info", "build", "tests"))

    def _boot(self, timeout: float) -> None:
        with open(self.workdir / "console.log", "wb") as console:
            self.nspawn = subprocess.Popen(
                ["systemd-nspawn", "--register=no", "--keep-unit", "-q", "-D", str(self.root), "-b",
                 f"--machine={self.lab.tag}-{self.kind.name}",
                 f"--network-namespace-path=/run/netns/{self.lab.gateway.netns}",
                 "--bind=/dev/net/tun", "--capability=CAP_NET_ADMIN,CAP_NET_RAW"],
                stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT, start_new_session=True,
            )
        lab.wait_for(self._manager_answers, 30, f"{self.kind.name}'s systemd to start")
        # `--wait` returns once boot has finished: running, or degraded if a unit failed.
        state = self.sh("systemctl", "is-system-running", "--wait", check=False, timeout=timeout).strip()
        if state not in ("running", "degraded"):
            raise RuntimeError(f"{self.kind.name} booted to {state!r}; see {self.workdir / 'console.log'}")
        self.sh("systemctl", "is-active", self.kind.service, "prometheus-node-exporter.service")

    def _manager_answers(self) -> bool:
        """The container's PID 1 is the child of the systemd-nspawn started here; systemctl
        reaches it once it runs systemd and has opened its private socket."""
        assert self.nspawn is not None
        if self.nspawn.poll() is not None:
            raise RuntimeError(f"systemd-nspawn exited ({self.nspawn.returncode}); "
                               f"see {self.workdir / 'console.log'}")
        children = Path(f"/proc/{self.nspawn.pid}/task/{self.nspawn.pid}/children").read_text().split()
        for child in children:
            try:
                if (Path(f"/proc/{child}/comm").read_text().strip() == "systemd"
                        and Path(f"/proc/{child}/root/run/systemd/private").is_socket()):
                    self.leader = int(child)
                    return True
            except FileNotFoundError:  # a short-lived helper
                continue
        return False

    def stop(self) -> None:
        """Shut the container down by the systemd-nspawn started here, then remove what start() made."""
        if self.nspawn is not None and self.nspawn.poll() is None:
            # systemd-nspawn passes SIGTERM on as a clean shutdown of the container.
            self.nspawn.send_signal(signal.SIGTERM)
            try:
                self.nspawn.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.nspawn.pid, signal.SIGKILL)
                self.nspawn.wait(timeout=10)
        if self.root.is_mount():
            run(["umount", str(self.root)], timeout=30)
        self.lab.destroy()
        for name in ("upper", "work"):
            shutil.rmtree(self.workdir / name, ignore_errors=True)

    # -- inside the gateway

    def sh(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        """Run a command on the gateway as its root would: every namespace of its systemd."""
        proc = self.sh_process(*args, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{args!r} on {self.kind.name} failed ({proc.returncode}):\n"
                               f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
        return proc.stdout

    def sh_process(self, *args: str, timeout: float = 60, cwd: str = "/") -> subprocess.CompletedProcess[str]:
        # nsenter's own --wd would look the directory up on the host, so the gateway's env does.
        return subprocess.run(["nsenter", "-t", str(self.leader), "-a", "env", f"--chdir={cwd}", *args],
                              capture_output=True, text=True, timeout=timeout, check=False,
                              stdin=subprocess.DEVNULL, env=ENVIRONMENT)

    def daemon_status(self) -> str:
        if self.kind.starter:
            return self.sh("ipsec", "statusall", check=False)
        return self.sh("swanctl", "--list-sas", check=False)

    def strongswan_version(self) -> str:
        """The upstream version of the strongSwan this root's packages hold."""
        return upstream_version(self.sh("dpkg-query", "-W", "-f", "${Version}", "libstrongswan"))

    def install(self) -> subprocess.CompletedProcess[str]:
        """README's install block, verbatim, as root in the unpacked project, stopping at the first
        failing line. stdin is empty: a prompt (apt wanting to fetch something) fails the block."""
        return self.sh_process("sh", "-e", "-x", "-c", readme_install_block(), timeout=120, cwd=CHECKOUT)

    def timer_run(self) -> TimerRun:
        """The service's last run and the timer's last firing, asked in one systemctl call so that
        the two belong together."""
        output = self.sh("systemctl", "show", "ipsec-textfile.service", "ipsec-textfile.timer",
                         "--property=ExecMainStartTimestampMonotonic,ExecMainExitTimestampMonotonic,"
                         "ExecMainStatus,Result,LastTriggerUSecMonotonic")
        # One block per unit, in the order asked; a unit shows only the properties it has.
        service, timer = (dict(line.split("=", 1) for line in block.splitlines())
                          for block in output.strip().split("\n\n"))
        return TimerRun(int(service["ExecMainStartTimestampMonotonic"]),
                        int(service["ExecMainExitTimestampMonotonic"]), int(service["ExecMainStatus"]),
                        service["Result"], timespan_us(timer["LastTriggerUSecMonotonic"]))

    def wait_for_timer_run(self, after: int, timeout: float = 150) -> TimerRun:
        """The first run of the service that started after `after` (CLOCK_MONOTONIC µs), has
        finished, and reached the collector. The timer fires every minute; nothing here starts
        the service.

        A run that systemd itself failed to set up (one of its own exit codes, such as 219 for
        the cgroup, seen once in this container under load) never reached the collector: the
        next minute's run is waited for. A unit that always fails that way times out.
        """
        found: list[TimerRun] = []
        since = after

        def finished() -> bool:
            nonlocal since
            run_ = self.timer_run()
            if run_.started > since and run_.exited > run_.started:
                if run_.status in SYSTEMD_SETUP_FAILURES:
                    print(f"\n{self.kind.name}: systemd could not start a timer run (status {run_.status}); "
                          "waiting for the next")
                    since = run_.started
                else:
                    found.append(run_)
            return bool(found)

        lab.wait_for(finished, timeout, f"a timer run of ipsec-textfile on {self.kind.name}")
        return found[0]

    def collector(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The installed collector, run by hand on the gateway."""
        return self.sh_process("ipsec-textfile", *args)

    # -- from the network

    def scrape(self) -> str:
        """node_exporter's page, fetched inside the gateway's network namespace."""
        fetch = ("import sys, urllib.request\n"
                 f"sys.stdout.write(urllib.request.urlopen('http://{NODE_EXPORTER}/metrics', timeout=10)"
                 ".read().decode())\n")
        return run(["ip", "netns", "exec", self.lab.gateway.netns, sys.executable, "-c", fetch], timeout=30)

    def exchange_datagrams(self, count: int, size: int) -> None:
        """UDP through the tunnel 10.1.1.0/24 === 10.2.1.0/24, to an echo server on the peer."""
        lab.exchange_datagrams(self.lab, "10.1.1.1", "10.2.1.1", count, size)


# ---------------------------------------------------------------- README's figures


def figure(gateway: Gateway, cached_root: Path) -> str:
    """Boot, install per README, and tell what node_exporter serves after the timer's first run."""
    kind = gateway.kind
    gateway.start(cached_root)
    try:
        installed = gateway.install()
        if installed.returncode != 0:
            return f"{kind.name}: README's install block failed:\n{installed.stderr}"
        timer_run = gateway.wait_for_timer_run(after=gateway.settled_at)
        page = gateway.scrape()
        right, of = tunnels_right(kind.expected, by_tunnel(page, "ipsec_status"))
        info = daemon_info(page)
        by_hand = []
        for backend in ("stroke", "vici") if kind.starter else ("vici",):
            proc = gateway.collector("--backend", backend, "--output", "-")
            hand_right, hand_of = tunnels_right(kind.expected, by_tunnel(proc.stdout, "ipsec_status"))
            by_hand.append(f"{backend} {hand_right}/{hand_of}" if proc.returncode == 0
                           else f"{backend} failed: {proc.stderr.strip()}")
        return (f"{kind.name} ({kind.suite}, strongSwan {info['version']}, {kind.service}): "
                f"{right} of {of} tunnels right from the timer (exit {timer_run.status}, "
                f"backend {info['backend']}); by hand: {', '.join(by_hand)}")
    finally:
        gateway.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--build", action="store_true",
                        help="build the cached roots this machine lacks (gateways and builders)")
    action.add_argument("--report", action="store_true", help="boot the gateways and print their figures")
    parser.add_argument("kinds", nargs="*", metavar="KIND",
                        help=f"some of {', '.join(KINDS)}, and for --build {', '.join(BUILDERS)} (default: all)")
    args = parser.parse_args()
    known: dict[str, Kind | Builder] = {**KINDS, **BUILDERS} if args.build else {**KINDS}
    if set(args.kinds) - known.keys():
        parser.error(f"unknown: {' '.join(sorted(set(args.kinds) - known.keys()))}")
    if missing_tools():
        sys.exit(f"missing: {', '.join(missing_tools())}")
    started = time.monotonic()
    roots = build_roots([known[name] for name in args.kinds or known])
    if args.build:
        for name, root in roots.items():
            print(f"{name}: {root}")
    else:
        kinds = [KINDS[name] for name in args.kinds or KINDS]
        with tempfile.TemporaryDirectory(prefix="debian-lab-") as scratch, \
                concurrent.futures.ThreadPoolExecutor(max_workers=len(kinds)) as pool:
            lines = pool.map(lambda kind: figure(Gateway(kind, Path(scratch) / kind.name), roots[kind.name]),
                             kinds)
            print("\n".join(lines))
    print(f"({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
