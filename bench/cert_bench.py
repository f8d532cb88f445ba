#!/usr/bin/env python3
"""Benchmark: certificates and CRLs at scale, through both backends.

    sudo python3 bench/cert_bench.py                      # N = 0, 100, 1000, 3000
    sudo python3 bench/cert_bench.py --certificates 0 500 --reps 3

For each N it brings up tests/cert_lab.py's gateway with N more CA certificates loaded
(issued by the lab's root with `pki`; the lab's own 11 certificates and 2 CRLs besides),
then, inside the gateway's namespaces, times in the same run, interleaved:

  (1) vici:    python3 ipsec_textfile.py --backend vici --output FILE
  (2) stroke:  the same with --backend stroke (`ipsec statusall`, then `ipsec listall --utc`)
  (3) listall: `ipsec listall --utc` alone

and prints medians with their spread, the certificate series each backend wrote (they must
be equal but for the lab's CA whose name cryptography refuses, which only stroke writes), the
size of the file, and `promtool check metrics` on it; then whatever a run printed on stderr
(a warning, a failed run) with its exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

SERIES = ("ipsec_certificate_not_after_timestamp_seconds{", "ipsec_crl_next_update_timestamp_seconds{")


def timed(command: list[str], said: list[str]) -> float:
    """Seconds one process took; what it printed on stderr, with its exit status, goes to said."""
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          check=False, timeout=600)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0 or proc.stderr:
        said.append(f"{command[-3] if len(command) > 3 else command[0]}: exit {proc.returncode}: "
                    f"{(proc.stderr.strip().splitlines() or [''])[-1]}")
    return elapsed


def series(text: str) -> list[str]:
    return sorted(line for line in text.splitlines() if line.startswith(SERIES))


def measure(reps: int, timeout: float) -> dict[str, object]:
    """Inside the gateway."""
    said: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        files = {backend: Path(tmp) / f"{backend}.prom" for backend in ("vici", "stroke")}
        times: dict[str, list[float]] = {"vici": [], "stroke": [], "listall": []}
        for _ in range(reps):
            for backend, out in files.items():
                times[backend].append(timed([sys.executable, "ipsec_textfile.py", "--timeout", str(timeout),
                                             "--backend", backend, "--output", str(out)], said))
            times["listall"].append(timed(["ipsec", "listall", "--utc"], said))
        texts = {backend: out.read_text() for backend, out in files.items()}
        check = subprocess.run(["promtool", "check", "metrics"], input=texts["vici"], capture_output=True,
                               text=True, timeout=120, check=False) if shutil.which("promtool") else None
        return {"times": times, "said": said, "series": {b: len(series(t)) for b, t in texts.items()},
                # stroke also writes the lab's CA whose name cryptography refuses (serial 0c)
                "agree": series(texts["vici"]) == [s for s in series(texts["stroke"]) if 'serial="0c"' not in s],
                "file_bytes": files["vici"].stat().st_size,
                "promtool": "not installed" if check is None else ("ok" if check.returncode == 0
                                                                    else check.stdout + check.stderr)}


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):7.3f} [{min(values):.3f}-{max(values):.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--certificates", type=int, nargs="+", default=[0, 100, 1000, 3000])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=10.0, help="the collector's --timeout (default: 10)")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # inside the gateway
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.reps, args.timeout)))
        return

    import cert_lab  # needs root, the strongSwan packages and pki

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print("seconds: median [min-max]")
    print(f"{'N':>5}  {'loaded':>6}  {'(1) vici':>22}  {'(2) stroke':>22}  {'(3) listall':>22}  "
          f"{'series vici/stroke':>18}  {'agree':>5}  {'file KiB':>8}  promtool")
    for bulk in args.certificates:
        with tempfile.TemporaryDirectory() as tmp:
            started = time.monotonic()
            lab = cert_lab.start_cert_lab(Path(tmp), bulk)
            print(f"# {bulk} more certificates issued and loaded in {time.monotonic() - started:.1f}s",
                  file=sys.stderr)
            try:
                inside = subprocess.run([*lab.lab.gateway.nsenter(), sys.executable, __file__, "--measure",
                                         "--reps", str(args.reps), "--timeout", str(args.timeout)],
                                        capture_output=True, text=True, check=True, timeout=7200)
            finally:
                lab.destroy()
        r = json.loads(inside.stdout)
        loaded = len(lab.certificates) + len(lab.crls)  # each must have its series (stroke)
        t = r["times"]
        print(f"{bulk:>5}  {loaded:>6}  {spread(t['vici']):>22}  {spread(t['stroke']):>22}  "
              f"{spread(t['listall']):>22}  {r['series']['vici']:>8}/{r['series']['stroke']:<9}  "
              f"{'yes' if r['agree'] else 'no':>5}  {r['file_bytes'] / 1024:8.1f}  {r['promtool']}")
        for line in r["said"]:
            print(f"       {line}")


if __name__ == "__main__":
    main()
