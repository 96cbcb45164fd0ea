"""Train a tiny ShapesWorld LLaVA with SFT on CPU, evaluate it, save it in HF format.

    python -m pipelines.train_tiny --size small --steps 2000 --n-eval 200 --out /tmp/small-a

Longer training continues from a saved model (this chain made shapes-llava-small):

    python -m pipelines.train_tiny --init /tmp/small-a --steps 1500 --lr 1e-3 \
        --model-seed 1 --n-eval 200 --out /tmp/small-b

Steps: generate the biased "sft" split -> build the random tiny LLaVA (or load --init) ->
SFT (loss on assistant tokens) -> save model + processor -> POPE / CHAIR on the unbiased
"eval" split, once with the image and once with every image token masked (a text-only
model shows what the co-occurrence prior alone produces) -> eval.json + README.md beside
the weights. Use --threads 1 on a busy machine: intra-op threads that wait on each other
were 10x slower than one thread when the 2 cores were shared.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from mmalign.evaluation import evaluate, format_report, report_metrics
from mmalign.models.greedy import greedy_fn
from mmalign.models.loading import load_model
from mmalign.models.sft import SFTConfig, tokenize_records, train_sft
from mmalign.models.tiny_llava import (
    DEFAULT_PATCH_SIZE,
    SIZES,
    build_tiny_llava,
    count_parameters,
)
from mmalign.models.vision_pretrain import VisionPretrainConfig, pretrain_vision
from mmalign.shapes.world import WorldConfig, generate_split


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--out", type=Path, required=True, help="output model directory")
    p.add_argument("--patch-size", type=int, default=DEFAULT_PATCH_SIZE)
    p.add_argument("--init", default="", help="start from this saved model instead of random")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--model-seed", type=int, default=0, help="weight init and batch order")
    p.add_argument("--world-seed", type=int, default=0, help="WorldConfig.seed")
    p.add_argument("--n-sft", type=int, default=20000, help="sft records to generate")
    p.add_argument("--bias-strength", type=float, default=0.85)
    p.add_argument(
        "--caption-noise",
        type=float,
        default=0.0,
        help="WorldConfig.caption_noise: per present bias trigger whose partner is absent, P "
        "that the sft answers claim the partner anyway (noisy captions -> a language prior)",
    )
    p.add_argument(
        "--sft-hard-negatives",
        type=float,
        default=0.0,
        help="P that an sft existence question about an absent object is drawn from the sibling "
        "classes (same colour or shape as a present one; WorldConfig.hard_negatives)",
    )
    p.add_argument("--n-eval", type=int, default=300, help="eval images (0: skip eval)")
    p.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy machine)"
    )
    p.add_argument("--device", default="cpu", help="torch device for training and eval")
    p.add_argument(
        "--loss-per",
        choices=("token", "example"),
        default="token",
        help="SFT loss averaging: over answer tokens, or per conversation (see SFTConfig)",
    )
    p.add_argument(
        "--vision-steps",
        type=int,
        default=0,
        help="dense vision pre-training steps before SFT (mmalign.models.vision_pretrain)",
    )
    p.add_argument(
        "--image-dropout",
        type=float,
        default=0.0,
        help="fraction of SFT conversations with every image token masked (SFTConfig)",
    )
    p.add_argument(
        "--freeze-vision",
        action="store_true",
        help="keep the vision tower fixed during SFT (LLaVA stage 2 style; projector trains)",
    )
    p.add_argument(
        "--task-weights",
        default="",
        help='SFT task mix, e.g. "describe=0.3,existence=0.5,count=0.1,colour=0.05,position=0.05"',
    )
    p.add_argument(
        "--judge-fraction",
        type=float,
        default=0.0,
        help="fraction of sft records replaced by judging examples in the compact judge "
        "prompt format (mmalign.shapes.judging; trains the embedded judge)",
    )
    return p.parse_args(argv)


def world_config(args: argparse.Namespace) -> WorldConfig:
    """The ShapesWorld these flags describe (other fields: WorldConfig defaults)."""
    return WorldConfig(
        seed=args.world_seed,
        bias_strength=args.bias_strength,
        caption_noise=args.caption_noise,
        hard_negatives=(
            ("sft", args.sft_hard_negatives),
            *((s, p) for s, p in WorldConfig.hard_negatives if s != "sft"),
        ),
    )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    world = world_config(args)
    sft_world = world
    if args.task_weights:
        pairs = [item.split("=") for item in args.task_weights.split(",")]
        sft_world = replace(world, task_weights=tuple((k.strip(), float(v)) for k, v in pairs))
    records = generate_split(sft_world, "sft", args.n_sft)
    if args.judge_fraction > 0:  # same images, a judging conversation instead
        from mmalign.shapes.judging import make_judging_example

        pick = random.Random(f"judge-fraction:{args.world_seed}")
        for i in range(len(records)):
            if pick.random() < args.judge_fraction:
                records[i] = make_judging_example(world, "sft", i, style="compact")
    if args.init:  # continue training a saved model (its size/patch flags are ignored)
        model, processor = load_model(args.init)
    else:
        model, processor = build_tiny_llava(
            args.size, seed=args.model_seed, image_size=world.image_size, patch_size=args.patch_size
        )
    model.to(args.device)
    if args.vision_steps > 0:
        vcfg = VisionPretrainConfig(steps=args.vision_steps, seed=args.model_seed)
        pretrain_vision(model, processor, records, vcfg, log=lambda msg: print(msg, flush=True))
    if args.freeze_vision:
        model.model.vision_tower.requires_grad_(False)
    data = tokenize_records(processor, records)
    print(
        f"{len(data)} sft conversations, {count_parameters(model)} params, {time.time() - t0:.0f}s"
    )

    cfg = SFTConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.model_seed,
        loss_per=args.loss_per,
        image_dropout=args.image_dropout,
    )
    losses = train_sft(model, data, cfg, log=lambda msg: print(msg, flush=True))
    args.out.mkdir(parents=True, exist_ok=True)
    model.to("cpu").save_pretrained(args.out)
    model.to(args.device)
    processor.save_pretrained(args.out)

    summary: dict = {
        "final_loss": sum(losses[-50:]) / len(losses[-50:]),
        "train_s": time.time() - t0,
    }
    if args.n_eval > 0:
        evals = generate_split(world, "eval", args.n_eval)
        for name, keep in (("image", 1.0), ("masked", 0.0)):
            report = evaluate(greedy_fn(model, processor, keep_prob=keep), evals, batch_size=64)
            print(f"--- eval with {name} ({args.n_eval} images)\n{format_report(report)}")
            summary[name] = report_metrics(report)
            summary[f"{name}_report"] = report
    (args.out / "eval.json").write_text(json.dumps(summary, indent=1))
    write_readme(args, summary, count_parameters(model))
    print(f"saved to {args.out} in {time.time() - t0:.0f}s")
    return summary


def write_readme(args: argparse.Namespace, summary: dict, n_params: int) -> None:
    """README.md beside the weights: what it is, the exact command, the eval numbers."""
    command = "python -m pipelines.train_tiny " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = [
        f"# shapes-llava-{args.size}",
        "",
        f"Tiny LLaVA ({n_params:,} parameters; CLIP vision tower + Llama text model, head_dim 64)",
        "trained from random weights with SFT on the biased ShapesWorld `sft` split",
        f"(bias_strength {args.bias_strength}, {args.n_sft} conversations, world seed",
        f"{args.world_seed}). Built by `mmalign.models.tiny_llava.build_tiny_llava`"
        + (f", training continued from `{args.init}`." if args.init else "."),
        "",
        "Reproduce (CPU, from the repository root; float results depend slightly on threads):",
        "",
        f"    {command}",
        "",
        f"Final training loss {summary['final_loss']:.4f}; wall time {summary['train_s']:.0f}s.",
    ]
    for name in ("image", "masked"):
        if name in summary:
            m = summary[name]
            lines += [
                "",
                f"Eval on the unbiased `eval` split, {args.n_eval} images, greedy, "
                + ("full image:" if name == "image" else "all image tokens masked:"),
                "",
                f"- POPE mean F1 {100 * m['pope/mean_f1']:.2f} (random "
                f"{100 * m['pope/random/f1']:.2f}, popular {100 * m['pope/popular/f1']:.2f}, "
                f"adversarial {100 * m['pope/adversarial/f1']:.2f})",
                f"- CHAIR_i {100 * m['chair/chair_i']:.2f}, CHAIR_s {100 * m['chair/chair_s']:.2f},"
                f" Recall {100 * m['chair/recall']:.2f}",
            ]
    (args.out / "README.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
