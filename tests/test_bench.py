"""The benchmark script keeps working (a smoke run at N=10; figures are not asserted)."""

from __future__ import annotations

import subprocess
import sys

import lab
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
