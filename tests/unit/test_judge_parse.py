"""Judge-output parsing and two-order combination on realistic judge texts."""

import pytest

from mmalign.judge_parse import combine_orders, parse_judge_output, tally

CASES = [
    ("Response 1 is better.", "1"),
    ("**Response 2**\n\nResponse 2 correctly identifies the blue square.", "2"),
    ("[[2]]", "2"),
    ("Verdict: [[Response 1]] because it mentions only objects in the image.", "1"),
    ("Final answer: Response 2", "2"),
    ("Better response: 1\nExplanation: it is grounded.", "1"),
    ("I would choose the second response, since it does not invent a green triangle.", "2"),
    ("I prefer Response 1.", "1"),
    ("Response 2 has less hallucination and is more helpful.", "2"),
    (
        "Response 1 mentions a red circle that is not in the image, while Response 2 "
        "describes the scene accurately. Therefore, Response 2 is better.",
        "2",
    ),
    ("Both responses describe a cat, but Response 1 is more accurate about the colour.", "1"),
    ("Response 1 is clearly worse: it hallucinates a dog.", "2"),
    ("The first response is better because it is concise.", "1"),
    ("## Evaluation\n**Response One** is the better response.", "1"),
    # the format our judge prompt asks for: the label first, then the explanation
    ("Response 2.\nResponse 1 has fewer details but invents a dog.", "2"),
    ("Response 2, because it names only the objects in the image.", "2"),
    ("Response 1, while longer, hallucinates a dog. Response 2 is better.", "2"),
    ("Response 1 has no hallucinations, unlike Response 2.", "1"),
    ("Tie. Both responses are equally accurate.", "tie"),
    ("Neither response is better; both hallucinate the same objects.", "tie"),
    ("Both answers are equally good.", "tie"),
    ("Response 1 and Response 2 both describe the image.", None),
    ("", None),
    ("asdf qwerty 12345", None),
    ("The image shows a red circle next to a blue square.", None),
    ("Which response is better, Response 1 or Response 2?", None),
]


# Judges that critique each response before concluding: the "Response N:" line labels open
# the text, but only the verdict line decides. Both presentation orders of the critiques.
PER_RESPONSE = [
    # a count question's critique: "answer: 2" is the count, not a verdict
    ("Response 1.\nResponse 2 miscounts; the correct answer: 2.", "1"),
    ("Response 1. Response 2 miscounts, the correct answer: two.", "1"),
    ("Response 1: hallucinates a dog.\nResponse 2: accurate.\nVerdict: Response 2", "2"),
    ("Response 2: accurate.\nResponse 1: hallucinates a dog.\nVerdict: Response 2", "2"),
    ("Response 1: accurate.\nResponse 2: hallucinates a dog.\nVerdict: Response 1", "1"),
    ("Response 2: hallucinates a dog.\nResponse 1: accurate.\nVerdict: Response 1", "1"),
    ("Verdict: Response 2\nResponse 1: hallucinates a dog.\nResponse 2: accurate.", "2"),
    ("Response 1: hallucinates a dog.\nResponse 2: accurate.\nBetter: Response 2", "2"),
    ("Response 1: accurate.\nResponse 2: invents a cat.\nFinal answer - Response 1", "1"),
    ("Response 1 - accurate.\nResponse 2 - invents a cat.\nWinner \u2014 Response 1", "1"),
    ("**Response 1:** invents a cat.\n**Response 2:** correct.\n**Final verdict:** 2", "2"),
    (
        "Response 1:\n- invents a dog\nResponse 2:\n- accurate\nThe better response is Response 2.",
        "2",
    ),
    ("First response: invents a dog.\nSecond response: accurate.\nBest: the second response", "2"),
    ("Response 1: invents a dog.\nResponse 2: accurate.\nResponse 2 is better.", "2"),
    ("Response 1: more detail, but a dog.\nResponse 2: accurate.\nI prefer Response 2.", "2"),
    ("Response 1: accurate.\nResponse 2: accurate.\nBoth are equally good.", "tie"),
    # a critique of each response and no conclusion: nothing to read, never the first label
    ("Response 1: hallucinates a dog.\nResponse 2: accurate.", None),
    ("Response 2: names only the red circle.", None),
    # explicit verdict phrases on their own
    ("Better: Response 2", "2"),
    ("Final answer - Response 1", "1"),
    ("Final answer \u2013 the second response.", "2"),
    ("Best response = 1", "1"),
    ("Preferred: Response 1. It does not invent the dog.", "1"),
    # not verdict phrases: "better:" mid-sentence, a number that is not a label
    ("Response 1 is better: Response 2 invents a dog.", "1"),
    ("Response 1. Response 2's answer: two circles, which is wrong.", "1"),
    # a heading on its own line is still the label the prompt asks for
    ("**Response 2**:\nIt names only the objects in the image.", "2"),
]


def test_explicit_verdict_beats_leading_label_on_cpu() -> None:
    text = "Response 1\nOn a closer look, Response 1 invents a dog.\nFinal answer: Response 2"
    assert parse_judge_output(text) == "2"


def test_per_response_layout_in_both_orders_on_cpu() -> None:
    # y_a hallucinates. Order A shows y_a as Response 1, order B shows it as Response 2.
    order_a = "Response 1: mentions a dog that is not there.\nResponse 2: accurate.\nVerdict: 2"
    order_b = "Response 1: accurate.\nResponse 2: mentions a dog that is not there.\nVerdict: 1"
    verdict = combine_orders(parse_judge_output(order_a), parse_judge_output(order_b))
    assert (verdict.keep, verdict.winner) == (True, "b")


@pytest.mark.parametrize(("text", "expected"), CASES + PER_RESPONSE)
def test_parse_judge_output_on_cpu(text: str, expected: str | None) -> None:
    assert parse_judge_output(text) == expected


def test_explicit_verdict_beats_tie_phrase_on_cpu() -> None:
    text = "Response 2 is better. Neither mentions the background, but Response 1 invents a dog."
    assert parse_judge_output(text) == "2"


def test_combine_orders_on_cpu() -> None:
    # Order A shows y_a first; order B shows y_b first, so "2" in B also means y_a.
    keep_a = combine_orders("1", "2")
    assert (keep_a.keep, keep_a.winner, keep_a.reason) == (True, "a", "agree")
    keep_b = combine_orders("2", "1")
    assert (keep_b.keep, keep_b.winner, keep_b.reason) == (True, "b", "agree")
    # Position bias: both orders prefer whatever is shown first.
    flip = combine_orders("1", "1")
    assert (flip.keep, flip.winner, flip.reason) == (False, None, "disagree")
    assert combine_orders("tie", "2").reason == "tie"
    assert combine_orders(None, "tie").reason == "parse_failure"
    assert combine_orders("1", None).keep is False


def test_tally_on_cpu() -> None:
    verdicts = [
        combine_orders("1", "2"),
        combine_orders("2", "1"),
        combine_orders("1", "1"),
        combine_orders("tie", "tie"),
        combine_orders(None, None),
        combine_orders("2", None),
    ]
    t = tally(verdicts)
    assert (t.pairs, t.kept, t.ties, t.disagreements, t.parse_failures) == (6, 2, 1, 1, 2)
    assert t.unparsed_outputs == 3
    assert t.keep_rate == pytest.approx(2 / 6)
    assert tally([]).keep_rate == 0.0
