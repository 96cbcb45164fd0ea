"""The embedded ShapesWorld judge (assets/models/shapes-llava-judge) through the real
protocol: JudgeConfig(kind="vlm", prompt_style="compact") -> JudgeEngine.from_config ->
both orders -> parse -> keep only agreeing pairs, on held-out `eval`-split pairs.

"Clearly above chance" is a statistical claim, so it is tested as one: over 160 held-out
pairs (disjoint from the README's 0..59; the better answer sits in slot A on half of them)
the number of correct verdicts among kept pairs must be improbable under a coin flip,
one-sided exact binomial p < 1e-3. Measured 2026-12-02: 47 kept, 38 correct (0.81), p ~ 1e-5.
A guessing judge keeps ~half its pairs and is right on ~half of those (p ~ 0.5).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mmalign.config import JudgeConfig
from mmalign.engines.judge_engine import JudgeEngine
from mmalign.metrics.significance import binomial_tail
from pipelines.eval_judge import evaluate_judge, held_out_rows

MODEL = Path(__file__).resolve().parents[2] / "assets" / "models" / "shapes-llava-judge"
N_PAIRS = 160
P_MAX = 1e-3


def test_binomial_tail_hand_numbers_on_cpu() -> None:
    assert binomial_tail(0, 3) == 1.0
    assert binomial_tail(3, 3) == pytest.approx(1 / 8)
    assert binomial_tail(2, 3) == pytest.approx(4 / 8)  # C(3,2) + C(3,3) = 4 outcomes


@pytest.mark.slow
def test_embedded_judge_is_clearly_above_chance_on_cpu() -> None:
    import torch

    torch.set_num_threads(1)
    cfg = JudgeConfig(
        kind="vlm", model=str(MODEL), prompt_style="compact", max_new_tokens=24, batch_size=20
    )
    engine = JudgeEngine.from_config(cfg)
    rows = held_out_rows(N_PAIRS, offset=300)
    report, verdicts = evaluate_judge(engine, rows, batch_size=20)
    assert report["pairs"] == N_PAIRS and report["judge/errors"] == 0
    assert report["judge/invalid_rows"] == 0
    kept = report["kept"]
    correct = round(report["accuracy_kept"] * kept)
    assert kept >= 20, report  # enough verdicts to say anything
    assert binomial_tail(correct, kept) < P_MAX, report
    # verdicts carry the judge's own words, which parse to the kept choice
    assert all(v["raw_a"].strip().startswith("Response") for v in verdicts if v["kept"])
