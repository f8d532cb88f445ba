"""What an operator installs beside the script: systemd units, cron entry, alert rules,
and the rules evaluated by a real Prometheus scraping a real node_exporter."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import lab
import prometheus_server
from conftest import BACKENDS, ROOT, require_tools, run_collector
from promfile import by_tunnel

SYSTEMD = ROOT / "systemd"
RULES = ROOT / "prometheus" / "ipsec-textfile.rules.yml"
RULE_TESTS = ROOT / "prometheus" / "ipsec-textfile.rules.test.yml"


def unit(name: str) -> configparser.ConfigParser:
    # strict=False: systemd allows a key more than once (SystemCallFilter=).
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(SYSTEMD / name)
    return parser


# ---------------------------------------------------------------- systemd


@pytest.fixture
def unit_root(tmp_path: Path) -> Path:
    """A root directory with the units installed as README says, for systemd-analyze --root."""
    require_tools("systemd-analyze", what="unit checks")
    (tmp_path / "etc" / "systemd" / "system").mkdir(parents=True)
    for name in ("ipsec-textfile.service", "ipsec-textfile.timer"):
        shutil.copy(SYSTEMD / name, tmp_path / "etc" / "systemd" / "system" / name)
    # The command it starts, where README installs it; systemd's own units from the host.
    script = tmp_path / "usr" / "local" / "bin" / "ipsec-textfile"
    script.parent.mkdir(parents=True)
    shutil.copy(ROOT / "ipsec_textfile.py", script)
    script.chmod(0o755)
    (tmp_path / "usr" / "lib" / "systemd").mkdir(parents=True)
    (tmp_path / "usr" / "lib" / "systemd" / "system").symlink_to("/usr/lib/systemd/system")
    return tmp_path


def test_units_pass_systemd_analyze_verify(unit_root: Path) -> None:
    proc = subprocess.run(["systemd-analyze", "verify", f"--root={unit_root}",
                           "ipsec-textfile.service", "ipsec-textfile.timer"],
                          capture_output=True, text=True, timeout=60, check=False)
    # The host's own units, seen through the symlink, may not resolve inside the root.
    said = [line for line in (proc.stdout + proc.stderr).splitlines()
            if line and not line.startswith("Failed to resolve symlink")]
    assert (proc.returncode, said) == (0, [])


def test_service_exposure_is_safe(unit_root: Path) -> None:
    proc = subprocess.run(["systemd-analyze", "security", "--offline=yes", f"--root={unit_root}",
                           "ipsec-textfile.service"],
                          capture_output=True, text=True, timeout=60, check=False)
    score = re.search(r"Overall exposure level for ipsec-textfile.service: ([\d.]+) (\w+)", proc.stdout)
    assert score is not None, proc.stdout + proc.stderr
    # README records 0.9: the one point left is UMask=0022, which node_exporter needs.
    assert float(score.group(1)) <= 1.0 and score.group(2) == "SAFE"


def test_service_writes_only_where_it_is_told_to() -> None:
    service = unit("ipsec-textfile.service")["Service"]
    args = service["ExecStart"].split()
    output = Path(args[args.index("--output") + 1])
    assert service["ReadWritePaths"] == str(output.parent)
    assert service["ProtectSystem"] == "strict" and service["UMask"] == "0022"
    assert service["Type"] == "oneshot"
    timer = unit("ipsec-textfile.timer")["Timer"]
    assert timer["Persistent"] == "true"
    # A run must end before the next one starts.
    assert int(service["TimeoutStartSec"]) < 60


def test_cron_entry_runs_every_minute_into_the_same_file() -> None:
    entry = [line for line in (ROOT / "cron" / "ipsec-textfile").read_text().splitlines()
             if line and not line.startswith("#") and "=" not in line.split()[0]]
    assert len(entry) == 1
    fields = entry[0].split()
    assert fields[:6] == ["*", "*", "*", "*", "*", "root"]
    service = unit("ipsec-textfile.service")["Service"]["ExecStart"].split()
    assert fields[fields.index("--output") + 1] == service[service.index("--output") + 1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_collector_works_within_the_units_limits(states_lab: lab.Lab, tmp_path: Path, backend: str) -> None:
    # What the service's sandbox takes away and this machine can take away without systemd:
    # every capability (CapabilityBoundingSet=), new privileges, the network (PrivateNetwork=).
    require_tools("setpriv", what="the sandbox check")
    out = tmp_path / "ipsec.prom"
    sandbox = ["unshare", "--net", "setpriv", "--no-new-privs", "--bounding-set=-all", "--inh-caps=-all"]
    proc = run_collector("--output", str(out), "--backend", backend,
                         prefix=[*states_lab.gateway.nsenter(), *sandbox])
    assert (proc.returncode, proc.stderr) == (0, "")
    assert by_tunnel(out.read_text(), "ipsec_status") == lab.STATES_EXPECTED


# ---------------------------------------------------------------- alert rules


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    require_tools("promtool", what="rule checks")
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120, check=False)


def test_rules_are_valid() -> None:
    proc = promtool("check", "rules", str(RULES))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_rules_unit_tests_pass() -> None:
    proc = promtool("test", "rules", str(RULE_TESTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_alert_has_a_rule_test() -> None:
    alerts = set(re.findall(r"- alert: (\w+)", RULES.read_text()))
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert alerts == tested and len(alerts) == 9


# ---------------------------------------------------------------- end to end


@pytest.fixture
def monitoring(tmp_path: Path) -> Iterator[tuple[Path, prometheus_server.Prometheus]]:
    """node_exporter serving a textfile directory, and Prometheus scraping it with our rules."""
    with prometheus_server.monitoring(tmp_path, [RULES]) as stack:
        yield stack


def test_a_tunnel_taken_down_raises_its_alert_in_prometheus(
        states_lab: lab.Lab, monitoring: tuple[Path, prometheus_server.Prometheus]) -> None:
    textfile_dir, server = monitoring
    states_lab.gateway.ipsec("down", "included{*}")
    try:
        proc = run_collector("--output", str(textfile_dir / "ipsec.prom"), prefix=states_lab.gateway.nsenter())
        assert proc.returncode == 0

        def down_alerts() -> dict[str, str]:
            return {a["labels"]["tunnel"]: a["state"] for a in server.api("alerts")["alerts"]
                    if a["labels"]["alertname"] == "IPsecTunnelDown"}

        lab.wait_for(lambda: "included" in down_alerts(), 30, "IPsecTunnelDown for the tunnel taken down")
        alerts = down_alerts()
        assert alerts["included"] in ("pending", "firing")
        # On demand and ignored tunnels are not down; the up ones are not either.
        assert not {"routed", "ignored", "up", "site"} & set(alerts)
        names = {a["labels"]["alertname"] for a in server.api("alerts")["alerts"]}
        assert "IPsecCollectorFailing" not in names and "IPsecCollectorStale" not in names
    finally:
        states_lab.gateway.ipsec("up", "included", timeout=30)
