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


# COCO-format held-out pairs: image file -> categories (c.jpg has none: no pair)
COCO = {"a.jpg": ["person", "dog"], "b.jpg": ["pizza", "dining table", "person"],
        "c.jpg": [], "d.jpg": ["cat"], "e.jpg": ["dog", "bicycle"]}  # fmt: skip


def _coco_files(root: Path) -> tuple[str, str]:
    """COCO instances + synonyms under root, with non-square JPEGs beside them."""
    from tests.eval_files import SYNONYMS, write_coco
    from tests.llava_next import SIZES, jpeg

    for i, name in enumerate(COCO):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(jpeg(SIZES[i % len(SIZES)], seed=i))
    (root / "synonyms.txt").write_text(SYNONYMS)
    return write_coco(root / "instances.json", COCO), str(root / "synonyms.txt")


def test_coco_judge_pairs_have_a_known_better_answer_on_cpu(tmp_path: Path) -> None:
    from mmalign.engines.judge_engine import JudgeEngine
    from mmalign.eval_sets import coco_judge_pairs, coco_vocabulary, read_coco_instances
    from tests.eval_files import CATEGORIES, SYNONYMS

    ann, _ = _coco_files(tmp_path)
    coco = read_coco_instances(Path(ann).read_text(), ann)
    rows = coco_judge_pairs(coco, "s3://bucket/val2014")
    assert [r["image"]["path"] for r in rows] == [
        f"s3://bucket/val2014/{n}" for n in ("a.jpg", "b.jpg", "d.jpg", "e.jpg")
    ]
    assert [(r["label"], r["kind"]) for r in rows] == [
        ("a", "hallucination"),
        ("b", "hallucination"),
        ("a", "hallucination"),  # d.jpg has one class: nothing to omit
        ("b", "omission"),
    ]
    # a.jpg: person + dog. Absent classes seen with them: pizza, dining table (with person
    # in b.jpg), bicycle (with dog in e.jpg), once each and in one image each: the class
    # order breaks the tie, so bicycle replaces the last present class
    a = rows[0]
    assert (a["response_a"], a["response_b"]) == (
        "There is a person and a dog in the image.",
        "There is a person and a bicycle in the image.",
    )
    assert rows[3]["response_a"] == "There is a bicycle in the image."  # dog omitted
    assert rows[1]["objects"] == ["dining table", "person", "pizza"]
    # the exact object judge, on the data's vocabulary, prefers the better answer every time
    judge = JudgeEngine("objects", vocab=coco_vocabulary(CATEGORIES, SYNONYMS))
    verdicts = judge.judge(rows)
    assert [v["winner"] for v in verdicts] == [r["label"] for r in rows]
    assert len(coco_judge_pairs(coco, "", n=2, offset=1)) == 2


def test_main_on_coco_files_and_a_parquet_they_annotate_on_cpu(tmp_path: Path) -> None:
    ann, synonyms = _coco_files(tmp_path)
    args = [*FAST, "--coco-annotations", ann, "--coco-synonyms", synonyms]
    report = main(args)
    assert (report["data"], report["split"], report["skipped_rows"]) == (ann, "", 0)
    vlm = report["vlm"]
    assert vlm["pairs"] == 4 and vlm["judge/errors"] == 0 and vlm["judge/invalid_rows"] == 0
    assert set(vlm["by_kind"]) == {"hallucination", "omission"}
    assert vlm["position_only_accuracy"] == 0.5
    objects = report["objects"]
    assert (objects["pairs"], objects["keep_rate"], objects["accuracy_kept"]) == (4, 1.0, 1.0)

    # a held-out Parquet whose images are COCO files: the object judge gets their categories
    from tests.llava_next import jpeg

    rows = [
        preference_row(
            id=f"p{i}", prompt="Describe the image.", chosen=good, rejected=bad,
            images=[{"bytes": jpeg((64, 48), seed=i), "path": f"val2014/{name}"}],
            source="coco-heldout", method="synthetic",
        )
        for i, (name, good, bad) in enumerate(
            [("a.jpg", "A man and his dog.", "A man and his cat."),
             ("zzz.jpg", "A dog.", "A cat."),  # not in the COCO set: VLM judge only
             ("e.jpg", "A dog next to a bike.", "A bike.")]
        )
    ]  # fmt: skip
    write_preferences(rows, str(tmp_path / "pairs.parquet"))
    report = main([*args, "--pairs", str(tmp_path / "pairs.parquet"), "--n-pairs", "0"])
    assert report["vlm"]["pairs"] == 3 and report["objects"]["pairs"] == 2
    assert report["objects"]["accuracy_kept"] == 1.0


def test_main_reports_a_reward_model_beside_the_judges(tmp_path: Path) -> None:
    """--reward-model: the same held-out pairs scored by a reward model (judge kind
    reward-model), with the judges' accuracy fields; scoring is order-free, so every pair
    is decided (no disagreements) unless two scores tie exactly."""
    from mmalign.config import LearnerConfig
    from mmalign.engines.reward_model import RewardModel
    from mmalign.models.tiny_llava import build_tiny_llava

    model, processor = build_tiny_llava("small", seed=2)
    RewardModel(model, processor, LearnerConfig(lora_r=4, seed=0)).save(str(tmp_path / "rm"))
    report = main([*FAST, "--reward-model", str(tmp_path / "rm")])
    reward = report["reward_model"]
    assert set(reward) >= ACCURACY_KEYS and reward["pairs"] == 4
    assert reward["judge/disagreements"] == 0 and reward["kept"] == 4
    assert 0.0 <= reward["accuracy_kept"] <= 1.0 and report["vlm"]["pairs"] == 4
