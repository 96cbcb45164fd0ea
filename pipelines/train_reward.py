"""Train a reward model on preference pairs (the RLHF baselines' reward, [ALIGN] Sec. 5.5).

    .venv/bin/python pipelines/train_reward.py --data.offline_pairs runs/shapes-cpu/bdhs \
        --storage.output_dir runs/reward --learner.steps 80 --learner.lr 1e-3 --learner.lora_r 8

The base is `sampler.model` (the policy architecture) in `sampler.dtype`, with a scalar head
on the last response token and LoRA on the language model (`learner.lora_*`); the
Bradley-Terry loss over `learner.batch_size` pairs per step for `learner.steps` steps
(`learner.lr`, `learner.max_grad_norm`, `learner.seed` for the data order and LoRA init).
Input: `data.offline_pairs`, our preference Parquet or TRL's (local or s3://); rows that
cannot be used go to <output_dir>/reward_quarantine.jsonl with their reason. The last
`pipeline.eval_rows` pairs by id hash are held out: the report gives the model's accuracy on
them beside the untrained head's (the control) and the exact binomial tail vs a coin.
Output: <output_dir>/reward_model (merged HF checkpoint + reward_head.safetensors; load it
with `mmalign.engines.reward_model.RewardModel.load` or as `--judge.kind reward-model
--judge.model <dir>`) and <output_dir>/reward_metrics.json. One process (no Ray): a
reward model over a few thousand pairs trains in minutes on one GPU.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python pipelines/x.py` anywhere

from mmalign import io, storage  # noqa: E402
from mmalign import quarantine as guard  # noqa: E402
from mmalign.config import Config, parse_args  # noqa: E402
from mmalign.metrics.significance import binomial_tail  # noqa: E402


def split_held_out(rows: list[dict[str, Any]], n: int) -> tuple[list[dict], list[dict]]:
    """(train, held_out): the n rows whose id hashes last are held out (stable under
    reordering of the input; a resumed or extended dataset keeps its held-out rows)."""
    ranked = sorted(rows, key=lambda r: hashlib.sha1(str(r["id"]).encode()).hexdigest())
    cut = max(0, len(ranked) - n)
    return ranked[:cut], ranked[cut:]


def accuracy(rm: Any, rows: list[dict[str, Any]], batch_size: int) -> int:
    """Held-out pairs whose chosen answer the reward model scores higher."""
    correct = 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        correct += int((rm.score(chunk, "chosen") > rm.score(chunk, "rejected")).sum())
    return correct


def load_pairs(cfg: Config) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(learner rows, quarantine entries) of data.offline_pairs."""
    from mmalign.preference_rows import convert_rows

    if not cfg.data.offline_pairs:
        raise SystemExit("data.offline_pairs: set the preference Parquet to train on")
    raw = io.read_parquet(cfg.data.offline_pairs).to_pylist()
    if cfg.data.max_rows:
        raw = raw[: cfg.data.max_rows]
    good, bad = [], []
    for row in convert_rows(raw, load_image=io.load_image_bytes):
        if row["error"]:
            bad.append({"id": row["id"], "reason": row["error"]})
        else:
            good.append(row)
    return good, bad


def run(cfg: Config) -> dict[str, Any]:
    import torch
    from tqdm import tqdm

    from mmalign.engines.reward_model import RewardModel
    from mmalign.models.loading import load_model

    storage.use_config(cfg.storage)
    out = cfg.storage.output_dir
    rows, bad = load_pairs(cfg)
    io.write_jsonl(bad, storage.join(out, "reward_quarantine.jsonl"))
    what = f"data.offline_pairs {cfg.data.offline_pairs}"
    guard.check(what, len(rows) + len(bad), bad, cfg.data.max_quarantined, usable=len(rows))
    train, held = split_held_out(rows, cfg.pipeline.eval_rows)
    L = cfg.learner
    if len(train) < L.batch_size:
        raise SystemExit(f"only {len(train)} training pairs; learner.batch_size is {L.batch_size}")
    model, processor = load_model(cfg.sampler.model, cfg.sampler.dtype)
    rm = RewardModel(model, processor, L)
    control = accuracy(rm, held, L.batch_size) if held else 0
    order = torch.Generator().manual_seed(L.seed)
    perm: list[int] = []
    last: dict[str, float] = {}
    for _ in tqdm(range(L.steps), desc="reward model", unit="step"):
        if len(perm) < L.batch_size:  # a new epoch in a new order
            perm = torch.randperm(len(train), generator=order).tolist()
        batch, perm = [train[i] for i in perm[: L.batch_size]], perm[L.batch_size :]
        last = rm.step(batch)
    correct = accuracy(rm, held, L.batch_size) if held else 0
    with tempfile.TemporaryDirectory() as tmp:
        rm.save(tmp)
        storage.upload_dir(tmp, storage.join(out, "reward_model"))
    metrics = {
        "base": cfg.sampler.model,
        "rows": {"train": len(train), "held_out": len(held), "quarantined": len(bad)},
        "steps": L.steps,
        "final": last,
        "held_out": {
            "correct": correct,
            "accuracy": correct / len(held) if held else None,
            "control_correct": control,  # the untrained head on the same pairs
            "binomial_tail_vs_chance": binomial_tail(correct, len(held)) if held else None,
        },
        "reward_model": storage.join(out, "reward_model"),
    }
    storage.write_bytes(
        storage.join(out, "reward_metrics.json"), json.dumps(metrics, indent=1).encode()
    )
    return metrics


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse_args(argv, description=__doc__)
    try:
        metrics = run(cfg)
    except guard.QuarantineError as err:
        raise SystemExit(f"train_reward.py: error: {err}") from None
    print(json.dumps({k: metrics[k] for k in ("rows", "held_out", "reward_model")}, indent=1))
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
