"""Where gateways run it: Python 3.8 to 3.13 from PyPI, and Debian's own packages without pip.

Every interpreter installs the built wheel with its dependencies in a fresh venv (pip picks
the newest prometheus_client that supports it) and runs the parser and replay
tests; the newest also runs the real-daemon tests. The oldest library versions that
distributions ship run them too, and Debian's /usr/bin/python3 runs them and the real-daemon
tests with python3-prometheus-client only. The runs go in parallel, started by the
first test that needs one.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

import lab
from conftest import FIXTURES, ROOT, require
from promfile import by_tunnel, samples

VERSIONS = ["3.8", "3.9", "3.10", "3.11", "3.12", "3.13"]
NEWEST = VERSIONS[-1]
PARSER_AND_REPLAY = ["tests/test_config.py", "tests/test_corpus.py", "tests/test_status.py",
                     "tests/test_properties.py", "tests/test_collector.py", "tests/test_security.py",
                     "tests/test_vici.py", "tests/test_faults.py", "tests/test_libreswan_status.py",
                     "tests/test_remote_access.py"]
# Tests of those files that need the strongSwan lab: with the real-daemon tests only (one lab
# at a time), and the comparison with strongSwan's `vici` package only in the main run, which
# installs it.
NEEDS_LAB = ["--deselect", "tests/test_faults.py::test_hung_charon_times_out_and_the_file_says_so"]
NEEDS_VICI_PACKAGE = ["--deselect", "tests/test_vici.py::test_live_answers_equal_strongswans_own_client"]
REAL_DAEMON = ["tests/test_lab.py"]
# The oldest library versions gateways get from their distribution, installed from PyPI
# with that distribution's Python: {run: (python, prometheus_client)}.
OLDEST_DISTRIBUTIONS = {
    "ubuntu-20.04": ("3.8", "0.7.1"),
    "debian-11": ("3.9", "0.9.0"),
}
DEBIAN_PYTHON = "/usr/bin/python3"
DEBIAN_MODULES = ["prometheus_client", "pytest", "hypothesis"]


def interpreter(version: str) -> str | None:
    """pythonX.Y: pyenv's newest X.Y.* (its root from `pyenv root` or PYENV_ROOT), else one on PATH."""
    pyenv = shutil.which("pyenv")
    root = os.environ.get("PYENV_ROOT", "")
    if pyenv:
        root = subprocess.run([pyenv, "root"], capture_output=True, text=True, timeout=30,
                              check=False).stdout.strip() or root
    found = sorted(glob.glob(f"{root}/versions/{version}.*/bin/python{version}") if root else [],
                   key=lambda path: [int(n) for n in re.findall(r"\d+", path.split("/")[-3])])
    if found:
        return found[-1]
    return shutil.which(f"python{version}")


def run_logged(log: Path, args: list[str], env: dict[str, str] | None = None) -> int:
    with log.open("a") as out:
        out.write(f"$ {' '.join(args)}\n")
        out.flush()
        return subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                              timeout=900, check=False).returncode


def pytest_env(bin_dir: Path) -> dict[str, str]:
    # The script's console entry point (or its copy) first on PATH, as on a gateway.
    return {**os.environ, "PATH": f"{bin_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "PYTHONDONTWRITEBYTECODE": "1"}


def run_steps(log: Path, steps: list[list[str]], env: dict[str, str]) -> tuple[int, Path]:
    """Each command in turn, all output in log; the first failure ends the run."""
    for step in steps:
        status = run_logged(log, step, env)
        if status != 0:
            return status, log
    return 0, log


def venv_run(python: str, work: Path, requirements: list[str], pytest_args: list[str],
             script_dir: Path | None = None) -> tuple[int, Path]:
    """A fresh venv with requirements and the test tools, then pytest_args in it.

    script_dir: where the script was copied into place; else the venv's console script serves.
    """
    venv = work / "venv"
    pip = [str(venv / "bin" / "pip"), "--disable-pip-version-check"]
    return run_steps(work / "log", [
        [python, "-m", "venv", str(venv)],
        [*pip, "install", "-q", *requirements, "pytest", "hypothesis"],
        [*pip, "list"],
        [str(venv / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args],
    ], pytest_env(script_dir or venv / "bin"))


def debian_run(work: Path) -> tuple[int, Path]:
    """No pip: Debian's python3 and packages, the script copied into place as README says."""
    return run_steps(work / "log", [[DEBIAN_PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                     *PARSER_AND_REPLAY, *NEEDS_VICI_PACKAGE, *REAL_DAEMON]],
                     pytest_env(copy_installed_script(work)))


def copy_installed_script(root: Path) -> Path:
    """`install -m 0755 ipsec_textfile.py /usr/local/bin/ipsec-textfile`, below root."""
    bin_dir = root / "usr" / "local" / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "ipsec_textfile.py", bin_dir / "ipsec-textfile")
    (bin_dir / "ipsec-textfile").chmod(0o755)
    return bin_dir


@pytest.fixture(scope="session")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Future[tuple[int, Path]]]:
    """Every run of the matrix, started at once."""
    base = tmp_path_factory.mktemp("matrix")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--disable-pip-version-check",
                    "-w", str(base / "wheel"), str(ROOT)], check=True, timeout=300, capture_output=True)
    wheel = next((base / "wheel").glob("*.whl"))
    pool = ThreadPoolExecutor(max_workers=len(VERSIONS) + len(OLDEST_DISTRIBUTIONS) + 1)
    runs: dict[str, Future[tuple[int, Path]]] = {}
    for version in VERSIONS:
        python = interpreter(version)
        if python is not None:
            work = base / version
            work.mkdir()
            tests = PARSER_AND_REPLAY + NEEDS_VICI_PACKAGE + (REAL_DAEMON if version == NEWEST else NEEDS_LAB)
            runs[version] = pool.submit(venv_run, python, work, [str(wheel)], tests)
    for name, (version, prometheus_client) in OLDEST_DISTRIBUTIONS.items():
        python = interpreter(version)
        if python is not None:
            # Those library versions from PyPI, and the script copied into place.
            work = base / name
            runs[name] = pool.submit(venv_run, python, work, [f"prometheus_client=={prometheus_client}"],
                                     PARSER_AND_REPLAY + NEEDS_VICI_PACKAGE + NEEDS_LAB, copy_installed_script(work))
    if debian_modules_missing() == []:
        (base / "debian").mkdir()
        runs["debian"] = pool.submit(debian_run, base / "debian")
    pool.shutdown(wait=False)
    return runs


def debian_modules_missing() -> list[str]:
    if not os.path.exists(DEBIAN_PYTHON):
        return [DEBIAN_PYTHON]
    probe = "import importlib.util as u, sys; print(' '.join(m for m in sys.argv[1:] if not u.find_spec(m)))"
    out = subprocess.run([DEBIAN_PYTHON, "-c", probe, *DEBIAN_MODULES], capture_output=True, text=True,
                         timeout=30, check=False, cwd="/").stdout.split()
    return [f"Debian's python3-{m.replace('_', '-')}" for m in out]


def outcome(runs: dict[str, Future[tuple[int, Path]]], key: str) -> None:
    status, log = runs[key].result(timeout=1200)
    text = log.read_text()
    assert status == 0, text[-6000:]
    assert " passed" in text and " skipped" not in text, text[-3000:]


@pytest.mark.parametrize("version", VERSIONS)
def test_python_version_from_pypi(matrix: dict[str, Future[tuple[int, Path]]], version: str) -> None:
    require([] if version in matrix else [f"python{version}"], f"the Python {version} run")
    outcome(matrix, version)


@pytest.mark.parametrize("name", OLDEST_DISTRIBUTIONS)
def test_oldest_distribution_libraries(matrix: dict[str, Future[tuple[int, Path]]], name: str) -> None:
    version = OLDEST_DISTRIBUTIONS[name][0]
    require([] if name in matrix else [f"python{version}"], f"the {name} run")
    outcome(matrix, name)


def test_debian_packages_without_pip(matrix: dict[str, Future[tuple[int, Path]]]) -> None:
    require(debian_modules_missing(), "the Debian-packages run")
    outcome(matrix, "debian")


def test_copied_script_on_debian_python_reports_the_lab(states_lab: lab.Lab, tmp_path: Path) -> None:
    require(debian_modules_missing(), "the Debian-packages run")
    script = copy_installed_script(tmp_path) / "ipsec-textfile"
    out = tmp_path / "ipsec.prom"
    # As cron runs it: the script's own #! line, Debian's python3 first on PATH.
    proc = subprocess.run([*states_lab.gateway.nsenter(), "env", "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                           str(script), "--output", str(out)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert (proc.returncode, proc.stderr) == (0, "")
    text = out.read_text()
    assert by_tunnel(text, "ipsec_status") == lab.STATES_EXPECTED
    # Debian's packages alone: auto asks charon over VICI, spoken with the standard library.
    assert samples(text)[("ipsec_daemon_info", (("backend", "vici"), ("version", "5.9.8")))] == 1


def prometheus_client_version(python: str) -> str:
    probe = "import importlib.metadata as m; print(m.version('prometheus_client'))"
    return subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=60, check=True,
                          cwd="/").stdout.strip()


def test_debian_prometheus_client_writes_what_the_newest_writes(
        matrix: dict[str, Future[tuple[int, Path]]], tmp_path: Path) -> None:
    require(debian_modules_missing(), "the Debian-packages run")
    require([] if NEWEST in matrix else [f"python{NEWEST}"], f"the Python {NEWEST} run")
    # The newest prometheus_client is the one pip chose for the newest Python's venv.
    newest = str(matrix[NEWEST].result(timeout=1200)[1].parent / "venv" / "bin" / "python")
    versions = {prometheus_client_version(python) for python in (DEBIAN_PYTHON, newest)}
    assert len(versions) == 2, f"both sides have prometheus_client {versions}: nothing compared"
    conf = FIXTURES / "states" / "etc" / "ipsec.conf"
    statusall = FIXTURES / "states" / "statusall.txt"
    args = ["--config", str(conf), "--status-file", str(statusall)]
    for python, name in ((DEBIAN_PYTHON, "debian.prom"), (newest, "newest.prom")):
        proc = subprocess.run([python, str(ROOT / "ipsec_textfile.py"), *args, "--output", str(tmp_path / name)],
                              capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 0, proc.stderr

    def content(name: str) -> list[str]:
        # All but the values that move with the clock.
        moving = ("ipsec_textfile_last_run_timestamp_seconds ", "ipsec_textfile_duration_seconds ",
                  "ipsec_daemon_uptime_seconds ")
        return [line for line in (tmp_path / name).read_text().splitlines() if not line.startswith(moving)]

    assert content("debian.prom") == content("newest.prom")
    assert len(content("newest.prom")) > 100
