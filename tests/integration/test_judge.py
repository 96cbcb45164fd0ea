"""The pairwise judges (mmalign/judge.py) and JudgeEngine (kind="objects" and a text-channel
stand-in for kind="vlm"), no Ray.

The fake generate callables are honest stand-ins for the text channel: they read only the
prompt the judge built (and the image handed next to it) and answer in free text, so a
bug in prompt building, order bookkeeping or parsing changes their verdicts.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from typing import Any

import pytest

from mmalign.engines.judge_engine import JudgeEngine, hf_generate_fn, validate_row
from mmalign.judge import (
    JUDGE_ANSWER_FORMAT,
    VERDICT_KEYS,
    JudgeStats,
    PairRequest,
    build_judge_requests,
    canonical_objects,
    format_judge_prompt,
    judge_pair,
    judge_pairs,
    object_judge,
    verdict_dict,
)
from mmalign.metrics.vocab import shapes_vocabulary

VOCAB = shapes_vocabulary()
_RESP = re.compile(r"Response 1: (.*?)\n\nResponse 2: (.*?)\n\n", re.S)


def responses_in(prompt: str) -> tuple[str, str]:
    match = _RESP.search(prompt)
    assert match is not None, prompt
    return match.group(1), match.group(2)


def always_first(requests: Sequence[tuple[Any, str]]) -> list[str]:
    """A maximally position-biased judge."""
    return ["Response 1. It describes the image better." for _ in requests]


def grounded_reader(requests: Sequence[tuple[Any, str]]) -> list[str]:
    """Reads both responses and counts objects absent from the image (image = truth set)."""
    out = []
    for truth, prompt in requests:
        r1, r2 = responses_in(prompt)
        h1 = len(set(VOCAB.find_mentions(r1)) - truth)
        h2 = len(set(VOCAB.find_mentions(r2)) - truth)
        if h1 == h2:
            out.append("Both are equally accurate, it is a tie.")
        else:
            best = 1 if h1 < h2 else 2
            out.append(f"Response {best} is better: the other one mentions a missing object.")
    return out


IMAGE = frozenset({"red circle", "blue square"})
GOOD = "There is a red circle and a blue square."
BAD = "There is a red circle and a green triangle."


# ------------------------------------------------------------------ prompt


def test_prompt_carries_the_criteria_and_both_responses_on_cpu() -> None:
    prompt = format_judge_prompt("  What is shown? ", " first answer ", "second answer")
    low = prompt.lower()
    for phrase in ("hallucination", "object", "attribute", "colour", "relation", "ambiguous"):
        assert phrase in low
    assert "concise" in low and "practical" in low
    assert JUDGE_ANSWER_FORMAT in prompt and '"Response 1" or "Response 2"' in prompt
    assert "Question: What is shown?\n" in prompt
    assert responses_in(prompt) == ("first answer", "second answer")


def test_build_judge_requests_swaps_order_b_on_cpu() -> None:
    a_prompt, b_prompt = build_judge_requests("Q?", "AAA", "BBB", both_orders=True)
    assert responses_in(a_prompt) == ("AAA", "BBB")
    assert responses_in(b_prompt) == ("BBB", "AAA")
    assert build_judge_requests("Q?", "AAA", "BBB", both_orders=False) == [a_prompt]


# ------------------------------------------------------------------ both-order logic


def test_position_biased_judge_is_dropped_as_disagreement_on_cpu() -> None:
    pairs = [PairRequest(IMAGE, "Describe.", GOOD, BAD), PairRequest(IMAGE, "Describe.", BAD, GOOD)]
    verdicts = judge_pairs(pairs, always_first, both_orders=True)
    assert [(v.kept, v.winner, v.reason) for v in verdicts] == [(False, None, "disagree")] * 2
    assert all(v.order_a == "1" and v.order_b == "1" and v.orders == 2 for v in verdicts)
    # With one order the bias goes unnoticed: every pair "wins" for y_a.
    single = judge_pairs(pairs, always_first, both_orders=False)
    assert [(v.kept, v.winner, v.reason, v.orders) for v in single] == [(True, "a", "agree", 1)] * 2
    assert single[0].raw_b == "" and single[0].order_b is None


def test_grounded_judge_agrees_in_both_orders_on_cpu() -> None:
    v = judge_pair(IMAGE, "Describe.", GOOD, BAD, grounded_reader)
    assert (v.kept, v.winner, v.reason, v.order_a, v.order_b) == (True, "a", "agree", "1", "2")
    assert v.raw_a.startswith("Response 1 is better") and v.raw_b.startswith("Response 2")
    v = judge_pair(IMAGE, "Describe.", BAD, GOOD, grounded_reader)
    assert (v.kept, v.winner, v.order_a, v.order_b) == (True, "b", "2", "1")
    v = judge_pair(IMAGE, "Describe.", GOOD, GOOD + " ", grounded_reader)
    assert (v.kept, v.winner, v.reason) == (False, None, "tie")


def test_unparseable_output_is_a_parse_failure_not_a_guess_on_cpu() -> None:
    def mumble(requests: Sequence[tuple[Any, str]]) -> list[str]:
        return ["Hmm." for _ in requests]

    v = judge_pair(IMAGE, "Describe.", GOOD, BAD, mumble)
    assert (v.kept, v.winner, v.reason, v.order_a, v.order_b) == (
        False,
        None,
        "parse_failure",
        None,
        None,
    )


def test_wrong_number_of_texts_raises_on_cpu() -> None:
    with pytest.raises(ValueError, match="1 texts for 2 requests"):
        judge_pair(IMAGE, "Q", GOOD, BAD, lambda reqs: ["Response 1"])


def test_one_generate_call_for_all_pairs_on_cpu() -> None:
    calls: list[int] = []

    def counting(requests: Sequence[tuple[Any, str]]) -> list[str]:
        calls.append(len(requests))
        return grounded_reader(requests)

    judge_pairs([PairRequest(IMAGE, "Q", GOOD, BAD)] * 3, counting)
    assert calls == [6]
    assert judge_pairs([], counting) == [] and calls == [6]


# ------------------------------------------------------------------ object judge


def test_object_judge_prefers_fewer_hallucinations_then_recall_on_cpu() -> None:
    objects = ["red circle", "blue square", "green cross"]
    # a: 1 hallucinated (yellow triangle), 3 recalled; b: 0 hallucinated, 1 recalled.
    a = "A red circle, a blue box, a green plus and a yellow triangle."
    b = "A red ball."
    v = object_judge(a, b, objects, VOCAB)
    assert (v.winner, v.kept, v.reason) == ("b", True, "agree")
    assert (v.hallucinated_a, v.hallucinated_b, v.recalled_a, v.recalled_b) == (1, 0, 3, 1)
    assert object_judge(b, a, objects, VOCAB).winner == "a"  # order-invariant
    # Same hallucinations (0), recall 2 vs 1 -> the higher recall wins.
    v = object_judge("A red disc and a blue square.", "A red circle. A red circle.", objects, VOCAB)
    assert (v.winner, v.recalled_a, v.recalled_b) == ("a", 2, 1)
    v = object_judge("A purple cross, a purple cross.", "A red circle", ["red circle"], VOCAB)
    assert (v.winner, v.hallucinated_a) == ("b", 1)
    # Repeats are one object: 1 distinct hallucination each, recall 1 each -> tie.
    v = object_judge(
        "red circle, purple cross, purple cross", "red disc, orange wedge", objects, VOCAB
    )
    assert (v.winner, v.kept, v.reason, v.hallucinated_a, v.hallucinated_b) == (
        None,
        False,
        "tie",
        1,
        1,
    )
    # No mentions at all on either side: a tie, not a win for silence over silence.
    assert object_judge("", "Nothing to see.", objects, VOCAB).reason == "tie"


def test_object_judge_reads_yes_as_claiming_the_asked_object_on_cpu() -> None:
    objects = ["red circle", "blue square"]
    absent, present = "Is there a green cross in the image?", "Is there a red disc here?"
    # Absent object: "Yes." claims it (1 hallucination), "No." claims nothing -> "No." wins.
    v = object_judge("Yes.", "No.", objects, VOCAB, question=absent)
    assert (v.winner, v.hallucinated_a, v.hallucinated_b) == ("b", 1, 0)
    # Present object (asked through a synonym): "Yes" recalls it -> "Yes" wins, either order.
    assert object_judge("No.", "yes, there is", objects, VOCAB, question=present).winner == "b"
    v = object_judge("Yes.", "No.", objects, VOCAB, question=present)
    assert (v.winner, v.recalled_a, v.recalled_b) == ("a", 1, 0)
    # Without the question the two answers claim nothing: a tie, as before.
    assert object_judge("Yes.", "No.", objects, VOCAB).reason == "tie"
    # "Yesterday" is not "yes"; a question naming two classes is not about one object.
    assert object_judge("Yesterday.", "No.", objects, VOCAB, question=absent).reason == "tie"
    both = "Is there a red circle or a green cross?"
    assert object_judge("Yes.", "No.", objects, VOCAB, question=both).reason == "tie"


def test_object_judge_maps_surface_forms_and_rejects_unknown_on_cpu() -> None:
    assert canonical_objects(["red disc", "blue square"], VOCAB) == {"red circle", "blue square"}
    with pytest.raises(ValueError, match="pink elephant"):
        object_judge("a", "b", ["red circle", "pink elephant"], VOCAB)


# ------------------------------------------------------------------ stats


def test_judge_stats_count_every_outcome_on_cpu() -> None:
    biased = judge_pairs([PairRequest(IMAGE, "Q", GOOD, BAD)] * 2, always_first)
    good = judge_pairs([PairRequest(IMAGE, "Q", GOOD, BAD)], grounded_reader)
    tie = judge_pairs([PairRequest(IMAGE, "Q", GOOD, GOOD)], grounded_reader)
    mumbled = judge_pairs([PairRequest(IMAGE, "Q", GOOD, BAD)], lambda r: ["Response 1", "??"])
    stats = JudgeStats().update(biased + good + tie + mumbled)
    other = JudgeStats().update([object_judge(GOOD, BAD, IMAGE, VOCAB)])
    other.add({**verdict_dict(good[0]), "reason": "invalid", "kept": False, "orders": 0})
    d = stats.merge(other).as_dict()
    assert d == {
        "judge/pairs": 7,
        "judge/kept": 2,
        "judge/keep_rate": 2 / 7,
        "judge/ties": 1,
        "judge/disagreements": 2,
        "judge/parse_failures": 1,
        "judge/unparsed_outputs": 1,
        "judge/invalid_rows": 1,
        "judge/errors": 0,
    }
    assert set(verdict_dict(good[0])) == set(VERDICT_KEYS)


# ------------------------------------------------------------------ JudgeEngine


def png(size: int, colour: tuple[int, int, int] = (255, 0, 0)) -> dict[str, Any]:
    """An image struct {bytes, path} holding a size x size PNG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, "PNG")
    return {"bytes": buf.getvalue(), "path": None}


def row(image: Any = None, a: str = GOOD, b: str = BAD, **extra: Any) -> dict[str, Any]:
    return {"image": image, "question": "Describe.", "response_a": a, "response_b": b, **extra}


# The image channel: image width -> the objects it shows.
TRUTH_BY_WIDTH = {8: IMAGE, 9: frozenset({"green triangle"})}


def pixel_reader(requests: Sequence[tuple[Any, str]]) -> list[str]:
    """grounded_reader that must get the decoded image (PIL) and reads its truth from it.

    A 13-pixel image makes it raise, standing in for a row the model cannot process.
    """
    if any(image.size[0] == 13 for image, _ in requests):
        raise RuntimeError("model crashed on a 13-pixel image")
    return grounded_reader([(TRUTH_BY_WIDTH[image.size[0]], p) for image, p in requests])


def test_engine_vlm_per_row_errors_do_not_fail_the_batch_on_cpu() -> None:
    calls: list[int] = []

    def counted(requests: Sequence[tuple[Any, str]]) -> list[str]:
        calls.append(len(requests))
        return pixel_reader(requests)

    engine = JudgeEngine("vlm", generate=counted, batch_size=2)
    rows = [
        row(png(8)),  # GOOD better on the red/blue image
        row(png(9)),  # BAD (green triangle) better on the green-triangle image
        row(None),  # missing image
        row(png(8), b="  "),  # empty response
        row({"bytes": b"not a png", "path": None}),  # unreadable image
        row(png(13)),  # the model fails on this one
        {"images": [png(9)], "question": "Q", "response_a": BAD, "response_b": GOOD},
    ]
    out = engine.judge(rows)
    assert [(v["winner"], v["reason"]) for v in out] == [
        ("a", "agree"),
        ("b", "agree"),
        (None, "invalid"),
        (None, "invalid"),
        (None, "invalid"),
        (None, "error"),
        ("a", "agree"),
    ]
    assert "image: missing" in out[2]["error"] and "response_b: missing or empty" in out[3]["error"]
    assert "unreadable image" in out[4]["error"]
    assert "RuntimeError: model crashed" in out[5]["error"]
    assert all(set(v) == set(VERDICT_KEYS) for v in out)
    # 4 valid pairs in chunks of 2 -> 2 calls of 4 prompts; the failing chunk is retried
    # pair by pair (2 more calls of 2 prompts).
    assert calls == [4, 4, 2, 2]


def test_engine_objects_judge_and_invalid_rows_on_cpu() -> None:
    engine = JudgeEngine("objects")
    out = engine.judge(
        [
            row(png(8), objects=["red circle", "blue box"]),
            row(png(8), objects=[{"name": "green triangle"}]),
            row(png(8), objects=[]),
            row(png(8), objects=["pink elephant"]),
            row({"bytes": None, "path": ""}, objects=["red circle"]),
        ]
    )
    assert [(v["winner"], v["reason"], v["judge"]) for v in out] == [
        ("a", "agree", "objects"),
        ("b", "agree", "objects"),
        (None, "invalid", "objects"),
        (None, "invalid", "objects"),
        (None, "invalid", "objects"),
    ]
    assert (out[0]["hallucinated_a"], out[0]["hallucinated_b"]) == (0, 1)
    assert "objects:" in out[2]["error"] and "pink elephant" in out[3]["error"]
    assert "image: neither bytes nor path" in out[4]["error"]


def test_validate_row_names_the_column_on_cpu() -> None:
    assert validate_row(row(png(8)), "vlm") == ""
    assert validate_row(row(png(8)), "objects").startswith("objects:")
    assert validate_row({**row(png(8)), "question": None}, "vlm") == "question: missing or empty"


def test_engine_with_tiny_llava_runs_both_orders_on_cpu() -> None:
    """The real HF engine and tiny LLaVA (random weights: text is noise, so verdicts are
    parse failures or position-biased; what matters is the plumbing: two real texts a pair)."""
    import torch

    from mmalign.engines.hf_generation import HFGenerationEngine
    from mmalign.models.tiny_llava import build_tiny_llava

    torch.set_num_threads(1)
    model, processor = build_tiny_llava("small", seed=0)
    engine = JudgeEngine("vlm", generate=hf_generate_fn(HFGenerationEngine(model, processor), 8))
    out = engine.judge([row(png(32)), row(png(32), a=BAD, b=GOOD), row(None)])
    assert [v["orders"] for v in out] == [2, 2, 0]
    assert all(v["raw_a"] and v["raw_b"] for v in out[:2])
    assert out[2]["reason"] == "invalid"
    assert JudgeStats().update(out).pairs == 3


def test_judge_pool_on_a_numpy_dict_batch_on_cpu() -> None:
    """The Ray Data callable on the batch format map_batches hands it (no cluster)."""
    import numpy as np

    from operators.judge import JudgePool

    images = np.empty(2, dtype=object)
    images[0], images[1] = np.array([png(8)], dtype=object), np.array([], dtype=object)
    batch = {
        "images": images,
        "question": np.array(["Describe.", "Describe."]),
        "response_a": np.array([BAD, GOOD]),
        "response_b": np.array([GOOD, BAD]),
        "objects": np.array([np.array(sorted(IMAGE))] * 2, dtype=object),
    }
    out = JudgePool({"kind": "objects"})(batch)
    assert list(out["judge_winner"]) == ["b", None]
    assert list(out["judge_reason"]) == ["agree", "invalid"]
    assert "image: missing" in out["judge_error"][1]
    assert list(out["response_a"]) == [BAD, GOOD]  # inputs pass through, one row per row


# ------------------------------------------------------------------ judge.vocabulary (COCO)

# A hand-written slice of CHAIR's COCO synonyms.txt: canonical class first, then synonyms.
COCO_SYNONYMS = """\
person, girl, boy, man, woman, men, women, people, rider
bicycle, bike, cycle
dog, puppy, pup
hot dog, hotdog
dining table, table, desk
"""
RIDER = "A man rides a bike past a table."
DOG = "A woman on a bicycle next to a puppy and a table."


def test_object_judge_on_coco_objects_with_a_synonyms_file_on_cpu(tmp_path: Any) -> None:
    from mmalign.config import JudgeConfig
    from operators.judge import JudgePool

    path = tmp_path / "synonyms.txt"
    path.write_text(COCO_SYNONYMS)
    rows = [
        # COCO-style annotations; the dog in `DOG` is not in the image
        row(png(8), a=DOG, b=RIDER, objects=["person", "bicycle", "dining table"]),
        row(png(8), a=RIDER, b=DOG, objects=["people", "bike", "table"]),  # surface forms
        # "hot dog" is one object, never a dog: both mention only annotated objects
        row(png(8), a="A boy eats a hot dog.", b="A boy eats.", objects=["person", "hot dog"]),
        row(png(8), a=RIDER, b=DOG, objects=["giraffe"]),  # not a class of this vocabulary
    ]
    cfg = JudgeConfig(kind="objects", vocabulary=str(path))
    cfg.validate("judge")
    out = JudgeEngine.from_config(cfg).judge(rows)
    assert [(v["winner"], v["reason"]) for v in out] == [
        ("b", "agree"),
        ("a", "agree"),
        ("a", "agree"),
        (None, "invalid"),
    ]
    assert (out[0]["hallucinated_a"], out[0]["recalled_a"]) == (1, 3)
    assert (out[0]["hallucinated_b"], out[0]["recalled_b"]) == (0, 3)
    assert (out[2]["hallucinated_a"], out[2]["recalled_a"]) == (0, 2)
    assert "giraffe" in out[3]["error"]
    # The ShapesWorld default rejects COCO objects: the field is what makes this work.
    shapes = JudgeEngine.from_config(JudgeConfig(kind="objects")).judge(rows[:1])
    assert shapes[0]["reason"] == "invalid" and "person" in shapes[0]["error"]
    # The Ray Data pool builds its engine from the same config dict.
    batch = {k: [r[k] for r in rows[:2]] for k in rows[0]}
    pooled = JudgePool({"kind": "objects", "vocabulary": str(path)})(batch)
    assert pooled["judge_winner"] == ["b", "a"]


def test_bad_judge_vocabulary_fails_at_config_load_on_cpu(tmp_path: Any) -> None:
    from mmalign.config import ConfigError, load
    from mmalign.metrics.vocab import load_vocabulary

    for bad in ("coco", str(tmp_path / "missing.txt"), str(tmp_path), "s3://"):
        with pytest.raises(ConfigError, match=r"^judge\.vocabulary: must be 'shapesworld' or"):
            load(overrides={"judge.kind": "objects", "judge.vocabulary": bad})
    good = tmp_path / "synonyms.txt"
    good.write_text(COCO_SYNONYMS)
    assert load(overrides={"judge.vocabulary": str(good)}).judge.vocabulary == str(good)
    # Content problems surface when the engine loads the file, naming it.
    empty = tmp_path / "empty.txt"
    empty.write_text("# no classes\n")
    with pytest.raises(ValueError, match="empty.txt: no object classes"):
        load_vocabulary(str(empty))


def test_judge_vocabulary_from_s3_on_cpu(s3_bucket: str) -> None:
    from mmalign import storage
    from mmalign.config import JudgeConfig

    uri = s3_bucket + "/vocab/synonyms.txt"
    storage.write_bytes(uri, COCO_SYNONYMS.encode())
    engine = JudgeEngine.from_config(JudgeConfig(kind="objects", vocabulary=uri))
    objects = ["person", "bicycle", "dining table"]
    (verdict,) = engine.judge([row(png(8), a=DOG, b=RIDER, objects=objects)])
    assert (verdict["winner"], verdict["hallucinated_a"]) == ("b", 1)
