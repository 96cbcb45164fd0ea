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
from dataclasses import asdict
from typing import Any

import torch

from mmalign.config import LearnerConfig
from mmalign.logprobs import build_response_batch, model_response_logps, split_groups
from mmalign.losses import (
    PairLossOutput,
    chosen_nll,
    mdpo_loss,
    pairwise_accuracy,
    preference_loss,
    two_rejected_loss,
)
from mmalign.rows import LearnerRow


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


def lora_config(s: LearnerConfig) -> Any:
    """The peft LoraConfig of these settings; samplers wrap their model with the same one so
    `adapter_state()` loads into them with `set_peft_model_state_dict`."""
    from peft import LoraConfig

    # Full-match regex so CLIP's q/k/v_proj stay frozen: LoRA goes on the LLM only.
    target = rf".*language_model\..*\.({'|'.join(s.lora_targets)})"
    return LoraConfig(
        r=s.lora_r,
        lora_alpha=s.lora_alpha,
        lora_dropout=s.lora_dropout,
        target_modules=target,
        # modules_to_save keeps the original projector for the adapters-off reference.
        modules_to_save=["multi_modal_projector"] if s.projector_lr > 0 else None,
    )


# LearnerConfig fields that place or feed the learner but do not change its state: a
# checkpoint resumes with other values of these (e.g. another worker count).
_NOT_STATE = ("batch_size", "num_workers", "use_gpu", "num_cpus", "resources", "shuffle_window")


def settings_state(s: LearnerConfig) -> dict[str, Any]:
    """The settings a learner checkpoint records and must match on load."""
    return {k: v for k, v in asdict(s).items() if k not in _NOT_STATE}


class PreferenceLearner:
    """LoRA preference training of a LLaVA model. Takes ownership of `model` (LoRA is
    injected in place); `ref_model` is only used with settings.reference == "separate".

    `settings` is the config section as it is (validated here too, for callers that build
    one by hand): lr/projector_lr (0 = frozen projector), lora_r/lora_alpha/lora_dropout/
    lora_targets, grad_accum, max_grad_norm (0 = no clipping), schedule/warmup_steps over
    `steps`, weight_decay, gradient_checkpointing, max_response_tokens (0 = keep all) and
    seed (LoRA init). Forwards run under bf16 autocast on CUDA."""

    def __init__(
        self,
        model: torch.nn.Module,
        processor: Any,
        settings: LearnerConfig,
        ref_model: torch.nn.Module | None = None,
    ) -> None:
        from peft import get_peft_model

        settings.validate("learner")
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
        groups = [{"params": lora, "lr": s.lr}]
        if proj:
            groups.append({"params": proj, "lr": s.projector_lr})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=s.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: lr_factor(step, s.warmup_steps, s.steps, s.schedule),
        )
        self.micro_step = 0  # calls of step()
        self.global_step = 0  # optimizer steps

    # ------------------------------------------------------------------ training
    def step(self, rows: Sequence[LearnerRow]) -> dict[str, float]:
        """One micro-batch: forward policy + reference, loss, backward; an optimizer step
        (clip, AdamW, schedule) every `grad_accum` calls. Returns float metrics:
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
        (loss / s.grad_accum).backward()
        self.micro_step += 1
        out = {k: float(v) for k, v in metrics.items()}
        out["lr"] = self.optimizer.param_groups[0]["lr"]  # the rate this update uses
        out["stepped"] = 0.0
        if self.micro_step % s.grad_accum == 0:
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
        return encode_rows(
            self.model, self.processor, rows, responses, self.settings.max_response_tokens
        )

    def _autocast(self) -> contextlib.AbstractContextManager:
        return cuda_bf16_autocast(self.device)

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
            "settings": settings_state(self.settings),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a `state_dict()`; settings must match those of this learner."""
        if state["settings"] != settings_state(self.settings):
            raise ValueError("learner state was saved with different learner settings")
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


def encode_rows(
    model: torch.nn.Module,
    processor: Any,
    rows: Sequence[Mapping[str, Any]],
    responses: list[list[str]],
    max_response_tokens: int = 0,
) -> dict[str, torch.Tensor]:
    """`build_response_batch` of rows' image + prompt with `responses` (G per row), on the
    model's device, floats in its dtype; max_response_tokens 0 = keep all."""
    batch = build_response_batch(
        processor,
        [r["image"] for r in rows],
        [r["prompt"] for r in rows],
        responses,
        max_response_tokens=max_response_tokens or None,
    )
    param = next(model.parameters())
    return {
        k: v.to(param.device, dtype=param.dtype if v.is_floating_point() else None)
        for k, v in batch.items()
    }


def text_hidden_size(model: Any) -> int:
    """Hidden size of a LLaVA's language model (text_config) or of a plain LM."""
    config = model.config
    return int(getattr(config, "text_config", config).hidden_size)


@contextlib.contextmanager
def _fork_rng(seed: int) -> Iterator[None]:
    """Seed torch's RNG inside the block only, so LoRA init is reproducible without changing
    the caller's random stream."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
