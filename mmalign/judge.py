"""Pairwise preference judges (ALGORITHMS.md section 4): pure logic, no model, no Ray.

Two judges rank a pair (y_a, y_b) of answers to one image-grounded question:

- **VLM judge** (`judge_pairs`): a generative model reads the image, the question and
  the two answers labelled "Response 1" / "Response 2" and names the better one. Pairwise
  verdicts flip when the answers swap places, so each pair is shown in both orders
  (order A: y_a is Response 1; order B: y_b is Response 1) and kept only when both name
  the same underlying answer (`mmalign.judge_parse.combine_orders`). The model is any
  `generate(list[(image, prompt)]) -> list[str]` callable, the same contract
  `mmalign.evaluation` uses, so the judge is tested with an honest stand-in for the text
  channel and served by whatever engine owns the weights.
- **Object judge** (`object_judge`): exact and deterministic, from the image's object
  annotations. Fewer hallucinated objects wins (a "yes" to "Is there a X?" claims X);
  then more annotated objects recalled; otherwise a tie. It is the judge for ShapesWorld
  runs and a reference for the VLM judge.

A verdict is a flat dict with the same keys for every row (Ray Data and JSON both want a
fixed shape): see `verdict_dict`. Ties, disagreements, parse failures and invalid rows are
dropped (`kept=False`) and counted (`JudgeStats`), never guessed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from mmalign.judge_parse import combine_orders, parse_judge_output
from mmalign.metrics.vocab import ObjectVocabulary

# agree/disagree/tie/parse_failure come from judging; "invalid" = the row broke the input
# contract (the caller's fault); "error" = the judge itself failed on a valid row.
Reason = Literal["agree", "disagree", "tie", "parse_failure", "invalid", "error"]
REASONS: tuple[str, ...] = ("agree", "disagree", "tie", "parse_failure", "invalid", "error")

_YES = re.compile(r"\s*yes\b", re.IGNORECASE)

# image -> any object the generate callable accepts (encoded bytes, a PIL image, ...).
GenerateFn = Callable[[Sequence[tuple[Any, str]]], list[str]]

JUDGE_INSTRUCTIONS = (
    "You are shown an image, a question about it and two candidate responses. Decide "
    "which response is better.\n"
    "What matters most is hallucination: a good response claims nothing the image does "
    "not show. Check every object, attribute, colour, count and spatial relation that a "
    "response mentions against the image; one invented or wrong detail outweighs any "
    "amount of extra content. A response that sticks to what is clearly visible beats one "
    "that adds ambiguous or uncertain details. Between responses that are equally "
    "faithful, prefer the more helpful one, grounded in the image; for a practical "
    "question, prefer the concise, direct answer."
)
JUDGE_ANSWER_FORMAT = (
    'Begin your reply with "Response 1" or "Response 2", whichever is better, then '
    "explain your choice briefly."
)


# "compact": the same criteria in a few words, for small judges where every prompt token
# costs (the tiny ShapesWorld judge is trained on exactly this format).
COMPACT_JUDGE_QUESTION = (
    "Which response is better? No invented objects or colours first, then more detail."
)
PROMPT_STYLES: tuple[str, ...] = ("full", "compact")


def format_judge_prompt(
    question: str, response_1: str, response_2: str, style: str = "full"
) -> str:
    """The judge's question text for one presentation order (the engine adds the image).

    style "full" carries the long instructions (real VLM judges); "compact" is question,
    both responses and one short line (~20 tokens of instructions instead of ~150).
    Responses are shown verbatim (stripped) so the judge sees exactly what the policy wrote.
    """
    if style == "compact":
        return (
            f"Question: {question.strip()}\n"
            f"Response 1: {response_1.strip()}\n"
            f"Response 2: {response_2.strip()}\n"
            f"{COMPACT_JUDGE_QUESTION}"
        )
    if style != "full":
        raise ValueError(f"judge prompt style must be one of {PROMPT_STYLES}, got {style!r}")
    return (
        f"{JUDGE_INSTRUCTIONS}\n\n"
        f"Question: {question.strip()}\n\n"
        f"Response 1: {response_1.strip()}\n\n"
        f"Response 2: {response_2.strip()}\n\n"
        f"{JUDGE_ANSWER_FORMAT}"
    )


def build_judge_requests(
    question: str,
    response_a: str,
    response_b: str,
    both_orders: bool = True,
    style: str = "full",
) -> list[str]:
    """Judge prompts for one pair: [order A] or [order A, order B].

    Order A shows y_a as Response 1; order B shows y_b as Response 1.
    """
    prompts = [format_judge_prompt(question, response_a, response_b, style)]
    if both_orders:
        prompts.append(format_judge_prompt(question, response_b, response_a, style))
    return prompts


@dataclass(frozen=True)
class Verdict:
    """Outcome of judging one pair; `verdict_dict` is its row form.

    Attributes:
        winner: "a" or "b" when kept, else None.
        kept: the pair may be used as a preference (winner chosen, loser rejected).
        reason: see `Reason`. For a single-order VLM judge or the object judge a decisive
            verdict is "agree" (nothing disagreed with it).
        judge: "vlm", "objects" or "reward-model".
        orders: presentation orders the VLM judge ran (2 with both orders, 1, or 0 when no
            model text was produced: object judge, invalid or failed rows).
        order_a / order_b: parsed VLM choices "1" / "2" / "tie" / None (None if not run).
        raw_a / raw_b: the judge's full texts for order A / B ("" if not run); for the
            reward-model judge, the scores of response a / b as text.
        error: why an "invalid"/"error" row was not judged; "" otherwise.
        hallucinated_a/b, recalled_a/b: object judge counts (distinct classes); -1 for VLM.
    """

    winner: Literal["a", "b"] | None
    kept: bool
    reason: Reason
    judge: str
    orders: int = 0
    order_a: str | None = None
    order_b: str | None = None
    raw_a: str = ""
    raw_b: str = ""
    error: str = ""
    hallucinated_a: int = -1
    hallucinated_b: int = -1
    recalled_a: int = -1
    recalled_b: int = -1


VERDICT_KEYS: tuple[str, ...] = tuple(Verdict.__dataclass_fields__)


def verdict_dict(verdict: Verdict) -> dict[str, Any]:
    """Flat row with exactly `VERDICT_KEYS`."""
    return asdict(verdict)


def failed_verdict(judge: str, reason: Literal["invalid", "error"], error: str) -> Verdict:
    """Verdict for a row that could not be judged (kept=False, the message in `error`)."""
    return Verdict(winner=None, kept=False, reason=reason, judge=judge, error=error)


def score_verdict(score_a: float, score_b: float, tie_margin: float = 0.0) -> Verdict:
    """Reward-model verdict: the higher score wins; |a - b| <= tie_margin is a tie. Each
    answer is scored alone, so both presentation orders give the same verdict."""
    raw = (f"{score_a:.6g}", f"{score_b:.6g}")
    if abs(score_a - score_b) <= tie_margin:
        return Verdict(None, False, "tie", "reward-model", 0, raw_a=raw[0], raw_b=raw[1])
    winner: Literal["a", "b"] = "a" if score_a > score_b else "b"
    return Verdict(winner, True, "agree", "reward-model", 0, raw_a=raw[0], raw_b=raw[1])


def verdict_from_texts(raw_a: str, raw_b: str | None) -> Verdict:
    """VLM verdict from the judge's text for order A and (if both orders ran) order B."""
    order_a = parse_judge_output(raw_a)
    if raw_b is None:  # single order: trust order A alone
        winner = {"1": "a", "2": "b"}.get(order_a or "")
        reason: Reason = "agree" if winner else ("tie" if order_a == "tie" else "parse_failure")
        return Verdict(winner, winner is not None, reason, "vlm", 1, order_a, None, raw_a)  # type: ignore[arg-type]
    order_b = parse_judge_output(raw_b)
    pair = combine_orders(order_a, order_b)
    return Verdict(pair.winner, pair.keep, pair.reason, "vlm", 2, order_a, order_b, raw_a, raw_b)


@dataclass(frozen=True)
class PairRequest:
    """One pair to judge. `image` is opaque here: whatever the generate callable takes."""

    image: Any
    question: str
    response_a: str
    response_b: str


def judge_pairs(
    pairs: Sequence[PairRequest],
    generate: GenerateFn,
    both_orders: bool = True,
    style: str = "full",
) -> list[Verdict]:
    """Judge many pairs with ONE generate call (2 prompts a pair with both orders).

    `style` is the prompt style (`format_judge_prompt`): "compact" for the tiny judge.

    Returns one Verdict per pair, in order. `generate` must return one text per request;
    a wrong count raises ValueError (a silent misalignment would mislabel every pair).
    """
    requests: list[tuple[Any, str]] = []
    for p in pairs:
        prompts = build_judge_requests(p.question, p.response_a, p.response_b, both_orders, style)
        for prompt in prompts:
            requests.append((p.image, prompt))
    texts = generate(requests) if requests else []
    if len(texts) != len(requests):
        raise ValueError(f"generate returned {len(texts)} texts for {len(requests)} requests")
    step = 2 if both_orders else 1
    return [
        verdict_from_texts(texts[i], texts[i + 1] if both_orders else None)
        for i in range(0, len(texts), step)
    ]


def judge_pair(
    image: Any,
    question: str,
    response_a: str,
    response_b: str,
    generate: GenerateFn,
    both_orders: bool = True,
    style: str = "full",
) -> Verdict:
    """Judge one pair (see `judge_pairs`)."""
    return judge_pairs(
        [PairRequest(image, question, response_a, response_b)], generate, both_orders, style
    )[0]


# ------------------------------------------------------------------ object judge


def canonical_objects(objects: Iterable[str], vocab: ObjectVocabulary) -> frozenset[str]:
    """Annotated objects as canonical classes; surface forms ("red disc") are mapped.

    Raises ValueError naming unknown objects: one that could never be recalled would
    silently bias every verdict on that image.
    """
    out, unknown = set(), []
    for obj in objects:
        cls = obj if obj in vocab else vocab.canonical(obj)
        if cls is None:
            unknown.append(obj)
        else:
            out.add(cls)
    if unknown:
        raise ValueError(f"objects not in the vocabulary: {sorted(unknown)}")
    return frozenset(out)


def claimed_objects(response: str, question: str, vocab: ObjectVocabulary) -> set[str]:
    """Object classes a response asserts are in the image: the ones it names, plus the one
    a yes/no question asks about when the answer starts with "yes". Answering "Yes." to
    "Is there a red circle in the image?" claims a red circle as surely as naming one; "No."
    claims nothing (it can only cost recall). A question naming several classes is not an
    existence question about one object, so its answer adds nothing."""
    claimed = set(vocab.find_mentions(response))
    if question and _YES.match(response):
        asked = set(vocab.find_mentions(question))
        if len(asked) == 1:
            claimed |= asked
    return claimed


def object_judge(
    response_a: str,
    response_b: str,
    objects: Collection[str],
    vocab: ObjectVocabulary,
    question: str = "",
) -> Verdict:
    """Rank two responses by the image's annotated objects (exact, order-invariant).

    Per response, over DISTINCT classes claimed (`claimed_objects`: named, or affirmed by a
    "yes" to an existence `question`; repeating one object is not two hallucinations):
    hallucinated = claimed but not annotated; recalled = claimed and annotated. Fewer
    hallucinated wins; equal -> more recalled wins; equal -> tie.
    """
    truth = canonical_objects(objects, vocab)
    mentioned_a = claimed_objects(response_a, question, vocab)
    mentioned_b = claimed_objects(response_b, question, vocab)
    hall_a, hall_b = len(mentioned_a - truth), len(mentioned_b - truth)
    rec_a, rec_b = len(mentioned_a & truth), len(mentioned_b & truth)
    key_a, key_b = (-hall_a, rec_a), (-hall_b, rec_b)
    winner: Literal["a", "b"] | None = "a" if key_a > key_b else "b" if key_b > key_a else None
    return Verdict(
        winner=winner,
        kept=winner is not None,
        reason="agree" if winner else "tie",
        judge="objects",
        hallucinated_a=hall_a,
        hallucinated_b=hall_b,
        recalled_a=rec_a,
        recalled_b=rec_b,
    )


def object_score(
    response: str,
    objects: Collection[str],
    vocab: ObjectVocabulary,
    question: str = "",
    hallucination_weight: float = 1.0,
) -> float:
    """A scalar reward from the annotations, on the object judge's counts (distinct
    classes): recalled - hallucination_weight * hallucinated. Ranks two answers as
    `object_judge` does when the weight is large; the RL baselines' object-grounded reward."""
    truth = canonical_objects(objects, vocab)
    mentioned = claimed_objects(response, question, vocab)
    return float(len(mentioned & truth)) - hallucination_weight * len(mentioned - truth)


# ------------------------------------------------------------------ counting


@dataclass
class JudgeStats:
    """Running counts over verdict rows; mergeable across batches and replicas.

    `unparsed_outputs` counts single judge texts with no readable verdict (0-2 a pair).
    """

    pairs: int = 0
    kept: int = 0
    reasons: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    unparsed_outputs: int = 0

    def add(self, verdict: Mapping[str, Any] | Verdict) -> None:
        v = verdict_dict(verdict) if isinstance(verdict, Verdict) else verdict
        self.pairs += 1
        self.kept += bool(v["kept"])
        self.reasons[v["reason"]] = self.reasons.get(v["reason"], 0) + 1
        if v["orders"] >= 1:
            self.unparsed_outputs += (v["order_a"] is None) + (
                v["orders"] == 2 and v["order_b"] is None
            )

    def update(self, verdicts: Iterable[Mapping[str, Any] | Verdict]) -> JudgeStats:
        for v in verdicts:
            self.add(v)
        return self

    def merge(self, other: JudgeStats) -> JudgeStats:
        self.pairs += other.pairs
        self.kept += other.kept
        self.unparsed_outputs += other.unparsed_outputs
        for k, n in other.reasons.items():
            self.reasons[k] = self.reasons.get(k, 0) + n
        return self

    @property
    def keep_rate(self) -> float:
        """kept / pairs (0.0 with no pairs)."""
        return self.kept / self.pairs if self.pairs else 0.0

    def as_dict(self) -> dict[str, float]:
        """Flat numbers for logs/metrics: judge/pairs, judge/kept, judge/ties, ..."""
        r = self.reasons
        return {
            "judge/pairs": self.pairs,
            "judge/kept": self.kept,
            "judge/keep_rate": self.keep_rate,
            "judge/ties": r.get("tie", 0),
            "judge/disagreements": r.get("disagree", 0),
            "judge/parse_failures": r.get("parse_failure", 0),
            "judge/unparsed_outputs": self.unparsed_outputs,
            "judge/invalid_rows": r.get("invalid", 0),
            "judge/errors": r.get("error", 0),
        }


def judge_accuracy(
    verdicts: Sequence[Mapping[str, Any]], labels: Sequence[str]
) -> dict[str, float]:
    """Accuracy of verdict rows against known better answers ("a"/"b" per pair).

    Returns accuracy over kept pairs (the number that matters: only kept pairs become
    preferences), correct-and-kept over all pairs, keep rate, agreement between orders
    (pairs where both orders gave a decisive, parsed choice: fraction naming the same
    answer), single-order accuracy of order A alone (decisive outputs only; a judge
    used without the order swap would score this) and `position_only_accuracy`, what a
    guesser that always names slot A (y_a) scores: the fraction of pairs whose better answer
    is y_a (order A alone shows skill only where it beats this). 0.0 where a denominator
    is empty.
    """
    if len(verdicts) != len(labels):
        raise ValueError(f"{len(verdicts)} verdicts for {len(labels)} labels")
    kept = [(v, y) for v, y in zip(verdicts, labels) if v["kept"]]
    correct = sum(v["winner"] == y for v, y in kept)
    decisive_both = [
        v for v in verdicts if v["order_a"] in ("1", "2") and v["order_b"] in ("1", "2")
    ]
    agree = sum((v["order_a"] == "1") == (v["order_b"] == "2") for v in decisive_both)
    single = [(v, y) for v, y in zip(verdicts, labels) if v["order_a"] in ("1", "2")]
    single_ok = sum(("a" if v["order_a"] == "1" else "b") == y for v, y in single)
    n = len(verdicts)
    return {
        "pairs": n,
        "kept": len(kept),
        "keep_rate": len(kept) / n if n else 0.0,
        "accuracy_kept": correct / len(kept) if kept else 0.0,
        "accuracy_all": correct / n if n else 0.0,
        "order_agreement": agree / len(decisive_both) if decisive_both else 0.0,
        "order_a_accuracy": single_ok / len(single) if single else 0.0,
        "position_only_accuracy": sum(y == "a" for y in labels) / n if n else 0.0,
    }
