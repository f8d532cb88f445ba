"""One collector run at 100 libreswan tunnels, timed inside the gateway guest against one
`ipsec whack --status` alone (figures printed, and the run must stay within a small
multiple of the two whack queries it makes)."""

from __future__ import annotations

import json
from pathlib import Path

import libreswan_lab
import pytest

from conftest import require
from promfile import by_tunnel

TUNNELS = 100

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


def conf(side: str, other: str, local: int, remote: int, auto: str) -> str:
    lines = ["config setup", "", "conn %default", "\tauthby=secret", f"\tleft={side}", f"\tright={other}",
             f"\tauto={auto}", ""]
    for i in range(TUNNELS):
        lines += [f"conn t{i}", f"\tleftsubnet=10.{local}.{i}.0/24", f"\trightsubnet=10.{remote}.{i}.0/24", ""]
    return "\n".join(lines)


@pytest.mark.parametrize("suite", sorted(libreswan_lab.SUITES))
def test_one_run_at_100_tunnels(suite: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    require(libreswan_lab.missing_tools(), "the libreswan lab")
    lab = libreswan_lab.boot(suite, tmp_path, conf("192.168.0.1", "192.168.0.2", 1, 2, "add"),
                             conf("192.168.0.2", "192.168.0.1", 2, 1, "add"), [], [])
    try:
        lab.peer.run("ipsec addconn --autoall && ipsec whack --listen\n")
        lab.gateway.run("ipsec addconn --autoall && ipsec whack --listen\n", timeout=120)
        # One IKE SA, then every other tunnel's Child SA on it (as a site with many subnet
        # pairs); started all at once, each conn's IKE SA would replace the last (uniqueids).
        lab.gateway.run("ipsec whack --name t0 --initiate\n", timeout=60)
        lab.gateway.run(f"for i in $(seq 1 {TUNNELS - 1}); do ipsec whack --name t$i --initiate --asynchronous; done\n",
                        timeout=300)
        libreswan_lab.wait_for(lambda: lab.gateway.whack("--trafficstatus").count("type=ESP") >= TUNNELS,
                               300, f"{TUNNELS} IPsec SAs")
        (lab.gateway.labdir / "timer.py").write_text(TIMER)
        figures = json.loads(lab.gateway.run("python3 /lab/timer.py\n", timeout=300))
        text = (lab.gateway.labdir / "textfile/ipsec.prom").read_text()
    finally:
        lab.destroy()
    assert set(by_tunnel(text, "ipsec_status").values()) == {0}
    assert len(by_tunnel(text, "ipsec_status")) == TUNNELS
    with capsys.disabled():
        print(f"\nlibreswan {lab.version}, {TUNNELS} tunnels, medians of 5 in the guest: collector run "
              f"{figures['collector']:.3f} s; `ipsec whack --status` alone {figures['status']:.3f} s, "
              f"--trafficstatus {figures['trafficstatus']:.3f} s; Python, import and both queries alone "
              f"{figures['floor']:.3f} s (run / --status: {figures['collector'] / figures['status']:.1f}, "
              f"run / floor: {figures['collector'] / figures['floor']:.2f})")
    # Python's start and the import of prometheus_client dominate; the queries are two.
    assert figures["collector"] < 2.0 + 5 * (figures["status"] + figures["trafficstatus"])
