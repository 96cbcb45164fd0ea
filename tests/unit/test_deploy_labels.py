"""Every custom resource label a preset or deploy file requests exists on some node type of
cluster.yaml and on some KubeRay worker group, with room for at least one actor; and a bad
`resources` value fails at config load naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mmalign.config import ConfigError, load, parse_resources
from tests.unit.test_deploy_kuberay import group_resources

ROOT = Path(__file__).resolve().parents[2]
ROLES = ("sampler", "bdhs", "judge", "learner")


def requested() -> dict[str, dict[str, float]]:
    """{where: {label: amount}} over every preset's roles and the Serve configs."""
    out: dict[str, dict[str, float]] = {}
    for preset in sorted((ROOT / "pipelines" / "configs").glob("*.yaml")):
        cfg = load(str(preset))
        for role in ROLES:
            out[f"{preset.name}:{role}"] = parse_resources(getattr(cfg, role).resources)
    service = yaml.safe_load((ROOT / "deploy" / "kuberay" / "rayservice.yaml").read_text())
    for path, text in (
        ("rayservice.yaml", service["spec"]["serveConfigV2"]),
        ("serve_judge.yaml", (ROOT / "deploy" / "serve_judge.yaml").read_text()),
    ):
        for app in yaml.safe_load(text)["applications"]:
            out[f"{path}:args"] = parse_resources(app["args"].get("resources", ""))
            for dep in app.get("deployments", []):
                res = dep.get("ray_actor_options", {}).get("resources", {})
                out[f"{path}:{dep['name']}"] = {k: float(v) for k, v in res.items()}
    return out


def cluster_nodes() -> dict[str, dict[str, float]]:
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    return {n: t.get("resources", {}) for n, t in cluster["available_node_types"].items()}


def kuberay_groups() -> dict[str, dict[str, float]]:
    out = {}
    for name in ("rayjob.yaml", "rayservice.yaml"):
        doc = yaml.safe_load((ROOT / "deploy" / "kuberay" / name).read_text())
        spec = doc["spec"].get("rayClusterSpec") or doc["spec"]["rayClusterConfig"]
        for g in spec["workerGroupSpecs"]:
            out[f"{name}:{g['groupName']}"] = group_resources(g)
    return out


def test_the_paper_preset_pins_every_role_to_a_node_type() -> None:
    cfg = load(str(ROOT / "pipelines" / "configs" / "llava-1.6-7b.yaml"))
    assert {r: set(parse_resources(getattr(cfg, r).resources)) for r in ROLES} == {
        "sampler": {"sampler_node"},
        "bdhs": {"sampler_node"},
        "judge": {"judge_node"},
        "learner": {"learner_node"},
    }


@pytest.mark.parametrize("targets", [cluster_nodes, kuberay_groups], ids=["cluster", "kuberay"])
def test_every_requested_label_exists_on_a_node_type(targets) -> None:  # noqa: ANN001
    nodes = targets()
    used = requested()
    assert any(used.values())  # the paper preset requests labels
    for where, labels in used.items():
        candidates = nodes
        if targets is kuberay_groups:  # the RayService's judge lands on its own cluster
            mine = "rayservice" if where.startswith("rayservice") else "rayjob"
            candidates = {n: r for n, r in nodes.items() if n.startswith(mine)}
        for label, amount in labels.items():
            fits = [n for n, res in candidates.items() if float(res.get(label, 0)) >= amount]
            assert fits, f"{where} requests {label}:{amount}, which no node type offers"


def test_kuberay_job_has_every_label_of_the_preset_it_runs() -> None:
    doc = yaml.safe_load((ROOT / "deploy" / "kuberay" / "rayjob.yaml").read_text())
    preset = doc["spec"]["entrypoint"].split("--config ")[1].split()[0]
    assert preset == "pipelines/configs/llava-1.6-7b.yaml"
    job = {k: v for k, v in kuberay_groups().items() if k.startswith("rayjob")}
    offered = {label for res in job.values() for label in res}
    prefix = Path(preset).name + ":"
    used = {lbl for w, res in requested().items() if w.startswith(prefix) for lbl in res}
    assert used == {"sampler_node", "judge_node", "learner_node"}  # one per node type
    assert used <= offered, used - offered


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("sampler_node", "expected 'label:amount'"),
        ("sampler_node:x", "must be a number"),
        ("sampler_node:0", "must be > 0"),
        ("GPU:1", "use num_cpus/num_gpus"),
        ("a:1,a:2", "appears twice"),
    ],
)
def test_bad_resources_fail_at_load_naming_the_field(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"^learner\.resources: .*{message}"):
        load(None, {"learner.resources": value})


def test_resources_parse() -> None:
    assert parse_resources("") == {}
    assert parse_resources(" a:0.01 , b:2 ") == {"a": 0.01, "b": 2.0}
    assert load(None, {"judge.resources": "judge_node:1"}).judge.resources == "judge_node:1"
