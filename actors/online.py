"""Thin Ray actors of the online loop: each wraps one Ray-free engine and only dispatches.

Settings arrive as the frozen config sections (pickled by Ray), never through environment
variables read on both sides of the boundary.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import ray

from actors.metrics import BusyTimer
from mmalign.config import (
    BDHSConfig,
    JudgeConfig,
    LearnerConfig,
    SamplerConfig,
    parse_resources,
)
from mmalign.rows import LearnerRow, OnlinePair, RowRef, resolve_pairs, resolve_rows


def _device(num_gpus: float) -> str:
    import torch

    return "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"


def _threads() -> None:
    # A CPU actor gets ~1 core worth of work on small boxes: avoid oversubscription.
    import torch

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))


def actor_options(num_cpus: float, num_gpus: float, resources: str = "") -> dict[str, Any]:
    """`.options(**...)` of one role's actors: CPUs, GPUs and the custom resource labels
    (config `resources`, e.g. 'sampler_node:0.01') that pin the role to its node type."""
    return {"num_cpus": num_cpus, "num_gpus": num_gpus, "resources": parse_resources(resources)}


def _timer(role: str, run_name: str) -> BusyTimer:
    return BusyTimer(role, run_name, f"{role}-{ray.get_runtime_context().get_actor_id()[:8]}")


@ray.remote
class SamplerActor:
    """Policy sampler: base weights + the learner's LoRA, versioned, on `sampler.engine` (hf or
    vllm). With `bdhs` set it also regenerates BDHS rejected answers under the same weights
    (mode online-bdhs)."""

    def __init__(
        self,
        sampler: SamplerConfig,
        learner: LearnerConfig,
        bdhs: BDHSConfig | None = None,
        run_name: str = "",
    ) -> None:
        _threads()
        from mmalign.engines.policy import PolicySampler
        from mmalign.models.loading import load_model

        if sampler.engine == "vllm":  # fail before loading the model
            from mmalign.engines.vllm_generation import require_vllm

            require_vllm()
        device = _device(sampler.num_gpus)
        model, processor = load_model(sampler.model, sampler.dtype, device)
        self.cfg = sampler
        vllm: dict[str, Any] = {}
        if sampler.engine == "vllm":  # this actor owns the model: keep its embedding side only
            vllm = {"gpu_memory_utilization": sampler.vllm_gpu_memory, "keep_language_model": False}
        self.policy = PolicySampler(model, processor, learner, engine=sampler.engine, **vllm)
        self.online_bdhs: Any = None
        if bdhs is not None:
            from mmalign.engines import online_bdhs

            self.online_bdhs = online_bdhs.from_config(self.policy, sampler, bdhs, device)
        self.timer = _timer("sampler", run_name)

    def sample(
        self, prompts: Sequence[str], images: Sequence[Any], seed: int
    ) -> tuple[int, list[list[str]]]:
        """(weight version used, k responses per prompt)."""
        from mmalign.engines.hf_generation import SamplingSettings

        settings = SamplingSettings.for_sampler(self.cfg)
        with self.timer.work():
            version = self.policy.version
            out = self.policy.sample(prompts, images, self.cfg.samples_per_prompt, settings, seed)
        return version, out

    def sample_refs(self, refs: Sequence[RowRef], seed: int) -> tuple[int, list[list[str]]]:
        """`sample` on prompt rows given as mmalign.rows.RowRef: the rows are read from the
        object store here, never through the driver."""

        rows = resolve_rows(refs)
        return self.sample([r["prompt"] for r in rows], [r["images"][0] for r in rows], seed)

    def bdhs(
        self,
        prompts: Sequence[str],
        images: Sequence[Any],
        references: Sequence[str],
        seeds: Sequence[int],
    ) -> tuple[int, list[dict[str, Any]]]:
        """(weight version used, one OnlineBDHSResult dict per row): y- under this policy."""
        if self.online_bdhs is None:
            raise RuntimeError("this sampler was started without a BDHS config")
        with self.timer.work():
            version = self.policy.version
            out = self.online_bdhs.rejected(prompts, images, references, seeds)
        return version, [asdict(r) for r in out]

    def load_adapter(self, state: Mapping[str, Any], version: int) -> dict[str, Any]:
        with self.timer.work():
            return self.policy.load_adapter(state, version)

    def version(self) -> tuple[int, str]:
        return self.policy.version, self.policy.digest

    def busy(self) -> dict[str, Any]:
        return self.timer.stats()


# Stateless: Ray restarts a dead judge (process killed, node lost) and re-sends the verdict
# calls in flight, so the loop only waits a model load.
@ray.remote(max_restarts=3, max_task_retries=3)
class JudgeActor:
    """The annotator (VLM both orders, or object-grounded) as an actor."""

    def __init__(self, judge: JudgeConfig, run_name: str = "") -> None:
        _threads()
        from mmalign.engines.judge_engine import JudgeEngine

        self.engine = JudgeEngine.from_config(judge)
        self.timer = _timer("judge", run_name)

    def judge(self, rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        with self.timer.work():
            return self.engine.judge(rows)

    def judge_refs(
        self, refs: Sequence[RowRef], responses: Sequence[Sequence[str]]
    ) -> list[dict[str, Any]]:
        """Verdicts on each row's two responses (resp[0] vs resp[1]); rows arrive as RowRefs
        (one per comparison, repeats allowed) and are resolved here (image and objects come
        from the object store)."""

        rows = resolve_rows(refs)
        return self.judge(
            [
                {
                    "image": r["images"][0],
                    "question": r["prompt"],
                    "response_a": resp[0],
                    "response_b": resp[1],
                    "objects": r["objects"],
                }
                for r, resp in zip(rows, responses, strict=True)
            ]
        )

    def score_refs(self, refs: Sequence[RowRef], responses: Sequence[str]) -> list[float]:
        """One reward per response (mode rloo); rows arrive as RowRefs, resolved here."""
        rows = resolve_rows(refs)
        with self.timer.work():
            return self.engine.score(
                [
                    {
                        "image": r["images"][0],
                        "question": r["prompt"],
                        "response": text,
                        "objects": r["objects"],
                    }
                    for r, text in zip(rows, responses, strict=True)
                ]  # fmt: skip
            )

    def busy(self) -> dict[str, Any]:
        return self.timer.stats()


@ray.remote
class LearnerActor:
    """Preference learner; writes its own checkpoints so weights never pass the driver."""

    def __init__(
        self, model: str, learner: LearnerConfig, dtype: str, run_name: str = "", algo: str = ""
    ) -> None:
        _threads()
        from mmalign.engines.rl_learner import PPOLearner, RLOOLearner
        from mmalign.models.loading import load_model

        device = "cuda" if learner.use_gpu else "cpu"
        base, processor = load_model(model, dtype, device)
        # PPO adds a value head to the learner's state; the others are PreferenceLearners
        cls = PPOLearner if algo == "ppo" else RLOOLearner
        self.learner = cls(base, processor, learner)
        self.processor = processor
        self.timer = _timer("learner", run_name)

    def step(self, rows: Sequence[OnlinePair | LearnerRow]) -> dict[str, float]:
        """The learner's metrics (`two_rejected` included: 1.0 when the batch used the
        two-rejected loss)."""
        resolved = resolve_pairs(rows)  # online pairs carry RowRefs, not image bytes
        with self.timer.work():
            if resolved and "samples" in resolved[0]:  # rloo / ppo: rewards come normalised
                s = self.learner.settings
                if resolved[0].get("algo") == "ppo":
                    return self.learner.ppo_step(  # type: ignore[attr-defined]
                        resolved, s.kl_coef, s.ppo_clip, s.ppo_clip, s.ppo_vf_coef,
                        s.ppo_gamma, s.ppo_lambda, s.ppo_epochs,
                    )  # fmt: skip
                return self.learner.rloo_step(resolved, 0.0, 1.0, s.kl_coef)
            return self.learner.step(resolved)

    def adapter_state(self) -> dict[str, Any]:
        with self.timer.work():
            return self.learner.adapter_state()

    def busy(self) -> dict[str, Any]:
        return self.timer.stats()

    def save_checkpoint(self, uri: str, loop_state: Mapping[str, Any]) -> str:
        """Write this learner's checkpoint (`mmalign.engines.checkpoint` layout) with the
        driver's `loop_state` to `uri`, here: the weights never pass through the driver."""
        from mmalign.engines import checkpoint

        return checkpoint.save(uri, self.learner, loop_state)

    def load_checkpoint(self, uri: str) -> dict[str, Any]:
        """Restore the checkpoint at `uri` (this loop's or Ray Train's); its loop state."""
        from mmalign.engines import checkpoint

        return checkpoint.load(uri, self.learner)

    def export_merged(self, uri: str) -> str:
        """Save the LoRA-merged model + processor (HF format) for serving/evaluation; merges
        a copy, since training may go on (periodic evals)."""
        from mmalign.engines import checkpoint

        return checkpoint.export_merged(self.learner, uri)
