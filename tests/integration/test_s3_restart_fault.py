"""Fault tolerance of pipelines/bdhs.py writing to S3: the endpoint goes away mid-run.

The endpoint is the real moto server behind a loopback proxy (`tests.faults.Proxy`) that
the test stops once the first shard is in the bucket. Back within the retry budget
(`storage.retries`), the run completes; gone for good, the run fails naming the URI, and
a rerun once it is back resumes. Either way every row is in the bucket once, by id.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mmalign import io as mio
from mmalign import storage
from tests.faults import Proxy, proxied_s3, small_bdhs_config

ROWS = 12  # 3 shards of 4


@pytest.fixture()
def endpoint(s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Proxy, str]]:
    """(bucket URI, the proxy its traffic goes through, moto's own URL); a local Ray
    cluster is started after the proxy, so its workers see the proxied endpoint too."""
    import ray

    direct = os.environ["AWS_ENDPOINT_URL"]
    with proxied_s3(monkeypatch) as proxy:
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
        try:
            yield s3_bucket, proxy, direct
        finally:
            ray.shutdown()


class _Retries(logging.Handler):
    """Sets `seen` at the first retry warning of mmalign.storage (a call hit the outage)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen = threading.Event()
        self.uris: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.uris.append(str(record.args[0]) if record.args else "")
        self.seen.set()


def _stop_after_first_shard(
    bucket: str, proxy: Proxy, direct: str, stopped: threading.Event
) -> None:
    """Poll moto directly (not through the proxy) for part-00000, then take the endpoint
    away."""
    import time

    import boto3

    s3 = boto3.client("s3", endpoint_url=direct)
    name = storage.split_s3(bucket)[0]
    deadline = time.time() + 300
    while time.time() < deadline:
        if s3.list_objects_v2(Bucket=name, Prefix="run/bdhs/part-").get("KeyCount", 0):
            break
        time.sleep(0.1)
    proxy.stop()
    stopped.set()


def _config(tmp_path: Path, bucket: str, retries: int, backoff_s: float) -> tuple[Any, list[str]]:
    return small_bdhs_config(
        tmp_path,
        ROWS,
        **{
            "bdhs.n_bdhs": 2,
            "storage.output_dir": f"{bucket}/run",
            "storage.retries": retries,
            "storage.retry_backoff_s": backoff_s,
        },
    )


def _ids_in_bucket(bucket: str) -> list[str]:
    shards = [u for u in storage.list_files(f"{bucket}/run/bdhs") if u.endswith(".parquet")]
    return [i for u in shards for i in mio.read_parquet(u).column("id").to_pylist()]


@pytest.mark.ray
@pytest.mark.slow
def test_s3_endpoint_back_within_the_retry_budget_the_bdhs_run_completes(
    endpoint: tuple[str, Proxy, str], tmp_path: Path
) -> None:
    from pipelines.bdhs import run_bdhs

    bucket, proxy, direct = endpoint
    # waits 0.25, 0.5, 1, 2, 4, 8, 8 s: ~24 s of outage ridden out
    cfg, ids = _config(tmp_path, bucket, retries=8, backoff_s=0.25)
    retries, stopped = _Retries(), threading.Event()
    logging.getLogger("mmalign.storage").addHandler(retries)

    def restart() -> None:
        stopped.wait(300)
        retries.seen.wait(120)  # a storage call of the run is waiting for the endpoint
        threading.Timer(1.0, proxy.start).start()

    watcher = threading.Thread(
        target=_stop_after_first_shard, args=(bucket, proxy, direct, stopped)
    )
    restarter = threading.Thread(target=restart)
    watcher.start()
    restarter.start()
    try:
        summary = run_bdhs(cfg)
    finally:
        watcher.join()
        restarter.join()
        logging.getLogger("mmalign.storage").removeHandler(retries)
    assert retries.seen.is_set(), "no storage call hit the outage: the test proved nothing"
    assert all(u.startswith(f"{bucket}/run/") for u in retries.uris)
    assert summary["total_rows"] == summary["rows"] == ROWS
    got = _ids_in_bucket(bucket)
    assert sorted(got) == sorted(ids) and len(got) == len(set(got))


@pytest.mark.ray
@pytest.mark.slow
def test_s3_endpoint_that_stays_away_fails_naming_the_uri_and_a_rerun_resumes(
    endpoint: tuple[str, Proxy, str], tmp_path: Path
) -> None:
    import ray

    from pipelines.bdhs import run_bdhs

    bucket, proxy, direct = endpoint
    cfg, ids = _config(tmp_path, bucket, retries=2, backoff_s=0.1)
    stopped = threading.Event()
    watcher = threading.Thread(
        target=_stop_after_first_shard, args=(bucket, proxy, direct, stopped)
    )
    watcher.start()
    with pytest.raises(storage.StorageError) as err:
        run_bdhs(cfg)
    watcher.join()
    assert stopped.is_set()
    message = str(err.value)
    assert message.startswith(f"{bucket}/run/") and "unreachable after 2 attempts" in message
    assert "rerun to resume" in message

    # the endpoint is back; the rerun (a fresh cluster, as a new job would get) resumes
    ray.shutdown()
    proxy.start()
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    summary = run_bdhs(cfg)
    assert summary["total_rows"] == ROWS
    assert 4 <= ROWS - summary["rows"] < ROWS, "the rerun did not resume the written shards"
    got = _ids_in_bucket(bucket)
    assert sorted(got) == sorted(ids) and len(got) == len(set(got))
