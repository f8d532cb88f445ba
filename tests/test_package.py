"""The Debian package (debian/): built with Debian's own tools, clean for lintian, its purge safe
in a directory another user could steer, and installed, upgraded, removed and purged on the
Debian 11, 12 and 13 gateways of tests/debian_lab.py, each with the package its own release's
tools built. `pytest -s` prints the figures."""

from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import format_datetime
from pathlib import Path

import pytest

import debian_lab
from conftest import ROOT, SCRIPT, require
from debian_lab import PACKAGE, TEXTFILE
from promfile import by_tunnel, value

POSTRM = ROOT / "debian" / "postrm"
MAN_PAGE = ROOT / "debian" / "ipsec-textfile.1"
HOST_TOOLS = ["dpkg-buildpackage", "dh", "dh_python3", "lintian", "dpkg-deb", "unshare"]
MODULE = "usr/lib/python3/dist-packages/ipsec_textfile.py"
TEXTFILE_DIR = str(Path(TEXTFILE).parent)
# Each gateway installs the package that its own release's tools built.
BUILDER_OF = {"debian11": "debian11-build", "debian12": "debian12-build", "debian13": "debian13-build",
              "debian13-default": "debian13-build"}
OURS = ["ipsec.prom", "ipsec.prom.lock", "ipsec.prom.4242.140001"]  # the file, its lock, a leftover temporary
# Names a purge must leave: node_exporter's other files, and ours only at first sight.
NOT_OURS = ["other.prom", "ipsec.prom.bak", "ipsec.prom.1.2.3", "ipsec.prom.12.", "ipsec.prom..12",
            "ipsec.prom.lock.1", "ipsec.promx"]


def missing_host_tools() -> list[str]:
    missing = [tool for tool in HOST_TOOLS if not shutil.which(tool)]
    return missing + (["root"] if os.geteuid() != 0 else [])


def bump_version(source: Path) -> str:
    """A next version on top of source's debian/changelog, as a maintainer's next upload; its number."""
    changelog = source / "debian" / "changelog"
    text = changelog.read_text()
    header = re.match(r"(\S+) \(([^)]+)\) (\S+); urgency=\S+\n", text)
    trailer = re.search(r"^ -- (.+?>)  ", text, re.MULTILINE)
    assert header and trailer, "debian/changelog's first entry"
    version = f"{header.group(2)}+next1"
    date = format_datetime(datetime.now(timezone.utc))
    changelog.write_text(f"{header.group(1)} ({version}) {header.group(3)}; urgency=medium\n\n"
                         f"  * The next version.\n\n -- {trailer.group(1)}  {date}\n\n{text}")
    return version


def deb_field(deb: Path, field: str) -> str:
    return debian_lab.run(["dpkg-deb", "--field", str(deb), field], timeout=30).strip()


# ---------------------------------------------------------------- built on this machine


@dataclass
class HostBuild:
    deb: Path
    changes: Path
    seconds: float


@pytest.fixture(scope="module")
def host_build(tmp_path_factory: pytest.TempPathFactory) -> HostBuild:
    """Source and binary packages, built as README says from a copy of the checkout."""
    require(missing_host_tools(), "building the Debian package")
    source = debian_lab.copy_checkout(tmp_path_factory.mktemp("host") / "src")
    started = time.monotonic()
    deb = debian_lab.build_package_here(source, "--build=full")
    changes = list(source.parent.glob(f"{PACKAGE}_*.changes"))
    assert len(changes) == 1
    return HostBuild(deb, changes[0], time.monotonic() - started)


def test_the_package_builds_and_lintian_finds_nothing_to_fix(host_build: HostBuild) -> None:
    # The .changes of a full build names the source package and the .deb: lintian checks both.
    proc = subprocess.run(["lintian", "--info", "--pedantic", str(host_build.changes)],
                          capture_output=True, text=True, timeout=300, check=False)
    tags = proc.stdout.splitlines()
    print(f"\nhost ({Path('/etc/debian_version').read_text().strip()}): {host_build.deb.name} built in "
          f"{host_build.seconds:.1f} s; lintian: {len(tags)} tags, "
          f"{sum(tag.startswith(('E:', 'W:')) for tag in tags)} errors or warnings")
    assert proc.returncode == 0, proc.stderr
    assert [tag for tag in tags if tag.startswith(("E:", "W:"))] == []


def test_the_package_holds_what_readme_says(host_build: HostBuild) -> None:
    deb = host_build.deb
    assert deb_field(deb, "Package") == PACKAGE
    assert deb_field(deb, "Architecture") == "all"
    assert deb_field(deb, "Depends") == "python3 (>= 3.8), python3-prometheus-client (>= 0.7.1), python3:any"
    assert deb_field(deb, "Recommends") == "prometheus-node-exporter, python3-cryptography"
    assert set(deb_field(deb, "Enhances").split(", ")) == {"strongswan-starter", "strongswan-charon",
                                                           "charon-systemd", "libreswan"}
    tree = host_build.deb.parent / "tree"
    debian_lab.run(["dpkg-deb", "--raw-extract", str(deb), str(tree)], timeout=60)
    files = {str(path.relative_to(tree)) for path in tree.rglob("*") if not path.is_dir()}
    units = {name for name in files if "/systemd/system/" in name}
    assert {Path(name).name for name in units} == {"ipsec-textfile.service", "ipsec-textfile.timer"}
    doc = f"usr/share/doc/{PACKAGE}"
    share = f"usr/share/{PACKAGE}"
    assert {"usr/bin/ipsec-textfile", MODULE, "usr/share/man/man1/ipsec-textfile.1.gz", f"{doc}/copyright",
            f"{doc}/examples/ipsec-textfile", f"{share}/ipsec-textfile.rules.yml",
            f"{share}/ipsec-textfile.rules.test.yml", f"{share}/ipsec-textfile.json"} <= files
    # The cron entry is an example only: never active beside the timer.
    assert not [name for name in files if name.startswith("etc/")]
    # The script as it is, as a module that Debian's own Python runs (whatever an admin put
    # first on PATH) from the bytecode compiled on installation.
    assert (tree / MODULE).read_text() == SCRIPT.read_text()
    launcher = (tree / "usr/bin/ipsec-textfile").read_text()
    assert launcher.startswith("#!/usr/bin/python3\n") and "\nfrom ipsec_textfile import main\n" in launcher
    assert (tree / "usr/bin/ipsec-textfile").stat().st_mode & 0o777 == 0o755
    # The unit runs the package's script and is otherwise the project's unit, unchanged.
    service = next(tree / name for name in units if name.endswith(".service")).read_text()
    project_service = (ROOT / "systemd" / "ipsec-textfile.service").read_text()
    assert service == project_service.replace("ExecStart=/usr/local/bin/", "ExecStart=/usr/bin/")
    assert "ExecStart=/usr/bin/ipsec-textfile --output " in service
    # The service has no [Install]: only the timer is enabled, and only the timer starts it.
    assert "[Install]" not in service
    postinst = (tree / "DEBIAN" / "postinst").read_text()
    assert "py3compile -p prometheus-ipsec-textfile" in postinst
    assert "deb-systemd-invoke $_dh_action 'ipsec-textfile.timer'" in postinst
    assert "ipsec-textfile.service" not in postinst


def test_the_package_version_is_the_projects() -> None:
    # A native package: debian/changelog's version is the release's, the one setup.cfg gives pip.
    changelog = re.match(r"\S+ \(([^)]+)\)", (ROOT / "debian" / "changelog").read_text())
    setup = re.search(r"^version = (\S+)$", (ROOT / "setup.cfg").read_text(), re.MULTILINE)
    assert changelog and setup
    assert changelog.group(1) == setup.group(1)


def test_the_man_page_names_every_option_and_backend_of_help() -> None:
    help_text = subprocess.run(["python3", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60,
                               check=True).stdout
    man = MAN_PAGE.read_text()
    # argparse lists each option at the start of a line, two spaces in; the page gives each its .TP entry.
    help_options = set(re.findall(r"^  (?:-\w, )?(--[a-z][a-z-]*)", help_text, re.MULTILINE))
    man_options = {name.replace("\\-", "-")
                   for name in re.findall(r"^\.TP\n\.B[IR]? (?:\\-\w \", \" )?(\\-\\-[a-z\\-]+)", man, re.MULTILINE)}
    assert len(help_options) >= 9
    assert man_options == help_options
    backends = re.search(r"--backend \{([a-z,]+)\}", help_text)
    assert backends
    assert f".BR \\-\\-backend \" \" {backends.group(1).replace(',', ' | ')}\n" in man


# ---------------------------------------------------------------- the purge's own checks

TEXTFILE_PARENT = str(Path(TEXTFILE_DIR).parent)  # /var/lib/prometheus: the prometheus user's on Debian
VICTIM = "/var/lib/victim"  # a root directory the attacker would have the purge empty


def run_postrm(setup: str, action: str = "purge") -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """debian/postrm in a private mount namespace whose /var/lib is a fresh tmpfs laid out as on Debian
    (the parent owned by another user, uid 65534), after setup; what it said, and the files left."""
    script = f"""set -e
mount -t tmpfs -o mode=0755 tmpfs /var/lib
mkdir -p {TEXTFILE_DIR} {VICTIM}
chown 65534 {TEXTFILE_PARENT}
cd {TEXTFILE_DIR} && touch {' '.join(OURS + NOT_OURS)} && cd /
cd {VICTIM} && touch {' '.join(OURS)} && cd /
{setup}
sh {POSTRM} {action}
find /var/lib -mindepth 1 \\( -type f -o -type l \\) | sort
"""
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc, set(proc.stdout.split())


def in_dir(directory: str, names: list[str]) -> set[str]:
    return {f"{directory}/{name}" for name in names}


@pytest.fixture
def postrm_tools() -> None:
    require(missing_host_tools(), "running debian/postrm in a mount namespace")


@pytest.mark.usefixtures("postrm_tools")
def test_purge_removes_our_files_and_nothing_else() -> None:
    proc, left = run_postrm("")
    assert proc.stderr == ""
    assert left == in_dir(TEXTFILE_DIR, NOT_OURS) | in_dir(VICTIM, OURS)


@pytest.mark.usefixtures("postrm_tools")
def test_purge_removes_a_linked_lock_and_not_its_target() -> None:
    _, left = run_postrm(f"ln -sf {VICTIM}/ipsec.prom {TEXTFILE_DIR}/ipsec.prom.lock")
    assert left == in_dir(TEXTFILE_DIR, NOT_OURS) | in_dir(VICTIM, OURS)


@pytest.mark.usefixtures("postrm_tools")
def test_remove_without_purge_keeps_the_file() -> None:
    _, left = run_postrm("", action="remove")
    assert left == in_dir(TEXTFILE_DIR, OURS + NOT_OURS) | in_dir(VICTIM, OURS)


@pytest.mark.usefixtures("postrm_tools")
def test_purge_follows_a_link_above_the_directory_as_the_collector_does() -> None:
    # An admin who moved /var/lib/prometheus elsewhere and linked it back: the collector writes
    # there (only the directory itself must not be a link), so the purge cleans there.
    moved = "/var/lib/elsewhere"
    _, left = run_postrm(f"mv {TEXTFILE_PARENT} {moved} && ln -s {moved} {TEXTFILE_PARENT}")
    assert left == in_dir(f"{moved}/node-exporter", NOT_OURS) | in_dir(VICTIM, OURS) | {TEXTFILE_PARENT}


UNSAFE = {
    "group-writable": (f"chmod 0775 {TEXTFILE_DIR}", "writable by group or others (mode 775)"),
    "world-writable, sticky": (f"chmod 1777 {TEXTFILE_DIR}", "writable by group or others (mode 1777)"),
    "another user's": (f"chown 65534 {TEXTFILE_DIR}", "owned by uid 65534, not root"),
    # The attack of issue 18: the parent's owner puts a link to a root directory in its place.
    "a link": (f"mv {TEXTFILE_DIR} {TEXTFILE_PARENT}/moved && ln -s {VICTIM} {TEXTFILE_DIR}",
               "is a symbolic link or not a directory"),
    "a file": (f"mv {TEXTFILE_DIR} {TEXTFILE_PARENT}/moved && touch {TEXTFILE_DIR}",
               "is a symbolic link or not a directory"),
}


@pytest.mark.usefixtures("postrm_tools")
@pytest.mark.parametrize("unsafe", list(UNSAFE))
def test_purge_leaves_a_directory_that_fails_the_collectors_checks_and_says_why(unsafe: str) -> None:
    setup, reason = UNSAFE[unsafe]
    proc, left = run_postrm(setup)
    assert f"prometheus-ipsec-textfile: leaving {TEXTFILE_DIR}/ipsec.prom* in place: " in proc.stderr
    assert reason in proc.stderr
    # Nothing removed anywhere: not in the directory, not where a link points.
    assert in_dir(VICTIM, OURS) <= left
    held = f"{TEXTFILE_PARENT}/moved" if unsafe in ("a link", "a file") else TEXTFILE_DIR
    assert in_dir(held, OURS + NOT_OURS) <= left


@pytest.mark.usefixtures("postrm_tools")
def test_purge_without_a_textfile_directory_is_quiet() -> None:
    proc, left = run_postrm(f"rm -r {TEXTFILE_DIR}")
    assert proc.stderr == ""
    assert left == in_dir(VICTIM, OURS)


# ---------------------------------------------------------------- built and installed on each release


@dataclass
class Built:
    """The package as one release's tools built it, and its next version."""

    first: Path
    second: Path
    second_version: str
    seconds: float  # the first build, from source copy to .deb


def build_twice(builder: debian_lab.Builder, cached_root: Path, scratch: Path) -> Built:
    started = time.monotonic()
    first = debian_lab.build_package_in(builder, cached_root, debian_lab.copy_checkout(scratch / "first" / "src"))
    seconds = time.monotonic() - started
    source = debian_lab.copy_checkout(scratch / "second" / "src")
    version = bump_version(source)
    return Built(first, debian_lab.build_package_in(builder, cached_root, source), version, seconds)


@pytest.fixture(scope="module")
def release_builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, concurrent.futures.Future[Built]]:
    """Every release's builds, side by side; a release that fails fails its own tests only."""
    require(debian_lab.missing_tools(), "building the package on Debian 11, 12 and 13")
    builders = list(debian_lab.BUILDERS.values())
    roots = debian_lab.build_roots(builders)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(builders))
    builds = {builder.name: pool.submit(build_twice, builder, roots[builder.name],
                                        tmp_path_factory.mktemp(builder.name)) for builder in builders}
    pool.shutdown(wait=False)
    return builds


@pytest.mark.parametrize("builder", list(debian_lab.BUILDERS))
def test_each_release_builds_the_package_with_its_own_tools(
        release_builds: dict[str, concurrent.futures.Future[Built]], host_build: HostBuild, builder: str) -> None:
    built = release_builds[builder].result()
    print(f"\n{builder} ({debian_lab.BUILDERS[builder].suite}): {built.first.name} built in {built.seconds:.1f} s")
    for field in ("Package", "Version", "Architecture", "Depends", "Recommends", "Enhances"):
        assert deb_field(built.first, field) == deb_field(host_build.deb, field), field
    assert deb_field(built.second, "Version") == built.second_version

    def contents(deb: Path) -> set[str]:
        # Each release's debhelper picks its own unit directory (/lib or /usr/lib).
        listing = debian_lab.run(["dpkg-deb", "--contents", str(deb)], timeout=30)
        return {line.split()[-1].replace("./usr/lib/systemd/", "./lib/systemd/") for line in listing.splitlines()
                if not line.startswith("d")}

    assert contents(built.first) == contents(host_build.deb)


def apt(gateway: debian_lab.Gateway, *args: str) -> str:
    """apt-get as the gateway's admin types it; stdin empty, so a question fails it."""
    return gateway.sh("env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "-y", *args, timeout=180)


def install_deb(gateway: debian_lab.Gateway, deb: Path) -> int:
    """`apt-get install ./NAME.deb` in the directory the .deb was copied to; when it began
    (CLOCK_MONOTONIC µs, systemd's clock)."""
    shutil.copy(deb, gateway.root / "var" / "tmp" / deb.name)
    began = time.monotonic_ns() // 1000
    proc = gateway.sh_process("env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y",
                              f"./{deb.name}", timeout=180, cwd="/var/tmp")
    assert proc.returncode == 0, f"apt-get install ./{deb.name} on {gateway.kind.name}:\n{proc.stdout}{proc.stderr}"
    return began


def timer_state(gateway: debian_lab.Gateway) -> tuple[str, str]:
    """(is-enabled, is-active) of the timer, as systemctl prints them."""
    enabled = gateway.sh_process("systemctl", "is-enabled", "ipsec-textfile.timer").stdout.strip()
    active = gateway.sh_process("systemctl", "is-active", "ipsec-textfile.timer").stdout.strip()
    return enabled, active


def started_by_the_timer(run: debian_lab.TimerRun) -> bool:
    """The timer fired before the run (nothing else started it), and systemd started the run on
    it: a start it makes at once, given 10 s, which a loaded 2-core machine keeps; a start by
    something else at another time falls outside."""
    return 0 < run.triggered <= run.started < run.triggered + 10_000_000


def check_served(gateway: debian_lab.Gateway, run: debian_lab.TimerRun) -> str:
    """The run succeeded and node_exporter serves what it wrote, every tunnel right; the page."""
    assert (run.status, run.result) == (0, "success")
    assert started_by_the_timer(run)
    page = gateway.scrape()
    assert by_tunnel(page, "ipsec_status") == gateway.kind.expected
    assert value(page, "ipsec_textfile_success") == 1
    assert value(page, "node_textfile_scrape_error") == 0
    return page


def our_leftovers(gateway: debian_lab.Gateway) -> list[str]:
    """Anything of the package's still on the gateway: units, their enablement, files in the textfile
    directory, the script, its documentation."""
    found = gateway.sh("find", "/etc", "/usr", "/var/lib/systemd", "-name", "*ipsec-textfile*", "-o",
                       "-name", "*ipsec_textfile*")
    found += gateway.sh("find", TEXTFILE_DIR, "-name", "ipsec.prom*")
    return sorted(found.split())


def lifecycle(gateway: debian_lab.Gateway, cached_root: Path, builds: concurrent.futures.Future[Built]) -> str:
    """Install, upgrade, remove and purge on a freshly booted gateway; asserts each step, returns its figure."""
    kind = gateway.kind.name
    built = builds.result()
    gateway.start(cached_root)
    try:
        # Install: the timer enabled and started, the service left to it.
        installed_at = install_deb(gateway, built.first)
        install_seconds = time.monotonic() - installed_at / 1e6
        assert timer_state(gateway) == ("enabled", "active")
        assert gateway.sh_process("test", "-e", "/usr/local/bin/ipsec-textfile").returncode != 0
        assert "ipsec_textfile.cpython-" in gateway.sh("ls", "/usr/lib/python3/dist-packages/__pycache__")
        assert "path=/usr/bin/ipsec-textfile " in gateway.sh(
            "systemctl", "show", "--property=ExecStart", "ipsec-textfile.service")
        now = gateway.timer_run()
        assert now.started == 0 or started_by_the_timer(now), "the service ran, and not from the timer"
        timer_started = int(gateway.sh("systemctl", "show", "--property=ActiveEnterTimestampMonotonic", "--value",
                                       "ipsec-textfile.timer"))
        first = gateway.wait_for_timer_run(after=installed_at)
        first_seconds = (first.exited - installed_at) / 1e6
        # At the first full minute after the install started the timer (at most 60 s), within its
        # RandomizedDelaySec=5s and AccuracySec=1s: the bound is the unit's own, no speed; a
        # missed first minute fires 60 s later and fails it.
        assert installed_at < timer_started < first.triggered <= timer_started + 66_000_000
        right, of = debian_lab.tunnels_right(gateway.kind.expected, by_tunnel(check_served(gateway, first),
                                                                              "ipsec_status"))
        info = debian_lab.daemon_info(gateway.scrape())
        # apt knows what the package needs: taking its library away would take it too.
        assert f"Remv {PACKAGE} " in apt(gateway, "--simulate", "remove", "python3-prometheus-client")

        # Upgrade: still enabled, and the file written afresh by the new version's timer.
        upgraded_at = install_deb(gateway, built.second)
        upgraded_wall = time.time()
        assert gateway.sh("dpkg-query", "-W", "-f", "${Version}", PACKAGE) == built.second_version
        assert timer_state(gateway) == ("enabled", "active")
        fresh = gateway.wait_for_timer_run(after=upgraded_at)
        page = check_served(gateway, fresh)
        assert value(page, "ipsec_textfile_last_run_timestamp_seconds") >= upgraded_wall - 1

        # Remove: the timer stopped and gone; the package's files gone, its purge still to come.
        apt(gateway, "remove", PACKAGE)
        assert timer_state(gateway)[1] != "active"
        # Gone with the package; Debian 11's debhelper also masks it until the purge.
        load_state = gateway.sh("systemctl", "show", "--property=LoadState", "ipsec-textfile.timer").strip()
        assert load_state in ("LoadState=not-found", "LoadState=masked")
        # Nothing scheduled (systemd may remember the unloaded timer's last run a while: --all would show it).
        assert "ipsec-textfile" not in gateway.sh("systemctl", "list-timers", "--no-legend")
        assert gateway.sh("dpkg-query", "-W", "-f", "${db:Status-Abbrev}", PACKAGE).strip() == "rc"
        assert gateway.sh_process("test", "-e", "/usr/bin/ipsec-textfile").returncode != 0
        assert "ipsec_textfile" not in gateway.sh("ls", "-a", "/usr/lib/python3/dist-packages/__pycache__")

        # Purge: nothing of ours left, not even the served file; node_exporter's other files stay.
        gateway.sh("sh", "-c", f"touch {TEXTFILE_DIR}/ipsec.prom.4242.140001 {TEXTFILE_DIR}/other.prom")
        assert gateway.sh_process("test", "-f", TEXTFILE).returncode == 0
        apt(gateway, "purge", PACKAGE)
        assert our_leftovers(gateway) == []
        assert gateway.sh_process("test", "-f", f"{TEXTFILE_DIR}/other.prom").returncode == 0
        assert gateway.sh_process("dpkg-query", "-W", PACKAGE).returncode != 0
        assert "ipsec_status" not in gateway.scrape()
        return (f"{kind} ({gateway.kind.suite}, strongSwan {info['version']}, package built by "
                f"{BUILDER_OF[kind]}): installed in {install_seconds:.1f} s, first timer run "
                f"{first_seconds:.0f} s after the install began, {right} of {of} tunnels right "
                f"(backend {info['backend']}); upgraded to "
                f"{built.second_version}: timer enabled, file rewritten {(fresh.exited - upgraded_at) / 1e6:.0f} s "
                f"later; removed: timer stopped, unit gone; purged: nothing of ours left")
    finally:
        gateway.stop()


@pytest.fixture(scope="module")
def lifecycles(release_builds: dict[str, concurrent.futures.Future[Built]],
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, concurrent.futures.Future[str]]]:
    """Every gateway kind's lifecycle, side by side: their timer waits overlap instead of adding up."""
    kinds = [debian_lab.KINDS[name] for name in BUILDER_OF]
    roots = debian_lab.build_roots(kinds)
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(kinds)) as pool:
        yield {kind.name: pool.submit(lifecycle, debian_lab.Gateway(kind, tmp_path_factory.mktemp(kind.name)),
                                      roots[kind.name], release_builds[BUILDER_OF[kind.name]])
               for kind in kinds}


@pytest.mark.parametrize("kind", list(BUILDER_OF))
def test_install_upgrade_remove_and_purge_on_a_live_gateway(
        lifecycles: dict[str, concurrent.futures.Future[str]], kind: str) -> None:
    print(f"\n{lifecycles[kind].result()}")
