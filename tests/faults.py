"""Fault injection for the fault tests: kill a role's actor process for real; take an S3
endpoint away and bring it back (`Proxy`)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def actor_pids(class_name: str) -> list[int]:
    """Processes of this test's own Ray cluster (children of this process) hosting an actor
    of `class_name`: Ray titles an actor's worker process 'ray::<Class>...'. Scoped to our
    children so another Ray cluster on the machine is never touched."""
    import psutil

    pids = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if " ".join(proc.cmdline()).startswith(f"ray::{class_name}"):
                pids.append(proc.pid)
        except psutil.Error:
            continue
    return pids


def kill_when_exists(
    marker: Path, class_name: str, killed: list[int], wait_s: float = 300, count: int = 0
) -> None:
    """Once `marker` exists (or after wait_s), SIGKILL every `class_name` actor process (the
    first `count` of them when count > 0) and record the pids in `killed` (run it in a
    thread beside the pipeline)."""
    deadline = time.time() + wait_s
    while time.time() < deadline and not marker.exists():
        time.sleep(0.2)
    pids = actor_pids(class_name)
    for pid in pids[:count] if count else pids:
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)


def pair_logs_once(out: Path, steps: int, total_pairs: int) -> list[dict]:
    """The online run's pair logs, checked: one file per step, every pair trained on once
    (by id and by (id, weight version)), as many as the summary counted (> 0)."""
    import json

    paths = sorted((out / "pairs").glob("step-*.jsonl"))
    rows = [json.loads(line) for path in paths for line in path.read_text().splitlines()]
    assert len(paths) == steps
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "a pair was trained on twice"
    assert len({(r["id"], r["version"]) for r in rows}) == len(rows)
    assert len(rows) == total_pairs > 0
    return rows


class Proxy:
    """A loopback TCP forwarder to `target`; stop() refuses connections and cuts open ones."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self.server: socket.socket | None = None
        self.conns: list[socket.socket] = []

    def start(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(64)
        self.server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            # shutdown wakes the accept() thread (close alone leaves the socket listening)
            with contextlib.suppress(OSError):
                self.server.shutdown(socket.SHUT_RDWR)
            self.server.close()
            self.server = None
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()
        self.conns = []

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def proxied_s3(monkeypatch: Any) -> Iterator[Proxy]:
    """Route this test's S3 traffic (AWS_ENDPOINT_URL, set by the s3_env fixture) through a
    started `Proxy`; botocore's own retries off, so only the storage policy retries. The
    process's retry policy is restored afterwards."""
    from urllib.parse import urlparse

    from mmalign import storage

    url = urlparse(os.environ["AWS_ENDPOINT_URL"])
    proxy = Proxy((url.hostname or "127.0.0.1", int(url.port or 80)))
    proxy.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # our policy, not botocore's, is measured
    old = storage.retry_policy()
    try:
        yield proxy
    finally:
        storage.set_retry_policy(old)
        proxy.stop()


POLICY = Path(__file__).resolve().parents[1] / "assets/models/shapes-llava-small"


def small_bdhs_config(tmp_path: Path, rows: int, **more: Any) -> tuple[Any, list[str]]:
    """(config, prompt ids) of a short bdhs.py run the fault tests count by id: `rows`
    ShapesWorld prompts as Parquet under tmp_path, the shipped tiny policy, 8 new tokens,
    batches and shards of 4, identical pairs flagged (every row kept); `more` overrides
    (e.g. storage.output_dir, bdhs.n_bdhs, storage.retries)."""
    from mmalign import io as mio
    from mmalign.config import load

    records, quarantine = mio.read_prompts("shapesworld:pref", max_rows=rows)
    assert not quarantine
    mio.write_prompts(records, str(tmp_path / "prompts.parquet"))
    cfg = load(
        None,
        {
            "data.prompts": str(tmp_path / "prompts.parquet"),
            "sampler.model": str(POLICY),
            "sampler.max_new_tokens": 8,
            "sampler.batch_size": 4,
            "bdhs.splitter": "regex",
            "bdhs.identical": "flag",  # keep every row: the fault tests count them by id
            "storage.shard_rows": 4,
            **more,
        },
    )
    return cfg, [r["id"] for r in records]
