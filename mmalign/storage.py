"""Local and S3 storage behind one set of functions.

Every input, output and checkpoint path may be a local path or `s3://bucket/key`.
Datasets go through pyarrow's filesystem layer; object operations that need clear error
codes (bucket checks, directory upload/download) use boto3. Endpoint, region and
credentials come from the standard AWS environment/config (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, ~/.aws/config, instance roles, ...): this module never reads, logs or
stores secrets itself, and error messages name only the URI.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pyarrow.fs as pafs


class StorageError(OSError):
    """A storage operation failed; the message names the URI and a likely cause."""


T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How often an S3 operation is retried on a transient error (connection refused or
    reset, timeouts, HTTP 5xx, throttling) before it fails naming the URI. Waits double
    from `backoff_s` up to `max_backoff_s`; the defaults ride out ~15 s of an endpoint
    being away. Permanent errors (no such bucket, access denied) are never retried."""

    attempts: int = 6
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.backoff_s < 0 or self.max_backoff_s < self.backoff_s:
            raise ValueError(f"invalid RetryPolicy {self}")

    def waits(self) -> Iterator[float]:
        """The sleep before each retry (attempts - 1 of them)."""
        for i in range(self.attempts - 1):
            yield min(self.max_backoff_s, self.backoff_s * 2**i)


_POLICY = RetryPolicy()
log = logging.getLogger("mmalign.storage")

# Substrings of botocore / pyarrow (AWS SDK for C++) errors that mean "try again".
_TRANSIENT = (
    "could not connect",
    "connection refused",
    "connection reset",
    "connection was closed",
    "connectionclosed",
    "endpointconnectionerror",
    "connect timeout",
    "read timeout",
    "timed out",
    "curlcode",
    "couldn't connect",
    "broken pipe",
    "slowdown",
    "throttl",
    "requesttimeout",
    "internalerror",
    "serviceunavailable",
    "http response code: 5",
    "status code 5",
)


def set_retry_policy(policy: RetryPolicy) -> None:
    """Use `policy` for this process's storage calls (pipelines set it from the config)."""
    global _POLICY
    _POLICY = policy


def retry_policy() -> RetryPolicy:
    return _POLICY


def use_config(storage_cfg: Any) -> None:
    """Set this process's retry policy from config section `storage` (retries,
    retry_backoff_s); each pipeline calls it at start."""
    set_retry_policy(
        RetryPolicy(attempts=storage_cfg.retries, backoff_s=storage_cfg.retry_backoff_s)
    )


def is_transient(err: BaseException) -> bool:
    """Whether a storage error is worth retrying (the endpoint may come back)."""
    response = getattr(err, "response", None)
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(status, int) and status >= 500:
            return True
        code = str(response.get("Error", {}).get("Code", "")).lower()
        if code in ("slowdown", "throttling", "requesttimeout", "internalerror", "503", "500"):
            return True
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    text = f"{type(err).__name__} {err}".lower()
    return any(k in text for k in _TRANSIENT)


def with_retries(uri: str, fn: Callable[[], T]) -> T:
    """fn(), retried under the retry policy while it fails transiently; a permanent error or
    the last transient one is raised as a StorageError naming `uri` (never credentials)."""
    for wait in (*_POLICY.waits(), None):
        try:
            return fn()
        except StorageError:
            raise
        except Exception as err:  # botocore / pyarrow raise many types
            if wait is None or not is_transient(err):
                if is_transient(err):
                    raise StorageError(
                        f"{uri}: storage unreachable after {_POLICY.attempts} attempts "
                        f"({type(err).__name__}); rerun to resume once it is back"
                    ) from None
                raise _explain(uri, err) from None
            # the URI and the error's type only: messages may quote request details
            log.warning("%s: transient %s, retrying in %.2f s", uri, type(err).__name__, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """'s3://bucket/a/b' -> ('bucket', 'a/b')."""
    if not is_s3(uri):
        raise StorageError(f"{uri}: not an s3:// URI")
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{uri}: missing bucket name")
    return bucket, key


def join(base: str, *parts: str) -> str:
    """Join path parts with '/' for URIs, os.path.join for local paths."""
    if is_s3(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(os.path.expanduser(base), *parts)


def _s3_client() -> Any:
    import boto3

    # A fresh session per client: boto3's default session caches the credentials it first
    # resolved, so a rotated key (or a corrected environment) would otherwise be ignored.
    # boto3 reads AWS_ENDPOINT_URL / credentials / region from the environment itself.
    return boto3.session.Session().client("s3")


def _explain(uri: str, err: Exception) -> StorageError:
    """Turn a boto3/pyarrow error into a message naming the URI, never the credentials."""
    text = str(err)
    code = ""
    response = getattr(err, "response", None)
    if isinstance(response, dict):
        code = str(response.get("Error", {}).get("Code", ""))
    low = (code + " " + text).lower()
    if "nosuchbucket" in low or ("bucket" in low and "not exist" in low) or code == "404":
        hint = "the bucket does not exist (create it or fix the bucket name)"
    elif any(
        k in low
        for k in (
            "invalidaccesskeyid",
            "signaturedoesnotmatch",
            "access denied",
            "accessdenied",
            "forbidden",
            "403",
            "credentials",
        )
    ):
        hint = (
            "access denied: check AWS credentials (AWS_ACCESS_KEY_ID/AWS_PROFILE/instance "
            "role) and the bucket policy"
        )
    elif "nosuchkey" in low or "not found" in low or "no such file" in low:
        hint = "no such object"
    else:
        hint = type(err).__name__
    return StorageError(f"{uri}: {hint}")


def check_bucket(uri: str) -> None:
    """Fail early, with a clear message, if an s3:// URI's bucket is missing or forbidden."""
    if not is_s3(uri):
        return
    bucket, _ = split_s3(uri)
    with_retries(uri, lambda: _s3_client().head_bucket(Bucket=bucket))


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local path or s3:// URI."""
    if is_s3(uri):
        try:
            fs, path = pafs.FileSystem.from_uri(uri)
        except Exception as err:
            raise _explain(uri, err) from None
        return fs, path
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def read_bytes(uri: str) -> bytes:
    if not is_s3(uri):
        try:
            return Path(os.path.expanduser(uri)).read_bytes()
        except OSError as err:
            raise StorageError(f"{uri}: {err.strerror or err}") from None
    bucket, key = split_s3(uri)
    return with_retries(
        uri, lambda: bytes(_s3_client().get_object(Bucket=bucket, Key=key)["Body"].read())
    )


def write_bytes(uri: str, data: bytes) -> None:
    """Write atomically: a crash never leaves a half-written file under the final name."""
    if not is_s3(uri):
        path = Path(os.path.expanduser(uri))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return
    bucket, key = split_s3(uri)
    # S3 PUTs are atomic, so a retried PUT never leaves a partial object behind.
    with_retries(uri, lambda: _s3_client().put_object(Bucket=bucket, Key=key, Body=data))


def exists(uri: str) -> bool:
    if not is_s3(uri):
        return os.path.exists(os.path.expanduser(uri))
    bucket, key = split_s3(uri)

    def probe() -> bool:
        client = _s3_client()
        if key and not key.endswith("/"):
            try:
                client.head_object(Bucket=bucket, Key=key)
                return True
            except Exception as err:
                if "404" not in str(err) and "Not Found" not in str(err):
                    raise
        prefix = key.rstrip("/") + "/" if key else ""
        resp = client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
        return int(resp.get("KeyCount", 0)) > 0

    return with_retries(uri, probe)


def list_files(uri: str) -> Iterator[str]:
    """All files under a directory/prefix, as full paths/URIs, sorted."""
    if not is_s3(uri):
        root = Path(os.path.expanduser(uri))
        if not root.exists():
            return
        yield from sorted(str(p) for p in root.rglob("*") if p.is_file())
        return
    bucket, key = split_s3(uri)
    prefix = key.rstrip("/") + "/" if key else ""

    def keys_under() -> list[str]:
        pages = _s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]

    keys = with_retries(uri, keys_under)
    yield from (f"s3://{bucket}/{k}" for k in sorted(keys))


def upload_dir(local_dir: str, uri: str) -> None:
    """Copy a local directory tree to a local path or s3:// prefix."""
    src = Path(local_dir)
    if not src.is_dir():
        raise StorageError(f"{local_dir}: not a directory")
    if not is_s3(uri):
        # copyfile, not copy2: files get this process's default mode (umask), not the
        # source's — a temp dir's 0600 files would otherwise land 0600 beside 0644 ones.
        shutil.copytree(
            src, os.path.expanduser(uri), dirs_exist_ok=True, copy_function=shutil.copyfile
        )
        return
    bucket, key = split_s3(uri)
    client = _s3_client()
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = path.relative_to(src).as_posix()
        target = f"{key.rstrip('/')}/{rel}".lstrip("/")
        with_retries(
            f"{uri.rstrip('/')}/{rel}",
            lambda p=path, t=target: client.upload_file(str(p), bucket, t),  # type: ignore[misc]
        )


def download_dir(uri: str, local_dir: str) -> str:
    """Copy everything under an s3:// prefix (or local dir) into local_dir; returns it."""
    dst = Path(local_dir)
    dst.mkdir(parents=True, exist_ok=True)
    if not is_s3(uri):
        shutil.copytree(os.path.expanduser(uri), dst, dirs_exist_ok=True)
        return str(dst)
    bucket, key = split_s3(uri)
    prefix = key.rstrip("/") + "/" if key else ""
    client = _s3_client()
    found = False
    for file_uri in list_files(uri):
        found = True
        _, obj_key = split_s3(file_uri)
        target = dst / obj_key[len(prefix) :]
        target.parent.mkdir(parents=True, exist_ok=True)
        with_retries(
            file_uri,
            lambda k=obj_key, t=target: client.download_file(bucket, k, str(t)),  # type: ignore[misc]
        )
    if not found:
        raise StorageError(f"{uri}: no objects under this prefix")
    return str(dst)


def localize(uri: str, cache_dir: str = "~/.cache/mmalign") -> str:
    """A local directory holding `uri`: local paths as is, s3:// prefixes downloaded once.

    The cache key is the URI's hash; a completed download is marked by a `.complete` file
    so an interrupted download is retried rather than used half-written.
    """
    if not is_s3(uri):
        return os.path.expanduser(uri)
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    target = Path(os.path.expanduser(cache_dir)) / "s3" / digest
    marker = target / ".complete"
    if not marker.exists():
        if target.exists():
            shutil.rmtree(target)
        download_dir(uri, str(target))
        marker.write_text(uri)
    return str(target)
