"""Ray-free evaluation core: POPE (three splits) and CHAIR / Recall for one model.

Flow: `build_requests` turns eval records into prompts (POPE questions + one description
prompt per image), a `generate` callable answers them in batches, `score_responses` turns
the answers into a JSON-able report, `format_report` prints it. `evaluate` chains the three;
`pipelines/evaluate.py` can instead run `generate` over the requests with Ray Data and
call `score_responses` on the collected answers.

Eval records use the ShapesWorld generator's format:
    {"id": str, "image": PNG bytes, "objects": [{"name": "<colour> <shape>", ...}, ...], ...}
Any other dataset works with its own `ObjectVocabulary` (e.g. COCO synonyms) as long as
the object names are classes of that vocabulary.

Generation is assumed deterministic (greedy): a (image, prompt) pair that occurs in several
POPE splits (the positives are shared) is generated once and its answer reused.
"""

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from mmalign.metrics.chair import compute_chair
from mmalign.metrics.pope import (
    DEFAULT_TEMPLATE,
    POPE_SPLITS,
    ObjectStats,
    build_pope_questions,
    mean_f1,
    score_pope,
)
from mmalign.metrics.vocab import ObjectVocabulary, shapes_vocabulary
from mmalign.shapes.templates import DESCRIBE_PROMPTS

# batch of (PNG bytes, prompt) -> one response string per item, same order.
GenerateFn = Callable[[list[tuple[bytes, str]]], list[str]]

DEFAULT_DESCRIBE_PROMPT = DESCRIBE_PROMPTS[0]


@dataclass(frozen=True)
class EvalRequest:
    """One prompt to answer about one image; POPE fields are empty for descriptions."""

    image_id: str
    prompt: str
    kind: Literal["pope", "describe"]
    split: str = ""  # POPE split
    object: str = ""  # POPE object class
    label: bool = False  # POPE: object present


def ground_truth(record: Mapping[str, Any]) -> frozenset[str]:
    """Distinct object classes of one eval record (`record["objects"][i]["name"]`)."""
    return frozenset(str(obj["name"]) for obj in record["objects"])


def ground_truths(records: Iterable[Mapping[str, Any]]) -> dict[str, frozenset[str]]:
    """image id -> ground-truth classes, in record order; duplicate ids are an error."""
    truths: dict[str, frozenset[str]] = {}
    for record in records:
        image_id = str(record["id"])
        if image_id in truths:
            raise ValueError(f"duplicate eval record id {image_id!r}")
        truths[image_id] = ground_truth(record)
    return truths


def build_requests(
    truths: Mapping[str, frozenset[str]],
    vocab: ObjectVocabulary,
    *,
    seed: int = 0,
    splits: Sequence[str] = POPE_SPLITS,
    max_positives: int | None = None,
    stats: ObjectStats | None = None,
    pope_template: str = DEFAULT_TEMPLATE,
    describe_prompt: str = DEFAULT_DESCRIBE_PROMPT,
) -> list[EvalRequest]:
    """All POPE questions (each split) then one description request per image.

    `stats` defaults to statistics over `truths`; when requests are built per shard, pass
    the statistics of the whole eval set so "popular"/"adversarial" stay global.
    """
    annotations = list(truths.items())
    if stats is None:
        stats = ObjectStats.from_annotations(truths.values())
    requests = [
        EvalRequest(q.image_id, q.question, "pope", q.split, q.object, q.label)
        for split in splits
        for q in build_pope_questions(
            annotations,
            vocab.classes,
            split,
            seed=seed,
            max_positives=max_positives,
            stats=stats,
            template=pope_template,
        )
    ]
    requests += [EvalRequest(image_id, describe_prompt, "describe") for image_id in truths]
    return requests


def score_responses(
    requests: Sequence[EvalRequest],
    responses: Sequence[str],
    truths: Mapping[str, frozenset[str]],
    vocab: ObjectVocabulary,
) -> dict[str, Any]:
    """Report dict (JSON-able; all rates are fractions in [0, 1]).

    {"pope": {split: PopeScores fields}, "pope_mean_f1": float (mean F1 over the splits),
     "chair": ChairResult fields, "n_images": int, "n_requests": int}
    """
    if len(requests) != len(responses):
        raise ValueError(f"{len(requests)} requests but {len(responses)} responses")
    pope: dict[str, Any] = {}
    splits = list(dict.fromkeys(r.split for r in requests if r.kind == "pope"))
    scores = {}
    for split in splits:
        pairs = [(r.label, a) for r, a in zip(requests, responses, strict=True) if r.split == split]
        scores[split] = score_pope([lab for lab, _ in pairs], [a for _, a in pairs])
        pope[split] = asdict(scores[split])
    descriptions = [
        (a, truths[r.image_id])
        for r, a in zip(requests, responses, strict=True)
        if r.kind == "describe"
    ]
    chair = compute_chair(descriptions, vocab)
    return {
        "pope": pope,
        "pope_mean_f1": mean_f1(scores),
        "chair": asdict(chair),
        "n_images": len(truths),
        "n_requests": len(requests),
    }


def answer_all(
    generate: GenerateFn,
    requests: Sequence[EvalRequest],
    images: Mapping[str, bytes],
    batch_size: int = 32,
) -> list[str]:
    """Answer every request; identical (image, prompt) pairs are generated once.

    `images` maps image id -> PNG bytes. Returns one response per request, in order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    unique = list(dict.fromkeys((r.image_id, r.prompt) for r in requests))
    answers: dict[tuple[str, str], str] = {}
    for start in range(0, len(unique), batch_size):
        keys = unique[start : start + batch_size]
        out = generate([(images[image_id], prompt) for image_id, prompt in keys])
        if len(out) != len(keys):
            raise ValueError(f"generate returned {len(out)} responses for {len(keys)} prompts")
        answers.update(zip(keys, out, strict=True))
    return [answers[(r.image_id, r.prompt)] for r in requests]


def evaluate(
    generate: GenerateFn,
    records: Sequence[Mapping[str, Any]],
    *,
    vocab: ObjectVocabulary | None = None,
    batch_size: int = 32,
    seed: int = 0,
    splits: Sequence[str] = POPE_SPLITS,
    max_positives: int | None = None,
    pope_template: str = DEFAULT_TEMPLATE,
    describe_prompt: str = DEFAULT_DESCRIBE_PROMPT,
) -> dict[str, Any]:
    """POPE + CHAIR report for `generate` on eval records (see `score_responses`).

    `vocab` defaults to the ShapesWorld vocabulary.
    """
    vocab = vocab or shapes_vocabulary()
    truths = ground_truths(records)
    images = {str(r["id"]): r["image"] for r in records}
    requests = build_requests(
        truths,
        vocab,
        seed=seed,
        splits=splits,
        max_positives=max_positives,
        pope_template=pope_template,
        describe_prompt=describe_prompt,
    )
    responses = answer_all(generate, requests, images, batch_size)
    return score_responses(requests, responses, truths, vocab)


def report_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """Flat headline numbers for loggers: "pope/<split>/f1", "pope/mean_f1", "chair/chair_i"..."""
    flat: dict[str, float] = {"pope/mean_f1": float(report["pope_mean_f1"])}
    for split, s in report["pope"].items():
        for key in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
            flat[f"pope/{split}/{key}"] = float(s[key])
    for key in ("chair_i", "chair_s", "recall"):
        flat[f"chair/{key}"] = float(report["chair"][key])
    return flat


def format_report(report: Mapping[str, Any]) -> str:
    """Small text table of a report, rates in percent (as in the papers)."""
    lines = [f"{'POPE':<12}{'acc':>8}{'prec':>8}{'rec':>8}{'F1':>8}{'yes%':>8}{'other':>7}"]
    for split, s in report["pope"].items():
        rates = (s["accuracy"], s["precision"], s["recall"], s["f1"], s["yes_ratio"])
        lines.append(
            f"{split:<12}" + "".join(f"{100 * v:8.2f}" for v in rates) + f"{s['n_other']:7d}"
        )
    lines.append(f"{'mean F1':<12}{'':>24}{100 * report['pope_mean_f1']:8.2f}")
    c = report["chair"]
    lines.append(f"{'CHAIR_i':>8}{'CHAIR_s':>9}{'Recall':>9}")
    lines.append(f"{100 * c['chair_i']:8.2f}{100 * c['chair_s']:9.2f}{100 * c['recall']:9.2f}")
    lines.append(
        f"({c['n_mentions']} mentions in {c['n_descriptions']} descriptions, "
        f"{c['n_descriptions_without_mentions']} without any; {report['n_images']} images)"
    )
    return "\n".join(lines)


# (header, report_metrics key) of the headline numbers every quality table starts with.
HEADLINE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("CHAIR_i", "chair/chair_i"),
    ("CHAIR_s", "chair/chair_s"),
    ("Recall", "chair/recall"),
    ("POPE F1 (mean)", "pope/mean_f1"),
)


def markdown_table(
    rows: Sequence[tuple[str, Mapping[str, Any]]], columns: Sequence[tuple[str, str]]
) -> str:
    """Markdown table of flat metrics (`report_metrics` keys): one line per (label, metrics),
    one column per (header, key). Floats are rates shown in percent; ints (counts) as they
    are; a missing key is "-"."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        return str(value) if isinstance(value, int) else f"{100 * value:.1f}"

    lines = ["| policy | " + " | ".join(h for h, _ in columns) + " |"]
    lines.append("|---" * (len(columns) + 1) + "|")
    for label, m in rows:
        lines.append(f"| {label} | " + " | ".join(cell(m.get(k)) for _, k in columns) + " |")
    return "\n".join(lines)


# (label, getter) of the figures a run prints for the base policy beside the trained one.
HEADLINE: tuple[tuple[str, str, str], ...] = (
    ("CHAIR_i", "chair", "chair_i"),
    ("CHAIR_s", "chair", "chair_s"),
    ("Recall", "chair", "recall"),
    ("POPE F1 (mean)", "", "pope_mean_f1"),
)


def headline(report: Mapping[str, Any]) -> dict[str, float]:
    """The HEADLINE figures of a report, as rates in [0, 1]."""
    return {
        label: float(report[section][key] if section else report[key])
        for label, section, key in HEADLINE
    }


def format_comparison(base: Mapping[str, float], final: Mapping[str, float]) -> str:
    """Base policy vs trained policy, in percent, with the change (lower CHAIR is better)."""
    lines = [f"{'':<16}{'base':>8}{'trained':>9}{'change':>8}"]
    for label in base:
        b, f = 100 * base[label], 100 * final[label]
        lines.append(f"{label:<16}{b:8.2f}{f:9.2f}{f - b:+8.2f}")
    return "\n".join(lines)
