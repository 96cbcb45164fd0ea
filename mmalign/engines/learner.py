"""Preference learner engine: one LLaVA policy trained with LoRA on DPO/IPO/SLiC/MDPO losses.

A plain class (no Ray): it owns the model, the optimizer and the schedule, turns rows of plain
strings into one forward batch (`mmalign.logprobs`) and applies the pure losses
(`mmalign.losses`). The Ray Train actor wraps it later.

Rows are dicts {"image": PNG bytes | PIL, "prompt": str, "chosen": str, "rejected": str,
optional "rejected_extra": [str] (two-rejected loss, [ALIGN] Eq. 5), optional "responses":
[str, ...] ranked best-first (MDPO)}.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from mmalign.logprobs import build_response_batch, model_response_logps, split_groups
from mmalign.losses import (
    LOSS_NAMES,
    PairLossOutput,
    chosen_nll,
    mdpo_loss,
    pairwise_accuracy,
    preference_loss,
    two_rejected_loss,
)
from mmalign.rows import LearnerRow

_LLM_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LearnerSettings:
    """Settings of the preference learner (moves into mmalign.config later)."""

    loss: Literal["dpo", "ipo", "slic", "mdpo"] = "dpo"
    """Preference loss. "mdpo" ranks a row's "responses" (best first), or its [chosen,
    rejected] pair as K = 2; rows with "rejected_extra" need a pair loss."""
    beta: float = 0.1
    """Loss temperature (DPO/MDPO beta, IPO tau, SLiC hinge scale); > 0."""
    gamma: float = 0.5
    """Weight of the primary rejected response in the two-rejected loss; in [0, 1]."""
    rpo_alpha: float = 0.0
    """Weight of the per-token NLL of the chosen answer added to the loss (RPO); >= 0."""
    lora_rank: int = 128
    """LoRA rank on the language model ([ALIGN] App. A: 128)."""
    lora_alpha: int = 256
    """LoRA alpha ([ALIGN] App. A: 256); the update is scaled by alpha / rank."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input path only (the base model's own dropout is untouched)."""
    lora_target_modules: tuple[str, ...] = _LLM_LINEAR
    """Linear-layer names that get LoRA, matched only inside the language model (the CLIP
    tower has q_proj/k_proj/v_proj too and must stay frozen)."""
    learning_rate: float = 1e-6
    """Peak learning rate of the LoRA weights ([ALIGN] grid: 1e-7, 5e-7, 1e-6, 5e-6)."""
    train_projector: bool = False
    """Also train the multimodal projector (fully, not LoRA)."""
    projector_learning_rate: float | None = None
    """Peak learning rate of the projector; None means `learning_rate`."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_accum_steps: int = 1
    """Micro-batches (calls of `step`) per optimizer step."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this before each optimizer step; None disables."""
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    """After warmup: cosine decay to 0 at `total_steps`, or constant."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup from 0 to the peak rate."""
    total_steps: int = 1000
    """Optimizer steps of the whole run (cosine horizon)."""
    reference: Literal["adapters_off", "separate"] = "adapters_off"
    """Reference log-probs from the policy with LoRA (and projector copy) disabled (no extra
    memory), or from a separate frozen model (a deep copy of the base unless one is given)."""
    bf16_autocast: bool = True
    """bf16 autocast for forwards; only ever applied on CUDA."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (for 7B-size models)."""
    padding_side: Literal["left", "right"] = "right"
    """Batch padding side; log-probs do not depend on it (explicit position_ids)."""
    max_response_tokens: int | None = None
    """Truncate each response to this many tokens (incl. EOS); None keeps all."""
    seed: int = 0
    """Seed of the LoRA initialisation."""

    def __post_init__(self) -> None:
        checks = {
            "loss": self.loss in (*LOSS_NAMES, "mdpo"),
            "beta": self.beta > 0,
            "gamma": 0.0 <= self.gamma <= 1.0,
            "rpo_alpha": self.rpo_alpha >= 0.0,
            "lora_rank": self.lora_rank > 0,
            "lora_dropout": 0.0 <= self.lora_dropout < 1.0,
            "learning_rate": self.learning_rate >= 0,
            "grad_accum_steps": self.grad_accum_steps >= 1,
            "lr_schedule": self.lr_schedule in ("cosine", "constant"),
            "warmup_steps": self.warmup_steps >= 0,
            "total_steps": self.total_steps >= 1,
            "reference": self.reference in ("adapters_off", "separate"),
            "padding_side": self.padding_side in ("left", "right"),
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"LearnerSettings.{name}: invalid value {getattr(self, name)!r}")

    @classmethod
    def from_config(cls, cfg: Any, **extra: Any) -> LearnerSettings:
        """Map `mmalign.config.LearnerConfig` onto these settings (until the two merge).

        projector_lr 0 means a frozen projector; max_grad_norm 0 means no clipping. `extra`
        sets fields the config does not have yet (gradient_checkpointing, padding_side,
        max_response_tokens, weight_decay, bf16_autocast).
        """
        return cls(
            loss=cfg.loss,
            beta=cfg.beta,
            gamma=cfg.gamma,
            rpo_alpha=cfg.rpo_alpha,
            lora_rank=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            lora_target_modules=tuple(cfg.lora_targets),
            learning_rate=cfg.lr,
            train_projector=cfg.projector_lr > 0,
            projector_learning_rate=cfg.projector_lr if cfg.projector_lr > 0 else None,
            grad_accum_steps=cfg.grad_accum,
            max_grad_norm=cfg.max_grad_norm if cfg.max_grad_norm > 0 else None,
            lr_schedule=cfg.schedule,
            warmup_steps=cfg.warmup_steps,
            total_steps=cfg.steps,
            reference=cfg.reference.replace("-", "_"),
            seed=cfg.seed,
            **extra,
        )


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based).

    Linear warmup (step+1)/warmup over the first `warmup_steps`; then 1 (constant) or
    0.5 * (1 + cos(pi * progress)) with progress = (step - warmup) / (total - warmup).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def rows_to_responses(rows: Sequence[Mapping[str, Any]], loss: str) -> tuple[list[list[str]], str]:
    """Per-row response lists and the batch kind ("pair" | "two_rejected" | "ranked").

    two_rejected rows are [chosen, rejected, extra]; a row without an extra in a batch that
    has some repeats its rejected as the extra, which makes its loss the plain pair loss.
    MDPO takes a row's `responses` ranking, or [chosen, rejected] (K = 2) when it has none
    (online pairs, plain preference sets).
    """
    if loss == "mdpo":
        if any(r.get("rejected_extra") for r in rows):
            raise ValueError(
                "rejected_extra: MDPO ranks one list; the two-rejected rows (online-bdhs, "
                "POVID) need a pair loss (dpo, ipo, slic)"
            )
        resp = [list(r.get("responses") or [r["chosen"], r["rejected"]]) for r in rows]
        if len({len(x) for x in resp}) != 1 or len(resp[0]) < 2:
            raise ValueError("MDPO rows need 'responses' with the same K >= 2 in a batch")
        return resp, "ranked"
    extras = [list(r.get("rejected_extra") or []) for r in rows]
    if any(len(e) > 1 for e in extras):
        raise ValueError("rejected_extra holds at most one response (two-rejected loss)")
    if not any(extras):
        return [[r["chosen"], r["rejected"]] for r in rows], "pair"
    return [
        [r["chosen"], r["rejected"], (e or [r["rejected"]])[0]]
        for r, e in zip(rows, extras, strict=True)
    ], "two_rejected"


def cuda_bf16_autocast(device: torch.device, enabled: bool = True) -> Any:
    """bf16 autocast on a CUDA device (when enabled), a no-op context elsewhere."""
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lora_config(s: LearnerSettings) -> Any:
    """The peft LoraConfig of these settings; samplers wrap their model with the same one so
    `adapter_state()` loads into them with `set_peft_model_state_dict`."""
    from peft import LoraConfig

    # Full-match regex so CLIP's q/k/v_proj stay frozen: LoRA goes on the LLM only.
    target = rf".*language_model\..*\.({'|'.join(s.lora_target_modules)})"
    return LoraConfig(
        r=s.lora_rank,
        lora_alpha=s.lora_alpha,
        lora_dropout=s.lora_dropout,
        target_modules=target,
        # modules_to_save keeps the original projector for the adapters-off reference.
        modules_to_save=["multi_modal_projector"] if s.train_projector else None,
    )


class PreferenceLearner:
    """LoRA preference training of a LLaVA model. Takes ownership of `model` (LoRA is
    injected in place); `ref_model` is only used with settings.reference == "separate"."""

    def __init__(
        self,
        model: torch.nn.Module,
        processor: Any,
        settings: LearnerSettings,
        ref_model: torch.nn.Module | None = None,
    ) -> None:
        from peft import get_peft_model

        self.settings = s = settings
        self.processor = processor
        self.ref_model: torch.nn.Module | None = None
        if s.reference == "separate":
            self.ref_model = ref_model if ref_model is not None else copy.deepcopy(model)
            self.ref_model.eval().requires_grad_(False)
        with _fork_rng(s.seed):
            self.model = get_peft_model(model, lora_config(s))
        if s.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        self.device = next(self.model.parameters()).device
        self.model.train()

        lora = [p for n, p in self._trainable() if "multi_modal_projector" not in n]
        proj = [p for n, p in self._trainable() if "multi_modal_projector" in n]
        groups = [{"params": lora, "lr": s.learning_rate}]
        if proj:
            plr = s.projector_learning_rate
            groups.append({"params": proj, "lr": s.learning_rate if plr is None else plr})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=s.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: lr_factor(step, s.warmup_steps, s.total_steps, s.lr_schedule),
        )
        self.micro_step = 0  # calls of step()
        self.global_step = 0  # optimizer steps

    # ------------------------------------------------------------------ training
    def step(self, rows: Sequence[LearnerRow]) -> dict[str, float]:
        """One micro-batch: forward policy + reference, loss, backward; an optimizer step
        (clip, AdamW, schedule) every `grad_accum_steps` calls. Returns float metrics:
        loss, reward_margin, reward_accuracy, chosen/rejected_logps and _rewards (batch
        means), lr, optimizer_step, stepped (1.0 if the optimizer stepped) and grad_norm
        (when stepped). MDPO: chosen = best response, rejected = worst, accuracy over all
        ranked pairs. Two-rejected: rejected_rewards/margin/accuracy use the gamma mix, and
        the metric two_rejected is 1.0 (0.0 for the other batch kinds)."""
        s = self.settings
        responses, kind = rows_to_responses(rows, s.loss)
        batch = self._batch(rows, responses)
        groups = len(responses[0])
        with self._autocast():
            policy = split_groups(model_response_logps(self.model, batch), groups)  # [B, G]
        ref = split_groups(self.reference_logps(batch), groups)
        metrics = self._loss_metrics(policy, ref, kind)
        loss = metrics.pop("_loss")
        if s.rpo_alpha > 0:  # anchor: per-token NLL of the chosen (first) response
            tokens = split_groups(batch["response_mask"].sum(dim=1), groups)[:, 0]
            nll = chosen_nll(policy[:, 0], tokens).mean()
            loss = loss + s.rpo_alpha * nll
            metrics["chosen_nll"] = nll.detach()
            metrics["loss"] = loss.detach()
        (loss / s.grad_accum_steps).backward()
        self.micro_step += 1
        out = {k: float(v) for k, v in metrics.items()}
        out["lr"] = self.optimizer.param_groups[0]["lr"]  # the rate this update uses
        out["stepped"] = 0.0
        if self.micro_step % s.grad_accum_steps == 0:
            out["grad_norm"] = self._optimizer_step()
            out["stepped"] = 1.0
        out["optimizer_step"] = float(self.global_step)
        out["two_rejected"] = float(kind == "two_rejected")  # the batch kind, for the driver
        return out

    def _loss_metrics(self, policy: torch.Tensor, ref: torch.Tensor, kind: str) -> dict:
        s = self.settings
        if kind == "ranked":
            out = mdpo_loss(policy, ref, s.beta)
            chosen_r, rejected_r = out.rewards[:, 0], out.rewards[:, -1]
            acc = pairwise_accuracy(out.rewards)
            losses = out.losses
        else:
            if kind == "pair":
                pair: PairLossOutput = preference_loss(
                    s.loss, policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], s.beta
                )
            else:
                pair = two_rejected_loss(
                    s.loss,
                    *(policy[:, 0], policy[:, 1], policy[:, 2]),
                    *(ref[:, 0], ref[:, 1], ref[:, 2]),
                    s.beta,
                    gamma=s.gamma,
                )
            chosen_r, rejected_r, losses = pair.chosen_rewards, pair.rejected_rewards, pair.losses
            acc = (chosen_r > rejected_r).float()
        loss = losses.mean()
        return {
            "_loss": loss,
            "loss": loss.detach(),
            "reward_margin": (chosen_r - rejected_r).mean(),
            "reward_accuracy": acc.mean(),
            "chosen_rewards": chosen_r.mean(),
            "rejected_rewards": rejected_r.mean(),
            "chosen_logps": policy[:, 0].detach().mean(),
            "rejected_logps": policy[:, -1 if kind == "ranked" else 1].detach().mean(),
        }

    def _optimizer_step(self) -> float:
        params = [p for _, p in self._trainable()]
        max_norm = self.settings.max_grad_norm
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        return float(norm)

    # ------------------------------------------------------------------ log-probs
    @torch.no_grad()
    def reference_logps(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """[N] summed reference log-probs of a `build_response_batch` batch (on device)."""
        with self._autocast():
            if self.ref_model is not None:
                return model_response_logps(self.ref_model, dict(batch))
            # eval mode: the reference must not see dropout of the shared base weights.
            with self._eval_mode(), self.model.disable_adapter():
                return model_response_logps(self.model, dict(batch))

    @torch.no_grad()
    def policy_logps(self, rows: Sequence[Mapping[str, Any]], key: str = "chosen") -> torch.Tensor:
        """[B] summed policy log-probs of rows[i][key] (no grad, eval-style helper)."""
        batch = self._batch(rows, [[r[key]] for r in rows])
        with self._autocast(), self._eval_mode():
            return model_response_logps(self.model, batch)

    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)

    def _batch(self, rows: Sequence[Mapping[str, Any]], responses: list[list[str]]) -> dict:
        s = self.settings
        batch = build_response_batch(
            self.processor,
            [r["image"] for r in rows],
            [r["prompt"] for r in rows],
            responses,
            padding_side=s.padding_side,
            max_response_tokens=s.max_response_tokens,
        )
        dtype = next(self.model.parameters()).dtype
        return {
            k: v.to(self.device, dtype=dtype if v.is_floating_point() else None)
            for k, v in batch.items()
        }

    def _autocast(self) -> contextlib.AbstractContextManager:
        return cuda_bf16_autocast(self.device, self.settings.bf16_autocast)

    def _trainable(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        return ((n, p) for n, p in self.model.named_parameters() if p.requires_grad)

    # ------------------------------------------------------------------ state / export
    def adapter_state(self) -> dict[str, torch.Tensor]:
        """LoRA weights (plus the projector when trained) in peft key format, CPU copies, for
        weight sync to samplers: `set_peft_model_state_dict` or vLLM LoRA loading."""
        from peft import get_peft_model_state_dict

        return {
            k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(self.model).items()
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything to resume exactly: trainable weights, pending gradients (when saved
        mid-accumulation), optimizer, scheduler, counters, RNG and settings."""
        trainable = dict(self._trainable())
        return {
            "trainable": {n: p.detach().cpu().clone() for n, p in trainable.items()},
            "grads": {
                n: p.grad.detach().cpu().clone() for n, p in trainable.items() if p.grad is not None
            },
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "scheduler": self.scheduler.state_dict(),
            "micro_step": self.micro_step,
            "global_step": self.global_step,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "settings": asdict(self.settings),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a `state_dict()`; settings must match those of this learner."""
        if state["settings"] != asdict(self.settings):
            raise ValueError("learner state was saved with different LearnerSettings")
        trainable = dict(self._trainable())
        if set(state["trainable"]) != set(trainable):
            raise ValueError("learner state has different trainable parameters")
        with torch.no_grad():
            for name, p in trainable.items():
                p.copy_(state["trainable"][name])
                g = state["grads"].get(name)
                p.grad = None if g is None else g.to(p.device, p.dtype)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.micro_step, self.global_step = state["micro_step"], state["global_step"]
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])

    def save_adapter(self, directory: str) -> None:
        """Write the adapter in peft format (adapter_config.json + adapter_model.safetensors)."""
        self.model.save_pretrained(directory)

    def merged_model(self) -> torch.nn.Module:
        """A standalone copy of the model with LoRA merged in (plain transformers class, for
        export or a vLLM sampler). Costs one extra model copy of memory; the learner keeps
        training its own unmerged weights."""
        return copy.deepcopy(self.model).merge_and_unload()


@contextlib.contextmanager
def _fork_rng(seed: int) -> Iterator[None]:
    """Seed torch's RNG inside the block only, so LoRA init is reproducible without changing
    the caller's random stream."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
