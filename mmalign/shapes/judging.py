"""Synthetic judging examples from ShapesWorld annotations (trains the embedded judge).

One example = one image + a question + two candidate answers + the verdict a careful
judge would write, e.g. for a description question:

    Response 1: There is a red circle. There is a blue box.
    Response 2: There is a red circle.
    target:     "Response 1. Response 2 leaves out the blue box."

Kinds (`JUDGING_KINDS`), the better answer is always faithful to the annotations:
- "swap_shape" / "swap_colour": the worse answer names one object with a wrong shape /
  colour (a class absent from the image).
- "add": the worse answer adds an absent object; "bias": it adds the bias partner of a
  trigger that is present (the co-occurrence hallucination a biased policy makes).
- "incomplete": both faithful, the worse one leaves objects out (less helpful).
- "existence": a yes/no question, the worse answer is the wrong one.
In the hallucination kinds the faithful answer itself sometimes leaves an object out, so
the judge learns that one invented object outweighs completeness (ALGORITHMS.md 4).

Everything is a pure function of (WorldConfig, split, index): record `index` of `split`
supplies the image and its objects, an RNG seeded by the same triple the rest. The target
text always starts with the winning label, so `mmalign.judge_parse.parse_judge_output`
reads it back exactly.
"""

from __future__ import annotations

import random
from typing import Any

from mmalign.judge import format_judge_prompt
from mmalign.shapes import templates as T
from mmalign.shapes.vocab import COLOURS, OBJECT_CLASSES, SHAPES
from mmalign.shapes.world import WorldConfig, generate_record, surface

JUDGING_KINDS: tuple[str, ...] = (
    "swap_shape",
    "swap_colour",
    "add",
    "bias",
    "incomplete",
    "existence",
)
# Relative frequency of each kind (a kind that does not fit an image falls back to "add").
KIND_WEIGHTS: tuple[float, ...] = (0.2, 0.2, 0.2, 0.1, 0.2, 0.1)


def _describe(names: list[str], cfg: WorldConfig, rng: random.Random) -> str:
    return " ".join(T.THERE_IS.format(obj=surface(n, cfg, rng)) for n in names)


def _absent(present: list[str], rng: random.Random) -> str:
    return rng.choice([c for c in OBJECT_CLASSES if c not in present])


def _hallucinated(
    kind: str, present: list[str], cfg: WorldConfig, rng: random.Random
) -> tuple[str, list[str], str]:
    """(kind actually used, object list of the worse answer, the invented class)."""
    names = list(present)
    if kind in ("swap_shape", "swap_colour"):
        i = rng.randrange(len(names))
        colour, shape = names[i].split(" ")
        if kind == "swap_shape":
            options = [f"{colour} {s}" for s in SHAPES if f"{colour} {s}" not in present]
        else:
            options = [f"{c} {shape}" for c in COLOURS if f"{c} {shape}" not in present]
        if options:
            names[i] = rng.choice(options)
            return kind, names, names[i]
        kind = "add"
    if kind == "bias":
        partners = [p for t, p in cfg.bias_pairs if t in present and p not in present]
        if partners:
            invented = rng.choice(partners)
            names.insert(rng.randint(0, len(names)), invented)
            return kind, names, invented
        kind = "add"
    invented = _absent(present, rng)
    names.insert(rng.randint(0, len(names)), invented)
    return "add", names, invented


def make_judging_example(
    cfg: WorldConfig, split: str, index: int, style: str = "compact"
) -> dict[str, Any]:
    """Judging example built on record `index` of `split` (deterministic).

    Returns a record in the SFT layout (id, image PNG bytes, conversations, objects,
    task="judge") plus the pair fields the judge evaluation needs: question,
    response_1/response_2 (presentation order of the conversation), better ("1"/"2"),
    kind, chosen, rejected. The human turn is "<image>\\n" + `format_judge_prompt(...,
    style)`, exactly what `JudgeEngine` sends for that presentation order.
    """
    record = generate_record(cfg, split, index)
    rng = random.Random(f"judging:{cfg.seed}:{split}:{index}")
    present = [o["name"] for o in record["objects"]]
    kind = rng.choices(JUDGING_KINDS, weights=KIND_WEIGHTS)[0]
    if kind == "incomplete" and len(present) < 2:
        kind = "add"
    if kind == "existence":
        question, chosen, rejected, why = _existence(present, cfg, rng)
    else:
        question = rng.choice(T.DESCRIBE_PROMPTS)
        if kind == "incomplete":
            keep = sorted(rng.sample(range(len(present)), rng.randint(1, len(present) - 1)))
            missing = [n for i, n in enumerate(present) if i not in keep]
            chosen = _describe(present, cfg, rng)
            rejected = _describe([present[i] for i in keep], cfg, rng)
            why = "{loser} leaves out the " + surface(rng.choice(missing), cfg, rng) + "."
        else:
            kind, bad_names, invented = _hallucinated(kind, present, cfg, rng)
            good_names = list(present)
            if len(good_names) >= 2 and rng.random() < 0.3:  # faithful but incomplete
                good_names.pop(rng.randrange(len(good_names)))
            chosen = _describe(good_names, cfg, rng)
            rejected = _describe(bad_names, cfg, rng)
            phrase = surface(invented, cfg, rng)
            why = "{loser} mentions a " + phrase + ", which is not in the image."
    better = rng.choice(("1", "2"))
    loser = "Response 2" if better == "1" else "Response 1"
    r1, r2 = (chosen, rejected) if better == "1" else (rejected, chosen)
    target = f"Response {better}. " + why.format(loser=loser)
    return {
        "id": f"judge-{split}-{index:06d}",
        "image": record["image"],
        "conversations": [
            {"from": "human", "value": "<image>\n" + format_judge_prompt(question, r1, r2, style)},
            {"from": "gpt", "value": target},
        ],
        "objects": record["objects"],
        "task": "judge",
        "kind": kind,
        "question": question,
        "response_1": r1,
        "response_2": r2,
        "better": better,
        "chosen": chosen,
        "rejected": rejected,
    }


def _existence(
    present: list[str], cfg: WorldConfig, rng: random.Random
) -> tuple[str, str, str, str]:
    """(question, right answer, wrong answer, explanation template) for a yes/no question."""
    if rng.random() < 0.5:
        phrase = surface(rng.choice(present), cfg, rng)
        right, wrong = T.YES, T.NO
        why = "{loser} says no, but there is a " + phrase + "."
    else:
        phrase = surface(_absent(present, rng), cfg, rng)
        right, wrong = T.NO, T.YES
        why = "{loser} says yes, but there is no " + phrase + "."
    return T.EXISTENCE_PROMPT.format(obj=phrase), right, wrong, why


def judging_examples(
    cfg: WorldConfig, split: str, indices: range | list[int], style: str = "compact"
) -> list[dict[str, Any]]:
    """`make_judging_example` for each index."""
    return [make_judging_example(cfg, split, i, style) for i in indices]


def judge_row(example: dict[str, Any], flip: bool = False) -> dict[str, Any]:
    """JudgeEngine pair row of an example (`mmalign.engines.judge_engine.JUDGE_COLUMNS`)
    plus `label`, the better of response_a / response_b ("a"/"b").

    response_a is the example's Response 1 (Response 2 when `flip`).
    """
    a, b = example["response_1"], example["response_2"]
    label = "a" if example["better"] == "1" else "b"
    if flip:
        a, b, label = b, a, ("b" if label == "a" else "a")
    return {
        "image": {"bytes": example["image"], "path": None},
        "question": example["question"],
        "response_a": a,
        "response_b": b,
        "objects": [o["name"] for o in example["objects"]],
        "label": label,
        "kind": example["kind"],
    }
