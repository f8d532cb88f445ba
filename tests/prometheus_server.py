"""The real Prometheus on a loopback port, scraping the real node_exporter that serves a
textfile directory: what the end-to-end tests query (alerts, the dashboard's panels)."""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lab
from conftest import require_tools
from node_exporter import BINARY, NodeExporter, free_port

# Short, so that a test sees several scrapes (and rule evaluations) within seconds.
SCRAPE_INTERVAL_SECONDS = 1


class Prometheus:
    """Its own storage under workdir, scraping one target every SCRAPE_INTERVAL_SECONDS."""

    def __init__(self, workdir: Path, target: str, rule_files: Sequence[Path] = ()) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.target = target
        config = workdir / "prometheus.yml"
        rules = "".join(f"  - {path}\n" for path in rule_files)
        config.write_text(
            f"global:\n  scrape_interval: {SCRAPE_INTERVAL_SECONDS}s\n"
            f"  evaluation_interval: {SCRAPE_INTERVAL_SECONDS}s\n"
            + (f"rule_files:\n{rules}" if rules else "")
            + f"scrape_configs:\n  - job_name: node\n    static_configs:\n      - targets: ['{target}']\n")
        self.process = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL, stderr=(workdir / "prometheus.log").open("w"))
        try:
            lab.wait_for(self.ready, 30, "Prometheus to be ready")
        except BaseException:
            self.stop()
            raise

    def ready(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"prometheus exited; see {self.workdir / 'prometheus.log'}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def response(self, path: str, params: dict[str, str] | None = None) -> Any:
        """The whole answer of /api/v1/PATH, errors included: Prometheus answers a bad query
        with a 4xx status and a JSON body that says why."""
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return json.load(r)
        except urllib.error.HTTPError as error:
            with error:
                return json.load(error)

    def api(self, path: str, params: dict[str, str] | None = None) -> Any:
        """The data of a successful answer."""
        answer = self.response(path, params)
        assert answer["status"] == "success", answer
        return answer["data"]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=20)


@contextmanager
def monitoring(workdir: Path, rule_files: Sequence[Path] = ()) -> Iterator[tuple[Path, Prometheus]]:
    """node_exporter serving a textfile directory under workdir, and Prometheus scraping it."""
    require_tools(BINARY, "prometheus", what="Prometheus end to end")
    textfile_dir = workdir / "textfile"
    textfile_dir.mkdir()
    exporter = NodeExporter(textfile_dir)
    exporter.start()
    try:
        server = Prometheus(workdir, f"127.0.0.1:{exporter.port}", rule_files)
        try:
            yield textfile_dir, server
        finally:
            server.stop()
    finally:
        exporter.stop()
