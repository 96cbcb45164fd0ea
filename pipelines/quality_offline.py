"""Does preference training on BDHS pairs cut hallucination? DPO vs IPO vs SLiC (vs MDPO).

    .venv/bin/python pipelines/quality_offline.py                      # embedded default
    .venv/bin/python pipelines/quality_offline.py --losses dpo --pairs 128 --eval-images 100

One process, no Ray (the distributed paths are `pipelines/bdhs.py` and
`pipelines/offline_dpo.py`; this script runs the same operator, learner engine and metrics
in-process so that a quality comparison fits a 2-core CPU box and a test):

1. BDHS rejected answers from the policy itself for `--pairs` ShapesWorld `pref` prompts
   (`operators.bdhs.BDHSOperator`, greedy, seeded per row); chosen = the reference answer.
2. For each loss: LoRA preference training (`mmalign.engines.learner.PreferenceLearner`) on
   those pairs from the same base weights, same data order, same seed.
3. POPE (random / popular / adversarial) and CHAIR on the unbiased `eval` split, greedy, for
   the base and for every trained policy (LoRA merged).
Prints a Markdown table and, with --out, writes the JSON report. With `--seeds 0,1,2` the
whole experiment runs once per seed, then a table of each policy's change from the base.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python pipelines/x.py` anywhere

from mmalign.evaluation import HEADLINE_COLUMNS  # noqa: E402

SHIPPED = str(Path(__file__).resolve().parents[1] / "assets/models/shapes-llava-small")
# Per-loss (beta, learning rate): betas from the paper's grids (ALGORITHMS.md section 1),
# both picked by hand on 200-500 eval images (the DPO grid is in docs/QUALITY.md). MDPO
# here ranks K = 2 responses (chosen, rejected): DPO plus its -r(y+) anchor.
# "dpo+rpo": DPO plus the per-token NLL of the chosen answer (learner.rpo_alpha 1.0).
# "nll": the control for it, the NLL alone (supervised fine-tuning on the chosen = reference
# answers): DPO at beta 1e-6 adds a gradient ~beta/2 times its log-ratio gradient, nothing.
BETAS = {"dpo": 0.5, "ipo": 0.9, "slic": 0.1, "mdpo": 0.1, "dpo+rpo": 0.1, "nll": 1e-6}
LRS = {"dpo": 3e-4, "ipo": 1e-3, "slic": 3e-4, "mdpo": 1e-3, "dpo+rpo": 1e-3, "nll": 1e-3}
RPO_ALPHA = {"dpo+rpo": 1.0, "nll": 1.0}
LOSS = {"dpo+rpo": "dpo", "nll": "dpo"}  # the learner's loss behind a row name
LABELS = {"dpo+rpo": "DPO + RPO anchor", "nll": "chosen NLL only (control)"}


def bdhs_learner_rows(
    model: str,
    n_rows: int,
    *,
    seed: int = 0,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    offset: int = 0,
    **bdhs: Any,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(learner rows, stats): BDHS pairs for ShapesWorld `pref` records offset..offset+n_rows.

    Rows whose BDHS gate failed (or any other per-row error) are dropped and counted;
    `bdhs` sets BDHSConfig fields of the BDHSOperator (rho_th, n_bdhs, eps_s, ...)."""
    from mmalign import io
    from mmalign.config import BDHSConfig, SamplerConfig
    from mmalign.preference_rows import to_learner_row
    from operators.bdhs import BDHSOperator, as_batch, to_preference_row

    records, _ = io.read_prompts("shapesworld:pref", max_rows=offset + n_rows)
    records = records[offset:]
    sampler = SamplerConfig(model=model, max_new_tokens=max_new_tokens)
    op = BDHSOperator(sampler, BDHSConfig(seed=seed, **bdhs))
    rows, errors, unguided = [], 0, 0
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        out = op(as_batch(chunk))
        for i, record in enumerate(chunk):
            row = {k: out[k][i] for k in out}
            if row["error"]:
                errors += 1
                continue
            rows.append(to_learner_row(to_preference_row(row, record)))
            unguided += bool(json.loads(row["meta"] or "{}").get("final_unguided"))
    stats = {"pairs": len(rows), "errors": errors}
    return rows, {**stats, "unguided_fraction": unguided / max(1, len(rows))}


def train_policy(
    model: str,
    rows: Sequence[dict[str, Any]],
    *,
    loss: str,
    steps: int,
    lr: float | None = None,
    beta: float | None = None,
    batch_size: int = 8,
    seed: int = 0,
    projector_lr: float = 0.0,
    rpo_alpha: float = 0.0,
) -> tuple[Any, Any, list[dict[str, float]]]:
    """(merged model, processor, per-step metrics) after `steps` optimizer steps of LoRA
    preference training on `rows` (reshuffled every epoch with `seed`, `shuffled_batches`);
    lr None: the loss's own rate (LRS); loss "dpo+rpo" is DPO with rpo_alpha 1 (RPO_ALPHA),
    "nll" the NLL of the chosen answer alone (a control, see BETAS)."""
    import torch

    from mmalign.config import LearnerConfig
    from mmalign.engines.learner import PreferenceLearner
    from mmalign.models.loading import load_model
    from mmalign.models.sft import shuffled_batches

    cfg = LearnerConfig(
        loss=LOSS.get(loss, loss),
        beta=BETAS[loss] if beta is None else beta,
        lr=LRS[loss] if lr is None else lr,
        projector_lr=projector_lr,
        rpo_alpha=RPO_ALPHA.get(loss, rpo_alpha),
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        batch_size=batch_size,
        steps=steps,
        schedule="constant",
        seed=seed,
    )
    torch.manual_seed(seed)
    base, processor = load_model(model)
    learner = PreferenceLearner(base, processor, cfg)
    batches = shuffled_batches(len(rows), batch_size, random.Random(seed))  # as in SFT
    history = []
    while learner.global_step < steps:
        history.append(learner.step([rows[i] for i in next(batches).tolist()]))
    merged = learner.merged_model().eval()
    return merged, processor, history


def eval_policy(model: Any, processor: Any, n_images: int) -> dict[str, float]:
    """POPE mean F1 (+ per split) and CHAIR on the first `n_images` unbiased eval images."""
    from mmalign.evaluation import evaluate, report_metrics
    from mmalign.models.greedy import greedy_fn
    from mmalign.shapes.world import WorldConfig, generate_split

    records = generate_split(WorldConfig(), "eval", n_images)
    return report_metrics(evaluate(greedy_fn(model, processor), records, batch_size=64))


def compare(
    model: str,
    losses: Sequence[str],
    *,
    pairs: int,
    steps: int,
    eval_images: int,
    lr: float | None = None,
    seed: int = 0,
    base: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The whole experiment; returns {"base": metrics, <loss>: metrics, "data": stats, ...}.
    lr None: each loss's own rate (LRS); `base`: the base policy's metrics when already
    measured (they do not depend on the seed)."""
    from mmalign.models.loading import load_model

    t0 = time.perf_counter()
    rows, stats = bdhs_learner_rows(model, pairs, seed=seed)
    lrs = {loss: LRS[loss] if lr is None else lr for loss in losses}
    report: dict[str, Any] = {"model": model, "seed": seed, "data": stats, "steps": steps}
    report |= {"lr": lrs, "seconds": {"bdhs": time.perf_counter() - t0}}
    report["base"] = base if base is not None else eval_policy(*load_model(model), eval_images)
    for loss in losses:
        t1 = time.perf_counter()
        merged, processor, history = train_policy(
            model, rows, loss=loss, steps=steps, lr=lrs[loss], seed=seed
        )
        report[loss] = eval_policy(merged, processor, eval_images)
        report[loss]["train/final_reward_accuracy"] = history[-1]["reward_accuracy"]
        report[loss]["train/optimizer_steps"] = int(history[-1]["optimizer_step"])
        if "chosen_nll" in history[-1]:  # losses with the RPO anchor
            report[loss]["train/final_chosen_nll"] = history[-1]["chosen_nll"]
        report["seconds"][loss] = time.perf_counter() - t1
    return report


COLUMNS = (
    *HEADLINE_COLUMNS,
    ("random", "pope/random/f1"),
    ("popular", "pope/popular/f1"),
    ("adversarial", "pope/adversarial/f1"),
    ("yes % (random)", "pope/random/yes_ratio"),
)


def label(loss: str) -> str:
    """A policy's name in the tables: LABELS, else the loss in capitals."""
    return LABELS.get(loss, loss.upper())


def markdown_table(report: dict[str, Any], losses: Sequence[str]) -> str:
    from mmalign.evaluation import markdown_table as table

    rows = [("SFT base", report["base"])]
    rows += [(f"{label(loss)} on BDHS pairs", report[loss]) for loss in losses]
    return table(rows, COLUMNS)


def seed_table(reports: Sequence[dict[str, Any]], losses: Sequence[str]) -> str:
    """Markdown table over several seeds' reports: per policy and headline metric, the mean
    change from the SFT base in points and the per-seed changes (the base is the same in
    every seed; the BDHS pairs, LoRA init and data order change)."""
    head = "| policy | " + " | ".join(f"{h} change" for h, _ in HEADLINE_COLUMNS) + " |"
    lines = [head, "|---" * (len(HEADLINE_COLUMNS) + 1) + "|"]
    for loss in losses:
        cells = []
        for _, key in HEADLINE_COLUMNS:
            deltas = [100 * (r[loss][key] - r["base"][key]) for r in reports]
            each = ", ".join(f"{d:+.1f}" for d in deltas)
            cells.append(f"{sum(deltas) / len(deltas):+.1f} ({each})")
        lines.append(f"| {label(loss)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=SHIPPED, help="policy checkpoint (default: shipped tiny)")
    ap.add_argument(
        "--losses",
        default="dpo,ipo,slic,mdpo,dpo+rpo,nll",
        help="comma-separated: dpo, ipo, slic, mdpo, dpo+rpo (DPO + chosen NLL, rpo_alpha 1), "
        "nll (the chosen NLL alone: the control for dpo+rpo)",
    )
    ap.add_argument(
        "--pairs", type=int, default=2000, help="BDHS pairs to generate (the pref split: 2,000)"
    )
    ap.add_argument(
        "--steps", type=int, default=128, help="optimizer steps per loss (8 pairs each)"
    )
    ap.add_argument(
        "--lr", type=float, default=None, help=f"LoRA learning rate for every loss (default: {LRS})"
    )
    ap.add_argument("--eval-images", type=int, default=500, help="unbiased eval images (max 500)")
    ap.add_argument(
        "--seeds",
        default="0",
        help="comma-separated seeds (BDHS sampling, LoRA init, data order); with several, "
        "one run per seed and a table of the changes from the base",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--out", default="", help="write the JSON report here")
    args = ap.parse_args(argv)
    if not 1 <= args.eval_images <= 500:
        ap.error(f"--eval-images: the eval split has 500 images, got {args.eval_images}")
    losses = [x for x in args.losses.split(",") if x]
    for loss in losses:
        if loss not in BETAS:
            ap.error(f"--losses: unknown loss {loss!r} (choose from {sorted(BETAS)})")
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x]
    except ValueError:
        ap.error(f"--seeds: need comma-separated integers, got {args.seeds!r}")
    if not seeds:
        ap.error("--seeds: give at least one seed")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    reports = []
    for seed in seeds:
        report = compare(
            args.model,
            losses,
            pairs=args.pairs,
            steps=args.steps,
            eval_images=args.eval_images,
            lr=args.lr,
            seed=seed,
            base=reports[0]["base"] if reports else None,
        )
        print(f"seed {seed}:\n" + markdown_table(report, losses))
        print(json.dumps({"data": report["data"], "seconds": report["seconds"]}))
        reports.append(report)
    if len(seeds) > 1:
        print(seed_table(reports, losses))
    result = reports[0] if len(seeds) == 1 else {"seeds": dict(zip(seeds, reports, strict=True))}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
