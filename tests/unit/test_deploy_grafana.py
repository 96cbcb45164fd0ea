"""deploy/grafana/mmalign.json: valid dashboard JSON with a panel for every mmalign_* metric
defined in actors/metrics.py, queried by its Prometheus name (Ray adds the `ray_` prefix,
as tests/integration/test_online_job.py sees on the metrics endpoint)."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def defined_metrics() -> set[str]:
    """Every `mmalign_*` metric name actors/metrics.py creates: the GAUGES table (exported as
    mmalign_<key>) plus the literal names passed to Counter/Gauge."""
    from actors.metrics import GAUGES

    tree = ast.parse((ROOT / "actors" / "metrics.py").read_text())
    literals = {
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str)
        if n.value.startswith("mmalign_") and n.value.replace("_", "").isalnum()
    }
    return {f"mmalign_{k}" for k in GAUGES} | literals


def panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in dash["panels"]:
        out += [p, *p.get("panels", [])]
    return [p for p in out if p["type"] != "row"]


def test_every_custom_metric_has_a_panel() -> None:
    dash = json.loads((ROOT / "deploy" / "grafana" / "mmalign.json").read_text())
    names = defined_metrics()
    assert {"mmalign_loss", "mmalign_pairs_total", "mmalign_busy_seconds"} <= names
    exprs = [t["expr"] for p in panels(dash) for t in p["targets"]]
    missing = [m for m in sorted(names) if not any(f"ray_{m}" in e for e in exprs)]
    assert not missing, f"no panel queries {missing}"
    # no panel queries a metric that does not exist (typos would show empty graphs)
    for expr in exprs:
        for word in expr.replace("(", " ").replace("{", " ").replace('"', " ").split():
            if word.startswith("ray_mmalign_"):
                assert word.removeprefix("ray_").split("(")[0] in names, word


def test_dashboard_is_well_formed() -> None:
    dash = json.loads((ROOT / "deploy" / "grafana" / "mmalign.json").read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 30
    ps = panels(dash)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in ps:
        assert p["datasource"]["type"] == "prometheus" and p["targets"], p["title"]
        grid = p["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, p["title"]
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "run"} <= variables
