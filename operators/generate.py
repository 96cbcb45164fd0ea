"""Ray Data operator: one generated response per input row.

Input columns: `image` (encoded bytes, or any other `mmalign.rows.ImageValue`) and
`prompt` (plain question text). Output: the same row plus `response` (str) and `error`
(str, "" when fine). A row whose image cannot be decoded gets an error instead of failing
its whole batch.
"""

from __future__ import annotations

from typing import Any

import numpy as np

INPUT_COLUMNS = ("image", "prompt")


def check_columns(batch: dict[str, Any], needed: tuple[str, ...], where: str) -> None:
    missing = [c for c in needed if c not in batch]
    if missing:
        raise KeyError(f"{where}: missing input columns {missing} (got {sorted(batch)})")


class GenerateOperator:
    """Hosts one generation engine per actor (model loaded once, in __init__)."""

    def __init__(
        self,
        model: str,
        dtype: str = "float32",
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop_strings: tuple[str, ...] = (),
        seed: int = 0,
        engine: str = "hf",
        vllm_gpu_memory: float = 0.5,
    ) -> None:
        import torch

        from mmalign.engines.factory import load_generation_engine
        from mmalign.engines.hf_generation import SamplingSettings

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.engine = load_generation_engine(
            engine, model, vllm_gpu_memory, dtype=dtype, device=device
        )
        self.settings = SamplingSettings(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            stop_strings=tuple(stop_strings),
        )
        self.seed = seed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from mmalign.engines.mm_inputs import VLRequest
        from mmalign.logprobs import default_prompt_text, to_pil

        check_columns(batch, INPUT_COLUMNS, "GenerateOperator")
        n = len(batch["prompt"])
        responses, errors = [""] * n, [""] * n
        rows, index = [], []
        for i in range(n):
            try:
                image = to_pil(batch["image"][i])
            except Exception as err:  # noqa: BLE001 - any decode failure is a row error
                errors[i] = f"image: unreadable ({type(err).__name__})"
                continue
            text = default_prompt_text(self.engine.processor, str(batch["prompt"][i]))
            rows.append(VLRequest(text, image, "", None, self.seed + i))
            index.append(i)
        for i, out in zip(index, self.engine.generate(rows, self.settings)):
            responses[i] = out.text.strip()
        out_batch = dict(batch)
        out_batch["response"] = np.array(responses, dtype=object)
        out_batch["error"] = np.array(errors, dtype=object)
        return out_batch
