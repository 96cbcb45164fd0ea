"""The product's main command on a real local Ray head, submitted with `ray job submit`.

Checks: the job succeeds, checkpoints / pair logs / summary exist, the pipeline's custom
metrics appear at the node's Prometheus endpoint, and rerunning resumes from the checkpoint.
Then mode rloo as a job whose driver is killed mid-run (`ray job stop`) and resubmitted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mmalign.engines.checkpoint import latest_checkpoint
from mmalign.models.tiny_llava import build_tiny_llava

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _policy(tmp: Path) -> str:
    """The shipped tiny policy when present (it produces judged pairs), else a random one."""
    shipped = ROOT / "assets" / "models" / "shapes-llava-small"
    if (shipped / "config.json").exists():
        return str(shipped)
    model, processor = build_tiny_llava("small", seed=0)
    model.save_pretrained(tmp / "policy")
    processor.save_pretrained(tmp / "policy")
    return str(tmp / "policy")


@pytest.mark.ray
@pytest.mark.slow
def test_ray_job_submit_online_dpo_on_cpu(tmp_path: Path) -> None:
    # RAY_AUTH_MODE=disabled: a loopback-only test head needs no token (Ray 2.60's
    # `ray start` turns token auth on by default; the job client would need the token file).
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "OMP_NUM_THREADS": "1",
        "PATH": f"{BIN}:{os.environ['PATH']}",
    }
    dash, metrics_port, gcs = _port(), _port(), _port()
    temp = Path("/tmp") / f"rayt{gcs}"  # short: unix socket paths are length-limited
    subprocess.run(
        [
            "ray",
            "start",
            "--head",
            f"--port={gcs}",
            "--num-cpus=8",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            "--node-ip-address=127.0.0.1",
            f"--metrics-export-port={metrics_port}",
            f"--temp-dir={temp}",
            "--disable-usage-stats",
        ],
        env=env,
        check=True,
        capture_output=True,
        timeout=180,
    )
    try:
        out = tmp_path / "run"
        args = [
            "--config",
            "pipelines/configs/shapes-cpu.yaml",
            "--sampler.model",
            _policy(tmp_path),
            "--learner.steps",
            "4",
            "--learner.batch_size",
            "4",
            "--sampler.max_new_tokens",
            "24",
            "--storage.checkpoint_every",
            "2",
            "--storage.output_dir",
            str(out),
            "--pipeline.eval_rows",
            "2",
            "--name",
            "jobtest",
        ]
        address = f"http://127.0.0.1:{dash}"
        _wait_for_job_agent(address, env)
        main_job = ["ray", "job", "submit", "--address", address, "--working-dir", ".", "--"]
        main_job += ["python", "pipelines/online_dpo.py", *args]
        job = subprocess.Popen(
            main_job,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        seen: set[str] = set()
        deadline = time.time() + 600
        while job.poll() is None and time.time() < deadline:
            try:
                body = (
                    urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5)
                    .read()
                    .decode()
                )
                seen |= {
                    line.split("{")[0]
                    for line in body.splitlines()
                    if line.startswith("ray_mmalign_") or line.startswith("mmalign_")
                }
            except OSError:
                pass
            time.sleep(2)
        log = job.communicate(timeout=60)[0]
        assert job.returncode == 0, log[-4000:]
        assert "succeeded" in log.lower(), log[-2000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["steps"] == 4
        assert latest_checkpoint(str(out / "checkpoints")) == str(
            out / "checkpoints" / "step_000004"
        )
        assert (out / "checkpoints" / "step_000002" / "trainer_state.pt").exists()
        assert (out / "checkpoints" / "step_000004" / "adapter_config.json").exists()
        assert len(list((out / "pairs").glob("step-*.jsonl"))) == 4
        assert (out / "merged" / "config.json").exists() and (out / "eval" / "report.json").exists()
        assert any(name.endswith("mmalign_weight_version") for name in seen), sorted(seen)
        assert any("mmalign_samples" in name for name in seen), sorted(seen)
        # the actors' own busy timers (exported from the sampler/judge/learner processes)
        assert any("mmalign_busy_seconds" in name for name in seen), sorted(seen)
        assert set(summary["loop"]["busy_fraction"]) == {"sampler", "judge", "learner"}
        # the base policy's figures beside the trained one's, and the judge's tie rate
        base = json.loads((out / "eval" / "base_report.json").read_text())
        assert base["model"] == _policy(tmp_path) and base["n_images"] == 2
        assert set(summary["base_eval"]) == set(summary["eval"]) >= {"CHAIR_i", "Recall"}
        assert summary["base_eval"]["CHAIR_i"] == base["chair"]["chair_i"]
        assert 0.0 <= summary["judge"]["tie_rate"] <= 1.0
        assert re.search(r"^CHAIR_i +[\d.]+ +[\d.]+ +[+-][\d.]+$", log, re.M), log[-3000:]

        # rerun the same command: it resumes at step 4 and has nothing left to train
        again = subprocess.run(
            [
                *main_job,
                "--pipeline.eval_rows",
                "0",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert again.returncode == 0, again.stdout[-3000:]
        assert "resumed from" in again.stdout and "at step 4" in again.stdout

        # mode rloo (the RLHF baseline) as a job: its driver killed (`ray job stop`) after
        # the step-2 checkpoint, the same command resumes there and completes the run
        rloo_out = tmp_path / "rloo"
        rloo_args = [
            "--config", "pipelines/configs/shapes-cpu.yaml", "--sampler.model", _policy(tmp_path),
            "--pipeline.mode", "rloo", "--sampler.samples_per_prompt", "4",
            "--learner.steps", "12", "--learner.batch_size", "3", "--sampler.max_new_tokens", "16",
            "--storage.checkpoint_every", "1", "--storage.output_dir", str(rloo_out),
            "--pipeline.eval_rows", "0", "--name", "rlootest",
        ]  # fmt: skip
        submit = ["ray", "job", "submit", "--address", address, "--working-dir", "."]
        run_rloo = ["python", "pipelines/online_dpo.py", *rloo_args]
        first = subprocess.run(
            [*submit, "--submission-id", "rloo-1", "--no-wait", "--", *run_rloo],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
        deadline = time.time() + 300
        while not (rloo_out / "checkpoints" / "step_000002" / "trainer_state.pt").exists():
            assert time.time() < deadline, "no step-2 checkpoint"
            time.sleep(0.2)
        stop = ["ray", "job", "stop", "--address", address, "rloo-1"]
        subprocess.run(stop, env=env, capture_output=True, text=True, timeout=120, check=True)
        assert not (rloo_out / "summary.json").exists()  # killed before the end
        resumed = subprocess.run(
            [*submit, "--submission-id", "rloo-2", "--", *run_rloo],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert resumed.returncode == 0, resumed.stdout[-3000:]
        assert "resumed from" in resumed.stdout, resumed.stdout[-3000:]
        rloo = json.loads((rloo_out / "summary.json").read_text())
        assert rloo["mode"] == "rloo" and rloo["steps"] == 12
        assert rloo["loop"]["steps"] < 12  # the rerun did not start over
        logs = sorted((rloo_out / "pairs").glob("step-*.jsonl"))
        assert [p.name for p in logs] == [f"step-{i:06d}.jsonl" for i in range(12)]
    finally:
        _stop_cluster(str(temp), gcs)
        shutil.rmtree(temp, ignore_errors=True)


def _wait_for_job_agent(address: str, env: dict[str, str]) -> None:
    """The head answers before its job agent is up ("No available agent"): wait for it."""
    deadline = time.time() + 120
    while True:
        probe = subprocess.run(
            ["ray", "job", "submit", "--address", address, "--", "true"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if probe.returncode == 0 or time.time() > deadline:
            assert probe.returncode == 0, probe.stdout[-2000:] + probe.stderr[-2000:]
            return
        time.sleep(3)


def _stop_cluster(temp: str, gcs_port: int) -> None:
    """Stop only *this* head (plain `ray stop` would kill every Ray on the machine)."""
    import psutil

    mine = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info.get("cmdline") or [])
        if temp in cmd or f"127.0.0.1:{gcs_port}" in cmd:
            mine.append(proc)
    for proc in mine:
        proc.terminate()
    _, alive = psutil.wait_procs(mine, timeout=15)
    for proc in alive:
        proc.kill()
