"""The Grafana dashboard: a dashboard Grafana 9 and later import as is, and every query in it
(panels and variables) answered with series by the real Prometheus of the end-to-end lab."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric

import ipsec_textfile as it
import lab
import prometheus_server
import ra_lab
from conftest import FIXTURES, ROOT, require, run_collector

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

DASHBOARD = json.loads((ROOT / "dashboards" / "ipsec-textfile.json").read_text())
# Every query goes to the data source picked in the `datasource` variable.
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
STATE_TEXT_COLOURS = {"0": ("up", "green"), "1": ("IKE only", "yellow"), "2": ("down", "red"),
                      "3": ("unknown", "orange"), "4": ("ignored", "#8e8e8e")}

# What Grafana substitutes for its own variables, for a panel showing the last minute with the
# data source's scrape interval set to Prometheus' (SCRAPE_SECONDS). $__interval is the range
# over the panel's width in points, never below the scrape interval: a minute over some
# hundred points is below it. $__rate_interval is max($__interval + scrape, 4 * scrape).
RANGE_SECONDS = 60
SCRAPE_SECONDS = prometheus_server.SCRAPE_INTERVAL_SECONDS
INTERVAL_SECONDS = SCRAPE_SECONDS
RATE_INTERVAL_SECONDS = max(INTERVAL_SECONDS + SCRAPE_SECONDS, 4 * SCRAPE_SECONDS)
GRAFANA_VARIABLES = {
    "__interval": f"{INTERVAL_SECONDS}s", "__interval_ms": str(INTERVAL_SECONDS * 1000),
    "__rate_interval": f"{RATE_INTERVAL_SECONDS}s",
    "__range": f"{RANGE_SECONDS}s", "__range_s": str(RANGE_SECONDS), "__range_ms": str(RANGE_SECONDS * 1000),
}
VARIABLE_REFERENCE = re.compile(r"\$\{(\w+)\}|\$(\w+)")
LABEL_VALUES = re.compile(r"label_values\((?P<selector>.+),\s*(?P<label>\w+)\)")


def panels() -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows too."""
    found = []
    for panel in DASHBOARD["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def query_panels() -> list[dict[str, Any]]:
    return [panel for panel in panels() if panel["type"] != "row"]


def panel_targets() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(panel, target) for panel in query_panels() for target in panel["targets"]]


REMOTE_ACCESS_ROW = "Remote access"  # its panels need a remote-access gateway's file


def in_remote_access_row(panel: dict[str, Any]) -> bool:
    row = None
    for top in DASHBOARD["panels"]:
        if top["type"] == "row":
            row = top["title"]
        if top is panel:
            return row == REMOTE_ACCESS_ROW
    raise AssertionError(panel["title"])


def site_targets() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(panel, target) for panel, target in panel_targets() if not in_remote_access_row(panel)]


def remote_access_targets() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(panel, target) for panel, target in panel_targets() if in_remote_access_row(panel)]


def variables() -> dict[str, dict[str, Any]]:
    return {variable["name"]: variable for variable in DASHBOARD["templating"]["list"]}


def panel_titled(title: str) -> dict[str, Any]:
    [panel] = [panel for panel in query_panels() if panel["title"] == title]
    return panel


def grafana_regex_escape(value: str) -> str:
    """What Grafana's Prometheus data source does to each value of a multi-value variable:
    a backslash before each regex metacharacter, itself escaped for the PromQL string."""
    return re.sub(r"([\\$^*+?.()|{}\[\]'])", r"\\\\\1", value)


def substitute(text: str, values: dict[str, list[str]]) -> str:
    """text with Grafana's variables replaced as Grafana would; a variable the dashboard does not
    define is a KeyError. Several values become a regex alternative (Grafana's "All")."""
    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name in GRAFANA_VARIABLES:
            return GRAFANA_VARIABLES[name]
        escaped = [grafana_regex_escape(value) for value in values[name]]
        return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"

    return VARIABLE_REFERENCE.sub(replace, text)


def metric_names(expression: str) -> set[str]:
    return set(re.findall(r"\b(?:ipsec|node)_\w+", expression))


# ---------------------------------------------------------------- an importable dashboard


def test_dashboard_is_for_grafana_9_and_later() -> None:
    # 36 is Grafana 9.0's schema, 37 9.4's; an older one has data sources by name, and a newer
    # one than Grafana 9 knows (38: table cell options) would not be migrated by it.
    assert DASHBOARD["schemaVersion"] in (36, 37)
    requires = {(r["type"], r["id"]): r["version"] for r in DASHBOARD["__requires"]}
    assert int(requires[("grafana", "grafana")].split(".")[0]) >= 9
    assert ("datasource", "prometheus") in requires
    assert {("panel", panel["type"]) for panel in query_panels()} <= set(requires)
    # Imported as a new dashboard (no database id), under a stable uid for links.
    assert DASHBOARD["id"] is None and DASHBOARD["uid"] == "ipsec-textfile"


def test_every_panel_and_query_uses_the_data_source_variable() -> None:
    for panel in query_panels():
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
            assert target["expr"].strip(), panel["title"]


def test_panel_ids_are_unique_and_panels_do_not_overlap() -> None:
    ids = [panel["id"] for panel in panels()]
    assert all(isinstance(i, int) for i in ids) and len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for panel in panels():
        grid = panel["gridPos"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_variables_are_the_data_source_the_gateways_and_their_tunnels() -> None:
    found = variables()
    assert list(found) == ["datasource", "instance", "tunnel"]
    assert (found["datasource"]["type"], found["datasource"]["query"]) == ("datasource", "prometheus")
    assert found["instance"]["query"] == "label_values(ipsec_status, instance)"
    assert found["tunnel"]["query"] == 'label_values(ipsec_status{instance=~"$instance"}, tunnel)'
    for name in ("instance", "tunnel"):
        variable = found[name]
        assert variable["type"] == "query" and variable["datasource"] == DATASOURCE
        assert variable["multi"] and variable["includeAll"]
        # Read from Prometheus when the dashboard loads (1) or the time range changes (2),
        # not the values saved in the file.
        assert variable["refresh"] in (1, 2)
        # No custom "All" value: Grafana then sends every value as a regex, as the tests below do.
        assert not variable.get("allValue")
    used = {m.group(1) or m.group(2) for _, target in panel_targets()
            for m in VARIABLE_REFERENCE.finditer(target["expr"])}
    assert used <= set(found) | set(GRAFANA_VARIABLES)


def test_states_have_their_colour() -> None:
    timeline = panel_titled("State over time")
    [table_state] = [override for override in panel_titled("Tunnel state")["fieldConfig"]["overrides"]
                     if override["matcher"] == {"id": "byName", "options": "state"}]
    table_properties = {p["id"]: p["value"] for p in table_state["properties"]}
    assert table_properties["custom.displayMode"] == "color-background"
    for mappings in (timeline["fieldConfig"]["defaults"]["mappings"], table_properties["mappings"]):
        [value_mapping] = mappings
        assert value_mapping["type"] == "value"
        assert {value: (m["text"], m["color"]) for value, m in value_mapping["options"].items()} \
            == STATE_TEXT_COLOURS


def test_metrics_are_those_readme_lists() -> None:
    readme_metrics = set(re.findall(r"^\| `(\w+)` \|", (ROOT / "README.md").read_text(), re.MULTILINE))
    used = set().union(*(metric_names(target["expr"]) for _, target in panel_targets()),
                       *(metric_names(v.get("query", "")) for v in variables().values()))
    # node_exporter's own: when it last saw the file change.
    assert used - readme_metrics == {"node_textfile_mtime_seconds"}
    assert "ipsec_tunnel_info" in used


def test_counters_are_graphed_only_as_rates() -> None:
    # README: the counters restart at each rekey, so never the raw value, delta() or deriv().
    for panel, target in panel_targets():
        for counter in re.findall(r"\w+_total\b", target["expr"]):
            assert f"rate({counter}{{" in target["expr"], panel["title"]
            assert "[$__rate_interval]" in target["expr"], panel["title"]


# ---------------------------------------------------------------- against the real Prometheus


@dataclass
class Grafana:
    """What Grafana would see: the lab's Prometheus and the values of the dashboard's variables."""

    prometheus: prometheus_server.Prometheus
    values: dict[str, list[str]]

    def instant(self, expression: str) -> Any:
        return self.prometheus.response("query", {"query": expression, "time": f"{time.time():.3f}"})

    def range(self, expression: str) -> Any:
        end = time.time()
        return self.prometheus.response("query_range", {
            "query": expression, "start": f"{end - RANGE_SECONDS:.3f}", "end": f"{end:.3f}",
            "step": f"{INTERVAL_SECONDS}s"})

    def label_values(self, query: str) -> dict[str, list[str]]:
        """A label_values(selector, label) variable query answered the ways Grafana asks
        (/api/v1/series with the selector as match[]: Grafana 9; /api/v1/label/LABEL/values
        with it: later versions), and the selector itself as an instant and a range query."""
        match = LABEL_VALUES.fullmatch(substitute(query, self.values))
        assert match is not None, query
        selector, label = match["selector"], match["label"]
        end = time.time()
        window = {"match[]": selector, "start": f"{end - RANGE_SECONDS:.3f}", "end": f"{end:.3f}"}
        answers = {
            "series API": self.prometheus.response("series", window),
            "labels API": self.prometheus.response(f"label/{label}/values", window),
            "instant": self.instant(selector),
            "range": self.range(selector),
        }
        found = {}
        for how, answer in answers.items():
            assert answer["status"] == "success", (how, answer)
            data = answer["data"]
            if how == "labels API":
                found[how] = sorted(data)
            elif how == "series API":
                found[how] = sorted({series[label] for series in data})
            else:
                found[how] = sorted({series["metric"][label] for series in data["result"]})
        return found


def captured_certificates() -> tuple[list[it.Certificate], list[it.Crl]]:
    return it.parse_certificate_listing((FIXTURES / "certificates" / "listall.txt").read_text())


def certificate_exposition() -> str:
    certificates, crls = captured_certificates()
    state = it.DaemonState([], [], certificates=certificates, crls=crls)

    class Certificates:
        def collect(self) -> list[Metric]:
            return it.certificate_families(state)

    registry = CollectorRegistry()
    registry.register(cast("Collector", Certificates()))
    return generate_latest(registry).decode()


def enough_samples(server: prometheus_server.Prometheus) -> bool:
    # Two rate windows' worth of scrapes: rate() over $__rate_interval then has points to use.
    answer = server.api("query", {"query": "count_over_time(ipsec_textfile_success[1m])"})
    return bool(answer["result"]) and float(answer["result"][0]["value"][1]) >= 2 * RATE_INTERVAL_SECONDS


@pytest.fixture(scope="module")
def grafana(states_lab: lab.Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Grafana]:
    """The states lab's file served by node_exporter and scraped by Prometheus, with the
    dashboard's variables resolved from it as Grafana resolves them, in order."""
    # Another test may have taken a tunnel down and brought it back just now.
    lab.wait_for_status(states_lab.gateway, lab.states_settled, 30, "the states lab to settle")
    with prometheus_server.monitoring(tmp_path_factory.mktemp("dashboard")) as (textfile_dir, server):
        proc = run_collector("--output", str(textfile_dir / "ipsec.prom"), prefix=states_lab.gateway.nsenter())
        assert (proc.returncode, proc.stderr) == (0, "")
        # The states lab authenticates with PSK: the certificates come from the certificate
        # lab's captured answer, written by the collector's own code beside the file.
        (textfile_dir / "certificates.prom").write_text(certificate_exposition())
        lab.wait_for(lambda: enough_samples(server), 60, "Prometheus to scrape the file several times")
        view = Grafana(server, {})
        for name, variable in variables().items():
            if variable["type"] == "query":
                view.values[name] = view.label_values(variable["query"])["labels API"]
        yield view


def test_variables_list_the_gateway_and_every_tunnel(grafana: Grafana) -> None:
    # The scrape's instance label is node_exporter's address.
    expected = {"instance": [grafana.prometheus.target], "tunnel": sorted(lab.STATES_EXPECTED)}
    for name, variable in variables().items():
        if variable["type"] == "query":
            answers = grafana.label_values(variable["query"])
            assert answers == dict.fromkeys(answers, expected[name]), name


def assert_series(grafana: Grafana, target: dict[str, Any], kind: str) -> None:
    expression = substitute(target["expr"], grafana.values)
    answer = grafana.instant(expression) if kind == "instant" else grafana.range(expression)
    assert answer["status"] == "success", (expression, answer)
    assert answer["data"]["result"], f"no series for {expression}"
    if kind == "range":
        assert all(series["values"] for series in answer["data"]["result"])


@pytest.mark.parametrize("kind", ["instant", "range"])
@pytest.mark.parametrize(("panel", "target"), site_targets(),
                         ids=[f"{panel['title']}/{target['refId']}" for panel, target in site_targets()])
def test_every_panel_query_returns_series(
        grafana: Grafana, panel: dict[str, Any], target: dict[str, Any], kind: str) -> None:
    assert_series(grafana, target, kind)


def test_tunnel_table_shows_each_tunnels_state_and_peer(grafana: Grafana) -> None:
    [target] = panel_titled("Tunnel state")["targets"]
    answer = grafana.instant(substitute(target["expr"], grafana.values))
    rows = {series["metric"]["tunnel"]: series for series in answer["data"]["result"]}
    assert {tunnel: int(row["value"][1]) for tunnel, row in rows.items()} == lab.STATES_EXPECTED
    # The lab's tunnels go to the peer at 10.99.0.2, except the one to nobody at 10.99.0.3.
    # Ignored tunnels are left out: the daemon may not have loaded them.
    peers = {tunnel: row["metric"].get("remote") for tunnel, row in rows.items()
             if lab.STATES_EXPECTED[tunnel] != 4}
    assert peers == {tunnel: "10.99.0.3" if tunnel == "connecting" else "10.99.0.2" for tunnel in peers}


def test_fleet_table_counts_the_gateways_tunnels_by_state(grafana: Grafana) -> None:
    counted = 0
    for target in panel_titled("Tunnels by state per gateway")["targets"]:
        state = re.search(r"ipsec_status\{[^}]*\} == bool (\d)\)", target["expr"])
        if state is None:
            continue
        [series] = grafana.instant(substitute(target["expr"], grafana.values))["data"]["result"]
        expected = sum(value == int(state.group(1)) for value in lab.STATES_EXPECTED.values())
        assert int(series["value"][1]) == expected, target["expr"]
        counted += 1
    assert counted == 5


def test_fleet_figures_are_the_labs(grafana: Grafana) -> None:
    # One gateway; down counts sit and ike-only, not routed (on demand); its collector is fine.
    expected = {"Gateways": 1, "Tunnels up": 5, "IKE only": 1, "Down": 2, "Collectors failing": 0,
                "Files stale": 0}
    found = {}
    for title in expected:
        [target] = panel_titled(title)["targets"]
        [series] = grafana.instant(substitute(target["expr"], grafana.values))["data"]["result"]
        found[title] = int(series["value"][1])
    assert found == expected


def test_certificate_tables_show_days_left_soonest_first(grafana: Grafana) -> None:
    certificates, crls = captured_certificates()
    for title, items, when, name in (
            ("Certificates by days left", certificates, "not_after", "days left"),
            ("CRLs by days to next update", crls, "next_update", "days to next update")):
        panel = panel_titled(title)
        assert panel["options"]["sortBy"] == [{"displayName": name, "desc": False}]
        [target] = panel["targets"]
        asked = time.time()
        answer = grafana.instant(substitute(target["expr"], grafana.values))
        rows = sorted(float(series["value"][1]) for series in answer["data"]["result"])
        expected = sorted((getattr(item, when) - asked) / 86400 for item in items)
        assert rows == pytest.approx(expected, abs=60 / 86400), title


# ---------------------------------------------------------------- the remote-access row, on a live concentrator


def test_the_remote_access_row_has_clients_pools_and_top_clients() -> None:
    titles = {panel["title"] for panel in query_panels() if in_remote_access_row(panel)}
    assert titles == {"Clients per tunnel", "Pool usage", "Top clients by traffic", "Connected clients"}


RA_CLIENTS = 2  # of each kind


@pytest.fixture(scope="module")
def ra_grafana(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Grafana]:
    """tests/ra_lab.py's gateway, its file scraped by Prometheus: once as the clients came
    up, then after eap-1 (user1) sent traffic."""
    require(ra_lab.missing_tools(), "the remote-access lab")
    ra = ra_lab.start_ra_lab(tmp_path_factory.mktemp("ra"), RA_CLIENTS)
    try:
        with prometheus_server.monitoring(tmp_path_factory.mktemp("ra-dashboard")) as (textfile_dir, server):
            def collect() -> None:
                proc = run_collector("--output", str(textfile_dir / "ipsec.prom"), prefix=ra.gateway.nsenter())
                assert (proc.returncode, proc.stderr) == (0, "")

            collect()
            lab.wait_for(lambda: enough_samples(server), 60, "Prometheus to scrape the file several times")
            ra.send_from("eap-1", 50, 1000)
            collect()
            lab.wait_for(lambda: bool(server.api("query", {"query": "rate(ipsec_client_in_bytes_total[1m]) > 0"})
                                      ["result"]), 60, "Prometheus to see user1's traffic")
            view = Grafana(server, {})
            for name, variable in variables().items():
                if variable["type"] == "query":
                    view.values[name] = view.label_values(variable["query"])["labels API"]
            yield view
    finally:
        ra.destroy()


@pytest.mark.parametrize("kind", ["instant", "range"])
@pytest.mark.parametrize(("panel", "target"), remote_access_targets(),
                         ids=[f"{panel['title']}/{target['refId']}" for panel, target in remote_access_targets()])
def test_every_remote_access_panel_query_returns_series(
        ra_grafana: Grafana, panel: dict[str, Any], target: dict[str, Any], kind: str) -> None:
    assert_series(ra_grafana, target, kind)


def instant_rows(grafana: Grafana, title: str) -> list[dict[str, Any]]:
    [target] = panel_titled(title)["targets"]
    answer = grafana.instant(substitute(target["expr"], grafana.values))
    return list(answer["data"]["result"])


def test_remote_access_panels_show_the_labs_clients_pools_and_traffic(ra_grafana: Grafana) -> None:
    # eap-twice is a second session of user0; rw-swan comes from swanctl.conf (VICI).
    clients = {row["metric"]["tunnel"]: float(row["value"][1]) for row in instant_rows(ra_grafana, "Clients per tunnel")}
    assert clients == {"rw-eap": RA_CLIENTS + 1, "rw-xauth": RA_CLIENTS, "rw-cert": RA_CLIENTS,
                       "rw-swan": RA_CLIENTS}
    usage = {row["metric"]["pool"]: float(row["value"][1]) for row in instant_rows(ra_grafana, "Pool usage")}
    assert usage[ra_lab.CERT_POOL] == pytest.approx(RA_CLIENTS / 254)
    assert usage[ra_lab.SWAN_POOL] == pytest.approx(RA_CLIENTS / 62)
    top = sorted(instant_rows(ra_grafana, "Top clients by traffic"), key=lambda row: -float(row["value"][1]))
    assert (top[0]["metric"]["tunnel"], top[0]["metric"]["client"]) == ("rw-eap", "user1")
    assert float(top[0]["value"][1]) > 0 and all(float(row["value"][1]) == 0 for row in top[1:])
    connected = {row["metric"]["client"] for row in instant_rows(ra_grafana, "Connected clients")}
    assert {"user0", "user1", "xuser1", "O=lab, CN=cert1", "suser1"} <= connected
