"""Online-DPO / Mixed-DPO: the policy samples, a judge ranks, the learner updates, weights sync.

    python pipelines/online_dpo.py                         # embedded default, local Ray
    ray start --head --num-cpus 8 && ray job submit --working-dir . -- \\
        python pipelines/online_dpo.py --config pipelines/configs/shapes-cpu.yaml
    python pipelines/online_dpo.py --config pipelines/configs/llava-1.6-7b.yaml   # on a cluster

Data flow (modes online/mixed): Ray Data reads, validates and loads `data.prompts` into
object-store blocks (operators/prompt_source.py: map_batches tasks, one output row per
input row, bad rows quarantined with their reason to quarantine.jsonl); the driver keeps
only the block refs and an idx -> (block, offset) table, never image bytes. The loop itself
is paced by this driver: each step it draws `batch_indices(seed, step)` and sends each
sampler actor its shard as row refs; samplers, the judge and the learner read the rows
from the object store themselves. The sampler actors live in one `SamplerPool`
(actors/sampler_pool.py): a dead sampler's shard is re-sent, same refs, to its
replacement. What a step samples and how outputs become pairs is the mode's pair source
(mmalign/pair_sources.py: OnlineSource, MixedSource, BDHSSource). Mode online-bdhs and the
offline pairs of mode mixed are still read on the driver (`load_offline`) and sent to the
actors by value.

Each step: `learner.batch_size` prompts are sharded over the sampler actors (k =
`sampler.samples_per_prompt` answers each, with the policy's current LoRA weights); the
judge compares them in disjoint pairs (1, 2), (3, 4), ... in both orders and the first pair
with agreeing verdicts trains (one pair per prompt and step); in mode
`mixed` each example is an offline pair (`data.offline_pairs`) with probability
`pipeline.p_offline`; in mode `online-bdhs` the step's examples are offline pairs whose
chosen stays, and the samplers regenerate a BDHS rejected answer with the current weights
(section `bdhs`), trained with the dataset's rejected through the two-rejected loss
(`learner.gamma` on the dataset's, no judge). The learner takes one step; every
`pipeline.sync_every` steps the LoRA adapter (only) goes to the samplers as a new weight
version. Sampling of step t+1 overlaps learning of step t when `pipeline.max_staleness >= 1`.
The summary reports pairs/s over the loop and each role's busy fraction.

Outputs under `storage.output_dir`: checkpoints (`step_XXXXXX/`, the layout of
mmalign/engines/checkpoint.py, which Ray Train's offline learner reads and writes too;
resume by rerunning the same command),
`pairs/step-*.jsonl` (every pair trained on, with id, version and lag), TensorBoard logs,
`merged/` (the final policy, HF format) and `eval/report.json`.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python pipelines/x.py` anywhere

from mmalign import io as mio  # noqa: E402
from mmalign import online, storage  # noqa: E402
from mmalign import quarantine as guard  # noqa: E402
from mmalign.config import Config, ConfigError, check_bdhs_engine, parse_args  # noqa: E402
from mmalign.engines import checkpoint  # noqa: E402
from mmalign.evaluation import format_comparison, headline  # noqa: E402
from mmalign.pair_sources import (  # noqa: E402
    BDHSSource,
    MixedSource,
    OnlineSource,
    PairSource,
    RLOOSource,
)

if TYPE_CHECKING:
    from actors.sampler_pool import SamplerPool


def check_config(cfg: Config) -> None:
    """Cross-field checks of this pipeline, at start, naming the field."""
    mode = cfg.pipeline.mode
    if mode in ("mixed", "online-bdhs") and not cfg.data.offline_pairs:
        raise ConfigError(f"data.offline_pairs: mode {mode!r} needs an offline preference Parquet")
    if mode == "online-bdhs" and cfg.bdhs.variant not in ("bdhs", "bdhs-noise"):
        raise ConfigError("bdhs.variant: mode 'online-bdhs' needs 'bdhs' or 'bdhs-noise'")
    if mode == "online-bdhs":
        check_bdhs_engine(cfg.sampler, cfg.bdhs)
    if mode == "online-bdhs" and cfg.learner.loss == "mdpo":
        raise ConfigError(
            "learner.loss: mode 'online-bdhs' trains the two-rejected loss and needs a pair "
            "loss (dpo, ipo, slic), got 'mdpo'"
        )
    if mode in ("rloo", "ppo") and cfg.judge.kind == "vlm":
        raise ConfigError(
            f"judge.kind: mode {mode!r} scores each sample alone; use 'objects' or 'reward-model'"
        )
    if mode != "online-bdhs" and cfg.sampler.samples_per_prompt < 2:
        raise ConfigError("sampler.samples_per_prompt: the judge needs at least 2 samples")


def role_options(cfg: Config) -> dict[str, dict[str, Any]]:
    """`.options(**...)` of each role's actors: CPUs, GPUs and the node-type label of its
    section (`sampler.resources`, ...). The loop starts `sampler.concurrency` samplers, one
    judge and one learner (one GPU with `learner.use_gpu`): `judge.concurrency` and
    `learner.num_workers` are read by Serve / offline Ray Train, not here."""
    from actors.online import actor_options

    S, J, L = cfg.sampler, cfg.judge, cfg.learner
    return {
        "sampler": actor_options(S.num_cpus, S.num_gpus, S.resources),
        "judge": actor_options(J.num_cpus, J.num_gpus, J.resources),
        "learner": actor_options(L.num_cpus, 1 if L.use_gpu else 0, L.resources),
    }


def load_offline(cfg: Config) -> list[dict[str, Any]]:
    """Offline preference pairs (ours or TRL-format) as learner rows; bad rows quarantined."""
    if not cfg.data.offline_pairs:
        return []
    from mmalign.preference_rows import convert_rows

    ranked = cfg.learner.loss == "mdpo"
    rows = convert_rows(
        mio.read_parquet(cfg.data.offline_pairs).to_pylist(),
        load_image=mio.load_image_bytes,
        ranked=ranked,
    )
    for r in rows:  # MDPO batches offline rows with online pairs: one K, 2
        if ranked and not r["error"] and len(r["responses"]) != 2:
            k = len(r["responses"])
            r["error"] = f"responses: mixed MDPO batches rows with online pairs (K = 2); K = {k}"
    bad = [{"id": r["id"], "reason": r["error"]} for r in rows if r["error"]]
    if bad:
        mio.write_jsonl(bad, storage.join(cfg.storage.output_dir, "quarantine_offline.jsonl"))
        print(f"quarantined {len(bad)} offline pairs -> quarantine_offline.jsonl")
    good = [{**r, "source": "offline", "version": -1} for r in rows if not r["error"]]
    what = f"data.offline_pairs {cfg.data.offline_pairs}"
    guard.check(what, len(rows), bad, cfg.data.max_quarantined, usable=len(good))
    return good


def periodic_eval(cfg: Config, learner: Any, step: int) -> dict[str, float]:
    """Export the current policy and run the ShapesWorld evaluation on it (Ray Data)."""
    import ray

    from pipelines.evaluate import run_evaluation

    uri = storage.join(cfg.storage.output_dir, "eval", f"step-{step:06d}", "model")
    ray.get(learner.export_merged.remote(uri))
    report = run_evaluation(cfg, model=uri, max_rows=cfg.pipeline.eval_rows or 50)
    report_uri = storage.join(cfg.storage.output_dir, "eval", f"step-{step:06d}", "report.json")
    storage.write_bytes(report_uri, json.dumps(report, indent=2).encode())
    print(
        f"eval @ step {step}: POPE F1 {report['pope_mean_f1']:.3f} "
        f"CHAIR_i {report['chair']['chair_i']:.3f}",
        flush=True,
    )
    return {"eval_pope_f1": report["pope_mean_f1"], "eval_chair_i": report["chair"]["chair_i"]}


TOTALS = ("pairs", "samples", "judged", "kept", "ties", "bdhs_failed", "two_rejected_steps")


def run(cfg: Config) -> dict[str, Any]:
    """The loop: sample -> judge + pair -> update -> sync, one learner step per loop step.
    With `pipeline.max_staleness >= 1` step t+1's sampling is submitted before step t's
    update (it samples with the weights before that update: lag <= 1)."""
    import ray

    from actors.metrics import MetricsSink

    check_config(cfg)
    storage.use_config(cfg.storage)  # retries of transient storage errors, for this driver
    L, P, out = cfg.learner, cfg.pipeline, cfg.storage.output_dir
    roles, source = start(cfg)
    prog = resume(cfg, roles)
    if isinstance(source, RLOOSource):  # what the source fixed once (reward statistics)
        source.load_state(prog.source_state)
    sink = MetricsSink(cfg.name, None if storage.is_s3(out) else storage.join(out, "tensorboard"))
    prog.busy0, prog.t0 = roles.busy(), time.time()
    overlap = P.max_staleness >= 1
    pending = roles.pool.submit(*_work(source, prog.begin)) if prog.begin < L.steps else []
    for step in range(prog.begin, L.steps):
        t0, more = time.time(), step + 1 < L.steps
        done = roles.pool.collect(pending)  # sample: (rows, version, outputs) per shard
        lag = check_lag(done, prog.version, P.max_staleness)
        pairs, counts = source.pairs(done, step)  # judge + pair
        if isinstance(source, RLOOSource):
            prog.source_state = source.state()
        pending = roles.pool.submit(*_work(source, step + 1)) if more and overlap else []
        queue = len(pending)
        metrics = ray.get(roles.learner.step.remote(pairs)) if pairs else {}  # update
        log = [pair_log(p, step, prog.version) for p in pairs]
        mio.write_jsonl(log, storage.join(out, "pairs", f"step-{step:06d}.jsonl"))
        if (step + 1) % P.sync_every == 0 and pairs:  # sync: a new weight version
            prog.version += 1
            metrics.update(roles.pool.sync(roles.learner.adapter_state.remote(), prog.version))
        if more and not overlap:
            pending = roles.pool.submit(*_work(source, step + 1))
        counts.update(pairs=len(pairs), two_rejected_steps=metrics.get("two_rejected", 0))
        prog.add(counts)
        state = dict(lag=lag, queue=queue, version=prog.version, seconds=time.time() - t0)
        report_step(cfg, sink, source, step, metrics, counts, state)
        after_step(cfg, roles.learner, sink, step, prog)
    return finish(cfg, roles, sink, prog)


@dataclass
class Progress:
    """What the loop carries from step to step; `loop_state` is what a checkpoint keeps."""

    begin: int  # the first step of this run (the resumed step, or 0)
    version: int  # weight version of the learner's latest adapter sync
    totals: dict[str, int]  # TOTALS summed over every step, resumed runs included
    pairs: int = 0  # pairs trained on by this run's loop
    t0: float = 0.0  # wall clock at this run's first step
    busy0: dict[str, list[float]] = field(default_factory=dict)  # busy seconds then
    source_state: dict[str, Any] = field(default_factory=dict)  # e.g. rloo's reward stats

    def add(self, counts: dict[str, Any]) -> None:
        self.totals = {k: self.totals.get(k, 0) + int(counts.get(k, 0)) for k in self.totals}
        self.pairs += int(counts["pairs"])

    def loop_state(self, step: int) -> dict[str, Any]:
        state = {"step": step, "version": self.version, "totals": self.totals}
        return {**state, "source": self.source_state} if self.source_state else state


# ------------------------------------------------------------------ set-up


@dataclass
class Roles:
    """The loop's actors: the sampler pool, one learner, one judge (None in online-bdhs)."""

    pool: SamplerPool
    learner: Any  # actor handles
    judge: Any

    def actors(self) -> list[Any]:
        return [*self.pool.actors, self.learner, *([self.judge] if self.judge is not None else [])]

    def busy(self) -> dict[str, list[float]]:
        """Busy seconds of each live actor, by role (all idle when this is called)."""
        from actors.sampler_pool import busy_seconds

        snap = {"sampler": self.pool.busy(), "learner": busy_seconds([self.learner])}
        if self.judge is not None:
            snap["judge"] = busy_seconds([self.judge])
        return snap


def start(cfg: Config) -> tuple[Roles, PairSource]:
    """Start Ray, read the data, start the roles (waiting for their models to load) and
    pick the mode's pair source."""
    import ray

    from actors.online import JudgeActor, LearnerActor
    from actors.runtime import init_ray
    from actors.sampler_pool import SamplerPool

    init_ray(cfg.pipeline.ray_address)
    L, S, bdhs_mode = cfg.learner, cfg.sampler, cfg.pipeline.mode == "online-bdhs"
    prompts = None if bdhs_mode else read_prompts(cfg)  # online-bdhs: the offline pairs
    offline = load_offline(cfg)
    opts = role_options(cfg)  # CPUs, GPUs + node-type labels per role
    judge = None if bdhs_mode else JudgeActor.options(**opts["judge"]).remote(cfg.judge, cfg.name)
    algo = cfg.pipeline.mode if cfg.pipeline.mode == "ppo" else ""  # PPO: a value head
    learner = LearnerActor.options(**opts["learner"]).remote(S.model, L, S.dtype, cfg.name, algo)
    source = pair_source(cfg, prompts, offline, judge)
    bdhs = cfg.bdhs if bdhs_mode else None
    pool = SamplerPool(S, L, bdhs, cfg.name, opts["sampler"], learner, source.method)
    roles = Roles(pool, learner, judge)
    # surface a failed model load now, not at the first checkpoint
    ray.get([a.__ray_ready__.remote() for a in roles.actors()])
    return roles, source


def pair_source(cfg: Config, prompts: Any, offline: list[dict[str, Any]], judge: Any) -> PairSource:
    """The pair source of `pipeline.mode`; the judge actor is called through a function."""
    import ray

    L, S = cfg.learner, cfg.sampler
    if cfg.pipeline.mode == "online-bdhs":
        return BDHSSource(offline, L.batch_size, S.seed, cfg.bdhs.seed)

    def judge_refs(refs: list[Any], both: list[list[str]]) -> list[dict[str, Any]]:
        return ray.get(judge.judge_refs.remote(refs, both))

    if cfg.pipeline.mode in ("rloo", "ppo"):

        def score_refs(refs: list[Any], texts: list[str]) -> list[float]:
            return ray.get(judge.score_refs.remote(refs, texts))

        return RLOOSource(prompts, score_refs, L.batch_size, S.seed, algo=cfg.pipeline.mode)
    if cfg.pipeline.mode == "mixed":
        return MixedSource(
            prompts, judge_refs, L.batch_size, S.seed, offline, cfg.pipeline.p_offline
        )
    return OnlineSource(prompts, judge_refs, L.batch_size, S.seed)


def read_prompts(cfg: Config) -> Any:
    """`data.prompts` loaded by Ray Data into object-store blocks; the driver keeps refs
    only. Bad rows go to quarantine.jsonl."""
    from operators.prompt_source import read_prompt_source

    out = cfg.storage.output_dir
    source = read_prompt_source(
        cfg.data.prompts,
        cfg.data.image_root,
        cfg.data.max_rows,
        cfg.data.world_seed,
        rows_per_block=cfg.sampler.batch_size,
    )
    if source.quarantine:
        mio.write_jsonl(source.quarantine, storage.join(out, "quarantine.jsonl"))
        print(f"quarantined {len(source.quarantine)} prompt rows -> {out}/quarantine.jsonl")
    total = len(source) + len(source.quarantine)
    what = f"data.prompts {cfg.data.prompts}"
    guard.check(what, total, source.quarantine, cfg.data.max_quarantined, usable=len(source))
    return source


def resume(cfg: Config, roles: Roles) -> Progress:
    """The loop's starting point: the latest complete checkpoint under
    `storage.checkpoints` (any `mmalign.engines.checkpoint` one, this loop's or Ray
    Train's), else a fresh start. Resumed samplers get the checkpoint's adapter."""
    import ray

    uri = checkpoint.latest_checkpoint(cfg.storage.checkpoints) if cfg.storage.resume else ""
    if not uri:
        return Progress(0, 0, dict.fromkeys(TOTALS, 0))
    state = ray.get(roles.learner.load_checkpoint.remote(uri))
    step, version, totals = resume_point(state)
    if version > 0:
        roles.pool.sync(roles.learner.adapter_state.remote(), version)
    print(f"resumed from {uri} at step {step} (weights v{version})")
    return Progress(step, version, totals, source_state=dict(state.get("source") or {}))


def resume_point(state: dict[str, Any]) -> tuple[int, int, dict[str, int]]:
    """(step, weight version, totals) of a checkpoint's loop state. A Ray Train checkpoint
    holds no weight version or totals: its trained adapter counts as version 1."""
    step = int(state["step"])
    version = int(state.get("version", 1 if step else 0))
    return step, version, {**dict.fromkeys(TOTALS, 0), **state.get("totals", {})}


# ------------------------------------------------------------------ per step


def _work(source: PairSource, step: int) -> tuple[list[dict[str, Any]], Any]:
    """SamplerPool.submit's arguments for `step`: the rows and their call arguments."""
    return source.examples(step), lambda shard: source.shard_args(shard, step)


def check_lag(done: list, version: int, max_staleness: int) -> int:
    """The step's largest version lag; over `max_staleness` is a bug of the pacing."""
    lag = max((online.staleness(v, version) for _, v, _ in done), default=0)
    if lag > max_staleness:
        raise RuntimeError(f"samples are {lag} versions old (max {max_staleness})")
    return lag


def report_step(
    cfg: Config,
    sink: Any,
    source: PairSource,
    step: int,
    metrics: dict[str, float],
    counts: dict[str, Any],
    state: dict[str, Any],
) -> None:
    """The step's metrics to the sink; every `pipeline.log_every` steps one printed line."""
    dt, version, lag = state["seconds"], state["version"], state["lag"]
    values = {
        **{k: float(v) for k, v in metrics.items()},
        "pairs": counts["pairs"],
        "samples": counts["samples"],
        "samples_per_s": counts["samples"] / dt,
        "pairs_per_s": counts["pairs"] / dt,
        "version_lag": lag,
        "queue_depth": state["queue"],
        "weight_version": version,
        **source.rates(counts),
    }
    sink.log(step, values)
    if (step + 1) % cfg.pipeline.log_every == 0:
        update = (
            f"loss {values['loss']:.4f} margin {values.get('reward_margin', 0.0):.4f} "
            if "loss" in values
            else "no update (no pairs) "
        )
        print(
            f"step {step + 1}/{cfg.learner.steps} pairs {counts['pairs']} "
            f"{source.describe(counts)}{update}v{version} lag {lag} {dt:.1f}s",
            flush=True,
        )


def after_step(cfg: Config, learner: Any, sink: Any, step: int, progress: Progress) -> None:
    """Periodic evaluation (not at the last step: finish() evaluates) and the checkpoint
    (every `storage.checkpoint_every` steps and at the end) with the loop's state."""
    import ray

    done, steps = step + 1, cfg.learner.steps
    if cfg.pipeline.eval_every and done % cfg.pipeline.eval_every == 0 and done < steps:
        sink.log(step, periodic_eval(cfg, learner, done))
    if done % cfg.storage.checkpoint_every == 0 or done == steps:
        uri = checkpoint.step_dir(cfg.storage.checkpoints, done)
        ray.get(learner.save_checkpoint.remote(uri, progress.loop_state(done)))


# ------------------------------------------------------------------ the end


def finish(cfg: Config, roles: Roles, sink: Any, progress: Progress) -> dict[str, Any]:
    """Busy fractions, the merged policy, the final evaluation and summary.json."""
    import ray

    from actors.metrics import busy_fractions

    L, out, wall = cfg.learner, cfg.storage.output_dir, time.time() - progress.t0
    fractions = busy_fractions(progress.busy0, roles.busy(), wall)
    sink.log(L.steps, {f"{role}_busy_fraction": f for role, f in fractions.items()})
    sink.close()
    merged = ray.get(roles.learner.export_merged.remote(storage.join(out, "merged")))
    summary: dict[str, Any] = {
        "mode": cfg.pipeline.mode,
        "steps": L.steps,
        "weight_version": progress.version,
        "totals": progress.totals,
        "merged": merged,
        # this run's loop only (a resumed run counts its own steps)
        "loop": {
            "steps": L.steps - progress.begin,
            "wall_s": round(wall, 3),
            "pairs_per_s": round(progress.pairs / wall, 4) if wall > 0 else 0.0,
            "busy_fraction": {role: round(f, 4) for role, f in fractions.items()},
        },
    }
    summary["judge"] = {"tie_rate": round(online.tie_rate(progress.totals), 4)}
    if cfg.pipeline.eval_rows > 0:
        summary["eval"] = final_eval(cfg, merged)
        summary["base_eval"] = final_eval(cfg, cfg.sampler.model, "base_report.json")
    storage.write_bytes(storage.join(out, "summary.json"), json.dumps(summary, indent=2).encode())
    print(json.dumps(summary))
    if "eval" in summary:
        print(format_comparison(summary["base_eval"], summary["eval"]))
    if hint := online.tie_hint(progress.totals):
        print(f"note: {hint}")
    return summary


def final_eval(cfg: Config, model: str, name: str = "report.json") -> dict[str, float]:
    """Evaluation of `model` to eval/<name>; its headline figures (CHAIR_i, CHAIR_s,
    Recall, POPE F1). The base policy's report is kept, so a resumed run reuses it."""
    from pipelines.evaluate import run_evaluation

    uri = storage.join(cfg.storage.output_dir, "eval", name)
    if model == cfg.sampler.model and storage.exists(uri):
        cached = json.loads(storage.read_bytes(uri))
        if cached.get("model") == model and cached.get("n_images") == cfg.pipeline.eval_rows:
            return headline(cached)
    report = run_evaluation(cfg, model=model, max_rows=cfg.pipeline.eval_rows)
    storage.write_bytes(uri, json.dumps(report, indent=2).encode())
    return headline(report)


def pair_log(pair: dict[str, Any], step: int, version: int) -> dict[str, Any]:
    """One line of pairs/step-*.jsonl: identity, weight version, lag and the texts."""
    row = {
        "id": pair["id"],
        "source": pair["source"],
        "version": pair["version"],
        "step": step,
        "lag": version - pair["version"] if pair["version"] >= 0 else None,
    }
    if "samples" in pair:  # mode rloo: k samples and their rewards (raw and normalised)
        row.update(samples=pair["samples"], rewards=pair["raw_rewards"])
        row["normalized_rewards"] = pair["rewards"]
        return row
    row.update(
        chosen=pair["chosen"],
        rejected=pair["rejected"],
        rejected_extra=list(pair.get("rejected_extra") or []),
    )
    if "bdhs_similarity" in pair:
        row["bdhs_similarity"] = pair["bdhs_similarity"]
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse_args(argv, description=__doc__)
    try:
        check_config(cfg)
        return run(cfg)
    except (ConfigError, guard.QuarantineError) as err:
        raise SystemExit(f"online_dpo.py: error: {err}") from None
    except Exception as err:  # Ray wraps a sampler's SystematicFailure (online-bdhs)
        failure = guard.find_systematic(err)
        if failure is None:
            raise
        raise SystemExit(f"online_dpo.py: error: {failure}") from None


if __name__ == "__main__":
    main()
