"""A two-node Ray cluster on this machine (loopback): the pipelines' pools land on the node
type their config `resources` label names, checked through Ray's state API.

    head:   ray start --head --num-cpus 4 --resources '{"learner_node": 4}'   (the CLI)
    worker: a second raylet joined at 127.0.0.1 with {"sampler_node": 4}     (see _join_node)

The options come from the pipelines' own builders: pipelines/online_dpo.py `role_options`
(sampler and learner actors), pipelines/bdhs.py `pool_kwargs` (a Ray Data actor pool, with
a stand-in for the BDHS operator) and `embedder_pool_kwargs` (the real embedder pool).
Only the processes of this cluster are stopped (never a plain `ray stop`).

Why the worker is not `ray start --address` (Ray 2.60, checked by
test_ray_start_address_cannot_join_over_loopback): the CLI's worker path refuses to run
with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (ray/scripts/scripts.py, "Multi-node Ray clusters
are not supported"), the setting that keeps a local Ray on loopback (scripts/test.sh,
tests/conftest.py, actors/runtime.py). With it on (Linux's default) `ray start` passes both
`--address` and `--node-ip-address` through services.resolve_ip_for_localhost, which turns
127.0.0.1/localhost into the host's routable IP: the worker dials the GCS there (where a
loopback head does not listen: "Failed to connect to GCS at address <host ip>:<port>")
and would bind its raylet to it. Another spelling of loopback (127.0.0.2, 127.1) is not
rewritten, but then the node's dashboard agent binds its gRPC server on all interfaces
(ray/dashboard/agent.py binds loopback only for a node IP that `is_localhost`). So the
worker is started the way `ray start --address` starts it internally (a non-head
ray._private.node.Node, as ray.cluster_utils does), with node IP 127.0.0.1 as given.
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

from tests.integration.test_online_job import _policy, _port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _ray_start(args: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run(
        [str(BIN / "ray"), "start", *args], env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _join_node(gcs_port: int, resources: dict[str, float]) -> Any:
    """A worker node (raylet + agents) joined to the head at 127.0.0.1:gcs_port: what
    `ray start --address=127.0.0.1:<port> --resources=...` does after its address
    handling (scripts.py builds these RayParams and this Node), minus the rewrite of
    127.0.0.1 to the routable IP (module docstring)."""
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

    from actors.embedder_pool import start_embedder_pool, stop_embedder_pool
    from actors.online import LearnerActor, SamplerActor, actor_options
    from mmalign.config import load
    from pipelines.bdhs import embedder_pool_kwargs, pool_kwargs
    from pipelines.online_dpo import role_options

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
                f"--ray-client-server-port={_port()}",  # not 10001: other clusters may run
                f"--resources={json.dumps({'learner_node': 4})}",
                *common,
            ],
            env,
        )
        worker = _join_node(gcs, {"sampler_node": 4})  # why not the CLI: module docstring
        cfg = load(
            str(ROOT / "pipelines" / "configs" / "shapes-cpu.yaml"),
            {
                "sampler.model": _policy(tmp_path),
                "sampler.concurrency": "2",
                "sampler.batch_size": "2",
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

        # the actors as pipelines/online_dpo.py starts them (its role_options)
        opts = role_options(cfg)
        sampler = SamplerActor.options(**opts["sampler"]).remote(S, L, None, "mn")
        learner = LearnerActor.options(**opts["learner"]).remote(S.model, L, S.dtype, "mn")
        # the BDHS embedder pool as pipelines/bdhs.py starts it (waits for the model load)
        embedders = start_embedder_pool(**embedder_pool_kwargs(cfg))
        ray.get([sampler.__ray_ready__.remote(), learner.__ray_ready__.remote()], timeout=180)
        assert ray.get(sampler.version.remote())[0] == 0  # it really works where it landed

        # a Ray Data actor pool with pipelines/bdhs.py's map_batches options
        ds = ray.data.from_items([{"id": i} for i in range(8)], override_num_blocks=4)
        ds = ds.map_batches(WhereAmI, **pool_kwargs(cfg))
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
        (e_actor,) = alive["EmbedderActor"]
        assert s_actor.node_id == labelled["sampler_node"]
        assert l_actor.node_id == labelled["learner_node"]
        assert e_actor.node_id == labelled["sampler_node"]
        assert s_actor.required_resources.get("sampler_node") == 0.5
        assert l_actor.required_resources.get("learner_node") == 1.0
        assert e_actor.required_resources.get("sampler_node") == 0.5
        pending = [a for a in by_class["SamplerActor"] if a.state != "ALIVE"]
        assert [a.state for a in pending] == ["PENDING_CREATION"], [a.state for a in pending]
        ray.kill(stray)
        stop_embedder_pool(embedders)
    finally:
        ray.shutdown()
        if worker is not None:
            worker.kill_all_processes(check_alive=False, allow_graceful=True)
        _stop_cluster(str(temp), gcs)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.ray
def test_ray_start_address_cannot_join_over_loopback() -> None:
    """The two reasons _join_node exists, as Ray 2.60 behaves. If this fails, Ray changed:
    try `ray start --address=127.0.0.1:<port> --node-ip-address=127.0.0.1` again."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ['PATH']}"}
    # 1. Loopback-only (as the suite runs): the CLI refuses before it starts anything.
    off = {**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    args = [f"--address=127.0.0.1:{_port()}", "--node-ip-address=127.0.0.1"]
    proc = subprocess.run(
        [str(BIN / "ray"), "start", *args, "--disable-usage-stats"],
        env=off,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "Multi-node Ray clusters are not supported" in proc.stdout + proc.stderr
    # 2. Clusters on (Linux's default): the address handling `ray start` applies to
    # --address and --node-ip-address moves 127.0.0.1 off loopback.
    on = {**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}
    code = (
        "from ray._private import services as s; "
        "print(s.canonicalize_bootstrap_address('127.0.0.1:6379')); "
        "print(s.resolve_ip_for_localhost('127.0.0.1'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=on, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    address, node_ip = out.stdout.split()
    if node_ip == "127.0.0.1":
        pytest.skip("this host has no routable IP: here the CLI would stay on loopback")
    assert address == f"{node_ip}:6379"
    assert not node_ip.startswith("127.")
