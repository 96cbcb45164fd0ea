"""Storage against a real S3-compatible HTTP server (moto standalone, IAM auth on)."""

from __future__ import annotations

import io
import logging

import pyarrow.parquet as pq
import pytest

from mmalign import io as mio
from mmalign import storage
from mmalign.schema import preference_row


def _row(i: int) -> dict:
    return preference_row(
        id=f"r{i}",
        prompt="What is in the image?",
        chosen="A red circle.",
        rejected="A blue square.",
        images=[b"\x89PNG fake"],
        source="t",
        method="bdhs",
    )


def test_dataset_roundtrip_through_s3(s3_bucket: str) -> None:
    uri = f"{s3_bucket}/prefs/part-00000.parquet"
    mio.write_preferences([_row(0), _row(1)], uri)
    table = mio.read_parquet(f"{s3_bucket}/prefs")
    assert table.column("id").to_pylist() == ["r0", "r1"]
    assert list(mio.iter_shards(f"{s3_bucket}/prefs")) == [uri]
    # the same bytes through the object API
    raw = storage.read_bytes(uri)
    assert pq.read_table(io.BytesIO(raw)).num_rows == 2


def test_checkpoint_dir_roundtrip_through_s3(s3_bucket: str, tmp_path) -> None:
    ckpt = tmp_path / "ckpt"
    (ckpt / "sub").mkdir(parents=True)
    (ckpt / "adapter_model.safetensors").write_bytes(b"\x00\x01weights")
    (ckpt / "sub" / "state.json").write_text('{"step": 7}')
    storage.upload_dir(str(ckpt), f"{s3_bucket}/ckpt/step-7")
    assert storage.exists(f"{s3_bucket}/ckpt/step-7")
    assert not storage.exists(f"{s3_bucket}/ckpt/step-8")
    local = storage.localize(f"{s3_bucket}/ckpt/step-7", cache_dir=str(tmp_path / "cache"))
    assert (tmp_path / "cache").as_posix() in local
    with open(f"{local}/adapter_model.safetensors", "rb") as f:
        assert f.read() == b"\x00\x01weights"
    with open(f"{local}/sub/state.json") as f:
        assert f.read() == '{"step": 7}'


def test_missing_bucket_is_a_clear_error(s3_env: dict) -> None:
    with pytest.raises(storage.StorageError, match="s3://no-such-bucket-x.*does not exist"):
        storage.check_bucket("s3://no-such-bucket-x/data")
    with pytest.raises(storage.StorageError, match="no-such-bucket-x"):
        storage.write_bytes("s3://no-such-bucket-x/a.txt", b"x")


def test_wrong_credentials_are_a_clear_error_without_secrets(
    s3_bucket: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "WRONGSECRETwrongsecret1234"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    caplog.set_level(logging.DEBUG, logger="mmalign")
    with pytest.raises(storage.StorageError, match="access denied") as err:
        storage.check_bucket(f"{s3_bucket}/x")
    assert secret not in str(err.value)
    with pytest.raises(storage.StorageError, match="access denied") as err:
        storage.read_bytes(f"{s3_bucket}/x")
    assert secret not in str(err.value) and secret not in caplog.text


def test_local_write_is_atomic_and_creates_dirs(tmp_path) -> None:
    target = tmp_path / "a" / "b.bin"
    storage.write_bytes(str(target), b"123")
    assert target.read_bytes() == b"123"
    assert [p.name for p in target.parent.iterdir()] == ["b.bin"]  # no temp file left
    with pytest.raises(storage.StorageError, match="nope"):
        storage.read_bytes(str(tmp_path / "nope"))


def test_upload_dir_gives_files_the_default_mode(tmp_path) -> None:
    """safetensors writes 0600; an exported model dir must not mix 0600 and 0644 files."""
    import os

    src = tmp_path / "src"
    src.mkdir()
    (src / "model.safetensors").write_bytes(b"x")
    (src / "model.safetensors").chmod(0o600)
    (src / "config.json").write_text("{}")
    storage.upload_dir(str(src), str(tmp_path / "dst"))
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "dst").iterdir()}
    assert modes == {"model.safetensors": 0o666 & ~umask, "config.json": 0o666 & ~umask}
