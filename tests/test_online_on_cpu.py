"""Pure pieces of the online loop: deterministic data order, Mixed-DPO draws, pair building."""

from __future__ import annotations

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
