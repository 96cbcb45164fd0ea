"""Bytes the vLLM engine's HF image-embedding side holds vs a full HF copy, per shape.

    python bench/bench_embedding_side.py                 # LLaVA-1.6-7B and -34B, bf16
    python bench/bench_embedding_side.py --shapes llava-1.6-7b llava-7b --dtype float32

With sampler.engine "vllm" the HF copy only computes prompt embeddings: the vision tower,
the projector, LLaVA-1.6's image_newline and the text embedding table stay; the decoder
layers and the LM head (vLLM has its own) can go. Counted on the meta device (no weights
are allocated, so the 34B shape needs no memory). The kept rule is the one
mmalign/engines/embedding_side.py uses (`KEPT`, name fragments); this file keeps its own
copy so it runs where that module is absent.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# name fragments of the parameters the embedding side keeps
KEPT = ("vision_tower.", "multi_modal_projector.", "embed_tokens.", "image_newline")


def parameter_bytes(model: Any) -> dict[str, int]:
    """{"full", "embedding_side"} bytes of a LLaVA's parameters (meta tensors count too),
    plus the same two as parameter counts ("full_params", "embedding_side_params")."""
    out = dict.fromkeys(("full", "embedding_side", "full_params", "embedding_side_params"), 0)
    for name, p in model.named_parameters():
        kept = any(k in name for k in KEPT)
        for suffix, n in (("", p.numel() * p.element_size()), ("_params", p.numel())):
            out["full" + suffix] += n
            out["embedding_side" + suffix] += n if kept else 0
    return out


def measure(shape: str, dtype: str = "bfloat16") -> dict[str, Any]:
    """parameter_bytes of `shape` (bench/llava_shapes.py) built on the meta device."""
    from bench.llava_shapes import build_llava

    model, _ = build_llava(shape, device="meta", dtype=dtype)
    counts = parameter_bytes(model)
    return {
        "shape": shape,
        "dtype": dtype,
        **counts,
        "full_gb": round(counts["full"] / 1e9, 2),
        "embedding_side_gb": round(counts["embedding_side"] / 1e9, 2),
        "share": round(counts["embedding_side"] / counts["full"], 4),
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["llava-1.6-7b", "llava-1.6-34b"])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = ap.parse_args(argv)
    rows = [measure(s, args.dtype) for s in args.shapes]
    print(
        f"{'shape':<16} {'params':>8} {'full GB':>8} {'kept params':>12} {'kept GB':>8} {'kept':>6}"
    )
    for r in rows:
        print(
            f"{r['shape']:<16} {r['full_params'] / 1e9:>7.2f}B {r['full_gb']:>8.2f} "
            f"{r['embedding_side_params'] / 1e9:>11.3f}B {r['embedding_side_gb']:>8.2f} "
            f"{100 * r['share']:>5.1f}%"
        )
    print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
