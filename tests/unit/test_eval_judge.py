"""pipelines/eval_judge.py end to end with the embedded judge (assets/models/shapes-llava-judge):
the default ShapesWorld pairs and a held-out preference Parquet in our schema. Few pairs and
few tokens, so only the report's fields and bookkeeping are asserted, not the accuracy
(tests/quality/test_judge_embedded.py measures that).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mmalign.io import write_preferences
from mmalign.schema import preference_row
from mmalign.shapes.judging import judging_examples
from mmalign.shapes.world import WorldConfig
from pipelines.eval_judge import main, parquet_rows

# 6 tokens: " Response 1." and a word, enough for the leading-label verdict.
FAST = ["--n-pairs", "4", "--max-new-tokens", "6", "--batch-size", "4"]
ACCURACY_KEYS = {
    "pairs",
    "kept",
    "keep_rate",
    "accuracy_kept",
    "accuracy_all",
    "order_agreement",
    "order_a_accuracy",
    "position_only_accuracy",
    "by_kind",
    "wall_s",
    "pairs_per_s",
    "judge/ties",
    "judge/disagreements",
    "judge/parse_failures",
}


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """main() on the embedded default: (report, the --out file)."""
    out = tmp_path_factory.mktemp("eval") / "judge_eval.json"
    return main([*FAST, "--out", str(out)]), out


def test_main_on_the_embedded_default_on_cpu(default_run: tuple[dict[str, Any], Path]) -> None:
    report, out = default_run
    assert json.loads(out.read_text()) == report
    assert (report["data"], report["split"], report["skipped_rows"]) == (
        "shapesworld:eval",
        "eval",
        0,
    )
    vlm = report["vlm"]
    assert set(vlm) >= ACCURACY_KEYS
    assert vlm["pairs"] == 4 and vlm["judge/errors"] == 0 and vlm["judge/invalid_rows"] == 0
    # the better answer sits in slot A on pairs 0 and 2 only: a position-only guesser gets 0.5
    assert vlm["position_only_accuracy"] == 0.5
    assert [e["label"] for e in report["examples"]] == ["a", "b", "a", "b"]
    assert all(e["raw_a"] and e["raw_b"] for e in report["examples"])
    assert 0.0 <= vlm["order_a_accuracy"] <= 1.0 and vlm["wall_s"] > 0
    assert sum(k["pairs"] for k in vlm["by_kind"].values()) == 4
    assert report["objects"]["accuracy_kept"] == 1.0  # the exact reference on the same pairs


def _heldout_parquet(path: Path, n: int) -> list[dict[str, Any]]:
    """The first n eval-split judging examples as preference rows (chosen = the better
    answer), plus one row a learner would reject (a separate image for the rejected)."""
    examples = judging_examples(WorldConfig(seed=0), "eval", range(n))
    rows = [
        preference_row(
            id=f"pair-{i}",
            prompt=ex["question"],
            chosen=ex["chosen"],
            rejected=ex["rejected"],
            images=[ex["image"]],
            source="shapes-heldout",
            method="synthetic",
        )
        for i, ex in enumerate(examples)
    ]
    bad = dict(rows[0], id="bad", rejected_images=rows[0]["images"])
    write_preferences([*rows[:2], bad, *rows[2:]], str(path))
    return examples


def test_parquet_rows_put_chosen_in_alternating_slots_on_cpu(tmp_path: Path) -> None:
    path = tmp_path / "heldout.parquet"
    examples = _heldout_parquet(path, 5)
    rows, skipped = parquet_rows(str(path))
    assert len(rows) == 5 and len(skipped) == 1 and skipped[0].startswith("bad: rejected_images")
    assert [r["label"] for r in rows] == ["a", "b", "a", "b", "a"]
    for r, ex in zip(rows, examples, strict=True):
        chosen = r["response_a"] if r["label"] == "a" else r["response_b"]
        rejected = r["response_b"] if r["label"] == "a" else r["response_a"]
        assert (chosen, rejected) == (ex["chosen"], ex["rejected"])
        assert r["image"]["bytes"] == ex["image"] and r["kind"] == "shapes-heldout"
    rows, _ = parquet_rows(str(path), n=2, offset=3)  # rows 3 and 4 of the file
    assert [r["response_a"] for r in rows] == [examples[2]["chosen"], examples[3]["rejected"]]


def test_main_on_a_preference_parquet_on_cpu(
    tmp_path: Path, default_run: tuple[dict[str, Any], Path]
) -> None:
    path = tmp_path / "heldout.parquet"
    _heldout_parquet(path, 4)
    report = main([*FAST, "--pairs", str(path), "--n-pairs", "0"])
    assert (report["data"], report["skipped_rows"], report["objects"]) == (str(path), 1, None)
    assert "rejected_images" in report["skipped_examples"][0]
    vlm = report["vlm"]
    assert set(vlm) >= ACCURACY_KEYS and vlm["pairs"] == 4 and vlm["judge/errors"] == 0
    assert vlm["position_only_accuracy"] == 0.5
    assert set(vlm["by_kind"]) == {"shapes-heldout"}
    # The same four pairs in the same slots as the default run: the same greedy verdicts.
    default = default_run[0]["vlm"]
    for key in ("kept", "accuracy_kept", "order_agreement", "order_a_accuracy"):
        assert vlm[key] == default[key], key
