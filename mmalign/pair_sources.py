"""One pair source per online-loop mode: which examples a step samples, the sampler call of
a shard, and the learner rows made from the samplers' outputs (`pipelines/online_dpo.py`).

    examples(step)          -> the rows the samplers get this step (stubs holding RowRefs,
                               or offline learner rows in mode online-bdhs)
    shard_args(shard, step) -> arguments of the sampler call `method` for one shard, fixed
                               per (shard, step) so a retry on a replacement repeats it
    pairs(done, step)       -> (learner rows, counts) from [(rows, version, outputs)]
    describe(counts)        -> the mode's part of the printed step line
    rates(counts)           -> the mode's per-step metrics

No Ray here: the judge arrives as a function (refs, [[a, b], ...]) -> verdicts, and every
random choice comes from mmalign.online's (seed, step) functions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, cast

from mmalign import online
from mmalign.rows import LearnerRow, PromptStub

Row = dict[str, Any]
Done = Sequence[tuple[Sequence[Row], int, Sequence[Any]]]
Judge = Callable[[list[Any], list[list[str]]], list[dict[str, Any]]]


class Prompts(Protocol):
    """The driver's view of the prompt set (operators.prompt_source.PromptSource)."""

    ids: list[str]

    def __len__(self) -> int: ...

    def refs(self, positions: Sequence[int]) -> list[Any]: ...


class OnlineSource:
    """Mode online: `batch_size` prompts a step, k samples each; the judge compares them in
    disjoint pairs (`online.candidate_pairs`, both orders) and the first kept pair trains."""

    method = "sample_refs"

    def __init__(self, prompts: Prompts, judge: Judge, batch_size: int, seed: int) -> None:
        self.prompts, self.judge, self.batch_size, self.seed = prompts, judge, batch_size, seed

    def indices(self, step: int) -> list[int]:
        return online.batch_indices(len(self.prompts), self.batch_size, step, self.seed)

    def examples(self, step: int) -> list[Row]:
        """Stubs: id + a RowRef as the image; the actors resolve the row (prompt, image)."""
        idx = self.indices(step)
        refs = self.prompts.refs(idx)
        return [
            {"id": self.prompts.ids[i], "prompt": "", "images": [ref]}
            for i, ref in zip(idx, refs, strict=True)
        ]

    def shard_args(self, shard: Sequence[Row], step: int) -> tuple:
        return [r["images"][0] for r in shard], self.seed + step  # RowRefs, resolved remotely

    def pairs(self, done: Done, step: int) -> tuple[list[Row], dict[str, int]]:
        """Judged pairs; they carry the stubs' RowRefs, resolved by the learner."""
        judged = [(r, resp, v) for shard, v, samples in done for r, resp in zip(shard, samples)]
        cands = [online.candidate_pairs(len(resp)) for _, resp, _ in judged]
        # rows are stubs holding RowRefs: the judge reads image/prompt/objects itself
        refs = [r["images"][0] for (r, _, _), c in zip(judged, cands) for _ in c]
        both = [[resp[i], resp[j]] for (_, resp, _), c in zip(judged, cands) for i, j in c]
        verdicts = self.judge(refs, both)
        it = iter(verdicts)
        kept = [
            online.first_kept_pair(
                cast(PromptStub, r), resp, [next(it) for _ in c], step=step, version=v
            )
            for (r, resp, v), c in zip(judged, cands)
        ]
        counts = {
            "samples": sum(len(resp) for _, resp, _ in judged),
            "judged": len(verdicts),
            "kept": sum(bool(v.get("kept")) for v in verdicts),
            "ties": sum(v.get("reason") == "tie" for v in verdicts),
        }
        return [cast(Row, p) for p in kept if p is not None], counts

    def describe(self, counts: dict[str, int]) -> str:
        return f"kept {counts['kept']}/{counts['judged']} "

    def rates(self, counts: dict[str, int]) -> dict[str, float]:
        judged = max(1, counts.get("judged", 0))
        return {
            "judge_agreement": counts["kept"] / judged,
            "judge_tie_rate": counts["ties"] / judged,
        }


class MixedSource(OnlineSource):
    """Mode mixed ([ALIGN] Eq. 4): each slot of the step's batch is, with probability
    `p_offline`, an offline pair from the dataset (not sampled at all), else online."""

    def __init__(
        self,
        prompts: Prompts,
        judge: Judge,
        batch_size: int,
        seed: int,
        offline: Sequence[Row],
        p_offline: float,
    ) -> None:
        super().__init__(prompts, judge, batch_size, seed)
        self.offline, self.p_offline = offline, p_offline

    def indices(self, step: int) -> list[int]:
        idx = super().indices(step)
        offline_slot = online.mixed_choices(len(idx), self.p_offline, self.seed, step)
        return [i for i, off in zip(idx, offline_slot) if not off]

    def pairs(self, done: Done, step: int) -> tuple[list[Row], dict[str, int]]:
        pairs, counts = super().pairs(done, step)
        n_off = self.batch_size - sum(len(shard) for shard, _, _ in done)
        picks = online.batch_indices(len(self.offline), self.batch_size, step, self.seed + 1)
        return pairs + [self.offline[i] for i in picks[:n_off]], counts


class BDHSSource:
    """Mode online-bdhs: the step's examples are offline pairs whose chosen stays; the
    samplers regenerate a BDHS rejected answer with the current weights, trained with the
    dataset's rejected (two-rejected loss, no judge)."""

    method = "bdhs"

    def __init__(self, offline: Sequence[Row], batch_size: int, seed: int, bdhs_seed: int) -> None:
        self.offline, self.batch_size, self.seed, self.bdhs_seed = (
            offline,
            batch_size,
            seed,
            bdhs_seed,
        )

    def examples(self, step: int) -> list[Row]:
        picks = online.batch_indices(len(self.offline), self.batch_size, step, self.seed)
        return [self.offline[i] for i in picks]

    def shard_args(self, shard: Sequence[Row], step: int) -> tuple:
        seeds = [online.bdhs_row_seed(self.bdhs_seed, step, str(r["id"])) for r in shard]
        prompts, images = [r["prompt"] for r in shard], [r["image"] for r in shard]
        return prompts, images, [r["chosen"] for r in shard], seeds

    def pairs(self, done: Done, step: int) -> tuple[list[Row], dict[str, int]]:
        """Dataset chosen + dataset rejected + the policy's fresh BDHS y- per row."""
        pairs, failed = [], 0
        for shard, version, results in done:
            for row, res in zip(shard, results, strict=True):
                pair = online.bdhs_pair(cast(LearnerRow, row), res, step=step, version=version)
                failed += pair is None
                pairs += [cast(Row, pair)] if pair is not None else []
        return pairs, {"samples": sum(len(shard) for shard, _, _ in done), "bdhs_failed": failed}

    def describe(self, counts: dict[str, int]) -> str:
        return f"bdhs failed {counts['bdhs_failed']} "

    def rates(self, counts: dict[str, int]) -> dict[str, float]:
        return {}


Scorer = Callable[[list[Any], list[str]], list[float]]


class RLOOSource(OnlineSource):
    """Modes rloo and ppo ([ALIGN] App. A): `batch_size` prompts a step, k samples each (temperature
    `sampler.temperature`); the reward role scores every sample alone (`judge.kind`
    objects or reward-model) and each prompt becomes one RLOO row {samples, rewards}.

    Rewards are normalised with statistics computed once, on the first step of the run
    (the initial policy's samples, before any update), and kept: `state()` goes into the
    checkpoints' loop state and `load_state` gives a resumed run the same statistics."""

    def __init__(
        self, prompts: Prompts, score: Scorer, batch_size: int, seed: int, algo: str = "rloo"
    ) -> None:
        super().__init__(prompts, lambda refs, both: [], batch_size, seed)
        self.score, self.algo = score, algo  # algo: "rloo" or "ppo", the learner's update
        self.stats: tuple[float, float] | None = None

    def pairs(self, done: Done, step: int) -> tuple[list[Row], dict[str, Any]]:
        import torch

        from mmalign import rl

        sampled = [(r, resp, v) for shard, v, samples in done for r, resp in zip(shard, samples)]
        refs = [r["images"][0] for r, resp, _ in sampled for _ in resp]
        raw = self.score(refs, [text for _, resp, _ in sampled for text in resp])
        if self.stats is None and len(raw) >= 2:
            mean, std = rl.reward_stats(torch.tensor(raw, dtype=torch.float64))
            self.stats = (mean, std if std > 0 else 1.0)  # equal rewards: scale 1
        mean, std = self.stats or (0.0, 1.0)
        rows, it = [], iter(raw)
        for row, resp, version in sampled:
            scores = [next(it) for _ in resp]
            rows.append(
                {
                    "id": row["id"],
                    "image": row["images"][0],  # a RowRef: the learner resolves it
                    "prompt": "",
                    "samples": list(resp),
                    "rewards": [(x - mean) / std for x in scores],
                    "raw_rewards": scores,
                    "source": "online",
                    "version": version,
                    "algo": self.algo,
                }
            )
        counts = {
            "samples": len(raw),
            "judged": len(raw),
            "kept": 0,
            "ties": 0,
            "reward_sum": float(sum(raw)),
        }
        return rows, counts

    def state(self) -> dict[str, Any]:
        return {"reward_stats": list(self.stats)} if self.stats is not None else {}

    def load_state(self, state: dict[str, Any]) -> None:
        if state.get("reward_stats"):
            mean, std = state["reward_stats"]
            self.stats = (float(mean), float(std))

    def describe(self, counts: dict[str, Any]) -> str:
        return f"reward {counts['reward_sum'] / max(1, counts['samples']):.3f} "

    def rates(self, counts: dict[str, Any]) -> dict[str, float]:
        return {"reward_raw_mean": counts["reward_sum"] / max(1, counts["samples"])}


PairSource = OnlineSource | BDHSSource
