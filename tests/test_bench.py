"""The benchmark scripts keep working (smoke runs at a few tunnels; figures are not asserted)."""

from __future__ import annotations

import subprocess
import sys

import cert_lab
import lab
import libreswan_lab
import ra_lab
from conftest import ROOT, require


def test_benchmark_runs_and_prints_its_table() -> None:
    require(lab.missing_tools(), "the benchmark lab")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench.py"), "--tunnels", "10",
                           "--reps", "1", "--per-tunnel-reps", "1"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    header, row = proc.stdout.splitlines()[-2:]
    assert "(2)/(1)" in header and "(1)/(3)" in header and "RSS MiB" in header
    assert row.split()[0] == "10"


def test_remote_access_benchmark_runs_and_prints_its_table() -> None:
    require(ra_lab.missing_tools(), "the remote-access benchmark lab")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "ra_bench.py"), "--clients", "20", "--reps", "1"],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if "A/B" in line)
    header, row = lines[at : at + 2]
    assert "A/C" in header and "D/B" in header and "scrape s" in header
    assert row.split()[0] == "20"
    # Where the time goes: every stage of one run, from importing the module to writing the file.
    assert lines[-2] == "stages of one run in one process, ms (median):"
    assert lines[-1].split()[0] == "20" and "generate_latest" in lines[-1] and "write_output" in lines[-1]


def test_libreswan_benchmark_runs_and_prints_its_figures() -> None:
    require(libreswan_lab.missing_tools(), "the libreswan benchmark lab")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "libreswan_bench.py"), "--tunnels", "3",
                           "--suites", "bookworm"], capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.splitlines()[-1]
    assert line.startswith("libreswan 4.10, 3 tunnels") and "(1)/(2)" in line and "(1)/(4)" in line


def test_certificate_benchmark_runs_and_prints_its_table() -> None:
    require(cert_lab.missing_tools(), "the certificate benchmark lab")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "cert_bench.py"), "--certificates", "0",
                           "--reps", "1"], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if "(1) vici" in line and "(3) listall" in line)
    row, said = lines[at + 1], lines[at + 2:]
    # the lab's 8 certificates and 2 CRLs through VICI, one more through stroke; both agree
    assert row.split()[:2] == ["0", "11"] and "10/11" in row and " yes " in row and row.endswith(" ok")
    # what the runs said: VICI's one warning, for the CA whose name cryptography refuses
    assert len(said) == 1 and "vici: exit 0: ipsec-textfile: warning:" in said[0] and "serial 0c" in said[0]
