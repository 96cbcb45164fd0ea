"""Online-DPO vs Mixed-DPO vs Online-BDHS on ShapesWorld, side by side, fixed seeds.

    .venv/bin/python pipelines/quality_online.py                       # embedded default
    .venv/bin/python pipelines/quality_online.py --steps 60 --modes online,mixed --eval-rows 100

Runs the product's own pipelines on one local Ray (nothing here re-implements them):
1. `pipelines/bdhs.py` writes BDHS pairs for the first `--pairs` `pref` prompts: the
   offline set that mode `mixed` draws from with probability `pipeline.p_offline` and that
   mode `online-bdhs` takes chosen / dataset-rejected from.
2. `pipelines/evaluate.py` scores the base policy (`sampler.model`).
3. `pipelines/online_dpo.py` runs each mode for `--steps` learner steps from the same base,
   seed and preset, and scores its merged policy on the same eval rows.
Every other setting comes from the preset and `--set key=value` overrides (dotted config
keys, as on the pipelines' command lines). Prints a Markdown table; --out writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python pipelines/x.py` anywhere

from mmalign import storage  # noqa: E402
from mmalign.config import EMBEDDED_PRESET, Config, load  # noqa: E402
from mmalign.evaluation import HEADLINE_COLUMNS, report_metrics  # noqa: E402
from mmalign.evaluation import markdown_table as metrics_table  # noqa: E402

MODES = ("online", "mixed", "online-bdhs")


def run_modes(
    base: dict[str, Any], modes: Sequence[str], steps: int, pairs: int, eval_rows: int
) -> dict[str, Any]:
    """{"base": metrics, <mode>: metrics + pairs trained on, ...}; `base` = config overrides."""
    from pipelines.bdhs import run_bdhs
    from pipelines.evaluate import run_evaluation
    from pipelines.online_dpo import check_config
    from pipelines.online_dpo import run as run_online

    root = base["storage.output_dir"]

    def cfg_for(name: str, **extra: Any) -> Config:
        # its own run name too: named actors and metric tags must not collide across modes
        over = {**base, "name": f"quality-{name}", "storage.output_dir": storage.join(root, name)}
        over.update(extra)
        preset = base.get("config") or str(EMBEDDED_PRESET)
        return load(preset, {k: v for k, v in over.items() if k != "config"})

    offline = storage.join(root, "pairs", "bdhs") if any(m != "online" for m in modes) else ""

    def mode_cfg(mode: str) -> Config:
        extra: dict[str, Any] = {
            "pipeline.mode": mode,
            "learner.steps": steps,
            "pipeline.eval_rows": eval_rows,
            "storage.resume": False,
        }
        if offline:
            extra["data.offline_pairs"] = offline
        return cfg_for(mode, **extra)

    for mode in modes:  # a bad setting for any mode fails here, before any run
        check_config(mode_cfg(mode))
    report: dict[str, Any] = {"steps": steps, "eval_rows": eval_rows, "seconds": {}}
    t0 = time.perf_counter()
    if offline:
        run_bdhs(cfg_for("pairs", **{"data.max_rows": pairs}))
    report["seconds"]["bdhs"] = time.perf_counter() - t0
    base_cfg = cfg_for("base")
    report["base"] = report_metrics(run_evaluation(base_cfg, max_rows=eval_rows))
    for mode in modes:
        t1 = time.perf_counter()
        cfg = mode_cfg(mode)
        summary = run_online(cfg)
        done = json.loads(
            storage.read_bytes(storage.join(cfg.storage.output_dir, "eval", "report.json"))
        )
        report[mode] = report_metrics(done)
        report[mode]["pairs_trained"] = summary["totals"].get("pairs", 0)
        report["seconds"][mode] = time.perf_counter() - t1
    return report


COLUMNS = (
    *HEADLINE_COLUMNS,
    ("popular F1", "pope/popular/f1"),
    ("yes % (random)", "pope/random/yes_ratio"),
    ("pairs trained", "pairs_trained"),
)


def markdown_table(report: dict[str, Any], modes: Sequence[str]) -> str:
    rows = [("SFT base", report["base"])] + [(mode, report[mode]) for mode in modes]
    return metrics_table(rows, COLUMNS)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default="", help="preset YAML (default: embedded shapes-cpu)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated from {MODES}")
    ap.add_argument("--steps", type=int, default=60, help="learner steps per mode")
    ap.add_argument("--pairs", type=int, default=256, help="BDHS pairs for mixed / online-bdhs")
    ap.add_argument("--eval-rows", type=int, default=100, help="unbiased eval images")
    ap.add_argument("--output-dir", default="runs/quality-online", help="runs go below here")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every run, e.g. --set learner.lr=3e-4")  # fmt: skip
    ap.add_argument("--out", default="", help="write the JSON report here")
    args = ap.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    for mode in modes:
        if mode not in MODES:
            ap.error(f"--modes: unknown mode {mode!r} (choose from {MODES})")
    base: dict[str, Any] = {"config": args.config, "storage.output_dir": args.output_dir}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--set {item!r}: expected KEY=VALUE")
        base[key] = value
    report = run_modes(base, modes, args.steps, args.pairs, args.eval_rows)
    print(markdown_table(report, modes))
    print(json.dumps({"seconds": report["seconds"]}))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
