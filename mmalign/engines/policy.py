"""The online policy sampler: a generation engine whose LoRA weights follow the learner.

Weight sync is versioned: `load_adapter(state, version)` installs the learner's LoRA
without a model reload and refuses to go backwards, and every sample is tagged with the
version that produced it, so a learner can bound and record off-policy lag. Because a
sampler call is a single method on one object, one request batch never mixes two versions.

Two engines (config `sampler.engine`): "hf" injects the learner's LoRA layout into the model
with peft and copies the tensors in place; "vllm" serves each version as a new vLLM LoRA
adapter written from the same state (VLLMGenerationEngine.load_adapter_state), and a
trained projector goes into the HF model that computes the image embeddings.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mmalign.config import LearnerConfig
from mmalign.engines.factory import ENGINES
from mmalign.engines.hf_generation import HFGenerationEngine, SamplingSettings
from mmalign.engines.learner import lora_config
from mmalign.engines.mm_inputs import VLRequest
from mmalign.logprobs import default_prompt_text, to_pil
from mmalign.seeds import sample_seed


def adapter_digest(state: Mapping[str, torch.Tensor]) -> str:
    """A short content hash of adapter tensors: proves which weights a sampler holds."""
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()[:16]


def adapter_nbytes(state: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


class PolicySampler:
    """Owns the policy (base weights + a LoRA slot) and samples k responses per prompt.

    Args:
        model, processor: the base policy (LlavaForConditionalGeneration) and its processor;
            the sampler takes ownership of the model.
        lora: the learner's config (LoRA rank/alpha/targets; projector_lr > 0 = trained
            projector); None = a sampler without weight sync.
        engine: "hf" or "vllm" (config `sampler.engine`).
        vllm_kwargs: VLLMGenerationEngine arguments (cache_root, vllm.LLM kwargs); "vllm" only.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        lora: LearnerConfig | None = None,
        engine: str = "hf",
        **vllm_kwargs: Any,
    ) -> None:
        if engine not in ENGINES:
            raise ValueError(f"sampler.engine must be one of {ENGINES}, got {engine!r}")
        if engine == "vllm":
            from mmalign.engines.vllm_generation import VLLMGenerationEngine, vllm_max_lora_rank

            rank = vllm_max_lora_rank(lora.lora_r) if lora is not None else 0
            vllm = VLLMGenerationEngine(model, processor, max_lora_rank=rank, **vllm_kwargs)
            self._setup(vllm, lora, "vllm")
            return
        if vllm_kwargs:
            raise TypeError(f"engine 'hf' takes no vLLM arguments, got {sorted(vllm_kwargs)}")
        if lora is not None:
            from peft import get_peft_model

            # Same LoRA layout as the learner, so its adapter_state() loads in place. Until the
            # first load_adapter() the LoRA B matrices are zero: the policy is the base model.
            model = get_peft_model(model, lora_config(lora))
            model.eval()
        self._setup(HFGenerationEngine(model, processor), lora, "hf")
        if self.uses_lora:
            self._zero_lora()

    @classmethod
    def over_vllm_engine(cls, engine: Any, lora: LearnerConfig | None) -> PolicySampler:
        """A sampler over a started VLLMGenerationEngine (its max_lora_rank must hold
        lora.lora_r). Starting vLLM costs about a minute on CPU, so tests share one."""
        sampler = cls.__new__(cls)
        sampler._setup(engine, lora, "vllm")
        return sampler

    def _setup(self, engine: HFGenerationEngine, lora: LearnerConfig | None, name: str) -> None:
        self.engine = engine
        self.engine_name = name
        self.lora = lora
        self.uses_lora = lora is not None
        self.version = 0
        self.digest = ""
        self.last_sync: dict[str, float] = {}

    def _zero_lora(self) -> None:
        # LoRA's B matrices start at zero in peft, so the wrapped policy equals the base
        # model; make that explicit in case the init scheme ever changes.
        with torch.no_grad():
            for name, p in self.engine.model.named_parameters():
                if "lora_B" in name:
                    p.zero_()

    def load_adapter(self, state: Mapping[str, torch.Tensor], version: int) -> dict[str, Any]:
        """Install learner weights `state` as `version`; returns sync stats (bytes, seconds)."""
        if not self.uses_lora:
            raise RuntimeError("this sampler was built without LoRA; send full weights instead")
        if version <= self.version:
            raise ValueError(f"weight version {version} is not newer than {self.version}")
        t0 = time.perf_counter()
        if self.engine_name == "vllm":
            self._load_vllm(state, version)
        else:
            from peft import set_peft_model_state_dict

            result = set_peft_model_state_dict(self.engine.model, dict(state))
            unexpected = list(getattr(result, "unexpected_keys", []) or [])
            if unexpected:
                raise ValueError(f"adapter keys not in the sampler's model: {unexpected[:3]}")
        self.version = version
        self.digest = adapter_digest(state)
        self.last_sync = {
            "bytes": float(adapter_nbytes(state)),
            "seconds": time.perf_counter() - t0,
            "version": float(version),
        }
        return {**self.last_sync, "digest": self.digest}

    def _load_vllm(self, state: Mapping[str, torch.Tensor], version: int) -> None:
        assert self.lora is not None
        projector = [k for k in state if "multi_modal_projector" in k]
        if projector and self.lora.projector_lr <= 0:  # the HF path refuses these too
            raise ValueError(f"adapter keys not in the sampler's model: {projector[:3]}")
        self.engine.load_adapter_state(  # type: ignore[attr-defined]
            state,
            version,
            rank=self.lora.lora_r,
            alpha=self.lora.lora_alpha,
            target_modules=self.lora.lora_targets,
        )

    @torch.inference_mode()
    def sample(
        self,
        prompts: Sequence[str],
        images: Sequence[Any],
        k: int,
        settings: SamplingSettings,
        seed: int,
    ) -> list[list[str]]:
        """k responses per (prompt, image); row i, sample j is seeded by (seed, i, j)."""
        rows = []
        for i, (prompt, image) in enumerate(zip(prompts, images, strict=True)):
            text = default_prompt_text(self.engine.processor, prompt)
            pil = to_pil(image)
            for j in range(k):
                rows.append(VLRequest(text, pil, "", None, sample_seed(seed, i, j)))
        outs = self.engine.generate(rows, settings)
        texts = [o.text.strip() for o in outs]
        return [texts[i * k : (i + 1) * k] for i in range(len(prompts))]
