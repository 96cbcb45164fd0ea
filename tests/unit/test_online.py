"""Pure pieces of the online loop: deterministic data order, Mixed-DPO draws, pair building."""

from __future__ import annotations

import pytest

from mmalign import online


def test_batch_indices_cover_each_epoch_once_and_are_deterministic() -> None:
    n, bs = 10, 4
    steps = [online.batch_indices(n, bs, s, seed=3) for s in range(5)]  # 20 draws = 2 epochs
    flat = [i for step in steps for i in step]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]  # a new permutation per epoch
    assert steps == [online.batch_indices(n, bs, s, seed=3) for s in range(5)]  # resumable
    assert online.batch_indices(n, bs, 0, seed=4) != steps[0]


def test_mixed_choices_follow_p() -> None:
    draws = [c for s in range(400) for c in online.mixed_choices(16, 0.5, seed=0, step=s)]
    assert abs(sum(draws) / len(draws) - 0.5) < 0.03
    assert not any(online.mixed_choices(16, 0.0, 0, 1)) and all(online.mixed_choices(16, 1.0, 0, 1))


def test_online_pair_orders_by_verdict_and_drops_unusable() -> None:
    rec = {"id": "x1", "prompt": "Describe.", "images": [{"bytes": b"png", "path": None}]}
    win_b = {"kept": True, "winner": "b"}
    pair = online.online_pair(rec, ["A blue square.", "A red circle."], win_b, step=3, version=2)
    assert pair is not None
    assert (pair["chosen"], pair["rejected"]) == ("A red circle.", "A blue square.")
    assert pair["id"] == "x1@s3v2" and pair["version"] == 2 and pair["image"]["bytes"] == b"png"
    assert (
        online.online_pair(rec, ["a.", "b."], {"kept": False, "winner": None}, step=0, version=0)
        is None
    )
    assert online.online_pair(rec, ["same.", "same."], win_b, step=0, version=0) is None
    assert online.staleness(2, 3) == 1


def test_k_samples_give_the_first_kept_disjoint_pair() -> None:
    assert online.candidate_pairs(2) == [(0, 1)]
    assert online.candidate_pairs(5) == [(0, 1), (2, 3)]  # the odd last sample sits out
    assert online.candidate_pairs(1) == []
    rec = {"id": "x1", "prompt": "Describe.", "images": [{"bytes": b"png", "path": None}]}
    samples = ["A.", "A.", "B circle.", "C square."]
    tie = {"kept": False, "winner": None, "reason": "tie"}
    pair = online.first_kept_pair(
        rec, samples, [tie, {"kept": True, "winner": "b"}], step=1, version=0
    )
    assert pair is not None and (pair["chosen"], pair["rejected"]) == ("C square.", "B circle.")
    # the first kept pair wins: one pair per prompt and step (the id stays unique)
    first = online.first_kept_pair(
        rec, ["x.", "y.", "z.", "w."], [{"kept": True, "winner": "a"}] * 2, step=1, version=0
    )
    assert first is not None and (first["chosen"], first["rejected"]) == ("x.", "y.")
    assert online.first_kept_pair(rec, samples, [tie, tie], step=1, version=0) is None
    with pytest.raises(ValueError, match="2 candidate pairs"):
        online.first_kept_pair(rec, samples, [tie], step=1, version=0)


def test_bdhs_pair_keeps_dataset_rejected_first_and_drops_failures() -> None:
    row = {
        "id": "off3",
        "image": b"png",
        "prompt": "Describe.",
        "chosen": "A red circle.",
        "rejected": "A blue square.",
        "rejected_extra": ["old extra"],
    }
    ok = {"rejected": " A green cross. ", "similarity": 0.8, "tries": 2, "error": ""}
    pair = online.bdhs_pair(row, ok, step=4, version=3)
    assert pair is not None
    assert (pair["chosen"], pair["rejected"]) == ("A red circle.", "A blue square.")
    assert pair["rejected_extra"] == ["A green cross."]  # BDHS y- replaces the old extra
    assert (pair["id"], pair["version"], pair["source"]) == ("off3@s4v3", 3, "online-bdhs")
    assert online.bdhs_pair(row, {**ok, "error": "bdhs: gate"}, step=4, version=3) is None
    assert online.bdhs_pair(row, {**ok, "rejected": "A red circle."}, step=0, version=0) is None
    seeds = {online.bdhs_row_seed(0, s, "off3") for s in range(3)}
    assert len(seeds) == 3 and online.bdhs_row_seed(0, 1, "off3") == online.bdhs_row_seed(
        0, 1, "off3"
    )


def test_busy_fractions_per_role() -> None:
    from actors.metrics import busy_fractions

    before = {"sampler": [1.0, 2.0], "learner": [0.5]}
    after = {"sampler": [6.0, 4.0], "learner": [8.5], "judge": [3.0]}
    got = busy_fractions(before, after, wall_s=10.0)
    assert got == {"sampler": 7.0 / 20.0, "learner": 0.8, "judge": 0.3}
    # a replaced actor restarts at 0: its slot counts the replacement's own work
    assert busy_fractions({"sampler": [5.0]}, {"sampler": [1.0]}, 10.0) == {"sampler": 0.1}


def test_tie_rate_and_hint_only_when_most_comparisons_tie() -> None:
    assert online.tie_rate({"judged": 0, "ties": 0}) == 0.0
    assert online.tie_rate({"judged": 8, "ties": 2}) == 0.25
    assert online.tie_hint({"judged": 8, "ties": 4}) == ""  # half is not "most"
    hint = online.tie_hint({"judged": 8, "ties": 7})
    assert hint.startswith("88% of 8 comparisons tied") and "sampler.temperature" in hint
