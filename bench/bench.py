#!/usr/bin/env python3
"""Benchmark: one query per run against one `ipsec status NAME` per tunnel.

    sudo python3 bench/bench.py                      # N = 10, 100, 1000, 5000
    sudo python3 bench/bench.py --tunnels 10 100 --reps 3

For each N it brings up the scale lab of tests/lab.py (a real charon with N
INSTALLED tunnels under one IKE SA), then, inside the gateway's namespaces,
times in the same run:

  (1) ours:        the Debian package's /usr/bin/ipsec-textfile (debian/bin/ipsec-textfile)
                   running the byte-compiled module, --output FILE, with the default
                   backend (auto: VICI, or stroke where charon leaves an IKE SA with more
                   than about 1300 CHILD SAs out of its VICI answer), process start to
                   file written
  (4) ours, stroke: the same with --backend stroke
  (2) per tunnel:  a Python process running `ipsec status NAME` for every tunnel and
                   classifying each answer as the older exporters do
  (3) floor:       a Python process importing ipsec_textfile and prometheus_client and
                   running one `ipsec statusall`, nothing else
  (5) VICI floor:  a Python process importing ipsec_textfile and prometheus_client and
                   reading the raw answers to the VICI requests a run sends, nothing decoded

and prints medians with their spread, (2)/(1), (1)/(3), (1)/(5), (1)/(4), the peak RSS
of (1) and the size of the file it wrote.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import py_compile
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

PER_TUNNEL = """\
import subprocess, sys
names = sys.argv[1:]
status = {}
for name in names:
    out = subprocess.run(["ipsec", "status", name], capture_output=True, text=True, timeout=30).stdout
    status[name] = 0 if "INSTALLED" in out else 1 if "ESTABLISHED" in out else 2 if "no match" in out else 3
assert len(status) == len(names)
"""

FLOOR = """\
import subprocess, ipsec_textfile, prometheus_client
subprocess.run(["ipsec", "statusall"], capture_output=True, timeout=60)
"""

VICI_FLOOR = """\
import socket, prometheus_client, ipsec_textfile as it
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(it.DEFAULT_VICI_SOCKET)
def exchange(*packets):
    for kind, name, message in packets:
        sock.sendall(it.vici_packet(kind, name, message))
    answers = []
    while not answers or answers[-1] == 7:  # events until the command's response
        length = int.from_bytes(sock.recv(4, socket.MSG_WAITALL), "big")
        answers.append(sock.recv(length, socket.MSG_WAITALL)[0])
    return answers
for _, command, event, message in [*it._VICI_QUESTIONS, ("", "list-certs", "list-cert", {"type": "ANY"})]:
    if event is None:
        exchange((0, command, message))
    else:
        exchange((3, event, None))
        exchange((0, command, message))
        exchange((4, event, None))
"""


def timed(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one process."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{command[:3]} failed")
    return elapsed, usage.ru_maxrss / 1024


def measure(tunnels: int, reps: int, per_tunnel_reps: int) -> dict[str, object]:
    """Inside the gateway: time the three methods, interleaved repetition by repetition."""
    names = [f"t{i}" for i in range(tunnels)]
    # As the package installs it: the module byte-compiled, run by its launcher.
    py_compile.compile(str(REPO / "ipsec_textfile.py"), doraise=True)
    os.environ["PYTHONPATH"] = str(REPO)
    launcher = [sys.executable, str(REPO / "debian" / "bin" / "ipsec-textfile")]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ipsec.prom"
        ours, rss, per_tunnel, floor, stroke, vici_floor = [], [], [], [], [], []
        for rep in range(reps):
            stroke.append(timed([*launcher, "--backend", "stroke", "--output", str(out)])[0])
            seconds, peak = timed([*launcher, "--output", str(out)])
            ours.append(seconds)
            rss.append(peak)
            floor.append(timed([sys.executable, "-c", FLOOR])[0])
            vici_floor.append(timed([sys.executable, "-c", VICI_FLOOR])[0])
            if rep < per_tunnel_reps:
                per_tunnel.append(timed([sys.executable, "-c", PER_TUNNEL, *names])[0])
        text = out.read_text()
        assert text.count('ipsec_status{tunnel="t') == tunnels
        assert text.count("} 0.0") >= tunnels, "not every tunnel was up during the benchmark"
        backend = text.split('ipsec_daemon_info{backend="')[1].split('"')[0]
        return {"tunnels": tunnels, "ours": ours, "per_tunnel": per_tunnel, "floor": floor, "stroke": stroke,
                "vici_floor": vici_floor, "backend": backend, "rss_mib": max(rss),
                "file_bytes": out.stat().st_size}


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):8.3f} [{min(values):.3f}-{max(values):.3f}]"


def report(results: list[dict[str, Any]]) -> None:
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
          f"Python {platform.python_version()}, {strongswan_version()}")
    print("seconds: median [min-max]")
    columns = ["(1) ours", "(2) per tunnel", "(3) floor", "(4) ours, stroke", "(5) VICI floor"]
    print(f"{'N':>5}  {'backend':>7}  " + "  ".join(f"{c:>24}" for c in columns)
          + f"  {'(2)/(1)':>8}  {'(1)/(3)':>8}  {'(1)/(5)':>8}  {'(1)/(4)':>8}  {'RSS MiB':>7}  {'file KiB':>8}")
    for r in results:
        series = [r[k] for k in ("ours", "per_tunnel", "floor", "stroke", "vici_floor")]
        m1, m2, m3, m4, m5 = (statistics.median(v) for v in series)
        print(f"{r['tunnels']:>5}  {r['backend']:>7}  " + "  ".join(f"{spread(v):>24}" for v in series)
              + f"  {m2 / m1:8.1f}  {m1 / m3:8.2f}  {m1 / m5:8.2f}  {m1 / m4:8.2f}"
              f"  {r['rss_mib']:7.1f}  {r['file_bytes'] / 1024:8.1f}")


def strongswan_version() -> str:
    out = subprocess.run(["ipsec", "--version"], capture_output=True, text=True, check=False).stdout
    return out.split("\n")[0].replace("Linux strongSwan ", "strongSwan ").split("/K")[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tunnels", type=int, nargs="+", default=[10, 100, 1000, 5000])
    parser.add_argument("--reps", type=int, default=5, help="repetitions of (1) and (3)")
    parser.add_argument("--per-tunnel-reps", type=int, default=3, help="repetitions of (2), the slow one")
    parser.add_argument("--measure", type=int, help=argparse.SUPPRESS)  # inside the gateway
    args = parser.parse_args()

    if args.measure is not None:
        print(json.dumps(measure(args.measure, args.reps, args.per_tunnel_reps)))
        return

    import lab  # needs root and the strongSwan packages

    results = []
    for tunnels in args.tunnels:
        with tempfile.TemporaryDirectory() as tmp:
            started = time.monotonic()
            scale = lab.start_scale_lab(Path(tmp), tunnels)
            print(f"# {tunnels} tunnels up in {time.monotonic() - started:.1f}s", file=sys.stderr)
            try:
                inside = subprocess.run(
                    [*scale.gateway.nsenter(), sys.executable, __file__, "--measure", str(tunnels),
                     "--reps", str(args.reps), "--per-tunnel-reps", str(args.per_tunnel_reps)],
                    capture_output=True, text=True, check=True, timeout=7200)
            finally:
                scale.destroy()
            results.append(json.loads(inside.stdout))
    report(results)


if __name__ == "__main__":
    main()
