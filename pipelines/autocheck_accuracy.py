"""How often does AMP's auto-check order responses as ShapesWorld's exact annotations do?

    .venv/bin/python pipelines/autocheck_accuracy.py                   # 40 prompts, seeds 0-4
    .venv/bin/python pipelines/autocheck_accuracy.py --prompts 10 --seeds 0 --out acc.json

One process, no Ray. For each seed, `--prompts` "describe" prompts drawn at random from the
ShapesWorld `pref` split (a different sample per seed) get a ladder of K responses per source
(today one source, "mask ladder": the reference answer, then BDHS rejected answers of the
shipped tiny policy at rho_th 0, 0.5, 0.9, 1.0 — mmalign.engines.bdhs_engine.BDHSEngine on
an HFGenerationEngine, greedy, seeded per row as pipelines/bdhs.py does). Each response's
true hallucination count = its ShapesWorld mentions (mmalign.metrics.vocab, the CHAIR
vocabulary) whose class is not in the image's object annotations, repeats counted.

The auto-check (mmalign.autocheck, config section autocheck) scores every response against
the reference; the figure is pairwise order agreement with the true counts
(mmalign.autocheck.pairwise_agreement: pairs with equal counts skipped, check ties 0.5),
summed over a seed's prompts. Beside it: the same on the BDHS levels alone (the reference
is an easy top), the claimed ladder order itself (rank = level), and a control that ranks
at random (about 0.5). Prints a Markdown table (mean and spread over seeds); --out writes
the JSON report.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python pipelines/x.py` anywhere

SHIPPED = str(Path(__file__).resolve().parents[1] / "assets/models/shapes-llava-small")
LEVELS = (0.0, 0.5, 0.9, 1.0)  # rho_th of the mask ladder, least hallucinated first
FIGURES = ("check", "check_bdhs_only", "claimed_ladder", "random")


def describe_records(n_pool: int = 2000) -> list[dict[str, Any]]:
    """ShapesWorld `pref` records whose task is a description (objects to count), as
    prompt records (mmalign.io) with their annotated object classes."""
    from mmalign import io
    from mmalign.shapes.records import shapes_rows

    raw = [r for r in shapes_rows("pref", max_rows=n_pool) if r["task"] == "describe"]
    records, bad = io.normalize_rows(raw, "", "shapesworld")
    assert not bad, bad
    return records


def true_counts(responses: Sequence[str], objects: Sequence[str], vocab: Any) -> list[int]:
    """Hallucinated mentions of each response (mentions whose class is not annotated)."""
    from mmalign.metrics.chair import score_description

    return [len(score_description(vocab.find_mentions(r), objects).hallucinated) for r in responses]


class Ladder:
    """The mask-ladder source: BDHS rejected answers at each rho_th of `levels`."""

    def __init__(
        self, engine: Any, embed: Any, levels: Sequence[float], max_new_tokens: int, seed: int
    ) -> None:
        from mmalign.config import BDHSConfig, SamplerConfig
        from mmalign.engines.bdhs_engine import BDHSEngine

        sampler = SamplerConfig(max_new_tokens=max_new_tokens)
        self.levels, self.seed = tuple(levels), seed
        self.engines = [
            BDHSEngine(engine, embed, sampler, BDHSConfig(rho_th=rho, seed=seed)) for rho in levels
        ]

    def responses(self, records: Sequence[dict[str, Any]]) -> tuple[list[list[str]], int]:
        """(per record: reference then one y- per level, gate failures). A level whose row
        failed the similarity gate keeps its last try (it is still that level's answer);
        an empty or unsampleable one is "" and left out of the pairs."""
        from mmalign.seeds import row_id_seed
        from operators.bdhs import first_image

        out = [[str(r["reference"])] for r in records]
        gate_failed = 0
        for eng in self.engines:
            rows, where = [], []
            for k, r in enumerate(records):
                row = eng.prepare(
                    r["prompt"],
                    first_image(r["images"]),
                    r["reference"],
                    row_id_seed(self.seed, r["id"]),
                )
                if isinstance(row, str):
                    out[k].append("")
                    continue
                rows.append(row)
                where.append(k)
                out[k].append("")
            for k, res in zip(where, eng.sample(rows), strict=True):
                out[k][-1] = res["rejected"]
                gate_failed += res["error"].startswith("bdhs: similarity")
        return out, gate_failed


def measure(
    records: Sequence[dict[str, Any]],
    ladder: list[list[str]],
    nlp: Any,
    embed: Any,
    vocab: Any,
    *,
    tau: float = 0.85,
    generic_words: frozenset[str] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Pairwise agreement of each ranking with the true counts over `records`' ladders
    (ladder[k] = responses of record k in claimed order, best first; "" = missing)."""
    from mmalign import autocheck as A

    generic = A.GENERIC_WORDS if generic_words is None else generic_words
    rng = random.Random(f"autocheck-accuracy:random:{seed}")
    sums = {f: [0.0, 0] for f in FIGURES}
    per_level: list[list[int]] = [[] for _ in range(max(len(x) for x in ladder))]
    for rec, responses in zip(records, ladder, strict=True):
        keep = [i for i, r in enumerate(responses) if r.strip()]
        texts = [responses[i] for i in keep]
        truth = true_counts(texts, rec["objects"], vocab)
        for i, t in zip(keep, truth, strict=True):
            per_level[i].append(t)
        scores = A.score_responses(rec["reference"], texts, nlp, embed, tau, generic)
        keys = [s.key for s in scores]
        rankings = {
            "check": (keys, truth),
            "check_bdhs_only": (keys[1:], truth[1:]) if keep[:1] == [0] else (keys, truth),
            "claimed_ladder": ([-i for i in keep], truth),
            "random": ([rng.random() for _ in keep], truth),
        }
        for f, (k, t) in rankings.items():
            agree, pairs = A.pairwise_agreement(k, t)
            sums[f][0] += agree * pairs
            sums[f][1] += pairs
    out: dict[str, Any] = {f: (s / n if n else None) for f, (s, n) in sums.items()}
    out["pairs"] = {f: n for f, (_, n) in sums.items()}
    out["mean_hallucinations_per_level"] = [
        round(statistics.fmean(c), 3) if c else None for c in per_level
    ]
    return out


def run_seed(
    seed: int, n_prompts: int, pool: list[dict[str, Any]], models: dict[str, Any], args: Any
) -> dict[str, Any]:
    """One seed: a fresh prompt sample, its mask ladder, and the agreement figures."""
    records = random.Random(f"autocheck-accuracy:prompts:{seed}").sample(pool, n_prompts)
    t0 = time.time()
    ladder = Ladder(models["engine"], models["embed"], args.levels, args.max_new_tokens, seed)
    responses, gate_failed = ladder.responses(records)
    report = measure(
        records,
        responses,
        models["nlp"],
        models["embed"],
        models["vocab"],
        tau=args.tau,
        seed=seed,
    )
    report.update(seed=seed, prompts=n_prompts, gate_failed=gate_failed)
    report["seconds"] = round(time.time() - t0, 1)
    # every ladder, so other rankings can be scored later without sampling again
    report["ladders"] = [
        {"id": r["id"], "objects": r["objects"], "responses": x}
        for r, x in zip(records, responses, strict=True)
    ]
    return report


def load_models(model: str, embedder: str, spacy_model: str) -> dict[str, Any]:
    """The policy's HF engine, the sentence embedder, the spaCy parser and the vocabulary."""
    import spacy

    from mmalign.engines.embedder import SentenceEmbedder
    from mmalign.engines.hf_generation import HFGenerationEngine
    from mmalign.metrics.vocab import shapes_vocabulary

    return {
        "engine": HFGenerationEngine.from_pretrained(model, dtype="float32", device="cpu"),
        "embed": SentenceEmbedder(embedder, device="cpu"),
        "nlp": spacy.load(spacy_model),
        "vocab": shapes_vocabulary(),
    }


def summary_table(reports: Sequence[dict[str, Any]]) -> str:
    """Markdown: each figure's mean, sample std and range over the seeds."""
    labels = {
        "check": "auto-check, all K = 5 levels",
        "check_bdhs_only": "auto-check, the 4 BDHS levels only",
        "claimed_ladder": "claimed ladder order (rho_th)",
        "random": "random ranking (control)",
    }
    lines = [
        "| ranking | mean | std | min | max | pairs / seed |",
        "|---|---|---|---|---|---|",
    ]
    for f in FIGURES:
        vals = [r[f] for r in reports if r[f] is not None]
        std = statistics.stdev(vals) if len(vals) > 1 else 0.0
        pairs = statistics.fmean(r["pairs"][f] for r in reports)
        lines.append(
            f"| {labels[f]} | {statistics.fmean(vals):.3f} | {std:.3f} | {min(vals):.3f} | "
            f"{max(vals):.3f} | {pairs:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    from mmalign.config import AutoCheckConfig

    default = AutoCheckConfig()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=SHIPPED, help="policy checkpoint (default: shipped tiny)")
    ap.add_argument("--prompts", type=int, default=40, help="describe prompts per seed")
    ap.add_argument("--seeds", default="0,1,2,3,4", help="comma list; each draws its own prompts")
    ap.add_argument("--levels", default=",".join(f"{x:g}" for x in LEVELS), help="rho_th ladder")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--tau", type=float, default=default.tau)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--out", default="", help="write the JSON report here")
    args = ap.parse_args(argv)
    args.levels = tuple(float(x) for x in args.levels.split(","))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    models = load_models(args.model, default.embedder, default.spacy_model)
    pool = describe_records()
    reports = []
    for seed in (int(s) for s in args.seeds.split(",")):
        rep = run_seed(seed, args.prompts, pool, models, args)
        figures = {f: rep[f] and round(rep[f], 3) for f in FIGURES}
        print(f"seed {seed}: {figures} levels {rep['mean_hallucinations_per_level']} "
              f"({rep['seconds']} s)", flush=True)  # fmt: skip
        reports.append(rep)
        if args.out:  # after every seed: a long run keeps what it measured
            Path(args.out).write_text(json.dumps(reports, indent=1))
    print(summary_table(reports))
    return reports


if __name__ == "__main__":
    main()
