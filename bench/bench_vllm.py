"""BDHS generation: VLLMGenerationEngine vs HFGenerationEngine on the same workload, one run.

    .venv-vllm/bin/python bench/bench_vllm.py --rows 16
    .venv-vllm/bin/python bench/bench_vllm.py --model assets/models/shapes-llava-small

Both engines hold the same model and serve the same BDHS requests ("drop" masks, the only
mode vLLM supports), in two shapes:
- per_sample: mmalign.bdhs.bdhs_sample one row at a time, as BDHSOperator calls it
  (a fixed-seed bag-of-characters embedder stands in for the sentence embedder, so only
  generation is timed and both engines take the same accept/retry decisions);
- batched: every row's guided continuations (one mask per row) in one generate() call.
Prints one JSON object; `ratio` = vLLM tokens/s / HF tokens/s. Engine start-up (vLLM's
includes exporting the Llama directory and building its KV cache) is reported apart.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from mmalign import io as mio  # noqa: E402

TRAINED = Path(__file__).resolve().parents[1] / "assets/models/shapes-llava-small"


def char_embed(texts: list[str]) -> np.ndarray:
    """float [n, 64]: character-count vectors (a cheap, deterministic stand-in embedder)."""
    out = np.zeros((len(texts), 64))
    for i, t in enumerate(texts):
        for ch in t.lower():
            out[i, ord(ch) % 64] += 1.0
    return out


def workload(rows: int) -> list[tuple[str, object, str]]:
    from mmalign.logprobs import to_pil
    from mmalign.models.tiny_llava import format_prompt

    records, _ = mio.read_prompts("shapesworld:pref", max_rows=rows)
    return [(format_prompt(r["prompt"]), to_pil(r["images"][0]), r["reference"]) for r in records]


def per_sample(engine, rows, settings, bdhs) -> dict[str, float]:  # noqa: ANN001
    from mmalign.bdhs import bdhs_sample

    tokens, t0 = 0, time.perf_counter()
    for i, (prompt, image, ref) in enumerate(rows):
        inner = engine.bdhs_generate_fn(prompt, image, settings, seed=i)

        def counted(reqs, inner=inner):  # noqa: ANN001, ANN202
            nonlocal tokens
            texts = inner(reqs)
            tokens += sum(
                len(engine.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts
            )
            return texts

        rng = np.random.default_rng(i)
        bdhs_sample(
            ref,
            counted,
            char_embed,
            rng,
            bdhs,
            num_image_positions=engine.image_token_count(prompt, image),
        )
    dt = time.perf_counter() - t0
    return {"seconds": round(dt, 3), "tokens": tokens, "tok_per_s": round(tokens / dt, 1)}


def batched(engine, rows, settings, bdhs) -> dict[str, float]:  # noqa: ANN001
    from mmalign.bdhs import plan_continuations, sample_visibility_mask, sentence_spans
    from mmalign.engines.mm_inputs import VLRequest

    reqs = []
    for i, (prompt, image, ref) in enumerate(rows):
        rng = np.random.default_rng(i)
        vis = sample_visibility_mask(engine.image_token_count(prompt, image), bdhs.rho_th, rng)
        plan = plan_continuations(ref, sentence_spans(ref), vis, rng)
        reqs += [VLRequest(prompt, image, r.response_prefix, vis, i) for r in plan.requests]
    t0 = time.perf_counter()
    outs = engine.generate(reqs, settings)
    dt = time.perf_counter() - t0
    tokens = sum(len(o.token_ids) for o in outs)
    return {"requests": len(reqs), "seconds": round(dt, 3), "tokens": tokens,
            "tok_per_s": round(tokens / dt, 1)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--n-bdhs", type=int, default=5)
    ap.add_argument("--model", default=str(TRAINED))
    args = ap.parse_args()

    import torch

    from mmalign.config import BDHSConfig
    from mmalign.engines.hf_generation import HFGenerationEngine, SamplingSettings
    from mmalign.engines.vllm_generation import VLLMGenerationEngine
    from mmalign.models.loading import load_model

    torch.set_num_threads(1)
    model, processor = load_model(args.model)
    rows = workload(args.rows)
    settings = SamplingSettings(max_new_tokens=args.max_new_tokens, mask_mode="drop")
    bdhs = BDHSConfig(n_bdhs=args.n_bdhs, mask_mode="drop")
    result: dict[str, object] = {"model": args.model, "rows": args.rows,
                                 "max_new_tokens": args.max_new_tokens}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        engines = {"hf": HFGenerationEngine(model, processor)}
        t1 = time.perf_counter()
        engines["vllm"] = VLLMGenerationEngine(model, processor, cache_root=tmp)
        result["vllm_startup_s"] = round(time.perf_counter() - t1, 2)
        result["hf_startup_s"] = round(t1 - t0, 2)
        for name, eng in engines.items():
            eng.generate([], settings)
            result[name] = {"per_sample": per_sample(eng, rows, settings, bdhs),
                            "batched": batched(eng, rows, settings, bdhs)}  # fmt: skip
    for shape in ("per_sample", "batched"):
        v, h = result["vllm"][shape], result["hf"][shape]  # type: ignore[index]
        result[f"ratio_{shape}"] = round(v["tok_per_s"] / h["tok_per_s"], 3)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
