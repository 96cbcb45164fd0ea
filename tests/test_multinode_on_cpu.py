"""A two-node Ray cluster on this machine (loopback): the pipeline's pools land on the node
type their config `resources` label names, checked through Ray's state API.

    head:   ray start --head --num-cpus 4 --resources '{"learner_node": 4}'   (the CLI)
    worker: a second raylet joined at 127.0.0.1 with {"sampler_node": 4}     (see _join_node)

Actors are started exactly as pipelines/online_dpo.py starts them (actors.online.actor_options
from the config), and a Ray Data pool with `resources=` as pipelines/bdhs.py maps BDHS.
Only the processes of this cluster are stopped (never a plain `ray stop`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.test_online_job_on_cpu import _policy, _port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _ray_start(args: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run(
        [str(BIN / "ray"), "start", *args], env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _join_node(gcs_port: int, resources: dict[str, float]) -> Any:
    """A worker node (raylet + agents) joined to the head at 127.0.0.1:gcs_port."""
    import ray._private.node
    import ray._private.parameter

    params = ray._private.parameter.RayParams(
        node_ip_address="127.0.0.1",
        gcs_address=f"127.0.0.1:{gcs_port}",
        num_cpus=4,
        num_gpus=0,
        resources=resources,
        object_store_memory=200 * 1024 * 1024,
        min_worker_port=0,
        max_worker_port=0,
        node_manager_port=0,
        include_log_monitor=False,
        dashboard_agent_listen_port=_port(),  # two agents on one host
    )
    return ray._private.node.Node(params, head=False, shutdown_at_exit=True, spawn_reaper=False)


def _stop_cluster(temp: str, gcs_port: int) -> None:
    """Stop only this cluster's processes: those naming its temp dir or GCS port, and their
    children (the agents rename themselves `ray::...`, so their command line names neither)."""
    import psutil

    mine: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info.get("cmdline") or [])
        if temp in cmd or f"127.0.0.1:{gcs_port}" in cmd:
            try:
                for p in [proc, *proc.children(recursive=True)]:
                    mine[p.pid] = p
            except psutil.NoSuchProcess:
                continue
    for proc in mine.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(list(mine.values()), timeout=15)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


class WhereAmI:
    """Ray Data callable: tags each row with the node that ran it."""

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import ray

        node = ray.get_runtime_context().get_node_id()
        return {**batch, "node": [node] * len(batch["id"])}


@pytest.mark.ray
@pytest.mark.slow
def test_pools_land_on_their_labelled_nodes(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    import ray
    from ray.util.state import list_actors

    from actors.online import LearnerActor, SamplerActor, actor_options
    from mmalign.config import load, parse_resources

    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "OMP_NUM_THREADS": "1",
        "PATH": f"{BIN}:{os.environ['PATH']}",
    }
    for key in ("RAY_AUTH_MODE", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "OMP_NUM_THREADS"):
        monkeypatch.setenv(key, env[key])
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    gcs, dash = _port(), _port()
    temp = Path("/tmp") / f"raymn{gcs}"  # short: unix socket paths are length-limited
    common = ["--node-ip-address=127.0.0.1", "--disable-usage-stats", "--num-cpus=4"]
    worker = None
    try:
        _ray_start(
            [
                "--head",
                f"--port={gcs}",
                f"--temp-dir={temp}",
                "--include-dashboard=true",  # the state API is served by the dashboard
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dash}",
                f"--dashboard-agent-listen-port={_port()}",
                f"--resources={json.dumps({'learner_node': 4})}",
                *common,
            ],
            env,
        )
        # The second node joins over loopback. `ray start --address` itself cannot do that in
        # Ray 2.60: joining needs RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1, which rewrites
        # 127.0.0.1 to the host's routable IP and binds the raylet on every interface. So
        # the worker is started the way `ray start --address` starts it internally (a
        # non-head ray._private.node.Node, as ray.cluster_utils does), pinned to 127.0.0.1.
        worker = _join_node(gcs, {"sampler_node": 4})
        cfg = load(
            str(ROOT / "pipelines" / "configs" / "shapes-cpu.yaml"),
            {
                "sampler.model": _policy(tmp_path),
                "sampler.resources": "sampler_node:0.5",
                "bdhs.resources": "sampler_node:0.5",
                "learner.resources": "learner_node:1",
            },
        )
        S, L = cfg.sampler, cfg.learner
        ray.init(address=f"127.0.0.1:{gcs}", log_to_driver=False)
        nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
        assert len(nodes) == 2, nodes
        labelled = {label: nid for nid, res in nodes.items() for label in res if "_node" in label}
        assert labelled.keys() == {"learner_node", "sampler_node"}

        sampler = SamplerActor.options(**actor_options(S.num_cpus, S.num_gpus, S.resources))
        sampler = sampler.remote(S, L, None, "mn")
        learner = LearnerActor.options(**actor_options(L.num_cpus, 0, L.resources))
        learner = learner.remote(S.model, L, S.dtype, "mn")
        ray.get([sampler.__ray_ready__.remote(), learner.__ray_ready__.remote()], timeout=180)
        # the sampler really works where it landed
        version, out = ray.get(sampler.version.remote()), None
        assert version[0] == 0

        # a Ray Data actor pool with resources=, as pipelines/bdhs.py maps its BDHS operator
        ds = ray.data.from_items([{"id": i} for i in range(8)], override_num_blocks=4)
        ds = ds.map_batches(
            WhereAmI,
            batch_size=2,
            compute=ray.data.ActorPoolStrategy(size=2),
            num_cpus=0.5,
            resources=parse_resources(cfg.bdhs.resources),
        )
        data_nodes = {row["node"] for row in ds.iter_rows()}
        assert data_nodes == {labelled["sampler_node"]}, (data_nodes, labelled)

        # an actor asking for a label no node has is never placed (no autoscaler here)
        stray = SamplerActor.options(**actor_options(0.1, 0, "judge_node:1")).remote(S, L)

        address = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 60
        while True:
            actors = list_actors(
                address=address, detail=True, limit=1000, raise_on_missing_output=False
            )
            by_class: dict[str, list[Any]] = {}
            for a in actors:
                by_class.setdefault(a.class_name, []).append(a)
            alive = {c: [a for a in v if a.state == "ALIVE"] for c, v in by_class.items()}
            if alive.get("SamplerActor") and alive.get("LearnerActor") or time.time() > deadline:
                break
            time.sleep(1)
        (s_actor,) = alive["SamplerActor"]
        (l_actor,) = alive["LearnerActor"]
        assert s_actor.node_id == labelled["sampler_node"]
        assert l_actor.node_id == labelled["learner_node"]
        assert s_actor.required_resources.get("sampler_node") == 0.5
        assert l_actor.required_resources.get("learner_node") == 1.0
        pending = [a for a in by_class["SamplerActor"] if a.state != "ALIVE"]
        assert [a.state for a in pending] == ["PENDING_CREATION"], [a.state for a in pending]
        ray.kill(stray)
        del out
    finally:
        ray.shutdown()
        if worker is not None:
            worker.kill_all_processes(check_alive=False, allow_graceful=True)
        _stop_cluster(str(temp), gcs)
        shutil.rmtree(temp, ignore_errors=True)
