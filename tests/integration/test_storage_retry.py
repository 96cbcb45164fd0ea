"""Transient S3 errors are retried with backoff; an endpoint that stays away fails naming
the URI. The endpoint is a real moto server behind a loopback TCP proxy that the test
takes down and brings back (moto keeps its buckets; only the network goes away)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from mmalign import io as mio
from mmalign import storage
from mmalign.storage import RetryPolicy, StorageError
from tests.faults import Proxy, proxied_s3


@pytest.fixture()
def proxied(s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Proxy]]:
    with proxied_s3(monkeypatch) as proxy:
        yield s3_bucket, proxy


def test_retry_policy_waits_double_up_to_the_cap() -> None:
    assert list(RetryPolicy(attempts=6, backoff_s=0.5, max_backoff_s=3).waits()) == [
        0.5,
        1.0,
        2.0,
        3.0,
        3.0,
    ]
    assert list(RetryPolicy(attempts=1).waits()) == []
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)


def test_transient_and_permanent_errors_are_told_apart() -> None:
    from botocore.exceptions import ClientError, EndpointConnectionError

    def client_error(code: str, status: int) -> ClientError:
        body = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
        return ClientError(body, "PutObject")  # type: ignore[arg-type]

    assert storage.is_transient(EndpointConnectionError(endpoint_url="http://x"))
    assert storage.is_transient(ConnectionRefusedError())
    assert storage.is_transient(client_error("SlowDown", 503))
    assert storage.is_transient(client_error("InternalError", 500))
    assert storage.is_transient(OSError("AWS Error NETWORK_CONNECTION during ... curlCode: 7"))
    assert not storage.is_transient(client_error("NoSuchBucket", 404))
    assert not storage.is_transient(client_error("AccessDenied", 403))


def test_write_survives_the_endpoint_going_away_and_coming_back(
    proxied: tuple[str, Proxy],
) -> None:
    bucket, proxy = proxied
    storage.set_retry_policy(RetryPolicy(attempts=8, backoff_s=0.25, max_backoff_s=1.0))
    storage.write_bytes(f"{bucket}/before.txt", b"1")
    proxy.stop()
    threading.Timer(2.0, proxy.start).start()  # back after ~2 s, mid-retry
    t0 = time.time()
    storage.write_bytes(f"{bucket}/during.txt", b"2")
    assert time.time() - t0 >= 1.5  # it really waited for the endpoint
    rows = [{"id": "a", "x": 1}]
    import pyarrow as pa

    proxy.stop()
    threading.Timer(2.0, proxy.start).start()
    mio.write_parquet(
        rows, f"{bucket}/shard.parquet", pa.schema([("id", pa.string()), ("x", pa.int64())])
    )
    assert storage.read_bytes(f"{bucket}/during.txt") == b"2"
    assert mio.read_parquet(f"{bucket}/shard.parquet").to_pylist() == rows


def test_endpoint_that_stays_away_fails_naming_the_uri(proxied: tuple[str, Proxy]) -> None:
    bucket, proxy = proxied
    storage.set_retry_policy(RetryPolicy(attempts=3, backoff_s=0.1, max_backoff_s=0.2))
    proxy.stop()
    t0 = time.time()
    with pytest.raises(StorageError) as err:
        storage.write_bytes(f"{bucket}/x.txt", b"1")
    assert str(err.value).startswith(f"{bucket}/x.txt: storage unreachable after 3 attempts")
    assert time.time() - t0 < 30
    with pytest.raises(StorageError, match=r"missing bucket|does not exist|unreachable"):
        storage.read_bytes(f"{bucket}/x.txt")
