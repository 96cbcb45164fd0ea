"""Preference rows (ours and TRL's) -> learner rows; bad rows raise RowError naming the column."""

from __future__ import annotations

import io

import pyarrow as pa
import pytest

from mmalign.preference_rows import (
    CONVERTED_SCHEMA,
    LEARNER_COLUMNS,
    convert_rows,
    convert_table,
    row_id,
    to_learner_row,
)
from mmalign.schema import PREFERENCE_SCHEMA, RowError, preference_row


def _png(colour: tuple[int, int, int] = (255, 0, 0)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png()


def _ours(**overrides) -> dict:
    kwargs = dict(
        id="r1",
        prompt="Is there a red circle?",
        chosen="Yes.",
        rejected="No.",
        images=[PNG],
        source="test",
        method="bdhs",
    )
    kwargs.update(overrides)
    return preference_row(**kwargs)


def test_our_schema_row_round_trips_through_parquet_on_cpu() -> None:
    raw = _ours(rejected_extra=["Maybe."])
    raw = pa.Table.from_pylist([raw], schema=PREFERENCE_SCHEMA).to_pylist()[0]
    row = to_learner_row(raw)
    assert list(row) == list(LEARNER_COLUMNS)
    assert row == {
        "id": "r1",
        "image": PNG,
        "prompt": "Is there a red circle?",  # the image placeholder part is dropped
        "chosen": "Yes.",
        "rejected": "No.",
        "rejected_extra": ["Maybe."],
        "responses": [],
    }


def test_trl_plain_strings_and_single_image_on_cpu() -> None:
    raw = {"prompt": "<image>\nWhat colour?", "chosen": "Red.", "rejected": "Blue.", "image": PNG}
    row = to_learner_row(raw)
    assert (row["prompt"], row["chosen"], row["rejected"]) == ("What colour?", "Red.", "Blue.")
    assert row["id"] == row_id(raw) and row["id"].startswith("sha1-")
    assert row_id(raw) == row_id(dict(raw))  # stable, so quarantine ids can be looked up


def test_trl_conversational_and_implicit_prompt_on_cpu() -> None:
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Shape?"}]}
    explicit = {
        "prompt": [user],
        "chosen": [{"role": "assistant", "content": "A square."}],  # content as a string
        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "A disc."}]}],
        "images": [{"bytes": PNG, "path": None}],
    }
    implicit = {  # TRL implicit prompt: the user turn is part of chosen/rejected
        "chosen": [user, {"role": "assistant", "content": "A square."}],
        "rejected": [user, {"role": "assistant", "content": "A disc."}],
        "images": [PNG],
    }
    for raw in (explicit, implicit):
        row = to_learner_row(raw)
        assert (row["prompt"], row["chosen"], row["rejected"]) == ("Shape?", "A square.", "A disc.")


def test_ranked_rows_for_mdpo_on_cpu() -> None:
    raw = _ours(responses=["best", "good", "bad", "worst"])
    row = to_learner_row(raw, ranked=True)
    assert row["responses"] == ["best", "good", "bad", "worst"]
    assert to_learner_row(_ours(), ranked=True)["responses"] == ["Yes.", "No."]  # K = 2
    assert to_learner_row(_ours())["responses"] == []  # pair losses leave it empty
    with pytest.raises(RowError, match="^rejected_extra: MDPO ranks one list"):
        to_learner_row(_ours(rejected_extra=["Maybe."]), ranked=True)


def test_image_paths_use_the_loader_on_cpu() -> None:
    raw = {"prompt": "Q?", "chosen": "a", "rejected": "b", "images": [{"path": "x.png"}]}
    seen = []
    row = to_learner_row(raw, load_image=lambda s: seen.append(s["path"]) or PNG)
    assert row["image"] == PNG and seen == ["x.png"]
    with pytest.raises(RowError, match="^images: image 'x.png' is a path and no loader"):
        to_learner_row(raw)

    def missing(struct):
        raise FileNotFoundError(struct["path"])

    with pytest.raises(RowError, match="^images: cannot read 'x.png'"):
        to_learner_row(raw, load_image=missing)


@pytest.mark.parametrize(
    ("change", "column"),
    [
        ({"chosen": ""}, "chosen"),
        ({"rejected": [{"role": "assistant", "content": []}]}, "rejected"),
        ({"prompt": "<image>"}, "prompt"),
        ({"images": []}, "images"),
        ({"images": [PNG, PNG]}, "images"),
        ({"images": [b"not a png"]}, "images"),
        ({"images": [{"bytes": None, "path": None}]}, "images"),
        ({"rejected_images": [{"bytes": PNG, "path": None}]}, "rejected_images"),
        ({"rejected_extra": ["a", "b"]}, "rejected_extra"),
        ({"rejected_extra": [""]}, "rejected_extra"),
        ({"responses": ["only one"]}, "responses"),
        ({"chosen": 3}, "chosen"),
    ],
)
def test_bad_rows_name_the_column_on_cpu(change: dict, column: str) -> None:
    raw = {"prompt": "Q?", "chosen": "a", "rejected": "b", "images": [PNG], **change}
    with pytest.raises(RowError) as info:
        to_learner_row(raw)
    assert str(info.value).startswith(f"{column}: ")


def test_convert_keeps_one_row_per_input_on_cpu() -> None:
    good = {"id": "g", "prompt": "Q?", "chosen": "a", "rejected": "b", "images": [PNG]}
    bad = {"id": "b", "prompt": "Q?", "chosen": "", "rejected": "b", "images": [PNG]}
    rows = convert_rows([good, bad, good])
    assert [r["id"] for r in rows] == ["g", "b", "g"]
    assert [r["error"] for r in rows] == ["", "chosen: empty response", ""]
    table = convert_table(pa.Table.from_pylist([good, bad]))
    assert table.schema == CONVERTED_SCHEMA and table.num_rows == 2
    assert table.column("error").to_pylist() == ["", "chosen: empty response"]


def test_mixed_mdpo_offline_rows_rank_as_pairs_on_cpu(tmp_path) -> None:
    """Mixed-DPO with MDPO batches offline rows with online pairs: plain pairs become the
    K = 2 ranking, other K and two-rejected rows are quarantined with their reason."""
    import json

    from mmalign import config as C
    from mmalign import io as mio
    from pipelines.online_dpo import load_offline

    rows = [
        _ours(id="pair"),
        _ours(id="k3", responses=["Yes.", "Yes, one.", "No."]),
        _ours(id="extra", rejected_extra=["Maybe."]),
    ]
    mio.write_preferences(rows, str(tmp_path / "pairs.parquet"))
    over = {
        "data.offline_pairs": str(tmp_path / "pairs.parquet"),
        "learner.loss": "mdpo",
        # two of three rows are bad on purpose: lift the systematic-error guard
        "data.max_quarantined": 1.0,
    }
    cfg = C.load(None, {**over, "storage.output_dir": str(tmp_path / "run")})
    good = load_offline(cfg)
    assert [(r["id"], r["responses"]) for r in good] == [("pair", ["Yes.", "No."])]
    lines = (tmp_path / "run" / "quarantine_offline.jsonl").read_text().splitlines()
    reasons = {json.loads(x)["id"]: json.loads(x)["reason"] for x in lines}
    assert reasons["k3"].startswith("responses: mixed MDPO") and "K = 3" in reasons["k3"]
    assert reasons["extra"].startswith("rejected_extra: MDPO ranks one list")
