#!/usr/bin/env python3
"""Benchmark: one collector run against one `ipsec whack --status` on a libreswan gateway.

    sudo python3 bench/libreswan_bench.py                    # 100 tunnels, libreswan 4.10 and 5.2
    sudo python3 bench/libreswan_bench.py --tunnels 10 --suites bookworm

For each Debian release it boots tests/libreswan_lab.py's two User-Mode Linux guests with
N tunnels up (one IKE SA, every other tunnel's Child SA on it) and times, inside the
gateway guest, medians of 5: (1) the collector with --backend pluto, (2) `ipsec whack
--status` alone, (3) `ipsec whack --trafficstatus` alone, (4) the floor: Python with our
imports running both queries, nothing parsed or written. Figures are printed, not asserted.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import libreswan_lab
from promfile import by_tunnel

# Runs in the guest: medians of 5 runs each, in seconds, as JSON.
TIMER = """\
import json, statistics, subprocess, sys, time

def median(command):
    times = []
    for _ in range(5):
        started = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - started)
    return statistics.median(times)

print(json.dumps({
    "status": median(["ipsec", "whack", "--status"]),
    "trafficstatus": median(["ipsec", "whack", "--trafficstatus"]),
    "collector": median([sys.executable, "/repo/ipsec_textfile.py", "--backend", "pluto",
                         "--output", "/lab/textfile/ipsec.prom"]),
    # Python started, the module imported, both queries run; nothing parsed or written.
    "floor": median([sys.executable, "-c", "import sys; sys.path.insert(0, '/repo'); import ipsec_textfile as it; "
                     "[it.run_command(['ipsec', 'whack', o], 10) for o in ('--status', '--trafficstatus')]"]),
}))
"""


def conf(side: str, other: str, local: int, remote: int, auto: str, tunnels: int) -> str:
    lines = ["config setup", "", "conn %default", "\tauthby=secret", f"\tleft={side}", f"\tright={other}",
             f"\tauto={auto}", ""]
    for i in range(tunnels):
        lines += [f"conn t{i}", f"\tleftsubnet=10.{local}.{i}.0/24", f"\trightsubnet=10.{remote}.{i}.0/24", ""]
    return "\n".join(lines)


def measure(suite: str, tunnels: int, workdir: Path) -> dict[str, float]:
    """Boot the guests with `tunnels` tunnels up and time the four commands in the gateway."""
    lab = libreswan_lab.boot(suite, workdir, conf("192.168.0.1", "192.168.0.2", 1, 2, "add", tunnels),
                             conf("192.168.0.2", "192.168.0.1", 2, 1, "add", tunnels), [], [])
    try:
        lab.peer.run("ipsec addconn --autoall && ipsec whack --listen\n")
        lab.gateway.run("ipsec addconn --autoall && ipsec whack --listen\n", timeout=120)
        # One IKE SA, then every other tunnel's Child SA on it (as a site with many subnet
        # pairs); started all at once, each conn's IKE SA would replace the last (uniqueids).
        lab.gateway.run("ipsec whack --name t0 --initiate\n", timeout=60)
        lab.gateway.run(f"for i in $(seq 1 {tunnels - 1}); do ipsec whack --name t$i --initiate --asynchronous; "
                        "done\n", timeout=300)
        libreswan_lab.wait_for(lambda: lab.gateway.whack("--trafficstatus").count("type=ESP") >= tunnels,
                               300, f"{tunnels} IPsec SAs")
        (lab.gateway.labdir / "timer.py").write_text(TIMER)
        figures: dict[str, float] = json.loads(lab.gateway.run("python3 /lab/timer.py\n", timeout=300))
        text = (lab.gateway.labdir / "textfile/ipsec.prom").read_text()
        version = lab.version
    finally:
        lab.destroy()
    statuses = by_tunnel(text, "ipsec_status")
    if len(statuses) != tunnels or set(statuses.values()) != {0}:
        raise RuntimeError(f"not every tunnel was up during the benchmark: {statuses}")
    print(f"libreswan {version}, {tunnels} tunnels, medians of 5 in the guest: (1) collector run "
          f"{figures['collector']:.3f} s; (2) `ipsec whack --status` alone {figures['status']:.3f} s; "
          f"(3) --trafficstatus alone {figures['trafficstatus']:.3f} s; (4) Python, import and both queries "
          f"{figures['floor']:.3f} s; (1)/(2) {figures['collector'] / figures['status']:.1f}, "
          f"(1)/(4) {figures['collector'] / figures['floor']:.2f}", flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tunnels", type=int, default=100)
    parser.add_argument("--suites", nargs="+", choices=sorted(libreswan_lab.SUITES),
                        default=sorted(libreswan_lab.SUITES))
    args = parser.parse_args()
    missing = libreswan_lab.missing_tools()
    if missing:
        sys.exit(f"the libreswan lab needs: {', '.join(missing)}")
    for suite in args.suites:
        with tempfile.TemporaryDirectory() as tmp:
            measure(suite, args.tunnels, Path(tmp))


if __name__ == "__main__":
    main()
