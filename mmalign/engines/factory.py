"""Pick the generation engine named by config ("hf" or "vllm"); vLLM is imported only here.

Both engines share one contract (HFGenerationEngine's methods and GenerationOutput rows);
VLLMGenerationEngine accepts only mask_mode="drop" (see vllm_generation.py).
"""

from __future__ import annotations

from typing import Any

from mmalign.engines.hf_generation import HFGenerationEngine

ENGINES = ("hf", "vllm")


def load_generation_engine(
    engine: str, path: str, vllm_gpu_memory: float = 0.5, **load_kwargs: Any
) -> HFGenerationEngine:
    """An engine over the checkpoint at `path` (dir, s3:// prefix or hub id).

    load_kwargs go to mmalign.models.loading.load_model (dtype, device); the vLLM engine
    also takes cache_root and max_lora_rank, and reserves `vllm_gpu_memory` of each GPU
    (config `*.vllm_gpu_memory`). "vllm" without the vllm package raises ImportError
    (naming scripts/setup_vllm.sh) before any model is loaded.
    """
    if engine == "hf":
        return HFGenerationEngine.from_pretrained(path, **load_kwargs)
    if engine == "vllm":
        from mmalign.engines.vllm_generation import VLLMGenerationEngine

        return VLLMGenerationEngine.from_pretrained(
            path, gpu_memory_utilization=vllm_gpu_memory, **load_kwargs
        )
    raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
