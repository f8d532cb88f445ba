"""The real prometheus-node-exporter, serving a textfile directory on a loopback port."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

BINARY = "prometheus-node-exporter"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NodeExporter:
    """Started with only the textfile collector; stop() ends what start() began."""

    def __init__(self, textfile_dir: Path) -> None:
        self.textfile_dir = textfile_dir
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/metrics"

    def start(self) -> None:
        binary = shutil.which(BINARY)
        assert binary is not None, f"{BINARY} is not installed"
        self.process = subprocess.Popen(
            [binary, f"--web.listen-address=127.0.0.1:{self.port}",
             "--collector.disable-defaults", "--collector.textfile",
             f"--collector.textfile.directory={self.textfile_dir}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                self.scrape()
                return
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.stop()
                    raise
                time.sleep(0.1)

    def scrape(self) -> str:
        with urllib.request.urlopen(self.url, timeout=5) as response:
            return str(response.read().decode("utf-8"))

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


def scrape_once(textfile_dir: Path) -> str:
    """Start node_exporter on textfile_dir, scrape it once, stop it."""
    exporter = NodeExporter(textfile_dir)
    exporter.start()
    try:
        return exporter.scrape()
    finally:
        exporter.stop()
