"""Hallucination metrics (vocabulary, CHAIR, POPE) against hand-computed numbers."""

import random

import pytest

from mmalign.metrics.chair import compute_chair, score_description
from mmalign.metrics.pope import (
    POPE_SPLITS,
    ObjectStats,
    build_pope_questions,
    mean_f1,
    parse_yes_no,
    pope_question,
    score_pope,
)
from mmalign.metrics.vocab import (
    ObjectVocabulary,
    parse_synonyms,
    plural_forms,
    shapes_vocabulary,
    synonyms_vocabulary,
)
from mmalign.shapes.templates import EXISTENCE_PROMPT
from mmalign.shapes.vocab import OBJECT_CLASSES

COCO_LIKE = """\
# a comment line, then a blank line

person, girl, boy, man, woman, people, person
dog, puppy, doggy
hot dog, hotdog
cat, kitty
cell phone, phone, mobile phone
cat, kitten
bench, dog
"""


# ---------------------------------------------------------------- vocabulary


def test_shapes_vocabulary_classes_and_synonyms_on_cpu() -> None:
    vocab = shapes_vocabulary()
    assert vocab.classes == OBJECT_CLASSES
    assert vocab.find_mentions("A red disc, a blue box and a green wedge.") == [
        "red circle",
        "blue square",
        "green triangle",
    ]
    assert vocab.find_mentions("ORANGE Plus; purple-block!") == ["orange cross", "purple square"]
    assert vocab.canonical("Red Balls") == "red circle"
    assert vocab.canonical("circle") is None  # a shape alone is not a class


def test_repeats_plurals_and_order_on_cpu() -> None:
    vocab = shapes_vocabulary()
    text = "Two green wedges, yellow crosses, a red circle, blue boxes and another red ball."
    assert vocab.find_mentions(text) == [
        "green triangle",
        "yellow cross",
        "red circle",
        "blue square",
        "red circle",
    ]


def test_empty_and_mention_free_text_on_cpu() -> None:
    vocab = shapes_vocabulary()
    assert vocab.find_mentions("") == []
    assert vocab.find_mentions("   ...  ") == []
    assert vocab.find_mentions("a red thing next to a circle") == []


def test_spans_point_into_original_text_on_cpu() -> None:
    vocab = shapes_vocabulary()
    text = "I see a Red  Disc."
    (m,) = vocab.find_spans(text)
    assert (m.cls, m.start, m.end, m.surface) == ("red circle", 8, 17, "Red  Disc")


def test_coco_synonyms_format_on_cpu() -> None:
    table = parse_synonyms(COCO_LIKE)
    assert list(table) == ["person", "dog", "hot dog", "cat", "cell phone", "bench"]
    assert table["cat"] == ["kitty", "kitten"]  # a class on two lines merges
    vocab = synonyms_vocabulary(COCO_LIKE)
    assert vocab.classes == ("person", "dog", "hot dog", "cat", "cell phone", "bench")
    # "dog" is listed again under "bench": the first class keeps it.
    assert vocab.canonical("dog") == "dog"
    assert vocab.find_mentions("A woman with two puppies and a Kitten on a bench") == [
        "person",
        "dog",
        "cat",
        "bench",
    ]


def test_longest_match_and_word_boundaries_on_cpu() -> None:
    vocab = synonyms_vocabulary(COCO_LIKE)
    # "hot dog" is one mention, not "dog"; hyphens separate words like spaces do.
    assert vocab.find_mentions("a hot dog, a dog, two hot-dogs") == ["hot dog", "dog", "hot dog"]
    assert vocab.find_mentions("his mobile phone and a phone") == ["cell phone", "cell phone"]
    # no matches inside words: "scatter" holds "cat", "dogma" holds "dog", "mankind" "man"
    assert vocab.find_mentions("scatter the dogma of mankind") == []
    assert vocab.find_mentions("men, women and people") == ["person", "person", "person"]


def test_plural_rules_on_cpu() -> None:
    assert plural_forms("circle") == ("circles",)
    assert plural_forms("box") == ("boxes",)
    assert plural_forms("cross") == ("crosses",)
    assert plural_forms("puppy") == ("puppies",)
    assert plural_forms("toy") == ("toys",)
    assert plural_forms("person") == ("people",)
    assert plural_forms("policeman") == ("policemen",)
    assert plural_forms("knife") == ("knives",)
    assert plural_forms("sheep") == ()


def test_explicit_phrase_beats_generated_plural_on_cpu() -> None:
    vocab = ObjectVocabulary({"glass": [], "eyeglasses": ["glasses", "spectacles"]})
    assert vocab.find_mentions("a glass and his glasses") == ["glass", "eyeglasses"]


def test_conflicting_phrase_is_an_error_by_default_on_cpu() -> None:
    with pytest.raises(ValueError, match="names both"):
        ObjectVocabulary({"dog": ["puppy"], "cat": ["puppy"]})
    vocab = ObjectVocabulary({"dog": ["puppy"], "cat": ["puppy"]}, on_conflict="first")
    assert vocab.find_mentions("puppy") == ["dog"]


# ---------------------------------------------------------------- CHAIR


def test_chair_hand_computed_on_cpu() -> None:
    vocab = shapes_vocabulary()
    items = [
        # mentions: red circle, blue circle (hallucinated), red circle -> 3 mentions, 1 bad
        ("A red circle and a blue disc and a red ball.", {"red circle", "green square"}),
        ("A green box.", {"green square"}),  # 1 mention, all correct
        ("", {"yellow cross"}),  # empty: no mentions, misses 1
        ("Nothing to see.", {"purple triangle", "orange cross"}),  # misses 2
    ]
    r = compute_chair(items, vocab)
    assert r.n_descriptions == 4
    assert r.n_mentions == 4
    assert r.n_hallucinated_mentions == 1
    assert r.chair_i == pytest.approx(1 / 4)
    assert r.n_descriptions_hallucinating == 1
    assert r.chair_s == pytest.approx(1 / 4)
    assert r.n_descriptions_without_mentions == 2
    assert (r.n_recalled_objects, r.n_ground_truth_objects) == (2, 6)
    assert r.recall == pytest.approx(2 / 6)


def test_chair_repeated_hallucination_counts_every_time_on_cpu() -> None:
    s = score_description(["red circle", "blue cross", "blue cross"], {"red circle"})
    assert s.hallucinated == ("blue cross", "blue cross")
    assert s.recalled == frozenset({"red circle"})
    r = compute_chair(
        [("a red disc, a blue plus, a blue cross", {"red circle"})], shapes_vocabulary()
    )
    assert r.chair_i == pytest.approx(2 / 3)
    assert r.chair_s == 1.0
    assert r.recall == 1.0


def test_chair_zero_denominators_on_cpu() -> None:
    vocab = shapes_vocabulary()
    r = compute_chair([], vocab)
    assert (r.chair_i, r.chair_s, r.recall, r.n_descriptions) == (0.0, 0.0, 0.0, 0)
    r = compute_chair([("", set()), ("no shapes", set())], vocab)
    assert (r.chair_i, r.chair_s, r.recall) == (0.0, 0.0, 0.0)
    assert r.n_descriptions_without_mentions == 2


def test_chair_rejects_unknown_ground_truth_on_cpu() -> None:
    with pytest.raises(ValueError, match="red disc"):
        compute_chair([("a red disc", {"red disc"})], shapes_vocabulary())


# ---------------------------------------------------------------- POPE


def test_pope_question_text_on_cpu() -> None:
    assert pope_question("red circle") == "Is there a red circle in the image?"
    assert pope_question("orange square") == "Is there a orange square in the image?"
    assert pope_question("orange square", EXISTENCE_PROMPT) == pope_question("orange square")
    grammatical = "Is there {article} {object}?"
    assert pope_question("orange square", grammatical) == "Is there an orange square?"
    assert pope_question("dog", grammatical) == "Is there a dog?"


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("Yes", "yes"),
        ("yes.", "yes"),
        ("  YES! There is a red circle.", "yes"),
        ('"No"', "no"),
        ("no, there is not", "no"),
        ("No.", "no"),
        ("Nope", "other"),
        ("yesterday", "other"),
        ("The answer is yes", "other"),
        ("", "other"),
    ],
)
def test_parse_yes_no_on_cpu(response: str, expected: str) -> None:
    assert parse_yes_no(response) == expected


def test_score_pope_hand_computed_on_cpu() -> None:
    labels = [True, True, False, False, True]
    responses = ["Yes", "no", "yes", "No", "maybe"]  # tp, fn, fp, tn, other -> fn
    s = score_pope(labels, responses)
    assert (s.tp, s.fn, s.fp, s.tn, s.n_other, s.n) == (1, 2, 1, 1, 1, 5)
    assert s.accuracy == pytest.approx(2 / 5)
    assert s.precision == pytest.approx(1 / 2)
    assert s.recall == pytest.approx(1 / 3)
    assert s.f1 == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))  # = 0.4
    assert s.yes_ratio == pytest.approx(2 / 5)
    never_yes = score_pope([True, False], ["no", "no"])
    assert (never_yes.precision, never_yes.recall, never_yes.f1) == (0.0, 0.0, 0.0)
    assert mean_f1({"a": s, "b": never_yes}) == pytest.approx(0.2)
    assert mean_f1({}) == 0.0
    with pytest.raises(ValueError):
        score_pope([True], [])


def _random_annotations(n: int, seed: int) -> list[tuple[str, set[str]]]:
    rng = random.Random(seed)
    return [(f"img{i}", set(rng.sample(OBJECT_CLASSES, rng.randint(1, 6)))) for i in range(n)]


@pytest.mark.parametrize("split", POPE_SPLITS)
def test_pope_sampling_properties_on_cpu(split: str) -> None:
    annotations = _random_annotations(40, seed=1)
    present = dict(annotations)
    qs = build_pope_questions(annotations, OBJECT_CLASSES, split, seed=7)
    assert sum(q.label for q in qs) * 2 == len(qs)  # exactly 50% positives
    assert len(qs) == 2 * sum(len(objs) for _, objs in annotations)
    for q in qs:
        assert q.split == split
        assert (q.object in present[q.image_id]) == q.label  # negatives are absent
        assert q.question == pope_question(q.object)
    for image_id, objs in annotations:  # per image: k distinct positives, k distinct negatives
        mine = [q for q in qs if q.image_id == image_id]
        assert len({q.object for q in mine}) == len(mine) == 2 * len(objs)
    # deterministic by seed
    assert qs == build_pope_questions(annotations, OBJECT_CLASSES, split, seed=7)


def test_pope_seed_and_split_behaviour_on_cpu() -> None:
    annotations = _random_annotations(40, seed=2)
    by_split = {
        s: build_pope_questions(annotations, OBJECT_CLASSES, s, seed=0) for s in POPE_SPLITS
    }
    positives = {s: {(q.image_id, q.object) for q in qs if q.label} for s, qs in by_split.items()}
    assert positives["random"] == positives["popular"] == positives["adversarial"]
    other_seed = build_pope_questions(annotations, OBJECT_CLASSES, "random", seed=1)
    assert other_seed != by_split["random"]
    # per-image seeding: an image's questions do not depend on the other images
    alone = build_pope_questions(annotations[5:6], OBJECT_CLASSES, "random", seed=0)
    assert alone == [q for q in by_split["random"] if q.image_id == "img5"]


def test_pope_popular_and_adversarial_hand_made_on_cpu() -> None:
    classes = ["cat", "dog", "car", "bus", "fork", "kite"]
    annotations = [
        ("a", {"dog", "cat"}),
        ("b", {"dog", "cat"}),
        ("c", {"car", "bus"}),
        ("d", {"car", "bus"}),
        ("e", {"car", "bus"}),
        ("q", {"dog"}),
    ]
    stats = ObjectStats.from_annotations(objs for _, objs in annotations)
    assert stats.frequency == {"cat": 2, "dog": 3, "car": 3, "bus": 3}
    assert stats.cooccurrence[("dog", "cat")] == stats.cooccurrence[("cat", "dog")] == 2

    def negatives(split: str, image_id: str) -> list[str]:
        qs = build_pope_questions(annotations, classes, split, seed=3)
        return sorted(q.object for q in qs if q.image_id == image_id and not q.label)

    # "q" has a dog: the adversarial negative is the cat that co-occurs with dogs,
    # the popular one is the most frequent absent class (car/bus tie -> class order: car).
    assert negatives("adversarial", "q") == ["cat"]
    assert negatives("popular", "q") == ["car"]
    # "c" (car, bus) co-occurs with no absent class: adversarial falls back to popularity.
    assert negatives("adversarial", "c") == ["cat", "dog"]
    assert negatives("popular", "a") == ["bus", "car"]


def test_pope_balancing_caps_and_errors_on_cpu() -> None:
    classes = ["a", "b", "c", "d"]
    annotations = [("full", {"a", "b", "c", "d"}), ("three", {"a", "b", "c"}), ("two", {"a", "b"})]
    qs = build_pope_questions(annotations, classes, "random", seed=0)
    assert not [q for q in qs if q.image_id == "full"]  # nothing absent -> no questions
    three = [q for q in qs if q.image_id == "three"]
    assert len(three) == 2 and {q.object for q in three if not q.label} == {"d"}
    capped = build_pope_questions(annotations, classes, "random", seed=0, max_positives=1)
    assert len([q for q in qs if q.image_id == "two"]) == 4
    assert len([q for q in capped if q.image_id == "two"]) == 2
    with pytest.raises(ValueError, match="split"):
        build_pope_questions(annotations, classes, "hard", seed=0)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        build_pope_questions([("x", {"zebra"})], classes, "random")
