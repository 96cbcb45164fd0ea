"""load_model: local dirs, s3:// prefixes (real moto server) and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmalign.models.loading import load_model
from mmalign.models.tiny_llava import build_tiny_llava


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    model, processor = build_tiny_llava("small", seed=5)
    path = tmp_path_factory.mktemp("saved")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path, model.lm_head.weight.detach().clone()


def test_load_local_dir_with_dtype_on_cpu(saved: tuple[Path, torch.Tensor]) -> None:
    path, head = saved
    model, processor = load_model(str(path))
    assert not model.training and type(processor).__name__ == "LlavaProcessor"
    torch.testing.assert_close(model.lm_head.weight, head)
    model16, _ = load_model(str(path), dtype="bfloat16")
    assert model16.lm_head.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        load_model(str(path), dtype="int8")


def test_not_a_model_dir_names_the_path_on_cpu(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}: not a model directory"):
        load_model(str(tmp_path))
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=f"{missing}: not a directory"):
        load_model(str(missing))


def test_load_from_s3_on_cpu(
    saved: tuple[Path, torch.Tensor], s3_bucket: str, tmp_path: Path, monkeypatch
) -> None:
    from mmalign import storage

    monkeypatch.setenv("HOME", str(tmp_path))  # localize caches under ~/.cache/mmalign
    path, head = saved
    uri = f"{s3_bucket}/models/tiny"
    storage.upload_dir(str(path), uri)
    model, processor = load_model(uri)
    torch.testing.assert_close(model.lm_head.weight, head)
    assert processor.tokenizer.eos_token == "</s>"

    empty = f"{s3_bucket}/models/none"
    with pytest.raises(OSError, match="models/none"):
        load_model(empty)
