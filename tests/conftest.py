"""Shared fixtures: a real S3-compatible HTTP server (moto standalone) on loopback.

The server runs as a separate process with IAM authentication switched on, so tests see
real HTTP, real signatures and real error codes (wrong credentials, missing bucket).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import torch

# Keep every Ray listener on loopback in tests (see the brief: Ray binds the external
# address otherwise).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# One auth mode for every cluster the suite starts (local ray.init, `ray start` heads):
# Ray caches the mode per process, so a test that connected with auth disabled left the
# next in-process local cluster unable to reach its own GCS. Loopback only, so no token.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Two cores shared by pytest, Ray workers and servers: torch's default intra-op threading
# oversubscribes them (the learner tests ran ~8x slower). Ray workers get it via env.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict[str, str]]:
    """Start moto's server on 127.0.0.1 and yield env vars with valid credentials.

    The first 3 requests are unauthenticated (moto's INITIAL_NO_AUTH_ACTION_COUNT): we
    spend them creating an IAM user, its access key and an s3:* policy. Every request after
    that must be signed with that key.
    """
    import boto3

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3", "MOTO_PORT": str(port)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.2)
        else:
            raise RuntimeError("moto server did not start")
        boot = dict(
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="bootstrap",
            aws_secret_access_key="bootstrap",
        )
        iam = boto3.client("iam", **boot)
        iam.create_user(UserName="mmalign-test")
        key = iam.create_access_key(UserName="mmalign-test")["AccessKey"]
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
        }
        iam.put_user_policy(
            UserName="mmalign-test", PolicyName="s3", PolicyDocument=json.dumps(policy)
        )
        yield {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
        }
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture()
def s3_env(s3_server: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The S3 server's env applied to this test (and to subprocesses it starts)."""
    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return s3_server


@pytest.fixture()
def s3_bucket(s3_env: dict[str, str]) -> str:
    """A fresh bucket; returns 's3://<name>'."""
    import uuid

    import boto3

    name = f"mmalign-{uuid.uuid4().hex[:10]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"
