"""Against a real charon: the states lab gateway, the collector run on it, node_exporter serving it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import lab
from conftest import require, run_collector
from node_exporter import BINARY, scrape_once
from promfile import by_tunnel, samples, value


def collect_on_gateway(states: lab.Lab, out: Path, *more: str) -> subprocess.CompletedProcess[str]:
    """Run the collector on the gateway with its defaults: /etc/ipsec.conf, `ipsec`."""
    return run_collector("--output", str(out), *more, prefix=states.gateway.nsenter())


def test_every_state_from_the_live_daemon(states_lab: lab.Lab, tmp_path: Path) -> None:
    out = tmp_path / "ipsec.prom"
    proc = collect_on_gateway(states_lab, out)
    assert (proc.returncode, proc.stderr) == (0, "")
    text = out.read_text()
    assert by_tunnel(text, "ipsec_status") == lab.STATES_EXPECTED
    assert {t for t, v in by_tunnel(text, "ipsec_tunnel_routed").items() if v == 1} == {"routed"}
    assert value(text, "ipsec_textfile_success") == 1


def test_the_daemon_is_asked_once_per_run(states_lab: lab.Lab, tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    counting = tmp_path / "counting-ipsec"
    counting.write_text(f'#!/bin/sh\necho "$*" >> {calls}\nexec ipsec "$@"\n')
    counting.chmod(0o755)
    proc = collect_on_gateway(states_lab, tmp_path / "ipsec.prom", "--ipsec", str(counting))
    assert proc.returncode == 0
    assert calls.read_text() == "statusall\n"


def test_a_tunnel_taken_down_reads_down_on_the_next_run(states_lab: lab.Lab, tmp_path: Path) -> None:
    out = tmp_path / "ipsec.prom"
    states_lab.gateway.ipsec("down", "included{*}")  # its CHILD SAs only
    try:
        assert collect_on_gateway(states_lab, out).returncode == 0
        assert by_tunnel(out.read_text(), "ipsec_status")["included"] == 2
    finally:
        states_lab.gateway.ipsec("up", "included", timeout=30)
    assert collect_on_gateway(states_lab, out).returncode == 0
    assert by_tunnel(out.read_text(), "ipsec_status")["included"] == 0


def test_node_exporter_serves_the_file(states_lab: lab.Lab, tmp_path: Path) -> None:
    require([] if shutil.which(BINARY) else [BINARY], "node_exporter end to end")
    textfile_dir = tmp_path / "textfile"
    textfile_dir.mkdir()
    assert collect_on_gateway(states_lab, textfile_dir / "ipsec.prom", "--lock-timeout", "5").returncode == 0
    served = scrape_once(textfile_dir)
    assert by_tunnel(served, "ipsec_status") == lab.STATES_EXPECTED
    assert samples(served)[("node_textfile_scrape_error", ())] == 0
    assert value(served, "ipsec_textfile_success") == 1
