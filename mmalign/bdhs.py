"""BDHS, Bias-Driven Hallucination Sampling ([ALIGN] Alg. 1; ALGORITHMS.md section 2).

Pure logic only: the model sits behind two callables so the loop is testable without one.

- ``generate_fn(requests) -> continuations`` continues each `ContinuationRequest` under the
  prompt and the image with only the visible image-feature positions kept.
- ``embed_fn(texts) -> [n, d] array`` embeds texts (all-mpnet-base-v2 in the paper).

The knobs are `mmalign.config.BDHSConfig` as it is (rho_th, n_bdhs, eps_s, swap_prob; its
`validate` checks them); defaults are [ALIGN]'s final-results setting.

Readings where the paper is silent (configurable or documented here):
- cut points are uniform over word boundaries, the empty prefix included; a kept prefix
  never ends in whitespace, so the continuation starts with its own space token;
- when a leading yes/no was swapped, the cut keeps at least that first word, otherwise the
  swap would be a no-op;
- the prompt context of sentence k is the ground truth up to s_k (original text, never the
  swapped one), and y- joins the y-_k with the reference's own inter-sentence whitespace.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

Splitter = Callable[[str], list[str]]
GenerateFn = Callable[[Sequence["ContinuationRequest"]], list[str]]
EmbedFn = Callable[[list[str]], np.ndarray]

if TYPE_CHECKING:  # the knobs are the config section itself; no import at run time
    from mmalign.config import BDHSConfig


@dataclass(frozen=True)
class ContinuationRequest:
    """One continuation for generate_fn.

    Attributes:
        visible: bool [num_image_positions], True = image-feature position visible.
        response_prefix: response text the model continues (after prompt and image).
        stop_at_full_stop: True for a guided sentence (stop after the first "."), False
            for the unguided full response (stop at EOS / max_new_tokens only).
    generate_fn returns only the new text, not the prefix.
    """

    visible: np.ndarray
    response_prefix: str
    stop_at_full_stop: bool = True


@dataclass(frozen=True)
class BDHSResult:
    """What one BDHS sample produced.

    Attributes:
        rejected: y-.
        similarity: cosine(embed(y-), embed(y+)) of the returned y-.
        tries: tries used; the returned y- comes from the last one (1-based).
        final_unguided: True when y- is the unguided response of the final try.
        accepted: False only when n_bdhs == 1 and the single try failed the gate
            (y- is still returned so the caller can log it; drop it).
        cut_points: per sentence, the character cut into (possibly swapped) s_k; empty
            for an unguided y-.
        swapped: per sentence, whether a leading yes/no was swapped.
        mask_density: fraction of image positions visible in the returned try.
        similarities: gate similarity of every try, in order.
    """

    rejected: str
    similarity: float
    tries: int
    final_unguided: bool
    accepted: bool
    cut_points: tuple[int, ...]
    swapped: tuple[bool, ...]
    mask_density: float
    similarities: tuple[float, ...]


def sample_visibility_mask(
    num_positions: int, rho_th: float, rng: np.random.Generator
) -> np.ndarray:
    """Bool [num_positions]: position i visible iff u_i >= rho_th, u_i ~ U[0, 1)."""
    return rng.random(num_positions) >= rho_th


# A sentence: from a non-space char, lazily up to terminal punctuation followed by
# whitespace/end, or up to a newline (list items), or to the end of the text.
_SENTENCE_RE = re.compile(r"\S[^\n]*?(?:[.!?]+(?=\s|$)|(?=\n)|$)")


def split_sentences_regex(text: str) -> list[str]:
    """Default splitter: sentences are substrings of text, stripped of outer whitespace."""
    return [m.group(0).strip() for m in _SENTENCE_RE.finditer(text) if m.group(0).strip()]


def split_sentences_spacy(text: str) -> list[str]:
    """spaCy rule-based splitter (blank English pipeline + sentencizer; no model download)."""
    return [s.text.strip() for s in _spacy_sentencizer()(text).sents if s.text.strip()]


@functools.cache
def _spacy_sentencizer() -> Any:
    import spacy  # heavy optional dependency

    nlp = spacy.blank("en")
    nlp.add_pipe("sentencizer")
    return nlp


def sentence_spans(text: str, splitter: Splitter = split_sentences_regex) -> list[tuple[int, int]]:
    """Locate each sentence from splitter in text, in order; [(start, end)] char offsets.

    Raises ValueError when the splitter returns text that is not a substring in order.
    """
    spans: list[tuple[int, int]] = []
    pos = 0
    for sentence in splitter(text):
        start = text.find(sentence, pos)
        if start < 0:
            raise ValueError(f"splitter returned a non-substring sentence: {sentence!r}")
        spans.append((start, start + len(sentence)))
        pos = start + len(sentence)
    return spans


# A "." that closes one of these is not a sentence end (matched on the text up to it).
_ABBREVIATION_RE = re.compile(
    r"(?:\b(?:e\.g|i\.e|etc|vs|cf|approx|incl|fig|no|mr|mrs|ms|dr|st|jr|sr))\.$", re.IGNORECASE
)


def cut_at_sentence_end(text: str, stops: Sequence[str]) -> str | None:
    """`text` up to and including the earliest stop string that ends a sentence, or None.

    A stop ends a sentence only when whitespace follows it, so the "." of "2.5" and a "."
    that is the last character generated so far do not (a decoder checks again after the
    next token); a "." that closes an abbreviation ("e.g.", "i.e.", "Dr.") does not either.
    A decoder that stops here has generated one token past the stop; the cut drops it.
    """
    best: int | None = None
    for stop in stops:
        start = 0
        while (i := text.find(stop, start)) >= 0:
            end = i + len(stop)
            if best is not None and end >= best:
                break
            followed = end < len(text) and text[end].isspace()
            if followed and not (stop.endswith(".") and _ABBREVIATION_RE.search(text[:end])):
                best = end
                break
            start = i + 1
    return None if best is None else text[:best]


_YES_NO_RE = re.compile(r"^(\s*)(yes|no)\b", re.IGNORECASE)


def swap_yes_no(sentence: str) -> str | None:
    """Swap a leading yes<->no keeping its case ("Yes"->"No", "NO"->"YES"); None if absent."""
    m = _YES_NO_RE.match(sentence)
    if m is None:
        return None
    word = m.group(2)
    new = "no" if word.lower() == "yes" else "yes"
    if len(word) > 1 and word.isupper():
        new = new.upper()
    elif word[0].isupper():
        new = new.capitalize()
    return m.group(1) + new + sentence[m.end() :]


def word_boundary_cuts(sentence: str) -> list[int]:
    """Cut candidates: 0 and the end of every word but the last, so prefixes keep 0..n-1 words.

    "The cat sat." -> [0, 3, 7]: prefixes "", "The", "The cat".
    """
    ends = [m.end() for m in re.finditer(r"\S+", sentence)]
    return [0, *ends[:-1]]


@dataclass(frozen=True)
class ContinuationPlan:
    """Guided continuations of one try. request_of[k] indexes requests, or is None when
    sentence k is kept whole (a swapped one-word answer such as "No.")."""

    requests: list[ContinuationRequest]
    request_of: list[int | None]
    prefixes: list[str]
    cut_points: tuple[int, ...]
    swapped: tuple[bool, ...]

    def pieces(self, continuations: Sequence[str]) -> list[str]:
        """y-_k = s_k[:cut] + continuation, per sentence."""
        if len(continuations) != len(self.requests):
            raise ValueError(
                f"{len(continuations)} continuations for {len(self.requests)} requests"
            )
        return [
            p if r is None else p + continuations[r]
            for p, r in zip(self.prefixes, self.request_of, strict=True)
        ]


def plan_continuations(
    reference: str,
    spans: Sequence[tuple[int, int]],
    visible: np.ndarray,
    rng: np.random.Generator,
    swap_prob: float = 0.5,
) -> ContinuationPlan:
    """Build one guided continuation request per sentence of the reference.

    For sentence k: maybe swap a leading yes/no (prob swap_prob), draw a cut uniformly from
    word_boundary_cuts (after a swap, from those keeping at least the first word), and ask
    to continue reference[:start_k] + s_k[:cut] (the context is stripped on the right when
    the prefix is empty, so the model chooses the next token's leading space itself).
    """
    requests: list[ContinuationRequest] = []
    request_of: list[int | None] = []
    prefixes: list[str] = []
    cuts: list[int] = []
    swaps: list[bool] = []
    for start, end in spans:
        sentence = reference[start:end]
        swapped_sentence = swap_yes_no(sentence)
        swapped = swapped_sentence is not None and bool(rng.random() < swap_prob)
        if swapped_sentence is not None and swapped:
            sentence = swapped_sentence
        candidates = word_boundary_cuts(sentence)
        if swapped:
            # keep >= 1 word; a one-word "No." is kept whole and needs no generation.
            candidates = [c for c in candidates if c > 0] or [len(sentence)]
        cut = int(candidates[rng.integers(len(candidates))])
        prefix = sentence[:cut]
        if cut == len(sentence):
            request_of.append(None)
        else:
            context = reference[:start] + prefix if prefix else reference[:start].rstrip()
            request_of.append(len(requests))
            requests.append(ContinuationRequest(visible, context, stop_at_full_stop=True))
        prefixes.append(prefix)
        cuts.append(cut)
        swaps.append(swapped)
    return ContinuationPlan(requests, request_of, prefixes, tuple(cuts), tuple(swaps))


def assemble_rejected(
    reference: str, spans: Sequence[tuple[int, int]], pieces: Sequence[str]
) -> str:
    """Join y-_k (stripped) with the whitespace that separated the reference's sentences."""
    out = []
    for k, piece in enumerate(pieces):
        if k > 0:
            out.append(reference[spans[k - 1][1] : spans[k][0]] or " ")
        out.append(piece.strip())
    return "".join(out)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two 1-D vectors (0.0 when one is all zeros)."""
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(np.dot(a, b) / denom) if denom > 0 else 0.0


def bdhs_sample(
    reference: str,
    generate_fn: GenerateFn,
    embed_fn: EmbedFn,
    rng: np.random.Generator,
    settings: BDHSConfig,
    *,
    num_image_positions: int,
    splitter: Splitter = split_sentences_regex,
) -> BDHSResult:
    """Produce a rejected response y- for one (image, prompt, y+) sample.

    Args:
        reference: y+, the ground-truth answer.
        generate_fn: continues a batch of requests under the (masked) image; returns the
            new text of each, truncated at the first full stop when asked.
        embed_fn: list of n texts -> float array [n, d].
        rng: drives masks, swaps and cuts (seed it from settings.seed for a run).
        num_image_positions: image-feature positions the model produces (e.g. 576).
        splitter: text -> sentences (substrings of text, in order).
    """
    spans = sentence_spans(reference, splitter)
    ref_emb = np.asarray(embed_fn([reference]))[0]
    sims: list[float] = []
    for i in range(1, settings.n_bdhs + 1):
        visible = sample_visibility_mask(num_image_positions, settings.rho_th, rng)
        density = float(visible.mean()) if num_image_positions else 0.0
        if settings.n_bdhs > 1 and i == settings.n_bdhs:
            request = ContinuationRequest(visible, "", stop_at_full_stop=False)
            rejected = generate_fn([request])[0].strip()
            sims.append(cosine(np.asarray(embed_fn([rejected]))[0], ref_emb))
            return BDHSResult(rejected, sims[-1], i, True, True, (), (), density, tuple(sims))
        plan = plan_continuations(reference, spans, visible, rng, settings.swap_prob)
        continuations = generate_fn(plan.requests) if plan.requests else []
        rejected = assemble_rejected(reference, spans, plan.pieces(continuations))
        sims.append(cosine(np.asarray(embed_fn([rejected]))[0], ref_emb))
        accepted = sims[-1] < settings.eps_s
        if accepted or i == settings.n_bdhs:
            return BDHSResult(
                rejected,
                sims[-1],
                i,
                False,
                accepted,
                plan.cut_points,
                plan.swapped,
                density,
                tuple(sims),
            )
    raise AssertionError("unreachable: the loop returns on its last try")


# A request of one row of a batch: (row index into the batch, request).
RowRequest = tuple[int, ContinuationRequest]
BatchGenerateFn = Callable[[Sequence[RowRequest]], list[str]]


def bdhs_sample_batch(
    references: Sequence[str],
    generate_fn: BatchGenerateFn,
    embed_fn: EmbedFn,
    rngs: Sequence[np.random.Generator],
    settings: BDHSConfig,
    *,
    num_image_positions: int | Sequence[int],
    splitter: Splitter = split_sentences_regex,
) -> list[BDHSResult]:
    """bdhs_sample for n rows stepping together: one generate_fn and one embed_fn call per try.

    At try i every row still open (not yet accepted) draws its mask and plan from its own
    rng, in the same order as bdhs_sample, so row r's result equals
    bdhs_sample(references[r], ..., rngs[r]) whenever generate_fn / embed_fn answer a row
    the same way alone or in a batch (greedy decoding). Rows leave the batch as soon as
    they are accepted; the rest retry. All requests of one call are guided (stop at ".")
    or, on the final try, all unguided, never mixed.

    Args:
        references: n reference answers y+.
        generate_fn: [(row, request)] -> new text of each request, in order.
        embed_fn: list of texts -> float array [len, d]; called once for the n references,
            then once per try with the open rows' candidates.
        rngs: n generators, one per row.
        num_image_positions: image-feature positions of every row, or one count per row
            (LLaVA-1.6 AnyRes: each image's own tile and newline tokens).
    Returns: n BDHSResult, in the order of references.
    """
    n = len(references)
    if len(rngs) != n:
        raise ValueError(f"bdhs_sample_batch: {len(rngs)} rngs for {n} references")
    n_image = (
        [num_image_positions] * n
        if isinstance(num_image_positions, int)
        else [int(k) for k in num_image_positions]
    )
    if len(n_image) != n:
        raise ValueError(f"bdhs_sample_batch: {len(n_image)} image counts for {n} references")
    if n == 0:
        return []
    spans = [sentence_spans(ref, splitter) for ref in references]
    ref_embs = np.asarray(embed_fn(list(references)))
    sims: list[list[float]] = [[] for _ in range(n)]
    results: list[BDHSResult | None] = [None] * n
    open_rows = list(range(n))
    for i in range(1, settings.n_bdhs + 1):
        visible = {
            r: sample_visibility_mask(n_image[r], settings.rho_th, rngs[r]) for r in open_rows
        }
        unguided = settings.n_bdhs > 1 and i == settings.n_bdhs
        plans: dict[int, ContinuationPlan] = {}
        if unguided:
            outs = generate_fn([(r, ContinuationRequest(visible[r], "", False)) for r in open_rows])
            rejected = {r: o.strip() for r, o in zip(open_rows, outs, strict=True)}
        else:
            plans = {
                r: plan_continuations(
                    references[r], spans[r], visible[r], rngs[r], settings.swap_prob
                )
                for r in open_rows
            }
            rejected = _guided_try(references, spans, plans, generate_fn)
        embs = np.asarray(embed_fn([rejected[r] for r in open_rows]))
        for j, r in enumerate(open_rows):
            sims[r].append(cosine(embs[j], ref_embs[r]))
            accepted = unguided or sims[r][-1] < settings.eps_s
            if accepted or i == settings.n_bdhs:
                density = float(visible[r].mean()) if n_image[r] else 0.0
                results[r] = _result(
                    rejected[r], sims[r], i, unguided, accepted, plans.get(r), density
                )
        open_rows = [r for r in open_rows if results[r] is None]
        if not open_rows:
            break
    return [res for res in results if res is not None]


def _guided_try(
    references: Sequence[str],
    spans: Sequence[list[tuple[int, int]]],
    plans: dict[int, ContinuationPlan],
    generate_fn: BatchGenerateFn,
) -> dict[int, str]:
    """One guided try of the open rows (the keys of `plans`): every planned sentence of
    every row in one generate_fn call, then each row's y- assembled from its pieces."""
    calls = [(r, q) for r, plan in plans.items() for q in plan.requests]
    outs = generate_fn(calls) if calls else []
    if len(outs) != len(calls):
        raise ValueError(f"generate_fn returned {len(outs)} texts for {len(calls)}")
    rejected, pos = {}, 0
    for r, plan in plans.items():
        k = len(plan.requests)
        rejected[r] = assemble_rejected(references[r], spans[r], plan.pieces(outs[pos : pos + k]))
        pos += k
    return rejected


def _result(
    rejected: str,
    sims: list[float],
    tries: int,
    unguided: bool,
    accepted: bool,
    plan: ContinuationPlan | None,
    density: float,
) -> BDHSResult:
    return BDHSResult(
        rejected,
        sims[-1],
        tries,
        unguided,
        accepted,
        plan.cut_points if plan else (),
        plan.swapped if plan else (),
        density,
        tuple(sims),
    )
