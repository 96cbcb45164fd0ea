"""End to end: `pipelines/offline_dpo.py` vs TRL's `DPOTrainer` on the same pairs and model.

    bash scripts/setup.sh dev && bash scripts/setup_trl.sh
    .venv/bin/python bench/bench_trl_overhead.py --repeats 3 --out runs/bench-trl/result.json
    # against an older commit, interleaved:
    git archive <commit> | tar -x -C /tmp/before && .venv/bin/python bench/bench_trl_overhead.py \
        --baseline-root /tmp/before --sides before,mmalign,trl

Pairs: `pipelines/bdhs.py` on the shipped tiny policy (assets/models/shapes-llava-small),
cut to the first `--pairs` rows into one Parquet (our Parquet is TRL's vision layout, so
both sides read the same file; TRL gets its four columns prompt/chosen/rejected/images).
Each repeat runs, interleaved, (a) offline_dpo.py as a user runs it (a subprocess: Python
start, Ray start, the data check and quarantine, Ray Train, checkpoints every
`--checkpoint-every` steps, the merged model; `--pipeline.eval_rows 0`) and (b) TRL in
.venv-trl (`--run-trl`: load the dataset and model, DPOTrainer with the same LoRA (the
learner's `lora_config`), batch, steps, lr, beta, cosine schedule, clipping, seed, LoRA
dropout; a checkpoint every `--checkpoint-every` steps; then the merged model saved as
offline_dpo.py does). Both run on `--threads` torch threads (OMP_NUM_THREADS for every
process of the run). Wall clock is the subprocess's, start to exit. Per-step time: the
training loop's time per optimizer step (batch building included), checkpoints left out.
`cpu_s`: CPU seconds of the finished processes the run waited for: all of TRL's run (one
process), but for offline_dpo.py only the driver (Ray's workers are not reaped through it),
so it compares TRL's CPU time with its wall clock on a loaded machine, not the two sides.
offline_dpo.py's phases come from its metrics.json (`seconds`) and the learner worker's
`learner phases:` line; TRL's from a callback.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODEL = "assets/models/shapes-llava-small"
SETTINGS = {"lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "lr": 1e-4, "beta": 0.1}


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    return env


def make_pairs(work: Path, n: int, python: str) -> Path:
    """`n` BDHS pairs in one Parquet (made once; the BDHS run is not timed)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pairs = work / "pairs.parquet"
    if pairs.exists():
        return pairs
    out = work / "bdhs-run"
    # a few spare prompts: BDHS drops pairs whose rejected equals the chosen
    argv = [python, "pipelines/bdhs.py", "--storage.output_dir", str(out)]
    argv += ["--data.max_rows", str(n + n // 8 + 8), "--sampler.model", MODEL]
    subprocess.run(argv, cwd=ROOT, env=_env(2), check=True, stdout=subprocess.DEVNULL)
    tables = [pq.read_table(p) for p in sorted((out / "bdhs").glob("*.parquet"))]
    table = pa.concat_tables(tables).sort_by("id")
    if table.num_rows < n:
        raise SystemExit(f"BDHS wrote {table.num_rows} pairs, fewer than {n}")
    pq.write_table(table.slice(0, n), pairs)
    return pairs


def _cpu() -> float:
    """CPU seconds (user + sys) of the finished children, and theirs, so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _phases_line(text: str) -> dict[str, float]:
    found = re.findall(r"learner phases: (\{.*\})", text)
    return json.loads(found[-1]) if found else {}


def run_mmalign(
    pairs: Path, work: Path, a: argparse.Namespace, root: Path = ROOT
) -> dict[str, Any]:
    out = work / "mmalign-run"
    shutil.rmtree(out, ignore_errors=True)
    argv = [a.python, "pipelines/offline_dpo.py", "--data.offline_pairs", str(pairs)]
    argv += ["--sampler.model", MODEL, "--storage.output_dir", str(out)]
    argv += ["--pipeline.eval_rows", "0", "--storage.checkpoint_every", str(a.checkpoint_every)]
    argv += ["--learner.batch_size", str(a.batch_size), "--learner.steps", str(a.steps)]
    argv += ["--learner.num_workers", "1", "--learner.num_cpus", "1"]
    argv += ["--learner.schedule", "cosine", "--learner.warmup_steps", "0"]
    for key, value in SETTINGS.items():
        argv += [f"--learner.{key}", str(value)]
    t0, cpu0 = time.time(), _cpu()
    proc = subprocess.run(argv, cwd=root, env=_env(a.threads), capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"offline_dpo.py exited {proc.returncode}")
    metrics = json.loads((out / "metrics.json").read_text())
    seconds = metrics["seconds"]
    worker = _phases_line(proc.stdout + proc.stderr)
    steps = worker.get("steps", 0.0) + worker.get("data_wait", 0.0)
    phases = {
        "startup": seconds.get("startup", float("nan")),
        "ray_start": seconds.get("ray_start", float("nan")),
        "data_check": seconds["data_check"],
        "train_start": seconds["train"] - sum(worker.values()),  # Ray Train, worker start
        "model_load": worker.get("build", 0.0),
        "first_batch_wait": worker.get("first_batch", 0.0),
        "steps": steps,
        "checkpoint": worker.get("checkpoint", 0.0),
        "merge": worker.get("merge", 0.0),
    }
    phases["other"] = wall - sum(v for v in phases.values() if v == v)
    cpu = _cpu() - cpu0
    return {"wall_s": wall, "cpu_s": cpu, "step_s": steps / a.steps, "phases": phases}


def run_trl_side(pairs: Path, work: Path, a: argparse.Namespace) -> dict[str, Any]:
    out = work / "trl-run"
    shutil.rmtree(out, ignore_errors=True)
    argv = [a.trl_python, __file__, "--run-trl", "--pairs-file", str(pairs)]
    argv += ["--trl-out", str(out), "--steps", str(a.steps), "--batch-size", str(a.batch_size)]
    argv += ["--checkpoint-every", str(a.checkpoint_every), "--threads", str(a.threads)]
    t0, cpu0 = time.time(), _cpu()
    proc = subprocess.run(argv, cwd=ROOT, env=_env(a.threads), capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"TRL run exited {proc.returncode}")
    phases = json.loads((out / "phases.json").read_text())
    phases["startup_and_exit"] = wall - sum(phases.values())
    cpu = _cpu() - cpu0
    return {"wall_s": wall, "cpu_s": cpu, "step_s": phases["steps"] / a.steps, "phases": phases}


def trl_main(a: argparse.Namespace) -> None:
    """In .venv-trl: TRL's DPOTrainer, timed by phase into <trl_out>/phases.json."""
    t = time.perf_counter()
    import torch

    torch.set_num_threads(a.threads)
    from datasets import load_dataset
    from transformers import AutoProcessor, LlavaForConditionalGeneration, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from mmalign.config import LearnerConfig
    from mmalign.engines.learner import lora_config

    phases = {"imports": time.perf_counter() - t}
    t = time.perf_counter()
    ds = load_dataset("parquet", data_files=a.pairs_file, split="train")
    ds = ds.select_columns(["prompt", "chosen", "rejected", "images"])
    model = LlavaForConditionalGeneration.from_pretrained(MODEL, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(MODEL)
    phases["load"] = time.perf_counter() - t

    class Clock(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.begin = self.end = self.last_step_end = 0.0
            self.saves = 0.0

        def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
            self.begin = time.perf_counter()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            self.last_step_end = time.perf_counter()

        def on_save(self, *args: Any, **kwargs: Any) -> None:
            self.saves += time.perf_counter() - self.last_step_end

        def on_train_end(self, *args: Any, **kwargs: Any) -> None:
            self.end = time.perf_counter()

    clock = Clock()
    s = LearnerConfig(**{k: v for k, v in SETTINGS.items() if k.startswith("lora")})
    config = DPOConfig(
        output_dir=str(Path(a.trl_out) / "checkpoints"),
        per_device_train_batch_size=a.batch_size,
        max_steps=a.steps,
        learning_rate=SETTINGS["lr"],
        beta=SETTINGS["beta"],
        lr_scheduler_type="cosine",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        disable_dropout=False,  # the learner keeps LoRA dropout 0.05 too
        max_length=None,  # the learner does not truncate (max_response_tokens 0)
        save_strategy="steps",
        save_steps=a.checkpoint_every,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
    )
    t = time.perf_counter()
    trainer = DPOTrainer(
        model=model,
        args=config,
        train_dataset=ds,
        processing_class=processor,
        peft_config=lora_config(s),
        callbacks=[clock],
    )
    phases["trainer_init"] = time.perf_counter() - t
    t = time.perf_counter()
    trainer.train()
    train = time.perf_counter() - t
    phases["steps"] = clock.end - clock.begin - clock.saves
    phases["checkpoint"] = clock.saves
    phases["train_other"] = train - phases["steps"] - phases["checkpoint"]
    t = time.perf_counter()
    merged = Path(a.trl_out) / "merged"
    trainer.model.merge_and_unload().save_pretrained(merged)
    processor.save_pretrained(merged)
    phases["merge"] = time.perf_counter() - t
    (Path(a.trl_out) / "phases.json").write_text(json.dumps(phases))


def _spread(values: list[float], digits: int = 1) -> str:
    """median (min-max)"""
    m, lo, hi = statistics.median(values), min(values), max(values)
    return f"{m:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--pairs", type=int, default=240)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--checkpoint-every", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sides", default="mmalign,trl", help="of mmalign, trl, before")
    p.add_argument("--work", default="runs/bench-trl")
    p.add_argument("--out", default="runs/bench-trl/result.json")
    p.add_argument("--python", default=sys.executable, help="mmalign's env")
    p.add_argument(
        "--baseline-root",
        default="",
        help="another checkout of mmalign (e.g. `git archive <commit>` unpacked): side "
        "'before' runs its offline_dpo.py, interleaved with the others",
    )
    p.add_argument("--trl-python", default=str(ROOT / ".venv-trl/bin/python"))
    p.add_argument("--run-trl", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--pairs-file", help=argparse.SUPPRESS)
    p.add_argument("--trl-out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.run_trl:
        return trl_main(a)
    work = (ROOT / a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    pairs = make_pairs(work, a.pairs, a.python)
    runners: dict[str, Any] = {"mmalign": run_mmalign, "trl": run_trl_side}
    if a.baseline_root:
        before = Path(a.baseline_root).resolve()
        runners["before"] = lambda *args: run_mmalign(*args, root=before)
    sides = a.sides.split(",")
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    for i in range(a.repeats):
        for side in sides:
            r = runners[side](pairs, work, a)
            runs[side].append(r)
            print(f"repeat {i + 1} {side}: {json.dumps(r)}", flush=True)
    print(f"\n{'side':8} {'end to end s':>18} {'CPU s':>18} {'s/step':>18}")
    for side, rs in runs.items():
        wall, cpu = [r["wall_s"] for r in rs], [r["cpu_s"] for r in rs]
        step = [r["step_s"] for r in rs]
        print(f"{side:8} {_spread(wall):>18} {_spread(cpu):>18} {_spread(step, 2):>18}")
        for phase in rs[0]["phases"]:
            print(f"  {phase:18} {_spread([r['phases'][phase] for r in rs]):>18}")
    setup = {k: v for k, v in vars(a).items() if k not in ("run_trl", "pairs_file", "trl_out")}
    result = {"setup": setup, "cpu_count": os.cpu_count(), "runs": runs}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
