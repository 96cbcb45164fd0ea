"""Generated tok/s of the HF sampler engine: BDHS with drop masks, and unmasked sampling.

    python bench/bench_sampler.py --shape llava-1.6-mini                  # CPU, seconds
    python bench/bench_sampler.py --shape llava-1.6-7b --device cuda --dtype bfloat16 \
        --bdhs-rows 16 32 64 128 --unmasked-batches 8 24

`bench/gpu_suite.py` runs both sweeps on one GPU; this file is the measurement itself.
Random weights at a real shape (`bench/llava_shapes.py`), one 5-tile image per row
(LLaVA-1.6-7B: 2,928 image tokens), greedy decoding, `--max-new-tokens` per request.

- bdhs: `mmalign.bdhs.bdhs_sample_batch` through `HFGenerationEngine.bdhs_batch_generate_fn`,
  as `BDHSEngine` calls it (without its per-row error guard, so an out-of-memory point is
  reported instead of being retried row by row): drop masks at rho_th 0.99 (~1 % of the
  image tokens stay, as rows of inputs_embeds), one guided try per row (n_bdhs 1, a fixed
  workload; later tries are the same call on the rows left), two-sentence references, so
  one generate() call holds 2 continuation requests per row. A character-count embedder
  stands in for the sentence embedder (generation is what is timed).
- unmasked: `HFGenerationEngine.generate` with every image token visible.
tok/s = generated tokens (the engine's token ids, stop and EOS cuts included) / wall time
of the call (image preprocessing, vision tower, prefill and decode); the engine runs the
processor (CPU, one thread) on every request's image, so `preprocess_s` reports that share
and `tok_per_s_excl_preprocess` the rate without it. Peak memory is
torch.cuda.max_memory_allocated per point (reset before it; weights included); on CPU the
process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

RHO_TH = 0.99
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange")
SHAPES_ = ("circle", "square", "triangle", "star")
PLACES = ("left", "right", "top", "bottom", "centre")


def char_embed(texts: list[str]) -> np.ndarray:
    """float [n, 64]: character-count vectors (a cheap, deterministic stand-in embedder)."""
    out = np.zeros((len(texts), 64))
    for i, t in enumerate(texts):
        for ch in t.lower():
            out[i, ord(ch) % 64] += 1.0
    return out


def references(n: int, seed: int = 0) -> list[str]:
    """n two-sentence reference answers y+."""
    rng = np.random.default_rng(seed)

    def pick(xs: tuple[str, ...]) -> str:
        return str(xs[rng.integers(len(xs))])

    return [
        f"A {pick(COLOURS)} {pick(SHAPES_)} sits at the {pick(PLACES)} of the image. "
        f"Next to it there is a small {pick(COLOURS)} {pick(SHAPES_)} on a white background."
        for _ in range(n)
    ]


def images(n: int, side: int, seed: int = 0) -> list[Any]:
    """n distinct square PIL images of `side` px (a coloured block on white)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = Image.new("RGB", (side, side), (255, 255, 255))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        img.paste(colour, (side // 8, side // 8, side - side // 4, side - side // 4))
        out.append(img)
    return out


class TimedProcessor:
    """Forwards everything to a processor; times its calls (image preprocessing)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.seconds = 0.0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self._inner(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class Sampler:
    """An HFGenerationEngine on a random-weight model of `shape`, counting generated tokens."""

    def __init__(self, shape: str, device: str, dtype: str, max_new_tokens: int) -> None:
        from bench.llava_shapes import NEXT_SHAPES, build_llava
        from mmalign.engines.hf_generation import HFGenerationEngine
        from mmalign.logprobs import default_prompt_text

        model, processor = build_llava(shape, device=device, dtype=dtype)
        self.processor = TimedProcessor(processor)
        self.engine = HFGenerationEngine(model, self.processor)
        self.cuda = device.startswith("cuda")
        self.max_new_tokens = max_new_tokens
        self.prompt = default_prompt_text(processor, "Describe the image in detail.")
        self.images = images(4, NEXT_SHAPES[shape].image_side if shape in NEXT_SHAPES else 64)
        # every bench image has the same size, so the same image-token count
        self.n_image = self.engine.image_token_count(self.prompt, self.images[0])
        self.new_tokens = 0
        generate = self.engine.generate

        def counted(requests, settings):  # noqa: ANN001, ANN202
            outs = generate(requests, settings)
            self.new_tokens += sum(len(o.token_ids) for o in outs)
            return outs

        self.engine.generate = counted  # type: ignore[method-assign]

    def warmup(self) -> None:
        """One small call of each kind (CUDA context, kernels, allocator)."""
        self.bdhs(2)
        self.unmasked(1)

    def bdhs(self, rows: int) -> dict[str, Any]:
        """One bdhs_sample_batch try over `rows` rows (module doc)."""
        from mmalign.bdhs import bdhs_sample_batch, split_sentences_regex
        from mmalign.config import BDHSConfig
        from mmalign.engines.hf_generation import SamplingSettings

        bdhs = BDHSConfig(rho_th=RHO_TH, n_bdhs=1, mask_mode="drop", splitter="regex")
        bdhs.validate("bdhs")
        settings = SamplingSettings(self.max_new_tokens, temperature=0.0, mask_mode="drop")
        gen_rows = [(self.prompt, self.images[i % len(self.images)], i) for i in range(rows)]
        refs = references(rows)
        calls = 0
        inner = self.engine.bdhs_batch_generate_fn(gen_rows, settings)

        def generate_fn(requests):  # noqa: ANN001, ANN202
            nonlocal calls
            calls += len(requests)
            return inner(requests)

        def run() -> list[Any]:
            return bdhs_sample_batch(
                refs,
                generate_fn,
                char_embed,
                [np.random.default_rng(i) for i in range(rows)],
                bdhs,
                num_image_positions=self.n_image,
                splitter=split_sentences_regex,
            )

        out, results = self._timed(run)
        visible = float(np.mean([r.mask_density for r in results])) * self.n_image
        return {"rows": rows, "requests": calls, "visible_image_tokens": round(visible, 1), **out}

    def unmasked(self, batch: int) -> dict[str, Any]:
        """One generate() call of `batch` rows, every image token visible."""
        from mmalign.engines.hf_generation import SamplingSettings
        from mmalign.engines.mm_inputs import VLRequest

        settings = SamplingSettings(self.max_new_tokens, temperature=0.0, stop_strings=())
        imgs = self.images
        reqs = [VLRequest(self.prompt, imgs[i % len(imgs)], "", None, i) for i in range(batch)]
        out, _ = self._timed(lambda: self.engine.generate(reqs, settings))
        return {"rows": batch, "requests": batch, "visible_image_tokens": self.n_image, **out}

    def _timed(self, fn: Any) -> tuple[dict[str, Any], Any]:
        """(new tokens, seconds, tok/s, peak memory of one call of fn, fn's result)."""
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.new_tokens, self.processor.seconds = 0, 0.0
        t0 = time.perf_counter()
        result = fn()
        if self.cuda:
            torch.cuda.synchronize()
        dt, prep = time.perf_counter() - t0, self.processor.seconds
        stats = {
            "new_tokens": self.new_tokens,
            "seconds": round(dt, 3),
            "preprocess_s": round(prep, 3),
            "tok_per_s": round(self.new_tokens / dt, 1),
            "tok_per_s_excl_preprocess": round(self.new_tokens / max(dt - prep, 1e-9), 1),
            "peak_mem_gib": round(peak_memory_gib(self.cuda), 3),
        }
        return stats, result


def peak_memory_gib(cuda: bool) -> float:
    """torch.cuda.max_memory_allocated on CUDA, else the process's peak RSS (Linux KiB)."""
    if cuda:
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def sweep(
    sampler: Sampler, kind: str, sizes: list[int], deadline: float = float("inf")
) -> list[dict[str, Any]]:
    """One point per size (rows for "bdhs", batch for "unmasked"); an out-of-memory point
    is recorded as {"oom": true} and ends the sweep (larger sizes would fail too), and so
    does passing `deadline` (time.perf_counter() seconds; {"skipped": "time budget"})."""
    points: list[dict[str, Any]] = []
    for size in sizes:
        if time.perf_counter() > deadline:
            points.append({"rows": size, "skipped": "time budget"})
            continue
        try:
            points.append(getattr(sampler, kind)(size))
        except torch.OutOfMemoryError:
            points.append({"rows": size, "oom": True})
            torch.cuda.empty_cache()
            break
    return points


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from bench.llava_shapes import ALL_SHAPES

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shape", default="llava-1.6-mini", choices=ALL_SHAPES)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--bdhs-rows", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--unmasked-batches", type=int, nargs="+", default=[2])
    args = ap.parse_args(argv)
    if not args.device.startswith("cuda"):
        torch.set_num_threads(1)
    sampler = Sampler(args.shape, args.device, args.dtype, args.max_new_tokens)
    sampler.warmup()
    result = {
        "image_tokens": sampler.n_image,
        "bdhs": sweep(sampler, "bdhs", args.bdhs_rows),
        "unmasked": sweep(sampler, "unmasked", args.unmasked_batches),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
