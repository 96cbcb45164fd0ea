"""Each pipeline places its pools by the `resources` label of the config section it names:
the actor / pool options the pipelines build (the same functions their `run` calls) carry
exactly that label. No Ray cluster is started.

Every section gets its own label here, so a pipeline that drops its label or reads another
role's section fails. tests/integration/test_multinode.py checks on a real two-node cluster that
options built this way land on the labelled node; tests/unit/test_deploy_labels.py that
the presets' labels exist on a node type.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import yaml

from mmalign.config import Config, load

ROOT = Path(__file__).resolve().parents[2]
LABELS = {
    "sampler": {"sampler_node": 0.25},
    "bdhs": {"bdhs_node": 0.5},
    "judge": {"judge_node": 0.125},
    "learner": {"learner_node": 2.0},
}


def _cfg() -> Config:
    overrides: dict[str, Any] = {
        f"{role}.resources": ",".join(f"{k}:{v}" for k, v in labels.items())
        for role, labels in LABELS.items()
    }
    overrides.update({"sampler.num_gpus": "1", "judge.num_gpus": "1", "learner.use_gpu": "true"})
    return load(str(ROOT / "pipelines" / "configs" / "shapes-cpu.yaml"), overrides)


def test_online_loop_actors_carry_their_sections_label() -> None:
    from pipelines.online_dpo import role_options

    opts = role_options(_cfg())
    assert {role: o["resources"] for role, o in opts.items()} == {
        r: LABELS[r] for r in ("sampler", "judge", "learner")
    }
    # one GPU each: the online loop's learner is a single actor (learner.num_workers unused)
    assert {role: o["num_gpus"] for role, o in opts.items()} == dict.fromkeys(opts, 1)


def test_bdhs_pools_carry_the_bdhs_label() -> None:
    import ray.data

    from actors.embedder_pool import embedder_options, start_embedder_pool
    from pipelines.bdhs import embedder_pool_kwargs, pool_kwargs

    cfg = _cfg()
    pool = pool_kwargs(cfg)
    assert pool["resources"] == LABELS["bdhs"]
    assert isinstance(pool["compute"], ray.data.ActorPoolStrategy)
    assert (pool["num_cpus"], pool["num_gpus"]) == (cfg.sampler.num_cpus, 1)

    # the embedder pool runs beside the BDHS samplers: same label, CPU only
    emb = embedder_pool_kwargs(cfg)
    inspect.signature(start_embedder_pool).bind(**emb)  # run_bdhs passes exactly these
    assert emb["resources"] == LABELS["bdhs"]
    assert embedder_options(emb["num_cpus"], emb["resources"]) == {
        "num_cpus": 1.0,
        "num_gpus": 0,
        "resources": LABELS["bdhs"],
    }


def test_evaluation_pool_carries_the_sampler_label() -> None:
    from pipelines.evaluate import pool_kwargs

    assert pool_kwargs(_cfg())["resources"] == LABELS["sampler"]


def test_offline_ray_train_workers_carry_the_learner_label() -> None:
    from actors.learner_train import worker_resources

    cfg = _cfg()
    assert worker_resources(cfg.learner) == {
        "CPU": cfg.learner.num_cpus,
        "GPU": 1,
        **LABELS["learner"],
    }


def test_serve_judge_replicas_carry_the_judge_label() -> None:
    from deploy.judge_app import deployment_options

    options = deployment_options(_cfg().judge)
    assert options["ray_actor_options"]["resources"] == LABELS["judge"]


def test_the_paper_presets_pools_ask_for_labels_cluster_yaml_offers() -> None:
    """What the pipelines build from llava-1.6-7b.yaml, not just what the preset says."""
    from actors.embedder_pool import embedder_options
    from actors.learner_train import worker_resources
    from pipelines import bdhs, evaluate, online_dpo

    cfg = load(str(ROOT / "pipelines" / "configs" / "llava-1.6-7b.yaml"))
    emb = bdhs.embedder_pool_kwargs(cfg)
    built = {
        **{f"online_dpo:{r}": o["resources"] for r, o in online_dpo.role_options(cfg).items()},
        "bdhs:pool": bdhs.pool_kwargs(cfg)["resources"],
        "bdhs:embedder": embedder_options(emb["num_cpus"], emb["resources"])["resources"],
        "evaluate:pool": evaluate.pool_kwargs(cfg)["resources"],
        "offline_dpo:worker": {
            k: v for k, v in worker_resources(cfg.learner).items() if k not in ("CPU", "GPU")
        },
    }
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())["available_node_types"]
    offered = {label for t in cluster.values() for label in t.get("resources", {})}
    for where, labels in built.items():
        assert labels, f"{where}: no node-type label at the paper's scale"
        assert set(labels) <= offered, f"{where} asks for {labels}; cluster.yaml offers {offered}"
    assert built["bdhs:embedder"] == built["bdhs:pool"] == {"sampler_node": 0.01}
