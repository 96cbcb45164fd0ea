"""The online loop's pair sources (mmalign/pair_sources.py) on plain rows, no Ray."""

from __future__ import annotations

from dataclasses import dataclass, field

from mmalign import online
from mmalign.pair_sources import BDHSSource, MixedSource, OnlineSource


@dataclass
class FakePrompts:
    """PromptSource's driver view: ids and one ref per position (a string here)."""

    ids: list[str] = field(default_factory=lambda: [f"p{i}" for i in range(5)])

    def __len__(self) -> int:
        return len(self.ids)

    def refs(self, positions):
        return [f"ref{i}" for i in positions]


def _judge(calls: list):
    """Keeps a comparison when its two answers differ ('a' wins), ties otherwise."""

    def judge(refs, both):
        calls.append((list(refs), [list(b) for b in both]))
        return [
            {"kept": a != b, "winner": "a" if a != b else None, "reason": "" if a != b else "tie"}
            for a, b in both
        ]

    return judge


def test_online_source_samples_the_step_and_keeps_the_first_judged_pair() -> None:
    calls: list = []
    src = OnlineSource(FakePrompts(), _judge(calls), batch_size=2, seed=3)
    idx = online.batch_indices(5, 2, 4, 3)
    rows = src.examples(4)
    assert rows == [{"id": f"p{i}", "prompt": "", "images": [f"ref{i}"]} for i in idx]
    assert src.method == "sample_refs" and src.shard_args(rows[:1], 4) == ([f"ref{idx[0]}"], 7)
    # row 0: (x, x) ties, (y, z) kept -> pair y > z; row 1: its only pair ties
    done = [(rows[:1], 1, [["x", "x", "y", "z"]]), (rows[1:], 0, [["w", "w"]])]
    pairs, counts = src.pairs(done, step=4)
    assert calls == [
        ([f"ref{idx[0]}"] * 2 + [f"ref{idx[1]}"], [["x", "x"], ["y", "z"], ["w", "w"]])
    ]
    assert [(p["chosen"], p["rejected"], p["version"]) for p in pairs] == [("y", "z", 1)]
    assert (
        pairs[0]["id"] == online.pair_id(f"p{idx[0]}", 4, 1)
        and pairs[0]["image"] == rows[0]["images"][0]
    )
    assert counts == {"samples": 6, "judged": 3, "kept": 1, "ties": 2}
    assert src.describe(counts) == "kept 1/3 "
    assert src.rates(counts) == {"judge_agreement": 1 / 3, "judge_tie_rate": 2 / 3}


def test_mixed_source_leaves_offline_slots_unsampled_and_fills_them() -> None:
    offline = [{"id": f"o{i}", "source": "offline", "version": -1} for i in range(3)]
    src = MixedSource(
        FakePrompts(), _judge([]), batch_size=4, seed=0, offline=offline, p_offline=0.5
    )
    step = next(s for s in range(50) if 0 < sum(online.mixed_choices(4, 0.5, 0, s)) < 4)
    slots = online.mixed_choices(4, 0.5, 0, step)
    idx = online.batch_indices(5, 4, step, 0)
    rows = src.examples(step)
    assert [r["id"] for r in rows] == [f"p{i}" for i, off in zip(idx, slots) if not off]
    done = [(rows, 0, [["a", "b"] for _ in rows])]
    pairs, counts = src.pairs(done, step)
    n_off = sum(slots)
    picks = online.batch_indices(3, 4, step, 1)[:n_off]
    assert [p["id"] for p in pairs[len(rows) :]] == [f"o{i}" for i in picks]
    assert len(pairs) == 4 and counts["judged"] == len(rows)


def test_bdhs_source_asks_the_fresh_rejected_and_counts_failures() -> None:
    offline = [
        {"id": f"o{i}", "prompt": f"q{i}", "image": b"png", "chosen": "c", "rejected": "r"}
        for i in range(4)
    ]
    src = BDHSSource(offline, batch_size=2, seed=1, bdhs_seed=9)
    rows = src.examples(3)
    assert rows == [offline[i] for i in online.batch_indices(4, 2, 3, 1)]
    prompts, images, refs, seeds = src.shard_args(rows, 3)
    assert (
        prompts == [r["prompt"] for r in rows] and images == [b"png", b"png"] and refs == ["c", "c"]
    )
    assert seeds == [online.bdhs_row_seed(9, 3, r["id"]) for r in rows]
    results = [{"rejected": "bad", "similarity": 0.5, "tries": 1}, {"rejected": "", "error": "x"}]
    pairs, counts = src.pairs([(rows, 2, results)], step=3)
    assert [p["rejected_extra"] for p in pairs] == [["bad"]] and pairs[0]["version"] == 2
    assert counts == {"samples": 2, "bdhs_failed": 1}
    assert (
        src.method == "bdhs"
        and src.describe(counts) == "bdhs failed 1 "
        and src.rates(counts) == {}
    )
