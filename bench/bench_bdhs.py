"""Throughput of BDHS generation: the Ray Data pipeline vs a single-process per-sample loop.

    python bench/bench_bdhs.py --rows 32 --concurrency 2
    python bench/bench_bdhs.py --model assets/models/shapes-llava-small --max-new-tokens 32

Both sides run the same BDHSOperator code on the same shapesworld:pref rows. The loop
loads the model once and calls the operator on one sample at a time (how a script without
Ray would do it); the pipeline runs `pipelines/bdhs.py`'s run_bdhs with `--concurrency`
actors and batches of `--batch-size`. Times include model loading on both sides (the
pipeline's also includes Ray Data start-up); the loop's steady-state rate is printed too.
Prints one JSON object; `ratio` = pipeline pairs/s / loop pairs/s (end to end) and
`steady_ratio` the same after start-up (pipeline: rows after the first output row).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from mmalign import io as mio  # noqa: E402
from mmalign.config import load  # noqa: E402

TRAINED = Path(__file__).resolve().parents[1] / "assets/models/shapes-llava-small"


def model_path(arg: str, tmp: str) -> str:
    """--model, else the trained small model when present, else a random tiny one in tmp."""
    if arg:
        return arg
    if (TRAINED / "config.json").exists():
        return str(TRAINED)
    from mmalign.models.tiny_llava import build_tiny_llava

    model, processor = build_tiny_llava("small", seed=0)
    model.save_pretrained(tmp + "/tiny")
    processor.save_pretrained(tmp + "/tiny")
    return tmp + "/tiny"


def loop_rate(model: str, rows: int, kwargs: dict) -> dict[str, float]:
    """Single process: load once, then BDHSOperator on one sample at a time."""
    from operators.bdhs import INPUT_COLUMNS, BDHSOperator

    records, _ = mio.read_prompts("shapesworld:pref", max_rows=rows)
    t0 = time.time()
    from mmalign.config import BDHSConfig, SamplerConfig

    sampler = SamplerConfig(model=model, max_new_tokens=kwargs.pop("max_new_tokens"))
    op = BDHSOperator(sampler, BDHSConfig(**kwargs))
    t1 = time.time()
    ok = 0
    for rec in records:
        batch = {}
        for c in INPUT_COLUMNS:
            col = np.empty(1, dtype=object)
            col[0] = rec[c]
            batch[c] = col
        ok += int(op(batch)["error"][0] == "")
    t2 = time.time()
    return {
        "rows": ok,
        "seconds": round(t2 - t0, 2),
        "load_seconds": round(t1 - t0, 2),
        "pairs_per_s": ok / (t2 - t0),
        "steady_pairs_per_s": ok / (t2 - t1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--n-bdhs", type=int, default=5)
    ap.add_argument("--model", default="")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model = model_path(args.model, tmp)
        kwargs = {"max_new_tokens": args.max_new_tokens, "n_bdhs": args.n_bdhs}
        loop = loop_rate(model, args.rows, kwargs)

        from pipelines.bdhs import run_bdhs

        cfg = load(
            None,
            {
                "data.max_rows": args.rows,
                "sampler.model": model,
                "sampler.max_new_tokens": args.max_new_tokens,
                "sampler.batch_size": args.batch_size,
                "sampler.concurrency": args.concurrency,
                "bdhs.n_bdhs": args.n_bdhs,
                "storage.output_dir": tmp + "/run",
                "storage.resume": False,
            },
        )
        ray_summary = run_bdhs(cfg)
    result = {
        "model": model,
        "rows": args.rows,
        "concurrency": args.concurrency,
        "batch_size": args.batch_size,
        "loop": loop,
        "pipeline": {
            "rows": ray_summary["rows"],
            "seconds": ray_summary["seconds"],
            "pairs_per_s": ray_summary["pairs_per_s"],
            "first_row_seconds": ray_summary["first_row_seconds"],
            "steady_pairs_per_s": ray_summary["steady_pairs_per_s"],
        },
        "ratio": round(ray_summary["pairs_per_s"] / loop["pairs_per_s"], 3),
        "steady_ratio": round(
            (ray_summary["steady_pairs_per_s"] or 0.0) / loop["steady_pairs_per_s"], 3
        ),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
