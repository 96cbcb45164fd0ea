"""Throughput of one preference-learner process (the engine each Ray Train worker runs).

    python bench/bench_learner.py                       # tiny random LLaVA on CPU
    python bench/bench_learner.py --size large --batch-size 8 --steps 10
    # a real checkpoint (tokens/s; MFU for LLaVA-1.5 and 1.6 layouts):
    python bench/bench_learner.py --model llava-hf/llava-v1.6-mistral-7b-hf --device cuda \
        --dtype bfloat16 --lora-r 128 --batch-size 8 --response-words 60 --gradient-checkpointing
    # MFU at LLaVA-1.5-7B shape (random weights, no download), ours vs plain HF + peft:
    python bench/bench_learner.py --shape llava-7b --device cuda --dtype bfloat16 --lora-r 128
    python bench/bench_learner.py --shape llava-7b --device cuda --dtype bfloat16 --lora-r 128 \
        --impl hf-peft
    # LLaVA-1.6-7B shape (AnyRes, 672-px images: 5 tiles, 2,928 image tokens per sequence):
    python bench/bench_learner.py --shape llava-1.6-7b --device cuda --dtype bfloat16 \
        --lora-r 128 --batch-size 4 --response-words 60 --gradient-checkpointing

Each timed step is `PreferenceLearner.step` on `--batch-size` pairs: batch building
(tokenizer + image processor), the policy forward + backward, the reference forward
(adapters off) and the optimizer step. Prints one JSON line: tokens/s counts every real
(non-pad) token of the chosen and rejected sequences, image tokens included; response
tokens/s only the scored answer tokens; both once per step, although the reference pass
reads them a second time. `model_tflops_per_step` counts the step's model FLOPs
(`bench/flops.py`: policy forward + backward and reference forward of the LLM and LoRA,
2 x the vision and projector forward per image tile; LLaVA-1.5 and 1.6 layouts, else null);
with a known CUDA device (or --peak-tflops) `mfu` divides their rate by the dense bf16
peak, whatever --dtype is.
`--impl hf-peft` times `bench/hf_peft_dpo.py` (four separate forwards, full log-softmax)
on the same rows instead of the learner.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.flops import LlavaDims, dpo_step_flops, llava_dims, peak_tflops  # noqa: E402
from bench.llava_shapes import ALL_SHAPES, NEXT_SHAPES  # noqa: E402
from mmalign.config import LearnerConfig  # noqa: E402
from mmalign.engines.learner import PreferenceLearner, rows_to_responses  # noqa: E402
from mmalign.logprobs import build_response_batch  # noqa: E402

WORDS = [
    *("red", "blue", "green", "circle", "square", "triangle"),
    *("left", "right", "above", "below", "big", "small"),
]


def make_rows(n: int, words: int, seed: int, image_side: int = 64) -> list[dict]:
    """n pairs with distinct coloured-square images (image_side px square) and answers of
    `words` words."""
    import random

    from PIL import Image

    rng = random.Random(seed)
    rows = []
    s = image_side
    for i in range(n):
        img = Image.new("RGB", (s, s), (255, 255, 255))
        colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        img.paste(colour, (s // 8, s // 8, s - s // 8, s - s // 8))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        answer = " ".join(rng.choice(WORDS) for _ in range(words))
        wrong = " ".join(rng.choice(WORDS) for _ in range(words))
        rows.append(
            {
                "image": buf.getvalue(),
                "prompt": f"Describe image {i} in detail.",
                "chosen": answer.capitalize() + ".",
                "rejected": wrong.capitalize() + ".",
            }
        )
    return rows


def load(args: argparse.Namespace) -> tuple[torch.nn.Module, object]:
    if args.shape:
        from bench.llava_shapes import build_llava

        return build_llava(args.shape, device=args.device, dtype=args.dtype)
    if args.model:
        from mmalign.models.loading import load_model

        return load_model(args.model, dtype=args.dtype, device=args.device)
    from mmalign.models.tiny_llava import build_tiny_llava

    model, processor = build_tiny_llava(args.size, seed=0)
    return model.to(device=args.device, dtype=getattr(torch, args.dtype)), processor


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="", help="model dir / s3 / hub id (default: tiny random)")
    ap.add_argument("--size", default="small", choices=["small", "large"])
    ap.add_argument(
        "--shape",
        default="",
        choices=["", *ALL_SHAPES],
        help="random weights at a real shape (bench/llava_shapes.py) instead of --model/--size",
    )
    ap.add_argument(
        "--impl",
        default="mmalign",
        choices=["mmalign", "hf-peft"],
        help="mmalign's PreferenceLearner or the plain HF + peft loop (bench/hf_peft_dpo.py)",
    )
    ap.add_argument(
        "--peak-tflops",
        type=float,
        default=0.0,
        help="device peak for MFU (default: the dense bf16 peak of a known CUDA device)",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--response-words", type=int, default=20)
    ap.add_argument(
        "--image-side",
        type=int,
        default=0,
        help="square image side in px (default: a LLaVA-1.6 shape's 5-tile side, else 64)",
    )
    ap.add_argument("--loss", default="dpo", choices=["dpo", "ipo", "slic"])
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--reference", default="adapters-off", choices=["adapters-off", "separate"])
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args(argv)
    if not args.image_side:
        args.image_side = NEXT_SHAPES[args.shape].image_side if args.shape in NEXT_SHAPES else 64
    if args.impl == "hf-peft" and (args.loss != "dpo" or args.reference != "adapters-off"):
        ap.error("--impl hf-peft: only --loss dpo with --reference adapters-off")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model, processor = load(args)
    dims = llava_dims(model)
    step, trainable_of = make_step(model, processor, args)
    lora_params = sum(p.numel() for n, p in trainable_of.named_parameters() if "lora_" in n)
    n_rows = args.batch_size * (args.warmup + args.steps)
    rows = make_rows(n_rows, args.response_words, seed=0, image_side=args.image_side)
    batches = [rows[i : i + args.batch_size] for i in range(0, len(rows), args.batch_size)]
    timed = time_steps(step, batches, processor, args, dims, lora_params)
    result = report(args, timed, dims is not None, trainable_of)
    print(json.dumps(result))
    return result


def make_step(
    model: torch.nn.Module, processor: object, args: argparse.Namespace
) -> tuple[Callable[[list[dict]], object], torch.nn.Module]:
    """(one training step on a list of rows, the module holding the trainable weights)."""
    if args.impl == "hf-peft":
        from bench.hf_peft_dpo import HFPeftDPO

        baseline = HFPeftDPO(
            model, processor, args.lora_r, gradient_checkpointing=args.gradient_checkpointing
        )
        return baseline.step, baseline.model
    learner = make_learner(model, processor, args)
    return learner.step, learner.model


@dataclass
class Timed:
    """What the timed steps (after the warmup) measured."""

    times: list[float] = field(default_factory=list)  # seconds per step
    tokens: int = 0  # real (non-pad) tokens of the chosen and rejected sequences
    response_tokens: int = 0  # scored answer tokens
    flops: float = 0.0  # model FLOPs (bench/flops.py), 0 without LLaVA-1.5 dims


def time_steps(
    step: Callable[[list[dict]], object],
    batches: list[list[dict]],
    processor: object,
    args: argparse.Namespace,
    dims: LlavaDims | None,
    lora_params: int,
) -> Timed:
    """Run every batch through `step`, timing (and counting) those after `args.warmup`."""
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    out = Timed()
    for i, batch in enumerate(batches):
        if i == args.warmup and cuda:
            torch.cuda.reset_peak_memory_stats()
        sync()
        t0 = time.perf_counter()
        step(batch)
        sync()
        if i >= args.warmup:
            out.times.append(time.perf_counter() - t0)
            responses, _ = rows_to_responses(batch, args.loss)
            enc = build_response_batch(
                processor, [r["image"] for r in batch], [r["prompt"] for r in batch], responses
            )
            lengths = enc["attention_mask"].sum(dim=1).tolist()
            out.tokens += int(sum(lengths))
            out.response_tokens += int(enc["response_mask"].sum())
            if dims:
                out.flops += dpo_step_flops(dims, lengths, lora_params, image_tiles(processor, enc))
    return out


def image_tiles(processor: object, enc: dict) -> list[int] | None:
    """Per sequence, its image's AnyRes tiles (base + grid; HF's own count), or None when
    the processor does not tile (LLaVA-1.5: one tile each)."""
    if "image_sizes" not in enc:
        return None
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    ip = processor.image_processor  # type: ignore[attr-defined]
    return [
        int(image_size_to_num_patches(tuple(size), ip.image_grid_pinpoints, ip.crop_size["height"]))
        for size in enc["image_sizes"].tolist()
    ]


def report(
    args: argparse.Namespace, timed: Timed, has_dims: bool, trainable_of: torch.nn.Module
) -> dict:
    """The JSON line: rates over the timed steps, MFU where the FLOPs and the peak are known."""
    cuda = args.device.startswith("cuda")
    total, flops = sum(timed.times), timed.flops
    peak = (
        torch.cuda.max_memory_allocated() / 2**30
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
    )
    peak_tf = args.peak_tflops or (peak_tflops(torch.cuda.get_device_name()) if cuda else None)
    return {
        "bench": "learner",
        "impl": args.impl,
        "model": args.model or args.shape or f"tiny-random-{args.size}",
        "device": args.device,
        "dtype": args.dtype,
        "loss": args.loss,
        "reference": args.reference,
        "lora_r": args.lora_r,
        "batch_pairs": args.batch_size,
        "image_side": args.image_side,
        "steps": args.steps,
        "threads": args.threads,
        "tokens_per_s": round(timed.tokens / total, 1),
        "response_tokens_per_s": round(timed.response_tokens / total, 1),
        "pairs_per_s": round(args.batch_size * args.steps / total, 3),
        "step_s_median": round(statistics.median(timed.times), 4),
        "tokens_per_step": timed.tokens // args.steps,
        "model_tflops_per_step": round(flops / args.steps / 1e12, 4) if has_dims else None,
        "achieved_tflops": round(flops / total / 1e12, 4) if has_dims else None,
        "mfu": round(flops / total / (peak_tf * 1e12), 4) if has_dims and peak_tf else None,
        "peak_mem_gib": round(peak, 3),
        "trainable_params": sum(p.numel() for p in trainable_of.parameters() if p.requires_grad),
    }


def make_learner(model: torch.nn.Module, processor: object, args: argparse.Namespace):
    settings = LearnerConfig(
        loss=args.loss,
        lora_r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        lora_dropout=0.0,  # as the hf-peft baseline
        lr=1e-5,
        schedule="constant",
        reference=args.reference,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    return PreferenceLearner(model, processor, settings)


if __name__ == "__main__":
    main()
