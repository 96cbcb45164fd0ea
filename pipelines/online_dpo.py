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
from the object store themselves. A dead sampler's shard is re-sent, same refs, to its
replacement. Mode online-bdhs and the offline pairs of mode mixed are still read on the
driver (`load_offline`) and sent to the actors by value.

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

Outputs under `storage.output_dir`: checkpoints (resume by rerunning the same command),
`pairs/step-*.jsonl` (every pair trained on, with id, version and lag), TensorBoard logs,
`merged/` (the final policy, HF format) and `eval/report.json`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python pipelines/x.py` anywhere

from mmalign import io as mio  # noqa: E402
from mmalign import online, storage  # noqa: E402
from mmalign.config import Config, ConfigError, check_bdhs_engine, parse_args  # noqa: E402


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


class Checkpoints:
    """<ckpt>/step-NNNNNN/{learner.pt, adapter/, driver.json} and <ckpt>/latest."""

    def __init__(self, root: str) -> None:
        self.root = root

    def latest(self) -> dict[str, Any] | None:
        pointer = storage.join(self.root, "latest")
        if not storage.exists(pointer):
            return None
        name = storage.read_bytes(pointer).decode().strip()
        state = json.loads(storage.read_bytes(storage.join(self.root, name, "driver.json")))
        return {**state, "uri": storage.join(self.root, name)}

    def save(self, learner: Any, step: int, state: dict[str, Any]) -> str:
        import ray

        name = f"step-{step:06d}"
        uri = storage.join(self.root, name)
        ray.get(learner.save_checkpoint.remote(uri))
        storage.write_bytes(storage.join(uri, "driver.json"), json.dumps(state).encode())
        storage.write_bytes(storage.join(self.root, "latest"), name.encode())  # commit point
        return uri


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
    if not good:
        raise ConfigError(f"data.offline_pairs: no usable pairs in {cfg.data.offline_pairs}")
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


def judged_pairs(
    judge: Any, done: list, step: int, cfg: Config, offline: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Modes online/mixed: the judge compares each prompt's samples in disjoint pairs
    (`online.candidate_pairs`: (1, 2), (3, 4), ...; both orders) and the first pair it keeps
    trains; in mode mixed the slots drawn offline in submit() are filled from the dataset.
    Rows in `done` are stubs (id + RowRef): pairs carry the RowRef, resolved by the learner."""
    import ray

    judged = [(r, resp, v) for shard, v, samples in done for r, resp in zip(shard, samples)]
    cands = [online.candidate_pairs(len(resp)) for _, resp, _ in judged]
    # rows are stubs holding RowRefs: the judge reads image/prompt/objects itself
    refs = [r["images"][0] for (r, _, _), c in zip(judged, cands) for _ in c]
    both = [[resp[i], resp[j]] for (_, resp, _), c in zip(judged, cands) for i, j in c]
    verdicts = ray.get(judge.judge_refs.remote(refs, both))
    it = iter(verdicts)
    pairs = [
        online.first_kept_pair(r, resp, [next(it) for _ in c], step=step, version=v)
        for (r, resp, v), c in zip(judged, cands)
    ]
    pairs = [p for p in pairs if p is not None]
    if cfg.pipeline.mode == "mixed":
        n_off = cfg.learner.batch_size - len(judged)
        picks = online.batch_indices(
            len(offline), cfg.learner.batch_size, step, cfg.sampler.seed + 1
        )
        pairs += [offline[i] for i in picks[:n_off]]
    counts = {
        "samples": sum(len(resp) for _, resp, _ in judged),
        "judged": len(verdicts),
        "kept": sum(bool(v.get("kept")) for v in verdicts),
        "ties": sum(v.get("reason") == "tie" for v in verdicts),
    }
    return pairs, counts


def bdhs_pairs(done: list, step: int) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Mode online-bdhs: dataset chosen + dataset rejected + the policy's fresh BDHS y-."""
    pairs, failed = [], 0
    for shard, version, results in done:
        for row, res in zip(shard, results, strict=True):
            pair = online.bdhs_pair(row, res, step=step, version=version)
            failed += pair is None
            pairs += [pair] if pair is not None else []
    return pairs, {"samples": sum(len(shard) for shard, _, _ in done), "bdhs_failed": failed}


TOTALS = ("pairs", "samples", "judged", "kept", "ties", "bdhs_failed", "two_rejected_steps")


def run(cfg: Config) -> dict[str, Any]:
    import ray

    from actors.metrics import MetricsSink, busy_fractions
    from actors.online import JudgeActor, LearnerActor, SamplerActor
    from actors.runtime import init_ray
    from operators.prompt_source import read_prompt_source

    check_config(cfg)
    init_ray(cfg.pipeline.ray_address)
    L, S, P = cfg.learner, cfg.sampler, cfg.pipeline
    use_bdhs = P.mode == "online-bdhs"
    out = cfg.storage.output_dir
    source = None
    if not use_bdhs:  # online-bdhs draws its prompts from the offline pairs
        # Ray Data loads the prompt rows into the object store; we keep only refs.
        source = read_prompt_source(
            cfg.data.prompts,
            cfg.data.image_root,
            cfg.data.max_rows,
            cfg.data.world_seed,
            rows_per_block=S.batch_size,
        )
        if source.quarantine:
            mio.write_jsonl(source.quarantine, storage.join(out, "quarantine.jsonl"))
            print(f"quarantined {len(source.quarantine)} prompt rows -> {out}/quarantine.jsonl")
        if not len(source):
            raise ConfigError(f"data.prompts: no usable prompt rows in {cfg.data.prompts}")
    offline = load_offline(cfg)
    opts = role_options(cfg)  # CPUs, GPUs + node-type labels per role
    res = opts["sampler"]
    bdhs_cfg = cfg.bdhs if use_bdhs else None
    samplers = [
        SamplerActor.options(name=f"{cfg.name}-sampler-{j}", **res).remote(S, L, bdhs_cfg, cfg.name)
        for j in range(S.concurrency)
    ]
    judge = None
    if not use_bdhs:
        judge = JudgeActor.options(**opts["judge"]).remote(cfg.judge, cfg.name)
    learner = LearnerActor.options(**opts["learner"]).remote(S.model, L, S.dtype, cfg.name)
    # surface a failed model load now, not at the first checkpoint
    roles = [*samplers, learner, *([judge] if judge else [])]
    ray.get([a.__ray_ready__.remote() for a in roles])
    ckpts = Checkpoints(cfg.storage.checkpoints)
    start, version, totals = 0, 0, dict.fromkeys(TOTALS, 0)
    resumed = ckpts.latest() if cfg.storage.resume else None
    if resumed:
        ray.get(learner.load_checkpoint.remote(resumed["uri"]))
        start, version = resumed["step"], resumed["version"]
        totals = {**totals, **resumed["totals"]}
        if version > 0:
            state = learner.adapter_state.remote()
            ray.get([s.load_adapter.remote(state, version) for s in samplers])
        print(f"resumed from {resumed['uri']} at step {start} (weights v{version})")
    tb = storage.join(out, "tensorboard") if not storage.is_s3(out) else None
    sink = MetricsSink(cfg.name, tb)

    def submit(step: int) -> list[tuple[int, list[dict[str, Any]], tuple, Any]]:
        """Shard this step's examples: (sampler index, rows, call args, ref) per shard.

        In mode 'mixed' the offline slots (probability p) are not sampled at all."""
        if use_bdhs:
            batch = [
                offline[i] for i in online.batch_indices(len(offline), L.batch_size, step, S.seed)
            ]
        else:
            assert source is not None
            idx = online.batch_indices(len(source), L.batch_size, step, S.seed)
            if P.mode == "mixed":
                offline_slot = online.mixed_choices(len(idx), P.p_offline, S.seed, step)
                idx = [i for i, off in zip(idx, offline_slot) if not off]
            # stubs: id + a RowRef as the image; actors resolve the row (prompt, image)
            batch = [
                {"id": source.ids[i], "prompt": "", "images": [ref]}
                for i, ref in zip(idx, source.refs(idx), strict=True)
            ]
        shards = [batch[j :: len(samplers)] for j in range(len(samplers))]
        todo = [(j, shard, call_args(shard, step)) for j, shard in enumerate(shards) if shard]
        return [(j, shard, args, call(j, args)) for j, shard, args in todo]

    def call_args(shard: list[dict[str, Any]], step: int) -> tuple:
        """Arguments of the sampler call, fixed per (shard, step) so a retry repeats it."""
        if use_bdhs:
            prompts = [r["prompt"] for r in shard]
            seeds = [online.bdhs_row_seed(cfg.bdhs.seed, step, str(r["id"])) for r in shard]
            return prompts, [r["image"] for r in shard], [r["chosen"] for r in shard], seeds
        return [r["images"][0] for r in shard], S.seed + step  # RowRefs, resolved remotely

    def call(j: int, args: tuple) -> Any:
        return (samplers[j].bdhs if use_bdhs else samplers[j].sample_refs).remote(*args)

    def replace(j: int) -> None:
        """A fresh sampler in slot j holding the current weight version."""
        print(f"sampler {j} died; replacing it (weights v{version})", flush=True)
        samplers[j] = SamplerActor.options(**res).remote(S, L, bdhs_cfg, cfg.name)  # unnamed
        if version > 0:
            ray.get(samplers[j].load_adapter.remote(learner.adapter_state.remote(), version))

    def collect(pending: list) -> list[tuple[list[dict[str, Any]], int, list]]:
        """(rows, weight version, outputs) per shard; a sampler that died is replaced and the
        shard asked again. The replacement holds the current weights, so its outputs carry
        version `version`; a shard's pairs come only from the one answer that arrives."""
        results = []
        for j, shard, args, ref in pending:
            for attempt in range(3):
                try:
                    got_version, outputs = ray.get(ref)
                    break
                except ray.exceptions.RayActorError:
                    if attempt == 2:
                        raise
                    replace(j)
                    ref = call(j, args)
            results.append((shard, got_version, outputs))
        return results

    def sync(state: Any) -> list[dict[str, Any]]:
        """Send the adapter to every sampler as `version`; dead samplers are replaced."""
        stats = []
        for j in range(len(samplers)):
            try:
                stats.append(ray.get(samplers[j].load_adapter.remote(state, version)))
            except ray.exceptions.RayActorError:
                replace(j)
        return stats

    def busy() -> dict[str, list[float]]:
        """Busy seconds of each live actor, by role (all idle when this is called)."""
        by_role = {"sampler": samplers, "learner": [learner], "judge": [judge] if judge else []}
        snap = {}
        for role, actors in by_role.items():
            if actors:
                refs = [a.busy.remote() for a in actors]
                snap[role] = [_busy_s(ref) for ref in refs]
        return snap

    busy0, t_loop, loop_pairs = busy(), time.time(), 0
    pending = submit(start) if start < L.steps else []
    for step in range(start, L.steps):
        t0 = time.time()
        done = collect(pending)  # (rows, version, outputs) per shard
        lag = max((online.staleness(v, version) for _, v, _ in done), default=0)
        if lag > P.max_staleness:
            raise RuntimeError(f"samples are {lag} versions old (max {P.max_staleness})")
        if use_bdhs:
            pairs, counts = bdhs_pairs(done, step)
        else:
            pairs, counts = judged_pairs(judge, done, step, cfg, offline)
        queue = 0
        if step + 1 < L.steps and P.max_staleness >= 1:
            pending = submit(step + 1)  # overlaps with this learner step (lag <= 1)
            queue = len(pending)
        metrics = ray.get(learner.step.remote(pairs)) if pairs else {}
        mio.write_jsonl(
            [pair_log(p, step, version) for p in pairs],
            storage.join(out, "pairs", f"step-{step:06d}.jsonl"),
        )
        if (step + 1) % P.sync_every == 0 and pairs:
            version += 1
            synced = sync(learner.adapter_state.remote()) or [{"bytes": 0.0, "seconds": 0.0}]
            metrics["sync_bytes"] = synced[0]["bytes"]
            metrics["sync_seconds"] = max(x["seconds"] for x in synced)
        if step + 1 < L.steps and P.max_staleness < 1:
            pending = submit(step + 1)
        counts = {
            **counts,
            "pairs": len(pairs),
            "two_rejected_steps": metrics.get("two_rejected", 0),
        }
        totals = {k: totals.get(k, 0) + int(counts.get(k, 0)) for k in totals}
        loop_pairs += len(pairs)
        dt = time.time() - t0
        judged = max(1, counts.get("judged", 0))
        values = {
            **{k: float(v) for k, v in metrics.items()},
            "pairs": len(pairs),
            "samples": counts["samples"],
            "samples_per_s": counts["samples"] / dt,
            "pairs_per_s": len(pairs) / dt,
            "version_lag": lag,
            "queue_depth": queue,
            "weight_version": version,
        }
        if not use_bdhs:
            values["judge_agreement"] = counts["kept"] / judged
            values["judge_tie_rate"] = counts["ties"] / judged
        sink.log(step, values)
        if (step + 1) % P.log_every == 0:
            print(
                f"step {step + 1}/{L.steps} pairs {len(pairs)} "
                + (f"bdhs failed {counts['bdhs_failed']} " if use_bdhs else "")
                + (f"kept {counts['kept']}/{counts['judged']} " if not use_bdhs else "")
                + (
                    f"loss {values['loss']:.4f} margin {values.get('reward_margin', 0.0):.4f} "
                    if "loss" in values
                    else "no update (no pairs) "
                )
                + f"v{version} lag {lag} "
                f"{dt:.1f}s",
                flush=True,
            )
        if P.eval_every and (step + 1) % P.eval_every == 0 and step + 1 < L.steps:
            sink.log(step, periodic_eval(cfg, learner, step + 1))
        if (step + 1) % cfg.storage.checkpoint_every == 0 or step + 1 == L.steps:
            ckpts.save(learner, step + 1, {"step": step + 1, "version": version, "totals": totals})
    wall = time.time() - t_loop
    fractions = busy_fractions(busy0, busy(), wall)
    sink.log(L.steps, {f"{role}_busy_fraction": f for role, f in fractions.items()})
    sink.close()
    merged = ray.get(learner.export_merged.remote(storage.join(out, "merged")))
    summary = {
        "mode": P.mode,
        "steps": L.steps,
        "weight_version": version,
        "totals": totals,
        "merged": merged,
        # this run's loop only (a resumed run counts its own steps)
        "loop": {
            "steps": L.steps - start,
            "wall_s": round(wall, 3),
            "pairs_per_s": round(loop_pairs / wall, 4) if wall > 0 else 0.0,
            "busy_fraction": {role: round(f, 4) for role, f in fractions.items()},
        },
    }
    if P.eval_rows > 0:
        from pipelines.evaluate import run_evaluation

        report = run_evaluation(cfg, model=merged, max_rows=P.eval_rows)
        storage.write_bytes(
            storage.join(out, "eval", "report.json"), json.dumps(report, indent=2).encode()
        )
        summary["eval"] = {
            "pope_mean_f1": report["pope_mean_f1"],
            "chair_i": report["chair"]["chair_i"],
        }
    storage.write_bytes(storage.join(out, "summary.json"), json.dumps(summary, indent=2).encode())
    print(json.dumps(summary))
    return summary


def pair_log(pair: dict[str, Any], step: int, version: int) -> dict[str, Any]:
    """One line of pairs/step-*.jsonl: identity, weight version, lag and the texts."""
    row = {
        "id": pair["id"],
        "source": pair["source"],
        "version": pair["version"],
        "step": step,
        "lag": version - pair["version"] if pair["version"] >= 0 else None,
        "chosen": pair["chosen"],
        "rejected": pair["rejected"],
        "rejected_extra": list(pair.get("rejected_extra") or []),
    }
    if "bdhs_similarity" in pair:
        row["bdhs_similarity"] = pair["bdhs_similarity"]
    return row


def _busy_s(ref: Any) -> float:
    import ray

    try:
        return float(ray.get(ref)["busy_s"])
    except ray.exceptions.RayActorError:  # a sampler that died after its last call
        return 0.0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse_args(argv, description=__doc__)
    try:
        check_config(cfg)
    except ConfigError as err:
        raise SystemExit(f"online_dpo.py: error: {err}") from None
    return run(cfg)


if __name__ == "__main__":
    main()
