"""ShapesWorld: determinism, captions true to annotations and pixels, bias as configured."""

from __future__ import annotations

import re

import pytest

from mmalign.shapes import templates as T
from mmalign.shapes.render import RGB, from_png
from mmalign.shapes.vocab import OBJECT_CLASSES, SHAPE_SYNONYMS
from mmalign.shapes.world import WorldConfig, generate_record, generate_split, grid_cell

CANONICAL = {syn: shape for shape, syns in SHAPE_SYNONYMS.items() for syn in syns}


def _parse_description(text: str) -> list[str]:
    sentences = re.findall(r"There is a (\w+) (\w+)\.", text)
    assert len(sentences) == text.count("."), text
    return [f"{colour} {CANONICAL[word]}" for colour, word in sentences]


def test_deterministic_by_seed_and_prefix_stable_on_cpu() -> None:
    cfg = WorldConfig(seed=3)
    a = generate_split(cfg, "sft", 40)
    assert a == generate_split(cfg, "sft", 40)
    assert generate_split(cfg, "sft", 10) == a[:10]
    assert generate_record(cfg, "sft", 17) == a[17]
    other = generate_split(WorldConfig(seed=4), "sft", 40)
    assert [r["image"] for r in other] != [r["image"] for r in a]
    evals = generate_split(cfg, "eval", 40)
    assert not {r["image"] for r in evals} & {r["image"] for r in a}
    assert len({r["id"] for r in a}) == 40 and a[5]["id"] == "sft-000005"


def test_captions_and_answers_agree_with_annotations_on_cpu() -> None:
    cfg = WorldConfig(seed=1)
    records = generate_split(cfg, "sft", 400)
    assert {r["task"] for r in records} == {"describe", "existence", "count", "colour", "position"}
    for r in records:
        human, gpt = r["conversations"]
        assert human["from"] == "human" and gpt["from"] == "gpt"
        assert human["value"].startswith("<image>\n")
        question, answer = human["value"][len("<image>\n") :], gpt["value"]
        names = [o["name"] for o in r["objects"]]
        assert 1 <= len(names) <= cfg.max_objects and len(set(names)) == len(names)
        for o in r["objects"]:
            assert o["name"] == f"{o['colour']} {o['shape']}" and o["name"] in OBJECT_CLASSES
        if r["task"] == "describe":
            assert question in T.DESCRIBE_PROMPTS
            assert _parse_description(answer) == names  # reading order, one per object
        elif r["task"] == "existence":
            m = re.fullmatch(r"Is there a (\w+) (\w+) in the image\?", question)
            assert m is not None
            present = f"{m[1]} {CANONICAL[m[2]]}" in names
            assert answer == (T.YES if present else T.NO)
        elif r["task"] == "count":
            n = len(names)
            assert answer == ("There is 1 object." if n == 1 else f"There are {n} objects.")
        elif r["task"] == "colour":
            m = re.fullmatch(r"What colour is the (\w+)\?", question)
            assert m is not None
            matches = [o for o in r["objects"] if o["shape"] == CANONICAL[m[1]]]
            assert len(matches) == 1
            assert answer == f"The {m[1]} is {matches[0]['colour']}."
        else:
            m = re.fullmatch(r"Where is the (\w+) (\w+)\?", question)
            assert m is not None
            obj = next(o for o in r["objects"] if o["name"] == f"{m[1]} {CANONICAL[m[2]]}")
            where = T.grid_name(*grid_cell(obj, cfg.image_size))
            assert answer == f"The {m[1]} {m[2]} is at the {where}."


def test_object_pixels_have_annotated_colour_on_cpu() -> None:
    cfg = WorldConfig(seed=2)
    for r in generate_split(cfg, "eval", 60):
        img = from_png(r["image"])
        assert img.size == (cfg.image_size, cfg.image_size)
        for o in r["objects"]:
            # The centre pixel lies inside every shape (circle, square, triangle, cross).
            px = img.getpixel((int(o["x"]), int(o["y"])))
            nearest = min(RGB, key=lambda c: sum((a - b) ** 2 for a, b in zip(RGB[c], px)))
            assert nearest == o["colour"], (r["id"], o, px)


def _cooccurrence(records: list[dict], trigger: str, partner: str) -> tuple[int, int]:
    with_trigger = [r for r in records if any(o["name"] == trigger for o in r["objects"])]
    both = sum(any(o["name"] == partner for o in r["objects"]) for r in with_trigger)
    return both, len(with_trigger)


def test_bias_ratio_as_configured_and_eval_unbiased_on_cpu() -> None:
    cfg = WorldConfig(seed=0, bias_strength=0.85, task_weights=(("count", 1.0),))
    sft = generate_split(cfg, "sft", 3000)
    evals = generate_split(cfg, "eval", 3000)
    both = total = eval_both = eval_total = 0
    for trigger, partner in cfg.bias_pairs:
        b, t = _cooccurrence(sft, trigger, partner)
        both, total = both + b, total + t
        b, t = _cooccurrence(evals, trigger, partner)
        eval_both, eval_total = eval_both + b, eval_total + t
    # ~390 trigger images: binomial std of the ratio ~0.018, so 0.05 is ~3 sigma.
    assert total > 300 and abs(both / total - 0.85) < 0.05, both / total
    # Unbiased: partner present about as often as any class, (E[k] - 1) / 23 ~ 0.065.
    assert eval_total > 300 and eval_both / eval_total < 0.12, eval_both / eval_total
    # The "pref" split carries the same bias as "sft".
    pref = generate_split(cfg, "pref", 1500)
    b, t = map(sum, zip(*(_cooccurrence(pref, *p) for p in cfg.bias_pairs), strict=True))
    assert abs(b / t - 0.85) < 0.08

    zero = WorldConfig(seed=0, bias_strength=0.0, task_weights=(("count", 1.0),))
    b, t = _cooccurrence(generate_split(zero, "sft", 1500), *cfg.bias_pairs[0])
    assert t > 0 and b == 0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"bias_pairs": (("red circle", "blue square"), ("blue square", "red cross"))}, "bias"),
        ({"bias_pairs": (("red blob", "blue square"),)}, "bias_pairs"),
        ({"bias_strength": 1.5}, "bias_strength"),
        ({"caption_noise": -0.1}, "caption_noise"),
        ({"hard_negatives": (("train", 0.5),)}, "hard_negatives"),
        ({"hard_negatives": (("pref", 2.0),)}, "hard_negatives"),
        ({"hard_negatives": ("pref", 0.5)}, "hard_negatives"),
        ({"hard_negatives": (("pref", 0.5), ("pref", 0.1))}, "hard_negatives"),
        ({"max_objects": 0}, "max_objects"),
        ({"task_weights": (("dance", 1.0),)}, "task_weights"),
        ({"split_sizes": (("train", 5),)}, "split_sizes"),
    ],
)
def test_bad_config_names_the_field_on_cpu(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"WorldConfig.{field}"):
        WorldConfig(**kwargs)


def test_split_sizes_and_unknown_split_on_cpu() -> None:
    cfg = WorldConfig(split_sizes=(("sft", 7), ("eval", 3)))
    assert len(generate_split(cfg, "sft")) == 7 and len(generate_split(cfg, "eval")) == 3
    assert generate_split(cfg, "pref") == []
    with pytest.raises(ValueError, match="split"):
        generate_split(cfg, "train")


def _describes(records: list[dict]) -> list[tuple[set[str], list[str]]]:
    return [
        ({o["name"] for o in r["objects"]}, _parse_description(r["conversations"][1]["value"]))
        for r in records
        if r["task"] == "describe"
    ]


def test_caption_noise_claims_absent_partners_in_sft_only_on_cpu() -> None:
    clean = WorldConfig(seed=2, bias_strength=0.5, task_weights=(("describe", 1.0),))
    noisy = WorldConfig(
        seed=2, bias_strength=0.5, caption_noise=1.0, task_weights=(("describe", 1.0),)
    )
    partners = dict(noisy.bias_pairs)
    claimed = eligible = 0
    for truth, said in _describes(generate_split(noisy, "sft", 600)):
        for trigger, partner in partners.items():
            if trigger in truth and partner not in truth:
                eligible += 1
                claimed += partner in said
                # named right after its trigger, the true objects all still named
                assert said[said.index(trigger) + 1] == partner, (truth, said)
        assert set(said) - truth <= set(partners.values()), (truth, said)
        assert truth <= set(said)
    assert eligible > 50 and claimed == eligible
    for split in ("pref", "eval"):  # faithful answers outside "sft"
        assert generate_split(noisy, split, 100) == generate_split(clean, split, 100)


def test_no_caption_noise_draws_nothing_extra_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """At caption_noise 0 the noise code is never entered, so no RNG draw shifts a record."""
    import mmalign.shapes.world as W

    def boom(*_: object) -> None:
        raise AssertionError("claimed_objects called at caption_noise 0")

    monkeypatch.setattr(W, "claimed_objects", boom)
    assert len(generate_split(WorldConfig(seed=2, bias_strength=0.5), "sft", 200)) == 200


def test_caption_noise_reaches_existence_answers_not_other_tasks_on_cpu() -> None:
    cfg = WorldConfig(seed=5, bias_strength=0.0, caption_noise=1.0)
    partners = dict(cfg.bias_pairs)
    noisy_yes = 0
    for r in generate_split(cfg, "sft", 1500):
        truth = {o["name"] for o in r["objects"]}
        question, answer = (c["value"] for c in r["conversations"])
        if r["task"] == "existence" and answer == T.YES:
            colour, word = re.findall(r"Is there a (\w+) (\w+) in", question)[0]
            name = f"{colour} {CANONICAL[word]}"
            if name not in truth:  # only ever the absent partner of a present trigger
                assert any(partners.get(t) == name for t in truth), (truth, question)
                noisy_yes += 1
        if r["task"] == "count":  # the true number, not the claimed one
            n = int(re.findall(r"\d+", answer)[0])
            assert n == len(r["objects"]), (answer, truth)
    assert noisy_yes > 5


def test_train_tiny_flags_reach_the_world_on_cpu() -> None:
    from pipelines.train_tiny import parse_args, world_config

    args = parse_args(["--out", "x", "--caption-noise", "0.7", "--sft-hard-negatives", "0.3"])
    world = world_config(args)
    assert world.caption_noise == 0.7
    assert dict(world.hard_negatives) == {"sft": 0.3, "pref": 0.5}


def _negative_siblings(records: list[dict]) -> tuple[int, int]:
    siblings = negatives = 0
    for r in records:
        if r["task"] != "existence" or r["conversations"][1]["value"] != T.NO:
            continue
        colour, word = re.findall(r"Is there a (\w+) (\w+) in", r["conversations"][0]["value"])[0]
        names = {o["name"] for o in r["objects"]}
        assert f"{colour} {CANONICAL[word]}" not in names  # still a true "No"
        negatives += 1
        siblings += any(n.split()[0] == colour or n.split()[1] == CANONICAL[word] for n in names)
    return siblings, negatives


def test_hard_negatives_probe_siblings_in_the_listed_split_on_cpu() -> None:
    cfg = WorldConfig(seed=0, task_weights=(("existence", 1.0),), hard_negatives=(("pref", 1.0),))
    s, n = _negative_siblings(generate_split(cfg, "pref", 400))
    assert n > 150 and s == n
    # unlisted splits draw any absent class: siblings only by chance (~2/3 here)
    s, n = _negative_siblings(generate_split(cfg, "sft", 400))
    assert n > 150 and s < 0.8 * n
    assert dict(WorldConfig().hard_negatives) == {"pref": 0.5}
