"""Parse a pairwise judge's free text and combine both presentation orders (ALGORITHMS.md 4).

The judge sees two responses as "Response 1" and "Response 2". Pairwise verdicts flip
about 13% of the time when the answers swap places, so every pair is judged twice:
order A shows y_a as Response 1, order B shows y_b as Response 1. A pair is kept only
when both orders name the same underlying response; ties, disagreements and outputs we
cannot parse are dropped and counted.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Choice = Literal["1", "2", "tie"]
Reason = Literal["agree", "tie", "disagree", "parse_failure"]

# "Response 1", "**Response 2**", "response #1", "Response One", "the first response".
_NUM = r"(1|2|one|two)"
_RESP = rf"(?:response|answer|assistant)\s*#?\s*{_NUM}\b"
_ORDINAL_RESP = r"\b(first|second)\s+(?:response|answer)\b"
_RESP_ANY = rf"(?:{_RESP}|{_ORDINAL_RESP})"
_WORDS = {"1": "1", "one": "1", "first": "1", "2": "2", "two": "2", "second": "2"}

# Explicit verdict phrases: "Verdict: Response 2", "Final answer - 1", "[[2]]". They win
# over everything else, a leading label included (a judge that critiques each response
# before concluding starts its reply with "Response 1: ..."). Run on newline-kept text.
_DASH = r"[:=\-\u2013\u2014]"  # ":", "=", "-", en dash, em dash
# A bare number counts only when it ends the phrase ("Final answer: 1"), not "answer: 2 dogs".
_BARE_NUM = rf"{_NUM}(?=[ \t]*(?:$|\n|[.,;!)\]]))"
_NAMED = rf"(?:the\s+)?{_RESP_ANY}"  # "Response 2", "the second response"
_NOUN_KEY = (
    r"(?:final verdict|verdict|final answer|final choice|answer|choice|decision|winner|"
    r"better response|better answer|best response|best answer|preferred response|preference)"
)
# Keys strong enough to take a bare number: "Final answer: 2" is a verdict, but "the correct
# answer: 2" in a critique of a count question is not.
_STRONG_KEY = (
    r"(?:final verdict|verdict|final answer|final choice|winner|better response|better answer|"
    r"best response|best answer|preferred response)"
)
# Bare adjectives only as a line or sentence label ("Better: Response 2"): mid-sentence,
# "Response 1 is better: Response 2 invents a dog" names the other response after "better".
_ADJ_KEY = r"(?:better|best|preferred|better one|better choice)"
_EXPLICIT_PATTERNS: tuple[re.Pattern[str], ...] = (
    # "[[1]]" or "[[Response 2]]": the bracketed verdict many judge prompts ask for.
    re.compile(rf"\[\[\s*(?:{_RESP_ANY}|{_NUM})\s*\]\]"),
    # "Verdict: Response 2", "Final answer - 1", "The better response is Response 2".
    re.compile(
        rf"\b(?:{_NOUN_KEY}\s*{_DASH}\s*{_NAMED}|{_STRONG_KEY}\s*{_DASH}\s*{_BARE_NUM}"
        rf"|{_NOUN_KEY}\s+(?:is|was|would be)\s+{_NAMED})"
    ),
    # "Better: Response 2", "Best - the first response" at the start of a line/sentence.
    re.compile(rf"(?:^|\n|[.!?][ \t]+)[^a-z0-9\n]*{_ADJ_KEY}\s*{_DASH}\s*(?:{_NAMED}|{_BARE_NUM})"),
)

# Verdicts phrased inside a sentence, tried in this order after the leading label; within a
# pattern the earliest match wins.
_GOOD = r"(?:better|best|preferred|superior|more accurate|more helpful|the winner|preferable)"
_VERDICT_PATTERNS: tuple[tuple[re.Pattern[str], bool], ...] = (
    # "I prefer Response 1", "I would choose the second response".
    (re.compile(rf"\b(?:prefer|choose|chose|pick|select|favou?r|go with)\s+{_RESP_ANY}"), False),
    # "Response 1 is better", "Response 2 has less hallucination", "Response 1 wins".
    (
        re.compile(
            rf"{_RESP_ANY}\s+(?:is|was|seems|appears|would be)?\s*(?:clearly |slightly |much |"
            rf"the |overall )*{_GOOD}"
        ),
        False,
    ),
    (
        re.compile(
            rf"{_RESP_ANY}\s+(?:has|contains|shows|makes) (?:less|fewer|no) "
            r"(?:hallucinat|error|mistake|inaccura|invented)"
        ),
        False,
    ),
    (re.compile(rf"{_RESP_ANY}\s+wins\b"), False),
    # "Response 1 is worse" names the other one.
    (re.compile(rf"{_RESP_ANY}\s+(?:is|was)?\s*(?:clearly |slightly |much )*worse"), True),
)

_TIE_PATTERN = re.compile(
    r"\btie\b|\bneither\b|\bboth (?:responses |answers )?(?:are )?(?:equally|equal)\b|"
    r"\bequally (?:good|bad|accurate|helpful|hallucinated)\b|\bno (?:clear )?(?:difference|"
    r"winner|preference)\b|\bcannot (?:decide|choose)\b|\bthe same quality\b|\bequivalent\b"
)


# The judge prompt asks to begin with the label: "Response 2.", "**Response 1**\n...",
# "Response 2:" alone on its line. A label followed by more words ("Response 1 mentions
# ...", "Response 1: invents a dog") is not: after a colon or dash comes a critique.
_LABEL_START = rf"^[^a-z0-9\n]*{_RESP_ANY}[ \t]*"
_LEADING_LABEL = re.compile(rf"{_LABEL_START}(?:[.!;)\]]|{_DASH}[^a-z0-9\n]*(?:\n|$)|\n|$)")
_CRITIQUE_LABEL = re.compile(rf"{_LABEL_START}{_DASH}[^a-z0-9\n]*[a-z0-9]")
# A line that opens with "Response N:" / "Response N -": a per-response section heading.
_SECTION_LABEL = re.compile(rf"{_LABEL_START}{_DASH}", re.MULTILINE)


def _normalise(text: str, keep_newlines: bool = False) -> str:
    """Lower-case, drop markdown emphasis and collapse whitespace."""
    text = re.sub(r"[*_`#>]+", " ", text.lower())
    if keep_newlines:
        return re.sub(r"[ \t]+", " ", text).strip()
    return re.sub(r"\s+", " ", text).strip()


def _choice_of(match: re.Match[str]) -> str:
    word = next(g for g in match.groups() if g is not None)
    return _WORDS[word]


def parse_judge_output(text: str) -> Choice | None:
    """Map a judge's free text to "1", "2", "tie", or None when no verdict can be read.

    Precedence:
    1. An explicit verdict phrase ("Verdict: Response 2", "Final answer - 1", "Better:
       Response 1", "[[2]]"), anywhere: the judge's own conclusion.
    2. A leading bare label ("Response 2." or "**Response 2**" on its own line, the format
       the judge prompt asks for). "Response 1: <critique>" is not one, and no leading
       label counts when the text is laid out per response (lines opening with both
       "Response 1:" and "Response 2:").
    3. A verdict inside a sentence ("I prefer Response 1", "Response 2 is better"; the first
       pattern family that matches, earliest match in the text), which beats a tie phrase
       because explanations often say "neither mentions X" after the verdict.
    4. A tie phrase.
    5. Otherwise an opening sentence that names exactly one response counts for it, unless
       it is a "Response N: <critique>" line or the text is laid out per response. Naming
       both there, or nothing, is a parse failure.
    """
    norm = _normalise(text)
    if not norm:
        return None
    lines = _normalise(text, keep_newlines=True)
    for explicit in _EXPLICIT_PATTERNS:
        match = explicit.search(lines)
        if match is not None:
            return _choice_of(match)  # type: ignore[return-value]
    sections = {_choice_of(m) for m in _SECTION_LABEL.finditer(lines)}
    per_response = len(sections) == 2
    leading = None if per_response else _LEADING_LABEL.match(lines)
    if leading is not None:
        return _choice_of(leading)  # type: ignore[return-value]
    for pattern, inverted in _VERDICT_PATTERNS:
        match = pattern.search(norm)
        if match is not None:
            choice = _choice_of(match)
            if inverted:
                choice = "2" if choice == "1" else "1"
            return choice  # type: ignore[return-value]
    if _TIE_PATTERN.search(norm):
        return "tie"
    if per_response or _CRITIQUE_LABEL.match(lines):
        return None
    first_sentence = re.split(r"(?<=[.!?:])\s|\n", text.strip().lower(), maxsplit=1)[0]
    named = {_choice_of(m) for m in re.finditer(_RESP_ANY, _normalise(first_sentence))}
    if len(named) == 1:
        return named.pop()  # type: ignore[return-value]
    return None


@dataclass(frozen=True)
class PairVerdict:
    """Outcome of judging one pair (y_a, y_b) in both orders.

    Attributes:
        keep: True only when both orders name the same response.
        winner: "a" or "b" when kept, else None.
        reason: "agree" (kept), "parse_failure" (an order had no readable verdict; wins
            over the others), "tie" (an order said tie), or "disagree" (orders flipped).
        order_a / order_b: the parsed choices, for logging.
    """

    keep: bool
    winner: Literal["a", "b"] | None
    reason: Reason
    order_a: Choice | None
    order_b: Choice | None


def combine_orders(order_a: Choice | None, order_b: Choice | None) -> PairVerdict:
    """Combine order A (y_a shown as Response 1) with order B (y_b shown as Response 1)."""
    reason: Reason
    winner: Literal["a", "b"] | None = None
    if order_a is None or order_b is None:
        reason = "parse_failure"
    elif order_a == "tie" or order_b == "tie":
        reason = "tie"
    else:
        # In order B the labels are swapped: "2" there means y_a.
        a_says = "a" if order_a == "1" else "b"
        b_says = "a" if order_b == "2" else "b"
        if a_says == b_says:
            reason, winner = "agree", a_says  # type: ignore[assignment]
        else:
            reason = "disagree"
    return PairVerdict(winner is not None, winner, reason, order_a, order_b)


@dataclass(frozen=True)
class JudgeTally:
    """Counts over many pairs. `unparsed_outputs` counts single judge outputs (0-2 a pair)."""

    pairs: int
    kept: int
    ties: int
    disagreements: int
    parse_failures: int
    unparsed_outputs: int

    @property
    def keep_rate(self) -> float:
        return self.kept / self.pairs if self.pairs else 0.0


def tally(verdicts: Iterable[PairVerdict]) -> JudgeTally:
    """Aggregate pair verdicts into the counts the pipeline reports."""
    counts = {"agree": 0, "tie": 0, "disagree": 0, "parse_failure": 0}
    pairs = unparsed = 0
    for v in verdicts:
        pairs += 1
        counts[v.reason] += 1
        unparsed += (v.order_a is None) + (v.order_b is None)
    return JudgeTally(
        pairs=pairs,
        kept=counts["agree"],
        ties=counts["tie"],
        disagreements=counts["disagree"],
        parse_failures=counts["parse_failure"],
        unparsed_outputs=unparsed,
    )
