"""The one-command demo: it starts, tells its story, and leaves the host as it was."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

import lab
from conftest import ROOT, require, require_tools
from node_exporter import BINARY

DEMO = ROOT / "demo" / "demo.py"


def start_demo(*args: str) -> subprocess.Popen[str]:
    require_tools(BINARY, what="the demo")
    require(lab.missing_tools(), "the demo")
    return subprocess.Popen([sys.executable, str(DEMO), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def assert_left_nothing(demo: subprocess.Popen[str], output: str) -> None:
    workdir = re.search(r"network namespaces \((\S+)\)", output)
    url = re.search(r"curl -s (http://\S+)", output)
    assert workdir is not None and url is not None, output
    assert not Path(workdir.group(1)).exists()
    namespaces = lab.run(["ip", "netns", "list"])
    assert f"itf{demo.pid}n" not in namespaces
    with pytest.raises(OSError):
        urllib.request.urlopen(url.group(1), timeout=2)
    assert "demo: cleaned up" in output


def tables(output: str) -> dict[str, str]:
    """{story line: the table printed under it}."""
    parts = re.split(r"^\[\d\d:\d\d:\d\d\] (.*)$", output, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2]))


def row(table: str, tunnel: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(f"{tunnel} "))
    return line.split()


def test_demo_once_shows_the_story_and_cleans_up() -> None:
    demo = start_demo("--once", "--interval", "0.5")
    output, _ = demo.communicate(timeout=180)
    assert demo.returncode == 0, output
    shown = list(tables(output).values())
    assert len(shown) == 4, output
    first, traffic, down, back = shown
    assert row(first, "up")[1:3] == ["0", "up"] and row(first, "ignored")[1:3] == ["4", "ignored"]
    assert row(first, "routed")[1:4] == ["2", "down", "(routed)"]
    assert int(row(traffic, "up")[-4]) >= 20 * 228  # bytes in: 20 echoed datagrams of 228 bytes
    assert row(down, "included")[1:3] == ["2", "down"]
    assert row(back, "included")[1:3] == ["0", "up"]
    assert_left_nothing(demo, output)


def test_demo_stops_and_cleans_up_on_ctrl_c() -> None:
    demo = start_demo("--interval", "1")
    assert demo.stdout is not None
    output = ""
    try:
        for line in demo.stdout:
            output += line
            if "Ctrl-C ends the demo" in line:
                break
        demo.send_signal(signal.SIGINT)
        rest, _ = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
    output += rest
    assert demo.returncode == 0, output
    assert "demo: stopping" in output
    assert_left_nothing(demo, output)
