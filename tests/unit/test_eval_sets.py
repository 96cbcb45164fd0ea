"""POPE / COCO-format evaluation inputs (mmalign/eval_sets.py, pipelines/evaluate.py's
pope-coco set): the readers on hand-written rows (bad ones quarantined naming file and
line), the COCO + synonyms vocabulary, the config checks, and the metric values of fixed
answers and captions computed by hand. No model: the answers are the test's own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmalign.config import ConfigError, load
from mmalign.eval_sets import (
    coco_vocabulary,
    first_images,
    pope_split_name,
    read_coco_instances,
    read_pope,
)
from mmalign.evaluation import score_responses
from mmalign.metrics.vocab import shapes_vocabulary
from pipelines.evaluate import pope_coco_set
from tests.eval_files import CATEGORIES, SYNONYMS, write_coco, write_pope

# image -> annotated COCO categories (c.jpg has none: it still counts in CHAIR_s)
COCO_IMAGES = {"a.jpg": ["person", "dog", "dog"], "b.jpg": ["pizza", "dining table"], "c.jpg": []}
# (image, object, label) per split; random and adversarial share two positives
POPE = {
    "random": [("a.jpg", "person", "yes"), ("a.jpg", "cat", "no"),
               ("b.jpg", "pizza", "yes"), ("b.jpg", "dog", "no")],
    "popular": [("a.jpg", "dog", "yes"), ("a.jpg", "dining table", "no"),
                ("b.jpg", "dining table", "yes"), ("b.jpg", "person", "no")],
    "adversarial": [("a.jpg", "person", "yes"), ("a.jpg", "bicycle", "no"),
                    ("b.jpg", "pizza", "yes"), ("b.jpg", "cat", "no")],
}  # fmt: skip
# the model's answers, by (image, object): one answer per (image, question), as greedy gives
ANSWERS = {
    ("a.jpg", "person"): "Yes",  # random tp, adversarial tp
    ("a.jpg", "cat"): "Yes, a cat.",  # random fp
    ("b.jpg", "pizza"): "No",  # random fn, adversarial fn
    ("b.jpg", "dog"): "no",  # random tn
    ("a.jpg", "dog"): "Yes.",  # popular tp
    ("a.jpg", "dining table"): "Yes",  # popular fp
    ("b.jpg", "dining table"): "Yes",  # popular tp
    ("b.jpg", "person"): "Maybe",  # popular: "other", scored as no -> tn
    ("a.jpg", "bicycle"): "No, there is none.",  # adversarial tn
    ("b.jpg", "cat"): "No.",  # adversarial tn
}
CAPTIONS = {
    "a.jpg": "A man walks his dog past a bicycle.",  # person, dog, bicycle (hallucinated)
    "b.jpg": "Two pizzas on a plate.",  # pizza; the dining table is missed
    "c.jpg": "A cat asleep on a bike.",  # cat, bicycle: both hallucinated
}


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, str]:
    out = {
        split: write_pope(tmp_path / "pope" / f"coco_pope_{split}.json", qs)
        for split, qs in POPE.items()
    }
    out["coco"] = write_coco(tmp_path / "coco" / "instances_val.json", COCO_IMAGES)
    (tmp_path / "synonyms.txt").write_text(SYNONYMS)
    out["synonyms"] = str(tmp_path / "synonyms.txt")
    return out


def pope_coco_cfg(files: dict[str, str], **extra: object):  # type: ignore[no-untyped-def]
    overrides = {
        "data.eval": "pope-coco",
        "data.pope_files": ",".join(files[s] for s in ("adversarial", "popular", "random")),
        "data.coco_annotations": files["coco"],
        "data.coco_synonyms": files["synonyms"],
        **extra,
    }
    return load(None, overrides)


def test_read_pope_keeps_good_rows_and_quarantines_bad_ones_by_line_on_cpu() -> None:
    text = "\n".join(
        [
            json.dumps({"question_id": 1, "image": "x.jpg", "text": "Is there a dog in the image?",
                        "label": "yes"}),
            "",  # blank lines are skipped (line numbers still count them)
            "{not json",
            json.dumps({"question_id": 2, "image": "x.jpg", "text": "Is there a cat?",
                        "label": "maybe"}),
            json.dumps({"question_id": 3, "text": "Is there a cat?", "label": "no"}),
            json.dumps({"question_id": 1, "image": "y.jpg", "text": "Again?", "label": "no"}),
            json.dumps({"question_id": 4, "image": "y.jpg", "text": " Is there a cat? ",
                        "label": " NO"}),
            "[1, 2]",
        ]
    )  # fmt: skip
    good, bad = read_pope(text, "s3://b/coco_pope_popular.json")
    assert [(q.question_id, q.image, q.text, q.label, q.split) for q in good] == [
        ("1", "x.jpg", "Is there a dog in the image?", True, "popular"),
        ("4", "y.jpg", "Is there a cat?", False, "popular"),
    ]
    reasons = [b["reason"] for b in bad]
    assert reasons[0].startswith("s3://b/coco_pope_popular.json line 3: not JSON")
    assert "line 4: label must be 'yes' or 'no', got 'maybe'" in reasons[1]
    assert "line 5: missing ['image']" in reasons[2]
    assert "line 6: question_id 1 repeated" in reasons[3]
    assert "line 8: expected an object, got list" in reasons[4]
    assert [b["id"] for b in bad] == [None, "2", "3", "1", None]


def test_read_pope_accepts_a_json_array_and_names_splits_by_file_on_cpu() -> None:
    items = [{"question_id": 7, "image": "z.jpg", "text": "Q?", "label": "yes"}, {"x": 1}]
    good, bad = read_pope(json.dumps(items), "pope/my_questions.json")
    assert [(q.question_id, q.split) for q in good] == [("7", "my_questions")]
    assert "pope/my_questions.json entry 1: missing" in bad[0]["reason"]
    assert [pope_split_name(f"d/coco_pope_{s}.json") for s in ("random", "adversarial")] == [
        "random",
        "adversarial",
    ]
    with pytest.raises(ValueError, match="p.json: not a JSON array"):
        read_pope("[{", "p.json")


def test_first_images_keeps_every_question_of_the_first_n_images_on_cpu() -> None:
    assert read_pope("", "empty.json") == ([], [])
    text = "\n".join(
        json.dumps({"question_id": i, "image": img, "text": f"q{i}", "label": "no"})
        for i, img in enumerate(["a", "a", "b", "c", "b"])
    )
    items, _ = read_pope(text, "x.json")
    assert [q.question_id for q in first_images(items, 2)] == ["0", "1", "2", "4"]
    assert len(first_images(items, 0)) == 5


def test_read_coco_instances_on_cpu(tmp_path: Path) -> None:
    data = json.loads(Path(write_coco(tmp_path / "i.json", COCO_IMAGES)).read_text())
    data["images"] += [{"id": 100, "file_name": "dup.jpg"}, {"id": 200}]
    data["annotations"] += [
        {"image_id": 999, "category_id": 10},
        {"image_id": 100, "category_id": 77},
    ]
    coco = read_coco_instances(json.dumps(data), "ann/instances_val.json")
    assert coco.classes == tuple(CATEGORIES)
    assert [(i.id, i.file_name, i.objects) for i in coco.images] == [
        ("100", "a.jpg", frozenset({"person", "dog"})),  # two dog boxes: one class
        ("101", "b.jpg", frozenset({"pizza", "dining table"})),
        ("102", "c.jpg", frozenset()),
    ]
    assert [q["reason"] for q in coco.quarantined] == [
        "ann/instances_val.json images[3]: image id 100 repeated",
        "ann/instances_val.json images[4]: needs an id and a file_name",
        "ann/instances_val.json annotations[5]: unknown image_id 999",
        "ann/instances_val.json annotations[6]: unknown category_id 77",
    ]
    with pytest.raises(ValueError, match="x.json: not JSON"):
        read_coco_instances("{", "x.json")
    with pytest.raises(ValueError, match="x.json: 'categories' must be a list"):
        read_coco_instances(json.dumps({"images": [], "annotations": []}), "x.json")
    bad = {**data, "categories": [*data["categories"], {"id": 50, "name": "Dog"}]}
    with pytest.raises(ValueError, match=r"x.json categories\[6\]: .*'dog' repeated"):
        read_coco_instances(json.dumps(bad), "x.json")


def test_coco_vocabulary_from_categories_and_synonyms_on_cpu() -> None:
    vocab = coco_vocabulary(CATEGORIES, SYNONYMS, "synonyms.txt")
    assert vocab.classes == tuple(CATEGORIES)
    assert vocab.find_mentions("Two women at a desk eating pizzas, a bike and hot dogs") == [
        "person",
        "dining table",
        "pizza",
        "bicycle",
        "dog",  # no "hot dog" class here: "dogs" is a dog
    ]
    assert coco_vocabulary(CATEGORIES).find_mentions("a table") == []  # no synonyms given
    with pytest.raises(ValueError, match="syn.txt line 2: class 'sofa' is not a category"):
        coco_vocabulary(CATEGORIES, "person, man\nsofa, couch\n", "syn.txt")


def test_config_checks_name_the_field_on_cpu(files: dict[str, str], tmp_path: Path) -> None:
    assert pope_coco_cfg(files).data.pope_files[0].endswith("coco_pope_adversarial.json")
    with pytest.raises(ConfigError, match="data.coco_annotations: must be set when data.eval"):
        load(None, {"data.eval": "pope-coco", "data.pope_files": files["random"]})
    with pytest.raises(ConfigError, match="data.pope_files: must be set"):
        load(None, {"data.eval": "pope-coco", "data.coco_annotations": files["coco"]})
    with pytest.raises(ConfigError, match="data.pope_files: is read only when data.eval is"):
        load(None, {"data.pope_files": files["random"]})
    with pytest.raises(ConfigError, match=r"data.pope_files\[1\]: no such file"):
        pope_coco_cfg(files, **{"data.pope_files": f"{files['random']},{tmp_path}/no.json"})
    with pytest.raises(ConfigError, match="data.coco_synonyms: no such file"):
        pope_coco_cfg(files, **{"data.coco_synonyms": str(tmp_path / "none.txt")})
    with pytest.raises(ConfigError, match="data.pope_files: two files hold the same split"):
        pope_coco_cfg(files, **{"data.pope_files": f"{files['random']},{files['random']}"})


def test_pope_and_chair_figures_by_hand_on_cpu(files: dict[str, str]) -> None:
    es = pope_coco_set(pope_coco_cfg(files))
    assert es.vocab.classes == tuple(CATEGORIES) and es.quarantined == []
    # 12 POPE questions (asked as written) + one description per COCO image
    assert len(es.requests) == 15
    assert len({(r.image_id, r.prompt) for r in es.requests}) == 13  # 2 shared positives
    # POPE image names resolve under each file's directory, COCO file_names under theirs
    pope_dir, coco_dir = str(Path(files["random"]).parent), str(Path(files["coco"]).parent)
    assert {r.image_id for r in es.requests if r.kind == "pope"} == {
        f"{pope_dir}/a.jpg",
        f"{pope_dir}/b.jpg",
    }
    assert list(es.truths) == [f"{coco_dir}/{name}" for name in COCO_IMAGES]

    def answer(r) -> str:  # type: ignore[no-untyped-def]
        name = Path(r.image_id).name
        if r.kind == "describe":
            return CAPTIONS[name]
        obj = r.prompt.removeprefix("Is there a ").removesuffix(" in the image?")
        return ANSWERS[(name, obj)]

    report = score_responses(es.requests, [answer(r) for r in es.requests], es.truths, es.vocab)
    pope = report["pope"]
    assert list(pope) == ["adversarial", "popular", "random"]  # data.pope_files order
    # random: tp 1, fp 1, fn 1, tn 1
    r = pope["random"]
    assert (r["tp"], r["fp"], r["fn"], r["tn"]) == (1, 1, 1, 1)
    assert (r["accuracy"], r["precision"], r["recall"], r["f1"]) == (0.5, 0.5, 0.5, 0.5)
    # popular: tp 2, fp 1, tn 1 ("Maybe" is other -> no), fn 0
    p = pope["popular"]
    assert (p["tp"], p["fp"], p["fn"], p["tn"], p["n_other"]) == (2, 1, 0, 1, 1)
    assert p["accuracy"] == 0.75 and p["precision"] == pytest.approx(2 / 3)
    assert p["recall"] == 1.0 and p["f1"] == pytest.approx(0.8) and p["yes_ratio"] == 0.75
    # adversarial: tp 1, fn 1, tn 2, fp 0
    a = pope["adversarial"]
    assert (a["tp"], a["fp"], a["fn"], a["tn"]) == (1, 0, 1, 2)
    assert (a["accuracy"], a["precision"], a["recall"]) == (0.75, 1.0, 0.5)
    assert a["f1"] == pytest.approx(2 / 3)
    assert report["pope_mean_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    # CHAIR: mentions a: person dog bicycle* / b: pizza / c: cat* bicycle* -> 3 of 6
    # hallucinated, 2 of 3 captions hallucinate, 3 of 4 annotated classes recalled
    c = report["chair"]
    assert (c["n_mentions"], c["n_hallucinated_mentions"]) == (6, 3)
    assert (c["chair_i"], c["chair_s"], c["recall"]) == (0.5, pytest.approx(2 / 3), 0.75)
    assert (c["n_ground_truth_objects"], c["n_recalled_objects"]) == (4, 3)
    assert report["n_images"] == 3
    # the ShapesWorld vocabulary cannot score this set at all
    with pytest.raises(ValueError, match="not in the vocabulary"):
        score_responses(es.requests, [answer(r) for r in es.requests], es.truths,
                        shapes_vocabulary())  # fmt: skip


def test_pope_coco_set_options_on_cpu(files: dict[str, str], tmp_path: Path) -> None:
    root = str(tmp_path / "val2014")
    es = pope_coco_set(pope_coco_cfg(files, **{"data.eval_image_root": root}), max_rows=1)
    # the first image of each file only; every image under data.eval_image_root
    assert {r.image_id for r in es.requests} == {f"{root}/a.jpg"}
    assert [r.kind for r in es.requests].count("pope") == 6
    # without data.coco_synonyms, judge.vocabulary's file gives the synonyms
    cfg = pope_coco_cfg(files, **{"data.coco_synonyms": "", "judge.vocabulary": files["synonyms"]})
    assert pope_coco_set(cfg).vocab.find_mentions("a man at a desk") == ["person", "dining table"]
    bare = pope_coco_set(pope_coco_cfg(files, **{"data.coco_synonyms": ""})).vocab
    assert bare.find_mentions("a man at a desk") == []
    # bad rows are quarantined with file and line; too many of them fail the run
    with open(files["random"], "a") as f:
        f.write('{"question_id": 9, "image": "a.jpg", "text": "Q?", "label": "perhaps"}\n')
    es = pope_coco_set(pope_coco_cfg(files))
    assert [q["reason"] for q in es.quarantined] == [
        f"{files['random']} line 5: label must be 'yes' or 'no', got 'perhaps'"
    ]
    from mmalign.quarantine import QuarantineError

    with pytest.raises(QuarantineError, match="above the allowed"):
        pope_coco_set(pope_coco_cfg(files, **{"data.max_quarantined": 0.01}))
