"""Preference-row contract, readers (LLaVA JSON, Parquet variants) and TRL compatibility."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet  # noqa: F401  (pa.parquet)
import pytest
from PIL import Image

from mmalign import io as mio
from mmalign.schema import (
    PREFERENCE_SCHEMA,
    RowError,
    message_text,
    preference_row,
)


def _png(colour: str = "red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def _pref(i: int, **kw) -> dict:
    args = dict(
        id=f"p{i}",
        prompt="Describe the image.",
        chosen="There is a red circle.",
        rejected="There is a blue square.",
        images=[_png()],
        source="shapesworld",
        method="bdhs",
        meta={"similarity": 0.8, "iterations": 2, "rho_th": 0.99},
    )
    args.update(kw)
    return preference_row(**args)


def test_row_builder_fills_meta_and_messages() -> None:
    row = _pref(0)
    assert row["prompt"][0]["content"][0]["type"] == "image"
    assert message_text(row["chosen"]) == "There is a red circle."
    assert row["meta"]["iterations"] == 2
    assert json.loads(row["meta"]["params"]) == {"rho_th": 0.99}


@pytest.mark.parametrize(
    ("kw", "column"),
    [
        ({"chosen": " "}, "chosen"),
        ({"images": []}, "images"),
        ({"method": ""}, "method"),
        ({"prompt": ""}, "prompt"),
        ({"responses": ["only one"]}, "responses"),
    ],
)
def test_bad_rows_name_the_column(kw: dict, column: str) -> None:
    with pytest.raises(RowError, match=column):
        _pref(0, **kw)


def test_trl_user_loads_our_parquet_with_datasets(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = [
        _pref(0),
        _pref(1, rejected_extra=["There is a green cross."], responses=["a.", "b.", "c."]),
    ]
    path = tmp_path / "prefs.parquet"
    mio.write_preferences(rows, str(path))
    ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
    # TRL's vision DPO columns, in TRL's conversational layout
    assert {"prompt", "chosen", "rejected", "images"} <= set(ds.column_names)
    ex = ds[0]
    assert isinstance(ex["images"][0], Image.Image) and ex["images"][0].size == (8, 8)
    assert ex["prompt"][0]["role"] == "user"
    assert [c["type"] for c in ex["prompt"][0]["content"]] == ["image", "text"]
    assert ex["chosen"] == [
        {"role": "assistant", "content": [{"type": "text", "text": "There is a red circle."}]}
    ]
    assert ds[1]["responses"] == ["a.", "b.", "c."]
    assert ds[1]["rejected_extra"] == ["There is a green cross."]


def test_llava_json_reader_quarantines_bad_rows(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(_png())
    items = [
        {
            "id": "a",
            "image": "img/a.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is there?"},
                {"from": "gpt", "value": "A red circle."},
            ],
        },
        {"id": "b", "conversations": [{"from": "human", "value": "<image>\nHi"}]},  # no image
        {"id": "c", "image": "img/a.png", "conversations": [{"from": "gpt", "value": "x"}]},
    ]
    (tmp_path / "data.json").write_text(json.dumps(items))
    good, bad = mio.read_prompts(str(tmp_path / "data.json"))
    assert [r["id"] for r in good] == ["a"]
    assert good[0]["prompt"] == "What is there?" and good[0]["reference"] == "A red circle."
    assert good[0]["images"][0]["path"] == str(tmp_path / "img" / "a.png")
    assert mio.decode_image(good[0]["images"][0]).size == (8, 8)
    assert {b["id"]: b["reason"] for b in bad} == {
        "b": "image: missing",
        "c": "conversations: no 'human' turn",
    }


def test_parquet_readers_ours_generic_and_column_check(tmp_path: Path) -> None:
    ours = tmp_path / "ours.parquet"
    mio.write_preferences([_pref(0)], str(ours))
    good, bad = mio.read_prompts(str(ours))
    assert not bad and good[0]["reference"] == "There is a red circle."
    assert good[0]["rejected"] == "There is a blue square."
    assert good[0]["images"][0]["bytes"] == _png()

    generic = tmp_path / "generic.parquet"
    pa.parquet.write_table(
        pa.table({"id": ["g"], "image": [_png()], "question": ["Q?"], "answer": ["A."]}), generic
    )
    good, _ = mio.read_prompts(str(generic))
    assert good[0]["prompt"] == "Q?" and good[0]["reference"] == "A."

    wrong = tmp_path / "wrong.parquet"
    pa.parquet.write_table(pa.table({"id": ["g"], "img": [_png()], "question": ["Q?"]}), wrong)
    with pytest.raises(ValueError, match=r"no 'image' or 'images' column.*img"):
        mio.read_prompts(str(wrong))


def _keys(typed_dict: type) -> list[str]:
    return list(typed_dict.__annotations__)


def test_schema_is_the_single_contract(tmp_path: Path) -> None:
    """Each contract is declared once: the row types name exactly the schema's columns,
    the builders fill exactly those, and every writer stores exactly the declared schema."""
    from mmalign import preference_rows as pr
    from mmalign.rows import LearnerRow, PreferenceRow, PromptRow
    from mmalign.schema import PROMPT_SCHEMA, prompt_record
    from operators.prompt_source import OUTPUT_SCHEMA

    assert PREFERENCE_SCHEMA.names[:5] == ["id", "prompt", "chosen", "rejected", "images"]
    assert _keys(PreferenceRow) == PREFERENCE_SCHEMA.names
    assert _keys(PromptRow) == PROMPT_SCHEMA.names
    assert sorted(_keys(LearnerRow)) == sorted(pr.LEARNER_SCHEMA.names)
    assert _keys(pr.ConvertedRow)[-1] == pr.ERROR_COLUMN == pr.CONVERTED_SCHEMA.names[-1]
    # what the learner cannot do without; id, rejected_extra and responses may be absent
    assert LearnerRow.__required_keys__ == {"image", "prompt", "chosen", "rejected"}
    assert OUTPUT_SCHEMA.names == [*PROMPT_SCHEMA.names, "idx", "error"]

    pref, prompt = _pref(0), prompt_record(id="q0", prompt="<image> Describe.", images=[_png()])
    assert list(pref) == PREFERENCE_SCHEMA.names and list(prompt) == PROMPT_SCHEMA.names
    learner = pr.to_learner_row(pref)
    assert list(learner) == list(pr.LEARNER_COLUMNS)
    assert pr.convert_table(pa.Table.from_pylist([pref])).schema == pr.CONVERTED_SCHEMA

    mio.write_preferences([pref], str(tmp_path / "pref.parquet"))
    mio.write_prompts([prompt], str(tmp_path / "prompt.parquet"))
    for name, schema in (("pref", PREFERENCE_SCHEMA), ("prompt", PROMPT_SCHEMA)):
        stored = pa.parquet.read_schema(tmp_path / f"{name}.parquet")
        assert stored.remove_metadata() == schema, name
        features = json.loads(stored.metadata[b"huggingface"])["info"]["features"]
        assert list(features) == schema.names, name  # datasets restores every column
