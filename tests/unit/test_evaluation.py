"""Evaluation core plumbing with deterministic, honest answerers (no model, no mocks).

Each answerer below is a real policy with a known behaviour (an oracle that reads the
annotations, an always-yes model, ...); the expected numbers follow from that behaviour.
"""

import re
from collections.abc import Callable

import pytest

from mmalign.evaluation import (
    EvalRequest,
    GenerateFn,
    answer_all,
    build_requests,
    evaluate,
    format_report,
    ground_truths,
    report_metrics,
)
from mmalign.metrics.pope import POPE_SPLITS
from mmalign.metrics.vocab import shapes_vocabulary

RECORDS = [
    {"id": "r0", "objects": [{"name": "red circle"}, {"name": "blue square"}]},
    # a repeated object counts once in the ground truth
    {
        "id": "r1",
        "objects": [{"name": "red circle"}, {"name": "green triangle"}, {"name": "red circle"}],
    },
    {"id": "r2", "objects": [{"name": "yellow cross"}]},
    {
        "id": "r3",
        "objects": [
            {"name": "purple square"},
            {"name": "orange circle"},
            {"name": "blue triangle"},
        ],
    },
]
for _r in RECORDS:  # opaque image payloads; the answerers recognise the image by its bytes
    _r["image"] = b"\x89PNG fake " + str(_r["id"]).encode()
N_OBJECTS = 2 + 2 + 1 + 3  # distinct ground-truth classes over the records

_QUESTION = re.compile(r"^Is there an? (.+) in the image\?$")


def _objects_by_image() -> dict[bytes, list[str]]:
    return {r["image"]: sorted({o["name"] for o in r["objects"]}) for r in RECORDS}


def make_answerer(
    yes_no: Callable[[bool], str], describe: Callable[[list[str]], str]
) -> tuple[GenerateFn, list[int]]:
    """A generate() that answers POPE from the annotations through `yes_no(present)` and
    descriptions through `describe(objects)`; also returns the list of batch sizes seen."""
    truth = _objects_by_image()
    batch_sizes: list[int] = []

    def generate(batch: list[tuple[bytes, str]]) -> list[str]:
        batch_sizes.append(len(batch))
        out = []
        for image, prompt in batch:
            m = _QUESTION.match(prompt)
            out.append(yes_no(m.group(1) in truth[image]) if m else describe(truth[image]))
        return out

    return generate, batch_sizes


def oracle_description(objs: list[str]) -> str:
    return " ".join(f"There is a {o}." for o in objs)


def test_oracle_is_perfect_on_cpu() -> None:
    generate, _ = make_answerer(lambda present: "Yes." if present else "No.", oracle_description)
    report = evaluate(generate, RECORDS, seed=3)
    assert set(report["pope"]) == set(POPE_SPLITS)
    for s in report["pope"].values():
        assert (s["accuracy"], s["precision"], s["recall"], s["f1"]) == (1.0, 1.0, 1.0, 1.0)
        assert s["yes_ratio"] == 0.5
        assert s["n"] == 2 * N_OBJECTS and s["n_other"] == 0
    assert report["pope_mean_f1"] == 1.0
    c = report["chair"]
    assert (c["chair_i"], c["chair_s"], c["recall"]) == (0.0, 0.0, 1.0)
    assert (c["n_mentions"], c["n_ground_truth_objects"], c["n_descriptions"]) == (8, 8, 4)
    assert report["n_images"] == 4


def test_always_yes_and_always_no_on_cpu() -> None:
    generate, _ = make_answerer(lambda present: "yes", lambda objs: "There is a red disc.")
    report = evaluate(generate, RECORDS)
    for s in report["pope"].values():
        assert (s["yes_ratio"], s["recall"], s["precision"], s["accuracy"]) == (1.0, 1.0, 0.5, 0.5)
        assert s["f1"] == pytest.approx(2 / 3)
    assert report["pope_mean_f1"] == pytest.approx(2 / 3)
    # "red circle" said once per image: right for r0 and r1, hallucinated for r2 and r3.
    c = report["chair"]
    assert c["chair_i"] == pytest.approx(2 / 4)
    assert c["chair_s"] == pytest.approx(2 / 4)
    assert c["recall"] == pytest.approx(2 / N_OBJECTS)

    generate, _ = make_answerer(lambda present: "No, there is not.", lambda objs: "")
    report = evaluate(generate, RECORDS)
    for s in report["pope"].values():
        assert (s["yes_ratio"], s["recall"], s["f1"], s["accuracy"]) == (0.0, 0.0, 0.0, 0.5)
    c = report["chair"]
    assert (c["chair_i"], c["chair_s"], c["recall"]) == (0.0, 0.0, 0.0)
    assert c["n_descriptions_without_mentions"] == 4


def test_unparseable_answers_are_no_and_reported_on_cpu() -> None:
    generate, _ = make_answerer(
        lambda present: "I think so" if present else "No.", oracle_description
    )
    report = evaluate(generate, RECORDS)
    for s in report["pope"].values():
        assert s["n_other"] == N_OBJECTS  # every positive got the unparseable answer
        assert (s["recall"], s["accuracy"], s["yes_ratio"]) == (0.0, 0.5, 0.0)


def test_hallucinating_describer_chair_on_cpu() -> None:
    # Adds "green boxes" to every description; no image has a green square, so 4 hallucinations.
    generate, _ = make_answerer(
        lambda present: "Yes" if present else "No",
        lambda objs: oracle_description(objs) + " There are two green boxes.",
    )
    c = evaluate(generate, RECORDS)["chair"]
    assert (c["n_mentions"], c["n_hallucinated_mentions"]) == (8 + 4, 4)
    assert c["chair_i"] == pytest.approx(4 / 12)
    assert c["chair_s"] == 1.0
    assert c["recall"] == 1.0


def test_batching_and_deduplication_on_cpu() -> None:
    generate, batch_sizes = make_answerer(lambda p: "Yes." if p else "No.", oracle_description)
    truths = ground_truths(RECORDS)
    requests = build_requests(truths, shapes_vocabulary(), seed=0)
    n_pope = 3 * 2 * N_OBJECTS
    assert len(requests) == n_pope + len(RECORDS)
    assert [r.kind for r in requests[n_pope:]] == ["describe"] * 4
    images = {str(r["id"]): r["image"] for r in RECORDS}
    answers = answer_all(generate, requests, images, batch_size=5)
    assert len(answers) == len(requests)
    unique = {(r.image_id, r.prompt) for r in requests}
    assert sum(batch_sizes) == len(unique) < len(requests)  # shared positives asked once
    assert max(batch_sizes) == 5
    assert all(
        a == ("Yes." if r.label else "No.") for r, a in zip(requests, answers) if r.kind == "pope"
    )


def test_errors_on_cpu() -> None:
    def short(batch: list[tuple[bytes, str]]) -> list[str]:
        return ["Yes"] * (len(batch) - 1)

    with pytest.raises(ValueError, match="responses"):
        evaluate(short, RECORDS)
    with pytest.raises(ValueError, match="duplicate"):
        ground_truths([*RECORDS, RECORDS[0]])
    with pytest.raises(ValueError, match="batch_size"):
        answer_all(short, [EvalRequest("r0", "hi", "describe")], {"r0": b""}, batch_size=0)


def test_report_formatting_on_cpu() -> None:
    generate, _ = make_answerer(lambda p: "Yes." if p else "No.", oracle_description)
    report = evaluate(generate, RECORDS, splits=("random", "adversarial"))
    assert list(report["pope"]) == ["random", "adversarial"]
    table = format_report(report)
    assert "random" in table and "adversarial" in table and "popular" not in table
    assert "100.00" in table and "CHAIR_i" in table
    flat = report_metrics(report)
    assert flat["pope/mean_f1"] == 1.0 and flat["chair/chair_i"] == 0.0
    assert flat["pope/random/yes_ratio"] == 0.5


def test_headline_and_comparison_show_base_beside_trained() -> None:
    from mmalign.evaluation import format_comparison, headline

    def report(ci: float, cs: float, rec: float, f1: float) -> dict:
        return {"chair": {"chair_i": ci, "chair_s": cs, "recall": rec}, "pope_mean_f1": f1}

    base, trained = headline(report(0.30, 0.5, 0.6, 0.7)), headline(report(0.25, 0.5, 0.65, 0.7))
    assert base == {"CHAIR_i": 0.30, "CHAIR_s": 0.5, "Recall": 0.6, "POPE F1 (mean)": 0.7}
    lines = format_comparison(base, trained).splitlines()
    assert lines[0].split() == ["base", "trained", "change"]
    assert lines[1].split() == ["CHAIR_i", "30.00", "25.00", "-5.00"]
    assert lines[3].split() == ["Recall", "60.00", "65.00", "+5.00"]
