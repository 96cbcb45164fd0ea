"""GPU suite (issue 16): sampler tok/s, learner MFU and peak memory at LLaVA-1.6-7B shape.

    python bench/gpu_suite.py                              # one GPU, ~3-5 min (< 8) (est.)
    python bench/gpu_suite.py --out $OUT/gpu_suite.json    # where the JSON goes
    python bench/gpu_suite.py --shape tiny                 # CPU smoke run, < 1 min

Needs only torch, transformers and peft: the device image has no Ray or vLLM, so nothing
here imports them, directly or through the mmalign modules it uses (the JSON lists any
ray / vllm module found in sys.modules at the end, and the run exits 1 if there is one).
Random weights at LLaVA-1.6-7B's shape (`bench/llava_shapes.py` "llava-1.6-7b":
llava-v1.6-vicuna-7b, 7.06 B parameters, one 672-px image per row = 5 AnyRes tiles,
2,928 image tokens), built on the GPU in bf16, no download.

(a) sampler, HF engine (`bench/bench_sampler.py`): generated tok/s of BDHS with drop masks
    at rho_th 0.99 over a batch sweep (rows of `bdhs_sample_batch`, 2 continuation
    requests each), and of unmasked sampling (every image token visible);
(b) learner (`bench/bench_learner.py --shape llava-1.6-7b`): MFU of mmalign's
    PreferenceLearner and of the plain HF + peft DPO step on the same rows (LoRA r 128,
    gradient checkpointing, FLOPs from `bench/flops.py`, dense bf16 peak of the card);
(c) peak memory of each (torch.cuda.max_memory_allocated, weights included).
Writes one JSON and prints a table with the targets and the earlier anchors beside the
figures. `--shape tiny` runs the same code on CPU at toy widths ("llava-1.6-mini"); its
numbers prove the suite runs, they are not figures (the MFU divides by a nominal peak).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

TARGETS = {
    "bdhs_tok_per_s": 5000.0,  # BDHS sampler, generated tok/s per H100, HF engine
    "learner_mfu": 0.45,
}
ANCHORS = {
    "naive_generate_batch24_full_image": "naive HF generate: 179 tok/s at batch 24, full image",
    "naive_generate_70tok_batch256": "naive HF generate: 2,230 tok/s, 70-token prompts, b 256",
    "hf_peft_dpo_mfu": "HF + peft DPO: ~22 % of bf16 peak",
}
CPU_NOMINAL_PEAK_TFLOPS = 0.1  # tiny mode only: exercises the MFU path, not a CPU's peak
FORBIDDEN = ("ray", "vllm")


@dataclass(frozen=True)
class Plan:
    """What one suite run measures."""

    model_shape: str
    dtype: str
    bdhs_rows: tuple[int, ...]
    unmasked_batches: tuple[int, ...]
    max_new_tokens: int
    sampler_budget_s: float
    """Sweep points that would start after this many seconds of the sampler part are
    skipped (keeps the suite under 8 minutes on a slower card)."""
    learner_pairs: int
    learner_steps: int
    response_words: int
    lora_r: int
    gradient_checkpointing: bool


PLANS = {
    "llava-1.6-7b": Plan(
        "llava-1.6-7b",
        "bfloat16",
        bdhs_rows=(16, 32, 64, 96, 128),
        unmasked_batches=(8, 24),
        max_new_tokens=64,
        sampler_budget_s=240.0,
        learner_pairs=4,
        learner_steps=3,
        response_words=60,
        lora_r=128,
        gradient_checkpointing=True,
    ),
    "tiny": Plan(
        "llava-1.6-mini",
        "float32",
        bdhs_rows=(2, 4),
        unmasked_batches=(2,),
        max_new_tokens=8,
        sampler_budget_s=60.0,
        learner_pairs=2,
        learner_steps=1,
        response_words=8,
        lora_r=8,
        gradient_checkpointing=False,
    ),
}


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_sampler(plan: Plan, device: str) -> dict[str, Any]:
    """(a) + (c) for the sampler: both sweeps on one engine, then the model is freed."""
    from bench.bench_sampler import Sampler, sweep

    t0 = time.perf_counter()
    sampler = Sampler(plan.model_shape, device, plan.dtype, plan.max_new_tokens)
    built = time.perf_counter() - t0
    sampler.warmup()
    deadline = t0 + plan.sampler_budget_s
    out = {
        "image_tokens": sampler.n_image,
        "rho_th": 0.99,
        "max_new_tokens": plan.max_new_tokens,
        "build_s": round(built, 1),
        "bdhs": sweep(sampler, "bdhs", list(plan.bdhs_rows), deadline),
        "unmasked": sweep(sampler, "unmasked", list(plan.unmasked_batches), deadline),
    }
    del sampler
    free_memory()
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


def run_learner(plan: Plan, device: str, impl: str) -> dict[str, Any]:
    """(b) + (c) for one learner implementation (bench_learner's own JSON line); one retry at
    half the pairs if the step runs out of memory."""
    from bench import bench_learner

    pairs = plan.learner_pairs
    argv = ["--shape", plan.model_shape, "--device", device, "--dtype", plan.dtype]
    argv += ["--lora-r", str(plan.lora_r), "--steps", str(plan.learner_steps), "--warmup", "1"]
    argv += ["--response-words", str(plan.response_words), "--impl", impl]
    if plan.gradient_checkpointing:
        argv.append("--gradient-checkpointing")
    if not device.startswith("cuda"):
        argv += ["--peak-tflops", str(CPU_NOMINAL_PEAK_TFLOPS)]
    t0 = time.perf_counter()
    while True:
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # the suite prints its own table
                result = bench_learner.main([*argv, "--batch-size", str(pairs)])
            break
        except torch.OutOfMemoryError:
            free_memory()
            if pairs == 1:
                return {"impl": impl, "oom": True}
            pairs //= 2
        finally:
            free_memory()
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    return result


def guarded(fn: Any, *args: Any) -> dict[str, Any]:
    """fn(*args), or {"error": ...} when it raises: one failing part must not cost the
    others' figures (device time is scarce); the suite exits 1 at the end."""
    try:
        return fn(*args)
    except Exception as err:  # noqa: BLE001
        return {"error": f"{type(err).__name__}: {err}"[:500]}
    finally:
        free_memory()


def card_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} thread)"


def measured(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [p for p in points if "tok_per_s" in p]


def best(points: list[dict[str, Any]]) -> dict[str, Any] | None:
    ok = measured(points)
    return max(ok, key=lambda p: p["tok_per_s"]) if ok else None


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """The headline figures: best BDHS tok/s, unmasked tok/s per batch, both MFUs, peaks."""
    sampler, learner = result["sampler"], result["learner"]
    sampler = {"bdhs": [], "unmasked": [], **sampler}
    top = best(sampler["bdhs"])
    return {
        "bdhs_tok_per_s": top["tok_per_s"] if top else None,
        "bdhs_best_rows": top["rows"] if top else None,
        "unmasked_tok_per_s": {
            str(p["rows"]): p["tok_per_s"] for p in measured(sampler["unmasked"])
        },
        "sampler_peak_mem_gib": max(
            (p["peak_mem_gib"] for p in measured(sampler["bdhs"] + sampler["unmasked"])),
            default=None,
        ),
        "learner_mfu": learner["mmalign"].get("mfu"),
        "hf_peft_mfu": learner["hf-peft"].get("mfu"),
        "learner_peak_mem_gib": learner["mmalign"].get("peak_mem_gib"),
        "hf_peft_peak_mem_gib": learner["hf-peft"].get("peak_mem_gib"),
    }


def table(result: dict[str, Any]) -> str:
    """The printed table: one line per figure, target or anchor beside it."""
    s, smp, lrn = result["summary"], result["sampler"], result["learner"]
    head = f"GPU suite, {result['shape']} ({result['model_shape']}) on {result['card']}"
    lines = [head]
    if result["smoke"]:
        lines.append("SMOKE RUN (tiny shape on CPU): proves the suite runs; NOT a figure")
    lines.append(f"{'figure':<40} {'value':>14} {'peak GiB':>9} {'prep s':>7}  target / anchor")

    def line(name: str, value: str, mem: Any, note: str = "", prep: Any = None) -> None:
        mem_s = "-" if mem is None else f"{mem:.1f}"
        prep_s = "-" if prep is None else f"{prep:.1f}"
        lines.append(f"{name:<40} {value:>14} {mem_s:>9} {prep_s:>7}  {note}")

    if "error" in smp:
        line("sampler", "ERROR", None, smp["error"])
    n_img = smp.get("image_tokens")
    for p in smp.get("bdhs", []):
        name = f"BDHS drop rho 0.99, {p['rows']} rows"
        if "tok_per_s" not in p:
            line(name, "OOM" if p.get("oom") else "skipped", None)
            continue
        name += f" ({p['requests']} req)"
        note = (
            f">= {TARGETS['bdhs_tok_per_s']:,.0f} tok/s per H100" if p is best(smp["bdhs"]) else ""
        )
        line(name, f"{p['tok_per_s']:,.0f} tok/s", p["peak_mem_gib"], note, p["preprocess_s"])
    for p in smp.get("unmasked", []):
        name = f"unmasked ({n_img} image tokens), batch {p['rows']}"
        if "tok_per_s" not in p:
            line(name, "OOM" if p.get("oom") else "skipped", None)
            continue
        note = ANCHORS["naive_generate_batch24_full_image"] if p["rows"] == 24 else ""
        line(name, f"{p['tok_per_s']:,.0f} tok/s", p["peak_mem_gib"], note, p["preprocess_s"])
    for impl, note in (("mmalign", ">= 45 % MFU"), ("hf-peft", ANCHORS["hf_peft_dpo_mfu"])):
        r = lrn[impl]
        name = f"learner {impl}, {r.get('batch_pairs', '?')} pairs"
        if r.get("oom") or "error" in r:
            line(name, "OOM" if r.get("oom") else "ERROR", None, r.get("error", note))
            continue
        mfu = "n/a" if r.get("mfu") is None else f"{100 * r['mfu']:.1f} % MFU"
        line(name, mfu, r.get("peak_mem_gib"), note)
    bdhs_tps, mfu = s["bdhs_tok_per_s"], s["learner_mfu"]
    lines.append(
        f"headline: BDHS {'-' if bdhs_tps is None else f'{bdhs_tps:,.0f}'} tok/s "
        f"(target >= {TARGETS['bdhs_tok_per_s']:,.0f}); learner MFU "
        f"{'-' if mfu is None else f'{100 * mfu:.1f} %'} (target >= 45 %)"
    )
    lines.append(f"(anchor, not rerun here: {ANCHORS['naive_generate_70tok_batch256']})")
    lines.append(f"peak GiB: {result['memory']}; prep s: image preprocessing inside the call")
    lines.append(f"wall {result['wall_s']} s")
    return "\n".join(lines)


def parts(result: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [
        ("sampler", result["sampler"]),
        *(("learner " + k, v) for k, v in result["learner"].items()),
    ]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shape", default="llava-1.6-7b", choices=sorted(PLANS))
    ap.add_argument("--device", default="", help="default: cuda for real shapes, cpu for tiny")
    ap.add_argument("--out", default="", help="JSON path (default runs/gpu_suite_<shape>.json)")
    args = ap.parse_args(argv)
    plan = PLANS[args.shape]
    device = args.device or ("cpu" if args.shape == "tiny" else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--shape {args.shape} needs a CUDA GPU (try --shape tiny on CPU)")
    if not device.startswith("cuda"):
        torch.set_num_threads(1)  # shared CPUs; the tiny shape gains nothing from more
    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "bench": "gpu_suite",
        "shape": args.shape,
        "smoke": not device.startswith("cuda"),
        "model_shape": plan.model_shape,
        "device": device,
        "card": card_name(device),
        "memory": "torch.cuda.max_memory_allocated per point"
        if device.startswith("cuda")
        else "process peak RSS (CPU: cumulative, not per point)",
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "torch": torch.__version__,
        "plan": asdict(plan),
        "targets": TARGETS,
        "anchors": ANCHORS,
    }
    result["sampler"] = guarded(run_sampler, plan, device)
    result["learner"] = {
        impl: guarded(run_learner, plan, device, impl) for impl in ("mmalign", "hf-peft")
    }
    result["summary"] = summary(result)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    forbidden = sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN)
    result["ray_or_vllm_imported"] = forbidden
    out = Path(args.out or f"runs/gpu_suite_{args.shape}.json")  # runs/ is git-ignored
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"JSON: {out}")
    errors = [part for part, r in parts(result) if "error" in r]
    if errors:
        sys.exit(f"gpu_suite: {errors} failed (see their 'error' in the JSON)")
    if forbidden:
        sys.exit(f"gpu_suite: ray / vllm modules were imported ({forbidden[:5]}): the device "
                 "image has neither")  # fmt: skip
    return result


if __name__ == "__main__":
    main()
