#!/usr/bin/env python3
"""See ipsec-textfile work on a real strongSwan pair, no VPN needed (root, Debian/Ubuntu).

    sudo python3 demo/demo.py            # until Ctrl-C
    sudo python3 demo/demo.py --once     # one pass of the story, then clean up

Brings up the test suite's lab (tests/lab.py): a strongSwan gateway and its peer in two
network namespaces, with tunnels up, IKE-only, down, on demand, connecting and ignored.
Runs the collector on the gateway every few seconds, as cron or the timer would, serves
its file with node_exporter on a loopback port, and shows what node_exporter serves as a
table. Sends traffic through one tunnel, takes another down and brings it back. Removes
everything it started when it ends, on Ctrl-C too.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import lab  # the test suite's lab, not a copy
from node_exporter import NodeExporter

# Debian packages the lab and the demo need, by the file that shows each is there.
PACKAGES = {
    "/usr/lib/ipsec/starter": "strongswan-starter",
    "/usr/lib/ipsec/charon": "strongswan-charon",
    "/usr/sbin/swanctl": "strongswan-swanctl",
    "/usr/lib/ipsec/plugins/libstrongswan-kernel-libipsec.so": "libcharon-extra-plugins",
    "/usr/bin/prometheus-node-exporter": "prometheus-node-exporter",
    "/usr/sbin/ip": "iproute2",
    "/usr/bin/nsenter": "util-linux",
}
PYTHON_PACKAGES = {"prometheus_client": "python3-prometheus-client"}

STATUS_WORDS = {0: "up", 1: "IKE only", 2: "down", 3: "unknown", 4: "ignored"}

# What happens at each refresh, so the table changes while you watch.
STORY = [
    "the lab as it came up",
    "20 UDP datagrams sent through tunnel 'up' and echoed back: its counters grow",
    "tunnel 'included' taken down (ipsec down 'included{*}'): it reads down",
    "tunnel 'included' brought back (ipsec up included): up again",
]


def install_missing() -> None:
    """apt-get install what is missing, saying what; Python modules only for Debian's python3."""
    missing = sorted({pkg for path, pkg in PACKAGES.items() if not os.path.exists(path)})
    modules = [pkg for mod, pkg in PYTHON_PACKAGES.items() if importlib.util.find_spec(mod) is None]
    if modules and sys.executable != "/usr/bin/python3":
        sys.exit(f"demo: {sys.executable} lacks {', '.join(modules)}: run `pip install .` first, "
                 "or run the demo with /usr/bin/python3")
    missing += modules
    if not missing:
        return
    if not shutil.which("apt-get"):
        sys.exit(f"demo: missing {', '.join(missing)}, and this is not a Debian/Ubuntu system")
    print(f"demo: installing {' '.join(missing)} (apt-get)", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
                   check=True, env=env, timeout=1200, stdout=subprocess.DEVNULL)


def table(served: str) -> str:
    """The tunnels as node_exporter serves them, one line each."""
    from promfile import by_tunnel, value  # prometheus_client: there only after install_missing()

    status = by_tunnel(served, "ipsec_status")
    routed = by_tunnel(served, "ipsec_tunnel_routed")
    children = by_tunnel(served, "ipsec_installed_child_sas")
    ages = by_tunnel(served, "ipsec_ike_age_seconds")
    counters = {m: by_tunnel(served, f"ipsec_{m}_total")
                for m in ("in_bytes", "out_bytes", "in_packets", "out_packets")}
    lines = [(f"{'tunnel':<12} {'status':<16} {'CHILD SAs':>9} {'IKE age':>8} "
             f"{'bytes in':>9} {'bytes out':>9} {'pkts in':>8} {'pkts out':>8}")]
    for name, code in status.items():
        word = f"{int(code)} {STATUS_WORDS[int(code)]}" + (" (routed)" if routed.get(name) else "")

        def show(series: dict[str, float], width: int, name: str = name) -> str:
            return f"{int(series[name]):>{width}}" if name in series else f"{'-':>{width}}"

        age = f"{int(ages[name])}s" if name in ages else "-"
        lines.append(f"{name:<12} {word:<16} {show(children, 9)} {age:>8} "
                     f"{show(counters['in_bytes'], 9)} {show(counters['out_bytes'], 9)} "
                     f"{show(counters['in_packets'], 8)} {show(counters['out_packets'], 8)}")
    lines.append(f"collector success: {int(value(served, 'ipsec_textfile_success'))}")
    return "\n".join(lines)


def collect(gateway: lab.Host, textfile: Path) -> None:
    """One run of the collector on the gateway, as cron runs it there."""
    proc = subprocess.run([*gateway.nsenter(), sys.executable, str(ROOT / "ipsec_textfile.py"),
                           "--output", str(textfile)], capture_output=True, text=True, timeout=60,
                          check=False)
    if proc.returncode != 0:
        print(proc.stderr, end="", file=sys.stderr)


def act(step: int, states: lab.Lab) -> None:
    if step == 1:
        lab.exchange_datagrams(states, "10.1.1.1", "10.2.1.1", 20, 200)
    elif step == 2:
        states.gateway.ipsec("down", "included{*}")
    elif step == 3:
        states.gateway.ipsec("up", "included", timeout=30)


def stop_on_signal(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through every finally below


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--once", action="store_true", help="tell the story once, then clean up and exit")
    parser.add_argument("--interval", type=float, default=5.0, metavar="SECONDS",
                        help="seconds between collector runs and refreshes (default: %(default)s)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("demo: run it as root (network namespaces, strongSwan)")
    install_missing()
    signal.signal(signal.SIGTERM, stop_on_signal)

    workdir = Path(tempfile.mkdtemp(prefix="ipsec-textfile-demo."))
    print(f"demo: bringing up a strongSwan gateway and peer in network namespaces ({workdir})", flush=True)
    states = None
    exporter = None
    try:
        states = lab.start_states_lab(workdir / "lab")
        textfile_dir = workdir / "textfile"
        textfile_dir.mkdir()
        exporter = NodeExporter(textfile_dir)
        exporter.start()
        print(f"demo: node_exporter serves the file: curl -s {exporter.url} | grep ^ipsec_", flush=True)
        step = 0
        while True:
            collect(states.gateway, textfile_dir / "ipsec.prom")
            if sys.stdout.isatty():
                print("\033[2J\033[H", end="")
            print(f"\n[{time.strftime('%H:%M:%S')}] {STORY[step % len(STORY)]}")
            print(table(exporter.scrape()), flush=True)
            print(f"curl -s {exporter.url} | grep ^ipsec_      (Ctrl-C ends the demo)", flush=True)
            if args.once and step == len(STORY) - 1:
                break
            step += 1
            act(step % len(STORY), states)
            time.sleep(args.interval)
    except KeyboardInterrupt:
        print("\ndemo: stopping", flush=True)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        if exporter is not None:
            exporter.stop()
        if states is not None:
            states.destroy()
        shutil.rmtree(workdir, ignore_errors=True)
        print("demo: cleaned up: namespaces, daemons, node_exporter and files removed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
