#!/usr/bin/env python3
"""Benchmark: a remote-access concentrator, every client its own IKE SA.

    sudo python3 bench/ra_bench.py                       # N = 1000, 5000 clients
    sudo python3 bench/ra_bench.py --clients 1000 --reps 5

For each N it brings up tests/ra_lab.py's scale lab (a real charon whose rw-eap conn
has N EAP-MSCHAPv2 clients connected, each with its own IKE SA and virtual IP), then,
inside the gateway's namespaces, times rep by rep, one after the other:

  (A) ours:        the Debian package's /usr/bin/ipsec-textfile (debian/bin/ipsec-textfile)
                   running the byte-compiled module, --output FILE: the default backend
                   (auto: VICI, plus `ipsec leases` for ipsec.conf's pools), per-client
                   series on (the default --max-clients)
  (B) floor:       a python3 process importing prometheus_client and asking charon once
                   over VICI (the requests a run sends, answers read, nothing decoded)
  (C) ours, off:   (A) with --max-clients 0 (no per-client series)
  (D) script:      (A) as `python3 ipsec_textfile.py`, the copied script (compiled anew
                   on each run)

and prints the median of the per-rep ratios A/B, A/C and D/B (this machine's speed drifts
more than the differences measured: only neighbouring runs are compared), the medians of
A to D, A's peak RSS, the file's size and series, and node_exporter's scrape time of that
file (median of 10 scrapes). Then, for where A's time goes, each stage of one run timed
inside one process (median over the reps).
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
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

# VICI by hand: a 4-byte length, a type (0 request, 3 register, 4 unregister), a name;
# list-policies' message is key-value elements (3, key length, key, value length, value).
FLOOR = """\
import socket, prometheus_client
def packet(kind, name, message=b""):
    body = bytes([kind, len(name)]) + name.encode() + message
    return len(body).to_bytes(4, "big") + body
def kv(key, value):
    return bytes([3, len(key)]) + key.encode() + len(value).to_bytes(2, "big") + value.encode()
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect("/var/run/charon.vici")
def exchange(data):
    sock.sendall(data)
    answers = []
    while not answers or answers[-1] == 7:  # events until the command's response
        length = int.from_bytes(sock.recv(4, socket.MSG_WAITALL), "big")
        answers.append(sock.recv(length, socket.MSG_WAITALL)[0])
def stream(command, event, message=b""):
    exchange(packet(3, event))
    exchange(packet(0, command, message))
    exchange(packet(4, event))
exchange(packet(0, "version"))
exchange(packet(0, "stats"))
stream("list-sas", "list-sa")
exchange(packet(0, "stats"))
stream("list-policies", "list-policy", kv("trap", "yes") + kv("pass", "yes") + kv("drop", "yes"))
stream("list-conns", "list-conn")
exchange(packet(0, "get-pools"))
stream("list-certs", "list-cert", kv("type", "ANY"))
"""

# One run of A, each stage timed (time.perf_counter, ms), printed as JSON: the pipeline of
# main() with the default backend, stage by stage.
STAGES = """\
import json, sys, time
marks = [time.perf_counter()]
import ipsec_textfile as it
marks.append(time.perf_counter())
read_answer = it.choose_daemon("auto", "ipsec", it.DEFAULT_VICI_SOCKET, 10).ask()
import prometheus_client
marks.append(time.perf_counter())
state = read_answer()
marks.append(time.perf_counter())
statuses = it.classify(it.all_tunnels(it.configured_tunnels(it.DEFAULT_CONFIG, None) or [], state.loaded), state)
result = it.RunResult(statuses, state, time.time(), 0, it.select_clients(statuses, it.DEFAULT_MAX_CLIENTS))
marks.append(time.perf_counter())
registry = it.build_registry(result)
families = list(registry.collect())
marks.append(time.perf_counter())
prometheus_client.generate_latest(registry)
marks.append(time.perf_counter())
it.write_output(registry, sys.argv[1], 10)
marks.append(time.perf_counter())
names = ["import the module", "ask; import prometheus_client", "read the answers", "read ipsec.conf, classify",
         "metric families", "generate_latest", "write_output (generates again)"]
print(json.dumps({name: 1000 * (b - a) for name, a, b in zip(names, marks, marks[1:])}))
"""


def timed(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one process."""
    with tempfile.TemporaryFile() as stderr:
        started = time.perf_counter()
        proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr)
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - started
        if os.waitstatus_to_exitcode(status) != 0:
            stderr.seek(0)
            raise RuntimeError(f"{command[:4]} failed: {stderr.read().decode(errors='replace')}")
    return elapsed, usage.ru_maxrss / 1024


def measure(clients: int, reps: int, textfile_dir: str) -> dict[str, object]:
    """Inside the gateway: A, B, C and D, rep by rep; A's file is left in textfile_dir."""
    out = Path(textfile_dir) / "ipsec.prom"
    other = str(out) + ".other"
    # As the package installs it: the module byte-compiled, run by its launcher.
    py_compile.compile(str(REPO / "ipsec_textfile.py"), doraise=True)
    os.environ["PYTHONPATH"] = str(REPO)
    launcher = [sys.executable, str(REPO / "debian" / "bin" / "ipsec-textfile")]
    ours, floor, off, script, rss, stages = [], [], [], [], [], []
    for _ in range(reps):
        seconds, peak = timed([*launcher, "--output", str(out)])
        ours.append(seconds)
        rss.append(peak)
        floor.append(timed([sys.executable, "-c", FLOOR])[0])
        off.append(timed([*launcher, "--output", other, "--max-clients", "0"])[0])
        script.append(timed([sys.executable, "ipsec_textfile.py", "--output", other])[0])
        stages.append(json.loads(subprocess.run([sys.executable, "-c", STAGES, other], cwd=REPO, check=True,
                                                capture_output=True, text=True).stdout))
    text = out.read_text()
    assert text.count('ipsec_client_sessions{client="user') == clients, "not every client was reported"
    os.unlink(other)
    return {"clients": clients, "ours": ours, "floor": floor, "off": off, "script": script, "rss_mib": max(rss),
            "file_bytes": out.stat().st_size, "series": sum(1 for line in text.splitlines()
                                                            if line and not line.startswith("#")),
            "stages": {name: statistics.median(rep[name] for rep in stages) for name in stages[0]}}


def scrape_seconds(textfile_dir: Path) -> float:
    """node_exporter's textfile collector reading the file: median of 10 scrapes."""
    import node_exporter

    exporter = node_exporter.NodeExporter(textfile_dir)
    exporter.start()
    try:
        times = []
        for _ in range(10):
            started = time.perf_counter()
            with urllib.request.urlopen(exporter.url, timeout=60) as response:
                body = response.read().decode()
            times.append(time.perf_counter() - started)
            assert "node_textfile_scrape_error 0" in body
        return statistics.median(times)
    finally:
        exporter.stop()


def ratios(a: list[float], b: list[float]) -> str:
    pairs = [x / y for x, y in zip(a, b)]
    return f"{statistics.median(pairs):5.2f} [{min(pairs):.2f}-{max(pairs):.2f}]"


def report(results: list[dict[str, Any]]) -> None:
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
          f"Python {platform.python_version()}")
    print("seconds: median; ratios: median of the per-rep ratios [min-max]")
    print(f"{'clients':>7}  {'A ours':>7}  {'B floor':>7}  {'C off':>7}  {'D script':>8}  {'A/B':>18}  "
          f"{'A/C':>18}  {'D/B':>18}  {'RSS MiB':>7}  {'file KiB':>8}  {'series':>7}  {'scrape s':>8}")
    for r in results:
        print(f"{r['clients']:>7}  {statistics.median(r['ours']):7.3f}  {statistics.median(r['floor']):7.3f}  "
              f"{statistics.median(r['off']):7.3f}  {statistics.median(r['script']):8.3f}  "
              f"{ratios(r['ours'], r['floor']):>18}  {ratios(r['ours'], r['off']):>18}  "
              f"{ratios(r['script'], r['floor']):>18}  {r['rss_mib']:7.1f}  {r['file_bytes'] / 1024:8.1f}  "
              f"{r['series']:>7}  {r['scrape_seconds']:8.3f}")
    print("stages of one run in one process, ms (median):")
    for r in results:
        print(f"{r['clients']:>7}  " + ", ".join(f"{name} {ms:.1f}" for name, ms in r["stages"].items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--reps", type=int, default=11, help="repetitions of A, B and C")
    parser.add_argument("--measure", type=int, help=argparse.SUPPRESS)  # inside the gateway
    parser.add_argument("--textfile-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.measure is not None:
        print(json.dumps(measure(args.measure, args.reps, args.textfile_dir)))
        return

    import ra_lab  # needs root and the strongSwan packages

    results = []
    for clients in args.clients:
        with tempfile.TemporaryDirectory() as tmp:
            started = time.monotonic()
            concentrator = ra_lab.start_scale_ra_lab(Path(tmp) / "lab", clients)
            print(f"# {clients} clients up in {time.monotonic() - started:.1f}s", file=sys.stderr)
            textfile_dir = Path(tmp) / "textfile"
            textfile_dir.mkdir(mode=0o755)
            try:
                inside = subprocess.run(
                    [*concentrator.gateway.nsenter(), sys.executable, __file__, "--measure", str(clients),
                     "--reps", str(args.reps), "--textfile-dir", str(textfile_dir)],
                    capture_output=True, text=True, check=False, timeout=7200)
            finally:
                concentrator.destroy()
            if inside.returncode != 0:
                raise SystemExit(f"measuring {clients} clients failed: {inside.stderr}")
            result = json.loads(inside.stdout)
            result["scrape_seconds"] = scrape_seconds(textfile_dir)
            print(f"# {json.dumps(result)}", file=sys.stderr)
            results.append(result)
    report(results)


if __name__ == "__main__":
    main()
