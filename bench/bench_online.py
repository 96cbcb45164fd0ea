"""End-to-end throughput of the online loop and how busy each role is.

    python bench/bench_online.py                                  # embedded default, local Ray, CPU
    python bench/bench_online.py --learner.steps 10 --sampler.concurrency 2
    python bench/bench_online.py --config pipelines/configs/llava-1.6-7b.yaml --learner.steps 20

Runs `pipelines/online_dpo.py`'s loop (any of its config flags works) into a fresh output
directory with resume and the final evaluation off, and prints one JSON line:
- pairs_per_s: pairs trained on / wall seconds of the loop (first sample request to the
  last checkpoint; Ray and model start-up and the final export are outside_loop_s);
- busy_fraction per role: seconds the role's actors spent inside work calls (sampler:
  sample/bdhs/load_adapter; judge: judge; learner: step/adapter_state) / (loop wall
  seconds * actors of the role), from the actors' own BusyTimers (actors/metrics.py);
- end_to_end_s: the whole `run()` including start-up and the merged-model export.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmalign.config import parse_args  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    out = tempfile.mkdtemp(prefix="bench-online-")
    # defaults first: later flags on the command line win
    base = ["--storage.output_dir", out, "--storage.resume", "false", "--pipeline.eval_rows", "0"]
    cfg = parse_args(base + argv, description=__doc__)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from actors.runtime import init_ray
    from pipelines.online_dpo import run

    t0 = time.time()
    init_ray(cfg.pipeline.ray_address)
    summary = run(cfg)
    end_to_end = time.time() - t0
    loop = summary["loop"]
    result = {
        "bench": "online",
        "mode": cfg.pipeline.mode,
        "steps": loop["steps"],
        "batch_size": cfg.learner.batch_size,
        "samplers": cfg.sampler.concurrency,
        "judge": "none" if cfg.pipeline.mode == "online-bdhs" else cfg.judge.kind,
        "pairs": summary["totals"]["pairs"],
        "loop_wall_s": loop["wall_s"],
        "pairs_per_s": round(loop["pairs_per_s"], 3),
        "s_per_step": round(loop["wall_s"] / max(1, loop["steps"]), 2),
        "busy_fraction": loop["busy_fraction"],
        "end_to_end_s": round(end_to_end, 1),
        "outside_loop_s": round(end_to_end - loop["wall_s"], 1),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "output_dir": out,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
