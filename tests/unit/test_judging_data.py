"""Synthetic judging examples (mmalign/shapes/judging.py), the compact judge prompt and
judge_accuracy, against hand cases. No model, no Ray."""

from __future__ import annotations

import random

import pytest

from mmalign.judge import (
    build_judge_requests,
    format_judge_prompt,
    judge_accuracy,
    object_judge,
    object_score,
)
from mmalign.judge_parse import parse_judge_output
from mmalign.metrics.vocab import shapes_vocabulary
from mmalign.shapes.judging import _hallucinated, judge_row, judging_examples, make_judging_example
from mmalign.shapes.world import WorldConfig, generate_record

CFG = WorldConfig()
VOCAB = shapes_vocabulary()


def test_compact_prompt_is_short_and_exact_on_cpu() -> None:
    prompt = format_judge_prompt(" Describe. ", "There is a red circle. ", "No.", style="compact")
    assert prompt == (
        "Question: Describe.\nResponse 1: There is a red circle.\nResponse 2: No.\n"
        "Which response is better? No invented objects or colours first, then more detail."
    )
    assert format_judge_prompt("q", "x", "y").startswith("You are shown an image")  # default
    assert build_judge_requests("q", "x", "y", style="compact")[1].index("Response 1: y") > 0
    with pytest.raises(ValueError, match="style"):
        format_judge_prompt("q", "x", "y", style="short")


def test_hallucinated_answers_by_hand_on_cpu() -> None:
    rng = random.Random(0)
    # bias: trigger red circle present, partner blue square absent -> the partner is added
    kind, names, invented = _hallucinated("bias", ["red circle", "green cross"], CFG, rng)
    assert (kind, invented) == ("bias", "blue square")
    assert sorted(names) == ["blue square", "green cross", "red circle"]
    # swap_colour keeps the shape, picks a colour not in the image
    kind, names, invented = _hallucinated("swap_colour", ["red circle"], CFG, rng)
    assert kind == "swap_colour" and names == [invented]
    assert invented.endswith(" circle") and invented != "red circle"
    # swap_shape with every red shape present has no option -> falls back to adding one
    reds = ["red circle", "red square", "red triangle", "red cross"]
    kind, names, invented = _hallucinated("swap_shape", reds, CFG, rng)
    assert kind == "add" and invented not in reds and sorted(names) == sorted([*reds, invented])
    # bias without a trigger falls back to "add"
    kind, _, invented = _hallucinated("bias", ["green cross"], CFG, rng)
    assert kind == "add" and invented != "green cross"


def test_examples_are_deterministic_and_parse_back_on_cpu() -> None:
    examples = judging_examples(CFG, "eval", range(80))
    assert examples[7] == make_judging_example(CFG, "eval", 7)
    assert {e["better"] for e in examples} == {"1", "2"}
    assert {e["kind"] for e in examples} >= {"swap_shape", "swap_colour", "add", "incomplete"}
    for e in examples:
        human, target = e["conversations"][0]["value"], e["conversations"][1]["value"]
        assert parse_judge_output(target) == e["better"], target
        # the human turn is exactly what JudgeEngine sends for this presentation order
        prompt = format_judge_prompt(e["question"], e["response_1"], e["response_2"], "compact")
        assert human == "<image>\n" + prompt
        assert e["image"] == generate_record(CFG, "eval", int(e["id"][-6:]))["image"]
        chosen = e["response_1"] if e["better"] == "1" else e["response_2"]
        assert chosen == e["chosen"]


def test_object_judge_agrees_with_every_description_example_on_cpu() -> None:
    # The better answer is faithful and the worse one hallucinates or recalls less, so
    # the exact object judge must pick the labelled winner (yes/no answers name no objects).
    for e in judging_examples(CFG, "sft", range(120)):
        if e["kind"] == "existence":
            continue
        objects = [o["name"] for o in e["objects"]]
        verdict = object_judge(e["chosen"], e["rejected"], objects, VOCAB)
        assert verdict.winner == "a", (e["kind"], e["chosen"], e["rejected"], objects)


def test_object_score_counts_recalled_minus_hallucinated() -> None:
    """The RL baselines' object-grounded reward, by hand, and the object judge's order."""
    objects = ["red circle", "blue square"]
    assert object_score("There is a red circle.", objects, VOCAB) == 1.0
    assert object_score("A red circle and a green cross.", objects, VOCAB) == 0.0
    assert (
        object_score("A red circle and a green cross.", objects, VOCAB, hallucination_weight=3)
        == -2.0
    )
    assert object_score("A red circle. A blue square. A red circle.", objects, VOCAB) == 2.0
    for e in judging_examples(CFG, "sft", range(60)):
        if e["kind"] in ("existence", "incomplete"):
            continue
        names = [o["name"] for o in e["objects"]]
        score = [
            object_score(e[k], names, VOCAB, hallucination_weight=10)
            for k in ("chosen", "rejected")
        ]
        assert score[0] > score[1], (e["kind"], e["chosen"], e["rejected"])


def test_judge_row_and_flip_on_cpu() -> None:
    e = make_judging_example(CFG, "eval", 3)
    row, flipped = judge_row(e), judge_row(e, flip=True)
    assert (row["response_a"], row["response_b"]) == (e["response_1"], e["response_2"])
    assert (flipped["response_a"], flipped["response_b"]) == (e["response_2"], e["response_1"])
    assert {row["label"], flipped["label"]} == {"a", "b"}
    assert row["image"]["bytes"] == e["image"]


def test_judge_accuracy_by_hand_on_cpu() -> None:
    def v(kept: bool, winner: str | None, a: str | None, b: str | None) -> dict:
        return {"kept": kept, "winner": winner, "order_a": a, "order_b": b}

    verdicts = [
        v(True, "a", "1", "2"),  # kept, right
        v(True, "b", "2", "1"),  # kept, wrong
        v(False, None, "1", "1"),  # disagree (order A right)
        v(False, None, None, "2"),  # parse failure
    ]
    out = judge_accuracy(verdicts, ["a", "a", "a", "b"])
    assert out["kept"] == 2 and out["keep_rate"] == 0.5
    assert out["accuracy_kept"] == 0.5 and out["accuracy_all"] == 0.25
    assert out["order_agreement"] == pytest.approx(2 / 3)
    assert out["order_a_accuracy"] == pytest.approx(2 / 3)
    assert out["position_only_accuracy"] == 0.75  # 3 of 4 better answers sit in slot A
    with pytest.raises(ValueError, match="labels"):
        judge_accuracy(verdicts, ["a"])
