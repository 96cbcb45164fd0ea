"""BDHSEngine, the one engine behind the BDHS operator and online BDHS, without Ray.

The shipped tiny policy generates; the embedder is bench_vllm's character-count stand-in, so the
gate's decisions are deterministic. Both hosts' behaviour is tested in
test_bdhs_pipeline_on_cpu.py and test_online_bdhs_on_cpu.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.bench_vllm import char_embed
from mmalign import config
from mmalign.engines.bdhs_engine import POVID_NOISE_STEPS, BDHSEngine, BDHSRow, image_noise_steps

POLICY = Path(__file__).resolve().parents[2] / "assets" / "models" / "shapes-llava-small"


@pytest.fixture(scope="module")
def hf_engine():  # noqa: ANN201
    from mmalign.engines.hf_generation import HFGenerationEngine
    from mmalign.models.loading import load_model

    if not (POLICY / "config.json").exists():
        from mmalign.models.tiny_llava import build_tiny_llava

        return HFGenerationEngine(*build_tiny_llava("small", seed=0))
    return HFGenerationEngine(*load_model(str(POLICY), "float32", "cpu"))


def test_noise_step_mapping_on_cpu() -> None:
    assert image_noise_steps(config.BDHSConfig(variant="bdhs", noise_steps=300)) == 0
    assert image_noise_steps(config.BDHSConfig(variant="bdhs-noise")) == POVID_NOISE_STEPS == 500
    assert image_noise_steps(config.BDHSConfig(variant="povid", noise_steps=200)) == 200


def test_engine_prepares_rows_and_samples_them_batched_or_alone_on_cpu(hf_engine) -> None:  # noqa: ANN001
    from mmalign.shapes.records import shapes_rows

    sampler = config.SamplerConfig(max_new_tokens=12)
    bdhs = config.BDHSConfig(n_bdhs=3, rho_th=0.5, splitter="regex", swap_prob=0.0)
    engine = BDHSEngine(hf_engine, char_embed, sampler, bdhs)
    assert engine.params()["noise_steps"] == 0 and engine.params()["swap_prob"] == 0.0
    raw = shapes_rows("pref", max_rows=3)
    rows = [
        engine.prepare(
            r["conversations"][0]["value"].split("\n", 1)[-1],
            r["image"],
            r["conversations"][1]["value"],
            seed,
        )
        for seed, r in enumerate(raw)
    ]
    assert all(isinstance(r, BDHSRow) for r in rows)
    image = raw[0]["image"]
    assert engine.prepare("Describe.", image, "  ", 0) == (
        "reference: empty (BDHS and POVID need y+)"
    )
    bad = engine.prepare("Describe.", b"not a png", "A red cross.", 0)
    assert isinstance(bad, str) and bad.startswith("images: unreadable")
    long = engine.prepare("describe " * 2000, image, "A red cross.", 0)
    assert isinstance(long, str) and long.startswith("prompt: too long")
    ready = [r for r in rows if isinstance(r, BDHSRow)]
    batched, alone = engine.sample(ready, batched=True), engine.sample(ready, batched=False)
    assert batched == alone  # per-row seeds: a row's y- does not depend on its batch
    assert all(1 <= r["meta"]["iterations"] <= 3 for r in batched)
    with pytest.raises(ValueError, match="needs an embedder"):
        BDHSEngine(hf_engine, None, sampler, bdhs)
    with pytest.raises(config.ConfigError, match=r"bdhs\.rho_th"):
        BDHSEngine(hf_engine, char_embed, sampler, config.BDHSConfig(rho_th=2.0))
