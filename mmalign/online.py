"""Pure pieces of the Online-/Mixed-DPO loop (ALGORITHMS.md sections 1 and 4).

Everything random here is a function of (seed, step), not of a stateful RNG: a run resumed
from the checkpoint of step t draws exactly the prompts and offline/online choices the
uninterrupted run drew, with no RNG state to save.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

from mmalign import seeds
from mmalign.rows import LearnerRow, OnlinePair, PromptRow, PromptStub


def _rng(*key: int) -> random.Random:
    return random.Random(hash(tuple(key)) & 0xFFFFFFFF)


def batch_indices(n_records: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Record indices of `step`: epochs walk a permutation seeded by (seed, epoch)."""
    if n_records < 1:
        raise ValueError("no prompt records to sample from")
    out = []
    for flat in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(flat, n_records)
        order = list(range(n_records))
        _rng(seed, epoch).shuffle(order)
        out.append(order[pos])
    return out


def mixed_choices(n: int, p_offline: float, seed: int, step: int) -> list[bool]:
    """Mixed-DPO ([ALIGN] Eq. 4): True = this example is an offline pair (prob p)."""
    rng = _rng(seed, step, 7919)
    return [rng.random() < p_offline for _ in range(n)]


def pair_id(record_id: str, step: int, version: int) -> str:
    """Identity of an online pair: which prompt, which loop step, which weight version."""
    return f"{record_id}@s{step}v{version}"


def online_pair(
    record: PromptRow | PromptStub,
    responses: Sequence[str],
    verdict: Mapping[str, Any],
    *,
    step: int,
    version: int,
) -> OnlinePair | None:
    """A learner row from two judged samples, or None when the judge did not keep the pair.

    `record` is a prompt row, or the driver's stub of one (its image a RowRef, its prompt
    "": the learner resolves both, `mmalign.rows.resolve_pairs`), `responses` the two policy
    samples (a, b), `verdict` a JudgeEngine verdict dict. Identical samples never form a
    pair (their DPO gradient is zero by construction).
    """
    a, b = responses[0], responses[1]
    if not verdict.get("kept") or verdict.get("winner") not in ("a", "b") or a == b:
        return None
    chosen, rejected = (a, b) if verdict["winner"] == "a" else (b, a)
    if not chosen.strip() or not rejected.strip():
        return None
    return {
        "id": pair_id(str(record["id"]), step, version),
        "image": record["images"][0],
        "prompt": record["prompt"],
        "chosen": chosen,
        "rejected": rejected,
        "source": "online",
        "version": version,
        "step": step,
    }


def candidate_pairs(k: int) -> list[tuple[int, int]]:
    """The sample pairs the judge compares for one prompt with k samples, in order: the
    disjoint neighbours (0, 1), (2, 3), ... (an odd last sample is left out)."""
    return [(i, i + 1) for i in range(0, k - 1, 2)]


def first_kept_pair(
    record: PromptRow | PromptStub,
    responses: Sequence[str],
    verdicts: Sequence[Mapping[str, Any]],
    *,
    step: int,
    version: int,
) -> OnlinePair | None:
    """The learner row of the first candidate pair (`candidate_pairs` order, one verdict
    each) that the judge kept, or None: k > 2 samples give a prompt more chances to yield a
    pair when its first two samples tie, and never more than one pair per prompt and step."""
    pairs = candidate_pairs(len(responses))
    if len(verdicts) != len(pairs):
        raise ValueError(f"{len(verdicts)} verdicts for {len(pairs)} candidate pairs")
    for (i, j), verdict in zip(pairs, verdicts, strict=True):
        row = online_pair(record, [responses[i], responses[j]], verdict, step=step, version=version)
        if row is not None:
            return row
    return None


def bdhs_row_seed(seed: int, step: int, row_id: str) -> int:
    """Stable 63-bit seed of one BDHS row at one loop step (independent of sharding and
    retries), so a resumed run or a replacement sampler redraws the same masks and cuts."""
    return seeds.step_row_seed(seed, step, row_id)


def bdhs_pair(
    row: LearnerRow, result: Mapping[str, Any], *, step: int, version: int
) -> OnlinePair | None:
    """Online-BDHS learner row ([ALIGN] Sec. 3.4 + Eq. 5), or None when BDHS failed.

    `row` is an offline learner row (chosen, rejected from the dataset), `result` an
    OnlineBDHSResult dict (rejected, similarity, tries, error) produced by the policy at
    weight `version`. The dataset's rejected stays first (weight gamma in the two-rejected
    loss), the fresh BDHS y- goes to rejected_extra (weight 1 - gamma); a dataset
    rejected_extra is replaced, since the loss takes exactly two rejected answers.
    """
    y_bdhs = str(result.get("rejected") or "").strip()
    if result.get("error") or not y_bdhs or y_bdhs == row["chosen"].strip():
        return None
    return {
        "id": pair_id(str(row["id"]), step, version),
        "image": row["image"],
        "prompt": row["prompt"],
        "chosen": row["chosen"],
        "rejected": row["rejected"],
        "rejected_extra": [y_bdhs],
        "source": "online-bdhs",
        "version": version,
        "step": step,
        "bdhs_similarity": float(result.get("similarity", 0.0)),
        "bdhs_tries": int(result.get("tries", 0)),
    }


def staleness(sample_version: int, learner_version: int) -> int:
    """Off-policy lag of a sample, in weight versions."""
    return learner_version - sample_version


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def tie_rate(totals: Mapping[str, int]) -> float:
    """Share of judged comparisons that tied (0.0 when nothing was judged)."""
    judged = int(totals.get("judged", 0))
    return int(totals.get("ties", 0)) / judged if judged else 0.0


def tie_hint(totals: Mapping[str, int], threshold: float = 0.5) -> str:
    """A line for the user when most comparisons tied ("" otherwise): a tie trains nothing,
    so a run that mostly ties learns little however long it runs."""
    rate = tie_rate(totals)
    if rate <= threshold:
        return ""
    return (
        f"{100 * rate:.0f}% of {totals.get('judged', 0)} comparisons tied, and a tie trains "
        "nothing: the judge could not tell the samples apart. Try more diverse samples "
        "(raise sampler.temperature or sampler.samples_per_prompt) or a stronger judge "
        "(judge.model)."
    )
