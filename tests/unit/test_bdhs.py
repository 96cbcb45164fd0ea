"""BDHS driver logic (ALGORITHMS.md section 2) with scripted generate/embed functions.

The callables below are not model mocks: BDHS is a pure loop over them by design, and the
real engine is tested in test_hf_generation_on_cpu.py.
"""

from collections.abc import Sequence

import numpy as np
import pytest

from mmalign.bdhs import (
    ContinuationRequest,
    assemble_rejected,
    bdhs_sample,
    bdhs_sample_batch,
    plan_continuations,
    sample_visibility_mask,
    sentence_spans,
    split_sentences_regex,
    split_sentences_spacy,
    swap_yes_no,
    word_boundary_cuts,
)
from mmalign.config import BDHSConfig, ConfigError

REFERENCE = "There is a red circle. It is left of a blue square. The background is grey."


class FaithfulGenerator:
    """Continues every prefix with the reference's own text up to the sentence end, so the
    assembled y- equals y+ exactly; records each batch it receives."""

    def __init__(self, reference: str, hallucinate_from_call: int | None = None) -> None:
        self.reference = reference
        self.hallucinate_from_call = hallucinate_from_call
        self.calls: list[list[ContinuationRequest]] = []

    def __call__(self, requests: Sequence[ContinuationRequest]) -> list[str]:
        self.calls.append(list(requests))
        if self.hallucinate_from_call is not None and len(self.calls) >= self.hallucinate_from_call:
            return [" hallucinated dog." for _ in requests]
        out = []
        for r in requests:
            if not r.stop_at_full_stop:
                out.append("An unguided answer.")
                continue
            assert self.reference.startswith(r.response_prefix)
            end = self.reference.index(".", len(r.response_prefix)) + 1
            out.append(self.reference[len(r.response_prefix) : end])
        return out


def toy_embed(texts: list[str]) -> np.ndarray:
    """[3, 4] for texts mentioning 'hallucinated' (cosine 0.6 to the others), else [5, 0]."""
    return np.array([[3.0, 4.0] if "hallucinated" in t else [5.0, 0.0] for t in texts])


def test_mask_exact_values_on_cpu() -> None:
    # default_rng(0).random(6) = [0.637, 0.270, 0.041, 0.017, 0.813, 0.913]
    mask = sample_visibility_mask(6, 0.5, np.random.default_rng(0))
    assert mask.tolist() == [True, False, False, False, True, True]


@pytest.mark.parametrize(("rho_th", "expected"), [(0.99, 0.01), (0.5, 0.5), (0.0, 1.0)])
def test_mask_density_on_cpu(rho_th: float, expected: float) -> None:
    mask = sample_visibility_mask(200_000, rho_th, np.random.default_rng(1))
    # binomial std at n = 2e5 is <= 0.0012; allow ~4 sigma
    assert mask.mean() == pytest.approx(expected, abs=0.005)


def test_rho_one_blocks_everything_on_cpu() -> None:
    assert not sample_visibility_mask(100_000, 1.0, np.random.default_rng(2)).any()


def test_regex_and_spacy_splitters_on_cpu() -> None:
    text = "There is a red circle. It is 2.5 cm wide! Is it big? Yes.\n- one item"
    expected = ["There is a red circle.", "It is 2.5 cm wide!", "Is it big?", "Yes."]
    assert split_sentences_regex(text) == [*expected, "- one item"]
    assert split_sentences_spacy(" ".join(expected)) == expected
    assert sentence_spans("A b.  C d.", split_sentences_regex) == [(0, 4), (6, 10)]
    with pytest.raises(ValueError):
        sentence_spans("A b.", lambda t: ["A  b."])


def test_yes_no_swap_keeps_case_on_cpu() -> None:
    assert swap_yes_no("Yes, there is a cat.") == "No, there is a cat."
    assert swap_yes_no("No.") == "Yes."
    assert swap_yes_no("yes it is") == "no it is"
    assert swap_yes_no("NO, never") == "YES, never"
    assert swap_yes_no("  No") == "  Yes"
    assert swap_yes_no("Yesterday it rained.") is None
    assert swap_yes_no("Nothing is there.") is None
    assert swap_yes_no("I think yes.") is None


def test_swap_probability_on_cpu() -> None:
    ref = "Yes, there is a red circle."
    spans = sentence_spans(ref)
    rng = np.random.default_rng(3)
    n = 4000
    swaps = [plan_continuations(ref, spans, np.ones(4, bool), rng).swapped[0] for _ in range(n)]
    # std of the mean = 0.5 / sqrt(4000) = 0.0079; 4 sigma
    assert np.mean(swaps) == pytest.approx(0.5, abs=0.032)


def test_swapped_prefix_keeps_the_answer_word_on_cpu() -> None:
    ref = "Is it big? Yes, there is a red circle."
    spans = sentence_spans(ref)
    rng = np.random.default_rng(4)
    for _ in range(50):
        plan = plan_continuations(ref, spans, np.ones(4, bool), rng, swap_prob=1.0)
        assert plan.swapped == (False, True)
        assert plan.requests[1].response_prefix.startswith("Is it big? No")
    # a one-word swapped answer is kept whole and needs no generation
    plan = plan_continuations("No.", sentence_spans("No."), np.ones(4, bool), rng, swap_prob=1.0)
    assert plan.requests == [] and plan.pieces([]) == ["Yes."]


def test_cut_points_on_word_boundaries_on_cpu() -> None:
    sentence = "The cat sat on the mat."
    assert word_boundary_cuts(sentence) == [0, 3, 7, 11, 14, 18]
    ref = "A dog. " + sentence
    spans = sentence_spans(ref)
    rng = np.random.default_rng(5)
    seen = []
    for _ in range(1200):
        plan = plan_continuations(ref, spans, np.ones(4, bool), rng)
        cut = plan.cut_points[1]
        seen.append(cut)
        request = plan.requests[1]
        # context = ground truth s_1 + s_2[:cut]; stripped when the prefix is empty
        expected = "A dog. " + sentence[:cut] if cut else "A dog."
        assert request.response_prefix == expected
        assert request.stop_at_full_stop
    counts = np.bincount(seen)[[0, 3, 7, 11, 14, 18]]
    assert set(seen) == {0, 3, 7, 11, 14, 18}
    # uniform over 6 boundaries: 200 each, std 12.9
    assert counts.min() > 150 and counts.max() < 250


def test_assemble_uses_reference_whitespace_on_cpu() -> None:
    ref = "A b.\nC d.  E f."
    spans = sentence_spans(ref)
    assert assemble_rejected(ref, spans, [" X y.", "Z.", "W w. "]) == "X y.\nZ.  W w."


def test_faithful_generation_reproduces_reference_on_cpu() -> None:
    gen = FaithfulGenerator(REFERENCE)
    settings = BDHSConfig(n_bdhs=1, rho_th=0.5)
    res = bdhs_sample(
        REFERENCE, gen, toy_embed, np.random.default_rng(6), settings, num_image_positions=576
    )
    assert res.rejected == REFERENCE
    # one batched call with all three sentences, sharing one mask
    assert len(gen.calls) == 1 and len(gen.calls[0]) == 3
    assert all(r.visible is gen.calls[0][0].visible for r in gen.calls[0])
    assert res.similarity == pytest.approx(1.0)
    assert not res.accepted and not res.final_unguided and res.tries == 1
    assert len(res.cut_points) == 3 and res.swapped == (False, False, False)
    assert res.mask_density == pytest.approx(gen.calls[0][0].visible.mean())


def test_similarity_gate_on_cpu() -> None:
    # try 1 reproduces y+ (cosine 1.0 >= 0.97, rejected); try 2 hallucinates (cosine 0.6)
    gen = FaithfulGenerator(REFERENCE, hallucinate_from_call=2)
    res = bdhs_sample(
        REFERENCE, gen, toy_embed, np.random.default_rng(7), BDHSConfig(), num_image_positions=576
    )
    assert res.tries == 2 and res.accepted and not res.final_unguided
    assert res.similarities == pytest.approx((1.0, 0.6))
    assert "hallucinated dog." in res.rejected
    # masks are resampled each try
    assert not np.array_equal(gen.calls[0][0].visible, gen.calls[1][0].visible)
    # the gate is strict: cosine == eps_s is not accepted
    gen = FaithfulGenerator(REFERENCE, hallucinate_from_call=1)
    strict = BDHSConfig(n_bdhs=1, eps_s=0.6)
    res = bdhs_sample(
        REFERENCE, gen, toy_embed, np.random.default_rng(7), strict, num_image_positions=8
    )
    assert res.similarity == pytest.approx(0.6) and not res.accepted


def test_final_try_is_unguided_and_accepted_on_cpu() -> None:
    gen = FaithfulGenerator(REFERENCE)  # never passes the gate
    settings = BDHSConfig(n_bdhs=3, rho_th=1.0)
    res = bdhs_sample(
        REFERENCE, gen, toy_embed, np.random.default_rng(8), settings, num_image_positions=576
    )
    assert res.tries == 3 and res.final_unguided and res.accepted
    assert res.rejected == "An unguided answer."
    assert res.similarities == pytest.approx((1.0, 1.0, 1.0))  # accepted despite 1.0
    assert res.cut_points == () and res.mask_density == 0.0
    last = gen.calls[-1]
    assert len(last) == 1 and last[0].response_prefix == "" and not last[0].stop_at_full_stop
    assert not last[0].visible.any()


def test_settings_validation_on_cpu() -> None:
    with pytest.raises(ConfigError, match=r"bdhs\.rho_th"):
        BDHSConfig(rho_th=1.5).validate("bdhs")
    with pytest.raises(ConfigError, match=r"bdhs\.mask_mode"):
        BDHSConfig(mask_mode="hide").validate("bdhs")
    with pytest.raises(ConfigError, match=r"bdhs\.n_bdhs"):
        BDHSConfig(n_bdhs=0).validate("bdhs")
    with pytest.raises(ConfigError, match=r"bdhs\.swap_prob"):
        BDHSConfig(swap_prob=1.5).validate("bdhs")


class RowScriptGenerator:
    """Batched generate_fn: row r continues faithfully (y- == y+) until its try number
    reaches hallucinate_at[r] (None = never); records every call's (row, request) list."""

    def __init__(self, references: list[str], hallucinate_at: list[int | None]) -> None:
        self.rows = [FaithfulGenerator(ref) for ref in references]
        self.hallucinate_at = hallucinate_at
        self.calls: list[list[tuple[int, ContinuationRequest]]] = []

    def __call__(self, requests: Sequence[tuple[int, ContinuationRequest]]) -> list[str]:
        self.calls.append(list(requests))
        try_no = len(self.calls)
        out = []
        for r, req in requests:
            at = self.hallucinate_at[r]
            if req.stop_at_full_stop and at is not None and try_no >= at:
                out.append(" hallucinated dog.")
            else:
                out.extend(self.rows[r]([req]))
        return out


def test_batched_rows_finish_at_different_tries_on_cpu() -> None:
    refs = [REFERENCE, "Yes. The square is blue.", "A grey sky."]
    gen = RowScriptGenerator(refs, hallucinate_at=[1, 3, None])
    embed_calls: list[list[str]] = []

    def embed(texts: list[str]) -> np.ndarray:
        embed_calls.append(list(texts))
        return toy_embed(texts)

    settings = BDHSConfig(n_bdhs=4, rho_th=0.5, swap_prob=0.0)
    rngs = [np.random.default_rng(s) for s in (1, 2, 3)]
    res = bdhs_sample_batch(refs, gen, embed, rngs, settings, num_image_positions=16)
    # row 0 accepted at try 1, row 1 at try 3, row 2 exhausts guided tries -> unguided try 4
    assert [r.tries for r in res] == [1, 3, 4]
    assert [r.accepted for r in res] == [True, True, True]
    assert [r.final_unguided for r in res] == [False, False, True]
    assert res[1].similarities == pytest.approx((1.0, 1.0, 0.6))
    assert res[2].rejected == "An unguided answer." and res[2].cut_points == ()
    # one generate call per try, holding only the rows still open
    assert [sorted({r for r, _ in c}) for c in gen.calls] == [[0, 1, 2], [1, 2], [1, 2], [2]]
    # the first try batches every sentence of every row: 3 + 2 + 1 requests
    assert len(gen.calls[0]) == 6
    assert not gen.calls[3][0][1].stop_at_full_stop
    # one embed call for the references, then one per try with the open rows' candidates
    assert [len(c) for c in embed_calls] == [3, 3, 2, 2, 1]


def test_batched_row_exhausting_tries_without_final_unguided_on_cpu() -> None:
    # n_bdhs == 1: no unguided try; a row failing the gate is returned not accepted
    refs = [REFERENCE, "A grey sky."]
    gen = RowScriptGenerator(refs, hallucinate_at=[None, 1])
    settings = BDHSConfig(n_bdhs=1, rho_th=0.5)
    rngs = [np.random.default_rng(s) for s in (4, 5)]
    res = bdhs_sample_batch(refs, gen, toy_embed, rngs, settings, num_image_positions=8)
    assert [r.accepted for r in res] == [False, True]
    assert res[0].rejected == REFERENCE and res[0].tries == 1
    assert len(gen.calls) == 1


def test_batched_equals_per_row_reference_on_cpu() -> None:
    # same rngs -> same masks, cuts, swaps and results as bdhs_sample row by row
    refs = [REFERENCE, "No. There is no circle.", "Yes, a square."]
    settings = BDHSConfig(n_bdhs=3, rho_th=0.7)
    hall = [2, None, 1]
    batched = bdhs_sample_batch(
        refs,
        RowScriptGenerator(refs, hall),
        toy_embed,
        [np.random.default_rng(10 + r) for r in range(3)],
        settings,
        num_image_positions=32,
    )
    for r, ref in enumerate(refs):
        single = RowScriptGenerator([ref], [hall[r]])
        alone = bdhs_sample(
            ref,
            lambda reqs, g=single: g([(0, q) for q in reqs]),
            toy_embed,
            np.random.default_rng(10 + r),
            settings,
            num_image_positions=32,
        )
        assert batched[r] == alone or (
            batched[r].rejected == alone.rejected
            and batched[r].cut_points == alone.cut_points
            and batched[r].similarities == pytest.approx(alone.similarities)
        )


@pytest.mark.parametrize(
    ("text", "cut"),
    [
        ("A red circle. A blue square.", "A red circle."),
        ("It is 2.5 cm wide. Next", "It is 2.5 cm wide."),
        (
            "Shapes, e.g. circles and i.e. round ones. Then",
            "Shapes, e.g. circles and i.e. round ones.",
        ),
        ("Dr. Who draws a square.\nMore", "Dr. Who draws a square."),
        ("A red circle.", None),  # the next token decides: a "." at the end is not yet a stop
        ("It is 2.", None),
        ("no full stop here", None),
        ("Is it red? Yes.", None),  # "?" is not a stop here
    ],
)
def test_cut_at_sentence_end(text: str, cut: str | None) -> None:
    from mmalign.bdhs import cut_at_sentence_end

    assert cut_at_sentence_end(text, (".",)) == cut


def test_cut_at_sentence_end_earliest_of_several_stops() -> None:
    from mmalign.bdhs import cut_at_sentence_end

    assert cut_at_sentence_end("Is it red? Yes. It is.", (".", "?")) == "Is it red?"
    assert cut_at_sentence_end("Yes. Is it? No", ("?", ".")) == "Yes."
    assert cut_at_sentence_end("anything at all", ()) is None
