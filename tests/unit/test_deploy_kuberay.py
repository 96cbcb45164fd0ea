"""KubeRay manifests (deploy/kuberay/) parsed into the documented ray.io/v1 fields, and their
Serve config validated by Ray Serve's own schema (as is deploy/serve_judge.yaml).

Field names follow the KubeRay v1 API reference (RayJobSpec: entrypoint, runtimeEnvYAML,
shutdownAfterJobFinishes, rayClusterSpec; RayServiceSpec: serveConfigV2, rayClusterConfig;
RayClusterSpec: rayVersion, enableInTreeAutoscaling, headGroupSpec, workerGroupSpecs;
WorkerGroupSpec: groupName, replicas, minReplicas, maxReplicas, rayStartParams, template).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kuberay"
CLUSTER_KEYS = {"rayVersion", "enableInTreeAutoscaling", "autoscalerOptions"}
CLUSTER_KEYS |= {"headGroupSpec", "workerGroupSpecs"}
GROUP_KEYS = {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"}


def _load(name: str) -> dict[str, Any]:
    doc = yaml.safe_load((KUBE / name).read_text())
    assert doc["apiVersion"] == "ray.io/v1"
    return doc


def group_resources(group: dict[str, Any]) -> dict[str, float]:
    """rayStartParams.resources in KubeRay's documented form, '"{\\"label\\": n}"': the
    operator pastes it into the `ray start --resources=...` shell line, so read it as the
    shell does (one quoted word) and then as JSON."""
    raw = group["rayStartParams"].get("resources", "")
    if not raw:
        return {}
    assert raw.startswith('"') and raw.endswith('"'), f"{group['groupName']}: quote the JSON"
    (word,) = shlex.split(raw)
    return {k: float(v) for k, v in json.loads(word).items()}


def check_cluster_spec(spec: dict[str, Any]) -> None:
    import ray

    assert set(spec) <= CLUSTER_KEYS, set(spec) - CLUSTER_KEYS
    assert spec["rayVersion"] == ray.__version__  # the image's Ray (deploy/Dockerfile)
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # the head hosts no work
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())
    names = []
    for group in spec["workerGroupSpecs"]:
        assert set(group) <= GROUP_KEYS, set(group) - GROUP_KEYS
        names.append(group["groupName"])
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
        assert group_resources(group), f"{group['groupName']}: no custom resource label"
        (container,) = group["template"]["spec"]["containers"]
        assert container["image"] == head["template"]["spec"]["containers"][0]["image"]
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        assert group["template"]["spec"]["serviceAccountName"]  # S3 via IRSA, no keys
    assert len(names) == len(set(names))


def test_rayjob_runs_the_online_pipeline_with_autoscaling() -> None:
    from mmalign.config import load

    doc = _load("rayjob.yaml")
    assert doc["kind"] == "RayJob"
    spec = doc["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "pipelines/online_dpo.py"]
    preset = argv[argv.index("--config") + 1]
    assert (ROOT / preset).exists()
    load(str(ROOT / preset))  # the preset the job runs parses and validates
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == "/home/ray/mmalign"  # where the image keeps the code
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode")
    check_cluster_spec(spec["rayClusterSpec"])
    groups = {
        g["groupName"]: group_resources(g) for g in spec["rayClusterSpec"]["workerGroupSpecs"]
    }
    assert groups == {
        "sampler-gpu": {"sampler_node": 4.0},
        "judge-gpu": {"judge_node": 8.0},
        "learner-gpu": {"learner_node": 8.0},
    }


def test_kuberay_groups_mirror_cluster_yaml_node_types() -> None:
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    nodes = {
        k: float(v)
        for t in cluster["available_node_types"].values()
        for k, v in t.get("resources", {}).items()
        if k not in ("CPU", "GPU")
    }
    groups = _load("rayjob.yaml")["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert {k: v for g in groups for k, v in group_resources(g).items()} == nodes


def _serve_schema(raw: dict[str, Any]) -> Any:
    from ray.serve.schema import ServeDeploySchema

    return ServeDeploySchema.model_validate(raw)


def check_deployments_match_args(app: Any) -> Any:
    """A judge app's Serve config (`ServeApplicationSchema`): its `deployments:` section
    must agree with the options deploy.judge_app.build_app derives from its `args`.

    The section replaces the builder's options, `ray_actor_options` and
    `autoscaling_config` as whole dicts: an option it sets must equal the derived one, and
    a derived key it leaves out of such a dict is allowed only when the derived value is
    empty/zero (else e.g. args num_gpus 1 would silently run on CPU). Returns the
    validated JudgeConfig of the args.
    """
    from deploy.judge_app import deployment_options
    from mmalign.config import JudgeConfig, from_dict

    cfg = from_dict(JudgeConfig, app.args, "judge")
    cfg.validate("judge")
    derived = deployment_options(cfg)
    for dep in app.deployments:
        given = dep.model_dump(exclude_unset=True)
        for key in derived.keys() & given.keys():
            want, got = derived[key], given[key]
            if isinstance(want, dict):
                for sub, value in want.items():
                    assert got.get(sub, type(value)()) == value, (dep.name, key, sub, got)
            else:
                assert got == want, (dep.name, key, got, want)
    return cfg


def test_rayservice_serves_the_judge_app_of_serve_judge_yaml() -> None:
    from deploy.judge_app import build_app
    from mmalign.config import parse_resources

    doc = _load("rayservice.yaml")
    assert doc["kind"] == "RayService"
    check_cluster_spec(doc["spec"]["rayClusterConfig"])
    kube = _serve_schema(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    local = _serve_schema(yaml.safe_load((ROOT / "deploy" / "serve_judge.yaml").read_text()))
    (app,), (ref,) = kube.applications, local.applications
    assert (app.name, app.import_path, app.route_prefix) == (
        ref.name,
        ref.import_path,
        ref.route_prefix,
    )
    module, attr = app.import_path.split(":")
    assert getattr(__import__(module, fromlist=[attr]), attr) is build_app
    assert [d.name for d in app.deployments] == [d.name for d in ref.deployments]
    cfg = check_deployments_match_args(app)
    (dep,) = app.deployments
    assert dep.ray_actor_options.num_gpus == cfg.num_gpus == 1  # the paper's judge needs a GPU
    scaling = dep.autoscaling_config
    scaling = scaling if isinstance(scaling, dict) else scaling.model_dump()
    assert 1 <= scaling["min_replicas"] <= scaling["max_replicas"]
    assert kube.http_options.host == "0.0.0.0"  # in-cluster Service, unlike local loopback
    labels = {
        k for g in doc["spec"]["rayClusterConfig"]["workerGroupSpecs"] for k in group_resources(g)
    }
    assert set(parse_resources(cfg.resources)) <= labels


def test_serve_schema_rejects_a_broken_serve_config() -> None:
    from pydantic import ValidationError

    raw = yaml.safe_load(_load("rayservice.yaml")["spec"]["serveConfigV2"])
    raw["applications"][0]["runtime_env"] = {"working_dir": "/not/a/uri"}
    with pytest.raises(ValidationError):
        _serve_schema(raw)
